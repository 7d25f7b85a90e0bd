"""Chunks of a text by tokens, with overlap, each keeping its position and character span."""
import hashlib
import re



def text_hash(text):
    """What a source record's text is compared by, to embed again only what changed."""
    return hashlib.sha1(text.encode('utf-8')).hexdigest()


def check_sizes(size, overlap, max_tokens=None):
    """An error message for bad chunk sizes, or None."""
    if size < 8:
        return 'chunk size must be at least 8 tokens (it is %d)' % size
    if max_tokens and size > max_tokens:
        return 'chunk size %d is over the embedding model\'s %d tokens' % (size, max_tokens)
    if overlap < 0 or overlap >= size:
        return 'chunk overlap must be from 0 to less than the chunk size (%d, size %d)' % (overlap, size)
    return None


def chunk_text(text, offsets, size, overlap):
    """Windows of `size` tokens starting every `size - overlap` tokens over `text`, whose tokens
    span the character `offsets` [(start, end), ...] (a tokenizer's, without special tokens).
    -> [{'position', 'text', 'start', 'end', 'tokens'}]; the last window ends at the text's end."""
    error = check_sizes(size, overlap)
    if error:
        raise ValueError(error)
    offsets = [(s, e) for s, e in offsets if e > s]
    if not offsets:
        return [{'position': 0, 'text': text.strip(), 'start': 0, 'end': len(text), 'tokens': 0}] if text.strip() else []
    chunks, step, first = [], size - overlap, 0
    while True:
        last = min(first + size, len(offsets))
        start, end = offsets[first][0], offsets[last - 1][1]
        piece = text[start:end].strip()
        if piece:
            chunks.append({'position': len(chunks), 'text': piece, 'start': start, 'end': end, 'tokens': last - first})
        if last >= len(offsets):
            return chunks
        first += step


class TokenizerChunker(object):
    """chunk_text with a `tokenizers.Tokenizer` (the embedding model's tokenizer.json)."""

    def __init__(self, tokenizer_json):
        from tokenizers import Tokenizer
        self.tokenizer = Tokenizer.from_file(tokenizer_json)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    def offsets(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).offsets

    def __call__(self, text, size, overlap):
        return chunk_text(text, self.offsets(text), size, overlap)

    def count(self, text):
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)


FENCE = re.compile(r'^[ \t]*(```|~~~)')
ATX = re.compile(r'^(#{1,6})[ \t]+(.+?)[ \t#]*$')


def headings(text):
    """[(offset, level, title)] of a Markdown text's ATX headings, those inside fenced code
    blocks left out (a shell comment `# llama.cpp` in a code block is not a section)."""
    found, fenced, offset = [], False, 0
    for line in text.splitlines(True):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            match = ATX.match(line.rstrip('\r\n'))
            if match:
                found.append((offset, len(match.group(1)), match.group(2).strip()))
        offset += len(line)
    return found


def heading_path(marks, offset):
    """The titles of the sections enclosing `offset`, outermost first ('Guide', 'Refunds')."""
    path = []
    for start, level, title in marks:
        if start > offset:
            break
        while path and path[-1][0] >= level:
            path.pop()
        path.append((level, title))
    return [title for _level, title in path]


def with_headings(text, chunks, separator=' > '):
    """Markdown: each chunk starts with the path of headings it falls under ('Guide > Refunds'),
    so a chunk cut from the middle of a section still says what it is about, in its vector and
    in its words. The path is that of the chunk's first character; a chunk that begins on its
    own heading line keeps only the outer part of the path in front of it."""
    marks = headings(text)
    if not marks:
        return chunks
    out = []
    for chunk in chunks:
        path = heading_path(marks, chunk['start'])
        if path and chunk['text'].lstrip('# ').startswith(path[-1]):
            path = path[:-1]  # its own heading line already says the last part
        if path:
            chunk = dict(chunk, text='%s\n%s' % (separator.join(path), chunk['text']))
        out.append(chunk)
    return out


def with_title(title, chunks):
    """Each chunk starts with its record's title (a product's name, a partner's) unless it already
    holds it: the second chunk of a long description says whose it is, to the embedding and to
    whoever reads the source."""
    title = (title or '').strip()
    if not title:
        return chunks
    return [chunk if title.lower() in chunk['text'].lower() else dict(chunk, text='%s\n%s' % (title, chunk['text']))
            for chunk in chunks]


def dataset_answers(lines, limit=None):
    """'Question: ...\nAnswer: ...' per assistant answer of chat JSONL lines (bytes or str), with
    the user message before it; other lines (prompt/completion, preference) by their fields."""
    import json
    found = []
    for number, line in enumerate(lines, 1):
        try:
            example = json.loads(line)
        except ValueError:
            continue
        if not isinstance(example, dict):
            continue
        question = None
        for message in example.get('messages') or ():
            if not isinstance(message, dict) or not isinstance(message.get('content'), str):
                continue
            if message.get('role') == 'user':
                question = message['content']
            elif message.get('role') == 'assistant' and message['content'].strip():
                found.append((number, 'Question: %s\nAnswer: %s' % (question or '', message['content'])))
        if isinstance(example.get('prompt'), str) and isinstance(example.get('completion'), str):
            found.append((number, 'Question: %s\nAnswer: %s' % (example['prompt'], example['completion'])))
        if limit and len(found) >= limit:
            break
    return found
