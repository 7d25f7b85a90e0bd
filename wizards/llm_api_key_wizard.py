# -*- coding: utf-8 -*-
from odoo import _, api, fields, models


class LlmApiKeyWizard(models.TransientModel):
    """Makes an API key and shows its secret once. The secret is never written to the database:
    Generate answers with a fresh form of this wizard whose default is the secret (the browser's
    memory only), closed without saving."""
    _name = 'llm.api.key.wizard'
    _description = 'New LLM API Key'

    name = fields.Char(required=True)
    user_id = fields.Many2one('res.users', string='Runs as', required=True, default=lambda self: self.env.user,
                              domain=[('share', '=', False)])
    secret = fields.Char(readonly=True, help='Copy it now: it is not stored and cannot be shown again.')

    @api.multi
    def action_generate(self):
        self.ensure_one()
        key, secret = self.env['llm.api.key']._generate(self.name, self.user_id)
        return {'type': 'ir.actions.act_window', 'res_model': self._name, 'view_mode': 'form', 'target': 'new',
                'name': _('Your new API key'),
                'context': {'default_secret': secret, 'default_name': key.name, 'default_user_id': key.user_id.id}}
