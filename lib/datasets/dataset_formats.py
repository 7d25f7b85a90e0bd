"""Data in the shapes people have it: rows of JSONL, CSV or Parquet, mapped to training examples.

Readers yield (row, values) one row at a time, or a Problem that ends the file; converters turn
one row's values into the example the trainer sees: the chat shape ({"messages": [...]}) for chat
and prompt/completion data, {"text": ...} for continued pre-training. The validator
(dataset_validator.py) runs every row through them, so a converted row gets the same checks and
the same per-row errors as a JSONL line.

Rows are numbered as people see them: a JSONL line number; a CSV row as a spreadsheet shows it
(the header is row 1, the first data row is row 2); a Parquet row from 1. The column of a
problem is its field. Memory stays flat: CSV is read line by line with a bounded line length,
Parquet a batch of rows at a time, only the columns needed.
"""
import csv
import io
import json

FILE_TYPES = ('jsonl', 'csv', 'parquet')
FORMATS = ('chat', 'preference', 'prompt_completion', 'text')
DEFAULT_COLUMNS = {'prompt_column': 'prompt', 'completion_column': 'completion', 'text_column': 'text'}
MESSAGES_COLUMN = 'messages'  # chat data in CSV/Parquet: one column holding the messages as JSON
PARQUET_BATCH_ROWS = 256
EXTENSIONS = {'.csv': 'csv', '.parquet': 'parquet', '.pq': 'parquet', '.jsonl': 'jsonl', '.json': 'jsonl'}


class InvalidExample(Exception):
    def __init__(self, field, message):
        super(InvalidExample, self).__init__(message)
        self.field = field
        self.message = message


class FileProblem(Exception):
    """A problem that stops reading a file: (row, field, message)."""

    def __init__(self, row, field, message):
        super(FileProblem, self).__init__(message)
        self.row, self.field, self.message = row, field, message


def type_name(value):
    return {dict: 'an object', list: 'a list', str: 'a string', bool: 'a boolean', int: 'a number',
            float: 'a number', type(None): 'null'}.get(type(value), type(value).__name__)


def file_type_mismatch(filename, file_type):
    """A message when the file's name says another type than the dataset's File Type, else None:
    a Parquet file read as JSONL would otherwise report 'not valid UTF-8' on line 1."""
    name = (filename or '').lower()
    for extension, named in EXTENSIONS.items():
        if name.endswith(extension) and named != file_type:
            return ('the file is named %s but the dataset\'s File Type is %s; set File Type to %s (or rename '
                    'the file)' % (extension, file_type.upper(), named.upper()))
    return None


# -- converters: one row's values -> one example ---------------------------------------------
def _text_value(row, column, what):
    if column not in row:
        raise InvalidExample(column, 'missing; each row needs a "%s" value (%s), or set the column name on '
                                     'the dataset' % (column, what))
    value = row[column]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InvalidExample(column, 'is empty; give the %s or remove the row' % what)
    if not isinstance(value, str):
        raise InvalidExample(column, 'is %s; it must be text (the %s)' % (type_name(value), what))
    return value


def prompt_completion_example(row, prompt_column='prompt', completion_column='completion', system_prompt=None):
    """{"prompt", "completion"} (OpenAI's legacy keys, or the mapped columns) -> the chat shape."""
    messages = [{'role': 'system', 'content': system_prompt}] if system_prompt else []
    messages.append({'role': 'user', 'content': _text_value(row, prompt_column, 'prompt')})
    messages.append({'role': 'assistant', 'content': _text_value(row, completion_column, 'completion')})
    return {'messages': messages}


def text_example(row, text_column='text'):
    return {'text': _text_value(row, text_column, 'text to learn')}


def _drop_nulls(value):
    # Parquet structs give every field of the schema, None where a message has none.
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def chat_from_columns(row):
    """A CSV/Parquet row whose `messages` column holds the messages (JSON text, or Parquet's list of
    structs) -> {"messages": [...]}; a `tools` column, when there, likewise."""
    example = {}
    for column in (MESSAGES_COLUMN, 'tools'):
        value = row.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            if column == MESSAGES_COLUMN:
                raise InvalidExample(column, 'is empty; give the messages as JSON: [{"role": "user", "content": '
                                             '"..."}, {"role": "assistant", "content": "..."}]')
            continue
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise InvalidExample(column, 'malformed JSON: %s' % e)
        example[column] = _drop_nulls(value)
    return example


def make_converter(data_format='chat', file_type='jsonl', prompt_column=None, completion_column=None,
                   text_column=None, system_prompt=None):
    """row -> example for this format and file type; None when the rows are the examples already
    (chat and preference JSONL)."""
    if data_format not in FORMATS:
        raise ValueError('unknown dataset format %r; use one of %s' % (data_format, ', '.join(FORMATS)))
    if file_type not in FILE_TYPES:
        raise ValueError('unknown file type %r; use one of %s' % (file_type, ', '.join(FILE_TYPES)))
    prompt_column = prompt_column or DEFAULT_COLUMNS['prompt_column']
    completion_column = completion_column or DEFAULT_COLUMNS['completion_column']
    text_column = text_column or DEFAULT_COLUMNS['text_column']
    if data_format == 'prompt_completion':
        return lambda row: prompt_completion_example(row, prompt_column, completion_column, system_prompt or None)
    if data_format == 'text':
        return lambda row: text_example(row, text_column)
    if file_type == 'jsonl':
        return None
    if data_format == 'preference':
        raise ValueError('preference (DPO) datasets are read from JSONL files only; convert the file to JSONL '
                         'or choose another format')
    return chat_from_columns


def needed_columns(data_format, prompt_column=None, completion_column=None, text_column=None, **_ignored):
    """The columns a CSV/Parquet file must have for this format."""
    if data_format == 'prompt_completion':
        return [prompt_column or DEFAULT_COLUMNS['prompt_column'],
                completion_column or DEFAULT_COLUMNS['completion_column']]
    if data_format == 'text':
        return [text_column or DEFAULT_COLUMNS['text_column']]
    return [MESSAGES_COLUMN]


def _missing_columns_problem(row, missing, found, data_format):
    return FileProblem(row, missing[0], 'no column%s "%s" (the file has %s); rename the column or set the %s on '
                                      'the dataset' % ('s' if len(missing) > 1 else '', '", "'.join(missing),
                                                       ', '.join(found) or 'no columns',
                                                       'Messages column as JSON' if data_format == 'chat'
                                                       else 'column names'))


# -- readers: a file -> (row number, {column: value}) ------------------------------------------
def _bounded_lines(stream, max_line_bytes, max_file_bytes, row):
    """Decoded lines of a binary stream, none longer than max_line_bytes held in memory; a line
    or file over its limit, or bytes that are not UTF-8, stop the file with a FileProblem. The
    row number in such problems is the CSV row being read (row() tells it)."""
    size, limit, line_no = 0, max_line_bytes + 1, 0
    while True:
        raw = stream.readline(limit)
        if not raw:
            return
        line_no += 1
        size += len(raw)
        if size > max_file_bytes:
            raise FileProblem(row(), '', 'the file is over the limit of %d MB; split it into several files '
                                               '(the rest of this file was not read)' % (max_file_bytes >> 20))
        if len(raw) == limit and not raw.endswith(b'\n'):
            raise FileProblem(row(), '', 'a line of this row is over the limit of %d bytes for one example; '
                                               'shorten it (the rest of this file was not read)' % max_line_bytes)
        if line_no == 1 and raw.startswith(b'\xef\xbb\xbf'):
            raw = raw[3:]  # spreadsheets write a BOM before UTF-8 CSV: it is not part of the header
        try:
            yield raw.decode('utf-8')
        except UnicodeDecodeError as e:
            raise FileProblem(row(), '', 'not valid UTF-8 (byte %d of line %d); save the file as UTF-8 '
                                               '(the rest of this file was not read)' % (e.start + 1, line_no))


def csv_rows(stream, data_format, max_line_bytes, max_file_bytes, **columns):
    """(row, {column: value}) per CSV record, the header naming the columns; a FileProblem for a
    header without the needed columns, a record whose fields do not match the header's, or
    malformed CSV (which ends the file: after a quoting error the rest cannot be trusted)."""
    # The limit is the process's (csv keeps one); raising it to one example's limit is harmless.
    csv.field_size_limit(max(csv.field_size_limit(), max_line_bytes))
    state = {'row': 0}  # the last row read whole (the header is row 1): a problem mid-read is in the next
    reader = csv.reader(_bounded_lines(stream, max_line_bytes, max_file_bytes, lambda: state['row'] + 1))
    try:
        header = next(reader, None)
        state['row'] = 1
        if not header or not any(h.strip() for h in header):
            raise FileProblem(1, '', 'no header row; the first row must name the columns (e.g. %s)'
                              % ','.join(needed_columns(data_format, **columns)))
        header = [h.strip() for h in header]
        missing = [c for c in needed_columns(data_format, **columns) if c not in header]
        if missing:
            raise _missing_columns_problem(1, missing, header, data_format)
        for record in reader:
            state['row'] += 1
            if not record:
                continue  # a blank line between rows: spreadsheets ignore it too
            if len(record) != len(header):
                yield FileProblem(state['row'], '', 'the row has %d field(s) and the header %d; check the quoting '
                                                    '(a comma or line break inside a value needs "double quotes")'
                                  % (len(record), len(header)))
                continue
            yield state['row'], dict(zip(header, record))
    except csv.Error as e:
        raise FileProblem(state['row'] + 1, '', 'malformed CSV: %s (the rest of this file was not read)' % e)


def parquet_rows(stream, data_format, max_file_bytes, batch_rows=PARQUET_BATCH_ROWS, **columns):
    """(row, {column: value}) per Parquet row, reading a batch of rows of the needed columns at a
    time (pyarrow); a FileProblem for a file that is not Parquet or lacks a needed column."""
    import pyarrow
    import pyarrow.parquet as pq
    stream.seek(0, io.SEEK_END)
    if stream.tell() > max_file_bytes:
        raise FileProblem(0, '', 'the file is over the limit of %d MB; split it into several files'
                          % (max_file_bytes >> 20))
    stream.seek(0)
    try:
        parquet = pq.ParquetFile(stream)
    except (pyarrow.ArrowException, OSError, ValueError) as e:
        raise FileProblem(0, '', 'not a Parquet file (%s); save it as Parquet or set the dataset\'s File Type' % e)
    names = parquet.schema_arrow.names
    wanted = needed_columns(data_format, **columns)
    missing = [c for c in wanted if c not in names]
    if missing:
        raise _missing_columns_problem(0, missing, names, data_format)
    if data_format == 'chat' and 'tools' in names:
        wanted.append('tools')
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=wanted):
            for values in batch.to_pylist():
                row += 1
                yield row, values
    except (pyarrow.ArrowException, OSError) as e:
        raise FileProblem(row + 1, '', 'unreadable Parquet data (%s); the rest of this file was not read' % e)
