# -*- coding: utf-8 -*-
"""The deploy guard's confirmation: Deploy opens it when the model is worse than the deployed one
on the main metric beyond chance, or not compared yet; Deploy Anyway needs a reason, kept on the
model (deploy_override_reason)."""
from odoo import _, api, fields, models
from odoo.exceptions import UserError


class LlmModelDeployWizard(models.TransientModel):
    _name = 'llm.model.deploy.wizard'
    _description = 'Deploy a Model the Guard Warned About'

    model_id = fields.Many2one('llm.model', required=True, ondelete='cascade', readonly=True)
    figures = fields.Text(readonly=True, help='What the comparison with the deployed model found.')
    reason = fields.Text(help='Why this model may replace the deployed one; kept on the model.')

    @api.multi
    def action_deploy_anyway(self):
        self.ensure_one()
        if not (self.reason or '').strip():
            raise UserError(_('Give the reason to deploy this model anyway.'))
        self.model_id.action_deploy(guard_override_reason=self.reason)
        return {'type': 'ir.actions.act_window_close'}
