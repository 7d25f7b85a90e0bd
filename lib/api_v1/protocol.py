"""The inbound OpenAI-compatible API, the parts that need neither Odoo nor HTTP: ids, the status
mapping, object serializers (plain dicts in, OpenAI's objects out), request checks and the one
error builder. The controller (controllers/openai_api.py) reads records into the plain dicts
these functions take, so the protocol lives here and is tested alone (tests/test_openai_api_lib.py).

Shapes follow ../shared/reference/openai-fine-tuning-openapi.json and
openai-chat-completions-openapi.json.
"""
import calendar
import hashlib
import json
import os
import re
import time

from ..jobs.hyperparameters import parse_extra
from ..providers.openai_mapping import SUFFIX_MAX  # OpenAI's own limit, which we serve too

KEY_PREFIX = 'sk-llmt-'
KEY_PREFIX_SHOWN = 12  # characters of a key kept readable, to tell keys apart in lists

# our job state -> OpenAI's status (only the schema's values). A draft (made in the UI, never
# submitted) has not been validated yet: validating_files is the nearest truthful status.
JOB_STATUS = {
    'draft': 'validating_files',
    'validating': 'validating_files',
    'preparing': 'queued',
    'queued': 'queued',
    'training': 'running',
    'completed': 'succeeded',
    'failed': 'failed',
    'cancelled': 'cancelled',
}
# dataset state -> OpenAI file status
FILE_STATUS = {'draft': 'uploaded', 'valid': 'processed', 'invalid': 'error'}
EVENT_LEVEL = {'info': 'info', 'warning': 'warn', 'error': 'error'}

# the hyperparameters OpenAI's API names, with "auto" allowed; any other alias of
# lib/jobs/hyperparameters.py is accepted too (our trainers' own settings)
OPENAI_HYPERPARAMETERS = ('n_epochs', 'batch_size', 'learning_rate_multiplier', 'beta')
METHOD_TYPES = ('supervised', 'dpo', 'reinforcement')
METADATA_MAX_KEYS, METADATA_KEY_MAX, METADATA_VALUE_MAX = 16, 64, 512
MAX_N = 8  # chat answers to one request (the model server decodes them side by side)
DEFAULT_LIMIT, MAX_LIMIT = 20, 100

ERROR_TYPES = {400: 'invalid_request_error', 401: 'invalid_request_error', 403: 'permission_error',
               404: 'invalid_request_error', 409: 'invalid_request_error', 413: 'invalid_request_error',
               429: 'rate_limit_exceeded', 500: 'server_error', 503: 'server_error'}


# OpenAI names some errors' type after their code rather than their status.
ERROR_TYPES_BY_CODE = {'insufficient_quota': 'insufficient_quota'}


class ApiError(Exception):
    """A refused request: its HTTP status and OpenAI's error object."""

    def __init__(self, status, message, param=None, code=None, headers=None):
        super(ApiError, self).__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or []

    def body(self):
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status, message, param=None, code=None):
    """The one place error objects are built: {"error": {message, type, param, code}}."""
    return {'error': {'message': message,
                      'type': ERROR_TYPES_BY_CODE.get(code) or ERROR_TYPES.get(status, 'invalid_request_error'),
                      'param': param, 'code': code}}


# an absolute path of two parts or more (/home/u/x, /srv/llm/job-3/result), not inside a URL or word
_PATH = re.compile(r'(?<![\w.:/~-])(?:/[\w.@+~-]+){2,}/?')


def without_paths(text):
    """`text` with every absolute server path replaced by <path>: messages from the models and the
    trainer are written for the UI (where managers see the folders); over the API they go out
    without them (the log keeps the whole message)."""
    return _PATH.sub('<path>', text) if text else text


def not_found(kind, ident, param=None):
    return ApiError(404, 'No %s found with id %r.' % (kind, ident), param=param, code=re.sub('[^a-z]+', '_', kind) + '_not_found')


# -- keys ----------------------------------------------------------------------------------------
def hash_key(key):
    """What is stored of a key: a key is 32 random bytes, so a plain SHA-256 cannot be reversed
    or guessed (a slow password hash would only slow every request)."""
    return hashlib.sha256(key.encode('utf-8')).hexdigest()


def bearer_key(header):
    """The key of an `Authorization: Bearer <key>` header, or None."""
    match = re.match(r'^\s*Bearer\s+(\S+)\s*$', header or '', re.I)
    return match.group(1) if match else None


# -- ids -------------------------------------------------------------------------------------------
def parse_id(prefix, ident):
    """'ftjob-12' -> 12 for prefix 'ftjob-'; None when it is not one of ours."""
    if not isinstance(ident, str) or not ident.startswith(prefix) or not ident[len(prefix):].isdigit():
        return None
    return int(ident[len(prefix):])


def job_id(record_id):
    return 'ftjob-%d' % record_id


def file_id(record_id):
    return 'file-%d' % record_id


def event_id(record_id):
    return 'ftevent-%d' % record_id


def slug(text):
    return re.sub(r'[^a-z0-9]+', '-', (text or '').lower()).strip('-') or 'org'


def base_model_id(model_ref, name):
    """A base model's API id: its technical id when that is a name (gpt-4o-mini,
    SmolLM2-135M-Instruct, Qwen/Qwen2.5-0.5B), the slug of its name when the technical id is a
    folder path (never shown) or holds a ':' (the separator of fine-tuned ids)."""
    model_ref = model_ref or ''
    if not model_ref or os.path.isabs(model_ref) or ':' in model_ref:
        return slug(name)
    return model_ref


def fine_tuned_model_id(model_ref, base_name, org, suffix, version, step=None):
    """OpenAI's form ft:<base model name>:<org>:<suffix>:<version>, with :ckpt-step-<n> for a
    checkpoint. A model OpenAI made keeps its own id; ours (a folder on our side) get a name: the
    base model's API id, the company, the suffix and the version of that line (1, 2, ...)."""
    if (model_ref or '').startswith('ft:'):
        return model_ref
    ident = 'ft:%s:%s:%s:%d' % (base_name, slug(org), slug(suffix) if suffix else '', version)
    return ident + (':ckpt-step-%d' % step if step is not None else '')


def fine_tuned_version(model_id):
    """The version at the end of one of our ft: ids (not a checkpoint's), or None."""
    parts = (model_id or '').split(':')
    if len(parts) >= 5 and parts[0] == 'ft' and parts[-1].isdigit():
        return int(parts[-1])
    return None


def unix(value):
    """Odoo 11 datetime string (UTC) -> unix seconds; None stays None."""
    if not value:
        return None
    return calendar.timegm(time.strptime(value[:19], '%Y-%m-%d %H:%M:%S'))


# -- serializers (plain dicts in) --------------------------------------------------------------------
def hyperparameters_out(job):
    """OpenAI's hyperparameters object; 0 in our fields is "auto"."""
    out = {'n_epochs': job['epochs'] or 'auto', 'batch_size': job['batch_size'] or 'auto',
           'learning_rate_multiplier': job['learning_rate_multiplier'] or 'auto'}
    if job.get('method') == 'dpo':
        out['beta'] = job.get('dpo_beta') or 'auto'
    return out


def job_object(job):
    """fine_tuning.job from a dict with: id, created_at, state, model, fine_tuned_model,
    training_file, validation_file, epochs, batch_size, learning_rate_multiplier, seed,
    trained_tokens, error_message, finished_at, estimated_finish, organization_id, method,
    metadata, suffix."""
    status = JOB_STATUS[job['state']]
    hyper = hyperparameters_out(job)
    method = job.get('method') or 'supervised'
    error = None
    if status == 'failed':
        message = without_paths(job.get('error_message') or 'The job failed.').strip()
        file_problem = message.startswith('Dataset ')
        error = {'code': 'invalid_training_file' if file_problem else 'training_failed', 'message': message,
                 'param': 'training_file' if file_problem else None}
    return {
        'object': 'fine_tuning.job',
        'id': job_id(job['id']),
        'created_at': unix(job['created_at']),
        'error': error,
        'fine_tuned_model': job.get('fine_tuned_model') if status == 'succeeded' else None,
        'finished_at': unix(job.get('finished_at')) if status in ('succeeded', 'failed', 'cancelled') else None,
        'hyperparameters': hyper,
        'model': job['model'],
        'organization_id': job['organization_id'],
        'result_files': [],
        'status': status,
        'trained_tokens': job.get('trained_tokens') if status == 'succeeded' else None,
        'training_file': job['training_file'],
        'validation_file': job.get('validation_file'),
        'integrations': [],
        'seed': job['seed'],
        'estimated_finish': unix(job.get('estimated_finish')) if status == 'running' else None,
        'method': {'type': method, method: {'hyperparameters': hyper}},
        'metadata': job.get('metadata') or None,
        'user_provided_suffix': job.get('suffix') or None,
    }


def file_object(dataset):
    """file from a dict with: id, created_at, state, filename, bytes, report."""
    status = FILE_STATUS[dataset['state']]
    out = {'object': 'file', 'id': file_id(dataset['id']), 'bytes': dataset['bytes'] or 0,
           'created_at': unix(dataset['created_at']), 'filename': dataset['filename'],
           'purpose': 'fine-tune', 'status': status}
    if status == 'error':
        out['status_details'] = without_paths(dataset.get('report') or '')[:2000]
    return out


def event_object(event):
    data = event.get('data')
    out = {'object': 'fine_tuning.job.event', 'id': event_id(event['id']), 'created_at': unix(event['event_time']),
           'level': EVENT_LEVEL.get(event['level'], 'info'), 'message': without_paths(event['message']),
           'type': 'metrics' if data and 'step' in data else 'message'}
    if data:
        out['data'] = data
    return out


def checkpoint_object(job_record_id, step, model_id, metrics, created_at):
    return {'object': 'fine_tuning.job.checkpoint', 'id': 'ftckpt-%d-%d' % (job_record_id, step),
            'created_at': created_at, 'fine_tuned_model_checkpoint': model_id, 'step_number': step,
            'metrics': metrics, 'fine_tuning_job_id': job_id(job_record_id)}


def model_object(model_id, created, owned_by):
    return {'id': model_id, 'object': 'model', 'created': created, 'owned_by': owned_by}


def page(items, has_more):
    """A cursor page (jobs, events, checkpoints); files add first_id/last_id."""
    return {'object': 'list', 'data': items, 'has_more': has_more}


def limit_param(value, default=DEFAULT_LIMIT):
    if value in (None, ''):
        return default
    try:
        limit = int(value)
    except (TypeError, ValueError):
        raise ApiError(400, 'limit must be an integer, not %r.' % value, param='limit', code='invalid_value')
    if not 1 <= limit <= MAX_LIMIT:
        raise ApiError(400, 'limit must be between 1 and %d.' % MAX_LIMIT, param='limit', code='invalid_value')
    return limit


def metadata_filter(query):
    """{k: v} from query arguments metadata[k]=v."""
    return {name[len('metadata['):-1]: value for name, value in query.items()
            if name.startswith('metadata[') and name.endswith(']')}


# -- requests --------------------------------------------------------------------------------------
def json_body(raw):
    """The request's JSON object, or a 400."""
    try:
        body = json.loads(raw.decode('utf-8') if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, 'We could not parse the JSON body of your request (%s).' % e, code='invalid_json')
    if not isinstance(body, dict):
        raise ApiError(400, 'The request body must be a JSON object.', code='invalid_json')
    return body


def check_metadata(metadata):
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > METADATA_MAX_KEYS or not all(
            isinstance(k, str) and len(k) <= METADATA_KEY_MAX and isinstance(v, str) and len(v) <= METADATA_VALUE_MAX
            for k, v in metadata.items()):
        raise ApiError(400, 'metadata must be an object of at most %d string keys (%d characters) with string values '
                            '(%d characters).' % (METADATA_MAX_KEYS, METADATA_KEY_MAX, METADATA_VALUE_MAX),
                       param='metadata', code='invalid_value')
    return metadata


def job_request(body):
    """The checked parts of a create-job request, before anything is looked up or created:
    {'model', 'training_file', 'validation_file', 'method', 'settings' (canonical names),
    'suffix', 'seed', 'metadata'}. Raises ApiError naming the parameter."""
    for name in ('model', 'training_file'):
        if not isinstance(body.get(name), str) or not body[name]:
            raise ApiError(400, 'Missing required parameter: %r.' % name, param=name, code='missing_required_parameter')
    validation_file = body.get('validation_file')
    if validation_file is not None and not isinstance(validation_file, str):
        raise ApiError(400, 'validation_file must be a file id.', param='validation_file', code='invalid_value')
    method = body.get('method') or {'type': 'supervised'}
    if not isinstance(method, dict) or method.get('type') not in METHOD_TYPES:
        raise ApiError(400, 'method.type must be one of %s.' % ', '.join(METHOD_TYPES), param='method.type',
                       code='invalid_value')
    method_type = method['type']
    hyper_param = 'method.%s.hyperparameters' % method_type
    hyper = (method.get(method_type) or {}).get('hyperparameters') if isinstance(method.get(method_type), dict) else None
    if hyper is None and body.get('hyperparameters') is not None:  # the deprecated top-level form
        hyper, hyper_param = body['hyperparameters'], 'hyperparameters'
    hyper = hyper or {}
    if not isinstance(hyper, dict):
        raise ApiError(400, '%s must be an object.' % hyper_param, param=hyper_param, code='invalid_value')
    if method_type != 'dpo' and 'beta' in hyper:
        raise ApiError(400, 'beta is a dpo hyperparameter.', param=hyper_param + '.beta', code='invalid_value')
    for name in ('n_epochs', 'batch_size'):
        if isinstance(hyper.get(name), int) and not isinstance(hyper[name], bool) and hyper[name] < 1:
            raise ApiError(400, '%s must be at least 1 or "auto".' % name, param='%s.%s' % (hyper_param, name),
                           code='invalid_value')
    try:
        settings = parse_extra(json.dumps(hyper))
    except ValueError as e:
        raise ApiError(400, str(e)[0].upper() + str(e)[1:] + '.', param=hyper_param, code='invalid_hyperparameter')
    suffix = body.get('suffix')
    if suffix is not None and (not isinstance(suffix, str) or len(suffix) > SUFFIX_MAX):
        raise ApiError(400, 'suffix must be a string of at most %d characters.' % SUFFIX_MAX, param='suffix',
                       code='invalid_value')
    seed = body.get('seed')
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= 2 ** 31 - 1):
        raise ApiError(400, 'seed must be an integer from 0 to 2147483647.', param='seed', code='invalid_value')
    unknown = set(body) - {'model', 'training_file', 'validation_file', 'method', 'hyperparameters', 'suffix', 'seed',
                           'metadata', 'integrations'}
    if unknown:
        raise ApiError(400, 'Unrecognized request argument supplied: %s.' % ', '.join(sorted(unknown)),
                       param=sorted(unknown)[0], code='unknown_parameter')
    if body.get('integrations'):
        raise ApiError(400, 'Integrations (Weights and Biases) are not supported by this server.',
                       param='integrations', code='unsupported_parameter')
    return {'model': body['model'], 'training_file': body['training_file'], 'validation_file': validation_file,
            'method': method_type, 'method_param': hyper_param, 'settings': settings, 'suffix': suffix,
            'seed': seed, 'metadata': check_metadata(body.get('metadata'))}


def sniff_jsonl(head):
    """'chat' or 'preference' from the first complete line of an upload, or an ApiError: a cheap
    check that refuses what is not JSONL at once; the full validation runs after the upload."""
    text = head.decode('utf-8', 'replace').lstrip('\ufeff')
    line = next((l for l in text.split('\n') if l.strip()), None)
    if line is None:
        raise ApiError(400, 'The file is empty.', param='file', code='invalid_file')
    try:
        first = json.loads(line)
    except ValueError:
        if '\n' not in text.strip() and len(head) >= 65536:
            return 'chat'  # a first line longer than what was read: the full validation decides
        raise ApiError(400, 'Invalid file format: the file must be JSON Lines (one JSON object per line); its first '
                            'line is not JSON.', param='file', code='invalid_file_format')
    if not isinstance(first, dict):
        raise ApiError(400, 'Invalid file format: each line must be a JSON object.', param='file',
                       code='invalid_file_format')
    return 'preference' if 'preferred_output' in first else 'chat'


# -- chat completions -----------------------------------------------------------------------------------
def chat_request(body):
    """(model, messages, options, stream, include_usage) of a chat completion request."""
    if not isinstance(body.get('model'), str) or not body['model']:
        raise ApiError(400, "Missing required parameter: 'model'.", param='model', code='missing_required_parameter')
    messages = body.get('messages')
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "Missing required parameter: 'messages'.", param='messages',
                       code='missing_required_parameter')
    plain = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get('role') not in ('system', 'developer', 'user', 'assistant'):
            raise ApiError(400, 'messages[%d]: role must be system, developer, user or assistant.' % index,
                           param='messages[%d].role' % index, code='invalid_value')
        content = message.get('content')
        if isinstance(content, list):  # text parts only
            if not all(isinstance(p, dict) and p.get('type') == 'text' for p in content):
                raise ApiError(400, 'messages[%d]: only text content is supported.' % index,
                               param='messages[%d].content' % index, code='invalid_value')
            content = ''.join(p.get('text') or '' for p in content)
        if not isinstance(content, str):
            raise ApiError(400, 'messages[%d]: content must be text.' % index, param='messages[%d].content' % index,
                           code='invalid_value')
        plain.append({'role': 'system' if message['role'] == 'developer' else message['role'], 'content': content})
    n = body.get('n')
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N):
        raise ApiError(400, 'n must be an integer from 1 to %d.' % MAX_N, param='n', code='invalid_value')
    if n and n > 1 and body.get('stream'):
        raise ApiError(400, 'n above 1 is answered whole: it cannot be streamed by this server.', param='n',
                       code='unsupported_parameter')
    for name in ('tools', 'functions', 'logprobs', 'response_format', 'audio'):
        if body.get(name):
            raise ApiError(400, '%s is not supported by this server.' % name, param=name, code='unsupported_parameter')
    options = {}
    max_tokens = body.get('max_completion_tokens', body.get('max_tokens'))
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ApiError(400, 'max_tokens must be a positive integer.', param='max_tokens', code='invalid_value')
        options['max_tokens'] = max_tokens
    for name, low, high in (('temperature', 0.0, 2.0), ('top_p', 0.0, 1.0)):
        value = body.get(name)
        if value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
                raise ApiError(400, '%s must be a number from %s to %s.' % (name, low, high), param=name,
                               code='invalid_value')
            options[name] = float(value)
    options.setdefault('temperature', 1.0)  # OpenAI's default: sampled (the model server's own is greedy)
    stop = body.get('stop')
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, 'stop must be a string or a list of at most 4 strings.', param='stop',
                           code='invalid_value')
        options['stop'] = stop
    if n and n > 1:
        options['n'] = n  # the samples decode side by side in the model server's batch
    if body.get('seed') is not None:
        if not isinstance(body['seed'], int) or isinstance(body['seed'], bool):
            raise ApiError(400, 'seed must be an integer.', param='seed', code='invalid_value')
        options['seed'] = body['seed']
    stream = bool(body.get('stream'))
    include_usage = bool(stream and (body.get('stream_options') or {}).get('include_usage'))
    return body['model'], plain, options, stream, include_usage


def completion_object(completion_id, created, model, result):
    """chat.completion from the adapter's {'text', 'finish_reason', 'prompt_tokens', 'completion_tokens'}
    (and, for n > 1, 'choices': [{'text', 'finish_reason'}])."""
    answers = result.get('choices') or [result]
    return {'id': completion_id, 'object': 'chat.completion', 'created': created, 'model': model,
            'choices': [{'index': i, 'message': {'role': 'assistant', 'content': a['text'], 'refusal': None},
                         'logprobs': None, 'finish_reason': a.get('finish_reason') or 'stop'}
                        for i, a in enumerate(answers)],
            'usage': usage(result)}


def usage(result):
    prompt, completion = result.get('prompt_tokens') or 0, result.get('completion_tokens') or 0
    return {'prompt_tokens': prompt, 'completion_tokens': completion, 'total_tokens': prompt + completion}


def chunk_object(completion_id, created, model, delta=None, finish_reason=None, with_usage=None, usage_chunk=None):
    """chat.completion.chunk: a delta, the finishing chunk, or (include_usage) the usage chunk with
    no choices. `with_usage`: include_usage was asked, so every other chunk says usage: null."""
    chunk = {'id': completion_id, 'object': 'chat.completion.chunk', 'created': created, 'model': model}
    if usage_chunk is not None:
        chunk.update(choices=[], usage=usage_chunk)
        return chunk
    chunk['choices'] = [{'index': 0, 'delta': delta if delta is not None else {}, 'logprobs': None,
                         'finish_reason': finish_reason}]
    if with_usage:
        chunk['usage'] = None
    return chunk


def sse(data):
    """One server-sent event of a JSON object (or the final [DONE])."""
    return ('data: %s\n\n' % (data if isinstance(data, str) else json.dumps(data))).encode('utf-8')
