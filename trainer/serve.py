"""A persistent local model server: one base model kept loaded, LoRA adapters swapped on it.

    python -m trainer.serve --port 0 --state-file RUN_DIR/server.json --allowed-root DIR [--allowed-root DIR2]
                            [--max-adapters 8] [--max-waiting 4] [--read-timeout 30] [--max-batch 8]
                            [--idle-unload 900] [--max-memory-mb MB] [--engine auto|transformers|llamacpp]
                            [--embed-precision auto|fp32|bf16]

Listens on 127.0.0.1 only (stdlib ThreadingHTTPServer). `--port 0` lets the OS choose; the chosen
port is written with the pid to the state file (atomically) once the socket listens, which is how
lib/serving/model_server.py finds it. Requests are answered in threads; their generations decode together
in one batch (trainer/batching.py: continuous batching, up to --max-batch rows, rows of different
LoRA adapters of one base side by side): one forward pass over 8 rows costs little more than over
one, since decoding is bound by reading the weights. Several base models stay loaded while their
weights fit in --max-memory-mb (unset: one at a time); one unused for --idle-unload seconds is
unloaded, and loaded again by the next request that needs it.

Loopback is shared by every local user and process, so the server trusts none of them:
- a random token is made at start and written, mode 0600, to `server.token` beside the state file
  (or --token-file) before the state file appears; every request must send it as
  `Authorization: Bearer <token>` (/health and /shutdown included), else 401 and nothing else;
- it serves model folders (and an adapter's base) only under the --allowed-root folders, checked
  on the real path (no root: nothing is served); any other folder is refused with 403;
- each connection has a read timeout (--read-timeout): a client that stops sending is dropped;
- at most --max-waiting requests wait for a row of the batch; one more is answered 503 with
  Retry-After at once, instead of holding its caller for minutes;
- a client that closes its connection loses its row at the loop's next step.

    GET  /health     {"status": "ok", "pid", "loaded": {"base", "adapters"} (the last used), "allowed_roots": [...],
                      "models": [{"base", "kind", "adapters", "mb"}] (all loaded), "loads", "unloaded":
                      [{"base", "reason" ("idle for N s", "room for ..."), "at"}] (the last few),
                      "engine": {"rows", "waiting", "max_batch", "max_queue", "idle_unload", "max_memory_mb", "stats",
                                 "setting" (--engine), "on_cuda", "llamacpp": {"rows", "waiting", "models", ...}},
                      "embed": {"precision_setting" (--embed-precision), "large_batches": {model: its choice}}}
    POST /chat       {"model": folder, "messages": [...], "max_tokens", "temperature" (0: greedy),
                      "top_p", "stop": [str], "seed", "stream", "max_seconds" (the answer ends
                      with "length" that long after the request arrived, waiting included),
                      "n" (answers, 1 to 8, not streamed; sample i uses seed + i)}
                     -> {"text", "finish_reason": "stop"|"length", "prompt_tokens", "completion_tokens"}
                     (n > 1: also "choices": [{"text", "finish_reason", "completion_tokens"}], the
                     first one's in "text", completion_tokens summed)
                     stream: one JSON object per line, {"delta": "..."} ..., then
                     {"finish_reason", "prompt_tokens", "completion_tokens"} (or {"error"} mid-way)
    POST /embed      {"model": name, "input": [str], "input_type": "passage" | "query"}
                     -> {"data": [[float]], ...} (trainer/knowledge/embed.py)
    POST /shutdown   answers, then exits; SIGTERM does the same

A model folder is either a full model (config.json: loaded as the base, replacing the loaded one)
or a LoRA adapter (adapter_config.json naming its base in base_model_name_or_path: the base is
loaded if it is not, the adapter is loaded on it by name and at most `--max-adapters` stay, least
recently used evicted). Errors are {"error": "..."} with 400 (bad request), 401 (no token), 403
(folder outside the allowed roots), 404 (no such model folder), 503 (busy: Retry-After) or 500.
"""
import argparse
import collections
import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import job_files


class ClientGone(Exception):
    """The caller went away (closed its connection): its row was dropped."""

DEFAULT_MAX_TOKENS = 256
MAX_BODY = 4 * 1024 * 1024
MAX_STOP_STRINGS = 8
MAX_N = 8  # answers to one request at most (they decode side by side in the batch)
TOKEN_FILE = 'server.token'
BUSY_RETRY_AFTER = 5  # seconds a refused caller is told to wait


class RequestError(Exception):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


# -- the request ------------------------------------------------------------------------------------
def parse_chat_request(body):
    """Check a /chat body and return it with defaults; RequestError (400) says what is wrong."""
    if not isinstance(body, dict):
        raise RequestError('the body must be a JSON object')
    model = body.get('model')
    if not isinstance(model, str) or not model:
        raise RequestError('"model" must be a model folder path')
    messages = body.get('messages')
    if not isinstance(messages, list) or not messages:
        raise RequestError('"messages" must be a non-empty list')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get('role'), str) \
                or not isinstance(message.get('content'), str):
            raise RequestError('messages[%d] must have a string "role" and "content"' % i)
    max_tokens = body.get('max_tokens')
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError('"max_tokens" must be a positive integer or null')
    temperature = body.get('temperature')
    temperature = 0.0 if temperature is None else temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise RequestError('"temperature" must be a number from 0 to 2')
    top_p = body.get('top_p')
    top_p = 1.0 if top_p is None else top_p
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise RequestError('"top_p" must be a number in (0, 1]')
    stop = body.get('stop')
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or \
            not all(isinstance(s, str) and s for s in stop):
        raise RequestError('"stop" must be a non-empty string or a list of at most %d' % MAX_STOP_STRINGS)
    seed = body.get('seed')
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError('"seed" must be an integer or null')
    max_seconds = body.get('max_seconds')
    if max_seconds is not None and (isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float))
                                    or max_seconds <= 0):
        raise RequestError('"max_seconds" must be a positive number or null')
    n = body.get('n')
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise RequestError('"n" must be an integer from 1 to %d' % MAX_N)
    if n > 1 and body.get('stream'):
        raise RequestError('"n" above 1 is answered whole, not streamed')
    return {'model': model, 'messages': messages, 'max_tokens': max_tokens, 'temperature': float(temperature),
            'top_p': float(top_p), 'stop': stop, 'seed': seed, 'stream': bool(body.get('stream')), 'n': n,
            'deadline': time.monotonic() + max_seconds if max_seconds else None}


# -- stop strings -----------------------------------------------------------------------------------
class StopText(object):
    """Turns the growing decoded text into deltas that never show a stop string, even in part:
    text that could still be the start of a stop string is held back until it cannot."""

    def __init__(self, stop):
        self.stop = list(stop)
        self.sent = 0
        self.stopped = False

    def feed(self, text, final=False):
        """The delta to send now for the whole decoded text so far ('' when nothing is safe yet)."""
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            end = cut
        elif final:
            end = len(text)
        else:
            end = len(text) - self._held_back(text)
        if end <= self.sent:
            return ''
        delta, self.sent = text[self.sent:end], end
        return delta

    def _held_back(self, text):
        """Length of the longest end of `text` that begins some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if s.startswith(text[-n:]):
                    longest = n
                    break
        return longest


class DeltaStreamer(object):
    """A transformers streamer (put/end, called by `generate`) that decodes the new tokens and
    hands safe deltas to `emit`; it raises the flag its stopping criterion reads when a stop string
    appears, so generation ends at the next step."""

    def __init__(self, tokenizer, stop, emit):
        self.tokenizer = tokenizer
        self.text = StopText(stop)
        self.emit = emit
        self.ids = []
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # generate() first pushes the prompt
            self.prompt_seen = True
            return
        if self.text.stopped:
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith('\ufffd'):  # a character cut between tokens: wait for its other bytes
            return
        delta = self.text.feed(text)
        if delta:
            self.emit(delta)

    def end(self):
        if not self.text.stopped:
            delta = self.text.feed(self.tokenizer.decode(self.ids, skip_special_tokens=True), final=True)
            if delta:
                self.emit(delta)


# -- the models -------------------------------------------------------------------------------------
def check_allowed(path, roots):
    """The real path of `path` if it lies under one of `roots` (real paths; None: no check, for
    a cache used in-process); RequestError 403 else."""
    real = os.path.realpath(path)
    if roots is not None and not any(os.path.commonpath([real, root]) == root for root in roots):
        raise RequestError('model folder %s is outside the folders this server serves' % path, 403)
    return real


def model_kind(path, roots):
    """('adapter', base folder) or ('full', path); RequestError 403 when `path` or an adapter's
    base lies outside `roots`, 404 when `path` is no model folder."""
    path = check_allowed(path, roots)
    adapter_config = os.path.join(path, 'adapter_config.json')
    if os.path.isfile(adapter_config):
        with open(adapter_config) as f:
            base = json.load(f).get('base_model_name_or_path')
        if not base or not os.path.isfile(os.path.join(base, 'config.json')):
            raise RequestError('adapter %s names base model %r, which is not a model folder here' % (path, base), 404)
        return 'adapter', check_allowed(base, roots)
    if os.path.isfile(os.path.join(path, 'config.json')):
        return 'full', path
    raise RequestError('no model folder at %s (no config.json or adapter_config.json)' % path, 404)


def folder_version(path):
    """Changes when the folder's weights are rewritten, so a retrained folder is loaded again."""
    stamps = []
    for name in sorted(os.listdir(path)):
        if name.endswith(('.safetensors', '.bin', '.json')):
            stamps.append('%s:%s' % (name, os.stat(os.path.join(path, name)).st_mtime_ns))
    return hashlib.sha1('|'.join([path] + stamps).encode()).hexdigest()[:16]


class LoadedModel(object):
    """One base model in memory, its LoRA adapters loaded on it by name (least recent first),
    the rows decoding on it now (the engine's) and when it was last used."""

    def __init__(self, base, version, model, kind):
        self.base, self.version, self.model, self.kind = base, version, model, kind
        self.adapters = collections.OrderedDict()  # adapter name -> folder
        self.in_use = {}  # id of a row decoding on it -> its adapter name (or None)
        self.last_used = time.monotonic()
        self.bytes = sum(p.numel() * p.element_size() for p in model.parameters())


# How each kind of model is loaded: the chat models here; another kind (an embedding model) adds
# its loader and shares the memory bound.
LOADERS = {'causal-lm': lambda path, dtype: _from_pretrained('AutoModelForCausalLM', path, dtype)}


def _from_pretrained(auto_class, path, dtype):
    import transformers
    options = {} if dtype is None else {'dtype': dtype}
    model = getattr(transformers, auto_class).from_pretrained(path, **options)
    model.eval()
    return model


class ModelCache(object):
    """Base models in memory, several at once while their weights fit in `max_memory_mb` (least
    recently used, not decoding, unloaded first; one model is always allowed), each with up to
    `max_adapters` LoRA adapters loaded on it by name, least recently used evicted. Used by one
    thread at a time (the engine's loop, or a caller holding the server's lock)."""

    def __init__(self, max_adapters=8, roots=None, max_memory_mb=None, dtype=None):
        self.max_adapters = max_adapters
        self.roots = None if roots is None else [os.path.realpath(root) for root in roots]
        self.max_memory = max_memory_mb * 2 ** 20 if max_memory_mb else None
        self.dtype = dtype  # None: the checkpoint's own
        self.entries = collections.OrderedDict()  # base folder -> LoadedModel, least recent first
        self.tokenizers = collections.OrderedDict()  # folder -> tokenizer (a few)
        self.loads = 0
        self.unloaded = []  # the last few unloads: {'base', 'reason', 'at'}
        self.loaded = {'base': None, 'adapters': []}  # a snapshot /health reads without the lock
        self.models = []  # likewise, every loaded model

    def describe(self):
        return self.loaded

    def get(self, path):
        """(model to call generate on, tokenizer, adapter name or None) for a model folder; the
        model has that adapter active, or its adapters disabled when adapter name is None."""
        entry, tokenizer, name = self.entry(path)
        return entry.model, tokenizer, name

    def entry(self, path, busy=(), now=None, kind='causal-lm'):
        """(LoadedModel, tokenizer, adapter name or None) for a model folder, loading what is
        missing; (None, None, None) when its base is not loaded and there is no room for it
        while the bases in `busy` decode."""
        path = os.path.realpath(path)
        what, base = model_kind(path, self.roots)
        entry = self._load_base(base, busy, kind)
        if entry is None:
            return None, None, None
        entry.last_used = time.monotonic() if now is None else now
        name = None
        if what == 'adapter':
            name = 'a' + folder_version(path)
            self._load_adapter(entry, name, path)
        self._snapshot(entry)
        return entry, self._tokenizer(path if _has_tokenizer(path) else base), name

    def unload(self, base, reason):
        entry = self.entries.pop(base, None)
        if entry is not None:
            self.unloaded = (self.unloaded + [{'base': base, 'reason': reason, 'at': time.time()}])[-5:]
            self._snapshot(None)

    def _snapshot(self, entry):
        if entry is not None:
            self.loaded = {'base': entry.base, 'adapters': list(entry.adapters.values())}  # replaced whole
        elif self.loaded['base'] not in self.entries:
            self.loaded = {'base': None, 'adapters': []}
        self.models = [{'base': e.base, 'kind': e.kind, 'adapters': list(e.adapters.values()),
                        'mb': round(e.bytes / 2 ** 20)} for e in self.entries.values()]

    def _load_base(self, base, busy, kind):
        version = folder_version(base)
        entry = self.entries.get(base)
        if entry is not None and entry.version == version and entry.kind == kind:
            self.entries.move_to_end(base)
            return entry
        if entry is not None:  # retrained (or another kind): load it again
            if base in busy:
                return None
            self.unload(base, 'changed on disk')
        need = _weights_size(base) if self.max_memory else 0
        while self.entries and (not self.max_memory  # no bound set: one model at a time
                                or sum(e.bytes for e in self.entries.values()) + need > self.max_memory):
            idle = [b for b in self.entries if b not in busy]
            if not idle:
                return None  # wait for a running batch to finish
            self.unload(idle[0], 'room for %s (memory bound %s MB)' % (base, self.max_memory // 2 ** 20 if self.max_memory
                                                                        else 'unset: one model'))
        entry = LoadedModel(base, version, LOADERS[kind](base, self.dtype), kind)
        self.entries[base] = entry
        self.loads += 1
        return entry

    def _load_adapter(self, entry, name, path):
        from peft import PeftModel
        if name in entry.adapters:
            entry.adapters.move_to_end(name)
            return
        used = set(entry.in_use.values())
        idle = [n for n in entry.adapters if n not in used]  # one a row decodes with stays, over the bound
        if len(entry.adapters) >= self.max_adapters and idle:
            entry.model.delete_adapter(idle[0])
            del entry.adapters[idle[0]]
        if isinstance(entry.model, PeftModel):
            entry.model.load_adapter(path, adapter_name=name, is_trainable=False)
        else:
            entry.model = PeftModel.from_pretrained(entry.model, path, adapter_name=name, is_trainable=False)
        entry.model.set_adapter(name)  # never a deleted one: peft reads the active adapter on every call
        entry.model.eval()
        entry.adapters[name] = path

    def _tokenizer(self, folder):
        from transformers import AutoTokenizer
        if folder not in self.tokenizers:
            self.tokenizers[folder] = AutoTokenizer.from_pretrained(folder)
            while len(self.tokenizers) > self.max_adapters + 1:
                self.tokenizers.popitem(last=False)
        self.tokenizers.move_to_end(folder)
        return self.tokenizers[folder]


def _weights_size(base):
    """Bytes of a model folder's weights files, to size it before loading."""
    for ext in ('.safetensors', '.bin'):
        files = [os.path.join(base, n) for n in os.listdir(base) if n.endswith(ext)]
        if files:
            return sum(os.path.getsize(f) for f in files)
    return 0


def _has_tokenizer(path):
    return os.path.isfile(os.path.join(path, 'tokenizer_config.json'))


def context_length(model):
    config = getattr(model, 'config', None)
    return getattr(config, 'max_position_embeddings', None) or 2048


def run_chat(cache, request, emit):
    """Generate the reply to one checked request, handing text deltas to `emit` as they come;
    returns {'finish_reason', 'prompt_tokens', 'completion_tokens'}. The caller holds the lock."""
    import contextlib
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    model, tokenizer, adapter = cache.get(request['model'])
    inputs = tokenizer.apply_chat_template(request['messages'], add_generation_prompt=True,
                                           return_tensors='pt', return_dict=True)
    prompt_tokens = int(inputs['input_ids'].shape[1])
    room = context_length(model) - prompt_tokens
    if room < 1:
        raise RequestError('the messages take %d tokens; the model\'s context is %d'
                           % (prompt_tokens, context_length(model)))
    max_new = min(request['max_tokens'], room)
    streamer = DeltaStreamer(tokenizer, request['stop'], emit)

    class StopStringSeen(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), streamer.text.stopped, dtype=torch.bool)

    class TimeUp(StoppingCriteria):
        """The caller's time limit (e.g. an Odoo worker's limit_time_real) has come."""
        seen = False

        def __call__(self, input_ids, scores, **kwargs):
            TimeUp.seen = TimeUp.seen or (request.get('deadline') is not None and time.monotonic() >= request['deadline'])
            return torch.full((input_ids.shape[0],), TimeUp.seen, dtype=torch.bool)

    options = dict(max_new_tokens=max_new, streamer=streamer, stopping_criteria=StoppingCriteriaList([StopStringSeen(), TimeUp()]),
                   pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if request['temperature'] > 0:
        options.update(do_sample=True, temperature=request['temperature'], top_p=request['top_p'])
        if request['seed'] is not None:
            torch.manual_seed(request['seed'])
    else:
        options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if adapter:
        model.set_adapter(adapter)
        adapters_off = contextlib.nullcontext()
    else:
        adapters_off = model.disable_adapter() if hasattr(model, 'disable_adapter') else contextlib.nullcontext()
    with torch.inference_mode(), adapters_off:
        output = model.generate(**inputs, **options)
    completion = output[0][prompt_tokens:]
    if streamer.text.stopped:
        completion_tokens, finish = len(streamer.ids), 'stop'
    else:
        completion_tokens = int(completion.shape[0])
        ended = completion_tokens and int(completion[-1]) in _eos_ids(model, tokenizer)
        finish = 'stop' if (ended or completion_tokens < max_new) and not TimeUp.seen else 'length'
    return {'finish_reason': finish, 'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens}


def chat(cache, model, messages, **options):
    """One whole answer in this process (no HTTP): {'text', 'finish_reason', 'prompt_tokens',
    'completion_tokens'}; options as in /chat."""
    return whole_answer(cache, parse_chat_request(dict(options, model=model, messages=messages)))


def whole_answer(cache, request):
    """The answer to a checked request, all at once (one at a time, transformers' generate: the
    path before batching, kept for in-process callers and as the benchmark's baseline)."""
    parts = []
    final = run_chat(cache, request, parts.append)
    return dict(final, text=''.join(parts))


def _eos_ids(model, tokenizer):
    ids = getattr(getattr(model, 'generation_config', None), 'eos_token_id', None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


# -- HTTP -------------------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server_version = 'llm-training-serve'

    def setup(self):
        self.timeout = self.server.read_timeout  # StreamRequestHandler puts it on the socket
        super().setup()
        # an answer leaves as two writes (headers, body): with Nagle's algorithm the body waits for
        # the client's delayed ACK of the headers, 40 ms on every keep-alive request (/health, /embed)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_request(self, code='-', size='-'):
        if self.path != '/health':  # every Odoo call checks health first: not worth a line each
            super().log_request(code, size)

    def log_message(self, fmt, *args):
        sys.stderr.write('%s %s\n' % (time.strftime('%Y-%m-%d %H:%M:%S'), fmt % args))

    def _json(self, status, data, headers=()):
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self):
        """Whether the request carries the server's token; if not, 401 is answered (and the
        connection closed: a body may be left unread)."""
        header = self.headers.get('Authorization') or ''
        sent = header[7:].strip() if header[:7].lower() == 'bearer ' else ''
        if hmac.compare_digest(sent.encode(), self.server.token.encode()):
            return True
        self.close_connection = True
        self._json(401, {'error': 'this server needs its token (Authorization: Bearer <token>)'})
        return False

    def do_GET(self):
        if not self._authorized():
            return
        if self.path != '/health':
            return self._json(404, {'error': 'unknown path %s' % self.path})
        self._json(200, {'status': 'ok', 'pid': os.getpid(), 'loaded': self.server.describe(),
                         'allowed_roots': self.server.cache.roots, 'models': self.server.cache.models,
                         'loads': self.server.cache.loads, 'unloaded': self.server.cache.unloaded,
                         'engine': self.server.engine.describe(), 'embed': self.server.embeddings.describe()})

    def do_POST(self):
        if not self._authorized():
            return
        try:
            length = int(self.headers.get('Content-Length') or 0)
            if length > MAX_BODY:
                self.close_connection = True  # its body stays unread: this connection cannot go on
                raise RequestError('the body is over %d bytes' % MAX_BODY, 413)
            raw = self.rfile.read(length) if length else b''
            if self.path == '/shutdown':
                self._json(200, {'status': 'shutting down'})
                self.server.stop_soon()
                return
            if self.path == '/embed':  # knowledge collections' embeddings: trainer/knowledge/embed.py
                from .knowledge import embed
                return self._json(*embed.answer(raw, getattr(self.server, 'embeddings', None)))
            if self.path != '/chat':
                raise RequestError('unknown path %s' % self.path, 404)
            try:
                body = json.loads(raw.decode('utf-8') or 'null')
            except ValueError as e:
                raise RequestError('the body is not JSON: %s' % e)
            request = parse_chat_request(body)
        except RequestError as e:
            return self._json(e.status, {'error': str(e)})
        try:
            ticket = self.server.engine.submit(request)  # refused now when the waiting line is full
        except RequestError as e:
            busy = [('Retry-After', str(BUSY_RETRY_AFTER))] if e.status == 503 else []
            return self._json(e.status, {'error': str(e)}, headers=busy)
        if request['stream']:
            self._stream(ticket)
        else:
            self._whole(ticket)

    def _gone(self):
        """Whether the client closed its connection (it sends nothing more while it waits)."""
        import select
        import socket
        try:
            if not select.select([self.connection], [], [], 0)[0]:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b''
        except OSError:
            return True

    def _whole(self, ticket):
        parts = []
        try:
            final = self.server.engine.follow(ticket, parts.append, self._gone)
            answer = dict(final, text=''.join(parts))
        except ClientGone:
            self.close_connection = True
            return
        except RequestError as e:
            return self._json(e.status, {'error': str(e)})
        except Exception as e:  # a failed generation answers 500 and the server goes on
            self.log_error('chat failed: %r', e)
            return self._json(500, {'error': '%s: %s' % (type(e).__name__, e)})
        self._json(200, answer)

    def _stream(self, ticket):
        """NDJSON in chunked encoding. The status line goes out only once the model is loaded and
        the prompt checked, so that those errors still get their HTTP status."""
        started = []

        def write_line(data):
            if not started:
                self.send_response(200)
                self.send_header('Content-Type', 'application/x-ndjson')
                self.send_header('Transfer-Encoding', 'chunked')
                self.end_headers()
                started.append(True)
            line = json.dumps(data).encode() + b'\n'
            self.wfile.write(b'%x\r\n%s\r\n' % (len(line), line))
            self.wfile.flush()

        try:
            final = self.server.engine.follow(ticket, lambda delta: write_line({'delta': delta}), self._gone)
            write_line(final)
        except (BrokenPipeError, ConnectionResetError, TimeoutError, ClientGone):  # the client left: its row with it
            self.close_connection = True
            return
        except Exception as e:
            status = e.status if isinstance(e, RequestError) else 500
            if not isinstance(e, RequestError):
                self.log_error('chat failed: %r', e)
            message = str(e) if isinstance(e, RequestError) else '%s: %s' % (type(e).__name__, e)
            if not started:
                return self._json(status, {'error': message})
            try:
                write_line({'error': message})
            except OSError:
                self.close_connection = True
                return
        try:
            self.wfile.write(b'0\r\n\r\n')
            self.wfile.flush()
        except OSError:
            self.close_connection = True


class ModelServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port, max_adapters=8, token=None, roots=(), max_waiting=4, read_timeout=30, max_batch=8,
                 idle_unload=900, max_memory_mb=None, dtype=None, engine='transformers', gguf_cache=None,
                 convert_dir=None, embed_precision='auto'):
        from trainer.llamacpp_engine import make_engine
        from trainer.knowledge.embed import EmbeddingCache
        super().__init__(('127.0.0.1', port), Handler)
        self.cache = ModelCache(max_adapters, roots=list(roots), max_memory_mb=max_memory_mb, dtype=dtype)
        self.token = token or secrets.token_urlsafe(32)
        # transformers (trainer/batching.py) or llama.cpp (trainer/llamacpp_engine.py), per --engine (whose
        # default is auto; in-process callers keep transformers unless they say otherwise)
        self.engine = make_engine(engine, self.cache, max_batch=max_batch, max_queue=max_waiting, idle_unload=idle_unload,
                                  max_memory_mb=max_memory_mb, gguf_cache=gguf_cache, convert_dir=convert_dir)
        self.read_timeout = read_timeout
        # /embed's models, with the precision of their large batches (--embed-precision)
        self.embeddings = EmbeddingCache(embed_precision)

    def describe(self):
        # without the lock: a health check must answer while a generation runs
        return self.cache.describe()

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError, TimeoutError)):
            return  # a client that closed (or stopped sending on) its connection: nothing went wrong here
        super().handle_error(request, client_address)

    def stop_soon(self):
        """shutdown() waits for serve_forever to return: call it from another thread."""
        threading.Thread(target=self.shutdown, daemon=True).start()

    def server_close(self):
        super().server_close()
        self.engine.close()


def write_token(path, token):
    """The token, readable by this user only, replacing any earlier server's (atomically)."""
    tmp = '%s.tmp.%d' % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, 'w') as f:
        f.write(token)
    os.replace(tmp, path)


def write_state(path, data):
    job_files.write_json_atomic(path, data)


def remove_state(path):
    """Remove the state file only if it still names this process (a newer server may own it)."""
    try:
        with open(path) as f:
            if json.load(f).get('pid') == os.getpid():
                os.remove(path)
    except (OSError, ValueError):
        pass


def make_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--port', type=int, default=0, help='port on 127.0.0.1 (0: the OS chooses)')
    parser.add_argument('--state-file', help='JSON file to write {"pid", "port", "started_at"} to once listening')
    parser.add_argument('--max-adapters', type=int, default=8, help='LoRA adapters kept loaded at most')
    parser.add_argument('--token-file', help='where to write the token (mode 0600; default: server.token beside '
                                             'the state file)')
    parser.add_argument('--allowed-root', action='append', default=[], metavar='DIR',
                        help='a folder whose model folders may be served (repeat; none: nothing is served)')
    parser.add_argument('--max-waiting', type=int, default=4,
                        help='requests that may wait while --max-batch decode; more are answered 503 at once')
    parser.add_argument('--max-batch', type=int, default=8, help='requests decoding together at most')
    parser.add_argument('--idle-unload', type=float, default=900,
                        help='seconds a model may stay unused before it is unloaded (0: never)')
    parser.add_argument('--max-memory-mb', type=int, default=None,
                        help='weights of the models kept loaded at once, at most (default: one model)')
    parser.add_argument('--read-timeout', type=float, default=30, help='seconds a connection may stay silent')
    parser.add_argument('--engine', choices=('auto', 'transformers', 'llamacpp'), default='auto',
                        help='what generates: llama.cpp on a CPU where the model converts (auto), or always one '
                             '(trainer/llamacpp_engine.py)')
    parser.add_argument('--gguf-cache', help='where the GGUF files llama.cpp serves are kept (default '
                                             '~/.cache/llm_training/gguf or $LLMT_GGUF_CACHE)')
    parser.add_argument('--convert-dir', help='llama.cpp\'s converters (default $LLMT_LLAMA_CONVERT_DIR)')
    parser.add_argument('--embed-precision', choices=('auto', 'fp32', 'bf16'), default='auto',
                        help='/embed\'s large batches (indexing): bf16 where a measurement finds it faster (auto), or '
                             'always one; questions are embedded in fp32 (trainer/knowledge/embed.py)')
    return parser


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    token_file = args.token_file or (args.state_file and os.path.join(os.path.dirname(args.state_file), TOKEN_FILE))
    if not token_file:
        parser.error('give --state-file or --token-file: the token must be written somewhere')
    server = ModelServer(args.port, args.max_adapters, roots=args.allowed_root, max_waiting=args.max_waiting,
                         read_timeout=args.read_timeout, max_batch=args.max_batch, idle_unload=args.idle_unload,
                         max_memory_mb=args.max_memory_mb, engine=args.engine, gguf_cache=args.gguf_cache,
                         convert_dir=args.convert_dir, embed_precision=args.embed_precision)
    port = server.server_address[1]
    signal.signal(signal.SIGTERM, lambda *_: server.stop_soon())
    write_token(token_file, server.token)  # before the state file: whoever finds the server can find its token
    if args.state_file:
        write_state(args.state_file, {'pid': os.getpid(), 'port': port, 'started_at': time.time(),
                                      'allowed_roots': server.cache.roots})
    sys.stderr.write('model server listening on 127.0.0.1:%d (pid %d)\n' % (port, os.getpid()))
    sys.stderr.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        if args.state_file:
            remove_state(args.state_file)
        sys.stderr.write('model server stopped\n')
    return 0


if __name__ == '__main__':
    # run as trainer.serve, not __main__: trainer.batching imports this module, and one copy of
    # its classes (RequestError) must be caught by both
    from trainer import serve as _serve
    sys.exit(_serve.main())
