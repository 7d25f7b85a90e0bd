# -*- coding: utf-8 -*-
"""The OpenAI provider (and OpenAI-compatible services, through the base URL), with the openai SDK.

Start uploads the prepared files, waits until OpenAI has processed them and creates the job;
check reads the job, its new events (metrics among them) and its checkpoints; cancel asks OpenAI,
and the job is Cancelled once OpenAI reports it so. The SDK retries 429/5xx/timeouts itself
(MAX_RETRIES, with backoff); what still fails is retried by the next cron run, and errors no
retry fixes (key, permission, quota, invalid request) fail the job with a clear message.
The API key comes from llm.secret only to build the client and is redacted from every message."""
import contextlib
import logging
import os

from odoo import _, fields, models
from odoo.exceptions import UserError

from ..lib import openai_jobs
from ..lib.token_count import PipeCounter
from ..models.llm_provider_local import ADDON_ROOT, trainer_env, trainer_python
from ..lib.exceptions import TrainingAuthError, TrainingFailedError, TrainingRetryableError

_logger = logging.getLogger(__name__)
MAX_RETRIES = 2            # the SDK's own retries of one call, with exponential backoff
COUNTER_TIMEOUT = 60       # seconds the token counter may take to answer one example
FILE_POLL_SECONDS = 10     # a file OpenAI is still processing is checked again after this
EVENT_PAGE_SIZE = 100
EVENT_MAX_PAGES = 50


class LlmProvider(models.Model):
    _inherit = 'llm.provider'

    organization = fields.Char(help='OpenAI organization id (optional).')

    # -- the client and its errors ------------------------------------------------------------
    def _openai_api_key(self):
        return self._get_secret('api_key')

    def _openai_client(self):
        self.ensure_one()
        key = self._openai_api_key()
        if not key:
            raise TrainingFailedError(_('Provider "%s" has no API key; a manager can set it on the provider.')
                                      % self.name)
        import openai
        return openai.OpenAI(api_key=key, organization=self.organization or None, base_url=self.base_url or None,
                             timeout=float(self.request_timeout or 60), max_retries=MAX_RETRIES)

    @contextlib.contextmanager
    def _openai_errors(self, action):
        """Turn the SDK's exceptions into ours: retryable (the job keeps its state) or failed."""
        import openai
        try:
            yield
        except (openai.APITimeoutError, openai.APIConnectionError) as e:
            raise TrainingRetryableError(_('OpenAI did not answer while %s (%s); retried on the next run.')
                                         % (action, type(e).__name__))
        except openai.APIStatusError as e:
            message = self._openai_error_text(e)
            status = e.status_code
            if status == 429 and _error_body(e).get('code') != 'insufficient_quota':
                raise TrainingRetryableError(_('OpenAI is rate limiting (HTTP 429) while %s: %s') % (action, message),
                                             seconds=self._openai_retry_after(e))
            if status >= 500 or status in (408, 409):
                raise TrainingRetryableError(_('OpenAI had an error (HTTP %s) while %s: %s') % (status, action, message))
            hint = {
                401: _('Check the API key of provider "%s".') % self.name,
                403: _('The key of provider "%s" is not allowed to do this (organization, project or model '
                       'access).') % self.name,
                429: _('The OpenAI account is out of quota; check its billing.'),
                404: _('Check the base model and the base URL of provider "%s".') % self.name,
            }.get(status, _('Fix the request and submit again.'))
            kind = TrainingAuthError if status in (401, 403, 429) else TrainingFailedError  # credentials, quota
            raise kind(_('OpenAI refused %s (HTTP %s): %s %s') % (action, status, message, hint))

    def _openai_error_text(self, error):
        body = _error_body(error)
        text = body.get('message') or str(error)
        if body.get('param'):
            text = '%s (field %s)' % (text, body['param'])
        return openai_jobs.redact(text, self._openai_api_key())

    @staticmethod
    def _openai_retry_after(error):
        try:
            return max(1, int(float(error.response.headers.get('retry-after'))))
        except (TypeError, ValueError, AttributeError):
            return None

    # -- the provider contract ------------------------------------------------------------------
    def _openai_capabilities(self):
        # techniques: none listed, OpenAI chooses its own (a warning says the choice is ignored)
        return {'supports_dpo': True, 'registers_checkpoints': True, 'uses_api_key': True, 'lists_models': True}

    def _openai_validate_training_job(self, job):
        if not self._openai_api_key():
            raise TrainingFailedError(_('Provider "%s" has no API key; a manager can set it on the provider.')
                                      % self.name)
        if job.technique != 'lora':
            job._add_event(_('OpenAI chooses its own training technique; "%s" is ignored.') % job.technique,
                           level='warning')

    def _openai_start_training_job(self, job):
        """Create the job at OpenAI, or find the one a previous start of this attempt created
        (by the job key in its metadata). Never waits: files OpenAI has not processed yet make a
        retry later that goes on with the same uploads (kept through the retry)."""
        import openai
        client = self._openai_client()
        existing = self._openai_find_job(client, job.job_key)
        if existing:
            job._set_provider_data(last_event_id=None, checkpoints=[])
            job._add_event(_('OpenAI job %s of this attempt found: adopted') % existing)
            return existing
        data = job._get_provider_data()
        files = {'training_file': data.get('training_file'), 'validation_file': data.get('validation_file')}
        try:
            if not files['training_file']:
                files['training_file'] = self._openai_upload(client, job, 'train.jsonl')
            if job.validation_examples and not files['validation_file']:
                files['validation_file'] = self._openai_upload(client, job, 'validation.jsonl')
            for file_id in filter(None, files.values()):
                self._openai_check_file(client, file_id, files)
            body = {'method': openai_jobs.method_payload(
                job._get_hyperparameters(), 'dpo' if job._data_format() == 'preference' else 'supervised'),
                    'metadata': {'odoo_job_id': str(job.id), 'odoo_database': self.env.cr.dbname,
                                 'llm_training_job_key': job.job_key}}
            with self._openai_errors(_('creating the fine-tuning job')):
                created = client.fine_tuning.jobs.create(
                    model=job.base_model_id.model_ref, training_file=files['training_file'],
                    validation_file=files['validation_file'] or openai.NOT_GIVEN, seed=job.seed,
                    suffix=(job.suffix or '').strip()[:openai_jobs.SUFFIX_MAX] or openai.NOT_GIVEN,
                    extra_body=body)
        except TrainingRetryableError as e:
            e.keep.update(files)  # the uploads so far, for the retry
            raise
        except Exception:
            self._openai_delete_files(client, list(filter(None, files.values())))  # nothing left behind at OpenAI
            raise
        job._set_provider_data(last_event_id=None, checkpoints=[], **files)
        _logger.info('Training job %s: OpenAI job %s created', job.id, created.id)
        return created.id

    def _openai_find_job(self, client, job_key):
        """The id of the OpenAI job whose metadata carries `job_key`, or None."""
        with self._openai_errors(_('looking for this attempt\'s job')):
            page = client.fine_tuning.jobs.list(limit=100, extra_query={'metadata[llm_training_job_key]': job_key})
        for remote in page.data:
            if ((remote.to_dict().get('metadata') or {}).get('llm_training_job_key')) == job_key:
                return remote.id
        return None

    def _openai_upload(self, client, job, name):
        path = os.path.join(job.work_dir, name)
        with self._openai_errors(_('uploading %s') % name), open(path, 'rb') as f:
            uploaded = client.files.create(file=(name, f), purpose='fine-tune')
        job._add_event(_('Uploaded %s as %s') % (name, uploaded.id))
        return uploaded.id

    def _openai_check_file(self, client, file_id, files):
        """Go on when OpenAI has processed the file; fail on its error; else try again shortly."""
        with self._openai_errors(_('checking file %s') % file_id):
            uploaded = client.files.retrieve(file_id)
        if uploaded.status == 'error':
            raise TrainingFailedError(_('OpenAI could not process file %s: %s')
                                      % (file_id, uploaded.status_details or _('no details')))
        if uploaded.status != 'processed':
            raise TrainingRetryableError(_('OpenAI is still processing file %s; checked again in %d s.')
                                         % (file_id, FILE_POLL_SECONDS), seconds=FILE_POLL_SECONDS, keep=dict(files))

    def _openai_delete_files(self, client, file_ids):
        for file_id in file_ids:
            try:
                client.files.delete(file_id)
            except Exception as e:  # cleanup is best effort; the original error is what matters
                _logger.warning('Could not delete OpenAI file %s: %s', file_id,
                                openai_jobs.redact(str(e), self._openai_api_key()))

    def _openai_check_training_job_status(self, job):
        client = self._openai_client()
        with self._openai_errors(_('reading job %s') % job.external_job_id):
            remote = client.fine_tuning.jobs.retrieve(job.external_job_id)
            events = self._openai_new_events(client, job)
        current = 'running' if job.state == 'training' else 'queued'
        status, note = openai_jobs.provider_status(remote.status, current)
        report = {'status': status, 'trained_tokens': remote.trained_tokens,
                  'eta': getattr(remote, 'estimated_finish', None), 'events': [], 'metrics': []}
        for event in events:
            report['events'].append({'id': event['id'], 'created_at': event.get('created_at'),
                                     'level': {'warn': 'warning'}.get(event.get('level'), event.get('level')),
                                     'message': event.get('message') or '', 'data': event.get('data') or None})
            metric = openai_jobs.metric_from_event(event)
            if metric:
                report['metrics'].append(metric)
                total = (event.get('data') or {}).get('total_steps')
                if total:
                    report.update(step=metric['step'], total_steps=int(total),
                                  progress=round(100.0 * metric['step'] / total, 1))
        if note:
            report['events'].append({'id': 'status-%s' % remote.status, 'level': 'warning', 'message': note})
        if status == 'failed':
            error = remote.error
            if error and error.message:
                text = _('OpenAI: %s (%s)') % (error.message, error.code)
                if error.param:
                    text += _(', field %s') % error.param
            else:
                text = _('OpenAI reported the job as failed without a reason.')
            report['error'] = openai_jobs.redact(text, self._openai_api_key())
        if status == 'succeeded':
            self._openai_record_checkpoints(client, job)
            report['result'] = {'name': '%s (fine-tuned)' % job.name, 'model_ref': remote.fine_tuned_model,
                                'description': _('Fine-tuned on OpenAI by job %s.') % remote.id}
        return report

    def _openai_new_events(self, client, job):
        """Events since the last one read, oldest first. OpenAI lists newest first and pages
        towards older ones with `after`, so read until the last seen id."""
        last_seen = job._get_provider_data().get('last_event_id')
        new, after = [], None
        for _page in range(EVENT_MAX_PAGES):
            kwargs = {'limit': EVENT_PAGE_SIZE}
            if after:
                kwargs['after'] = after
            page = client.fine_tuning.jobs.list_events(job.external_job_id, **kwargs)
            data = [event.to_dict() for event in page.data]
            for event in data:
                if event['id'] == last_seen:
                    break
                new.append(event)
            else:
                if page.has_more and data:
                    after = data[-1]['id']
                    continue
            break
        new.reverse()
        if new:
            job._set_provider_data(last_event_id=new[-1]['id'])
        return new

    def _openai_record_checkpoints(self, client, job):
        with self._openai_errors(_('listing checkpoints')):
            checkpoints = [c.to_dict() for c in client.fine_tuning.jobs.checkpoints.list(job.external_job_id)]
        job._set_provider_data(checkpoints=[
            {'model_ref': c['fine_tuned_model_checkpoint'], 'step': c['step_number'], 'metrics': c.get('metrics') or {}}
            for c in sorted(checkpoints, key=lambda c: c['step_number'])])

    def _openai_cancel_training_job(self, job):
        client = self._openai_client()
        with self._openai_errors(_('cancelling job %s') % job.external_job_id):
            client.fine_tuning.jobs.cancel(job.external_job_id)
        return True

    def _openai_token_counter(self, model):
        """tiktoken in the trainer env (it does not install on Odoo's Python 3.7), counting as OpenAI bills."""
        return PipeCounter([trainer_python(), '-m', 'trainer.count_tokens', '--model', model.model_ref],
                           env=trainer_env(), cwd=ADDON_ROOT, timeout=COUNTER_TIMEOUT)

    # -- models -----------------------------------------------------------------------------------
    def _openai_fetch_models(self):
        """List the account's models (base and fine-tuned) into the model registry."""
        client = self._openai_client()
        try:
            with self._openai_errors(_('listing models')):
                remote_models = [m.to_dict() for m in client.models.list()]
        except (TrainingFailedError, TrainingRetryableError) as e:
            raise UserError(str(e))
        self._openai_register_models(remote_models)

    def _openai_register_models(self, remote_models):
        Model = self.env['llm.model'].with_context(active_test=False)
        existing = {m.model_ref: m for m in Model.search([('provider_id', '=', self.id)])}
        for remote in sorted(remote_models, key=lambda m: m['id'].startswith('ft:')):  # bases first
            base_ref = openai_jobs.base_of_fine_tuned(remote['id'])
            values = {'name': remote['id'], 'provider_id': self.id, 'model_ref': remote['id'],
                      'kind': 'fine_tuned' if base_ref else 'base'}
            if base_ref and existing.get(base_ref):
                values['base_model_id'] = existing[base_ref].id
            if remote['id'] in existing:
                existing[remote['id']].write({k: v for k, v in values.items() if k != 'name'})
            else:
                existing[remote['id']] = Model.create(values)
        return True


def _error_body(error):
    """OpenAI's error object ({"message", "type", "param", "code"}) of an SDK status error."""
    body = error.body if isinstance(error.body, dict) else {}
    return body['error'] if isinstance(body.get('error'), dict) else body
