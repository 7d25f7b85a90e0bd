"""Documents to text through the trainer environment (trainer/knowledge/parse.py) and the
embedding model's tokenizer file (trainer/knowledge/embed.py), each a short subprocess."""
import json
import os
import subprocess

from ..host import processes

ADDON_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARSE_TIMEOUT = 300
KINDS_BY_EXTENSION = {
    '.pdf': 'pdf', '.docx': 'docx', '.html': 'html', '.htm': 'html', '.md': 'markdown',
    '.markdown': 'markdown', '.txt': 'text', '.text': 'text', '.rst': 'text', '.csv': 'text',
}
_TOKENIZERS = {}  # (python, model) -> {'tokenizer', 'max_length', 'dimensions'}


class DocumentError(Exception):
    """What is wrong with one source; the others go on."""


def kind_of(filename):
    """The parser for a file name, or DocumentError naming the kinds known."""
    extension = os.path.splitext(filename or '')[1].lower()
    if extension not in KINDS_BY_EXTENSION:
        raise DocumentError('%s: unknown document type %r (known: %s)'
                            % (filename, extension, ', '.join(sorted(KINDS_BY_EXTENSION))))
    return KINDS_BY_EXTENSION[extension]


def _trainer(python, args, env, timeout):
    try:
        result = processes.run([python, '-m'] + args, cwd=ADDON_ROOT, env=env, timeout=timeout,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except subprocess.TimeoutExpired:
        raise DocumentError('the trainer environment did not answer within %d s' % timeout)
    except OSError as e:
        raise DocumentError('cannot run the trainer Python %s (%s)' % (python, e))
    try:
        answer = json.loads(result.stdout.decode('utf-8').strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise DocumentError('the trainer environment failed: %s'
                            % result.stderr.decode('utf-8', 'replace')[-500:])
    if 'error' in answer:
        raise DocumentError(answer['error'])
    return answer


def extract_text(python, env, path, filename, max_bytes):
    """The text of the file at `path`, its kind taken from `filename`; DocumentError else."""
    kind = kind_of(filename)
    size = os.path.getsize(path)
    if size > max_bytes:  # refused before any process reads it
        raise DocumentError('%s is %.1f MB; the limit is %.1f MB' % (filename, size / 1e6, max_bytes / 1e6))
    try:
        return _trainer(python, ['trainer.knowledge.parse', path, '--kind', kind, '--max-bytes', str(max_bytes)],
                        env, PARSE_TIMEOUT)['text']
    except DocumentError as e:
        raise DocumentError('%s: %s' % (filename, e))


def tokenizer_info(python, env, model):
    """{'tokenizer': path of tokenizer.json, 'max_length', 'dimensions'} of a local embedding
    model, asked once per process."""
    key = (python, model)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = _trainer(python, ['trainer.knowledge.embed', '--tokenizer', model], env, 120)
    return _TOKENIZERS[key]
