"""Continuous batching for the model server (trainer/serve.py): one loop thread decodes every
running request together, one forward pass a step for all of them.

Decoding is bound by reading the weights, so a step over 8 rows costs little more than over one.
A request that arrives while others decode is prefilled alone (its own KV cache, so its first
token is what a one-at-a-time server gives) and joins the running batch at the next step; a row
leaves when it finishes, when its caller goes away (`Ticket.cancel`) or when its time is up.

Why not transformers' own continuous batching (`generate_batch`, paged cache): it cannot run two
LoRA adapters in one batch, and requests for different fine-tunes of one base must share it.
peft can (`adapter_names`, one name a row), so the step loop is ours: a left-padded batch,
a DynamicCache rebuilt from per-layer tensors when rows join or leave, explicit position ids.
Each row keeps its own sampling (greedy, or temperature/top_p with its own torch.Generator,
seeded from the request's `seed`), its stop strings, max_tokens and deadline.

Rows of different base models decode in separate batches, stepped in turn; several bases stay
loaded at once up to a memory bound (ModelCache), and a base idle for `idle_unload` seconds is
unloaded (reloaded on the next request), which /health reports.

The seam other servers call (the HTTP handler, a Ray Serve deployment):

    engine = Engine(ModelCache(...), max_batch=8, max_queue=16, idle_unload=900)
    final = engine.chat(request, emit, is_gone=None)   # request: serve.parse_chat_request(...)
    answer = engine.whole_answer(request)              # {'text', 'finish_reason', ...}
    engine.describe()                                  # what /health shows
    engine.close()
"""
import collections
import queue
import sys
import threading
import time

from trainer.serve import ClientGone, RequestError, StopText, _eos_ids, context_length, model_kind

BUSY_RETRY_AFTER = 5


class Ticket(object):
    """One request in the engine: events out (('delta', str), ('done', final), ('error', exc)),
    a cancel flag in, read by the loop at its next step."""

    def __init__(self, request):
        self.request = request
        self.events = queue.Queue()
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class Samples(object):
    """The tickets of a request for n answers: samples of one prompt, side by side in the batch."""

    def __init__(self, tickets):
        self.tickets = tickets

    def cancel(self):
        for ticket in self.tickets:
            ticket.cancel()


def sample_request(request, i):
    """The i-th sample of a request for n answers: its own seed (seed + i), when one was given."""
    seed = request.get('seed')
    return dict(request, n=1, seed=None if seed is None else seed + i)


class Row(object):
    """A request decoding: its tokens so far, its stop text, its sampler."""

    def __init__(self, ticket, tokenizer, adapter, prompt_tokens, max_new, eos):
        import torch
        request = ticket.request
        self.ticket = ticket
        self.tokenizer = tokenizer
        self.adapter = adapter
        self.prompt_tokens = prompt_tokens
        self.length = prompt_tokens  # real tokens in its cache
        self.max_new = max_new
        self.eos = eos
        self.ids = []
        self.text = StopText(request['stop'])
        self.next_token = None
        self.finish = None
        self.temperature = request['temperature']
        self.top_p = request['top_p']
        self.generator = None
        if self.temperature > 0:
            self.generator = torch.Generator()
            if request['seed'] is not None:
                self.generator.manual_seed(request['seed'])
            else:
                self.generator.seed()

    def pick(self, logits):
        """The next token from this row's last logits (1-D, float32)."""
        import torch
        if self.generator is None:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < self.top_p  # the first always stays
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def accept(self, token, now):
        """Take one token: stream the safe part of the text, decide whether the row ends."""
        self.ids.append(token)
        self.next_token = token
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        ended = token in self.eos
        deadline = self.ticket.request.get('deadline')
        out_of_room = len(self.ids) >= self.max_new or (deadline is not None and now >= deadline)
        last = ended or out_of_room
        if last or not text.endswith('\ufffd'):  # else a character cut between tokens: wait for its other bytes
            delta = self.text.feed(text, final=last)
            if delta:
                self.ticket.events.put(('delta', delta))
        if self.text.stopped or ended:
            self.finish = 'stop'
        elif out_of_room:
            self.finish = 'length'
        if self.finish:
            self.ticket.events.put(('done', {'finish_reason': self.finish, 'prompt_tokens': self.prompt_tokens,
                                             'completion_tokens': len(self.ids)}))


class Batch(object):
    """The rows decoding together on one base model: per layer a left-padded key and value
    tensor [rows, heads, length, dim], the attention mask [rows, length], and the rows."""

    def __init__(self, entry):
        self.entry = entry
        self.rows = []
        self.keys = self.values = self.mask = None

    def add(self, row, keys, values):
        import torch
        length = keys[0].shape[2]
        mask = torch.ones((1, length), dtype=torch.long)
        if not self.rows:
            self.keys, self.values, self.mask = keys, values, mask
        else:
            total = max(length, self.mask.shape[1])
            self.keys = [torch.cat([_pad_left(a, total), _pad_left(b, total)]) for a, b in zip(self.keys, keys)]
            self.values = [torch.cat([_pad_left(a, total), _pad_left(b, total)]) for a, b in zip(self.values, values)]
            self.mask = torch.cat([_pad_left(self.mask, total, dim=1), _pad_left(mask, total, dim=1)])
        self.rows.append(row)

    def keep(self, kept):
        """Keep only the rows at these indices, and drop the columns no kept row uses."""
        import torch
        if not kept:
            self.rows, self.keys, self.values, self.mask = [], None, None, None
            return
        index = torch.tensor(kept)
        mask = self.mask[index]
        first = int(torch.nonzero(mask.any(dim=0))[0])
        self.rows = [self.rows[i] for i in kept]
        self.mask = mask[:, first:]
        self.keys = [k[index][:, :, first:] for k in self.keys]
        self.values = [v[index][:, :, first:] for v in self.values]

    def step(self, clock):
        """One forward pass for every row, one token each."""
        import torch
        from transformers import DynamicCache
        rows = self.rows
        model = self.entry.model
        input_ids = torch.tensor([[row.next_token] for row in rows])
        position_ids = torch.tensor([[row.length] for row in rows])
        mask = torch.cat([self.mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=1)
        cache = DynamicCache(ddp_cache_data=list(zip(self.keys, self.values)))
        with torch.inference_mode():
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                        use_cache=True, **_adapter_names(model, rows))
        self.keys = [layer.keys for layer in cache.layers]
        self.values = [layer.values for layer in cache.layers]
        self.mask = mask
        logits = out.logits[:, -1, :].float()
        now = clock()
        for i, row in enumerate(rows):
            row.length += 1
            row.accept(row.pick(logits[i]), now)


def _torch_threads():
    """torch's thread count, read in the thread that makes the engine, after one small parallel
    op there: when OpenMP's first parallel region ran in the loop thread instead, decode steps
    were about 2x slower on the 2-core machine (torch 2.13 CPU; measured, not explained)."""
    import torch
    torch.mm(torch.ones(256, 256), torch.ones(256, 256))
    return torch.get_num_threads()


def _pad_left(tensor, total, dim=2):
    import torch
    missing = total - tensor.shape[dim]
    if not missing:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=tensor.dtype), tensor], dim=dim)


def _adapter_names(model, rows):
    """peft's per-row adapters: only a PeftModel takes them ('__base__': adapters off)."""
    if not hasattr(model, 'peft_config'):
        return {}
    return {'adapter_names': [row.adapter or '__base__' for row in rows]}


class TicketReader(object):
    """Answers read from the tickets `submit` gives (every engine, and the seam that picks one)."""

    def submit(self, request):
        raise NotImplementedError

    def chat(self, request, emit, is_gone=None):
        """Generate the reply, handing text deltas to `emit` as they come; returns {'finish_reason',
        'prompt_tokens', 'completion_tokens'}. `is_gone()` (polled) or an exception from `emit`
        drops the row at the loop's next step."""
        return self.follow(self.submit(request), emit, is_gone)

    def whole_answer(self, request, is_gone=None):
        parts = []
        final = self.chat(request, parts.append, is_gone)
        return dict(final, text=''.join(parts))

    def follow(self, ticket, emit, is_gone=None, poll=0.2):
        """The final answer of a ticket, its deltas handed to `emit`; for Samples (n answers,
        not streamed) the first one's final with 'choices' and the tokens summed."""
        if isinstance(ticket, Samples):
            return self._follow_samples(ticket, emit, is_gone, poll)
        checked = time.monotonic()
        try:
            while True:
                try:
                    kind, value = ticket.events.get(timeout=poll)
                except queue.Empty:
                    kind = None
                if is_gone is not None and (kind is None or time.monotonic() - checked >= poll):
                    checked = time.monotonic()
                    if is_gone():
                        raise ClientGone()
                if kind is None:
                    continue
                if kind == 'delta':
                    emit(value)
                elif kind == 'done':
                    return value
                else:
                    raise value
        except BaseException:
            ticket.cancel()
            raise

    def _follow_samples(self, samples, emit, is_gone, poll):
        choices = []
        try:
            for ticket in samples.tickets:
                parts = []
                final = self.follow(ticket, parts.append, is_gone, poll)
                choices.append(dict(final, text=''.join(parts)))
        except BaseException:
            samples.cancel()
            raise
        emit(choices[0]['text'])
        return {'finish_reason': choices[0]['finish_reason'], 'prompt_tokens': choices[0]['prompt_tokens'],
                'completion_tokens': sum(c['completion_tokens'] for c in choices),
                'choices': [{k: c[k] for k in ('text', 'finish_reason', 'completion_tokens')} for c in choices]}



class RequestLine(TicketReader):
    """The bounded waiting line both engines admit from (this module's, trainer/llamacpp_engine.py's),
    and its thread, started at the first request unless made with autostart=False. An engine sets
    `thread_name` and provides `_check(request)` (in the caller's thread; what it returns rides on
    each ticket as `prepared`), `_busy()` (slots taken) and `_loop()` (the thread)."""
    thread_name = 'engine'

    def _init_line(self, max_batch, max_queue, autostart):
        self.max_batch = max(1, int(max_batch))
        self.max_queue = max(0, int(max_queue))
        self._cond = threading.Condition()
        self._waiting = collections.deque()
        self._thread = None
        self._autostart = autostart
        self._stopping = False

    def submit(self, request):
        """Queue a checked request: a Ticket (Samples for n > 1); what `_check` raises (e.g.
        RequestError 403/404 for a folder it may not or cannot serve), RequestError 503 (with
        retry_after) when the line is full: a request for n samples needs n places."""
        prepared = self._check(request)
        n = request.get('n') or 1
        with self._cond:
            if self._stopping:
                raise RequestError('the model server is stopping', 503)
            free = max(0, self.max_batch - self._busy())
            if len(self._waiting) + n > self.max_queue + free:
                error = RequestError('the server is busy: %d requests are waiting already' % len(self._waiting), 503)
                error.retry_after = BUSY_RETRY_AFTER
                raise error
            tickets = [Ticket(sample_request(request, i) if n > 1 else request) for i in range(n)]
            for ticket in tickets:
                ticket.prepared = prepared
            self._waiting.extend(tickets)
            if self._autostart:
                self.start()
            self._cond.notify_all()
        return tickets[0] if n == 1 else Samples(tickets)

    def start(self):
        with self._cond:
            self._autostart = True
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
                self._thread.start()

    def _stop_waiting(self):
        """At the loop's end (under the lock): every waiting request hears the server is stopping."""
        for ticket in self._waiting:
            ticket.events.put(('error', RequestError('the model server is stopping', 503)))
        self._waiting.clear()
        self._thread = None
        self._cond.notify_all()


class Engine(RequestLine):
    """The loop thread and its waiting line; see the module's docstring."""
    thread_name = 'batching-engine'

    def __init__(self, cache, max_batch=8, max_queue=16, idle_unload=900, clock=time.monotonic, autostart=True):
        self.cache = cache
        self._init_line(max_batch, max_queue, autostart)
        self.idle_unload = idle_unload
        self.clock = clock
        self._batches = collections.OrderedDict()  # base folder -> Batch
        self._threads = _torch_threads()
        self._admitting = 0  # taken from the line, being loaded and prefilled
        self.iterations = 0
        self.stats = {'finished': 0, 'cancelled': 0, 'steps': 0, 'max_rows': 0}
        self._snapshot = self._describe()

    def _check(self, request):
        model_kind(request['model'], self.cache.roots)

    def _busy(self):
        return self._rows() + self._admitting

    def describe(self):
        """A snapshot (taken by the loop): loaded models, rows, waiting, idle unloads."""
        return self._snapshot

    def sync(self, timeout=60):
        """Wait until the loop has gone round once more (tests: after a poke)."""
        with self._cond:
            target = self.iterations + 1
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self.iterations >= target or self._thread is None, timeout)

    def close(self):
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(30)

    # -- the loop -----------------------------------------------------------------------------
    def _rows(self):
        return sum(len(batch.rows) for batch in self._batches.values())

    def _loop(self):
        import torch
        # OpenMP's thread count is per native thread: a new one starts with one thread per CPU
        # of the host (not of this process's share), which oversubscribes a small CPU set badly
        torch.set_num_threads(self._threads)
        while True:
            with self._cond:
                if not self._waiting and not self._rows() and not self._stopping:
                    self._cond.wait(self._idle_wait())
                if self._stopping:
                    self._stop_waiting()
                    return
                admit = []
                while self._waiting and self._rows() + len(admit) < self.max_batch:
                    admit.append(self._waiting.popleft())
                self._admitting = len(admit)
            try:
                later = []
                for ticket in admit:
                    if not self._start(ticket):
                        later.append(ticket)
                with self._cond:
                    self._waiting.extendleft(reversed(later))
                    self._admitting = 0
                for batch in list(self._batches.values()):
                    self._step(batch)
                self._unload_idle()
            except Exception as e:  # a bug here must not leave every caller waiting forever
                sys.stderr.write('batching loop failed: %r\n' % e)
                for batch in self._batches.values():
                    for row in batch.rows:
                        row.ticket.events.put(('error', e))
                    self._leave(batch, [])
                with self._cond:
                    self._admitting = 0
            with self._cond:
                self._snapshot = self._describe()
                self.iterations += 1
                self._cond.notify_all()

    def _start(self, ticket):
        """Load the model, check the prompt, prefill the row alone and let it join its base's
        batch. False: no room for its model now (it waits for a running batch to finish)."""
        import torch
        from transformers import DynamicCache
        if ticket.cancelled:
            self.stats['cancelled'] += 1
            return True
        request = ticket.request
        try:
            busy = set(base for base, batch in self._batches.items() if batch.rows)
            entry, tokenizer, adapter = self.cache.entry(request['model'], busy=busy, now=self.clock())
            if entry is None:
                return False
            inputs = tokenizer.apply_chat_template(request['messages'], add_generation_prompt=True,
                                                   return_tensors='pt', return_dict=True)
            prompt_tokens = int(inputs['input_ids'].shape[1])
            room = context_length(entry.model) - prompt_tokens
            if room < 1:
                raise RequestError('the messages take %d tokens; the model\'s context is %d'
                                   % (prompt_tokens, context_length(entry.model)))
            row = Row(ticket, tokenizer, adapter, prompt_tokens, min(request['max_tokens'], room),
                      _eos_ids(entry.model, tokenizer))
            cache = DynamicCache()
            with torch.inference_mode():
                out = entry.model(input_ids=inputs['input_ids'], attention_mask=inputs['attention_mask'],
                                  past_key_values=cache, use_cache=True, **_adapter_names(entry.model, [row]))
            row.accept(row.pick(out.logits[0, -1, :].float()), self.clock())
        except Exception as e:  # this request's failure, not the loop's
            ticket.events.put(('error', e))
            return True
        if row.finish:
            self.stats['finished'] += 1
            return True
        batch = self._batches.get(entry.base)
        if batch is None or batch.entry is not entry:
            batch = self._batches[entry.base] = Batch(entry)
        batch.add(row, [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers])
        entry.in_use[id(row)] = adapter
        return True

    def _step(self, batch):
        gone = [i for i, row in enumerate(batch.rows) if row.ticket.cancelled]
        if gone:
            self.stats['cancelled'] += len(gone)
            self._leave(batch, [i for i in range(len(batch.rows)) if i not in gone])
        if not batch.rows:
            return
        self.stats['max_rows'] = max(self.stats['max_rows'], self._rows())
        try:
            batch.step(self.clock)
        except Exception as e:  # the whole batch failed: every row hears it, the loop goes on
            for row in batch.rows:
                row.ticket.events.put(('error', e))
            self._leave(batch, [])
            return
        self.stats['steps'] += 1
        done = [i for i, row in enumerate(batch.rows) if row.finish]
        if done:
            self.stats['finished'] += len(done)
            self._leave(batch, [i for i in range(len(batch.rows)) if i not in done])

    def _leave(self, batch, kept):
        for i, row in enumerate(batch.rows):
            if i not in kept:
                batch.entry.in_use.pop(id(row), None)
        batch.keep(kept)
        batch.entry.last_used = self.clock()

    def _idle_wait(self):
        """Seconds until the next loaded model falls idle (None: nothing loaded, wait for work)."""
        if not self.idle_unload or not self.cache.entries:
            return None
        oldest = min(entry.last_used for entry in self.cache.entries.values())
        return max(0.05, oldest + self.idle_unload - self.clock())

    def _unload_idle(self):
        if not self.idle_unload:
            return
        now = self.clock()
        for base, entry in list(self.cache.entries.items()):
            if not entry.in_use and now - entry.last_used >= self.idle_unload:
                self._batches.pop(base, None)
                self.cache.unload(base, 'idle for %d s' % (now - entry.last_used))

    def _describe(self):
        return {'rows': self._rows(), 'waiting': len(self._waiting), 'max_batch': self.max_batch,
                'max_queue': self.max_queue, 'idle_unload': self.idle_unload,
                'max_memory_mb': self.cache.max_memory // 2 ** 20 if self.cache.max_memory else None,
                'stats': dict(self.stats)}
