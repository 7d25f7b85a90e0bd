"""Plain text out of an uploaded document, run by Odoo as a subprocess of the trainer environment
(where current parsers install; Odoo's Python 3.7 has none of them).

    python -m trainer.knowledge.parse FILE --kind pdf|docx|html|markdown|text [--max-bytes N]

Prints one JSON line: {"text": "..."} (exit 0), or {"error": "..."} (exit 2) naming what is wrong
with the file: too big, empty, unreadable as its kind. PDF through pypdf, DOCX through python-docx,
HTML through the standard library's parser (script and style dropped), Markdown and text as they
are (UTF-8, else Latin-1).
"""
import argparse
import html.parser
import json
import os
import sys

KINDS = ('pdf', 'docx', 'html', 'markdown', 'text')


class ParseError(Exception):
    pass


class _HtmlText(html.parser.HTMLParser):
    SKIP = {'script', 'style', 'head', 'noscript'}
    BLOCK = {'p', 'div', 'br', 'li', 'tr', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'section', 'article', 'pre'}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skipping = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append('\n')

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1
        elif tag in self.BLOCK:
            self.parts.append('\n')

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def _decode(data):
    try:
        return data.decode('utf-8-sig')
    except UnicodeDecodeError:
        return data.decode('latin-1')


def extract(path, kind, max_bytes=None):
    """The document's text; ParseError saying what is wrong."""
    if kind not in KINDS:
        raise ParseError('unknown document kind %r (known: %s)' % (kind, ', '.join(KINDS)))
    size = os.path.getsize(path)
    if max_bytes and size > max_bytes:
        raise ParseError('the file is %d bytes; the limit is %d' % (size, max_bytes))
    if size == 0:
        raise ParseError('the file is empty')
    if kind == 'pdf':
        import pypdf
        try:
            reader = pypdf.PdfReader(path)
            text = '\n\n'.join((page.extract_text() or '') for page in reader.pages)
        except Exception as e:  # pypdf raises many kinds on a broken file
            raise ParseError('unreadable PDF: %s' % e)
    elif kind == 'docx':
        import docx
        try:
            document = docx.Document(path)
        except Exception as e:
            raise ParseError('unreadable DOCX: %s' % e)
        text = '\n\n'.join(p.text for p in document.paragraphs)
    else:
        with open(path, 'rb') as f:
            text = _decode(f.read())
        if kind == 'html':
            parser = _HtmlText()
            parser.feed(text)
            parser.close()
            text = ''.join(parser.parts)
    text = '\n'.join(line.rstrip() for line in text.replace('\r\n', '\n').split('\n'))
    while '\n\n\n' in text:
        text = text.replace('\n\n\n', '\n\n')
    if not text.strip():
        raise ParseError('no text in the %s file' % kind)
    return text.strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('path')
    parser.add_argument('--kind', required=True)
    parser.add_argument('--max-bytes', type=int, default=0)
    args = parser.parse_args(argv)
    try:
        text = extract(args.path, args.kind, args.max_bytes)
    except (ParseError, OSError) as e:
        print(json.dumps({'error': str(e)}))
        return 2
    print(json.dumps({'text': text}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
