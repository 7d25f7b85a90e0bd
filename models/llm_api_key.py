# -*- coding: utf-8 -*-
import secrets

from odoo import SUPERUSER_ID, _, api, fields, models
from odoo.exceptions import AccessError, UserError

from ..lib.api_v1 import key_usage
from ..lib.api_v1.protocol import KEY_PREFIX, KEY_PREFIX_SHOWN, hash_key


class LlmApiKey(models.Model):
    """A key of the OpenAI-compatible API (/v1). A request runs as the key's user, with that
    user's access rights, record rules and company: the key adds no right of its own. Only a
    SHA-256 of the key is stored (the key is random, so the hash cannot be reversed); the secret
    is shown once by the wizard that makes it. Managers only (ACL); a key runs as its maker unless
    a system administrator chooses another user (the superuser included, with a warning). Revoking
    deletes the hash: a revoked key cannot come back."""
    _name = 'llm.api.key'
    _inherit = ['llm.access.mixin']
    _description = 'LLM API Key'
    _order = 'id desc'

    name = fields.Char(required=True, help='What the key is for, e.g. "CI pipeline".')
    user_id = fields.Many2one('res.users', string='Runs as', required=True, ondelete='cascade', index=True,
                              default=lambda self: self.env.user,
                              help='Requests with this key run as this user: they see and change exactly what '
                                   'the user may in the UI.')
    company_id = fields.Many2one('res.company', related='user_id.company_id', store=True, readonly=True)
    runs_as_superuser = fields.Boolean(compute='_compute_runs_as_superuser',
                                       help='The superuser bypasses every record rule: such a key reads every '
                                            'company\'s data.')
    # Not required: a revoked key has none (NULL never matches), so it can never be used again.
    key_hash = fields.Char(readonly=True, index=True, copy=False)
    key_prefix = fields.Char(string='Key', readonly=True, copy=False, help='The first characters, to tell keys apart.')
    last_used = fields.Datetime(readonly=True, copy=False)
    expires_at = fields.Datetime(string='Expires', copy=False,
                                 help='From this moment the key is refused (401), as an unknown key; empty: never.')
    revoked_at = fields.Datetime(readonly=True, copy=False)
    active = fields.Boolean(default=True, help='Untick to revoke the key: its hash is deleted, so it cannot be '
                                               'activated again; make a new key instead.')

    _sql_constraints = [('key_hash_unique', 'unique(key_hash)', 'This key exists already.')]

    # Written by _generate and revoking only: a manager who could set a hash could take over a key
    # that runs as someone else.
    _PROTECTED_FIELDS = ('key_hash', 'key_prefix', 'revoked_at', 'last_used')

    @api.model_cr
    def init(self):
        key_usage.create_table(self.env.cr)  # the per-minute request count every worker shares

    @api.depends('user_id')
    def _compute_runs_as_superuser(self):
        for key in self:
            key.runs_as_superuser = key.user_id.id == SUPERUSER_ID

    @api.model
    def create(self, vals):
        user = self.env['res.users'].browse(vals.get('user_id') or self.env.uid)
        if not self._user_may_run_as(user):
            raise AccessError(_('Only a system administrator may make a key that runs as another user (%s) or '
                                'as the superuser.') % user.name)
        if self.env.uid != SUPERUSER_ID and not self.env.context.get('llm_api_key_generate') and \
                set(vals) & set(self._PROTECTED_FIELDS):
            raise AccessError(_('API keys are made with New API Key, which shows the secret once.'))
        return super(LlmApiKey, self).create(vals)

    @api.multi
    def write(self, vals):
        if self.env.uid != SUPERUSER_ID:
            if set(vals) & set(self._PROTECTED_FIELDS):
                raise AccessError(_('The hash, prefix and dates of an API key are written by Odoo only.'))
            system = self.env.user.has_group('base.group_system')
            if 'user_id' in vals and not system:
                raise AccessError(_('Only a system administrator may change the user an API key runs as.'))
            if not system and any(key.user_id != self.env.user for key in self):
                raise AccessError(_('Only a system administrator may change a key that runs as another user.'))
            if 'user_id' in vals and not self._user_may_run_as(self.env['res.users'].browse(vals['user_id'])):
                raise AccessError(_('Only a system administrator may make a key run as the superuser.'))
        if vals.get('active') and any(not key.active or not key.key_hash for key in self):
            # a revoked key is gone for good (keys revoked before its hash was deleted on revoke too)
            raise UserError(_('A revoked API key cannot be activated again; make a new key.'))
        if 'active' in vals and not vals['active']:
            vals = dict(vals, key_hash=False, revoked_at=fields.Datetime.now())  # the hash goes: no way back
        return super(LlmApiKey, self).write(vals)

    @api.multi
    def action_revoke(self):
        """Revoke at once and for good (the same as unticking Active)."""
        self.write({'active': False})
        return True

    @api.model
    def _generate(self, name, user, expires_at=False):
        """Make a key for `user`; returns (record, secret). The secret exists only in the answer."""
        self.check_access_rights('create')
        if not user.active or user.share:
            raise UserError(_('API keys are for active internal users.'))
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = self.with_context(llm_api_key_generate=True).create({
            'name': name, 'user_id': user.id, 'key_hash': hash_key(secret), 'expires_at': expires_at,
            'key_prefix': secret[:KEY_PREFIX_SHOWN] + '...'}).with_context(llm_api_key_generate=False)
        return key, secret

    @api.model
    def _authenticate(self, secret):
        """(key id, user id) of the active, unexpired key with this secret whose user is active, or
        None. One query, before the request has a user: it compares hashes, never the secret. It
        writes nothing: the API counts the request and stamps last_used on a cursor of its own
        (`_record_use`), outside the request's transaction."""
        if not secret:
            return None
        self.env.cr.execute("""
            SELECT k.id, k.user_id
              FROM llm_api_key k JOIN res_users u ON u.id = k.user_id
             WHERE k.key_hash = %s AND k.active AND u.active
               AND (k.expires_at IS NULL OR k.expires_at > now() at time zone 'UTC')""", (hash_key(secret),))
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
            allowed = key_usage.count_request(cr, key_id, per_minute, now)
            key_usage.stamp_last_used(cr, key_id)
        return allowed
