# -*- coding: utf-8 -*-
import json
import logging
import os

from odoo import SUPERUSER_ID, _, api, fields, models, tools
from odoo.tools import html_escape
from odoo.exceptions import AccessError, UserError, ValidationError

from ..lib import providers
from ..lib.jobs import job_estimate, job_status, job_summary, pricing, trainer_folder
from ..lib.exceptions import TrainingFailedError
from ..lib.providers.base import JobSpec
from ..lib.jobs.hyperparameters import DEFAULTS, FORM_FIELDS, parse_hyperparameters, split_form_fields
from ..lib.datasets.prepare import merge_examples
from ..lib.evaluation import answers as evaluation_answers
from ..lib.evaluation import holdout as evaluation_holdout
from ..lib.host.private_dirs import make_private_dirs
from ..user_errors import BudgetExceeded, JobRefused

_logger = logging.getLogger(__name__)



def _now():
    return fields.Datetime.now()


class LlmTrainingJob(models.Model):
    _name = 'llm.training.job'
    _description = 'LLM Training Job'
    _inherit = ['mail.thread', 'mail.activity.mixin', 'llm.access.mixin']
    _order = 'id desc'
    _link_fields = ('company_id', 'provider_id', 'base_model_id', 'dataset_ids', 'validation_dataset_ids')
    _company_fields = ('provider_id', 'base_model_id', 'dataset_ids', 'validation_dataset_ids')

    def _default_provider(self):
        return self.env['llm.provider'].search([], limit=1)

    # -- identity and setup (editable in draft) ----------------------------------------------
    name = fields.Char(required=True, track_visibility='onchange')
    description = fields.Text()
    company_id = fields.Many2one('res.company', default=lambda self: self.env.user.company_id)
    user_id = fields.Many2one('res.users', string='Owner', default=lambda self: self.env.user)
    provider_id = fields.Many2one('llm.provider', required=True, default=_default_provider,
                                  ondelete='restrict', track_visibility='onchange')
    service = fields.Selection(related='provider_id.service', readonly=True)
    provider_can_resume = fields.Boolean(related='provider_id.can_resume', readonly=True)
    provider_registers_checkpoints = fields.Boolean(related='provider_id.registers_checkpoints', readonly=True)
    provider_evaluates = fields.Boolean(related='provider_id.evaluates', readonly=True)
    base_model_id = fields.Many2one('llm.model', string='Base Model', required=True, ondelete='restrict',
                                    domain="[('provider_id', '=', provider_id)]")
    dataset_ids = fields.Many2many('llm.training.dataset', 'llm_training_job_dataset_rel', 'job_id',
                                   'dataset_id', string='Training Datasets', required=True)
    validation_dataset_ids = fields.Many2many('llm.training.dataset', 'llm_training_job_valdataset_rel',
                                              'job_id', 'dataset_id', string='Validation Datasets')
    validation_split = fields.Float(default=0.0, help='Fraction of the training examples held out '
                                                      'for evaluation (0 to 0.5).')
    technique = fields.Selection([('lora', 'LoRA'), ('qlora', 'QLoRA (4-bit, CUDA GPU)'),
                                  ('full', 'Full fine-tuning')], default='lora', required=True)
    epochs = fields.Integer(default=DEFAULTS['epochs'], help='0 lets the provider choose (OpenAI "auto").')
    batch_size = fields.Integer(default=DEFAULTS['batch_size'], help='0 lets the provider choose (OpenAI "auto").')
    learning_rate = fields.Float(default=DEFAULTS['learning_rate'], digits=(16, 8), help='Local trainer learning rate.')
    learning_rate_multiplier = fields.Float(default=0.0, help='0 means "auto". OpenAI: its multiplier; local trainer: '
                                                                 'multiplies its default learning rate (2e-4) '
                                                                 'instead of using the learning rate above.')
    lora_r = fields.Integer(string='LoRA rank', default=DEFAULTS['lora_r'])
    lora_alpha = fields.Integer(string='LoRA alpha', default=DEFAULTS['lora_alpha'])
    lora_dropout = fields.Float(string='LoRA dropout', default=DEFAULTS['lora_dropout'])
    max_seq_length = fields.Integer(string='Max sequence length', default=DEFAULTS['max_seq_length'])
    seed = fields.Integer(default=DEFAULTS['seed'])
    suffix = fields.Char(size=64, help='Added to the fine-tuned model name (at most 64 characters).')
    evaluate_after_training = fields.Boolean(
        default=True, string='Evaluate', help='When training ends, the fine-tuned model and its base answer the '
                                              'evaluation examples and are scored side by side (Evaluation tab).')
    evaluation_holdout = fields.Float(
        default=evaluation_holdout.DEFAULT_FRACTION, string='Evaluation hold-out',
        help='Without validation data: the fraction of the training examples kept out of training to evaluate '
             'on (at most 200, at least 5; only when at least 10 are left to train on, else the evaluation runs '
             'on training examples and says so).')
    evaluation_plan = fields.Char(compute='_compute_evaluation_plan', string='Evaluation Set',
                                  help='What the model will be evaluated on, from the datasets\' last validation.')
    evaluation_ids = fields.One2many('llm.training.evaluation', 'job_id', string='Evaluations', readonly=True)
    evaluation_judge_id = fields.Many2one(
        'llm.model', string='Judge', ondelete='set null',
        help='Optional: a chat model (any provider) that also compares the two models\' answers, both ways round, '
             'for a win rate. Each call is a request to its provider (odoo.conf llm_training_eval_max_judge_calls '
             'bounds them). Empty: no judge.')
    evaluation_chart = fields.Html(compute='_compute_evaluation_chart', sanitize=False, string='Evaluation Chart',
                                   help='The last finished evaluation, base vs fine-tuned per metric.')
    api_metadata = fields.Text(copy=False, help='The metadata a client gave through the OpenAI-compatible API '
                                                '(JSON object of strings), returned and filtered on there.')
    hyperparameters = fields.Text(default='{}', help='Other settings as a JSON object, e.g. '
                                                     '{"warmup_ratio": 0.1, "eval_steps": 20}.')

    # -- workflow (written only by the workflow methods) --------------------------------------
    state = fields.Selection(job_status.STATES, default='draft', required=True, readonly=True, index=True,
                             copy=False, track_visibility='onchange')
    external_job_id = fields.Char(readonly=True, copy=False, index=True)
    attempt = fields.Integer(readonly=True, copy=False, default=1,
                             help='Bumped by Resume and Reset: a new attempt is a new run at the provider.')
    job_key = fields.Char(compute='_compute_job_key', help='Stable key of this attempt, given to the provider '
                                                           'so that a repeated start finds the run it began.')
    start_pending = fields.Boolean(readonly=True, copy=False,
                                   help='A start was committed and may have reached the provider; the next pass '
                                        'starts again with the same key, which finds the run instead of making one.')
    last_synced_at = fields.Datetime(readonly=True, copy=False, help='Last visit of the engine: the cron visits the '
                                                                     'least recently synced jobs first.')
    provider_data = fields.Text(readonly=True, copy=False, default='{}',
                                help="The provider's own bookkeeping for this job (JSON).")
    cancel_requested = fields.Boolean(readonly=True, copy=False)
    progress = fields.Float(readonly=True, copy=False)
    current_step = fields.Integer(readonly=True, copy=False)
    total_steps = fields.Integer(readonly=True, copy=False)
    current_epoch = fields.Float(readonly=True, copy=False)
    trained_tokens = fields.Integer(readonly=True, copy=False)
    train_examples = fields.Integer(readonly=True, copy=False)
    validation_examples = fields.Integer(readonly=True, copy=False)
    train_tokens = fields.Integer(readonly=True, copy=False, help='Tokens in the training file, once.')
    estimated_epochs = fields.Integer(compute='_compute_estimate',
                                      help='Epochs the job will run; for "auto", those OpenAI chooses.')
    estimated_cost = fields.Float(compute='_compute_estimate', digits=(16, 4),
                                  help="Training tokens x epochs x the base model's training price (USD), "
                                       "from the datasets' last validation.")
    estimated_duration = fields.Float(
        compute='_compute_estimate', string='Estimated Training Time',
        help="Training tokens x epochs / the tokens per second this provider's machine reached on its last "
             "job with the same base model and technique (blank until one has completed).")
    estimated_duration_text = fields.Char(
        compute='_compute_estimate', string='Estimated Training Time',
        help="The estimated training time in words: seconds are shown as \"under a minute\".")
    final_cost = fields.Float(readonly=True, copy=False, digits=(16, 4),
                              help="Billed tokens (trained_tokens) x the base model's training price (USD).")
    submitted_at = fields.Datetime(readonly=True, copy=False)
    started_at = fields.Datetime(readonly=True, copy=False)
    finished_at = fields.Datetime(readonly=True, copy=False)
    estimated_finish = fields.Datetime(readonly=True, copy=False)
    last_progress_at = fields.Datetime(readonly=True, copy=False,
                                       help='Last time the job moved; the stuck-job sweep reads it.')
    retry_count = fields.Integer(readonly=True, copy=False)
    resubmit_count = fields.Integer(readonly=True, copy=False,
                                    help='Times the provider lost the run (e.g. a restarted Ray head) and the job '
                                         'was resubmitted from its last checkpoint.')
    next_attempt_at = fields.Datetime(readonly=True, copy=False)
    error_message = fields.Text(readonly=True, copy=False)
    result_model_id = fields.Many2one('llm.model', string='Result Model', readonly=True, copy=False)
    schedule_id = fields.Many2one('llm.training.schedule', string='Schedule', readonly=True, copy=False,
                                  index=True, ondelete='set null', help='The scheduled retraining that created this job.')
    # Not prefetched: reading a job's state on every engine visit must not also load its
    # thousands of events and metrics, nor the log's text.
    event_ids = fields.One2many('llm.training.job.event', 'job_id', string='Events', readonly=True, prefetch=False)
    metric_ids = fields.One2many('llm.training.job.metric', 'job_id', string='Metrics', readonly=True, prefetch=False)
    log = fields.Text(readonly=True, copy=False, prefetch=False, help='Tail of the trainer or provider log.')
    log_text = fields.Text(compute='_compute_log_text', string='Log',
                           help='The events, oldest first, then the trainer log without library warnings.')
    # The last measured losses; Odoo 11 reads an unmeasured (NULL) float as 0.0, so the has_*
    # flags say whether there is a value at all (the form hides the figure otherwise).
    final_train_loss = fields.Float(compute='_compute_final_metrics', digits=(16, 5))
    final_valid_loss = fields.Float(compute='_compute_final_metrics', digits=(16, 5))
    has_final_train_loss = fields.Boolean(compute='_compute_final_metrics')
    has_final_valid_loss = fields.Boolean(compute='_compute_final_metrics')
    loss_curve = fields.Text(compute='_compute_loss_curve',
                             help='Training and validation loss per measured step, as JSON for the chart.')
    work_dir = fields.Char(compute='_compute_work_dir', help='Folder holding the prepared data.')

    @api.depends('attempt')
    def _compute_job_key(self):
        for job in self:
            job.job_key = 'llm-training-%s-%d-%d' % (self.env.cr.dbname, job.id, job.attempt) if job.id else False

    @api.depends('metric_ids.train_loss', 'metric_ids.valid_loss')
    def _compute_final_metrics(self):
        for job in self:
            values = job._final_losses()
            job.final_train_loss = values['train_loss'] or 0.0
            job.final_valid_loss = values['valid_loss'] or 0.0
            job.has_final_train_loss = values['train_loss'] is not None
            job.has_final_valid_loss = values['valid_loss'] is not None

    @api.depends('metric_ids.train_loss', 'metric_ids.valid_loss')
    def _compute_loss_curve(self):
        Metric = self.env['llm.training.job.metric']
        for job in self:
            rows = Metric.search_read([('job_id', '=', job.id), '|', ('has_train_loss', '=', True),
                                       ('has_valid_loss', '=', True)] if job.id else [('id', '=', 0)],
                                      ['step', 'train_loss', 'valid_loss', 'has_train_loss', 'has_valid_loss'])
            job.loss_curve = json.dumps(job_summary.loss_curve(
                [(row['step'], {name: row[name] if row['has_' + name] else None for name in ('train_loss', 'valid_loss')})
                 for row in rows]))

    @api.depends('event_ids', 'log')
    def _compute_log_text(self):
        for job in self:
            events = [(event.event_time, event.level, event.message) for event in job.event_ids.sorted('id')]
            job.log_text = job_summary.readable_log(events, job.log)

    @api.depends('provider_id.storage_path')
    def _compute_work_dir(self):
        default_root = os.path.join(tools.config['data_dir'], 'llm_training')
        for job in self:
            root = job.provider_id.storage_path or default_root
            job.work_dir = os.path.join(root, self.env.cr.dbname, 'job-%d' % job.id) if job.id else False

    @api.depends('dataset_ids.token_total', 'dataset_ids.example_count', 'epochs', 'validation_split',
                 'base_model_id.training_price', 'provider_id.service', 'technique',
                 'provider_id.throughput_ids.tokens_per_second')
    def _compute_estimate(self):
        for job in self:
            train_examples, tokens = job_estimate.training_share(
                sum(job.dataset_ids.mapped('example_count')), sum(job.dataset_ids.mapped('token_total')),
                job.validation_split)
            # 0 epochs ("auto"): the provider's own rule (OpenAI's), else the local trainer's default
            adapter = providers.adapter_class(job.service)
            job.estimated_epochs = job.epochs or (adapter.default_epochs(train_examples) if adapter
                                                  else DEFAULTS['epochs'])
            job.estimated_cost = pricing.cost(tokens * job.estimated_epochs, job.base_model_id.training_price)
            speed = job.provider_id and job.base_model_id and self.env['llm.provider.throughput']._lookup(
                job.provider_id, job.base_model_id, job.technique)
            # hours (kept for sorting and the API); the form shows the text
            job.estimated_duration = tokens * job.estimated_epochs / speed.tokens_per_second / 3600.0 \
                if speed and speed.tokens_per_second else 0.0
            job.estimated_duration_text = job_summary.estimated_duration_text(job.estimated_duration * 3600.0) \
                if job.estimated_duration else False

    @api.depends('dataset_ids.example_count', 'validation_dataset_ids', 'validation_split', 'evaluation_holdout',
                 'evaluate_after_training', 'provider_id.service', 'provider_id.evaluate_with_chat')
    def _compute_evaluation_plan(self):
        for job in self:
            if not job.evaluate_after_training:
                job.evaluation_plan = _('No evaluation')
            elif job.provider_id and not job.provider_id.evaluates:
                job.evaluation_plan = _('None: provider "%s" cannot evaluate models yet') % job.provider_id.name
            elif job.validation_dataset_ids or job.validation_split:
                job.evaluation_plan = _('The validation examples')
            else:
                total = sum(job.dataset_ids.mapped('example_count'))
                held = evaluation_holdout.holdout_size(total, job.evaluation_holdout)
                job.evaluation_plan = _('%d held-out examples (not trained on)') % held if held else _(
                    'Training examples (in-sample: too few examples to hold some out)')

    def _evaluation_chat_cost(self):
        """(examples, USD at most) of an evaluation through a service's chat API (billed per token):
        the examples it will be asked (validation, hold-out or in-sample, at most
        llm_training_eval_max_examples), their mean size in tokens as prompt, the longest answer
        (llm_training_eval_max_new_tokens) for both models, at the base model's chat prices and its
        fine-tuned models'. None when the provider evaluates for free or not at all."""
        self.ensure_one()
        if not (self.evaluate_after_training and self.provider_id.evaluates and self.provider_id.evaluation_optional):
            return None
        from .llm_training_evaluation import eval_limits
        limits = eval_limits()
        datasets = self.dataset_ids
        total = sum(datasets.mapped('example_count'))
        if self.validation_dataset_ids:
            count = sum(self.validation_dataset_ids.mapped('example_count'))
        elif self.validation_split:
            count = int(total * self.validation_split)
        else:
            count = evaluation_holdout.holdout_size(total, self.evaluation_holdout) or total
        examples = min(count, limits['max_examples'])
        prompt_tokens = sum(datasets.mapped('token_total')) / total if total else 0.0
        base = self.base_model_id
        return examples, evaluation_answers.cost(
            examples, prompt_tokens, limits['max_new_tokens'], (base.chat_input_price, base.chat_output_price),
            (base.fine_tuned_chat_input_price, base.fine_tuned_chat_output_price))

    @api.depends('evaluation_ids.state', 'evaluation_ids.summary')
    def _compute_evaluation_chart(self):
        for job in self:
            done = job.evaluation_ids.filtered(lambda e: e.state == 'done' and e.kind == 'job')
            job.evaluation_chart = done.sorted('id', reverse=True)[:1].chart_html or False

    @api.constrains('evaluation_holdout')
    def _check_evaluation_holdout(self):
        for job in self:
            if not 0.0 <= job.evaluation_holdout <= 0.5:
                raise ValidationError(_('Job "%s": the evaluation hold-out is a fraction from 0 to 0.5.') % job.name)

    @api.constrains('hyperparameters', 'validation_split', 'epochs', 'batch_size', 'lora_r',
                    'max_seq_length', 'learning_rate', 'lora_dropout')
    def _check_hyperparameters(self):
        for job in self:
            try:
                job._get_hyperparameters()
            except ValueError as e:
                raise ValidationError(_('Job "%s": %s') % (job.name, e))

    @api.constrains('company_id', 'provider_id', 'base_model_id', 'dataset_ids', 'validation_dataset_ids')
    def _check_company_links(self):
        """A job's provider, base model and datasets are in the job's company (or in none)."""
        self._check_same_company(self._company_fields)

    @api.constrains('base_model_id', 'provider_id')
    def _check_base_model_provider(self):
        for job in self:
            if job.base_model_id.provider_id != job.provider_id:
                raise ValidationError(_('Base model "%s" belongs to provider "%s", not "%s".')
                                      % (job.base_model_id.name, job.base_model_id.provider_id.name,
                                         job.provider_id.name))

    @api.model
    def _split_hyperparameters(self, vals):
        """A setting named in the JSON object is the job's value: settings the form shows move
        into their fields (one value per setting, visible); the JSON keeps the rest, by canonical
        name. OpenAI's and Hugging Face's names are accepted (lib/jobs/hyperparameters.py)."""
        if not vals.get('hyperparameters'):
            return vals
        try:
            form, rest = split_form_fields(vals['hyperparameters'])
        except ValueError as e:
            raise ValidationError(_('Hyperparameters: %s') % e)
        return dict(vals, hyperparameters=rest, **form)

    @api.onchange('hyperparameters')
    def _onchange_hyperparameters(self):
        try:
            values = self._split_hyperparameters({'hyperparameters': self.hyperparameters})
        except ValidationError as e:
            return {'warning': {'title': _('Hyperparameters'), 'message': e.name}}
        for name, value in values.items():
            self[name] = value

    @api.model
    def create(self, vals):
        self._check_links(vals)
        job = super(LlmTrainingJob, self).create(self._split_hyperparameters(vals))
        # The creator follows the job, so its summary at the end reaches them (explicit: mail's own
        # subscription is skipped under tracking_disable, which RPC clients and imports use).
        job.message_subscribe(partner_ids=(self.env.user.partner_id | job.user_id.partner_id).ids)
        return job

    @api.multi
    def write(self, vals):
        vals = self._split_hyperparameters(vals)
        self._check_links(vals)
        locked = set(vals) & {'provider_id', 'base_model_id', 'dataset_ids', 'technique', 'evaluation_holdout',
                              'hyperparameters', 'validation_dataset_ids', 'validation_split'}
        if locked and any(job.state not in ('draft', 'failed', 'cancelled') for job in self):
            raise UserError(_('A submitted job cannot change its setup (%s); cancel it or copy it.')
                            % ', '.join(sorted(locked)))
        return super(LlmTrainingJob, self).write(vals)

    @api.multi
    def unlink(self):
        if any(job.state in job_status.ACTIVE_STATES for job in self):
            raise UserError(_('Cancel a running job before deleting it.'))
        return super(LlmTrainingJob, self).unlink()

    # -- buttons (each returns True: XML-RPC cannot marshal None) ----------------------------
    # Check, then act: each button first checks that the user may change these jobs, so nobody
    # without rights reaches a provider, a process or a file.
    def _check_write_access(self):
        self.check_access_rights('write')
        self.check_access_rule('write')

    @api.multi
    def action_submit(self, budget_override_reason=None):
        """Submit; over the provider's monthly budget it is refused (BudgetExceeded, with the
        figures) unless `budget_override_reason` says why to go over (kept as a job event)."""
        if isinstance(budget_override_reason, dict):
            # a web client button: call_button passes the context as the first argument (odoo.api.split_context)
            budget_override_reason = None
        self._check_write_access()
        return self.env['llm.training.engine']._submit(self, budget_override_reason)

    @api.multi
    def action_submit_from_form(self):
        """The form's Submit: over the budget it asks for a reason first (a confirmation wizard)
        instead of refusing outright."""
        self.ensure_one()
        self._check_write_access()
        try:
            with self.env.cr.savepoint():
                self._check_budget()
        except BudgetExceeded as e:
            wizard = self.env['llm.training.job.budget.wizard'].create({'job_id': self.id, 'figures': e.name})
            return {'type': 'ir.actions.act_window', 'name': _('Over the monthly budget'),
                    'res_model': wizard._name, 'res_id': wizard.id, 'view_mode': 'form',
                    'views': [(False, 'form')], 'target': 'new'}
        return self.action_submit()

    @api.multi
    def action_check_status(self):
        """Move the job on now, as the cron would (same code path, same claim)."""
        self._check_write_access()
        return self.env['llm.training.engine']._sync(self)

    @api.multi
    def action_cancel(self):
        self._check_write_access()
        return self.env['llm.training.engine']._cancel(self)

    @api.multi
    def action_resume(self):
        """Start a failed or cancelled job again from its last checkpoint, as a new attempt."""
        self._check_write_access()
        return self.env['llm.training.engine']._resume(self)

    @api.multi
    def action_reset_to_draft(self):
        self._check_write_access()
        return self.env['llm.training.engine']._reset_to_draft(self)

    # -- state machine (lib/jobs/job_status.py; called by the engine only) ------------------------
    def _change_state(self, new_state, **values):
        """The only way `state` changes: refuses illegal moves, stamps times."""
        self.ensure_one()
        if not job_status.is_legal(self.state, new_state):
            raise UserError(_('Job "%s" cannot go from %s to %s.') % (self.name, self.state, new_state))
        now = _now()
        values.update(state=new_state, last_progress_at=now)
        stamp = job_status.STATE_STAMPS.get(new_state)
        if stamp:
            # the provider's own time when it gave one (a run seen only once it ended still
            # started when it started, not now)
            values[stamp] = values.get(stamp) or now
        if new_state == 'completed':
            values['progress'] = 100.0
        if new_state in job_status.FINAL_STATES and 'final_cost' not in values:
            # a failed or cancelled run is billed for what it trained
            values['final_cost'] = pricing.cost(values.get('trained_tokens', self.trained_tokens),
                                                    self.base_model_id.training_price)
        # super().write: the setup lock in write() is for people, not for the workflow.
        super(LlmTrainingJob, self).write(values)
        self._add_event('State: %s' % dict(job_status.STATES)[new_state])
        if new_state in job_status.FINAL_STATES:
            self._notify_finished()

    def _check_budget(self, override_reason=None):
        """The provider's budget guard for this job's estimate (from its datasets' validation,
        done now for those never validated, since the estimate needs their tokens)."""
        self.ensure_one()
        if not self.provider_id.monthly_budget:
            return None
        unvalidated = (self.dataset_ids | self.validation_dataset_ids).filtered(lambda d: d.state == 'draft')
        if unvalidated:
            for dataset in unvalidated:
                dataset._validate(self.base_model_id)
            self.invalidate_cache(['estimated_cost'])
        return self.provider_id._check_budget(self.estimated_cost, override_reason)

    def _set_failed(self, message):
        self.ensure_one()
        _logger.warning('Training job %s failed: %s', self.id, message)
        self._change_state('failed', error_message=message)

    # -- notifications -------------------------------------------------------------------------
    def _final_losses(self):
        """{'train_loss', 'valid_loss'}: the last measured value of each (None: never measured)."""
        self.ensure_one()
        values = {'train_loss': None, 'valid_loss': None}
        if self.id:
            metrics = self.env['llm.training.job.metric'].search([('job_id', '=', self.id)], order='step desc')
            for name in values:
                measured = metrics.filtered('has_' + name)[:1]
                if measured:
                    values[name] = measured[name]
        return values

    def _seconds_between(self, start, end):
        if not (start and end):
            return None
        return (fields.Datetime.from_string(end) - fields.Datetime.from_string(start)).total_seconds()

    def _notify_finished(self):
        """Tell the followers how the job ended (a chatter summary); on a failure, give the owner
        a To Do saying why and what to do next."""
        self.ensure_one()
        losses = self._final_losses()
        priced = bool(self.base_model_id.training_price)
        title, rows = job_summary.summary_lines(
            self.state, duration=self._seconds_between(self.submitted_at, self.finished_at),
            trained_tokens=self.trained_tokens, train_loss=losses['train_loss'], valid_loss=losses['valid_loss'],
            cost=self.final_cost if priced else None,
            compute_seconds=self._seconds_between(self.started_at, self.finished_at),
            result_model=self.result_model_id.display_name, error=self.error_message if self.state == 'failed' else None)
        body = '<p><strong>%s</strong></p><ul>%s</ul>' % (html_escape(title), ''.join(
            '<li>%s: %s</li>' % (html_escape(label), html_escape(value)) for label, value in rows))
        # e-mails to followers go through the mail queue's cron: no SMTP call inside the engine's pass
        self.with_context(mail_notify_force_send=False).message_post(
            body=body, subject=title, subtype='mail.mt_comment', message_type='notification')
        if self.state == 'failed':
            self._schedule_failure_activity()

    def _schedule_failure_activity(self):
        owner = self.user_id or self.create_uid
        if self.provider_can_resume:
            todo = _('Resume it from its last checkpoint once the cause is fixed, or fix the setup, Reset to Draft '
                     'and Submit again.')
        else:
            todo = _('Fix the cause (datasets, settings or provider), then Reset to Draft and Submit again.')
        self.env['mail.activity'].create({
            'res_model_id': self.env['ir.model']._get(self._name).id, 'res_id': self.id,
            'activity_type_id': self.env.ref('mail.mail_activity_data_todo').id,
            'user_id': owner.id, 'summary': _('Training job "%s" failed') % self.name,
            'note': '<p>%s</p><p>%s</p>' % (html_escape(self.error_message or _('No reason was given.')),
                                            html_escape(todo)),
        })

    # -- helpers -------------------------------------------------------------------------------
    def _get_hyperparameters(self):
        """The job's settings as one validated dict (fields + the JSON extras)."""
        self.ensure_one()
        return parse_hyperparameters(self.hyperparameters, {name: self[name] for name in FORM_FIELDS})

    def _data_format(self):
        """'chat', 'preference' or 'text': what all of the job's datasets train as (prompt /
        completion data trains as chat)."""
        formats = {d._training_format() for d in self.dataset_ids | self.validation_dataset_ids}
        if len(formats) > 1:
            raise TrainingFailedError(_('The datasets mix %s formats; a job trains on one format. Split them into '
                                        'separate jobs.') % ' and '.join(sorted(formats)))
        return formats.pop() if formats else 'chat'

    @api.multi
    def get_hyperparameters(self):
        """The job's settings as one dict, canonical names (its fields and the JSON extras): for
        XML-RPC and the /v1 API."""
        self.ensure_one()
        return self._get_hyperparameters()

    @api.multi
    def get_checkpoints(self):
        """The job's intermediate checkpoints, as its provider registered them (OpenAI keeps the
        last three) or, for a trainer we launch, the complete ones in its job folder:
        [{'step', 'model_ref' (the provider's own id, None for a folder's), 'metrics' (what the
        provider measured at that step), 'created' (unix seconds, None when unknown)}]."""
        self.ensure_one()
        found = [{'step': c['step'], 'model_ref': c['model_ref'], 'metrics': c.get('metrics') or {}, 'created': None}
                 for c in self._get_provider_data().get('checkpoints') or []]
        if not found and self.work_dir and not self.provider_id.registers_checkpoints:
            found = [{'step': step, 'model_ref': None, 'metrics': {}, 'created': mtime}
                     for step, _path, mtime in trainer_folder.list_checkpoints(self.work_dir)]
        return found

    @api.multi
    def get_result_version(self):
        """The version number the job's fine-tuned model has, or will have once registered (its
        line: base model, suffix)."""
        self.ensure_one()
        return self.env['llm.model'].sudo()._next_version(self.base_model_id, self.suffix, self)

    def _check_trainable(self):
        """Refuse (JobRefused) what the job's provider cannot train: datasets that mix formats,
        preference data without DPO, plain text where text is not trained, a technique it does not
        run. Submit asks before the job moves (buttons, XML-RPC and /v1 alike); Validating asks
        again, on the validated datasets."""
        self.ensure_one()
        provider = self.provider_id
        try:
            data_format = self._data_format()
        except TrainingFailedError as e:
            raise JobRefused(str(e), 'dataset_ids', 'format')
        if data_format == 'preference' and not provider.supports_dpo:
            raise JobRefused(_('Provider "%s" does supervised fine-tuning on chat datasets only; preference (DPO) '
                               'datasets need a provider that trains them (OpenAI).') % provider.name,
                             'dataset_ids', 'unsupported')
        if data_format == 'text' and not provider.supports_text:
            raise JobRefused(_('Provider "%s" cannot train plain text (continued pre-training); train text datasets '
                               'on a provider that does (the local trainer, Ray), or convert them to chat or prompt '
                               '/ completion data.') % provider.name, 'dataset_ids', 'unsupported')
        if provider.techniques and self.technique not in provider.techniques.split(','):
            raise JobRefused(_('Provider "%s" does not train with %s; choose one of %s.')
                             % (provider.name, self.technique, provider.techniques.replace(',', ', ')),
                             'technique', 'unsupported')

    def _check_company_active_jobs(self, limit):
        """Refuse (JobRefused) a submit when the job's company has `limit` active jobs already (the
        /v1 API's limit per organisation; 0: none)."""
        self.ensure_one()
        if limit and self.sudo().search_count([('company_id', '=', self.company_id.id), ('id', '!=', self.id),
                                               ('state', 'in', job_status.ACTIVE_STATES)]) >= limit:
            raise JobRefused(_('Your company has %d fine-tuning jobs running, its limit; wait for one to finish or '
                               'cancel one.') % limit, 'company_id', 'limit')

    def _job_spec(self):
        """The plain spec of this attempt that provider adapters work from (lib/providers/base.py)."""
        self.ensure_one()
        data = self._get_provider_data()
        return JobSpec(
            job_key=self.job_key, attempt=self.attempt, database=self.env.cr.dbname, job_id=self.id, name=self.name,
            base_model=self.base_model_id.model_ref, base_model_name=self.base_model_id.name,
            technique=self.technique, hyperparameters=self._spec_hyperparameters(),
            # what a start needs; a started run no longer does (and a poll saves the datasets' queries)
            data_format=None if self.external_job_id else self._data_format(),
            work_dir=self.work_dir, validation_examples=self.validation_examples, seed=self.seed,
            suffix=self.suffix, state=self.state, external_id=self.external_job_id or None,
            resume=bool(data.get('resume')), provider_data=data)

    def _spec_hyperparameters(self):
        """The settings the provider gets: the job's, with the provider's processes per job
        unless the job names its own."""
        hyper = self._get_hyperparameters()
        if 'num_processes' not in hyper and self.provider_id.num_processes > 1:
            hyper['num_processes'] = self.provider_id.num_processes
        return hyper

    def _get_provider_data(self):
        return json.loads(self.provider_data or '{}')

    def _set_provider_data(self, **values):
        data = self._get_provider_data()
        data.update(values)
        self._write_workflow({'provider_data': json.dumps(data, sort_keys=True)})

    def _add_event(self, message, level='info', external_id=False, data=None, created_at=None):
        """Record an event; one with a provider id already recorded is skipped (idempotent)."""
        self.ensure_one()
        Event = self.env['llm.training.job.event'].sudo()
        if external_id and external_id in self._known_event_ids([external_id]):
            return Event.browse()
        return Event.create({'job_id': self.id, 'company_id': self.company_id.id, 'message': message, 'level': level,
                             'external_id': external_id, 'data': json.dumps(data) if data else False,
                             'event_time': created_at or _now()})

    def _known_event_ids(self, external_ids):
        """Which of these provider event ids this job has recorded already (one query)."""
        if not external_ids:
            return set()
        self.env.cr.execute('SELECT external_id FROM llm_training_job_event WHERE job_id = %s AND external_id IN %s',
                            (self.id, tuple(external_ids)))
        return {row[0] for row in self.env.cr.fetchall()}

    # -- the engine's hooks ------------------------------------------------------------------------
    @api.model
    def _cron_sync_training_jobs(self):
        """The cron's entry point (data/llm_training_data.xml): the engine does the work."""
        self.env['llm.training.engine']._cron()
        return True

    def _write_workflow(self, values):
        """Write workflow fields; the setup lock in write() is for people, not for the engine.
        Progress fields are not tracked in the chatter, so their writes skip mail's tracking
        (which costs more than the write itself on every poll); state changes go through
        _change_state and are tracked."""
        record = self if 'state' in values else self.with_context(tracking_disable=True)
        return super(LlmTrainingJob, record).write(values)

    def _check_readable_links(self, user=None):
        """`user` (default: the current one) may read the job's provider, base model and datasets.
        The ids are read as superuser: in the user's own environment a many2many leaves out what
        they cannot read, which would make the check pass."""
        env = self.env(user=user) if user else self.env
        if env.uid == SUPERUSER_ID:
            return
        job = self.sudo()
        for model, ids in (('llm.provider', job.provider_id.ids), ('llm.model', job.base_model_id.ids),
                           ('llm.training.dataset', (job.dataset_ids | job.validation_dataset_ids).ids)):
            records = env[model].browse(ids)
            records.check_access_rights('read')
            records.check_access_rule('read')

    def _check_engine_links(self):
        """The engine (superuser) re-checks before it reads data or calls a provider: the linked
        records are in the job's company, and the job's owner may still read them."""
        try:
            self._check_company_links()
            if self.user_id:
                self._check_readable_links(self.user_id)
        except (AccessError, ValidationError) as e:
            raise TrainingFailedError(_('Job "%s" may not use its data: %s') % (self.name, e.name))

    def _prepare_files(self):
        """Merge the datasets into the job folder's train.jsonl (+ validation.jsonl)."""
        hyper = self._get_hyperparameters()
        # 0700: the folder holds the training data; in Odoo's data folder the llm_training folder too
        default_root = os.path.join(tools.config['data_dir'], 'llm_training')
        top = default_root if not self.provider_id.storage_path else os.path.dirname(self.work_dir)
        os.makedirs(os.path.dirname(top), exist_ok=True)
        make_private_dirs(self.work_dir, top)
        self._data_format()  # refuses datasets that mix formats
        counts = merge_examples(
            [(d._data_streams(), d._reader_options()) for d in self.dataset_ids],
            [(d._data_streams(), d._reader_options()) for d in self.validation_dataset_ids],
            os.path.join(self.work_dir, trainer_folder.TRAIN_FILE),
            os.path.join(self.work_dir, trainer_folder.VALIDATION_FILE),
            validation_split=hyper['validation_split'], seed=hyper['seed'])
        if counts['train'] < 1:
            raise TrainingFailedError(_('No training examples are left after the validation split.'))
        held = 0
        eval_path = os.path.join(self.work_dir, trainer_folder.EVAL_FILE)
        if os.path.exists(eval_path):
            os.remove(eval_path)  # a resubmitted job prepares again
        if self.evaluate_after_training and self.provider_id.evaluates and not counts['validation']:
            # the evaluation hold-out: kept out of train.jsonl, the trainer never sees it
            held = evaluation_holdout.split_holdout(os.path.join(self.work_dir, trainer_folder.TRAIN_FILE), eval_path,
                                                    self.evaluation_holdout, seed=hyper['seed'])
            counts['train'] -= held
        self._write_workflow({
            'train_examples': counts['train'], 'validation_examples': counts['validation'],
            'train_tokens': sum(d.token_total for d in self.dataset_ids)})
        self._add_event(_('Prepared %d training and %d validation examples%s')
                        % (counts['train'], counts['validation'],
                           _(', %d held out for evaluation') % held if held else ''))

    def _register_result(self, result):
        if not result.get('model_ref'):
            raise TrainingFailedError(_('The provider reported success but no resulting model.'))
        metrics = job_summary.model_metric_values(result.get('metrics'), **self._final_losses())
        model = self._register_model(result['model_ref'], result.get('name') or self.name, result.get('description'),
                                     metrics)
        self._write_workflow({'result_model_id': model.id})

    def _register_model(self, model_ref, name, description=None, metrics=None):
        """Create or update the fine-tuned `llm.model` with this technical id, with the rights of
        whoever moves the job (the cron, or a manager's button after its access check)."""
        Model = self.env['llm.model'].with_context(active_test=False)
        model = Model.search([('provider_id', '=', self.provider_id.id), ('model_ref', '=', model_ref)], limit=1)
        values = {'name': name, 'kind': 'fine_tuned', 'provider_id': self.provider_id.id,
                  'model_ref': model_ref, 'base_model_id': self.base_model_id.id, 'job_id': self.id,
                  'context_length': self.base_model_id.context_length, 'active': True, 'description': description,
                  # a model knows what it was trained on: restricted data makes a restricted model
                  'user_id': self.user_id.id,
                  'visibility': 'restricted' if 'restricted' in (self.dataset_ids | self.validation_dataset_ids).sudo()
                  .mapped('visibility') else 'company'}
        values.update(metrics or {})
        if model:
            model.write(values)
        else:
            # a new model of this base and suffix: the next version of that line
            values.update(suffix=self.suffix or False,
                          version=Model._next_version(self.base_model_id, self.suffix, self))
            model = Model.create(values)
        return model

    # -- evaluation ------------------------------------------------------------------------------
    def _evaluation_examples(self):
        """(file, set) the job's models are evaluated on: its hold-out, else its validation
        examples, else its training examples (in-sample); (None, None) when none was prepared."""
        self.ensure_one()
        for name, eval_set in ((trainer_folder.EVAL_FILE, 'holdout'), (trainer_folder.VALIDATION_FILE, 'validation'),
                               (trainer_folder.TRAIN_FILE, 'in_sample')):
            path = os.path.join(self.work_dir, name)
            if evaluation_holdout.count_lines(path):
                return path, eval_set
        return None, None

    def _queue_evaluation(self, model=None, reference=None, kind='job'):
        """A pending evaluation of `model` (the job's result) against `reference` (its base) on the
        job's evaluation examples, for the engine's next pass; nothing when the job asks for none, the
        provider cannot evaluate (the Evaluation tab says so) or no examples were prepared."""
        self.ensure_one()
        model, reference = model or self.result_model_id, reference or self.base_model_id
        if not (model and reference and self.provider_id.evaluates) or \
                (kind == 'job' and not self.evaluate_after_training):
            return self.env['llm.training.evaluation']
        path, eval_set = self._evaluation_examples()
        if not path:
            return self.env['llm.training.evaluation']
        evaluation = self.env['llm.training.evaluation'].sudo().create({
            'job_id': self.id, 'kind': kind, 'model_id': model.id, 'reference_model_id': reference.id,
            'examples_file': path, 'eval_set': eval_set, 'data_format': self._data_format(),
            'example_count': evaluation_holdout.count_lines(path), 'judge_model_id': self.evaluation_judge_id.id})
        self._add_event(_('Evaluation queued: %s on %s') % (evaluation.name, dict(
            evaluation._fields['eval_set'].selection)[eval_set].lower()))
        return evaluation

    @api.multi
    def action_open_loss_curve(self):
        """The job's metrics as a line graph per step (and a pivot), measured steps only."""
        self.ensure_one()
        action = self.env.ref('llm_training.llm_training_job_metric_action').read()[0]
        action.update(domain=[('job_id', '=', self.id)], name=_('Loss Curve: %s') % self.name,
                      context={'search_default_train_measured': 1})
        return action

    @api.multi
    def action_register_checkpoints(self):
        """Register the intermediate checkpoints the provider kept (OpenAI keeps the last few) as models."""
        self._check_write_access()
        self.env['llm.model'].check_access_rights('create')
        for job in self:
            checkpoints = job._get_provider_data().get('checkpoints') or []
            if not checkpoints:
                raise UserError(_('Job "%s" has no checkpoints to register.') % job.name)
            for checkpoint in checkpoints:
                job._register_model(checkpoint['model_ref'], _('%s (step %d)') % (job.name, checkpoint['step']),
                                    _('Checkpoint at step %d of job %s; metrics: %s')
                                    % (checkpoint['step'], job.name, json.dumps(checkpoint.get('metrics') or {})))
        return True
