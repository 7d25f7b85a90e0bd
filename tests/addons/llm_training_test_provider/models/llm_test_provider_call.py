# -*- coding: utf-8 -*-
from odoo import fields, models


class LlmTestProviderCall(models.Model):
    """Every call the test provider receives, committed with the job's transaction: the tests
    count these to prove, e.g., that no job is started twice."""
    _name = 'llm.test.provider.call'
    _description = 'Test provider call'

    job_id = fields.Many2one('llm.training.job', ondelete='cascade')
    method = fields.Char()
