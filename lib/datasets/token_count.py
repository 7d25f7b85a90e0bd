"""Token counters for dataset validation (plain Python, Odoo's 3.7): count(messages, limit=None).

Counts are what the trainer or the service will see. Local models: the model's chat template,
default system prompt included. Odoo's Python cannot render those templates (Jinja2 2.x here), so
the trainer environment measures once what the template adds around each message
(trainer/chat_template_costs.py, checked against apply_chat_template) and Odoo counts contents
with the same tokenizer.json in Rust (`template_counter`). Whatever the table cannot count exactly
(tool calls, a template that is not additive) goes to an exact counter process in the trainer
environment (`PipeCounter`), as OpenAI's tiktoken counts do.
"""
import json
import select
import subprocess
import threading

from .dataset_validator import estimate_tokens, message_text
from ..host import processes

PIECE_CHARS = 32768  # longer contents are counted in pieces (a piece boundary may add a token)
KNOWN_TEXTS = 10000  # texts whose counts are kept across batches (repeated prompts)...
KNOWN_TEXT_CHARS = 2000  # ...if no longer than this
_TOKENIZERS = {}


class CounterUnavailable(Exception):
    """The counter process died or did not answer in time."""


class PipeCounter(object):
    """A counter process kept open for a validation: one JSON example per line in, one count
    per line out (-1: it cannot count that one; the estimate is used). Every answer has a
    timeout; a dead or stuck process is restarted once per call before giving up."""

    def __init__(self, command, env=None, cwd=None, timeout=60):
        self.command, self.env, self.cwd, self.timeout = command, env, cwd, timeout
        self._lock = threading.Lock()
        self._process = None

    def _start(self):
        self._process = processes.spawn(self.command, cwd=self.cwd, env=self.env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def _ask(self, line):
        if self._process is None or self._process.poll() is not None:
            self._start()
        self._process.stdin.write(line)
        self._process.stdin.flush()
        ready, _w, _x = select.select([self._process.stdout], [], [], self.timeout)
        if not ready:
            raise CounterUnavailable('no answer within %d s' % self.timeout)
        answer = self._process.stdout.readline()
        if not answer:
            raise CounterUnavailable('the counter process stopped')
        return int(answer)

    def __call__(self, messages, limit=None):
        line = json.dumps({'messages': messages}).encode('utf-8') + b'\n'
        with self._lock:
            try:
                count = self._ask(line)
            except (CounterUnavailable, OSError, ValueError):
                self.close(kill=True)
                try:
                    count = self._ask(line)  # once more, on a fresh process
                except (CounterUnavailable, OSError, ValueError) as e:
                    self.close(kill=True)
                    raise CounterUnavailable('%s (%s)' % (e, ' '.join(self.command[:3])))
        return count if count >= 0 else estimate_tokens(messages)

    def close(self, kill=False):
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        if kill:
            process.kill()
            process.wait()
            return
        process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def tokenizer_of(tokenizer_json):
    from tokenizers import Tokenizer
    return _TOKENIZERS.get(tokenizer_json) or _TOKENIZERS.setdefault(tokenizer_json, Tokenizer.from_file(tokenizer_json))


class TemplateCounter(object):
    """Counts as the chat template renders (see trainer/chat_template_costs.py for `table`),
    stopping once past `limit`; examples the table cannot count go to `exact` (a PipeCounter)."""

    def __init__(self, tokenizer_json, table, exact=None):
        self.tokenizer = tokenizer_of(tokenizer_json)
        self.table = table
        self.exact = exact
        self._known = {}  # short text -> its token count (bounded: memory stays flat)

    def _countable(self, messages):
        frame = self.table['frame']
        return self.table.get('additive') and all(
            m.get('role') in frame and not m.get('tool_calls') and not m.get('function_call') for m in messages)

    def __call__(self, messages, limit=None):
        if not self._countable(messages):
            return self.exact(messages, limit) if self.exact else estimate_tokens(messages)
        table = self.table
        total = table['prefix'] if messages[0].get('role') != 'system' else 0
        texts = [table['header'][m['role']] + message_text(m.get('content')) for m in messages]
        total += sum(table['frame'][m['role']] for m in messages)
        if sum(len(t) for t in texts) <= PIECE_CHARS:
            # the usual example: one call into Rust for all its messages
            return total + sum(len(e.ids) for e in self.tokenizer.encode_batch(texts, add_special_tokens=False))
        for text in texts:
            for start in range(0, max(len(text), 1), PIECE_CHARS):
                total += len(self.tokenizer.encode(text[start:start + PIECE_CHARS], add_special_tokens=False).ids)
                if limit and total > limit:
                    return total
        return total

    def count_text(self, text, limit=None):
        """Plain text as the trainer tokenizes it for continued pre-training: no chat template,
        the text's tokens and one end token; stops once past `limit`."""
        total = 1
        for start in range(0, max(len(text), 1), PIECE_CHARS):
            total += len(self.tokenizer.encode(text[start:start + PIECE_CHARS], add_special_tokens=False).ids)
            if limit and total > limit:
                break
        return total

    def count_many(self, examples, limit=None):
        """The counts of many examples: one call into Rust (and its threads) for all their texts,
        each distinct text once (a dataset's shared system prompt is encoded once, and kept)."""
        counts, owned, new = [], [], {}  # new: text -> its position in the call
        known = self._known
        for i, messages in enumerate(examples):
            pieces = [self.table['header'][m['role']] + message_text(m.get('content'))
                      for m in messages] if self._countable(messages) else None
            if pieces is None or sum(len(p) for p in pieces) > PIECE_CHARS:
                counts.append(self(messages, limit))  # the exact counter, or piece by piece with the limit
                continue
            total = self.table['prefix'] if messages[0].get('role') != 'system' else 0
            total += sum(self.table['frame'][m['role']] for m in messages)
            for piece in pieces:
                if piece in known:
                    total += known[piece]
                else:
                    owned.append((i, new.setdefault(piece, len(new))))
            counts.append(total)
        if new:
            # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not use
            encode = getattr(self.tokenizer, 'encode_batch_fast', self.tokenizer.encode_batch)
            lengths = [len(e.ids) for e in encode(list(new), add_special_tokens=False)]
            for i, position in owned:
                counts[i] += lengths[position]
            for text, position in new.items():
                if len(known) < KNOWN_TEXTS and len(text) <= KNOWN_TEXT_CHARS:
                    known[text] = lengths[position]
        return counts

    def close(self):
        if self.exact:
            self.exact.close()


def tokenizer_counter(tokenizer_json):
    """Contents only, with ChatML's 5 tokens around each message: the fallback when the trainer
    environment cannot describe the template (and the validation benchmark's huge-line probe)."""
    return TemplateCounter(tokenizer_json, {'additive': True, 'prefix': 0,
                                            'frame': {r: 5 for r in ('system', 'user', 'assistant', 'tool')},
                                            'header': {r: '' for r in ('system', 'user', 'assistant', 'tool')}})
