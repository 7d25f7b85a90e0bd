# -*- coding: utf-8 -*-
import logging
import threading

import psycopg2
from dateutil.relativedelta import relativedelta

from odoo import SUPERUSER_ID, _, api, fields, models
from odoo.exceptions import AccessError, ValidationError
from odoo.tools import html_escape

from ..lib.datasets.conversations import SOURCES
from ..user_errors import BudgetExceeded

_logger = logging.getLogger(__name__)

INTERVAL_TYPES = [('days', 'Days'), ('weeks', 'Weeks'), ('months', 'Months')]
CRON_BATCH = 50  # due schedules per cron run; the rest wait for the next one


def _now():
    return fields.Datetime.now()


class LlmTrainingSchedule(models.Model):
    """Retrain on new conversations at regular intervals: each run builds a dataset from the
    conversations since the previous job (the conversation import service), copies the template job onto
    it and submits it. Runs with the owner's rights (user_id), so it reads only what the owner may.
    Each run also archives this schedule's fine-tuned models beyond the newest `keep_models` that
    are neither deployed nor archived.
    """
    _name = 'llm.training.schedule'
    _description = 'LLM Training Schedule'
    _inherit = ['mail.thread', 'llm.access.mixin']
    _order = 'next_run, id'
    _link_fields = ('company_id', 'template_job_id', 'channel_ids', 'assistant_partner_ids')

    name = fields.Char(required=True, track_visibility='onchange')
    active = fields.Boolean(default=True, track_visibility='onchange')
    company_id = fields.Many2one('res.company', default=lambda self: self.env.user.company_id)
    user_id = fields.Many2one('res.users', string='Owner', required=True, default=lambda self: self.env.user,
                              track_visibility='onchange',
                              help='Runs with this user\'s rights and owns the jobs it creates. Only a system '
                                   'administrator may choose another user than themselves.')
    runs_as_superuser = fields.Boolean(compute='_compute_runs_as_superuser')
    template_job_id = fields.Many2one('llm.training.job', string='Template Job', required=True, ondelete='restrict',
                                      help='Provider, base model and settings are copied from this job.')
    # what to read: the same fields as the import wizard
    source = fields.Selection(SOURCES, required=True, default='channel')
    channel_ids = fields.Many2many('mail.channel', 'llm_training_schedule_channel_rel', 'schedule_id', 'channel_id',
                                   string='Channels')
    res_model = fields.Char(string='Model', help='Technical name of a model with a chatter, e.g. res.partner.')
    assistant_partner_ids = fields.Many2many('res.partner', 'llm_training_schedule_assistant_rel', 'schedule_id',
                                             'partner_id', string='Assistant',
                                             help="Whose messages are the assistant's; everyone else's are the user's.")
    system_prompt = fields.Text()
    gap_minutes = fields.Integer(string='Gap (minutes)', default=60)
    min_turns = fields.Integer(string='Minimum turns', default=2)
    max_examples = fields.Integer(help='0: all.')
    scrub_pii = fields.Boolean(string='Scrub personal data', default=True)
    scrub_names = fields.Boolean(string='Replace names', default=True,
                                 help="With Scrub personal data: the conversations' people's names become [NAME].")
    visibility = fields.Selection([('company', 'Company'), ('restricted', 'Restricted')], default='restricted',
                                  required=True, string='Dataset visibility',
                                  help='Of the datasets each run creates (restricted: the owner and LLM managers).')
    # when
    interval_number = fields.Integer(string='Every', default=1, required=True)
    interval_type = fields.Selection(INTERVAL_TYPES, default='weeks', required=True)
    next_run = fields.Datetime(required=True, default=fields.Datetime.now, track_visibility='onchange')
    min_new_examples = fields.Integer(default=10, help='A run with fewer new examples creates nothing and '
                                                       'leaves them for the next run (a dataset needs 10).')
    keep_models = fields.Integer(default=3, help='Fine-tuned versions kept before the oldest are archived '
                                                 '(not applied yet: needs the model lifecycle fields).')
    last_run = fields.Datetime(readonly=True, copy=False,
                               help='Conversations up to this moment went into the last job; the next run '
                                    'reads only what came after.')
    last_job_id = fields.Many2one('llm.training.job', string='Last Job', readonly=True, copy=False)
    job_ids = fields.One2many('llm.training.job', 'schedule_id', string='Jobs', readonly=True)

    @api.depends('user_id')
    def _compute_runs_as_superuser(self):
        for schedule in self:
            schedule.runs_as_superuser = schedule.user_id.id == SUPERUSER_ID

    @api.constrains('company_id', 'template_job_id')
    def _check_company_links(self):
        self._check_same_company(('template_job_id',))

    @api.constrains('source', 'res_model')
    def _check_res_model(self):
        for schedule in self.filtered(lambda s: s.source == 'chatter'):
            if not schedule.res_model:
                raise ValidationError(_('Schedule "%s": give the technical name of the model whose chatter '
                                        'to read, e.g. res.partner.') % schedule.name)
            self.env['llm.conversation.import'].chatter_model(schedule.res_model)

    @api.constrains('interval_number', 'min_new_examples', 'keep_models', 'gap_minutes')
    def _check_numbers(self):
        for schedule in self:
            if schedule.interval_number < 1:
                raise ValidationError(_('Schedule "%s": "Every" must be at least 1.') % schedule.name)
            if schedule.gap_minutes <= 0:
                raise ValidationError(_('Schedule "%s": Gap (minutes) must be above 0.') % schedule.name)
            if schedule.min_new_examples < 0 or schedule.keep_models < 0:
                raise ValidationError(_('Schedule "%s": min new examples and keep models cannot be negative.')
                                      % schedule.name)

    @api.model
    def create(self, vals):
        self._check_links(vals)
        user = self.env['res.users'].browse(vals.get('user_id') or self.env.uid)
        if not self._user_may_run_as(user):
            raise AccessError(_('Only a system administrator may make a schedule that runs as another user (%s) '
                                'or as the superuser.') % user.name)
        return super(LlmTrainingSchedule, self).create(vals)

    @api.multi
    def write(self, vals):
        self._check_links(vals)
        if self.env.uid != SUPERUSER_ID and not self.env.user.has_group('base.group_system'):
            # a schedule runs with its owner's rights: changing what it reads is acting as the owner
            if 'user_id' in vals:
                raise AccessError(_('Only a system administrator may change the user a schedule runs as.'))
            if any(schedule.user_id != self.env.user for schedule in self):
                raise AccessError(_('Only a system administrator may change a schedule that runs as another user.'))
        return super(LlmTrainingSchedule, self).write(vals)

    # -- buttons ---------------------------------------------------------------------------------
    @api.multi
    def action_run_now(self):
        """One run at once (next_run stays as it is)."""
        self.check_access_rights('write')
        self.check_access_rule('write')
        for schedule in self:
            schedule._run(_now())
        return True

    # -- cron ------------------------------------------------------------------------------------
    @api.model
    def _cron_run_schedules(self):
        now = _now()
        for schedule in self.search([('next_run', '<=', now)], limit=CRON_BATCH):
            try:
                with self.env.cr.savepoint():  # a failed run leaves no half-made dataset or job
                    schedule._run(now)
            except (psycopg2.Error, MemoryError):
                raise
            except Exception as e:
                _logger.exception('Training schedule %s failed', schedule.id)
                schedule._note(_('Run failed: %s') % html_escape(getattr(e, 'name', None) or str(e)))
            schedule.next_run = schedule._next_run_after(now)
            if not getattr(threading.currentThread(), 'testing', False):
                self.env.cr.commit()  # this schedule's run is done and noted; a later failure cannot undo it
        return True

    # -- business ----------------------------------------------------------------------------------
    def _next_run_after(self, now):
        """next_run moved on by whole intervals until it is after now (missed runs are not caught up)."""
        step = relativedelta(**{self.interval_type: self.interval_number})
        moment = fields.Datetime.from_string(self.next_run)
        limit = fields.Datetime.from_string(now)
        while moment <= limit:
            moment += step
        return fields.Datetime.to_string(moment)

    def _archive_old_models(self):
        """Archive this schedule's draft fine-tuned models beyond the newest keep_models (0: keep all)."""
        if not self.keep_models:
            return
        drafts = self.env['llm.model'].search([('job_id.schedule_id', '=', self.id), ('kind', '=', 'fine_tuned'),
                                               ('state', '=', 'draft')], order='version desc, id desc')
        old = drafts[self.keep_models:]
        if old:
            old.action_archive_model()
            self._note(_('Archived %d older model(s), keeping the newest %d: %s')
                       % (len(old), self.keep_models, html_escape(', '.join(old.mapped('name')))))

    def _note(self, body):
        """An internal note in the schedule's chatter."""
        self.message_post(body=body, message_type='comment', subtype='mail.mt_note')

    def _run(self, now):
        """Build a dataset from the conversations since the last job and submit a copy of the
        template on it, as the owner. Returns the job, or False when there were too few examples."""
        self.ensure_one()
        owner = self.sudo(self.user_id)  # the owner's rights: their messages, datasets and jobs only
        service = owner.env['llm.conversation.import']
        options = service.options_of(owner, self.last_run or False, now)  # what came since the last run
        result = service.build(options)
        since = _('since %s') % self.last_run if self.last_run else _('so far')
        if len(result.examples) < self.min_new_examples:
            owner._note(_('Skipped: %d new examples %s, fewer than the %d needed (Min new examples); they wait '
                          'for the next run.<br/>%s') % (len(result.examples), since, self.min_new_examples,
                                                         service.summary(options, result).replace('\n', '<br/>')))
            return False
        try:
            # over the budget, nothing of the run is kept: the examples wait for the next run
            with self.env.cr.savepoint():
                dataset = service.create_dataset(options, result, '%s %s' % (self.name, now))
                if dataset.state != 'valid':
                    owner._note(_('Dataset "%s" is not valid, so no job was created; see its validation report.')
                                % html_escape(dataset.name))
                    return False
                job = owner.template_job_id.copy({
                    'name': '%s %s' % (self.name, now[:10]), 'dataset_ids': [(6, 0, dataset.ids)],
                    'user_id': self.user_id.id, 'schedule_id': self.id,
                })
                job.action_submit()
        except BudgetExceeded as e:
            owner._note(_('Skipped: %s The examples %s wait for the next run.') % (html_escape(e.name), since))
            return False
        owner.write({'last_run': now, 'last_job_id': job.id})
        owner._archive_old_models()
        owner._note(_('Submitted job "%s" on dataset "%s": %d examples %s.')
                    % (html_escape(job.name), html_escape(dataset.name), len(result.examples), since))
        return job
