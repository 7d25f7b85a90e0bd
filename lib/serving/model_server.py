"""Odoo's side of the persistent model server (trainer/serve.py, in the trainer venv).

One server per run folder, shared by every Odoo worker of that data folder: its state file
(`server.json`: pid, port, start time) names it; `ensure_running` uses a live, healthy server or
starts one detached (own session, log `server.log` in the run folder) under a file lock, so two
workers never start two. The local provider keeps its run folder at
`<data_dir>/llm_training/model_server/` (Odoo's data_dir, made 0700), which is where `make stop`
looks.

The server trusts no local process: every request carries the token it wrote (0600) to
`server.token` in the run folder, which only this user can read (`make stop` included). It serves
model folders only under the allowed roots it was started with (the places the addon puts
models); a client that needs a root the running server lacks restarts it with the union of both
sets. It batches the requests of every worker (trainer/batching.py), with the settings of
SERVE_SETTINGS (odoo.conf); a server running with other settings is restarted with ours. A busy
server (its waiting line full) is ModelServerError with status 503 and `retry_after`, which
`/v1` answers as 429 with Retry-After. No Odoo import: plain Python 3.7 with `requests` and `psutil`.
"""
import json
import os
import signal
import subprocess
import time

import psutil
import requests

from ..host import processes
from ..host.file_lock import held
from ..host.private_dirs import make_private_dirs
from ..host.trainer_env import ADDON_ROOT  # where `trainer` is
STATE_FILE = 'server.json'
TOKEN_FILE = 'server.token'  # written by the server (trainer/serve.py), mode 0600
LOCK_FILE = 'server.lock'
LOG_FILE = 'server.log'
MAX_WAITING = 16  # requests that may wait for a row of the batch; more are refused at once
# The batching settings (odoo.conf key -> server option, default); see serve_settings.
SERVE_SETTINGS = (
    ('llm_training_serve_max_queue', 'max_waiting', MAX_WAITING),  # waiting requests; more: 429 + Retry-After
    ('llm_training_serve_max_batch', 'max_batch', 8),  # requests decoding together
    ('llm_training_serve_idle_unload', 'idle_unload', 900),  # seconds unused before a model is unloaded; 0: never
    ('llm_training_serve_max_memory_mb', 'max_memory_mb', 0),  # weights kept loaded at once; 0: one model
)
# What generates (the server's --engine, trainer/llamacpp_engine.py): auto = llama.cpp on a CPU host
# where the model converts, transformers on CUDA and for the others.
SERVE_ENGINES = ('auto', 'transformers', 'llamacpp')
# The precision of /embed's large batches (the server's --embed-precision, trainer/knowledge/embed.py):
# auto = bf16 where the server's measurement (at its first large batch) finds it faster, fp32 otherwise.
EMBED_PRECISIONS = ('auto', 'fp32', 'bf16')
START_TIMEOUT = 120  # imports of torch + transformers; the model loads on the first request
REQUEST_TIMEOUT = 300  # one generation, loading its model included
HEALTH_TIMEOUT = 5
DEADLINE_MARGIN = 2  # seconds a server stopped by max_seconds may take to send its last bytes
STOP_TIMEOUT = 20


class ModelServerError(Exception):
    """The server refused a request or could not be reached; `status` is its HTTP status, if any."""

    def __init__(self, message, status=None, retry_after=None):
        super(ModelServerError, self).__init__(message)
        self.status = status
        self.retry_after = retry_after


def serve_settings(get):
    """The model server's settings from odoo.conf (`get`: tools.config.get), checked:
    {'max_waiting', 'max_batch', 'idle_unload', 'max_memory_mb', 'engine', 'convert_dir',
    'embed_precision'}; ValueError names a bad key."""
    settings = {}
    for key, name, default in SERVE_SETTINGS:
        raw = get(key)
        try:
            value = default if raw in (None, '') else float(raw) if name == 'idle_unload' else int(raw)
        except (TypeError, ValueError):
            value = -1
        if value < 0 or (name == 'max_batch' and value < 1):
            raise ValueError('odoo.conf %s = %r: give a %s number' % (key, raw, 'positive' if name == 'max_batch'
                                                                       else 'non-negative'))
        settings[name] = value
    engine = get('llm_training_serve_engine') or 'auto'
    if engine not in SERVE_ENGINES:
        raise ValueError('odoo.conf llm_training_serve_engine = %r: give one of %s' % (engine, ', '.join(SERVE_ENGINES)))
    settings['engine'] = engine
    settings['convert_dir'] = get('llm_training_llama_convert_dir') or None  # llama.cpp's converters (GGUF)
    precision = get('llm_training_embed_precision') or 'auto'
    if precision not in EMBED_PRECISIONS:
        raise ValueError('odoo.conf llm_training_embed_precision = %r: give one of %s'
                         % (precision, ', '.join(EMBED_PRECISIONS)))
    settings['embed_precision'] = precision
    return settings


def read_state(run_dir):
    try:
        with open(os.path.join(run_dir, STATE_FILE)) as f:
            state = json.load(f)
        return state if isinstance(state, dict) and state.get('pid') and state.get('port') else None
    except (OSError, ValueError):
        return None


def read_token(run_dir):
    try:
        with open(os.path.join(run_dir, TOKEN_FILE)) as f:
            return f.read().strip()
    except OSError:
        return ''


def is_server_process(pid, started_at=None):
    """Whether `pid` is a live trainer.serve process (not a later process reusing the pid)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        if started_at is not None and process.create_time() > started_at + 1:
            return False  # born after the state file was written: a reused pid
        return 'trainer.serve' in ' '.join(process.cmdline())
    except (psutil.Error, ValueError):
        return False


class ChatClient(object):
    """chat / chat_stream over a model server's /chat, the same for this host's server (ModelServer)
    and a Ray Serve deployment (ServeEndpoint); each sends the request its own way (`_post`)."""
    request_timeout = REQUEST_TIMEOUT

    def chat(self, model_path, messages, **options):
        """{'text', 'finish_reason', 'prompt_tokens', 'completion_tokens'}. Options: max_tokens,
        temperature (0: greedy), top_p, stop, seed, n, max_seconds."""
        answer = self._post(model_path, messages, options, stream=False)
        try:
            return answer.json()
        finally:
            answer.close()

    def chat_stream(self, model_path, messages, **options):
        """An iterator of {'delta': str} dicts, then one {'finish_reason', 'prompt_tokens',
        'completion_tokens'}. The request is sent (and refused) here, before the first item is
        asked for; closing the iterator early closes the connection and stops the generation."""
        return self._lines(self._post(model_path, messages, options, stream=True))

    def _post(self, model_path, messages, options, stream):
        raise NotImplementedError

    def _wait(self, options):
        """Seconds to wait for the answer. A request with a deadline (max_seconds: the Odoo worker's
        time left) waits no longer than that: a stuck server must not hold the worker until it is
        killed."""
        if options.get('max_seconds') is not None:
            return min(self.request_timeout, options['max_seconds'] + DEADLINE_MARGIN)
        return self.request_timeout

    @staticmethod
    def _lines(answer):
        try:
            for line in answer.iter_lines():
                if not line:
                    continue
                item = json.loads(line.decode('utf-8'))
                if 'error' in item:
                    raise ModelServerError(item['error'], 500)
                yield item
                if 'finish_reason' in item:
                    return
            raise ModelServerError('the model server ended the answer early')
        except (requests.RequestException, ValueError) as e:
            raise ModelServerError('the model server\'s answer broke off: %s' % e)
        finally:
            answer.close()


class ModelServer(ChatClient):
    """A client of the model server in `run_dir`, starting it when needed (`where`: this host).

    python     the trainer venv's python (runs `python -m trainer.serve`)
    port       a fixed port on 127.0.0.1, or None: the OS chooses one (read from the state file)
    env, cwd   the trainer's environment and working folder (default: this addon's root on PYTHONPATH)
    allowed_roots  the folders whose model folders the server must serve (the server refuses any
               other folder); a running server without one of them is restarted with it
    private_top    the run folder and the folders between it and this one are made 0700
               (default: the run folder alone)
    """

    where = 'host'

    def __init__(self, python, run_dir, port=None, env=None, cwd=None, start_timeout=START_TIMEOUT,
                 request_timeout=REQUEST_TIMEOUT, allowed_roots=(), max_waiting=MAX_WAITING, private_top=None,
                 max_batch=8, idle_unload=900, max_memory_mb=0, engine='auto', convert_dir=None,
                 embed_precision='auto'):
        self.python = python
        self.run_dir = run_dir
        self.private_top = private_top or run_dir
        self.allowed_roots = sorted(set(os.path.realpath(root) for root in allowed_roots if root))
        self.max_waiting = max_waiting
        self.max_batch = max_batch
        self.idle_unload = idle_unload
        self.max_memory_mb = max_memory_mb
        self.engine = engine
        self.convert_dir = convert_dir
        self.embed_precision = embed_precision
        self.port = port
        self.env = env or dict(os.environ, PYTHONPATH=ADDON_ROOT, TOKENIZERS_PARALLELISM='false')
        self.cwd = cwd or ADDON_ROOT
        self.start_timeout = start_timeout
        self.request_timeout = request_timeout
        self._session = requests.Session()

    # -- the process -----------------------------------------------------------------------------
    def health(self, state=None):
        """The /health answer of the server the state file names, or None (not running, not ours,
        not answering)."""
        state = state or read_state(self.run_dir)
        if not state or not is_server_process(state['pid'], state.get('started_at')):
            return None
        try:
            answer = self._session.get(self._url(state, '/health'), headers=self._headers(), timeout=HEALTH_TIMEOUT)
            health = answer.json()
        except (requests.RequestException, ValueError):
            return None
        return health if answer.status_code == 200 and health.get('pid') == state['pid'] else None

    def _serves_ours(self, health):
        """Whether a running server serves our roots with our batching settings (odoo.conf
        changed: it is restarted with the new ones)."""
        engine = (health or {}).get('engine') or {}
        return bool(health) and set(self.allowed_roots) <= set(health.get('allowed_roots') or ()) and \
            (engine.get('max_queue'), engine.get('max_batch'), engine.get('idle_unload'), engine.get('max_memory_mb'),
             engine.get('setting')) == (self.max_waiting, self.max_batch, self.idle_unload, self.max_memory_mb or None,
                                        self.engine) and \
            (health.get('embed') or {}).get('precision_setting', 'auto') == self.embed_precision

    def ensure_running(self):
        """The state ({'pid', 'port', ...}) of a live, healthy server serving our allowed roots,
        started (or restarted with them) here if needed."""
        state = read_state(self.run_dir)
        if self._serves_ours(self.health(state)):
            return state
        os.makedirs(os.path.dirname(self.private_top), exist_ok=True)
        make_private_dirs(self.run_dir, self.private_top)
        with held(os.path.join(self.run_dir, LOCK_FILE), self.start_timeout + 10, ModelServerError):
            state = read_state(self.run_dir)  # another worker may have started it while we waited
            health = self.health(state)
            if self._serves_ours(health):
                return state
            roots = set(self.allowed_roots)
            if health:  # the set grew (a new models folder or provider storage): keep what it served too
                roots.update(health.get('allowed_roots') or ())
                self.stop()
            elif state and is_server_process(state['pid'], state.get('started_at')):
                self._kill(state['pid'])  # alive but not answering: replace it
            self._remove_state()
            return self._start(sorted(roots))

    def _start(self, roots):
        command = [self.python, '-m', 'trainer.serve', '--port', str(self.port or 0),
                   '--state-file', os.path.join(self.run_dir, STATE_FILE), '--max-waiting', str(self.max_waiting),
                   '--max-batch', str(self.max_batch), '--idle-unload', str(self.idle_unload)]
        if self.max_memory_mb:
            command += ['--max-memory-mb', str(self.max_memory_mb)]
        command += ['--engine', self.engine, '--embed-precision', self.embed_precision]
        if self.convert_dir:
            command += ['--convert-dir', self.convert_dir]
        command += ['--allowed-root=%s' % root for root in roots]
        with open(os.path.join(self.run_dir, LOG_FILE), 'ab') as log:
            try:
                process = processes.spawn(command, cwd=self.cwd, env=self.env, detached=True,  # outlives this worker
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            except OSError as e:
                raise ModelServerError('cannot run the trainer Python %s (%s)' % (self.python, e))
        deadline = time.time() + self.start_timeout
        while time.time() < deadline:
            if process.poll() is not None:
                raise ModelServerError('the model server exited with code %s: %s' % (process.returncode, self.log_tail()))
            state = read_state(self.run_dir)
            if state and state['pid'] == process.pid and self.health(state):
                return state
            time.sleep(0.2)
        self._kill(process.pid)
        raise ModelServerError('the model server did not answer within %d s: %s' % (self.start_timeout, self.log_tail()))

    def stop(self):
        """Stop the server this run folder names, if any: /shutdown, then SIGTERM, then SIGKILL.
        True if one was running."""
        state = read_state(self.run_dir)
        if not state or not is_server_process(state['pid'], state.get('started_at')):
            self._remove_state()
            return False
        try:
            self._session.post(self._url(state, '/shutdown'), headers=self._headers(), timeout=HEALTH_TIMEOUT)
        except requests.RequestException:
            pass
        if not self._wait_exit(state['pid'], STOP_TIMEOUT / 2):
            self._kill(state['pid'])
        self._remove_state()
        return True

    def _kill(self, pid):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except OSError:
                return
            if self._wait_exit(pid, STOP_TIMEOUT / 2):
                return

    @staticmethod
    def _wait_exit(pid, timeout):
        """Whether the process ended within `timeout`. One that exited but is another process's
        child (an Odoo worker's, when `make stop` asks) stays a zombie until that parent reaps it:
        it has ended all the same."""
        deadline = time.time() + timeout
        try:
            process = psutil.Process(pid)
            while True:
                try:
                    process.wait(0.2)  # also reaps it when it is our child
                    return True
                except psutil.TimeoutExpired:
                    if process.status() == psutil.STATUS_ZOMBIE:
                        return True
                    if time.time() > deadline:
                        return False
        except psutil.NoSuchProcess:
            return True

    def _remove_state(self):
        try:
            os.remove(os.path.join(self.run_dir, STATE_FILE))
        except OSError:
            pass

    def log_tail(self, size=2000):
        try:
            with open(os.path.join(self.run_dir, LOG_FILE), 'rb') as f:
                f.seek(max(0, os.path.getsize(f.name) - size))
                return f.read().decode('utf-8', 'replace')
        except OSError:
            return ''

    @staticmethod
    def _url(state, path):
        return 'http://127.0.0.1:%d%s' % (state['port'], path)

    def _headers(self):
        """The server's token, read fresh: a restarted server made a new one."""
        return {'Authorization': 'Bearer %s' % read_token(self.run_dir)}

    # -- generation (chat, chat_stream: ChatClient) ----------------------------------------------
    def _post(self, model_path, messages, options, stream):
        body = dict(options, model=model_path, messages=messages, stream=stream)
        wait = self._wait(options)
        for attempt in (1, 2):
            state = self.ensure_running()
            try:
                answer = self._session.post(self._url(state, '/chat'), json=body, stream=stream,
                                            headers=self._headers(), timeout=(HEALTH_TIMEOUT, wait))
                if answer.status_code == 401 and attempt == 1:  # restarted (new token) since we read it
                    answer.close()
                    continue
                break
            except requests.ConnectionError:
                if attempt == 2:  # the server died between the health check and the request, twice
                    raise ModelServerError('the model server stopped answering: %s' % self.log_tail())
            except requests.Timeout:
                raise ModelServerError('the model server did not answer within %d s' % wait)
        if answer.status_code != 200:
            raise _refusal(answer)
        return answer

    def embed(self, texts, model, input_type='passage'):
        """The vectors of `texts` by the named embedding model (trainer/knowledge/embed.py):
        {'data': [[float]], 'tokens': [int], 'dimensions', 'model'}; `input_type` 'query' for a
        question searched with (asymmetric models embed it differently), else 'passage'."""
        for attempt in (1, 2):
            state = self.ensure_running()
            try:
                answer = self._session.post(self._url(state, '/embed'), json={'model': model, 'input': list(texts),
                                                                               'input_type': input_type},
                                            headers=self._headers(), timeout=(HEALTH_TIMEOUT, self.request_timeout))
            except requests.ConnectionError:
                if attempt == 2:
                    raise ModelServerError('the model server stopped answering: %s' % self.log_tail())
                continue
            except requests.Timeout:
                raise ModelServerError('the model server did not answer within %d s' % self.request_timeout)
            if answer.status_code == 401 and attempt == 1:  # restarted (new token) since we read it
                continue
            try:
                body = answer.json()
            except ValueError:
                body = {'error': answer.text}
            if answer.status_code != 200:
                raise ModelServerError(body.get('error') or answer.text, answer.status_code)
            return body


def _refusal(answer):
    """The ModelServerError for a non-200 answer of a model server (its {"error"} body, its
    status, its Retry-After); closes the answer."""
    try:
        message = answer.json().get('error') or answer.text
    except ValueError:
        message = answer.text
    answer.close()
    retry_after = answer.headers.get('Retry-After')
    return ModelServerError(message or 'HTTP %d' % answer.status_code, answer.status_code,
                            retry_after=int(retry_after) if (retry_after or '').isdigit() else None)


class ServeEndpoint(ChatClient):
    """The model server as a Ray Serve deployment (trainer/serve_ray.py) at `url` (Serve's proxy
    and the application's route): the same /health and /chat, the same bearer token, reached
    over the network; nothing to start (Odoo deploys it from the provider)."""
    where = 'cluster'

    def __init__(self, url, token, request_timeout=REQUEST_TIMEOUT, connect_timeout=HEALTH_TIMEOUT):
        self.url = url.rstrip('/')
        self.token = token
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self._session = requests.Session()

    def _headers(self):
        return {'Authorization': 'Bearer %s' % self.token}

    def health(self):
        try:
            answer = self._session.get(self.url + '/health', headers=self._headers(), timeout=HEALTH_TIMEOUT)
        except requests.RequestException as e:
            raise ModelServerError('the Ray Serve deployment at %s did not answer (%s)' % (self.url, type(e).__name__))
        if answer.status_code != 200:
            raise _refusal(answer)
        return answer.json()

    def _post(self, model_path, messages, options, stream):
        body = dict(options, model=model_path, messages=messages, stream=stream)
        wait = self._wait(options)
        try:
            answer = self._session.post(self.url + '/chat', json=body, stream=stream, headers=self._headers(),
                                        timeout=(self.connect_timeout, wait))
        except requests.Timeout:
            raise ModelServerError('the Ray Serve deployment at %s did not answer within %d s' % (self.url, wait))
        except requests.RequestException as e:
            raise ModelServerError('the Ray Serve deployment at %s could not be reached (%s); is it deployed and '
                                   'is Serve URL right?' % (self.url, type(e).__name__))
        if answer.status_code == 404 and 'text/plain' in answer.headers.get('Content-Type', ''):
            answer.close()  # Serve's own 404: no application at this route
            raise ModelServerError('no Ray Serve application answers at %s: deploy serving from the provider'
                                   % self.url, 404)
        if answer.status_code != 200:
            raise _refusal(answer)
        return answer


def chat_endpoint(config, local_server, serve_token):
    """Where a provider's models answer, chosen in this one place: its Ray Serve deployment when
    the provider serves on its cluster (config `serve_on` 'ray'), else this host's model server.
    Both answer chat / chat_stream alike and say `where` they are ('cluster' or 'host'), so the
    caller hands them each model folder as that side sees it.

    local_server   a callable returning this host's ModelServer (started on first use)
    serve_token    a callable returning the deployment's token (a secret, read only when needed)"""
    if config.get('serve_on') != 'ray':
        return local_server()
    token = serve_token()
    if not token:
        raise ModelServerError('provider "%s" serves on its Ray cluster but has no serving token yet: press Deploy '
                               'Serving on the provider' % config.get('name'))
    url = '%s/%s' % ((config.get('serve_url') or 'http://127.0.0.1:8000').rstrip('/'), config['serve_application'])
    return ServeEndpoint(url, token)


def main(argv=None):
    """`python lib/serving/model_server.py stop RUN_DIR...`: what `make stop` runs (no Odoo needed)."""
    import argparse
    parser = argparse.ArgumentParser(description='Stop the model servers of these run folders.')
    parser.add_argument('action', choices=['stop'])
    parser.add_argument('run_dirs', nargs='+')
    args = parser.parse_args(argv)
    for run_dir in args.run_dirs:
        stopped = ModelServer(None, run_dir).stop()
        print('[stop] model server in %s %s' % (run_dir, 'stopped' if stopped else 'was not running'))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
