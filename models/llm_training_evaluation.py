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

from ..lib.evaluation import judge as evaluation_judge
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
JUDGE_CALLS_OPTION, JUDGE_CALLS_DEFAULT = 'llm_training_eval_max_judge_calls', 40
TIMEOUT_OPTION, TIMEOUT_DEFAULT = 'llm_training_eval_timeout_minutes', 180


def _positive_option(option, default):
    raw = tools.config.get(option, default)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise UserError(_('odoo.conf %s = %r: give a whole number of 1 or more.') % (option, raw))
    return value


def eval_limits():
    """The limits from odoo.conf, with their defaults; a value that is not a positive integer is
    refused with the option's name."""
    return dict((key, _positive_option(option, default)) for key, option, default in LIMITS)


def judge_call_limit():
    """odoo.conf llm_training_eval_max_judge_calls: the judge's calls per evaluation (two an example)."""
    return _positive_option(JUDGE_CALLS_OPTION, JUDGE_CALLS_DEFAULT)


def timeout_minutes():
    """odoo.conf llm_training_eval_timeout_minutes: how long an evaluation may run before the cron
    fails it as stuck."""
    return _positive_option(TIMEOUT_OPTION, TIMEOUT_DEFAULT)


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
    chart_html = fields.Html(compute='_compute_chart_html', string='Chart', sanitize=False,
                             help='Each metric of both models as a pair of bars.')
    # the pairwise judge (optional): a chat model of any provider, both orders of the answers
    judge_model_id = fields.Many2one('llm.model', string='Judge', readonly=True, ondelete='set null',
                                     help="The chat model that compared the two models' answers (none: no judge).")
    judge_calls = fields.Integer(readonly=True, help='Calls made to the judge (odoo.conf '
                                                     'llm_training_eval_max_judge_calls bounds them).')
    judge_wins = fields.Integer(readonly=True, string='Judge: wins', help='Examples the evaluated model won.')
    judge_losses = fields.Integer(readonly=True, string='Judge: losses', help='Examples the compared model won.')
    judge_ties = fields.Integer(readonly=True, string='Judge: ties')
    judge_invalid = fields.Integer(readonly=True, string='Judge: no verdict',
                                   help='Examples where a reply of the judge held no readable verdict.')
    judge_win_rate = fields.Float(readonly=True, digits=(16, 4),
                                  help='Wins of the evaluated model over the examples with a verdict.')
    judge_tie_rate = fields.Float(readonly=True, digits=(16, 4))
    judge_error = fields.Text(readonly=True, help='Why the judge stopped early (its figures cover what it judged).')
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

    @api.depends('summary', 'main_metric', 'model_id', 'reference_model_id', 'judge_wins', 'judge_losses',
                 'judge_ties')
    def _compute_chart_html(self):
        for evaluation in self:
            evaluation.chart_html = evaluation._chart_html()

    def _chart_html(self):
        """Base (or compared) model vs evaluated model per metric, as pairs of horizontal bars in
        plain HTML: the form shows it without a chart library."""
        summary = json.loads(self.summary or '{}')
        rows = evaluation_report.chart_rows(summary)
        if self.judge_calls and (self.judge_wins + self.judge_losses + self.judge_ties):
            valid = float(self.judge_wins + self.judge_losses + self.judge_ties)
            rows.append(('judge', _('judge: wins'), self.judge_losses / valid, self.judge_wins / valid,
                         round(100.0 * self.judge_losses / valid, 1), round(100.0 * self.judge_wins / valid, 1)))
        if not rows:
            return False
        bar = ('<div class="o_llm_eval_bar %s" style="background:%s;height:10px;width:%s%%;min-width:1px;'
               'margin:1px 0"></div>')
        lines = []
        def value(key, figure):  # the judge's shares as percentages, the metrics as the report shows them
            return '%d%%' % round(100 * figure) if key == 'judge' else evaluation_report.format_value(key, figure)

        for key, label, ref, cand, ref_width, cand_width in rows:
            lines.append(
                '<tr><td style="white-space:nowrap;padding-right:8px">%s%s</td><td style="width:70%%">%s%s</td>'
                '<td style="white-space:nowrap;padding-left:8px">%s<br/>%s</td></tr>' % (
                    html_escape(label), ' *' if key == self.main_metric else '',
                    bar % ('o_llm_eval_bar_reference', '#9e9e9e', ref_width),
                    bar % ('o_llm_eval_bar_candidate', '#1f77b4', cand_width),
                    value(key, ref), value(key, cand)))
        legend = ('<p><span style="display:inline-block;width:12px;height:10px;background:#9e9e9e"></span> %s '
                  '&#160; <span style="display:inline-block;width:12px;height:10px;background:#1f77b4"></span> %s'
                  '</p>') % (html_escape(self.reference_model_id.display_name or ''),
                             html_escape(self.model_id.display_name or ''))
        return '<div class="o_llm_eval_chart">%s<table style="width:100%%">%s</table></div>' % (
            legend, ''.join(lines))

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
                                     provider_data='{}', judge_calls=0, judge_wins=0, judge_losses=0, judge_ties=0,
                                     judge_invalid=0, judge_win_rate=0.0, judge_tie_rate=0.0, judge_error=False)
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

    def _run_judge(self):
        """The pairwise judge over the first examples (as many as odoo.conf
        llm_training_eval_max_judge_calls allows, two calls an example), through the judge
        model's provider chat (the path of the model form's Generate). A reply without a readable
        verdict makes its example invalid; a failing call stops the judge with the error kept, the
        figures covering what was judged. Never fails the evaluation."""
        self.ensure_one()
        judge = self.judge_model_id
        if not judge or self.data_format not in (False, 'chat'):
            return
        lines = self.example_ids.sorted('sequence')
        lines = lines[:evaluation_judge.examples_to_judge(len(lines), judge_call_limit())]
        outcomes, calls, error = [], 0, False
        for line in lines:
            verdicts, replies = [], []
            try:
                for answer_a, answer_b in ((line.reference_answer, line.candidate_answer),
                                           (line.candidate_answer, line.reference_answer)):
                    calls += 1
                    reply = judge.chat(evaluation_judge.judge_messages(line.prompt, line.expected, answer_a, answer_b),
                                       {'max_tokens': 8, 'temperature': 0.0})
                    replies.append((reply.get('text') or '').strip())
                    verdicts.append(evaluation_judge.parse_verdict(reply.get('text')))
            except UserError as e:
                error = _('Judge %s stopped after %d calls: %s') % (judge.display_name, calls, e.name)
                _logger.warning('Evaluation %s: %s', self.id, error)
                break
            result = evaluation_judge.outcome(*verdicts)
            outcomes.append(result)
            line.sudo().write({'judge_outcome': result, 'judge_replies': json.dumps(replies)})
        rates = evaluation_judge.win_rate(outcomes)
        self.sudo().write({'judge_calls': calls, 'judge_wins': rates['wins'], 'judge_losses': rates['losses'],
                           'judge_ties': rates['ties'], 'judge_invalid': rates['invalid'],
                           'judge_win_rate': rates['win_rate'] or 0.0, 'judge_tie_rate': rates['tie_rate'] or 0.0,
                           'judge_error': error})
        if rates['win_rate'] is not None:
            self.sudo().write({'headline': _('%s; judge %s: wins %d%%, ties %d%% of %d') % (
                self.headline or '', judge.display_name, round(100 * rates['win_rate']),
                round(100 * rates['tie_rate']), rates['wins'] + rates['losses'] + rates['ties'])})
