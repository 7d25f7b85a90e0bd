# -*- coding: utf-8 -*-
from odoo import api, fields, models

METRIC_FIELDS = ('epoch', 'train_loss', 'valid_loss', 'valid_token_accuracy', 'learning_rate',
                 'tokens_per_second')
MEASURED_FLAGS = ('train_loss', 'valid_loss', 'valid_token_accuracy')  # each with a has_<name> field


class LlmTrainingJobMetric(models.Model):
    """One training step's figures: the loss curve of the Results tab."""
    _name = 'llm.training.job.metric'
    _description = 'LLM Training Job Metric'
    _order = 'job_id, step'

    job_id = fields.Many2one('llm.training.job', required=True, ondelete='cascade', index=True)
    # the job's company, set on create (not a related field: its recompute on every insert cost
    # more than the insert on each poll); record rules read it
    company_id = fields.Many2one('res.company', readonly=True, index=True)
    step = fields.Integer(required=True)
    epoch = fields.Float(digits=(16, 3))
    train_loss = fields.Float(digits=(16, 5))
    valid_loss = fields.Float(digits=(16, 5))
    valid_token_accuracy = fields.Float(digits=(16, 5))
    learning_rate = fields.Float(digits=(16, 10))
    tokens_per_second = fields.Float(digits=(16, 1))
    # Odoo 11 reads an unmeasured (NULL) float as 0.0: these say whether a value was measured at
    # all, so views show blank instead of a loss of 0.00 (a train log and an eval log fill
    # different ones of the same step).
    has_train_loss = fields.Boolean(readonly=True)
    has_valid_loss = fields.Boolean(readonly=True)
    has_valid_token_accuracy = fields.Boolean(readonly=True)

    _sql_constraints = [
        ('job_step_unique', 'unique(job_id, step)', 'One metrics record per job and step.'),
    ]

    @api.model
    def _record(self, job, metrics):
        """Upsert metrics by step: a train log and an eval log of the same step share a record."""
        if not metrics:
            return
        existing = {m.step: m for m in self.search([('job_id', '=', job.id),
                                                    ('step', 'in', [m['step'] for m in metrics])])}
        for metric in metrics:
            values = {k: metric[k] for k in METRIC_FIELDS if metric.get(k) is not None}
            values.update({'has_' + k: True for k in MEASURED_FLAGS if k in values})
            record = existing.get(metric['step'])
            if record:
                changed = {k: v for k, v in values.items() if record[k] != v}
                if changed:  # a provider may send the same step again
                    record.write(changed)
            else:
                existing[metric['step']] = self.create(dict(values, job_id=job.id, step=metric['step'],
                                                            company_id=job.company_id.id))
