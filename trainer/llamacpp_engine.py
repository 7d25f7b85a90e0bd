"""llama.cpp as the model server's engine on CPU (trainer/serve.py), and the choice between it and
the transformers engine (trainer/batching.py).

llama.cpp decodes several times faster than transformers on a CPU (bench/bench_serving.py:
the README gives the figures), so on a CPU host the server serves with it where it can:

- the base model as a GGUF f16, made once by llama.cpp's own converter (convert_hf_to_gguf.py,
  as trainer/export.py does) and kept in a cache folder under a name made of the folder's real path
  and its files' mtimes (a retrained folder gets a new file);
- each fine-tune's LoRA adapter as a llama.cpp LoRA GGUF (convert_lora_to_gguf.py), cached the same
  way. One llama.cpp server per (base, adapter or none): llama.cpp decodes in one batch only the
  slots whose adapter settings are equal, and runs one such group until it ends before the next
  (measured: two adapters mixed on one server got 0.54x a single adapter's batch), so each adapter
  has its own server and the groups decode at the same time. Their base GGUF is mmapped: the
  servers share its pages (checked: the process's proportional file memory does not grow with a
  second server); each has its own KV cache (counted in the memory bound). At most `max_adapters`
  adapter servers per base (the least recently used idle one makes room; when all are busy a
  request for another adapter waits until one is idle); each server unloads after `idle_unload`;
- the cores are shared among the busy servers (LlamaCppEngine._admit): a server alone decodes on
  every core, two busy servers on half each, and so on (all of them on every core would make
  llama.cpp's threads wait on each other);
- the prompt is the chat template applied by the model folder's own tokenizer (the same token ids
  the transformers engine feeds), sent as token ids; llama.cpp's server (xllamacpp, in-process)
  batches the running requests (`max_batch` parallel slots, continuous batching);
- each request keeps its sampling (greedy at temperature 0; else temperature and top_p with
  llama.cpp's sampler, seeded by the request's `seed`: sampled texts differ from transformers'
  for the same seed), its stop strings (ours, on the decoded text: never shown, even in part),
  `max_tokens`, deadline; a caller that goes away ends its request at its next token.

The choice (odoo.conf `llm_training_serve_engine`, the server's --engine):
- `transformers`: every request on the transformers engine (trainer/batching.py), as before;
- `llamacpp`: every request on llama.cpp; a model it cannot serve is answered with the reason;
- `auto` (default): llama.cpp on a CPU host for every model whose architecture its converter
  knows (and when xllamacpp is installed); transformers on CUDA (where it batches on the GPU and
  llama.cpp's CPU wheel would lose), for a model that does not convert, and for a prompt longer
  than llama.cpp's slot (SLOT_CONTEXT tokens: llama.cpp allocates that much cache per slot).

Both engines have the seam trainer/serve.py calls: submit(request) -> ticket, follow(ticket, emit,
is_gone), chat, whole_answer, describe, close.
"""
import collections
import hashlib
import json
import os
import random
import shutil
import sys
import threading
import time

from trainer import export
from trainer.batching import Engine, RequestLine, TicketReader
from trainer.serve import RequestError, StopText, check_allowed, folder_version, model_kind

SETTINGS = ('auto', 'transformers', 'llamacpp')
SLOT_CONTEXT = 4096  # tokens of context a request may use at most (llama.cpp allocates it per slot)
GGUF_CACHE_ENV = 'LLMT_GGUF_CACHE'
MOVED = object()  # what a request's run on one server gives when the request moved to another


class Unservable(Exception):
    """llama.cpp cannot serve this model (its converter does not know the architecture, or
    xllamacpp is missing), with the reason."""


def default_cache_folder():
    return os.environ.get(GGUF_CACHE_ENV) or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'llm_training', 'gguf')


def cuda_available():
    import torch
    return torch.cuda.is_available()


class GgufFiles(object):
    """The GGUF files of model folders, converted once and kept in `folder`; a conversion that
    failed is remembered (for the same folder version) and not tried on every request."""

    def __init__(self, folder=None, convert_dir=None):
        self.folder = folder or default_cache_folder()
        self.convert_dir = convert_dir
        self.failed = {}  # file name -> reason
        self._lock = threading.Lock()
        self._locks = {}  # file name -> its lock: two requests for a new model convert it once

    def base(self, base):
        return self._file('base', base, lambda out, convert: export.convert_hf_to_gguf(
            base, out, 'f16', convert, _quiet))

    def adapter(self, adapter, base):
        return self._file('lora', adapter, lambda out, convert: export.convert_lora_to_gguf(
            adapter, base, out, convert, _quiet))

    def path(self, kind, folder):
        """Where the GGUF of a folder ('base' or 'lora') in its present version is kept here."""
        key = hashlib.sha1(('%s|%s' % (os.path.realpath(folder), folder_version(folder))).encode()).hexdigest()[:20]
        return os.path.join(self.folder, '%s-%s-f16.gguf' % (kind, key))

    def adopt(self, kind, folder, made, expected):
        """Keep `made`, a GGUF f16 of `folder` made elsewhere with the same converter (the GGUF
        export, trainer/export.py), as this cache's file for it: the server then does not convert it
        again. Only while the folder is still the version it was made from (`expected`: path()
        before it was made) and when the cache has none yet. The path kept, or None."""
        path = self.path(kind, folder)
        if path != expected or os.path.isfile(path):
            return None
        os.makedirs(self.folder, exist_ok=True)
        tmp = '%s.tmp.%d' % (path, os.getpid())
        try:
            os.link(made, tmp)
        except OSError:  # another file system: a copy still spares a conversion
            shutil.copyfile(made, tmp)
        os.replace(tmp, path)
        return path

    def _file(self, kind, folder, convert):
        path = self.path(kind, folder)
        name = os.path.basename(path)
        with self._lock:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if os.path.isfile(path):
                return path
            if name in self.failed:
                raise Unservable(self.failed[name])
            try:
                converter = export.convert_dir(self.convert_dir)
                os.makedirs(self.folder, exist_ok=True)
                tmp = '%s.tmp.%d' % (path, os.getpid())
                convert(tmp, converter)
                os.replace(tmp, path)  # whole or absent: a crash mid-way leaves no half file
            except export.ExportError as e:
                self.failed[name] = 'llama.cpp cannot serve %s: %s' % (folder, e)
                raise Unservable(self.failed[name])
            return path


def _quiet(*args, **kwargs):
    pass


class Served(object):
    """One llama.cpp server (xllamacpp, in-process) of a base model, with one LoRA adapter applied
    to every request or none, decoding on `threads` threads."""

    def __init__(self, base, gguf, adapter, adapter_gguf, slots, threads, context):
        import xllamacpp as xlc
        self.base, self.gguf, self.adapter, self.adapter_gguf, self.context = base, gguf, adapter, adapter_gguf, context
        self.threads = threads
        params = xlc.CommonParams()
        params.model.path = gguf
        params.n_parallel = slots
        params.cont_batching = True
        params.n_ctx = context * slots
        # Set only here: xllamacpp has no way to change them on a running server (the engine starts
        # another one instead). This wheel runs ggml's threads with OpenMP (cpuparams.poll is not used).
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.warmup = False
        params.verbosity = -1
        params.cache_ram_mib = 0  # no host-memory prompt cache: each slot keeps its own last prompt's keys
        if adapter:
            params.lora_adapters = [xlc.CommonAdapterLoraInfo(adapter_gguf, 1.0)]  # on for every request
        self.server = xlc.Server(params)
        self.running = 0
        self.tickets = set()  # the requests running here
        self.last_used = None  # the engine's clock, set by the engine
        self.bytes = _server_bytes(base, adapter_gguf, context * slots)

    @property
    def key(self):
        return self.base, self.adapter


class LlamaCppEngine(RequestLine):
    """Requests on llama.cpp, up to `max_batch` decoding at once per base (its parallel slots),
    `max_queue` more waiting; one thread admits them in order and each admitted one runs in a
    thread of its own (xllamacpp's call blocks while llama.cpp's loop decodes every slot)."""
    thread_name = 'llamacpp-engine'

    def __init__(self, files=None, roots=None, max_batch=8, max_queue=16, idle_unload=900, max_adapters=8,
                 max_memory_mb=None, threads=None, keep_threads_for=5.0, clock=time.monotonic, autostart=True):
        from transformers import AutoTokenizer  # here, once: transformers' lazy import is not safe in two threads at once
        from trainer.precision import available_cores
        self._tokenizer_class = AutoTokenizer
        self.files = files or GgufFiles()
        self.roots = None if roots is None else [os.path.realpath(root) for root in roots]
        self._init_line(max_batch, max_queue, autostart)
        self.idle_unload = idle_unload
        self.max_adapters = max(1, int(max_adapters))
        self.max_memory = max_memory_mb * 2 ** 20 if max_memory_mb else None
        # No bound set: one base at a time, and its servers (each adapter's has its own KV cache of
        # max_batch x context tokens: 0.75 GB for SmolLM2-135M, about 4 GB for an 8B model) while
        # they fit half the memory the host had available when the engine started.
        self.spare_memory = None if self.max_memory else _available_memory(0.5)
        self.threads = threads or available_cores()
        self.keep_threads_for = keep_threads_for  # see _fit
        self.clock = clock
        self.served = collections.OrderedDict()  # (base, adapter or None) -> Served, least recently used first
        # ((base, adapter), threads) -> an idle server that is not its key's current one, kept for
        # when that width is wanted again
        self.spares = {}
        self.tokenizers = collections.OrderedDict()
        self.unloaded = []
        self.stats = {'finished': 0, 'cancelled': 0, 'max_running': 0, 'starts': 0, 'prompt_cached': 0,
                      'max_servers_busy': 0, 'narrowed': 0, 'widened': 0, 'moved': 0}
        self._running = 0

    # -- the seam -------------------------------------------------------------------------------
    def prepare(self, path):
        """(base folder, its GGUF, adapter folder or None, its GGUF or None) for a model folder,
        converting what is not converted yet; RequestError 403/404 as the transformers engine,
        Unservable when llama.cpp cannot serve it."""
        try:
            import xllamacpp  # noqa: F401
        except ImportError as e:
            raise Unservable('llama.cpp is not installed in the trainer environment (xllamacpp: %s)' % e)
        real = check_allowed(path, self.roots)
        what, base = model_kind(real, self.roots)
        base_gguf = self.files.base(base)
        if what != 'adapter':
            return base, base_gguf, None, None
        return base, base_gguf, real, self.files.adapter(real, base)

    def fits(self, request):
        """Whether the request's prompt leaves room in a llama.cpp slot (SLOT_CONTEXT tokens at most)."""
        base, _gguf, adapter, _adapter_gguf = self.prepare(request['model'])
        return len(self._prompt_ids(request, base, adapter)) < min(_context_length(base), SLOT_CONTEXT)

    def _prompt_ids(self, request, base, adapter):
        tokenizer = self._tokenizer_of(base, adapter)
        return list(tokenizer.apply_chat_template(request['messages'], add_generation_prompt=True,
                                                  return_dict=True)['input_ids'])

    def _check(self, request):
        """prepare()'s four and the prompt's token ids: converted and tokenized here, in the
        caller's thread, not the admitting one."""
        base, gguf, adapter, adapter_gguf = self.prepare(request['model'])
        return base, gguf, adapter, adapter_gguf, self._prompt_ids(request, base, adapter)

    def _busy(self):
        return self._running

    def describe(self):
        with self._cond:
            return {'rows': self._running, 'waiting': len(self._waiting), 'max_batch': self.max_batch,
                    'max_queue': self.max_queue, 'idle_unload': self.idle_unload, 'stats': dict(self.stats),
                    'threads': self.threads,
                    'models': [_describe(s) for s in self.served.values()],
                    'spares': [_describe(s) for s in self.spares.values()],
                    'unloaded': list(self.unloaded)}

    def close(self):
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._thread is None and not self._running, 30)
            self.served.clear()  # each server's destructor stops its loop
            self.spares.clear()

    # -- admitting ------------------------------------------------------------------------------
    def _loop(self):
        with self._cond:
            while True:
                if self._stopping:
                    self._stop_waiting()
                    return
                started = False
                while self._waiting and self._running < self.max_batch:
                    ticket = self._waiting[0]
                    if ticket.cancelled:
                        self._waiting.popleft()
                        self.stats['cancelled'] += 1
                        continue
                    try:
                        admitted = self._admit(ticket)
                    except Exception as e:  # this request's failure (a server that does not start), not the loop's
                        self._waiting.popleft()
                        ticket.events.put(('error', e))
                        continue
                    if not admitted:
                        break  # its server needs room that running requests hold: once one of them ends
                    started = True
                if not started:
                    self._unload_idle()
                    self._cond.wait(self._idle_wait())

    def _admit(self, ticket):
        """Start the ticket's request on the server of its base and adapter (started here if need
        be); False when that server's room is held by running requests.

        Threads: llama.cpp decodes a batch with barriers between its steps, so two servers each
        running every core's thread at once wait on each other's descheduled threads (measured on
        2 cores: two adapters' batches at once made 0.48x to 0.58x the tokens/s of one adapter's
        batch on 2 threads, and 0.73x to 0.99x on a thread each: README). So when a server becomes
        busy, each busy server gets cores / busy servers threads: a wider busy server is replaced
        by one of that width and its requests move there once it is ready (they stream on
        meanwhile), each going on from the tokens it had (see _replace, _generate). A server at the
        wrong width is swapped for one of the right width when a request comes for it (a busy one
        too: see _widen). The servers swapped out are kept as spares (a start takes 0.5 to 1.4 s)
        while memory and the threads' budget (see _fit) allow."""
        base, gguf, adapter, adapter_gguf = ticket.prepared[:4]
        key = (base, adapter)
        served = self.served.get(key)
        current = served is not None and _files(served) == (gguf, adapter_gguf)
        wider, width = [], None
        if current and served.running:
            if served.threads < self._width(key):  # the others went idle: it may have more cores
                self._widen(served)
                served = self.served[key]
        else:  # it becomes busy: the others make room on the cores
            width = self._width(key)
            wider = self._wider(key, width)
            if not (current and served.threads == width):
                served = self._server(key, gguf, adapter_gguf, width, wider)
                if served is None:
                    return False
        self.served.move_to_end(key)
        self._waiting.popleft()
        self._place(ticket, served)
        self._running += 1
        self.stats['max_running'] = max(self.stats['max_running'], self._running)
        self.stats['max_servers_busy'] = max(self.stats['max_servers_busy'], len(self._busy_keys()))
        threading.Thread(target=self._run, args=(ticket,), name='llamacpp-request', daemon=True).start()
        self._replace(wider, width)
        return True

    def _all(self):
        return list(self.served.values()) + list(self.spares.values())

    def _busy_keys(self):
        return set(s.key for s in self._all() if s.running)

    def _width(self, key):
        """Threads for each busy server once `key`'s is busy too."""
        return max(1, self.threads // len(self._busy_keys() | {key}))

    def _wider(self, key, width):
        """The busy servers (but `key`'s) on more than `width` threads."""
        return [served for other, served in self.served.items()
                if other != key and served.running and served.threads > width]

    def _widen(self, served):
        """Replace a busy server on fewer threads than its share of the cores by one of that share,
        as the threads' budget allows (see _fit), and move its requests there: else a server
        narrowed while another adapter was busy would keep its few threads as long as its own chats
        kept coming. Only once the other servers have been idle keep_threads_for seconds: each move
        prefills its requests again, and another adapter's next chat would narrow it at once."""
        now = self.clock()
        if any(s is not served and (s.running or now - s.last_used < self.keep_threads_for) for s in self.served.values()):
            return
        width = self._width(served.key)
        if (served.key, width) not in self.spares:  # (_fit would count that spare's threads as taken)
            width = self._fit(served.key, width, [served])
        if width > served.threads:
            self._replace([served], width)

    def _replace(self, servers, width):
        """Make a server of `width` threads current in place of each of `servers` (a spare, else a
        new one) and move its requests there. Each request's thread sees it moved at its next
        token (see _generate_on): until then, and when no server can be had (no room, a start that
        fails), it goes on where it is."""
        for old in servers:
            if not old.running or self.served.get(old.key) is not old:
                continue  # its requests ended while a server started: it is swapped at its next one
            try:
                new = self._server_of_width(old.key, _files(old), width, [old])
            except Exception as e:  # the old one goes on serving: slower, not wrong
                sys.stderr.write('llama.cpp: no %d-thread server for %s: %s\n' % (width, old.adapter or old.base, e))
                continue
            if new is None:
                continue
            self.served[old.key] = new
            self.spares[(old.key, old.threads)] = old
            old.last_used = self.clock()
            self.stats['moved'] += len(old.tickets)
            self.stats['narrowed' if new.threads < old.threads else 'widened'] += 1
            for ticket in list(old.tickets):
                old.running -= 1
                old.tickets.discard(ticket)
                self._place(ticket, new)
        if servers:
            self._trim()
            self._cond.notify_all()  # whoever waits on the engine's state (a test) looks again

    def _place(self, ticket, served):
        served.running += 1
        served.tickets.add(ticket)
        ticket.served = served

    def _spare(self, key, width, files):
        """The spare server of `key` with `width` threads, taken out of the spares, if it serves
        `files` (else it goes)."""
        spare = self.spares.pop((key, width), None)
        return spare if spare is not None and _files(spare) == files else None

    def _server(self, key, gguf, adapter_gguf, width, leaving=()):
        """A server of `key` for `width` threads, made current in place of its idle one (kept as a
        spare, or unloaded if it serves older files); None when its room is held by running
        requests. `leaving`: busy servers whose requests are to move (see _fit)."""
        base, adapter = key
        served = self.served.get(key)
        if served is not None:
            if served.running:
                return None  # a retrained base or adapter: its new files once its requests end
            if _files(served) != (gguf, adapter_gguf):
                self._unload(key, 'a new version')
            else:
                del self.served[key]
                self.spares[(key, served.threads)] = served
        if adapter:
            mine = [k for k in self.served if k[0] == base and k[1]]
            if len(mine) >= self.max_adapters:
                idle = [k for k in mine if not self.served[k].running]
                if not idle:
                    return None
                self._unload(idle[0], 'room for %s (max_adapters %d)' % (os.path.basename(adapter), self.max_adapters))
        served = self._server_of_width(key, (gguf, adapter_gguf), width, leaving)
        if served is not None:
            self.served[key] = served
        return served

    def _server_of_width(self, key, files, width, leaving=()):
        """A server of `key` serving `files` on `width` threads, or fewer where the worker budget
        says so (see _fit): a spare one, else a new one; None when there is no room for it."""
        served = self._spare(key, width, files)
        if served is None:
            width = self._fit(key, width, leaving)
            served = self._spare(key, width, files)
        if served is None and self._make_room(key[0], files[0], self._cost(key, files[1])):
            served = self._start(key, files[0], files[1], width)
        return served

    def _workers(self, leaving=()):
        """OpenMP worker threads the servers hold: a server of n threads keeps n - 1 while it lives,
        busy or not."""
        return sum(s.threads - 1 for s in self._all() if s not in leaving)

    def _fit(self, key, width, leaving=()):
        """`width`, or fewer threads: libgomp (the OpenMP runtime of this wheel) makes every barrier
        of the process sleep at once instead of spinning (its "throttled" wait) as soon as its
        worker threads, counted over every server alive, reach the cores; measured on 2 cores, one
        adapter's batch on a 2-thread server fell from 52.7 to 30-32 tokens/s once a second 2-thread
        server existed, idle. So the servers hold at most cores - 1 workers in all: idle spares of
        more than one thread go first, then other keys' idle current ones, but only once idle for
        keep_threads_for seconds (in a burst of chats for two adapters the one that comes first
        would otherwise start a server on every core, about a second, only to be narrowed at once).
        `leaving`: busy servers about to go idle (their requests are to move), not counted."""
        budget = self.threads - 1

        def over():
            return self._workers(leaving) + width - 1 > budget
        self._drop_wide_spares(lambda: not over())
        now = self.clock()
        for other in [k for k, s in self.served.items() if k != key and s.threads > 1 and not s.running and
                      now - s.last_used >= self.keep_threads_for]:
            if not over():
                break
            self._unload(other, 'its threads for %s' % os.path.basename(key[1] or key[0]))
        return max(1, min(width, 1 + budget - self._workers(leaving)))

    def _trim(self):
        """Unload idle spares of more than one thread while the servers hold more workers than the
        cores allow (see _fit): a server replaced by a narrower one, once its requests moved."""
        self._drop_wide_spares(lambda: self._workers() < self.threads)

    def _drop_wide_spares(self, enough):
        """Unload spares of more than one thread, least recently used first, until enough()."""
        for spare in sorted((k for k, s in self.spares.items() if s.threads > 1), key=lambda k: self.spares[k].last_used):
            if enough():
                break
            del self.spares[spare]

    def _cost(self, key, adapter_gguf):
        return _server_bytes(key[0], adapter_gguf, min(_context_length(key[0]), SLOT_CONTEXT) * self.max_batch)

    def _start(self, key, gguf, adapter_gguf, threads):
        base, adapter = key
        self._cond.release()  # starting a server takes a while: callers may queue meanwhile
        try:
            served = Served(base, gguf, adapter, adapter_gguf, self.max_batch, threads,
                            min(_context_length(base), SLOT_CONTEXT))
        finally:
            self._cond.acquire()
        served.last_used = self.clock()
        self.stats['starts'] += 1
        return served

    def _memory(self, extra_gguf=None):
        """Bytes the servers hold: each base GGUF once (its servers share its mmapped pages), each
        server's adapter and KV cache."""
        servers = self._all()
        files = set(s.gguf for s in servers) | set([extra_gguf] if extra_gguf else [])
        return sum(os.path.getsize(f) for f in files) + sum(s.bytes for s in servers)

    def _make_room(self, base, gguf, cost):
        """Unload idle servers (spares first, then other bases' servers, then the least recently
        used) until a new one of this base fits the memory bound (unset: one base at a time, in
        spare_memory)."""
        def over():
            needed = self._memory(gguf) + cost
            if not self.max_memory:
                return any(b != base for b, _a in self.served) or bool(self.spare_memory and needed > self.spare_memory)
            return needed > self.max_memory
        while (self.served or self.spares) and over():
            spares = sorted(self.spares, key=lambda k: self.spares[k].last_used)
            if spares:
                del self.spares[spares[0]]
                continue
            idle = sorted((k for k, s in self.served.items() if not s.running), key=lambda k: k[0] == base)
            if not idle:
                return False
            self._unload(idle[0], 'room for %s' % base)
        return True

    def _unload(self, key, reason):
        """Unload the current server of `key` and its spares."""
        served = self.served.pop(key, None)
        for spare in [k for k in self.spares if k[0] == key]:
            del self.spares[spare]
        if served is not None:
            self.unloaded = (self.unloaded + [{'base': key[0], 'adapter': key[1], 'reason': reason,
                                               'at': time.time()}])[-5:]
            self._cond.notify_all()  # whoever waits on the engine's state (a test, close) looks again

    def _idle_wait(self):
        idle = [s.last_used for s in self._all() if not s.running]
        if not self.idle_unload or not idle:
            return None
        return max(0.05, min(idle) + self.idle_unload - self.clock())

    def _unload_idle(self):
        """Unload the servers idle for idle_unload (spares too)."""
        now = self.clock()
        for key, spare in list(self.spares.items()):
            if self.idle_unload and now - spare.last_used >= self.idle_unload:
                del self.spares[key]
        if not self.idle_unload:
            return
        for key, served in list(self.served.items()):
            if not served.running and now - served.last_used >= self.idle_unload:
                self._unload(key, 'idle for %d s' % (now - served.last_used))

    # -- one request ----------------------------------------------------------------------------
    def _run(self, ticket):
        end = None
        try:
            final = self._generate(ticket)
            if final is not None:
                end = ('done', final)
        except Exception as e:  # this request's failure: its caller hears it
            end = ('error', e)
        finally:
            with self._cond:  # no longer busy before its caller hears the end: its next request sees the cores free
                served = ticket.served
                served.running -= 1
                served.tickets.discard(ticket)
                served.last_used = self.clock()
                self._running -= 1
                self.stats['finished'] += 1
                self._cond.notify_all()
            if end is not None:
                ticket.events.put(end)

    def _generate(self, ticket):
        """Stream the ticket's answer from its server. A request moved to another server (see
        _replace) goes on there from the tokens it had streamed: the prompt and those tokens are
        prefilled again and it decodes the rest. A sampled one goes on with its seed, so its text
        is not the one an unmoved run with that seed gives."""
        request = ticket.request
        run = {'text': '', 'pieces': [], 'tokens': 0, 'finish': None, 'error': None, 'usage': None, 'timings': None,
               'stop': StopText(request['stop']),
               'seed': request['seed'] if request['seed'] is not None else random.randrange(2 ** 31)}
        while True:
            with self._cond:
                served = ticket.served
            final = self._generate_on(ticket, served, run)
            if final is not MOVED:
                return final

    def _streamed_ids(self, ticket, run):
        """The token ids the ticket has streamed so far. Each piece llama.cpp streams is one token's
        text, which a byte-level BPE tokenizer maps back to that token (SmolLM2's, 8 answers of 96
        tokens, greedy and sampled: the ids llama.cpp decoded, but the end-of-turn token, streamed
        as an empty piece); a character split over tokens comes as one piece, tokenized as it is.
        Where the pieces' ids do not give the text back one id a piece (a SentencePiece tokenizer
        marks each piece as a word's start), the whole text is tokenized instead. Asking llama.cpp
        for each token's id (n_probs) cost 10-15% of the tokens/s greedy, a third sampled."""
        base, _gguf, adapter = ticket.prepared[:3]
        tokenizer = self._tokenizer_of(base, adapter)
        pieces = [piece for piece in run['pieces'] if piece]
        ids = [i for each in tokenizer(pieces, add_special_tokens=False)['input_ids'] for i in each]
        if len(ids) == len(pieces) and tokenizer.decode(ids) == ''.join(pieces):
            return ids
        return tokenizer.encode(''.join(pieces), add_special_tokens=False)

    def _generate_on(self, ticket, served, run):
        request = ticket.request
        ids = ticket.prepared[4]
        done = self._streamed_ids(ticket, run) if any(run['pieces']) else []
        before = len(done)  # tokens streamed on the servers it moved from
        room = served.context - len(ids) - len(done)
        if before and (before >= request['max_tokens'] or room < 1):  # it moved after its last token
            run['finish'] = 'length'
            self._stream(ticket, run, '')
            return {'finish_reason': 'length', 'prompt_tokens': len(ids), 'completion_tokens': before}
        if room < 1:
            raise RequestError('the messages take %d tokens; the model\'s context here is %d' % (len(ids), served.context))
        # cache_prompt: a slot keeps its last prompt's keys and a request starting the same way (the
        # chat template's system prompt, a chat's earlier turns) prefills only what follows, as
        # llama.cpp's own server does by default (without it each request prefilled its whole prompt:
        # most of the gap to that server at one stream). Each server has one adapter: a slot's keys
        # are always that adapter's.
        body = {'prompt': ids + done, 'max_tokens': min(request['max_tokens'] - before, room), 'stream': True,
                'cache_prompt': True, 'temperature': request['temperature'], 'top_p': request['top_p'], 'top_k': 0,
                'min_p': 0.0, 'seed': run['seed']}
        moved = []

        def on_chunk(chunk):
            if ticket.served is not served:  # moved (see _replace): this token is dropped
                moved.append(True)
                return True
            if 'error' in chunk:
                run['error'] = chunk['error']
                return True
            choice = chunk['choices'][0]
            text = choice.get('text') or ''
            if choice.get('finish_reason'):
                run['finish'] = 'stop' if choice['finish_reason'] == 'stop' else 'length'
                run['usage'] = chunk.get('usage')
                run['timings'] = chunk.get('timings')
            else:
                run['tokens'] += 1
                run['pieces'].append(text)
            over = self._stream(ticket, run, text)
            return bool(ticket.cancelled or over or self._stopping)  # True: llama.cpp drops the request

        served.server.handle_completions(body, on_chunk)
        if moved:
            return MOVED
        if run['error'] is not None:
            error = run['error']
            raise RequestError('llama.cpp: %s' % (error.get('message') if isinstance(error, dict) else error),
                               error.get('code', 500) if isinstance(error, dict) else 500)
        if ticket.cancelled:
            with self._cond:
                self.stats['cancelled'] += 1
            return None
        usage = (run['usage'] or {}).get('completion_tokens')
        with self._cond:  # prompt tokens a slot's cache spared prefilling again
            self.stats['prompt_cached'] += (run['timings'] or {}).get('cache_n') or 0
        return {'finish_reason': run['finish'] or 'length', 'prompt_tokens': len(ids),
                'completion_tokens': run['tokens'] if usage is None else before + usage}

    @staticmethod
    def _stream(ticket, run, text):
        """Add a chunk's text to the answer and hand its caller what the stop strings let through
        (all of it once the answer ends); True when the request is over (a stop string, its
        deadline)."""
        run['text'] += text
        deadline = ticket.request.get('deadline')
        late = deadline is not None and time.monotonic() >= deadline
        delta = run['stop'].feed(run['text'], final=bool(run['finish']) or late)
        if delta:
            ticket.events.put(('delta', delta))
        if run['stop'].stopped:
            run['finish'] = 'stop'
        elif late and not run['finish']:
            run['finish'] = 'length'
        return run['stop'].stopped or late

    def _tokenizer_of(self, base, adapter):
        """The tokenizer of an adapter's folder if it has one, else its base's."""
        return self._tokenizer(adapter if adapter and os.path.isfile(os.path.join(adapter, 'tokenizer_config.json'))
                               else base)

    def _tokenizer(self, folder):
        with self._cond:
            tokenizer = self.tokenizers.get(folder)
        if tokenizer is None:
            tokenizer = self._tokenizer_class.from_pretrained(folder)
            with self._cond:
                self.tokenizers[folder] = tokenizer
                while len(self.tokenizers) > self.max_adapters + 1:
                    self.tokenizers.popitem(last=False)
        return tokenizer


def _describe(served):
    return {'base': served.base, 'gguf': served.gguf, 'adapters': [served.adapter] if served.adapter else [],
            'running': served.running, 'threads': served.threads, 'mb': round(served.bytes / 2 ** 20)}


def _files(served):
    return served.gguf, served.adapter_gguf


def _server_bytes(base, adapter_gguf, tokens):
    """What one server holds beside its base's shared GGUF: its adapter's GGUF (if any) and the KV
    cache llama.cpp allocates for `tokens` of context (f16 keys and values)."""
    with open(os.path.join(base, 'config.json')) as f:
        config = json.load(f)
    heads = config.get('num_attention_heads') or 1
    head_dim = config.get('head_dim') or (config.get('hidden_size') or 0) // heads
    per_token = (config.get('num_hidden_layers') or 0) * 2 * (config.get('num_key_value_heads') or heads) * head_dim * 2
    return (os.path.getsize(adapter_gguf) if adapter_gguf else 0) + tokens * per_token


def _available_memory(share):
    """`share` of the memory this host has available now (Linux's MemAvailable, capped by a cgroup
    limit), in bytes; None where it cannot be read."""
    try:
        with open('/proc/meminfo') as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
    except (OSError, StopIteration, ValueError):
        return None
    try:
        with open('/sys/fs/cgroup/memory.max') as f:
            limit = f.read().strip()
        if limit.isdigit():
            available = min(available, int(limit))
    except OSError:
        pass
    return int(available * share)


def _context_length(base):
    with open(os.path.join(base, 'config.json')) as f:
        config = json.load(f)
    return config.get('max_position_embeddings') or config.get('n_positions') or 2048


class EngineChoice(TicketReader):
    """The engine seam over both engines: each request goes to the one `setting` picks (see the
    module's docstring); describe() is the transformers engine's, with the setting and
    llama.cpp's own state beside it."""

    def __init__(self, setting, transformers, llamacpp=None, on_cuda=None):
        if setting not in SETTINGS:
            raise ValueError('the serving engine must be one of %s, not %r' % (', '.join(SETTINGS), setting))
        self.setting = setting
        self.transformers = transformers
        self.llamacpp = llamacpp
        self.on_cuda = cuda_available() if on_cuda is None else on_cuda
        self.cache = transformers.cache

    def __getattr__(self, name):  # the rest (stats, sync, the waiting line) is the transformers engine's
        if name in ('transformers', 'llamacpp'):
            raise AttributeError(name)
        return getattr(self.transformers, name)

    def engine_for(self, request):
        """(engine, why) for a request; the llama.cpp engine converts its model here, once."""
        if self.setting == 'transformers':
            return self.transformers, 'the setting says transformers'
        if self.setting == 'auto' and self.on_cuda:
            return self.transformers, 'CUDA: transformers batches on the GPU'
        if self.llamacpp is None:
            if self.setting == 'llamacpp':
                raise RequestError('the setting says llamacpp but this server has no llama.cpp engine', 500)
            return self.transformers, 'no llama.cpp engine'
        try:
            fits = self.llamacpp.fits(request)
        except Unservable as e:
            if self.setting == 'llamacpp':
                raise RequestError(str(e), 500)
            sys.stderr.write('%s: served with transformers\n' % e)
            return self.transformers, str(e)
        if not fits and self.setting == 'auto':  # transformers takes the model's whole context
            return self.transformers, 'the prompt is over llama.cpp\'s %d-token slot' % SLOT_CONTEXT
        return self.llamacpp, 'llama.cpp on the CPU'

    def submit(self, request):
        return self.engine_for(request)[0].submit(request)

    def describe(self):
        snapshot = dict(self.transformers.describe(), setting=self.setting, on_cuda=self.on_cuda)
        if self.llamacpp is not None:
            snapshot['llamacpp'] = self.llamacpp.describe()
        return snapshot

    def close(self):
        if self.llamacpp is not None:
            self.llamacpp.close()
        self.transformers.close()


def make_engine(setting, cache, max_batch=8, max_queue=16, idle_unload=900, max_memory_mb=None, gguf_cache=None,
                convert_dir=None):
    """The engine trainer/serve.py serves with for an --engine setting."""
    transformers = Engine(cache, max_batch=max_batch, max_queue=max_queue, idle_unload=idle_unload)
    llamacpp = None
    if setting != 'transformers':
        llamacpp = LlamaCppEngine(GgufFiles(gguf_cache, convert_dir), roots=cache.roots, max_batch=max_batch,
                                  max_queue=max_queue, idle_unload=idle_unload, max_adapters=cache.max_adapters,
                                  max_memory_mb=max_memory_mb)
    return EngineChoice(setting, transformers, llamacpp)
