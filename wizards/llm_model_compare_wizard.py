# -*- coding: utf-8 -*-
from odoo import _, api, fields, models
from odoo.exceptions import UserError

from ..lib.serving import model_compare


class LlmModelCompareWizard(models.TransientModel):
    """One prompt, several models: each model's answer under its name, through its provider's
    adapter (`generate`). A model whose provider cannot answer gets a line saying why; the others
    still answer."""
    _name = 'llm.model.compare.wizard'
    _description = 'Compare LLM Models'

    def _default_models(self):
        if self.env.context.get('active_model') == 'llm.model':
            return self.env['llm.model'].browse(self.env.context.get('active_ids') or [])
        return self.env['llm.model']

    model_ids = fields.Many2many('llm.model', 'llm_model_compare_wizard_model_rel', 'wizard_id', 'model_id',
                                 string='Models', default=_default_models)
    prompt = fields.Text()
    result = fields.Text(readonly=True)
    evaluation_summary = fields.Text(compute='_compute_evaluation_summary', string='Evaluations',
                                     help="Each model's last finished evaluation against the model it was compared "
                                          "with (its base, or the deployed one).")

    @api.depends('model_ids')
    def _compute_evaluation_summary(self):
        for wizard in self:
            lines = []
            for model in wizard.model_ids:
                evaluation = model.evaluation_ids.filtered(lambda e: e.state == 'done').sorted('id', reverse=True)[:1]
                if evaluation:
                    lines.append(_('%s: %s (vs %s, %d examples)') % (
                        model.display_name, evaluation.headline, evaluation.reference_model_id.display_name,
                        evaluation.example_count))
            wizard.evaluation_summary = '\n'.join(lines) or False

    @api.multi
    def action_compare(self):
        self.ensure_one()
        # Check, then act: generating calls the providers (a paid service for some), the same
        # right as a model's own Generate reply.
        self.model_ids.check_access_rights('write')
        self.model_ids.check_access_rule('write')
        if not self.model_ids:
            raise UserError(_('Choose the models to compare.'))
        if not (self.prompt or '').strip():
            raise UserError(_('Write a prompt to send to the models.'))
        answers = []
        for model in self.model_ids:
            try:
                answers.append((model.display_name, model.provider_id._call_adapter(
                    'generate', model.model_ref, self.prompt), None))
            except UserError as e:  # _call_adapter turns the service's errors into these
                answers.append((model.display_name, None, e.name))
        self.result = model_compare.compare_text(answers)
        return {'type': 'ir.actions.act_window', 'name': _('Compare Models'), 'res_model': self._name,
                'res_id': self.id, 'view_mode': 'form', 'views': [(False, 'form')], 'target': 'new'}
