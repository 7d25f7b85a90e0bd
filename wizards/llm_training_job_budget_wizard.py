# -*- coding: utf-8 -*-
"""Going over a provider's monthly budget is a deliberate act: the job form's Submit opens this
when the job would go over, with the figures; Submit Anyway needs a reason, kept as a job event."""
from odoo import _, api, fields, models
from odoo.exceptions import UserError


class LlmTrainingJobBudgetWizard(models.TransientModel):
    _name = 'llm.training.job.budget.wizard'
    _description = 'Submit a Training Job over the Monthly Budget'

    job_id = fields.Many2one('llm.training.job', required=True, ondelete='cascade', readonly=True)
    figures = fields.Text(readonly=True, help="This month's cost so far, this job's estimate and the budget.")
    reason = fields.Text(help='Why this job may go over the budget; kept in the job\'s events.')

    @api.multi
    def action_submit_anyway(self):
        self.ensure_one()
        if not (self.reason or '').strip():
            raise UserError(_('Give the reason to go over the monthly budget.'))
        self.job_id.action_submit(budget_override_reason=self.reason)
        return {'type': 'ir.actions.act_window_close'}
