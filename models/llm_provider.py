# -*- coding: utf-8 -*-
import logging
import os
import types

import psycopg2

from odoo import _, api, fields, models, tools
from odoo.exceptions import UserError

from ..lib import providers
from ..lib.jobs import budget
from ..lib.providers import openai_mapping
from ..lib.exceptions import InvalidRequestError, ModelNotFoundError, TrainingFailedError, TrainingRetryableError
from ..lib.serving.model_server import serve_settings
from ..lib.providers.base import CAPABILITIES
from ..user_errors import BudgetExceeded, InvalidServiceRequest, ServiceBusy, UnknownModel

_logger = logging.getLogger(__name__)
# Credentials kept in llm.secret; each field only takes a new value and has a `<name>_hint`.
SECRET_FIELDS = ('api_key', 'ray_auth_header')


def _as_user_error(error):
    if isinstance(error, TrainingRetryableError):
        return ServiceBusy(str(error), error.seconds)
    if isinstance(error, ModelNotFoundError):
        return UnknownModel(str(error))
    return InvalidServiceRequest(str(error)) if isinstance(error, InvalidRequestError) else UserError(str(error))


def _user_errors(items):
    """Yield what `items` yields, its provider errors raised as UserError; closing this closes it."""
    try:
        for item in items:
            yield item
    except (TrainingFailedError, TrainingRetryableError) as e:
        raise _as_user_error(e)
    finally:
        items.close()


class LlmProvider(models.Model):
    """A training backend: its configuration, credentials and capabilities. The work is done by
    the service's adapter (lib/providers/), which the engine calls with a plain job spec."""
    _name = 'llm.provider'
    _description = 'LLM Provider'
    _order = 'sequence, name'

    name = fields.Char(required=True)
    sequence = fields.Integer(default=10)
    active = fields.Boolean(default=True)
    company_id = fields.Many2one('res.company', default=lambda self: self.env.user.company_id)
    service = fields.Selection([('local', 'Local (Hugging Face)'), ('openai', 'OpenAI'), ('ray', 'Ray cluster')],
                               required=True, default='local')
    # The key lives in llm.secret (managers only by ACL, closed on every ORM path). This field
    # only takes a new value from the form: it always reads empty, so the key never goes back to
    # a browser; api_key_hint shows its last four characters.
    api_key = fields.Char(string='API Key', compute='_compute_api_key', inverse='_inverse_api_key',
                          groups='llm_training.group_llm_manager', copy=False,
                          help='Paste a key to set or replace it; it is never shown again.')
    api_key_hint = fields.Char(string='Current Key', compute='_compute_api_key',
                               groups='llm_training.group_llm_manager')
    ray_auth_header = fields.Char(string='Auth Header', compute='_compute_api_key', inverse='_inverse_ray_auth_header',
                                  groups='llm_training.group_llm_manager', copy=False,
                                  help='Sent with every call to the Ray dashboard, as "Name: value" (e.g. '
                                       '"Authorization: Bearer ..."); never shown again.')
    ray_auth_header_hint = fields.Char(string='Current Auth Header', compute='_compute_api_key',
                                       groups='llm_training.group_llm_manager')
    organization = fields.Char(help='OpenAI organization id (optional).')
    ray_dashboard_url = fields.Char(string='Dashboard URL', default='http://127.0.0.1:8265',
                                    help="The Ray head's dashboard, which serves the Jobs API.")
    storage_path = fields.Char(help='Root of the job folders as Odoo sees it (empty: Odoo\'s data folder). For '
                                    'Ray: storage shared with the workers (NFS, a mounted bucket).')
    worker_storage_path = fields.Char(help='The same shared storage as the Ray workers see it (empty: the same path).')
    worker_python = fields.Char(default='python3', help='The trainer environment\'s Python on the Ray workers '
                                                        '(torch, transformers, peft).')
    cpus_per_job = fields.Float(default=1.0, help='CPUs Ray reserves for each job.')
    gpus_per_job = fields.Float(default=0.0, help='GPUs Ray reserves for each job.')
    num_processes = fields.Integer(default=1, help='Training processes per job (data parallel, one per GPU or a '
                                                   'share of the CPUs); a job\'s num_processes setting wins.')
    base_url = fields.Char(string='Base URL', help='Endpoint of the service, for OpenAI-compatible '
                                                   'services; empty for the default.')
    request_timeout = fields.Integer(default=60, help='Seconds before any call to the service gives up.')
    max_concurrent_jobs = fields.Integer(default=1, help='Jobs running at once on this provider; '
                                                         'extra jobs wait in Queued. 0 means no limit.')
    monthly_budget = fields.Float(digits=(16, 2), help='USD its jobs may cost in a calendar month (0: no budget). '
                                                       'Submit refuses a job that would go over it; a manager '
                                                       'may submit it anyway, giving a reason.')
    month_cost = fields.Float(compute='_compute_month_cost', digits=(16, 2), string='Cost this month',
                              help='The jobs submitted this calendar month (UTC): what the ended ones cost '
                                   '(trained tokens x price, also when failed or cancelled) plus the '
                                   'estimates of the active ones (USD).')
    # What the service can do, declared by its adapter's `capabilities`: views and the engine read
    # these instead of comparing service names.
    can_resume = fields.Boolean(compute='_compute_capabilities', help='Restarts a job from its last checkpoint.')
    can_pause = fields.Boolean(compute='_compute_capabilities')
    supports_dpo = fields.Boolean(compute='_compute_capabilities', help='Trains preference (DPO) datasets.')
    supports_text = fields.Boolean(compute='_compute_capabilities',
                                   help='Trains plain text datasets (continued pre-training, loss on every token).')
    registers_checkpoints = fields.Boolean(compute='_compute_capabilities',
                                           help='Keeps intermediate checkpoints that can be registered as models.')
    uses_api_key = fields.Boolean(compute='_compute_capabilities')
    lists_models = fields.Boolean(compute='_compute_capabilities', help='Fetch Models lists the account\'s models.')
    tests_connection = fields.Boolean(compute='_compute_capabilities')
    bills_training = fields.Boolean(compute='_compute_capabilities',
                                    help='Charges per trained token: its models have a training price.')
    can_chat = fields.Boolean(compute='_compute_capabilities', help='Answers conversations with its models '
                                                                    '(chat, chat_stream).')
    evaluates = fields.Boolean(compute='_compute_capabilities', help='Evaluates a fine-tuned model against its base '
                                                                     'when its job completes.')
    evaluation_optional = fields.Boolean(compute='_compute_capabilities',
                                         help='Can evaluate through its chat API when Evaluate with chat is on.')
    evaluate_with_chat = fields.Boolean(
        string='Evaluate with chat', help='After each job, the base and the fine-tuned model answer the evaluation '
                                          'prompts through the service\'s chat API to be scored side by side: paid '
                                          'calls (priced in the job\'s estimate). Off by default.')
    exports = fields.Boolean(compute='_compute_capabilities', help='Exports its fine-tuned models (Hugging Face, '
                                                                   'GGUF) where it trained them.')
    local_embeddings = fields.Boolean(compute='_compute_capabilities',
                                      help="Embeds with the local embedding models of this host's model server.")
    openai_embeddings = fields.Boolean(compute='_compute_capabilities',
                                       help="Embeds with OpenAI's embedding models (text-embedding-*).")
    techniques = fields.Char(compute='_compute_capabilities',
                             help='Techniques it trains (comma-separated); empty: the service chooses its own.')
    connection_status = fields.Char(readonly=True, copy=False, help='What the last Test Connection found.')
    connection_checked_at = fields.Datetime(readonly=True, copy=False)
    model_ids = fields.One2many('llm.model', 'provider_id', string='Models')
    job_ids = fields.One2many('llm.training.job', 'provider_id', string='Training Jobs')
    throughput_ids = fields.One2many('llm.provider.throughput', 'provider_id', string='Measured Throughput',
                                     readonly=True, help="Training speed this provider's machine reached, "
                                                         "per base model and technique.")

    @api.depends('service', 'evaluate_with_chat')
    def _compute_capabilities(self):
        for provider in self:
            adapter = providers.adapter_class(provider.service)
            capabilities = adapter.capabilities if adapter else {}
            for name in CAPABILITIES:
                provider[name] = bool(capabilities.get(name))
            provider.evaluation_optional = bool(capabilities.get('evaluates_on_request'))
            if provider.evaluation_optional and provider.evaluate_with_chat:
                provider.evaluates = True
            provider.techniques = ','.join(capabilities.get('techniques') or ())

    @api.depends('job_ids.state', 'job_ids.final_cost', 'job_ids.submitted_at')
    def _compute_month_cost(self):
        # with the reader's own rights: record rules keep other companies' jobs out
        for provider in self:
            provider.month_cost = provider._month_cost() if provider.id else 0.0

    def _month_cost(self, moment=None):
        """What this provider's jobs submitted in `moment`'s calendar month (UTC) cost (lib/jobs/budget.py)."""
        self.ensure_one()
        start, end = budget.month_bounds(moment or fields.Datetime.from_string(fields.Datetime.now()))
        jobs = self.env['llm.training.job'].search([
            ('provider_id', '=', self.id), ('state', '!=', 'draft'),
            ('submitted_at', '>=', fields.Datetime.to_string(start)), ('submitted_at', '<', fields.Datetime.to_string(end))])
        return sum(budget.job_cost(job.state, job.final_cost, job.estimated_cost) for job in jobs)

    def _check_budget(self, estimate, override_reason=None):
        """Refuse a Submit that would take this provider over its monthly budget (BudgetExceeded,
        with the figures), unless `override_reason` is given. Locks the provider's row until the
        transaction ends, so two Submits at once cannot both pass. Returns the figures when over
        (an override), None otherwise."""
        self.ensure_one()
        if not self.monthly_budget:
            return None
        self.env.cr.execute('SELECT id FROM llm_provider WHERE id = %s FOR UPDATE', (self.id,))
        # A write as well as the lock: Odoo's transactions are REPEATABLE READ, so a Submit that
        # waited on the lock would still count from its older snapshot; after a write it gets a
        # serialization failure instead, which Odoo retries on a fresh snapshot.
        self.env.cr.execute('UPDATE llm_provider SET write_date = write_date WHERE id = %s', (self.id,))
        # every job of the provider counts, whoever submits
        month_cost = self.sudo()._month_cost()
        if not budget.over_budget(month_cost, estimate, self.monthly_budget):
            return None
        text = budget.refusal_text(self.name, month_cost, estimate, self.monthly_budget)
        if not (override_reason or '').strip():
            raise BudgetExceeded(text, month_cost, estimate, self.monthly_budget)
        return text

    @api.depends()
    def _compute_api_key(self):
        Secret = self.env['llm.secret']
        # groups= does not guard export_data in Odoo 11: the hint is computed for managers only
        manager = self.env.user.has_group('llm_training.group_llm_manager')
        for provider in self:
            for name in SECRET_FIELDS:
                provider[name] = False
                provider[name + '_hint'] = Secret._hint(provider, name) if provider.id and manager else False

    def _inverse_api_key(self):
        self._store_secret('api_key')

    def _inverse_ray_auth_header(self):
        self._store_secret('ray_auth_header')

    def _store_secret(self, name):
        for provider in self:
            if provider[name]:  # empty: keep the current value
                self.env['llm.secret']._write_value(provider, name, provider[name])

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
            provider._register_remote_models(provider._call_adapter('list_models'))
        return True

    @api.multi
    def action_test_connection(self):
        """Ask the service whether it answers with these settings; the answer (or what is wrong)
        is kept on the provider."""
        self._check_manager_action()
        for provider in self:
            try:
                answer = _('OK: %s') % provider._call_adapter('test_connection')
            except UserError as e:
                answer = _('Failed: %s') % e.name
            provider.write({'connection_status': answer, 'connection_checked_at': fields.Datetime.now()})
        return True

    @api.multi
    def action_clear_api_key(self):
        return self._clear_secret('api_key')

    @api.multi
    def action_clear_ray_auth_header(self):
        return self._clear_secret('ray_auth_header')

    def _clear_secret(self, name):
        self._check_manager_action()
        for provider in self:
            self.env['llm.secret']._write_value(provider, name, False)
        return True

    def _check_manager_action(self):
        """Check, then act: a button touches a service only for who may change the provider."""
        self.check_access_rights('write')
        self.check_access_rule('write')

    @api.multi
    def unlink(self):
        self.env['llm.secret']._unlink_for(self)
        return super(LlmProvider, self).unlink()

    @api.constrains('max_concurrent_jobs', 'request_timeout', 'num_processes', 'cpus_per_job', 'gpus_per_job')
    def _check_limits(self):
        for provider in self:
            if provider.max_concurrent_jobs < 0 or provider.request_timeout <= 0:
                raise UserError(_('Concurrency limit must be 0 or more and the timeout positive.'))
            if provider.num_processes < 1 or provider.cpus_per_job < 0 or provider.gpus_per_job < 0:
                raise UserError(_('Processes per job must be 1 or more, CPUs and GPUs per job 0 or more.'))

    # -- the adapter ---------------------------------------------------------------------------
    def _adapter(self):
        """The service's adapter, configured with this provider's settings (the engine's only way
        to a service). Credentials are read when a call needs them, not before."""
        self.ensure_one()
        adapter_class = providers.adapter_class(self.service)
        if adapter_class is None:
            raise UserError(_('Provider "%s": service %s has no adapter installed.') % (self.name, self.service))
        return adapter_class(self._adapter_config(), secret=self._get_secret)

    def _adapter_config(self):
        """The settings an adapter reads (a plain dict); services extend it with their fields."""
        return {
            'name': self.name, 'base_url': self.base_url, 'request_timeout': self.request_timeout,
            'organization': self.organization, 'dashboard_url': self.ray_dashboard_url,
            'storage_path': self.storage_path, 'worker_storage_path': self.worker_storage_path,
            'worker_python': self.worker_python, 'cpus_per_job': self.cpus_per_job, 'gpus_per_job': self.gpus_per_job,
            'trainer_python': tools.config.get('llm_training_trainer_python') or 'python3',
            # one model server per data folder, shared by the workers; `make stop` looks there too
            'model_server_dir': os.path.join(tools.config['data_dir'], 'llm_training', 'model_server'),
            'cache_dir': os.path.join(tools.config['data_dir'], 'llm_training', 'cache'),  # shared by every process
            'models_dir': tools.config.get('llm_training_models_dir') or os.path.join(
                tools.config['data_dir'], 'llm_training', 'models'),
            'model_roots': self._model_roots(),
            'serve_settings': self._serve_settings(),
        }

    @api.model
    def _serve_settings(self):
        """The model server's batching settings (odoo.conf llm_training_serve_*)."""
        try:
            return serve_settings(tools.config.get)
        except ValueError as e:
            raise UserError(str(e))

    @api.model
    def _model_roots(self):
        """The only folders the model server serves models from: where the addon puts them (Odoo's
        data folder, the models folder, the providers' storage). A technical id naming any other
        folder is refused by the server itself."""
        roots = {os.path.join(tools.config['data_dir'], 'llm_training'),
                 tools.config.get('llm_training_models_dir') or ''}
        providers_with_storage = self.sudo().with_context(active_test=False).search([('storage_path', '!=', False)])
        roots.update(providers_with_storage.mapped('storage_path'))
        return sorted(root for root in roots if root)

    @api.multi
    def embed(self, model, texts, input_type='passage'):
        """The vectors of `texts` (lists of floats, in order) by this provider's embedding model
        `model`; `input_type` 'query' for a question searched with, 'passage' for what is indexed.
        UnknownModel when the service has no such model."""
        self.ensure_one()
        self.check_access_rights('read')
        self.check_access_rule('read')
        return self._call_adapter('embed', model, list(texts), input_type)

    @api.model
    def embedding_provider(self, model):
        """The provider, among those the caller may read, that embeds with `model`: one with OpenAI's
        embedding models for theirs (text-embedding-*), one with this host's for the others."""
        capability = 'openai_embeddings' if model.startswith('text-embedding-') else 'local_embeddings'
        provider = self.search([]).filtered(capability)[:1]
        if not provider:
            raise UnknownModel(_('No provider embeds with the model %r.') % model)
        return provider

    def _call_adapter(self, method, *args):
        """A button's call to the service: what goes wrong becomes a message for the user. A
        generator (chat_stream) comes back wrapped, so an error while it is read does too."""
        try:
            result = getattr(self._adapter(), method)(*args)
        except (TrainingFailedError, TrainingRetryableError) as e:
            raise _as_user_error(e)
        return _user_errors(result) if isinstance(result, types.GeneratorType) else result

    def _register_remote_models(self, remote_models):
        """Create or update one llm.model per model the service lists ({'id': ...}); a
        fine-tuned model's base is linked when the service names it (OpenAI's ft:base:...)."""
        Model = self.env['llm.model'].with_context(active_test=False)
        existing = {m.model_ref: m for m in Model.search([('provider_id', '=', self.id)])}
        for remote in sorted(remote_models, key=lambda m: m['id'].startswith('ft:')):  # bases first
            base_ref = openai_mapping.base_of_fine_tuned(remote['id'])
            values = {'name': remote['id'], 'provider_id': self.id, 'model_ref': remote['id'],
                      'kind': 'fine_tuned' if base_ref else 'base'}
            if base_ref and existing.get(base_ref):
                values['base_model_id'] = existing[base_ref].id
            if remote['id'] in existing:
                existing[remote['id']].write({k: v for k, v in values.items() if k != 'name'})
            else:
                existing[remote['id']] = Model.create(values)
        return True

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
