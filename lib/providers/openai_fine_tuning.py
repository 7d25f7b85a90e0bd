"""The OpenAI provider (and OpenAI-compatible services, through the base URL), with the openai SDK.

Start uploads the prepared files, checks OpenAI has processed them and creates the job; check
reads the job, its new events (metrics among them) and its checkpoints; cancel asks OpenAI, and
the job is Cancelled once OpenAI reports it so. The SDK retries 429/5xx/timeouts itself
(MAX_RETRIES, with backoff); what still fails is retried by the engine, and errors no retry fixes
(key, permission, quota, invalid request) fail the job with a clear message. The API key is read
only to build the client and is redacted from every message."""
import contextlib
import logging
import os

from . import register
from . import openai_mapping
from ..jobs import trainer_folder
from ..evaluation import answers as evaluation_answers
from ..evaluation import files as evaluation_files
from ..exceptions import ModelNotFoundError, TrainingAuthError, TrainingFailedError, TrainingRetryableError
from ..datasets.token_count import PipeCounter
from .base import TrainingProvider
from ..host.trainer_env import ADDON_ROOT, run_trainer_module, trainer_env

_logger = logging.getLogger(__name__)
MAX_RETRIES = 2            # the SDK's own retries of one call, with exponential backoff
COUNTER_TIMEOUT = 60       # seconds the token counter may take to answer one example
FILE_POLL_SECONDS = 10     # a file OpenAI is still processing is checked again after this
EVENT_PAGE_SIZE = 100
EVENT_MAX_PAGES = 50
EVAL_CALLS_PER_CHECK = 20  # chat calls one evaluation check makes: a cron pass stays short, the next goes on
SCORE_TIMEOUT = 300        # seconds the trainer env may take to score the answers


@register
class OpenAIFineTuning(TrainingProvider):
    service = 'openai'
    # techniques: none listed, OpenAI chooses its own (a warning says the choice is ignored)
    capabilities = {'supports_dpo': True, 'registers_checkpoints': True, 'uses_api_key': True,
                    'lists_models': True, 'tests_connection': True, 'bills_training': True,
                    'openai_embeddings': True,
                    # evaluation through the chat API, paid: when the provider's setting turns it on
                    'evaluates_on_request': True}

    @classmethod
    def default_epochs(cls, train_examples):
        return openai_mapping.auto_epochs(train_examples)  # what OpenAI runs for n_epochs "auto"

    # -- the client and its errors ------------------------------------------------------------
    def api_key(self):
        return self.secret('api_key')

    def client(self):
        key = self.api_key()
        if not key:
            raise TrainingFailedError('Provider "%s" has no API key; a manager can set it on the provider.'
                                      % self.name)
        import openai
        return openai.OpenAI(api_key=key, organization=self.config.get('organization') or None,
                             base_url=self.config.get('base_url') or None,
                             timeout=float(self.config.get('request_timeout') or 60), max_retries=MAX_RETRIES)

    @contextlib.contextmanager
    def errors(self, action):
        """Turn the SDK's exceptions into ours: retryable (the job keeps its state) or failed."""
        import openai
        try:
            yield
        except (openai.APITimeoutError, openai.APIConnectionError) as e:
            raise TrainingRetryableError('OpenAI did not answer while %s (%s); retried later.'
                                         % (action, type(e).__name__))
        except openai.APIStatusError as e:
            message = self.error_text(e)
            status = e.status_code
            if status == 429 and _error_body(e).get('code') != 'insufficient_quota':
                raise TrainingRetryableError('OpenAI is rate limiting (HTTP 429) while %s: %s' % (action, message),
                                             seconds=_retry_after(e))
            if status >= 500 or status in (408, 409):
                raise TrainingRetryableError('OpenAI had an error (HTTP %s) while %s: %s' % (status, action, message))
            hint = {
                401: 'Check the API key of provider "%s".' % self.name,
                403: 'The key of provider "%s" is not allowed to do this (organization, project or model '
                     'access).' % self.name,
                429: 'The OpenAI account is out of quota; check its billing.',
                404: 'Check the base model and the base URL of provider "%s".' % self.name,
            }.get(status, 'Fix the request and submit again.')
            kind = TrainingAuthError if status in (401, 403, 429) else TrainingFailedError  # credentials, quota
            raise kind('OpenAI refused %s (HTTP %s): %s %s' % (action, status, message, hint))

    def error_text(self, error):
        body = _error_body(error)
        text = body.get('message') or str(error)
        if body.get('param'):
            text = '%s (field %s)' % (text, body['param'])
        return openai_mapping.redact(text, self.api_key())

    # -- the provider contract ------------------------------------------------------------------
    def validate(self, spec):
        if not self.api_key():
            raise TrainingFailedError('Provider "%s" has no API key; a manager can set it on the provider.'
                                      % self.name)
        if spec.technique != 'lora':
            spec.note('OpenAI chooses its own training technique; "%s" is ignored.' % spec.technique, 'warning')

    def start(self, spec):
        """Create the job at OpenAI, or find the one a previous start of this attempt created
        (by the job key in its metadata). Never waits: files OpenAI has not processed yet make a
        retry later that goes on with the same uploads (kept through the retry)."""
        import openai
        client = self.client()
        data = spec.provider_data
        existing = self.find_job(client, spec.job_key)
        if existing:
            data.update(last_event_id=None, checkpoints=[])
            spec.note('OpenAI job %s of this attempt found: adopted' % existing)
            return existing
        files = {'training_file': data.get('training_file'), 'validation_file': data.get('validation_file')}
        try:
            if not files['training_file']:
                files['training_file'] = self.upload(client, spec, trainer_folder.TRAIN_FILE)
            if spec.validation_examples and not files['validation_file']:
                files['validation_file'] = self.upload(client, spec, trainer_folder.VALIDATION_FILE)
            for file_id in filter(None, files.values()):
                self.check_file(client, file_id, files)
            body = {'method': openai_mapping.method_payload(
                spec.hyperparameters, 'dpo' if spec.data_format == 'preference' else 'supervised'),
                    'metadata': {'odoo_job_id': str(spec.job_id), 'odoo_database': spec.database,
                                 'llm_training_job_key': spec.job_key}}
            with self.errors('creating the fine-tuning job'):
                created = client.fine_tuning.jobs.create(
                    model=spec.base_model, training_file=files['training_file'],
                    validation_file=files['validation_file'] or openai.NOT_GIVEN, seed=spec.seed,
                    suffix=(spec.suffix or '').strip()[:openai_mapping.SUFFIX_MAX] or openai.NOT_GIVEN,
                    extra_body=body)
        except TrainingRetryableError as e:
            e.keep.update(files)  # the uploads so far, for the retry
            raise
        except Exception:
            self.delete_files(client, list(filter(None, files.values())))  # nothing left behind at OpenAI
            raise
        data.update(last_event_id=None, checkpoints=[], **files)
        _logger.info('Training job %s: OpenAI job %s created', spec.job_id, created.id)
        return created.id

    def find_job(self, client, job_key):
        """The id of the OpenAI job whose metadata carries `job_key`, or None."""
        with self.errors("looking for this attempt's job"):
            page = client.fine_tuning.jobs.list(limit=100, extra_query={'metadata[llm_training_job_key]': job_key})
        for remote in page.data:
            if ((remote.to_dict().get('metadata') or {}).get('llm_training_job_key')) == job_key:
                return remote.id
        return None

    def upload(self, client, spec, name):
        with self.errors('uploading %s' % name), open(os.path.join(spec.work_dir, name), 'rb') as f:
            uploaded = client.files.create(file=(name, f), purpose='fine-tune')
        spec.note('Uploaded %s as %s' % (name, uploaded.id))
        return uploaded.id

    def check_file(self, client, file_id, files):
        """Go on when OpenAI has processed the file; fail on its error; else try again shortly."""
        with self.errors('checking file %s' % file_id):
            uploaded = client.files.retrieve(file_id)
        if uploaded.status == 'error':
            raise TrainingFailedError('OpenAI could not process file %s: %s'
                                      % (file_id, uploaded.status_details or 'no details'))
        if uploaded.status != 'processed':
            raise TrainingRetryableError('OpenAI is still processing file %s; checked again in %d s.'
                                         % (file_id, FILE_POLL_SECONDS), seconds=FILE_POLL_SECONDS, keep=dict(files))

    def delete_files(self, client, file_ids):
        for file_id in file_ids:
            try:
                client.files.delete(file_id)
            except Exception as e:  # cleanup is best effort; the original error is what matters
                _logger.warning('Could not delete OpenAI file %s: %s', file_id, openai_mapping.redact(str(e), self.api_key()))

    def check(self, spec):
        client = self.client()
        with self.errors('reading job %s' % spec.external_id):
            remote = client.fine_tuning.jobs.retrieve(spec.external_id)
            events = self.new_events(client, spec)
        status, note = openai_mapping.provider_status(remote.status, 'running' if spec.state == 'training' else 'queued')
        report = {'status': status, 'trained_tokens': remote.trained_tokens,
                  'eta': getattr(remote, 'estimated_finish', None), 'events': [], 'metrics': []}
        for event in events:
            report['events'].append({'id': event['id'], 'created_at': event.get('created_at'),
                                     'level': {'warn': 'warning'}.get(event.get('level'), event.get('level')),
                                     'message': event.get('message') or '', 'data': event.get('data') or None})
            metric = openai_mapping.metric_from_event(event)
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
                text = 'OpenAI: %s (%s)' % (error.message, error.code)
                if error.param:
                    text += ', field %s' % error.param
            else:
                text = 'OpenAI reported the job as failed without a reason.'
            report['error'] = openai_mapping.redact(text, self.api_key())
        if status == 'succeeded':
            self.record_checkpoints(client, spec)
            report['result'] = {'name': '%s (fine-tuned)' % spec.name, 'model_ref': remote.fine_tuned_model,
                                'description': 'Fine-tuned on OpenAI by job %s.' % remote.id}
        return report

    def new_events(self, client, spec):
        """Events since the last one read, oldest first. OpenAI lists newest first and pages
        towards older ones with `after`, so read until the last seen id."""
        last_seen = spec.provider_data.get('last_event_id')
        new, after = [], None
        for _page in range(EVENT_MAX_PAGES):
            kwargs = {'limit': EVENT_PAGE_SIZE}
            if after:
                kwargs['after'] = after
            page = client.fine_tuning.jobs.list_events(spec.external_id, **kwargs)
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
            spec.provider_data['last_event_id'] = new[-1]['id']
        return new

    def record_checkpoints(self, client, spec):
        with self.errors('listing checkpoints'):
            checkpoints = [c.to_dict() for c in client.fine_tuning.jobs.checkpoints.list(spec.external_id)]
        spec.provider_data['checkpoints'] = [
            {'model_ref': c['fine_tuned_model_checkpoint'], 'step': c['step_number'], 'metrics': c.get('metrics') or {}}
            for c in sorted(checkpoints, key=lambda c: c['step_number'])]

    def cancel(self, spec):
        client = self.client()
        with self.errors('cancelling job %s' % spec.external_id):
            client.fine_tuning.jobs.cancel(spec.external_id)

    def chat(self, model_ref, messages, options=None):
        """One chat completion (not streamed) by a base or fine-tuned model (ft:...)."""
        options = dict(options or {})
        unknown = sorted(set(options) - {'max_tokens', 'temperature', 'top_p', 'stop', 'seed', 'n', 'max_seconds'})
        if unknown:
            raise TrainingFailedError('Unknown chat option(s) %s.' % ', '.join(unknown))
        options.pop('max_seconds', None)  # the request timeout bounds the call
        kwargs = dict((k, v) for k, v in options.items() if v is not None)
        client = self.client()
        with self.errors('asking %s' % model_ref):
            answer = client.chat.completions.create(model=model_ref, messages=messages, **kwargs)
        choice, usage = answer.choices[0], answer.usage
        return {'text': choice.message.content or '', 'finish_reason': choice.finish_reason,
                'prompt_tokens': usage.prompt_tokens if usage else None,
                'completion_tokens': usage.completion_tokens if usage else None}

    # -- evaluation through the chat API (the provider's setting turns it on) --------------------
    def start_evaluation(self, spec):
        """Nothing runs at OpenAI between checks: each check asks both models the next prompts
        (check_evaluation). Start makes a clean folder for the run."""
        if spec.data_format not in (None, 'chat'):
            raise TrainingFailedError('OpenAI evaluation compares chat answers; %s data is evaluated on the local '
                                      'trainer only.' % spec.data_format)
        if not os.path.exists(spec.examples or ''):
            raise TrainingFailedError('The examples file %s is missing.' % spec.examples)
        os.makedirs(spec.folder, mode=0o700, exist_ok=True)
        for name in (evaluation_files.STATUS, evaluation_files.SUMMARY, evaluation_files.EXAMPLES,
                     evaluation_answers.ANSWERS):
            if os.path.exists(os.path.join(spec.folder, name)):
                os.remove(os.path.join(spec.folder, name))  # a retry starts clean
        evaluation_files.write_config(spec.folder, {'answers': os.path.join(spec.folder, evaluation_answers.ANSWERS)})
        spec.provider_data.update(key=spec.key)
        return spec.key

    def check_evaluation(self, spec):
        """Ask the base and the fine-tuned model the next prompts (greedy, at most
        max_new_tokens, EVAL_CALLS_PER_CHECK calls a check), keeping each answered pair; once all
        are answered, the trainer env scores them with the local evaluator's functions."""
        status = evaluation_files.read_status(spec.folder)
        if status.get('state') == 'done':
            return {'status': 'done', 'progress': 100.0, 'summary': evaluation_files.read_summary(spec.folder),
                    'examples': evaluation_files.read_examples(spec.folder)}
        pairs = evaluation_answers.chat_pairs(spec.examples, spec.limits.get('max_examples') or 50)
        if not pairs:
            return {'status': 'failed', 'error': 'No chat example to evaluate in %s.' % spec.examples}
        done, calls = evaluation_answers.answered(spec.folder), 0
        options = {'max_tokens': spec.limits.get('max_new_tokens') or 64, 'temperature': 0.0}
        for prompt, expected in pairs[done:]:
            if calls + 2 > EVAL_CALLS_PER_CHECK:
                break
            reference = self.chat(spec.reference, prompt, options)['text']
            candidate = self.chat(spec.candidate, prompt, options)['text']
            calls += 2
            evaluation_answers.append(spec.folder, prompt, expected, reference, candidate)
            done += 1
        if done < len(pairs):
            return {'status': 'running', 'progress': round(95.0 * done / len(pairs), 1)}
        result = run_trainer_module(self.config.get('trainer_python') or 'python3',
                                    ['trainer.evaluate', '--dir', spec.folder], SCORE_TIMEOUT)
        status = evaluation_files.read_status(spec.folder)
        if status.get('state') == 'done':
            return self.check_evaluation(spec)
        error = status.get('error') or (result.stderr or b'').decode('utf-8', 'replace')[-500:] or 'no reason given'
        return {'status': 'failed', 'error': 'Scoring the answers failed: %s' % error}

    def token_counter(self, model_ref):
        """tiktoken in the trainer env (it does not install on Odoo's Python 3.7), counting as OpenAI bills."""
        return PipeCounter([self.config.get('trainer_python') or 'python3', '-m', 'trainer.count_tokens',
                            '--model', model_ref], env=trainer_env(), cwd=ADDON_ROOT, timeout=COUNTER_TIMEOUT)

    def list_models(self):
        client = self.client()
        with self.errors('listing models'):
            return [m.to_dict() for m in client.models.list()]

    def test_connection(self):
        return '%d models visible with this key.' % len(self.list_models())

    def embed(self, model_ref, texts, input_type='passage'):
        """OpenAI's embedding models (text-embedding-3-small, ...), in order; they embed a query
        as a passage (no input type)."""
        import openai
        client = self.client()
        with self.errors('embedding texts'):
            try:
                answer = client.embeddings.create(model=model_ref, input=list(texts))
            except openai.NotFoundError as e:
                raise ModelNotFoundError('OpenAI has no embedding model %r: %s' % (model_ref, self.error_text(e)))
        return [item.embedding for item in sorted(answer.data, key=lambda item: item.index)]


def _retry_after(error):
    try:
        return max(1, int(float(error.response.headers.get('retry-after'))))
    except (TypeError, ValueError, AttributeError):
        return None


def _error_body(error):
    """OpenAI's error object ({"message", "type", "param", "code"}) of an SDK status error."""
    body = error.body if isinstance(error.body, dict) else {}
    return body['error'] if isinstance(body.get('error'), dict) else body
