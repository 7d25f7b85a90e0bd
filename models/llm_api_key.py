# -*- coding: utf-8 -*-
import secrets

from odoo import _, api, fields, models
from odoo.exceptions import UserError

from ..lib import api_usage
from ..lib.openai_api import KEY_PREFIX, KEY_PREFIX_SHOWN, hash_key


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

    @api.model_cr
    def init(self):
        api_usage.create_table(self.env.cr)  # the per-minute request count every worker shares

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
        """(key id, user id) of the active key with this secret whose user is active, or None.
        One query, before the request has a user: it compares hashes, never the secret. It
        writes nothing: the API counts the request and stamps last_used on a cursor of its own
        (`_record_use`), outside the request's transaction."""
        if not secret:
            return None
        self.env.cr.execute("""
            SELECT k.id, k.user_id
              FROM llm_api_key k JOIN res_users u ON u.id = k.user_id
             WHERE k.key_hash = %s AND k.active AND u.active""", (hash_key(secret),))
        row = self.env.cr.fetchone()
        return (row[0], row[1]) if row else None

    @api.model
    def _record_use(self, key_id, per_minute, now):
        """Count one request of the key against `per_minute` (shared by every worker) and stamp
        its last_used, on a short cursor of its own in autocommit: concurrent requests neither
        wait for each other's transactions nor fail on the counter's row. (allowed, seconds to
        wait)."""
        with self.pool.cursor() as cr:
            cr.autocommit(True)
            allowed = api_usage.count_request(cr, key_id, per_minute, now)
            api_usage.stamp_last_used(cr, key_id)
        return allowed
