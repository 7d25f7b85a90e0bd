# -*- coding: utf-8 -*-
import logging

import psycopg2

from odoo import _, api, fields, models
from odoo.exceptions import UserError

_logger = logging.getLogger(__name__)

# The three calls every training backend implements as `_<service>_<method>`.
PROVIDER_METHODS = ('start_training_job', 'check_training_job_status', 'cancel_training_job')


class LlmProvider(models.Model):
    """A training backend. Each service adds itself to `service` with `selection_add` and
    implements `_<service>_start_training_job`, `_<service>_check_training_job_status` and
    `_<service>_cancel_training_job` (see models/llm_provider_local.py)."""
    _name = 'llm.provider'
    _description = 'LLM Provider'
    _order = 'sequence, name'

    name = fields.Char(required=True)
    sequence = fields.Integer(default=10)
    active = fields.Boolean(default=True)
    company_id = fields.Many2one('res.company', default=lambda self: self.env.user.company_id)
    service = fields.Selection([('local', 'Local (Hugging Face)'), ('openai', 'OpenAI')],
                               required=True, default='local')
    # The key lives in llm.secret (managers only by ACL, closed on every ORM path). This field
    # only takes a new value from the form: it always reads empty, so the key never goes back to
    # a browser; api_key_hint shows its last four characters.
    api_key = fields.Char(string='API Key', compute='_compute_api_key', inverse='_inverse_api_key',
                          groups='llm_training.group_llm_manager', copy=False,
                          help='Paste a key to set or replace it; it is never shown again.')
    api_key_hint = fields.Char(string='Current Key', compute='_compute_api_key',
                               groups='llm_training.group_llm_manager')
    base_url = fields.Char(string='Base URL', help='Endpoint of the service, for OpenAI-compatible '
                                                   'services; empty for the default.')
    request_timeout = fields.Integer(default=60, help='Seconds before any call to the service gives up.')
    max_concurrent_jobs = fields.Integer(default=1, help='Jobs running at once on this provider; '
                                                         'extra jobs wait in Queued. 0 means no limit.')
    # What the service can do, declared by its `_<service>_capabilities()`: views and the engine
    # read these instead of comparing service names.
    can_resume = fields.Boolean(compute='_compute_capabilities', help='Restarts a job from its last checkpoint.')
    can_pause = fields.Boolean(compute='_compute_capabilities')
    supports_dpo = fields.Boolean(compute='_compute_capabilities', help='Trains preference (DPO) datasets.')
    registers_checkpoints = fields.Boolean(compute='_compute_capabilities',
                                           help='Keeps intermediate checkpoints that can be registered as models.')
    uses_api_key = fields.Boolean(compute='_compute_capabilities')
    lists_models = fields.Boolean(compute='_compute_capabilities', help='Fetch Models lists the account\'s models.')
    techniques = fields.Char(compute='_compute_capabilities',
                             help='Techniques it trains (comma-separated); empty: the service chooses its own.')
    model_ids = fields.One2many('llm.model', 'provider_id', string='Models')
    job_ids = fields.One2many('llm.training.job', 'provider_id', string='Training Jobs')
    throughput_ids = fields.One2many('llm.provider.throughput', 'provider_id', string='Measured Throughput',
                                     readonly=True, help="Training speed this provider's machine reached, "
                                                         "per base model and technique.")

    @api.depends('service')
    def _compute_capabilities(self):
        for provider in self:
            capabilities = (provider.service and provider._dispatch_optional('capabilities')) or {}
            for name in ('can_resume', 'can_pause', 'supports_dpo', 'registers_checkpoints', 'uses_api_key',
                         'lists_models'):
                provider[name] = bool(capabilities.get(name))
            provider.techniques = ','.join(capabilities.get('techniques') or ())

    @api.depends()
    def _compute_api_key(self):
        Secret = self.env['llm.secret']
        # groups= does not guard export_data in Odoo 11: the hint is computed for managers only
        manager = self.env.user.has_group('llm_training.group_llm_manager')
        for provider in self:
            provider.api_key = False
            provider.api_key_hint = Secret._hint(provider, 'api_key') if provider.id and manager else False

    def _inverse_api_key(self):
        for provider in self:
            if provider.api_key:  # empty: keep the current key
                self.env['llm.secret']._write_value(provider, 'api_key', provider.api_key)

    def _get_secret(self, field_name):
        """A credential for the adapter that calls the service (see llm.secret)."""
        self.ensure_one()
        return self.env['llm.secret']._read_value(self, field_name)

    @api.multi
    def action_fetch_models(self):
        """List the service's models (base and fine-tuned) into the model registry."""
        self._check_manager_action()  # before the key is read or the service called
        self.env['llm.model'].check_access_rights('create')
        for provider in self:
            provider._dispatch('fetch_models')
        return True

    @api.multi
    def action_clear_api_key(self):
        self._check_manager_action()
        for provider in self:
            self.env['llm.secret']._write_value(provider, 'api_key', False)
        return True

    def _check_manager_action(self):
        """Check, then act: a button touches a service only for who may change the provider."""
        self.check_access_rights('write')
        self.check_access_rule('write')

    @api.multi
    def unlink(self):
        self.env['llm.secret']._unlink_for(self)
        return super(LlmProvider, self).unlink()

    @api.constrains('max_concurrent_jobs', 'request_timeout')
    def _check_limits(self):
        for provider in self:
            if provider.max_concurrent_jobs < 0 or provider.request_timeout <= 0:
                raise UserError(_('Concurrency limit must be 0 or more and the timeout positive.'))

    def _dispatch(self, method, *args, **kwargs):
        """Call `_<service>_<method>`; a service without it is an error, never a silent no-op."""
        self.ensure_one()
        implementation = getattr(self, '_%s_%s' % (self.service, method), None)
        if implementation is None:
            raise UserError(_('Provider "%s" (service %s) cannot %s: the service has no '
                              'implementation installed.') % (self.name, self.service, method.replace('_', ' ')))
        return implementation(*args, **kwargs)

    def _dispatch_optional(self, method, *args):
        """Call `_<service>_<method>` if the service has one (optional hooks such as a GPU check
        or a tokenizer); None otherwise."""
        self.ensure_one()
        implementation = getattr(self, '_%s_%s' % (self.service, method), None)
        return implementation(*args) if implementation else None

    # The provider interface the engine calls. Public names (other addons implement them), so
    # each checks that the caller may change the job: over XML-RPC nobody reaches a service
    # through them without that right.
    def start_training_job(self, job):
        """Hand the prepared job to the service. Returns the external job id."""
        return self._dispatch('start_training_job', self._checked_job(job))

    def check_training_job_status(self, job):
        """Ask the service where the job stands. Returns a dict (see lib/job_status.py)."""
        return self._dispatch('check_training_job_status', self._checked_job(job))

    def cancel_training_job(self, job):
        """Ask the service to stop the job; the next status check confirms it."""
        return self._dispatch('cancel_training_job', self._checked_job(job))

    def _checked_job(self, job):
        if not isinstance(job, models.BaseModel) or job._name != 'llm.training.job':
            raise UserError(_('Provider methods take a training job record.'))
        job.check_access_rights('write')
        job.check_access_rule('write')
        return job

    def _count_running_jobs(self):
        """Jobs holding a slot: handed to the service (or being handed) and not finished."""
        self.ensure_one()
        return self.env['llm.training.job'].sudo().search_count([
            ('provider_id', '=', self.id), ('state', 'in', ('queued', 'training')),
            '|', ('external_job_id', '!=', False), ('start_pending', '=', True)])

    def _has_free_slot(self):
        """Whether one more job may start now. Two cron workers must not both take the last slot:
        the first one writes the provider row and holds it until its commit; the second then
        waits, and PostgreSQL refuses it a row changed since its snapshot (REPEATABLE READ), so it
        answers "no slot" and the job waits for the next run."""
        self.ensure_one()
        if not self.max_concurrent_jobs:
            return True
        try:
            with self.env.cr.savepoint():
                self.env.cr.execute('UPDATE llm_provider SET write_date = write_date WHERE id = %s', (self.id,))
        except psycopg2.extensions.TransactionRollbackError:
            return False
        return self._count_running_jobs() < self.max_concurrent_jobs
