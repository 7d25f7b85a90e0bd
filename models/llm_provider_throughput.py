# -*- coding: utf-8 -*-
from odoo import api, fields, models


class LlmProviderThroughput(models.Model):
    """The training speed a provider's own machine reached, per base model and technique, as its
    trainer measured it on the last completed job. Time estimates come from it, never from a
    constant: machines differ (a CPU without bf16 units trains several times slower)."""
    _name = 'llm.provider.throughput'
    _description = 'LLM Provider Measured Throughput'
    _order = 'measured_at desc'

    provider_id = fields.Many2one('llm.provider', required=True, ondelete='cascade', index=True, readonly=True)
    company_id = fields.Many2one(related='provider_id.company_id', store=True, readonly=True)
    base_model_id = fields.Many2one('llm.model', required=True, ondelete='cascade', readonly=True)
    technique = fields.Char(required=True, readonly=True)
    tokens_per_second = fields.Float(readonly=True, digits=(16, 1), help='Training tokens per second.')
    precision = fields.Char(readonly=True, help='The precision the trainer chose on that machine.')
    measured_at = fields.Datetime(readonly=True)
    job_id = fields.Many2one('llm.training.job', string='Measured on', ondelete='set null', readonly=True)

    _sql_constraints = [
        ('provider_model_technique_unique', 'unique(provider_id, base_model_id, technique)',
         'One measured throughput per provider, base model and technique.'),
    ]

    @api.model
    def _record(self, job, tokens_per_second, precision=None):
        """Keep the latest measurement of `job`'s provider, base model and technique."""
        if not tokens_per_second or tokens_per_second <= 0:
            return self.browse()
        values = {'provider_id': job.provider_id.id, 'base_model_id': job.base_model_id.id,
                  'technique': job.technique, 'tokens_per_second': tokens_per_second,
                  'precision': precision or False, 'measured_at': fields.Datetime.now(), 'job_id': job.id}
        record = self.search([('provider_id', '=', job.provider_id.id), ('base_model_id', '=', job.base_model_id.id),
                              ('technique', '=', job.technique)], limit=1)
        if record:
            record.write(values)
            return record
        return self.create(values)

    @api.model
    def _lookup(self, provider, base_model, technique):
        return self.search([('provider_id', '=', provider.id), ('base_model_id', '=', base_model.id),
                            ('technique', '=', technique)], limit=1)
