# -*- coding: utf-8 -*-
from odoo import _, api, fields, models


class LlmApiKeyWizard(models.TransientModel):
    """Makes an API key and shows its secret once. The transient record keeping the secret is
    emptied as soon as it has been shown (the Done button) and garbage-collected anyway."""
    _name = 'llm.api.key.wizard'
    _description = 'New LLM API Key'

    name = fields.Char(required=True)
    user_id = fields.Many2one('res.users', string='Runs as', required=True, default=lambda self: self.env.user,
                              domain=[('share', '=', False)])
    secret = fields.Char(readonly=True, help='Copy it now: it is not stored and cannot be shown again.')
    key_id = fields.Many2one('llm.api.key', readonly=True)

    @api.multi
    def action_generate(self):
        self.ensure_one()
        key, secret = self.env['llm.api.key']._generate(self.name, self.user_id)
        self.write({'secret': secret, 'key_id': key.id})
        return {'type': 'ir.actions.act_window', 'res_model': self._name, 'res_id': self.id, 'view_mode': 'form',
                'target': 'new', 'name': _('Your new API key')}

    @api.multi
    def action_done(self):
        self.write({'secret': False})
        return {'type': 'ir.actions.act_window_close'}
