# -*- coding: utf-8 -*-
from odoo import _, api, fields, models
from odoo.exceptions import UserError


class LlmModel(models.Model):
    """The model registry: base models a provider offers and the models fine-tuning produced."""
    _name = 'llm.model'
    _description = 'LLM Model'
    _order = 'provider_id, name'

    name = fields.Char(required=True)
    active = fields.Boolean(default=True)
    provider_id = fields.Many2one('llm.provider', required=True, ondelete='restrict', index=True)
    company_id = fields.Many2one(related='provider_id.company_id', store=True, readonly=True)
    kind = fields.Selection([('base', 'Base model'), ('fine_tuned', 'Fine-tuned')], required=True,
                            default='base')
    model_ref = fields.Char(string='Technical ID', required=True,
                            help="The provider's id of the model (e.g. gpt-4o-mini-2024-07-18, "
                                 "ft:...) or, for local models, the folder holding its weights.")
    base_model_id = fields.Many2one('llm.model', string='Base Model', ondelete='set null',
                                    help='For fine-tuned models: the model they were trained from.')
    job_id = fields.Many2one('llm.training.job', string='Produced by', ondelete='set null', readonly=True)
    context_length = fields.Integer(default=8192, help='Longest example, in tokens, the model accepts.')
    training_price = fields.Float(digits=(16, 6), help='Training cost per 1M tokens, in USD.')
    description = fields.Text()
    test_prompt = fields.Text(help='A message to send to the model from the Test button.')
    test_reply = fields.Text(readonly=True)
    test_base_reply = fields.Text(readonly=True, help='What the base model answers, to compare.')

    _sql_constraints = [
        ('provider_ref_unique', 'unique(provider_id, model_ref)',
         'A model with this technical id already exists for this provider.'),
    ]

    @api.multi
    def action_test_model(self):
        """Answer `test_prompt` with this model and, for a fine-tuned one, with its base model."""
        self.ensure_one()
        self.check_access_rights('write')  # the answers are written on the model: check before generating
        self.check_access_rule('write')
        if not (self.test_prompt or '').strip():
            raise UserError(_('Write a prompt to test the model with.'))
        values = {'test_reply': self.provider_id._call_adapter('generate', self.model_ref, self.test_prompt)}
        if self.kind == 'fine_tuned' and self.base_model_id:
            values['test_base_reply'] = self.base_model_id.provider_id._call_adapter(
                'generate', self.base_model_id.model_ref, self.test_prompt)
        self.write(values)
        return True
