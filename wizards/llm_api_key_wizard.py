# -*- coding: utf-8 -*-
from odoo import SUPERUSER_ID, _, api, fields, models
from odoo.exceptions import AccessError


class LlmApiKeyWizard(models.TransientModel):
    """Makes an API key and shows its secret once. The secret is never written to the database:
    Generate answers with a fresh form of this wizard whose default is the secret (the browser's
    memory only), closed without saving."""
    _name = 'llm.api.key.wizard'
    _description = 'New LLM API Key'

    name = fields.Char(required=True)
    user_id = fields.Many2one('res.users', string='Runs as', required=True, default=lambda self: self.env.user,
                              domain=[('share', '=', False)],
                              help='Only a system administrator may choose another user than themselves.')
    expires_at = fields.Datetime(string='Expires', help='Empty: the key works until it is revoked.')
    runs_as_superuser = fields.Boolean(compute='_compute_runs_as_superuser')
    secret = fields.Char(readonly=True, help='Copy it now: it is not stored and cannot be shown again.')

    @api.depends('user_id')
    def _compute_runs_as_superuser(self):
        for wizard in self:
            wizard.runs_as_superuser = wizard.user_id.id == SUPERUSER_ID

    @api.model
    def create(self, vals):
        # refused here already, not only when the key is made: the wizard is the documented way in
        user = self.env['res.users'].browse(vals.get('user_id') or self.env.uid)
        if not self.env['llm.api.key']._user_may_run_as(user):
            raise AccessError(_('Only a system administrator may make a key that runs as another user (%s) or '
                                'as the superuser.') % user.name)
        return super(LlmApiKeyWizard, self).create(vals)

    @api.multi
    def action_generate(self):
        self.ensure_one()
        key, secret = self.env['llm.api.key']._generate(self.name, self.user_id, self.expires_at)
        return {'type': 'ir.actions.act_window', 'res_model': self._name, 'view_mode': 'form', 'target': 'new',
                'name': _('Your new API key'),
                'context': {'default_secret': secret, 'default_name': key.name, 'default_user_id': key.user_id.id}}
