# -*- coding: utf-8 -*-
from odoo import fields, models


class LlmTrainingJobEvent(models.Model):
    """What happened to a job, from us or from the provider (provider events keep their id)."""
    _name = 'llm.training.job.event'
    _description = 'LLM Training Job Event'
    _order = 'event_time desc, id desc'

    job_id = fields.Many2one('llm.training.job', required=True, ondelete='cascade', index=True)
    # the job's company, set on create (not a related field: its recompute on every insert cost
    # more than the insert on each poll); record rules read it
    company_id = fields.Many2one('res.company', readonly=True, index=True)
    event_time = fields.Datetime(required=True, default=fields.Datetime.now)
    level = fields.Selection([('info', 'Info'), ('warning', 'Warning'), ('error', 'Error')], default='info',
                             required=True)
    message = fields.Text(required=True)
    external_id = fields.Char(help="The provider's event id; the same event is never stored twice.")
    data = fields.Text(help='Extra data the provider sent (JSON).')

    _sql_constraints = [
        ('job_external_id_unique', 'unique(job_id, external_id)', 'This event is already recorded.'),
    ]
