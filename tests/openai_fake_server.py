"""A local, stateful OpenAI-compatible fine-tuning server for the tests (OpenAI's servers are out
of reach). Real HTTP on 127.0.0.1; the real openai SDK talks to it.

State: files (uploaded -> processed on the next read), jobs that advance one step per retrieve
(validating_files -> queued -> running, a few training steps each read with metric events ->
succeeded with a fine-tuned model and checkpoints), events listed newest first and paged with
`after`, cancel, models. Faults are injected per request (`inject`). With a contract
(tests/openapi_contract.py), every request is checked against OpenAI's schema before it is
handled and every response before it is sent; problems land in `violations` and a bad request
is refused with HTTP 400, so the client fails loudly too.
"""
import cgi
import itertools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

BASE_MODELS = ('gpt-4o-mini-2024-07-18', 'gpt-3.5-turbo-0125')
PREFIX = '/v1'


def _error(status, message, kind='invalid_request_error', code=None, param=None):
    return status, {'error': {'message': message, 'type': kind, 'param': param, 'code': code}}


class FakeOpenAI(object):

    def __init__(self, api_key, contract=None):
        self.api_key = api_key
        self.contract = contract
        self.violations = []
        self.requests = []          # (method, path) in order
        self.files = {}
        self.jobs = {}
        self.events = {}            # job id -> events, oldest first
        self.checkpoints = {}
        self.faults = []
        # How jobs behave; tests change these.
        self.steps_per_read = 4
        self.total_steps = 10
        self.max_page_size = 100    # events per page at most, whatever `limit` asks
        self.outcome = 'succeeded'  # or 'failed'
        self.hold_status = None     # e.g. 'paused': reported for `hold_reads` reads once running
        self.hold_reads = 0
        self.cancel_delay_reads = 0  # reads after a cancel before the job shows cancelled
        self.file_processing_reads = 1
        self.file_status_final = 'processed'
        # chat completions: the answer of `model` to `messages` (tests set their own); none: an echo
        self.chat_reply = lambda model, messages: 'Answer of %s.' % model
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._server = None

    # -- life cycle ---------------------------------------------------------------------------------
    def start(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def do_GET(self):
                fake._handle(self)

            do_POST = do_DELETE = do_GET

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self):
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    @property
    def base_url(self):
        return 'http://127.0.0.1:%d%s' % (self._server.server_address[1], PREFIX)

    def inject(self, method, path_pattern, status, times=1, code=None, message=None):
        """The next `times` matching requests fail with `status` ('timeout': no answer in time)."""
        self.faults.append({'method': method, 'path': re.compile(path_pattern), 'status': status,
                            'times': times, 'code': code, 'message': message})

    def count(self, method, path_pattern):
        return sum(1 for m, p in self.requests if m == method and re.search(path_pattern, p))

    def _new_id(self, prefix):
        return '%s-%06d' % (prefix, next(self._ids))

    # -- HTTP -------------------------------------------------------------------------------------------
    def _handle(self, request):
        url = urlsplit(request.path)
        path = url.path[len(PREFIX):] if url.path.startswith(PREFIX) else url.path
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        content_type = request.headers.get('Content-Type', '')
        body = self._read_body(request, content_type)
        with self._lock:
            self.requests.append((request.command, path))
            fault = self._take_fault(request.command, path)
        if fault and fault['status'] == 'timeout':
            time.sleep(self.timeout_seconds)
            return  # no answer: the client has given up by now
        if self.contract:
            sent = {k: v for k, v in body.items() if not k.startswith('_')} if isinstance(body, dict) else body
            problems = self.contract.check_request(request.command, path, query, content_type, sent)
            if problems:
                self.violations += problems
                return self._send(request, *_error(400, '; '.join(problems)))
        if request.headers.get('Authorization') != 'Bearer %s' % self.api_key:
            sent = (request.headers.get('Authorization') or '').replace('Bearer ', '')
            masked = sent[:3] + '*' * max(len(sent) - 7, 0) + sent[-4:]
            return self._send(request, *_error(
                401, 'Incorrect API key provided: %s. You can find your API key at '
                     'https://platform.openai.com/account/api-keys.' % masked, code='invalid_api_key'))
        if fault:
            code = fault['code'] or {429: 'rate_limit_exceeded'}.get(fault['status'])
            status, payload = _error(fault['status'], fault['message'] or 'Injected error %s' % fault['status'],
                                     kind='server_error' if fault['status'] >= 500 else 'invalid_request_error',
                                     code=code)
            # A short retry-after keeps the SDK's own retries quick in tests.
            return self._send(request, status, payload, {'retry-after-ms': '20'})
        with self._lock:
            status, payload = self._route(request.command, path, query, body)
        if self.contract and status == 200:
            self.violations += self.contract.check_response(request.command, path, status, payload)
        self._send(request, status, payload)

    timeout_seconds = 2.5

    @staticmethod
    def _read_body(request, content_type):
        length = int(request.headers.get('Content-Length') or 0)
        if content_type.startswith('multipart/form-data'):
            form = cgi.FieldStorage(fp=request.rfile, headers=request.headers,
                                    environ={'REQUEST_METHOD': 'POST', 'CONTENT_TYPE': content_type})
            fields = {}
            for item in form.list or ():
                fields[item.name] = item.value.decode('utf-8') if isinstance(item.value, bytes) else item.value
                if item.filename:
                    fields['_filename'] = item.filename
            return fields
        raw = request.rfile.read(length) if length else b''
        return json.loads(raw.decode('utf-8')) if raw else None

    def _take_fault(self, method, path):
        for fault in self.faults:
            if fault['times'] > 0 and fault['method'] == method and fault['path'].search(path):
                fault['times'] -= 1
                return fault
        return None

    @staticmethod
    def _send(request, status, payload, headers=None):
        raw = json.dumps(payload).encode('utf-8')
        try:
            request.send_response(status)
            request.send_header('Content-Type', 'application/json')
            request.send_header('Content-Length', str(len(raw)))
            for key, value in (headers or {}).items():
                request.send_header(key, value)
            request.end_headers()
            request.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass

    # -- the API ----------------------------------------------------------------------------------------
    def _route(self, method, path, query, body):
        parts = path.strip('/').split('/')
        if parts[0] == 'files':
            if method == 'POST' and len(parts) == 1:
                return self._create_file(body)
            if len(parts) == 2 and parts[1] in self.files:
                if method == 'GET':
                    return 200, self._read_file(parts[1])
                if method == 'DELETE':
                    del self.files[parts[1]]
                    return 200, {'id': parts[1], 'object': 'file', 'deleted': True}
            if len(parts) == 1 and method == 'GET':
                return 200, {'object': 'list', 'data': [self._file_view(f) for f in self.files.values()],
                             'has_more': False}
            return _error(404, 'No such File object: %s' % parts[-1], param='id')
        if parts[:2] == ['fine_tuning', 'jobs']:
            if len(parts) == 2 and method == 'POST':
                return self._create_job(body)
            if len(parts) == 2 and method == 'GET':  # newest first, metadata[k]=v filters
                jobs = [self._public(j) for j in reversed(list(self.jobs.values()))]
                for key, value in query.items():
                    if key.startswith('metadata[') and key.endswith(']'):
                        jobs = [j for j in jobs if (j.get('metadata') or {}).get(key[len('metadata['):-1]) == value]
                return 200, self._page(jobs, query)
            job = self.jobs.get(parts[2]) if len(parts) > 2 else None
            if job is None:
                return _error(404, 'Could not find fine-tune: %s' % (parts[2] if len(parts) > 2 else ''))
            action = parts[3] if len(parts) > 3 else None
            if action is None and method == 'GET':
                self._advance(job)
                return 200, self._public(job)
            if action == 'events':
                return 200, self._page(list(reversed(self.events[job['id']])), query)
            if action == 'checkpoints':
                return 200, self._page(list(reversed(self.checkpoints[job['id']])), query)
            if action == 'cancel' and method == 'POST':
                if job['status'] in ('succeeded', 'failed', 'cancelled'):
                    return _error(400, 'Job has already completed: %s' % job['id'])
                job['_cancel_in'] = self.cancel_delay_reads
                return 200, self._public(job)
        if parts == ['chat', 'completions'] and method == 'POST':
            return self._chat_completion(body)
        if parts[0] == 'models':
            models = [{'id': m, 'object': 'model', 'created': 1721172741, 'owned_by': 'system'} for m in BASE_MODELS]
            models += [{'id': j['fine_tuned_model'], 'object': 'model', 'created': j['finished_at'],
                        'owned_by': 'user-llmt'} for j in self.jobs.values() if j['fine_tuned_model']]
            if len(parts) == 1:
                return 200, {'object': 'list', 'data': models}
            for model in models:
                if model['id'] == parts[1]:
                    return 200, model
            return _error(404, 'The model %s does not exist' % parts[1], code='model_not_found')
        return _error(404, 'Unknown path %s' % path)

    def _chat_completion(self, body):
        """A non-streamed chat completion by a base model or a fine-tuned one this server made;
        usage counts words (a stand-in for tokens); max_tokens cuts the answer ("length")."""
        model = body['model']
        known = set(BASE_MODELS) | set(j['fine_tuned_model'] for j in self.jobs.values() if j['fine_tuned_model'])
        if model not in known:
            return _error(404, 'The model `%s` does not exist or you do not have access to it.' % model,
                          code='model_not_found', param='model')
        words = (self.chat_reply(model, body['messages']) or '').split()
        limit = body.get('max_completion_tokens') or body.get('max_tokens')
        finish = 'length' if limit and len(words) > limit else 'stop'
        words = words[:limit] if limit else words
        prompt_tokens = sum(len(str(m.get('content') or '').split()) for m in body['messages'])
        return 200, {'id': self._new_id('chatcmpl'), 'object': 'chat.completion', 'created': int(time.time()),
                     'model': model, 'choices': [{
                         'index': 0, 'finish_reason': finish, 'logprobs': None,
                         'message': {'role': 'assistant', 'content': ' '.join(words), 'refusal': None}}],
                     'usage': {'prompt_tokens': prompt_tokens, 'completion_tokens': len(words),
                               'total_tokens': prompt_tokens + len(words)}}

    def _create_file(self, fields):
        content = fields.get('file') or ''
        file_id = self._new_id('file')
        self.files[file_id] = {'id': file_id, 'object': 'file', 'bytes': len(content.encode('utf-8')),
                               'created_at': int(time.time()), 'filename': fields.get('_filename') or 'upload.jsonl',
                               'purpose': fields.get('purpose'), 'status': 'uploaded', 'content': content,
                               '_reads': 0}
        return 200, self._file_view(self.files[file_id])

    def _read_file(self, file_id):
        record = self.files[file_id]
        record['_reads'] += 1
        if record['status'] == 'uploaded' and record['_reads'] >= self.file_processing_reads:
            record['status'] = self.file_status_final
            if record['status'] == 'error':
                record['status_details'] = 'Invalid file format: line 3 is not valid JSON.'
        return self._file_view(record)

    @staticmethod
    def _file_view(record):
        return {k: v for k, v in record.items() if k != 'content' and not k.startswith('_')}

    def _create_job(self, body):
        training = self.files.get(body['training_file'])
        if training is None or training['status'] != 'processed':
            return _error(400, 'File %s is not ready' % body['training_file'], param='training_file',
                          code='invalid_training_file')
        if body['model'] not in BASE_MODELS:
            return _error(404, 'Model %s is not available for fine-tuning' % body['model'], param='model',
                          code='model_not_available')
        job_id = self._new_id('ftjob')
        method = body.get('method') or {'type': 'supervised', 'supervised': {}}
        hyper = dict({'n_epochs': 'auto', 'batch_size': 'auto', 'learning_rate_multiplier': 'auto'},
                     **(method.get(method['type'], {}).get('hyperparameters') or {}))
        lines = [line for line in training['content'].splitlines() if line.strip()]
        epochs = hyper['n_epochs'] if hyper['n_epochs'] != 'auto' else 3
        job = {
            'id': job_id, 'object': 'fine_tuning.job', 'created_at': int(time.time()), 'error': None,
            'fine_tuned_model': None, 'finished_at': None, 'model': body['model'], 'organization_id': 'org-llmt',
            'result_files': [], 'status': 'validating_files', 'trained_tokens': None,
            'training_file': body['training_file'], 'validation_file': body.get('validation_file'),
            'hyperparameters': {'n_epochs': epochs, 'batch_size': 1 if hyper['batch_size'] == 'auto' else hyper['batch_size'],
                                'learning_rate_multiplier': 1.8 if hyper['learning_rate_multiplier'] == 'auto'
                                else hyper['learning_rate_multiplier']},
            'seed': body.get('seed') if body.get('seed') is not None else 1234, 'estimated_finish': None,
            'integrations': None, 'metadata': body.get('metadata'), 'method': method,
            '_suffix': body.get('suffix'), '_step': 0, '_tokens': sum(len(l) // 4 for l in lines) * epochs,
            '_cancel_in': None, '_held': 0,
        }
        self.jobs[job_id] = job
        self.events[job_id] = []
        self.checkpoints[job_id] = []
        self._event(job, 'Validating training file: %s' % body['training_file'])
        self._event(job, 'Created fine-tuning job: %s' % job_id)
        return 200, self._public(job)

    def _event(self, job, message, level='info', data=None):
        event = {'object': 'fine_tuning.job.event', 'id': self._new_id('ftevent'), 'created_at': int(time.time()),
                 'level': level, 'message': message, 'type': 'metrics' if data else 'message', 'data': data or {}}
        self.events[job['id']].append(event)

    @staticmethod
    def _public(job):
        return {k: v for k, v in job.items() if not k.startswith('_')}

    def _page(self, items, query):
        if query.get('after'):
            ids = [item['id'] for item in items]
            items = items[ids.index(query['after']) + 1:] if query['after'] in ids else []
        limit = min(int(query.get('limit') or 20), self.max_page_size)
        return {'object': 'list', 'data': items[:limit], 'has_more': len(items) > limit}

    def _advance(self, job):
        """One retrieve moves the job one step along its life."""
        if job['_cancel_in'] is not None:
            if job['_cancel_in'] <= 0:
                job.update(status='cancelled', finished_at=int(time.time()), _cancel_in=None, estimated_finish=None)
                self._event(job, 'Fine-tuning job cancelled')
                return
            job['_cancel_in'] -= 1
        status = job['status']
        if status == 'validating_files':
            job['status'] = 'queued'
            self._event(job, 'Files validated, moving job to queued state')
        elif status == 'queued':
            job['status'] = 'running'
            job['estimated_finish'] = int(time.time()) + 600
            self._event(job, 'Fine-tuning job started')
        elif status in ('running',) + ((self.hold_status,) if self.hold_status else ()):
            if self.hold_status and job['_held'] < self.hold_reads:
                job['_held'] += 1
                job['status'] = self.hold_status
                return
            job['status'] = 'running'
            for _ in range(self.steps_per_read):
                if job['_step'] >= self.total_steps:
                    break
                job['_step'] += 1
                step = job['_step']
                data = {'step': step, 'train_loss': round(2.0 / step, 4),
                        'train_mean_token_accuracy': round(0.5 + step / 40.0, 4), 'total_steps': self.total_steps}
                if step % 5 == 0:
                    data.update(valid_loss=round(2.2 / step, 4), valid_mean_token_accuracy=0.6)
                self._event(job, 'Step %d/%d: training loss=%.4f' % (step, self.total_steps, data['train_loss']),
                            data=data)
                if step % 5 == 0:
                    self._checkpoint(job, step, data)
            if job['_step'] >= self.total_steps:
                self._finish(job)

    def _checkpoint(self, job, step, data):
        ref = 'ft:%s:llmt-test:%s:%s:ckpt-step-%d' % (job['model'], job['_suffix'] or '', job['id'][-6:], step)
        self.checkpoints[job['id']].append({
            'object': 'fine_tuning.job.checkpoint', 'id': self._new_id('ftckpt'), 'created_at': int(time.time()),
            'fine_tuned_model_checkpoint': ref, 'fine_tuning_job_id': job['id'], 'step_number': step,
            'metrics': {'step': step, 'train_loss': data['train_loss'],
                        'train_mean_token_accuracy': data['train_mean_token_accuracy']}})

    def _finish(self, job):
        job['finished_at'] = int(time.time())
        job['estimated_finish'] = None
        if self.outcome == 'failed':
            job['status'] = 'failed'
            job['error'] = {'code': 'invalid_training_file', 'param': 'training_file',
                            'message': 'The job failed due to an invalid training file.'}
            self._event(job, 'The job failed due to an invalid training file.', level='error')
            return
        job['status'] = 'succeeded'
        job['trained_tokens'] = job['_tokens']
        job['fine_tuned_model'] = 'ft:%s:llmt-test:%s:%s' % (job['model'], job['_suffix'] or '', job['id'][-6:])
        job['result_files'] = [self._new_id('file')]
        self._event(job, 'New fine-tuned model created: %s' % job['fine_tuned_model'])
        self._event(job, 'The job has successfully completed')
