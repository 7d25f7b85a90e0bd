"""Validate chat fine-tuning files (JSONL), streaming line by line.

Rules follow OpenAI's chat fine-tuning format: one JSON object per line with a `messages` list;
roles system/user/assistant/tool; string or parts-list content; optional `weight` (0 or 1) on
assistant turns; `tools`/`tool_calls`; each example needs a user and an assistant message; a
dataset needs at least MIN_EXAMPLES examples; no example may exceed the model's context.
Preference datasets (DPO) follow OpenAI's format: an `input` with the messages, then one
`preferred_output` and one `non_preferred_output` assistant message.

Prompt/completion and text data, and CSV or Parquet files, are read and converted row by row
by dataset_formats.py; each converted row then gets the same checks (text: {"text": ...}).

Every problem names the file, the line (row) and the field (column), and says what to do. Memory
stays flat: a line is parsed, checked and dropped; only an 8-byte digest per example is kept
(duplicates).
"""
import hashlib
import json

from .dataset_formats import (FileProblem, InvalidExample, csv_rows, file_type_mismatch,
                              make_converter, parquet_rows, type_name as _type_name)

try:
    import orjson

    def _loads(raw):
        return orjson.loads(raw)

    def _dumps(example):  # a converted row's bytes: what its duplicates and size are judged by
        return orjson.dumps(example, option=orjson.OPT_SORT_KEYS)
except ImportError:  # the stdlib parser gives the same results, about 2x slower
    def _loads(raw):
        return json.loads(raw.decode('utf-8'))

    def _dumps(example):
        return json.dumps(example, sort_keys=True, ensure_ascii=False, separators=(',', ':')).encode('utf-8')

MIN_EXAMPLES = 10
ROLES = ('system', 'user', 'assistant', 'tool')
EXAMPLE_KEYS = frozenset(('messages', 'tools', 'parallel_tool_calls', 'functions'))
PREFERENCE_KEYS = frozenset(('input', 'preferred_output', 'non_preferred_output'))
MESSAGE_KEYS = frozenset(('role', 'content', 'name', 'weight', 'tool_calls', 'tool_call_id',
                          'function_call', 'refusal'))
CONTENT_PART_TYPES = ('text', 'image_url')
BOM = b'\xef\xbb\xbf'
MAX_REPORTED = 200  # problems kept in the report per kind; the counts stay exact
MAX_LINE_BYTES = 1 << 20  # one example; a longer line is refused unread (odoo.conf can change it)
MAX_FILE_BYTES = 512 << 20  # OpenAI's limit for a fine-tuning file
COUNT_BATCH = 256  # examples whose tokens are counted in one call
COUNT_BATCH_BYTES = 4 << 20  # and at most this much of them held at once (memory stays flat)


def skip_rest_of_line(stream, read):
    """Read past the rest of an over-long line in bounded pieces; the line's full length."""
    size = read
    while True:
        piece = stream.readline(1 << 20)
        size += len(piece)
        if not piece or piece.endswith(b'\n'):
            return size


def estimate_tokens(messages, limit=None):
    """A tokenizer-free estimate: ~4 characters a token plus OpenAI's per-message overhead."""
    chars = 0
    for message in messages:
        chars += len(message_text(message.get('content')))
        for call in message.get('tool_calls') or ():
            chars += len(str(call))
    return chars // 4 + 4 * len(messages) + 3


def estimate_text_tokens(text, limit=None):
    """A tokenizer-free estimate for plain text: ~4 characters a token, plus the end token."""
    return len(text) // 4 + 1


def message_text(content):
    """The text of a message's content, whether a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return ''.join(p.get('text') or '' for p in content if isinstance(p, dict))
    return ''


class Problem(object):
    __slots__ = ('file', 'line', 'field', 'message')

    def __init__(self, file, line, field, message):
        self.file, self.line, self.field, self.message = file, line, field, message

    def __str__(self):
        where = '%s:%s' % (self.file, self.line) if self.line else self.file
        return '%s: %s: %s' % (where, self.field, self.message) if self.field else '%s: %s' % (where, self.message)

    def as_dict(self):
        return {'file': self.file, 'line': self.line, 'field': self.field, 'message': self.message}


def _check_line_object(example, keys, shape, kind):
    if not isinstance(example, dict):
        raise InvalidExample('', 'the line is %s; each line must be a JSON object like %s'
                             % (_type_name(example), shape))
    for key in example:
        if key not in keys:
            raise InvalidExample(key, 'unknown key %r; %s may only have %s' % (key, kind, ', '.join(sorted(keys))))


def check_example(example):
    """Check one parsed chat line. Raises InvalidExample(field, message) on the first problem."""
    _check_line_object(example, EXAMPLE_KEYS, '{"messages": [...]}', 'an example')
    messages = _check_messages(example.get('messages'), 'messages')
    _check_tools(example, '')
    return messages


def check_text_example(example):
    """Check one converted text example ({"text": "..."}); text has no messages."""
    _check_line_object(example, ('text',), '{"text": "..."}', 'a text example')
    if not isinstance(example.get('text'), str) or not example['text'].strip():
        raise InvalidExample('text', 'missing or empty; give the text to learn')
    return ()


def check_preference_example(example):
    """Check one preference (DPO) line: {"input": {"messages": [...]}, "preferred_output": [one
    assistant message], "non_preferred_output": [one assistant message]}. Returns all messages."""
    _check_line_object(example, PREFERENCE_KEYS, '{"input": ..., "preferred_output": [...], '
                                                 '"non_preferred_output": [...]}', 'a preference example')
    prompt = example.get('input')
    if not isinstance(prompt, dict):
        raise InvalidExample('input', 'is %s; it must be an object with the "messages" that lead to the '
                                      'reply' % ('missing' if prompt is None else _type_name(prompt)))
    for key in prompt:
        if key not in EXAMPLE_KEYS:
            raise InvalidExample('input.' + key, 'unknown key; the input may only have %s'
                                 % ', '.join(sorted(EXAMPLE_KEYS)))
    messages = list(_check_messages(prompt.get('messages'), 'input.messages', need_assistant=False))
    _check_tools(prompt, 'input.')
    if messages[-1].get('role') != 'user':
        raise InvalidExample('input.messages[%d]' % (len(messages) - 1),
                             'the input must end with a user message (the one both outputs answer)')
    outputs = []
    for key in ('preferred_output', 'non_preferred_output'):
        output = example.get(key)
        if not isinstance(output, list) or len(output) != 1 or not isinstance(output[0], dict):
            raise InvalidExample(key, 'is %s; it must be a list of exactly one assistant message'
                                 % ('missing' if output is None else _type_name(output)))
        if output[0].get('role') != 'assistant':
            raise InvalidExample(key + '[0].role', 'is %r; the output must be an assistant message'
                                 % (output[0].get('role'),))
        _check_content(key + '[0]', output[0])
        outputs.append(output[0])
    if message_text(outputs[0].get('content')) == message_text(outputs[1].get('content')):
        raise InvalidExample('non_preferred_output', 'is the same as preferred_output; the pair must differ')
    return messages + outputs


def _check_tools(example, prefix):
    tools = example.get('tools')
    if tools is not None and not isinstance(tools, list):
        raise InvalidExample(prefix + 'tools', 'is %s; it must be a list of tool definitions' % _type_name(tools))


def _check_messages(messages, name, need_assistant=True):
    if messages is None:
        raise InvalidExample(name, 'missing; each example needs a "messages" list')
    if not isinstance(messages, list):
        raise InvalidExample(name, 'is %s; it must be a list of messages' % _type_name(messages))
    if not messages:
        raise InvalidExample(name, 'is empty; add at least a user and an assistant message')
    has_user = has_assistant = False
    for index, message in enumerate(messages):
        field = '%s[%d]' % (name, index)
        if not isinstance(message, dict):
            raise InvalidExample(field, 'is %s; each message must be an object with "role" and '
                                        '"content"' % _type_name(message))
        for key in message:
            if key not in MESSAGE_KEYS:
                raise InvalidExample('%s.%s' % (field, key), 'unknown key; a message may only have %s'
                                     % ', '.join(sorted(MESSAGE_KEYS)))
        role = message.get('role')
        if role is None:
            raise InvalidExample(field + '.role', 'missing; use one of %s' % ', '.join(ROLES))
        if role not in ROLES:
            raise InvalidExample(field + '.role', 'unknown role %r; use one of %s' % (role, ', '.join(ROLES)))
        has_user = has_user or role == 'user'
        has_assistant = has_assistant or role == 'assistant'
        _check_content(field, message)
        if 'weight' in message:
            weight = message['weight']
            if role != 'assistant':
                raise InvalidExample(field + '.weight', 'only assistant messages may have a weight')
            if isinstance(weight, bool) or weight not in (0, 1):
                raise InvalidExample(field + '.weight', 'is %r; it must be 0 (do not learn this turn) '
                                                        'or 1' % (weight,))
        if 'tool_calls' in message:
            _check_tool_calls(field, role, message['tool_calls'])
        if role == 'tool' and not isinstance(message.get('tool_call_id'), str):
            raise InvalidExample(field + '.tool_call_id', 'missing; a tool message must say which '
                                                          'tool call it answers')
    if not has_user:
        raise InvalidExample(name, 'no user message; each example needs at least one')
    if need_assistant and not has_assistant:
        raise InvalidExample(name, 'no assistant message; each example needs at least one '
                                   '(the reply the model should learn)')
    return messages


def _check_content(field, message):
    if 'content' not in message or message['content'] is None:
        if message['role'] == 'assistant' and (message.get('tool_calls') or message.get('function_call')):
            return
        raise InvalidExample(field + '.content', 'missing; give the message text as a string')
    content = message['content']
    if isinstance(content, str):
        if not content.strip() and message['role'] != 'assistant':
            raise InvalidExample(field + '.content', 'is empty; remove the message or give it text')
        return
    if not isinstance(content, list):
        raise InvalidExample(field + '.content', 'is %s; it must be a string or a list of content '
                                                 'parts' % _type_name(content))
    for index, part in enumerate(content):
        part_field = '%s.content[%d]' % (field, index)
        if not isinstance(part, dict) or part.get('type') not in CONTENT_PART_TYPES:
            raise InvalidExample(part_field, 'each content part must be an object with "type" '
                                             '"text" or "image_url"')
        if part['type'] == 'text' and not isinstance(part.get('text'), str):
            raise InvalidExample(part_field + '.text', 'missing or not a string')


def _check_tool_calls(field, role, tool_calls):
    if role != 'assistant':
        raise InvalidExample(field + '.tool_calls', 'only assistant messages may call tools')
    if not isinstance(tool_calls, list):
        raise InvalidExample(field + '.tool_calls', 'is %s; it must be a list' % _type_name(tool_calls))
    for index, call in enumerate(tool_calls):
        call_field = '%s.tool_calls[%d]' % (field, index)
        function = call.get('function') if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get('name'), str):
            raise InvalidExample(call_field + '.function', 'each tool call needs '
                                 '{"id", "type": "function", "function": {"name", "arguments"}}')
        if not isinstance(function.get('arguments'), str):
            raise InvalidExample(call_field + '.function.arguments', 'must be a JSON-encoded string')


class DatasetReport(object):
    """What validating one or more files found: problems, warnings and statistics."""

    def __init__(self):
        self.errors = []
        self.warnings = []
        self.error_count = 0
        self.warning_count = 0
        self.examples = 0
        self.messages = 0
        self.duplicates = 0
        self.long_examples = 0
        self.tokens_total = 0
        self.tokens_min = 0
        self.tokens_max = 0
        self.files = []

    @property
    def valid(self):
        return self.error_count == 0

    @property
    def tokens_mean(self):
        return self.tokens_total / float(self.examples) if self.examples else 0.0

    def add_error(self, problem):
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED:
            self.errors.append(problem)

    def add_warning(self, problem):
        self.warning_count += 1
        if len(self.warnings) < MAX_REPORTED:
            self.warnings.append(problem)

    def stats(self):
        return {'examples': self.examples, 'messages': self.messages, 'duplicates': self.duplicates,
                'tokens_total': self.tokens_total, 'tokens_min': self.tokens_min,
                'tokens_max': self.tokens_max, 'tokens_mean': round(self.tokens_mean, 1),
                'errors': self.error_count, 'warnings': self.warning_count}

    def as_text(self):
        lines = []
        if self.error_count:
            lines.append('%d error(s):' % self.error_count)
            lines.extend('  ' + str(p) for p in self.errors)
            if self.error_count > len(self.errors):
                lines.append('  ... and %d more' % (self.error_count - len(self.errors)))
        if self.warning_count:
            lines.append('%d warning(s):' % self.warning_count)
            lines.extend('  ' + str(p) for p in self.warnings)
            if self.warning_count > len(self.warnings):
                lines.append('  ... and %d more' % (self.warning_count - len(self.warnings)))
        if not lines:
            lines.append('No problems found.')
        lines.append('%d example(s), %d message(s); tokens per example min %d / mean %.1f / max %d.'
                     % (self.examples, self.messages, self.tokens_min, self.tokens_mean, self.tokens_max))
        return '\n'.join(lines)


class DatasetValidator(object):
    """Feed it files one by one with `add_file`, then call `finish()` for the report.

    count_tokens(messages, limit=None) -> int is pluggable: the estimator by default, a real
    tokenizer when the provider has one; it may stop counting once past `limit` (the context).
    max_tokens is the model's context (an error above it); long_tokens is the length above which
    an example gets a warning (it will be cut or is costly). A line over max_line_bytes or a file
    over max_file_bytes is refused before any parsing.
    """

    def __init__(self, count_tokens=estimate_tokens, max_tokens=None, long_tokens=None,
                 min_examples=MIN_EXAMPLES, data_format='chat', max_line_bytes=MAX_LINE_BYTES,
                 max_file_bytes=MAX_FILE_BYTES, file_type='jsonl', prompt_column=None, completion_column=None,
                 text_column=None, system_prompt=None):
        self.columns = {'prompt_column': prompt_column, 'completion_column': completion_column,
                        'text_column': text_column}
        # raises ValueError for an unknown format or file type, or a pair that cannot be read
        self.convert = make_converter(data_format, file_type, system_prompt=system_prompt, **self.columns)
        self.data_format, self.file_type = data_format, file_type
        self.check = {'preference': check_preference_example,
                      'text': check_text_example}.get(data_format, check_example)
        self.count_tokens = count_tokens
        self.max_tokens = max_tokens
        self.long_tokens = long_tokens
        self.min_examples = min_examples
        self.max_line_bytes = max_line_bytes
        self.max_file_bytes = max_file_bytes
        self.report = DatasetReport()
        self._seen = {}

    def add_file(self, stream, filename):
        """Validate a binary stream of JSONL. Valid examples are yielded (line, example), so a
        caller can write a merged file in the same pass; iterate to the end to validate all.

        Lines are parsed and checked one by one; their tokens are counted a batch at a time
        (one call into the tokenizer, and its threads, for COUNT_BATCH examples), and what is
        found is recorded in line order."""
        self.report.files.append(filename)
        pending, examples, size = [], 0, 0
        for item in self._parse(stream, filename):
            pending.append(item)
            if isinstance(item, tuple):
                examples, size = examples + 1, size + len(item[1])
            if examples >= COUNT_BATCH or size >= COUNT_BATCH_BYTES:
                for found in self._count(pending, filename):
                    yield found
                pending, examples, size = [], 0, 0
        for found in self._count(pending, filename):
            yield found

    def _count(self, pending, filename):
        """Count the tokens of the pending examples, then record everything in line order."""
        report = self.report
        if self.data_format == 'text':
            count_text = getattr(self.count_tokens, 'count_text', None) or estimate_text_tokens
            counts = iter([count_text(item[2]['text'], limit=self.max_tokens)
                           for item in pending if isinstance(item, tuple)])
        else:
            examples = [item[3] for item in pending if isinstance(item, tuple)]
            count_many = getattr(self.count_tokens, 'count_many', None)
            counts = iter(count_many(examples, limit=self.max_tokens) if count_many
                          else [self.count_tokens(messages, limit=self.max_tokens) for messages in examples])
        for item in pending:
            if isinstance(item, Problem):
                report.add_error(item)
                continue
            line_no, raw, example, messages = item
            tokens = next(counts)
            if self.max_tokens and tokens > self.max_tokens:
                # the count may have stopped early: "over", not an exact number
                report.add_error(Problem(filename, line_no, 'text' if self.data_format == 'text' else 'messages',
                                         "over the model's context of %d tokens; shorten or split this example"
                                         % self.max_tokens))
                continue
            if self.long_tokens and tokens > self.long_tokens:
                report.long_examples += 1
                report.add_warning(Problem(filename, line_no, 'text' if self.data_format == 'text' else 'messages',
                                           'long example (%d tokens, '
                                           'over %d); it costs more and may be truncated'
                                           % (tokens, self.long_tokens)))
            digest = hashlib.blake2b(raw.strip(), digest_size=8).digest()
            first = self._seen.get(digest)
            if first is not None:
                report.duplicates += 1
                report.add_warning(Problem(filename, line_no, '', 'duplicate of %s:%d' % first))
            else:
                self._seen[digest] = (filename, line_no)
            report.examples += 1
            report.messages += len(messages)
            report.tokens_total += tokens
            report.tokens_max = max(report.tokens_max, tokens)
            report.tokens_min = tokens if report.examples == 1 else min(report.tokens_min, tokens)
            yield line_no, example

    def _parse(self, stream, filename):
        """Each row as (row, raw, example, messages) when its format is right, else the Problem:
        JSONL lines as they are (chat, preference) or converted (prompt/completion, text), CSV and
        Parquet rows converted. `raw` is what duplicates are recognised by."""
        mismatch = file_type_mismatch(filename, self.file_type)
        if mismatch:
            yield Problem(filename, 0, '', mismatch)
            return
        if self.file_type == 'jsonl':
            rows = self._jsonl_rows(stream, filename)
        elif self.file_type == 'csv':
            rows = csv_rows(stream, self.data_format, self.max_line_bytes, self.max_file_bytes, **self.columns)
        else:
            rows = parquet_rows(stream, self.data_format, self.max_file_bytes, **self.columns)
        try:
            for item in rows:
                if isinstance(item, Problem):
                    yield item
                    continue
                if isinstance(item, FileProblem):
                    yield Problem(filename, item.row, item.field, item.message)
                    continue
                line_no, raw, row = item if len(item) == 3 else (item[0], None, item[1])
                try:
                    example = row
                    if self.convert:
                        if not isinstance(row, dict):
                            raise InvalidExample('', 'the line is %s; each line must be a JSON object with the '
                                                     'mapped keys' % _type_name(row))
                        example = self.convert(row)
                    messages = self.check(example)
                except InvalidExample as e:
                    yield Problem(filename, line_no, e.field, e.message)
                    continue
                if raw is None or self.convert:
                    raw = _dumps(example)
                    if len(raw) > self.max_line_bytes:
                        yield Problem(filename, line_no, '', 'the example is %d bytes, over the limit of %d for one '
                                      'example; shorten or split it' % (len(raw), self.max_line_bytes))
                        continue
                yield line_no, raw, example, messages
        except FileProblem as e:  # the rest of the file cannot be read
            yield Problem(filename, e.row, e.field, e.message)

    def _jsonl_rows(self, stream, filename):
        """Each JSONL line as (line, raw, parsed object), else the Problem (bounded line by line)."""
        crlf_reported = False
        line_no = 0
        size = 0
        readline, limit = stream.readline, self.max_line_bytes + 1
        while True:
            raw = readline(limit)  # never more than one line's limit in memory
            if not raw:
                break
            line_no += 1
            length = len(raw)
            if length == limit and not raw.endswith(b'\n'):
                length = skip_rest_of_line(stream, length)
                raw = None
            size += length
            if size > self.max_file_bytes:
                yield Problem(filename, line_no, '', 'the file is over the limit of %d MB; split it into several '
                              'files (the rest of this file was not read)' % (self.max_file_bytes >> 20))
                return
            if raw is None:
                yield Problem(filename, line_no, '', 'the line is %d bytes, over the limit of %d for one example; '
                              'shorten or split it' % (length, self.max_line_bytes))
                continue
            if line_no == 1 and raw.startswith(BOM):
                yield Problem(filename, 1, '', 'the file starts with a byte-order mark (BOM); save it as UTF-8 '
                              'without BOM')
                raw = raw[len(BOM):]
            if raw.endswith(b'\r\n'):
                if not crlf_reported:
                    yield Problem(filename, line_no, '', 'Windows line ending (CRLF); save the file with Unix '
                                  'line endings (LF)')
                    crlf_reported = True
                raw = raw[:-2]
            elif raw.endswith(b'\n'):
                raw = raw[:-1]
            if not raw.strip():
                yield Problem(filename, line_no, '', 'empty line; remove it (every line must be one JSON example)')
                continue
            try:
                raw.decode('utf-8')
            except UnicodeDecodeError as e:
                yield Problem(filename, line_no, '', 'not valid UTF-8 (byte %d); save the file as UTF-8'
                              % (e.start + 1))
                continue
            try:
                example = _loads(raw)
            except ValueError as e:
                yield Problem(filename, line_no, '', 'malformed JSON: %s' % e)
                continue
            yield line_no, raw, example

    def validate_file(self, stream, filename):
        for _ in self.add_file(stream, filename):
            pass

    def finish(self):
        report = self.report
        if report.examples < self.min_examples:
            report.add_error(Problem(', '.join(report.files) or 'dataset', 0, '', 'only %d valid '
                                     'example(s); fine-tuning needs at least %d'
                                     % (report.examples, self.min_examples)))
        return report


def validate_files(named_streams, **options):
    """Validate [(filename, binary stream), ...] as one dataset and return its DatasetReport."""
    validator = DatasetValidator(**options)
    for filename, stream in named_streams:
        validator.validate_file(stream, filename)
    return validator.finish()


def preview_examples(named_streams, limit=5, max_rows=200, **options):
    """The first `limit` examples as the trainer will get them (converted, checked), and the
    problems met on the way; reads at most `max_rows` rows, so a form never reads a whole file."""
    validator = DatasetValidator(min_examples=0, **options)
    examples, problems, rows = [], [], 0
    for filename, stream in named_streams:
        for item in validator._parse(stream, filename):
            rows += 1
            if isinstance(item, Problem):
                problems.append(item)
            else:
                examples.append(item[2])
            if len(examples) >= limit or rows >= max_rows:
                return examples, problems
    return examples, problems


def render_preview(examples, problems=(), max_chars=600):
    """HTML (escaped) of examples: `role: content` lines for chat, the text for text data."""
    import html

    def cut(text):
        return text if len(text) <= max_chars else text[:max_chars] + ' [...]'

    parts = []
    for index, example in enumerate(examples, 1):
        if 'text' in example:
            body = '<pre style="white-space: pre-wrap">%s</pre>' % html.escape(cut(example['text']))
        else:
            messages = (example.get('input') or example).get('messages') or []
            messages = messages + example.get('preferred_output', [])
            body = ''.join('<div><b>%s</b>: %s</div>' % (html.escape(m.get('role') or ''),
                                                          html.escape(cut(message_text(m.get('content')))))
                           for m in messages)
        parts.append('<div><p><i>Example %d</i></p>%s</div>' % (index, body))
    if problems:
        parts.append('<p><i>%s</i></p>' % html.escape('%d problem(s) on the way, e.g. %s; Validate for the full '
                                                      'report.' % (len(problems), problems[0])))
    if not examples:
        parts.insert(0, '<p><i>No valid example in the first rows.</i></p>')
    return '<hr/>'.join(parts)
