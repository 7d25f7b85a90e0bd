"""The model server as a Ray Serve deployment: the same request handling as trainer/serve.py
(its `ModelCache`, `parse_chat_request`, and the engine `make_engine` picks for the same setting:
llama.cpp on a CPU under `auto` (trainer/llamacpp_engine.py), the batching `Engine` of
trainer/batching.py otherwise), run by Serve's replicas on a Ray cluster instead of one process on
the Odoo host.

Odoo deploys it through the Serve REST API of the head's dashboard (lib/serving/ray_serve/), importing
`trainer.serve_ray:app` from the trainer's code on the shared storage (PYTHONPATH in the
application's runtime_env). Its settings are the deployment's `user_config`, so adding a model is a
light update (`reconfigure`, no replica restarted):

    {"models": [folder, ...],       the only model folders it serves (as the workers see them):
                                    base models and adapters, by path on the shared storage
     "token_sha256": hex,           SHA-256 of the token every request must send
     "max_adapters": 8,             LoRA adapters kept loaded per replica, least recently used evicted
     "engine": "auto",              what generates, as odoo.conf llm_training_serve_engine for the local
                                    server: auto (llama.cpp on a CPU replica), transformers, llamacpp
     "convert_dir": folder|null}    llama.cpp's GGUF converters as the workers see them (each replica
                                    converts a model once into its node's GGUF cache)

The routes are those of trainer/serve.py under the application's route prefix, with the same
bearer-token scheme: `GET .../health`, `POST .../chat` (`stream: true`: newline-delimited JSON).
The deployment knows only the token's hash (the Serve config is readable by whoever reaches the
dashboard). A model folder not in "models" is answered 404 with what to do. Each replica decodes
its requests together (continuous batching, as the local server, on either engine); Serve's
`max_queued_requests` bounds the callers waiting, over it its proxy answers 503, as does the
engine's own waiting line.
"""
import asyncio
import hashlib
import hmac
import json
import os
import queue
import threading

from ray import serve
from starlette.responses import JSONResponse, StreamingResponse

# The one seam with the local server's generation code.
from trainer.llamacpp_engine import SETTINGS, make_engine
from trainer.serve import MAX_BODY, ModelCache, RequestError, parse_chat_request

_END = object()


class _Cancelled(Exception):
    """The caller went away: raised from inside the generation to stop it."""


def token_hash(token):
    return hashlib.sha256(token.encode()).hexdigest()


def authorized(header, expected_sha256):
    """Whether an Authorization header carries the token whose SHA-256 is `expected_sha256`."""
    header = header or ''
    sent = header[7:].strip() if header[:7].lower() == 'bearer ' else ''
    return bool(expected_sha256) and bool(sent) and hmac.compare_digest(token_hash(sent), expected_sha256)


def check_config(config):
    """The deployment's user_config, checked; ValueError says what is wrong."""
    if not isinstance(config, dict):
        raise ValueError('the user_config must be an object')
    models = config.get('models')
    if not isinstance(models, list) or not all(isinstance(m, str) and os.path.isabs(m) for m in models):
        raise ValueError('"models" must be a list of absolute folder paths')
    digest = config.get('token_sha256')
    if not isinstance(digest, str) or len(digest) != 64:
        raise ValueError('"token_sha256" must be the SHA-256 (hex) of the token')
    max_adapters = config.get('max_adapters', 8)
    if isinstance(max_adapters, bool) or not isinstance(max_adapters, int) or max_adapters < 1:
        raise ValueError('"max_adapters" must be a positive integer')
    engine = config.get('engine', 'auto')
    if engine not in SETTINGS:
        raise ValueError('"engine" must be one of %s, not %r' % (', '.join(SETTINGS), engine))
    convert_dir = config.get('convert_dir')
    if convert_dir is not None and not (isinstance(convert_dir, str) and os.path.isabs(convert_dir)):
        raise ValueError('"convert_dir" must be an absolute folder path or null')
    return {'models': sorted(set(os.path.normpath(m) for m in models)), 'token_sha256': digest,
            'max_adapters': max_adapters, 'engine': engine, 'convert_dir': convert_dir}


@serve.deployment(name='ModelServer')
class ModelServerDeployment(object):

    def __init__(self):
        self.config = None
        self.engine = None  # one engine per replica, made at the first configuration

    def reconfigure(self, config):
        # Replaced whole (never changed in place): a running request keeps the one it read.
        config = check_config(config)
        old, self.config = self.config, config
        roots = [os.path.realpath(root) for root in config['models']]
        if self.engine is None or (old['engine'], old['convert_dir']) != (config['engine'], config['convert_dir']):
            previous = self.engine
            self.engine = make_engine(config['engine'], ModelCache(config['max_adapters'], roots=config['models']),
                                      convert_dir=config['convert_dir'])
            if previous is not None:  # its running requests end on it, away from Serve's call
                threading.Thread(target=previous.close, daemon=True).start()
            return
        # new models served from now on; what is loaded and decoding stays
        self.engine.cache.max_adapters = config['max_adapters']
        self.engine.cache.roots = roots
        if self.engine.llamacpp is not None:
            self.engine.llamacpp.roots = roots
            self.engine.llamacpp.max_adapters = config['max_adapters']

    async def __call__(self, http_request):
        config = self.config
        if config is None or not authorized(http_request.headers.get('authorization'), config['token_sha256']):
            return JSONResponse({'error': 'this server needs its token (Authorization: Bearer <token>)'}, 401)
        route = http_request.url.path.rstrip('/').rsplit('/', 1)[-1]
        if route == 'health' and http_request.method == 'GET':
            loaded = self.engine.cache.describe() if self.engine else {'base': None, 'adapters': []}
            return JSONResponse({'status': 'ok', 'pid': os.getpid(), 'loaded': loaded, 'models': config['models'],
                                 'engine': self.engine.describe() if self.engine else None})
        if route != 'chat' or http_request.method != 'POST':
            return JSONResponse({'error': 'unknown path %s' % http_request.url.path}, 404)
        try:
            raw = await http_request.body()
            if len(raw) > MAX_BODY:
                raise RequestError('the body is over %d bytes' % MAX_BODY, 413)
            try:
                body = json.loads(raw.decode('utf-8') or 'null')
            except ValueError as e:
                raise RequestError('the body is not JSON: %s' % e)
            request = parse_chat_request(body)
            if os.path.normpath(request['model']) not in config['models']:
                raise RequestError('model folder %s is not served by this deployment; deploy serving again from '
                                   'its provider (Odoo: Deploy Serving) to add it' % request['model'], 404)
        except RequestError as e:
            return JSONResponse({'error': str(e)}, e.status)
        if request['stream']:
            return await self._stream(request)
        return await asyncio.get_running_loop().run_in_executor(None, self._whole, request)

    def _whole(self, request):
        try:
            return JSONResponse(self.engine.whole_answer(request))
        except RequestError as e:
            return JSONResponse({'error': str(e)}, e.status)
        except Exception as e:  # a failed generation answers 500 and the replica goes on
            return JSONResponse({'error': '%s: %s' % (type(e).__name__, e)}, 500)

    async def _stream(self, request):
        """NDJSON lines as trainer/serve.py sends them. The status goes out with the first line, so
        that errors found before the first token (no such folder, prompt too long) keep theirs."""
        items = queue.Queue()
        cancelled = threading.Event()

        def emit(delta):
            if cancelled.is_set():
                raise _Cancelled()
            items.put({'delta': delta})

        def produce():
            try:
                items.put(self.engine.chat(request, emit))  # a raise in emit drops the row
            except _Cancelled:
                pass
            except RequestError as e:
                items.put(RequestError(str(e), e.status))
            except Exception as e:
                items.put(RequestError('%s: %s' % (type(e).__name__, e), 500))
            finally:
                items.put(_END)

        threading.Thread(target=produce, daemon=True).start()
        first = await asyncio.get_running_loop().run_in_executor(None, items.get)
        if isinstance(first, RequestError):
            return JSONResponse({'error': str(first)}, first.status)

        def lines(item):
            try:
                while item is not _END:
                    if isinstance(item, RequestError):
                        yield json.dumps({'error': str(item)}).encode() + b'\n'
                    else:
                        yield json.dumps(item).encode() + b'\n'
                    item = items.get()
            finally:
                cancelled.set()  # a caller that left stops the generation at its next token

        return StreamingResponse(lines(first), media_type='application/x-ndjson')


app = ModelServerDeployment.bind()
