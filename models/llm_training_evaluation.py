# -*- coding: utf-8 -*-
"""An evaluation: a candidate model (the fine-tuned one) and a reference model (its base, or the
model deployed for the same purpose) answer the same examples; the summary and the per-example
lines are data that the report, the chatter headline and the deploy guard all read.

Its own step after a job completes, never a job state: the job stays Completed whatever happens
here. The engine (models/llm_training_engine.py) is the only mover, from its cron."""
import json
import logging
import os

from odoo import _, api, fields, models, tools
from odoo.exceptions import UserError
from odoo.tools import html_escape

from ..lib.evaluation import report as evaluation_report
from ..lib.providers.base import EvaluationSpec

_logger = logging.getLogger(__name__)

STATES = [('pending', 'Pending'), ('running', 'Running'), ('done', 'Done'), ('failed', 'Failed')]
TRANSITIONS = {'pending': ('running', 'failed'), 'running': ('done', 'failed'), 'done': (),
               'failed': ('pending',)}  # failed -> pending: Retry
EVAL_SETS = [('holdout', 'Held-out examples (not trained on)'), ('validation', 'Validation examples'),
             ('in_sample', 'Training examples (in-sample)')]
KINDS = [('job', 'Fine-tuned vs base'), ('deploy_check', 'Candidate vs deployed')]
# odoo.conf [options]: the bounds of one evaluation
LIMITS = (('max_examples', 'llm_training_eval_max_examples', 50),
          ('max_new_tokens', 'llm_training_eval_max_new_tokens', 64),
          ('batch_size', 'llm_training_eval_batch_size', 8))
METRIC_SELECTION = [(key, label) for key, label, _percent in evaluation_report.METRICS]


def eval_limits():
    """The limits from odoo.conf, with their defaults; a value that is not a positive integer is
    refused with the option's name."""
    limits = {}
    for key, option, default in LIMITS:
        raw = tools.config.get(option, default)
        try:
            value = int(raw)
        except (TypeError, ValueError):
            value = 0
        if value < 1:
            raise UserError(_('odoo.conf %s = %r: give a whole number of 1 or more.') % (option, raw))
        limits[key] = value
    return limits


class LlmTrainingEvaluation(models.Model):
    _name = 'llm.training.evaluation'
    _description = 'LLM Model Evaluation'
    _order = 'id desc'

    name = fields.Char(compute='_compute_name')
    kind = fields.Selection(KINDS, default='job', required=True, readonly=True)
    job_id = fields.Many2one('llm.training.job', required=True, ondelete='cascade', index=True, readonly=True,
                             help='The job whose evaluation examples are used.')
    company_id = fields.Many2one(related='job_id.company_id', store=True, readonly=True)
    provider_id = fields.Many2one(related='job_id.provider_id', readonly=True)
    model_id = fields.Many2one('llm.model', string='Evaluated Model', required=True, ondelete='cascade',
                               readonly=True, index=True)
    reference_model_id = fields.Many2one('llm.model', string='Compared With', required=True, ondelete='cascade',
                                         readonly=True, help='The base model, or the model deployed for the purpose.')
    # who may read it: as the evaluated model (its examples are the job's data)
    visibility = fields.Selection(related='model_id.visibility', store=True, readonly=True)
    user_id = fields.Many2one(related='model_id.user_id', store=True, readonly=True)
    state = fields.Selection(STATES, default='pending', required=True, readonly=True, index=True)
    progress = fields.Float(readonly=True)
    attempt = fields.Integer(default=1, readonly=True)
    eval_set = fields.Selection(EVAL_SETS, string='Evaluated On', readonly=True)
    examples_file = fields.Char(readonly=True)
    data_format = fields.Selection([('chat', 'Chat'), ('preference', 'Preference pairs'), ('text', 'Plain text')],
                                   readonly=True, default='chat')
    example_count = fields.Integer(readonly=True, string='Examples')
    main_metric = fields.Selection(METRIC_SELECTION, readonly=True,
                                   help='The metric the deploy guard compares (odoo.conf llm_training_eval_main_'
                                        'metric: auto, rouge_l or exact_match; auto takes exact match for short '
                                        'answers).')
    summary = fields.Text(readonly=True, help='Every metric of both models, as JSON.')
    headline = fields.Char(readonly=True)
    reference_score = fields.Float(readonly=True, digits=(16, 4), help='The compared model on the main metric.')
    candidate_score = fields.Float(readonly=True, digits=(16, 4), help='The evaluated model on the main metric.')
    metrics_html = fields.Html(compute='_compute_metrics_html', string='Metrics', sanitize=False)
    error_message = fields.Text(readonly=True)
    log = fields.Text(readonly=True)
    started_at = fields.Datetime(readonly=True)
    finished_at = fields.Datetime(readonly=True)
    provider_data = fields.Text(readonly=True, default='{}')
    example_ids = fields.One2many('llm.training.evaluation.example', 'evaluation_id', string='Examples',
                                  readonly=True)

    @api.depends('model_id', 'reference_model_id')
    def _compute_name(self):
        for evaluation in self:
            evaluation.name = _('%s vs %s') % (evaluation.model_id.display_name,
                                               evaluation.reference_model_id.display_name)

    @api.depends('summary')
    def _compute_metrics_html(self):
        labels = dict((key, label) for key, label, _percent in evaluation_report.METRICS)
        for evaluation in self:
            summary = json.loads(evaluation.summary or '{}')
            reference, candidate = summary.get('reference') or {}, summary.get('candidate') or {}
            rows = []
            for key, _label, _percent in evaluation_report.METRICS:
                if reference.get(key) is None and candidate.get(key) is None:
                    continue
                difference = (candidate[key] - reference[key]) if None not in (reference.get(key),
                                                                                candidate.get(key)) else None
                rows.append('<tr><td>%s%s</td><td>%s</td><td>%s</td><td>%s</td></tr>' % (
                    html_escape(labels[key]), ' *' if key == evaluation.main_metric else '',
                    evaluation_report.format_value(key, reference.get(key)),
                    evaluation_report.format_value(key, candidate.get(key)),
                    '-' if difference is None else '%+.3f' % difference))
            evaluation.metrics_html = rows and (
                '<table class="table table-condensed"><thead><tr><th>%s</th><th>%s</th><th>%s</th><th>%s</th></tr>'
                '</thead><tbody>%s</tbody></table>' % (
                    _('Metric (* main)'), html_escape(evaluation.reference_model_id.display_name or ''),
                    html_escape(evaluation.model_id.display_name or ''), _('Difference'), ''.join(rows))) or False

    # -- actions ---------------------------------------------------------------------------------
    @api.multi
    def action_retry(self):
        """A failed evaluation runs again from the start (the engine's next pass)."""
        self.check_access_rights('write')
        self.check_access_rule('write')
        for evaluation in self:
            if evaluation.state != 'failed':
                raise UserError(_('Only a failed evaluation can be retried (this one is %s).') % evaluation.state)
            evaluation._change_state('pending', attempt=evaluation.attempt + 1, progress=0.0, error_message=False,
                                     provider_data='{}')
            evaluation.example_ids.unlink()
        return True

    # -- workflow (the engine calls these) -------------------------------------------------------
    def _change_state(self, new_state, **values):
        self.ensure_one()
        if new_state not in TRANSITIONS[self.state]:
            raise UserError(_('Evaluation %s cannot go from %s to %s.') % (self.id, self.state, new_state))
        values['state'] = new_state
        if new_state == 'running':
            values['started_at'] = fields.Datetime.now()
        if new_state in ('done', 'failed'):
            values['finished_at'] = fields.Datetime.now()
        self.sudo().write(values)

    def _folder(self):
        return os.path.join(self.job_id.work_dir, 'evaluation-%d' % self.id)

    def _spec(self):
        self.ensure_one()
        return EvaluationSpec(
            key='llm-evaluation-%s-%d-%d' % (self.env.cr.dbname, self.id, self.attempt), folder=self._folder(),
            reference=self.reference_model_id.model_ref, candidate=self.model_id.model_ref,
            examples=self.examples_file, data_format=self.data_format or 'chat',
            limits=dict(eval_limits(), max_length=self.job_id.max_seq_length or 1024),
            provider_data=json.loads(self.provider_data or '{}'))

    def _apply_results(self, summary, examples):
        """Write a finished run: the summary, the main metric, one line per example."""
        self.ensure_one()
        references = [row.get('expected') or '' for row in examples]
        words = evaluation_report.mean([len(r.split()) for r in references]) if references else None
        setting = tools.config.get('llm_training_eval_main_metric', 'auto')
        metric = evaluation_report.main_metric(setting, self.data_format, words)
        Line = self.env['llm.training.evaluation.example'].sudo()
        for sequence, row in enumerate(examples, 1):
            Line.create(Line._values_from_row(self, sequence, row, metric))
        reference, candidate = summary.get('reference') or {}, summary.get('candidate') or {}
        self._change_state('done', progress=100.0, summary=json.dumps(summary), main_metric=metric,
                           example_count=summary.get('n') or len(examples),
                           headline=evaluation_report.headline(summary, metric),
                           reference_score=reference.get(metric) or 0.0, candidate_score=candidate.get(metric) or 0.0)

    def _guard_rows(self):
        """(compared model's score, evaluated model's score) per example on the main metric."""
        self.ensure_one()
        return [(line.reference_score, line.candidate_score) for line in self.example_ids.sorted('sequence')]
