# -*- coding: utf-8 -*-
from odoo import _, api, fields, models
from odoo.exceptions import UserError

from ..lib.export import runner


class LlmModelExportWizard(models.TransientModel):
    """Export on a fine-tuned model's form: pick a format; the export starts at once, where the model
    was trained (its provider's adapter: a detached process here, a Ray job) and the cron follows it."""
    _name = 'llm.model.export.wizard'
    _description = 'Export a fine-tuned model'

    model_id = fields.Many2one('llm.model', required=True, default=lambda self: self.env.context.get('active_id'))
    format = fields.Selection(runner.FORMATS, required=True, default='gguf_f16')

    @api.multi
    def action_export(self):
        self.ensure_one()
        if self.model_id.kind != 'fine_tuned':
            raise UserError(_('Only fine-tuned models can be exported; "%s" is a base model.') % self.model_id.name)
        export = self.env['llm.model.export'].create({'model_id': self.model_id.id, 'format': self.format})
        export.action_check()  # start it now rather than at the next cron run
        return {'type': 'ir.actions.act_window', 'res_model': 'llm.model.export', 'res_id': export.id,
                'view_mode': 'form', 'target': 'current'}
