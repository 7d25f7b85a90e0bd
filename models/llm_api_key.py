# -*- coding: utf-8 -*-
import secrets

from odoo import _, api, fields, models
from odoo.exceptions import UserError

from ..lib.openai_api import KEY_PREFIX, KEY_PREFIX_SHOWN, hash_key

LAST_USED_RESOLUTION = 60  # seconds: last_used is rewritten at most this often (no write per request)


class LlmApiKey(models.Model):
    """A key of the OpenAI-compatible API (/v1). A request runs as the key's user, with that
    user's access rights, record rules and company: the key adds no right of its own. Only a
    SHA-256 of the key is stored (the key is random, so the hash cannot be reversed); the secret
    is shown once by the wizard that makes it. Managers only (ACL)."""
    _name = 'llm.api.key'
    _description = 'LLM API Key'
    _order = 'id desc'

    name = fields.Char(required=True, help='What the key is for, e.g. "CI pipeline".')
    user_id = fields.Many2one('res.users', string='Runs as', required=True, ondelete='cascade', index=True,
                              default=lambda self: self.env.user,
                              help='Requests with this key run as this user: they see and change exactly what '
                                   'the user may in the UI.')
    company_id = fields.Many2one('res.company', related='user_id.company_id', store=True, readonly=True)
    key_hash = fields.Char(required=True, readonly=True, index=True, copy=False)
    key_prefix = fields.Char(string='Key', readonly=True, copy=False, help='The first characters, to tell keys apart.')
    last_used = fields.Datetime(readonly=True, copy=False)
    active = fields.Boolean(default=True)

    _sql_constraints = [('key_hash_unique', 'unique(key_hash)', 'This key exists already.')]

    @api.model
    def _generate(self, name, user):
        """Make a key for `user`; returns (record, secret). The secret exists only in the answer."""
        self.check_access_rights('create')
        if not user.active or user.share:
            raise UserError(_('API keys are for active internal users.'))
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = self.create({'name': name, 'user_id': user.id, 'key_hash': hash_key(secret),
                           'key_prefix': secret[:KEY_PREFIX_SHOWN] + '...'})
        return key, secret

    @api.model
    def _authenticate(self, secret):
        """The active key with this secret whose user is active, or an empty recordset. Runs as
        superuser (the request has no user yet); compares hashes, never the secret."""
        if not secret:
            return self.browse()
        key = self.sudo().search([('key_hash', '=', hash_key(secret))], limit=1)
        if not key or not key.user_id.active:
            return self.browse()
        return key

    def _touch(self):
        """Stamp last_used, at most once a minute (a GET must not write on every call)."""
        now = fields.Datetime.now()
        last = fields.Datetime.from_string(self.last_used) if self.last_used else None
        if not last or (fields.Datetime.from_string(now) - last).total_seconds() > LAST_USED_RESOLUTION:
            self.env.cr.execute('UPDATE llm_api_key SET last_used = %s WHERE id = %s', (now, self.id))
