"""Knowledge: indexing throughput, search latency and recall, retrieval quality.

    python bench/bench_knowledge.py [--chunks 10000] [--search-sizes 10000 100000] [--small] [--search-only]
                                    [--indexing-only] [--quality-only]

Runs in Odoo's venv (where the embedded store, usearch and psycopg2 live) with the real model
server (trainer/serve.py, POST /embed) and the real PostgreSQL (temporary tables in the database
named by --db, default `postgres`):

1. Indexing, N chunks of README text: ours (lib/serving/model_server.py `embed` in batches of 64, one bulk
   INSERT per batch, as llm.knowledge.collection._add_chunks does; large batches in the precision
   the server measured faster, printed) and ours on a second server forced to fp32
   (--embed-precision fp32) vs a cookbook loop (tokenize, embed one chunk per request: fp32, INSERT
   one row), interleaved in rounds; chunks/s and the ratios; peak RSS of the model server. The
   cookbook runs on a tenth of the chunks, ours in fp32 on a fifth (their rates are per chunk). Then the cosine (min, median)
   between the README chunks' vectors from both servers. `--indexing-only` runs this part alone.
2. Search, the whole call as a restricted user makes it: embed the question (model server), rank
   (exact numpy vs the embedded store's usearch index), then the rights filter (an SQL query on the
   chunks' source records with a company rule, fetching more until k readable), at each size;
   p50/p95 in ms of the whole call and of its parts (embed / lookup / rights filter). The vectors
   at each size are made from the real vectors of the README's ~700 chunks (embedding 100,000
   real chunks takes an hour on 2 cores), two ways, each printed with its name: "distinct vectors
   spread like real chunks" (spread_like: each a real vector moved by noise with the real
   vectors' covariance, as far as real chunks lie from their nearest neighbour; the call is timed
   on these) and "near-copies" (near_copies, the former data: each real vector repeated ~150
   times at 100,000 with isotropic noise 0.04, so a question's ten nearest are near-ties among
   copies, harder than real collections). Recall@10 of the index against exact search over the
   real questions, over 300 held-out vectors drawn like the data, and of the rights-filtered
   top-10 (what the user gets) through the index against through exact search.
   `--search-only` runs this part alone.
3. Retrieval quality, for each local embedding model (questions embedded as queries): 29 questions
   (bench/data/knowledge_questions.json) written from a frozen copy of this README
   (bench/data/knowledge_corpus.md), each naming the section that answers it, cut with the model's
   tokenizer into the former default chunks (200 tokens, overlap 40, plain) and the present ones
   (128, overlap 32, each led by its Markdown heading path); and 8 Arabic questions on a short
   Arabic handbook (bench/data/knowledge_corpus_ar.md, knowledge_questions_ar.json). Hit rate@5
   and MRR@10; a hit is a chunk lying mostly in the named section. Questions are embedded one a
   request, as a search does (fp32); the README's passages also by the fp32 server (what bf16 changes).
"""
import argparse
import json
import os
import re
import resource
import sys
import tempfile
import time

import numpy
import psutil
import psycopg2
from psycopg2.extras import execute_values

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'lib'))
from bench.machine import cpu_line  # noqa: E402
from lib.knowledge import chunking, documents, retrieval, stores  # noqa: E402
from lib.knowledge.vectors import exact_top, to_bytes  # noqa: E402
from lib.serving.model_server import ModelServer  # noqa: E402

MODELS = ['all-MiniLM-L6-v2', 'multilingual-e5-small']
PYTHON = os.environ.get('LLMT_TRAINER_PYTHON') or 'python3'


def env():
    return dict(os.environ, PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM='false')


def readme_sections():
    """[(section title, text)] of the README, by its ## and ### headings."""
    with open(os.path.join(ROOT, 'README.md')) as f:
        text = f.read()
    sections, title, lines = [], 'Introduction', []
    for line in text.splitlines():
        match = re.match(r'^#{2,3} (.+)$', line)
        if match:
            sections.append((title, '\n'.join(lines)))
            title, lines = match.group(1).strip(), []
        else:
            lines.append(line)
    sections.append((title, '\n'.join(lines)))
    return [(t, body) for t, body in sections if body.strip()]


def percentile(values, q):
    return float(numpy.percentile(numpy.array(values), q)) * 1000


def bench_indexing(server, fp32_server, chunker, texts, connection, rounds=2):
    """Ours (the server as configured: large batches in the precision it measured faster) and ours
    on a server forced to fp32, against the cookbook loop, interleaved in rounds."""
    cursor = connection.cursor()
    cursor.execute('CREATE TEMP TABLE bench_chunk (id serial PRIMARY KEY, text text, vector bytea)')
    cook_texts = texts[:max(len(texts) // 10, 20)]
    fp32_texts = texts[:max(len(texts) // 5, 256)]  # a rate per chunk too: a fifth keeps make bench short
    rates = {'ours': [], 'fp32': [], 'cook': []}
    precisions = set()

    def ours(on, texts):
        start = time.perf_counter()
        for i in range(0, len(texts), 64):
            batch = texts[i:i + 64]
            answer = on.embed(batch, MODELS[0])
            if on is server:
                precisions.add(answer.get('precision'))
            execute_values(cursor, 'INSERT INTO bench_chunk (text, vector) VALUES %s',
                           [(t, to_bytes(v)) for t, v in zip(batch, answer['data'])])
        connection.commit()
        return len(texts) / (time.perf_counter() - start)
    for _ in range(rounds):
        rates['ours'].append(ours(server, texts))
        rates['fp32'].append(ours(fp32_server, fp32_texts))
        start = time.perf_counter()
        for text in cook_texts:
            chunker.count(text)  # the cookbook tokenizes each chunk before embedding it
            vector = server.embed([text], MODELS[0])['data'][0]
            cursor.execute('INSERT INTO bench_chunk (text, vector) VALUES (%s, %s)', (text, to_bytes(vector)))
            connection.commit()
        rates['cook'].append(len(cook_texts) / (time.perf_counter() - start))
    server_rss = psutil.Process(json.load(open(os.path.join(server.run_dir, 'server.json')))['pid']).memory_info().rss
    ours_rate, fp32_rate, cook = max(rates['ours']), max(rates['fp32']), max(rates['cook'])
    choice = ((server.health() or {}).get('embed') or {}).get('large_batches', {}).get(MODELS[0]) or {}
    measured = ''
    if choice.get('fp32_gflops'):
        measured = '; the server measured fp32 %.0f, bf16 %.0f GFLOP/s' % (choice['fp32_gflops'], choice['bf16_gflops'])
    used = '+'.join(sorted(p for p in precisions if p))
    print('indexing: ours %.1f chunks/s in %s (%d chunks, batches of 64, bulk insert), ours forced to fp32 %.1f '
          'chunks/s (%d chunks), cookbook loop %.1f chunks/s (%d chunks, one per request and row, fp32): %.2fx the cookbook '
          '(fp32: %.2fx; %s/fp32 %.2fx)%s; model server RSS %.0f MB (best of %d rounds, interleaved)'
          % (ours_rate, used, len(texts), fp32_rate, len(fp32_texts), cook, len(cook_texts),
             ours_rate / cook, fp32_rate / cook, used, ours_rate / fp32_rate, measured, server_rss / 1e6, rounds))


def bench_precision(server, fp32_server, texts, questions, k=10):
    """Cosine between the vectors of the same passages from the server as configured and from one
    forced to fp32 (what bf16 changes), and how much of the exact top-10 of each question (embedded
    alone, as a search does: fp32) over the fp32 passages the other passages' top-10 holds."""
    answer = server.embed(texts, MODELS[0])
    got = numpy.asarray(answer['data'], dtype=numpy.float32)
    reference = numpy.asarray(fp32_server.embed(texts, MODELS[0])['data'], dtype=numpy.float32)
    cosines = (got.astype(numpy.float64) * reference).sum(axis=1) / numpy.linalg.norm(got, axis=1) / \
        numpy.linalg.norm(reference, axis=1)
    ids = numpy.arange(len(texts))
    overlap = []
    for question in questions:
        vector = numpy.asarray(server.embed([question], MODELS[0], 'query')['data'][0], dtype=numpy.float32)
        overlap.append(len(set(h[0] for h in exact_top(got, ids, vector, k)) &
                           set(h[0] for h in exact_top(reference, ids, vector, k))) / float(k))
    print('passage vectors, the server as configured (%s) vs forced to fp32, %d README chunks: cosine min %.6f, '
          'median %.6f; exact top-10 over them holds %.3f of fp32\'s over %d questions'
          % (answer['precision'], len(texts), cosines.min(), numpy.median(cosines), float(numpy.mean(overlap)),
             len(questions)))


def near_copies(base, size, rng):
    """The former large-size data: `size` rows, each a real vector (a row of `base`) with isotropic
    Gaussian noise 0.04 per dimension, normalised. With ~700 README chunks a question's ten nearest
    are often ten noisy copies of one chunk: near-ties spread through all 384 dimensions, harder for
    HNSW than real collections and unlike them (they rarely hold 150 near-copies of each text)."""
    picks = base[rng.randint(0, len(base), size)]
    matrix = picks + rng.normal(0, 0.04, picks.shape).astype(numpy.float32)
    return matrix / numpy.linalg.norm(matrix, axis=1, keepdims=True)


def spread_like(base, size, rng):
    """`size` distinct vectors that spread like real chunk embeddings (the synthetic model of the
    large sizes, where embedding that many real chunks would take an hour on 2 cores): each is a
    real vector (a row of `base`) moved by Gaussian noise with the real vectors' own covariance
    (along the directions real chunks differ in, not evenly through all 384 dimensions), scaled so
    that a moved vector's cosine to the vector it came from is the median cosine between a real
    chunk and its nearest other chunk (a new chunk is as near its seed as real neighbours are).
    -> (matrix, that median cosine)."""
    similarity = base.dot(base.T)
    numpy.fill_diagonal(similarity, -1.0)
    target = float(numpy.median(similarity.max(axis=1)))
    centered = base - base.mean(axis=0)
    values, vectors = numpy.linalg.eigh(centered.T.dot(centered) / len(base))
    root = (vectors * numpy.sqrt(numpy.clip(values, 0, None))).astype(numpy.float32)

    def moved(count, scale, generator):
        seeds = base[generator.randint(0, len(base), count)]
        matrix = seeds + scale * generator.normal(0, 1, seeds.shape).astype(numpy.float32).dot(root.T)
        return matrix / numpy.linalg.norm(matrix, axis=1, keepdims=True), seeds
    low, high = 0.0, 10.0
    for _ in range(30):  # the scale whose median cosine to the seed is the target (bisection)
        scale = (low + high) / 2
        matrix, seeds = moved(500, scale, numpy.random.RandomState(1))
        low, high = (scale, high) if numpy.median((matrix * seeds).sum(axis=1)) > target else (low, scale)
    return moved(size, scale, rng)[0], target


def recall(store, ref, matrix, ids, vectors, k):
    """Mean recall@k of the index against exact search over `vectors`."""
    found = []
    for vector in vectors:
        exact = set(h[0] for h in exact_top(matrix, ids, vector, k))
        found.append(len(exact & set(h[0] for h in store.search(ref, vector, k))) / float(k))
    return float(numpy.mean(found))


def bench_search(server, base_vectors, sizes, connection, queries, k=10, held_out=300):
    """At each size, two data sets of `size` vectors made from the real README chunk vectors:
    "spread" (spread_like: distinct vectors, the whole call timed on it) and "copies" (near_copies,
    the former data: recall only). Recall@10 of the index against exact search over the real
    questions, over `held_out` vectors drawn like the data but not in it, and of the whole
    retrieval (the rights-filtered top-10 through the index against through exact search)."""
    cursor = connection.cursor()
    rng = numpy.random.RandomState(0)
    folder = tempfile.mkdtemp(prefix='bench_knowledge_')
    questions = [numpy.asarray(v, dtype=numpy.float32) for v in server.embed(queries, MODELS[0], 'query')['data']]
    for size in sizes:
        ids = numpy.arange(1, size + 1, dtype=numpy.int64)
        # the rights: each chunk's source record belongs to one of 4 companies; the user reads 2
        cursor.execute('DROP TABLE IF EXISTS bench_record; CREATE TEMP TABLE bench_record '
                       '(id integer PRIMARY KEY, company_id integer)')
        execute_values(cursor, 'INSERT INTO bench_record VALUES %s', [(int(i), int(i % 4)) for i in ids],
                       page_size=10000)
        connection.commit()
        spent = {'lookup': [0.0], 'filter': [0.0]}

        def readable(chunk_ids):
            started = time.perf_counter()
            cursor.execute('SELECT id FROM bench_record WHERE id = ANY(%s) AND company_id IN (0, 1)', (list(chunk_ids),))
            found = [row[0] for row in cursor.fetchall()]
            spent['filter'][0] += time.perf_counter() - started
            return found

        def timed(search):
            def call(n):
                started = time.perf_counter()
                found = search(n)
                spent['lookup'][0] += time.perf_counter() - started
                return found
            return call
        for data in ('spread', 'copies'):
            if data == 'spread':
                matrix, target = spread_like(base_vectors, size, rng)
                others = spread_like(base_vectors, held_out, numpy.random.RandomState(size + 1))[0]
                label = ('distinct vectors spread like real chunks (the README chunks\' covariance, '
                         'median cosine to the seed %.3f)' % target)
            else:
                matrix = near_copies(base_vectors, size, rng)
                others = near_copies(base_vectors, held_out, numpy.random.RandomState(size + 1))
                label = 'near-copies of %d README chunks (noise 0.04, the former data)' % len(base_vectors)
            store = stores.EmbeddedStore({'index_dir': os.path.join(folder, data), 'approx_min': 1})
            ref = stores.CollectionRef(size, matrix.shape[1], 1, lambda: (ids, matrix))
            started = time.perf_counter()
            store.search(ref, matrix[0], 1)  # builds the index file once
            build = time.perf_counter() - started
            agree = []
            for vector in questions:
                top = [set(h[0] for h in retrieval.readable_top_k(search, readable, k)) for search in
                       (lambda n: exact_top(matrix, ids, vector, n), lambda n: store.search(ref, vector, n))]
                agree.append(len(top[0] & top[1]) / float(k))
            print('search at %d chunks, %s: index built in %.1f s; recall@10 of the index %.3f over %d questions, '
                  '%.3f over %d held-out vectors; the rights-filtered top-10 through the index holds %.3f of '
                  'exact\'s' % (size, label, build, recall(store, ref, matrix, ids, questions, k), len(questions),
                                  recall(store, ref, matrix, ids, others, k), held_out, float(numpy.mean(agree))))
            if data != 'spread':
                store.drop(ref)  # its file (150 MB at 100,000) and the index this process holds
                continue
            timings = {'exact': [], 'index': []}
            split = {'embed': [], 'exact lookup': [], 'index lookup': [], 'filter': []}
            for question in queries:
                for kind in ('exact', 'index'):
                    spent['lookup'][0] = spent['filter'][0] = 0.0
                    started = time.perf_counter()
                    vector = numpy.asarray(server.embed([question], MODELS[0], 'query')['data'][0],
                                           dtype=numpy.float32)
                    embedded = time.perf_counter()
                    if kind == 'exact':
                        search = timed(lambda n: exact_top(matrix, ids, vector, n))
                    else:
                        search = timed(lambda n: store.search(ref, vector, n))
                    retrieval.readable_top_k(search, readable, k)
                    timings[kind].append(time.perf_counter() - started)
                    split['embed'].append(embedded - started)
                    split['%s lookup' % kind].append(spent['lookup'][0])
                    if kind == 'index':
                        split['filter'].append(spent['filter'][0])
            print('search at %d chunks (user reads half of them), the whole call: exact p50 %.1f p95 %.1f ms, '
                  'index p50 %.1f p95 %.1f ms; its parts (p50/p95 ms): embed the question %.1f/%.1f, lookup '
                  'exact %.1f/%.1f, index %.2f/%.2f (%.2fx at p95), rights filter %.1f/%.1f; %d questions'
                  % (size, percentile(timings['exact'], 50), percentile(timings['exact'], 95),
                     percentile(timings['index'], 50), percentile(timings['index'], 95),
                     percentile(split['embed'], 50), percentile(split['embed'], 95),
                     percentile(split['exact lookup'], 50), percentile(split['exact lookup'], 95),
                     percentile(split['index lookup'], 50), percentile(split['index lookup'], 95),
                     percentile(split['exact lookup'], 95) / max(percentile(split['index lookup'], 95), 1e-9),
                     percentile(split['filter'], 50), percentile(split['filter'], 95), len(queries)))
            store.drop(ref)


def bench_quality(server, chunkers, name, corpus, questions, variants, fp32_server=None):
    """Hit rate@5 and MRR@10 of `questions` ({'question', 'section'}) over `corpus` (Markdown): a
    hit is a chunk of the named section (## or ### heading), one that lies at least half in it or
    holds at least half of it (a short section shares its chunk with its neighbours)."""
    with open(os.path.join(ROOT, 'bench', 'data', corpus)) as f:
        text = f.read()
    marks = [(offset, title) for offset, level, title in chunking.headings(text) if level in (2, 3)]
    spans = [(0, marks[0][0] if marks else len(text), 'Introduction')] + [
        (start, marks[i + 1][0] if i + 1 < len(marks) else len(text), title) for i, (start, title) in enumerate(marks)]

    def sections(chunk):
        found = set()
        for start, end, title in spans:
            shared = min(end, chunk['end']) - max(start, chunk['start'])
            if shared > 0 and (2 * shared >= chunk['end'] - chunk['start'] or 2 * shared >= end - start):
                found.add(title)
        return found
    runs = [(model, server) for model in MODELS] + ([(MODELS[0], fp32_server)] if fp32_server else [])
    for model, on in runs:
        for label, size, overlap, headed in variants:
            cut = chunkers[model](text, size, overlap)
            pieces = chunking.with_headings(text, cut) if headed else cut
            chunks = [(sections(c), c['text']) for c in pieces]
            answer = on.embed([c[1] for c in chunks], model)
            vectors = numpy.asarray(answer['data'], dtype=numpy.float32)
            # one question a request, as a search embeds it (a small request: fp32, one thread)
            queries = numpy.asarray([on.embed([q['question']], model, 'query')['data'][0] for q in questions],
                                    dtype=numpy.float32)
            ids = numpy.arange(len(chunks))
            hits, reciprocal = 0, []
            for item, query in zip(questions, queries):
                ranked = [chunks[i][0] for i, _ in exact_top(vectors, ids, query, 10)]
                rank = next((r for r, titles in enumerate(ranked, 1) if item['section'] in titles), None)
                hits += bool(rank and rank <= 5)
                reciprocal.append(1.0 / rank if rank else 0.0)
            print('retrieval quality (%s, passages in %s, %s, %s): hit rate@5 %.2f, MRR@10 %.3f over %d questions '
                  '(%d chunks)' % (model, answer.get('precision'), name, label, hits / float(len(questions)),
                                   float(numpy.mean(reciprocal)),
                     len(questions), len(chunks)))


QUALITY_VARIANTS = [
    ('chunks of 200 tokens, overlap 40, plain (the former default)', 200, 40, False),
    ('chunks of 128 tokens, overlap 32, led by their heading path (the default)', 128, 32, True),
]


def _questions(name):
    with open(os.path.join(ROOT, 'bench', 'data', name)) as f:
        return json.load(f)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--chunks', type=int, default=10000)
    parser.add_argument('--search-sizes', type=int, nargs='+', default=[10000, 100000])
    parser.add_argument('--small', action='store_true', help='a quick check: 500 chunks, 2,000 and 10,000 in search')
    parser.add_argument('--db', default='postgres')
    parser.add_argument('--quality-only', action='store_true', help='only the retrieval quality (a minute)')
    parser.add_argument('--search-only', action='store_true', help='only the search (latency and recall)')
    parser.add_argument('--indexing-only', action='store_true',
                        help='only the indexing, and the cosine of its passage vectors to fp32\'s')
    args = parser.parse_args()
    if args.small:
        args.chunks, args.search_sizes = 500, [2000, 10000]
    print(cpu_line())
    run_dir = tempfile.mkdtemp(prefix='bench_knowledge_server_')
    server = ModelServer(PYTHON, run_dir, env=env(), cwd=ROOT)
    # the same server forced to fp32: what bf16 indexing gains and what it changes in the vectors
    fp32_server = ModelServer(PYTHON, tempfile.mkdtemp(prefix='bench_knowledge_fp32_'), env=env(), cwd=ROOT,
                              embed_precision='fp32')
    connection = psycopg2.connect(dbname=args.db)
    try:
        chunkers = {model: chunking.TokenizerChunker(documents.tokenizer_info(PYTHON, env(), model)['tokenizer'])
                    for model in MODELS}
        chunker = chunkers[MODELS[0]]
        questions = _questions('knowledge_questions.json')
        pieces = [c['text'] for _t, body in readme_sections() for c in chunker(body, 64, 8)]
        texts = [pieces[i % len(pieces)] + (' (%d)' % i) for i in range(args.chunks)]
        for on in (server, fp32_server):
            on.embed(['warm up'], MODELS[0])
            on.embed(texts[:64], MODELS[0])  # the first large batch: the server measures its precision
        if not args.quality_only:
            if not args.search_only:
                bench_indexing(server, fp32_server, chunker, texts, connection)
                bench_precision(server, fp32_server, pieces, [q['question'] for q in questions])
            if args.indexing_only:
                return
            base_vectors = numpy.asarray(server.embed(pieces, MODELS[0])['data'], dtype=numpy.float32)
            bench_search(server, base_vectors, args.search_sizes, connection, [q['question'] for q in questions])
        if args.search_only:
            return
        bench_quality(server, chunkers, 'the README (bench/data/knowledge_corpus.md)', 'knowledge_corpus.md',
                      questions, QUALITY_VARIANTS, fp32_server)
        bench_quality(server, chunkers, 'Arabic handbook', 'knowledge_corpus_ar.md',
                      _questions('knowledge_questions_ar.json'), QUALITY_VARIANTS[1:])
        print('peak RSS of this process %.0f MB' % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0))
    finally:
        connection.close()
        server.stop()
        fp32_server.stop()


if __name__ == '__main__':
    main()
