"""Knowledge: indexing throughput, search latency and recall, retrieval quality.

    python bench/bench_knowledge.py [--chunks 10000] [--search-sizes 10000 100000] [--small]

Runs in Odoo's venv (where the embedded store, usearch and psycopg2 live) with the real model
server (trainer/serve.py, POST /embed) and the real PostgreSQL (temporary tables in the database
named by --db, default `postgres`):

1. Indexing, N chunks of README text: ours (lib/serving/model_server.py `embed` in batches of 64, one bulk
   INSERT per batch, as llm.knowledge.collection._add_chunks does) vs a cookbook loop (tokenize,
   embed one chunk per request, INSERT one row), interleaved in rounds; chunks/s and the ratio; peak
   RSS of the model server. The cookbook runs on a tenth of the chunks (its rate is per chunk).
2. Search, the whole call as a restricted user makes it: embed the question (model server), rank
   (exact numpy vs the embedded store's usearch index), then the rights filter (an SQL query on the
   chunks' source records with a company rule, fetching more until k readable), at each size;
   p50/p95 in ms, and recall@10 of the index against exact search. Vectors past the embedded
   chunks are those vectors with noise (embedding 100,000 chunks takes minutes on 2 cores).
3. Retrieval quality, for each local embedding model (questions embedded as queries): 29 questions
   (bench/data/knowledge_questions.json) written from a frozen copy of this README
   (bench/data/knowledge_corpus.md), each naming the section that answers it, cut with the model's
   tokenizer into the former default chunks (200 tokens, overlap 40, plain) and the present ones
   (128, overlap 32, each led by its Markdown heading path); and 8 Arabic questions on a short
   Arabic handbook (bench/data/knowledge_corpus_ar.md, knowledge_questions_ar.json). Hit rate@5
   and MRR@10; a hit is a chunk lying mostly in the named section.
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


def bench_indexing(server, chunker, texts, connection, rounds=2):
    cursor = connection.cursor()
    cursor.execute('CREATE TEMP TABLE bench_chunk (id serial PRIMARY KEY, text text, vector bytea)')
    cook_texts = texts[:max(len(texts) // 10, 20)]
    ours_rate, cook_rate = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(0, len(texts), 64):
            batch = texts[i:i + 64]
            vectors = server.embed(batch, MODELS[0])['data']
            execute_values(cursor, 'INSERT INTO bench_chunk (text, vector) VALUES %s',
                           [(t, to_bytes(v)) for t, v in zip(batch, vectors)])
        connection.commit()
        ours_rate.append(len(texts) / (time.perf_counter() - start))
        start = time.perf_counter()
        for text in cook_texts:
            chunker.count(text)  # the cookbook tokenizes each chunk before embedding it
            vector = server.embed([text], MODELS[0])['data'][0]
            cursor.execute('INSERT INTO bench_chunk (text, vector) VALUES (%s, %s)', (text, to_bytes(vector)))
            connection.commit()
        cook_rate.append(len(cook_texts) / (time.perf_counter() - start))
    server_rss = psutil.Process(json.load(open(os.path.join(server.run_dir, 'server.json')))['pid']).memory_info().rss
    ours, cook = max(ours_rate), max(cook_rate)
    print('indexing: ours %.1f chunks/s (%d chunks, batches of 64, bulk insert), cookbook loop %.1f chunks/s '
          '(%d chunks, one per request and row): %.2fx; model server RSS %.0f MB (best of %d rounds, interleaved)'
          % (ours, len(texts), cook, len(cook_texts), ours / cook, server_rss / 1e6, rounds))


def bench_search(server, base_vectors, sizes, connection, queries, k=10):
    cursor = connection.cursor()
    rng = numpy.random.RandomState(0)
    folder = tempfile.mkdtemp(prefix='bench_knowledge_')
    for size in sizes:
        picks = base_vectors[rng.randint(0, len(base_vectors), size)]
        matrix = picks + rng.normal(0, 0.04, picks.shape).astype(numpy.float32)
        matrix /= numpy.linalg.norm(matrix, axis=1, keepdims=True)
        ids = numpy.arange(1, size + 1, dtype=numpy.int64)
        # the rights: each chunk's source record belongs to one of 4 companies; the user reads 2
        cursor.execute('DROP TABLE IF EXISTS bench_record; CREATE TEMP TABLE bench_record '
                       '(id integer PRIMARY KEY, company_id integer)')
        execute_values(cursor, 'INSERT INTO bench_record VALUES %s', [(int(i), int(i % 4)) for i in ids],
                       page_size=10000)
        connection.commit()

        def readable(chunk_ids):
            cursor.execute('SELECT id FROM bench_record WHERE id = ANY(%s) AND company_id IN (0, 1)', (list(chunk_ids),))
            return [row[0] for row in cursor.fetchall()]

        store = stores.EmbeddedStore({'index_dir': folder, 'approx_min': 1})
        ref = stores.CollectionRef(size, matrix.shape[1], 1, lambda: (ids, matrix))
        started = time.perf_counter()
        store.search(ref, matrix[0], 1)  # builds the index file once
        build = time.perf_counter() - started
        timings = {'exact': [], 'index': []}
        lookups = {'exact': [], 'index': []}
        recall = []
        for question in queries:
            for kind in ('exact', 'index'):
                started = time.perf_counter()
                vector = numpy.asarray(server.embed([question], MODELS[0], 'query')['data'][0], dtype=numpy.float32)
                embedded = time.perf_counter()
                if kind == 'exact':
                    search = lambda n: exact_top(matrix, ids, vector, n)
                else:
                    search = lambda n: store.search(ref, vector, n)
                retrieval.readable_top_k(search, readable, k)
                timings[kind].append(time.perf_counter() - started)
                lookups[kind].append(time.perf_counter() - embedded)
            exact = set(h[0] for h in exact_top(matrix, ids, vector, k))
            recall.append(len(exact & set(h[0] for h in store.search(ref, vector, k))) / float(k))
        print('search at %d chunks (user reads half of them): whole call exact p50 %.1f ms p95 %.1f ms, index p50 '
              '%.1f ms p95 %.1f ms; without the query embedding: exact p50 %.1f p95 %.1f ms, index p50 %.1f p95 '
              '%.1f ms (%.2fx at p95); index built in %.1f s; recall@10 of the index %.3f over %d questions'
              % (size, percentile(timings['exact'], 50), percentile(timings['exact'], 95),
                 percentile(timings['index'], 50), percentile(timings['index'], 95),
                 percentile(lookups['exact'], 50), percentile(lookups['exact'], 95),
                 percentile(lookups['index'], 50), percentile(lookups['index'], 95),
                 percentile(lookups['exact'], 95) / max(percentile(lookups['index'], 95), 1e-9), build,
                 float(numpy.mean(recall)), len(queries)))


def bench_quality(server, chunkers, name, corpus, questions, variants):
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
    for model in MODELS:
        for label, size, overlap, headed in variants:
            cut = chunkers[model](text, size, overlap)
            pieces = chunking.with_headings(text, cut) if headed else cut
            chunks = [(sections(c), c['text']) for c in pieces]
            vectors = numpy.asarray(server.embed([c[1] for c in chunks], model)['data'], dtype=numpy.float32)
            queries = numpy.asarray(server.embed([q['question'] for q in questions], model, 'query')['data'],
                                    dtype=numpy.float32)
            ids = numpy.arange(len(chunks))
            hits, reciprocal = 0, []
            for item, query in zip(questions, queries):
                ranked = [chunks[i][0] for i, _ in exact_top(vectors, ids, query, 10)]
                rank = next((r for r, titles in enumerate(ranked, 1) if item['section'] in titles), None)
                hits += bool(rank and rank <= 5)
                reciprocal.append(1.0 / rank if rank else 0.0)
            print('retrieval quality (%s, %s, %s): hit rate@5 %.2f, MRR@10 %.3f over %d questions (%d chunks)'
                  % (model, name, label, hits / float(len(questions)), float(numpy.mean(reciprocal)),
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
    args = parser.parse_args()
    if args.small:
        args.chunks, args.search_sizes = 500, [2000, 10000]
    print(cpu_line())
    run_dir = tempfile.mkdtemp(prefix='bench_knowledge_server_')
    server = ModelServer(PYTHON, run_dir, env=env(), cwd=ROOT)
    connection = psycopg2.connect(dbname=args.db)
    try:
        chunkers = {model: chunking.TokenizerChunker(documents.tokenizer_info(PYTHON, env(), model)['tokenizer'])
                    for model in MODELS}
        chunker = chunkers[MODELS[0]]
        questions = _questions('knowledge_questions.json')
        pieces = [c['text'] for _t, body in readme_sections() for c in chunker(body, 64, 8)]
        texts = [pieces[i % len(pieces)] + (' (%d)' % i) for i in range(args.chunks)]
        server.embed(['warm up'], MODELS[0])
        if not args.quality_only:
            bench_indexing(server, chunker, texts, connection)
            base_vectors = numpy.asarray(server.embed(pieces[:2000], MODELS[0])['data'], dtype=numpy.float32)
            bench_search(server, base_vectors, args.search_sizes, connection, [q['question'] for q in questions])
        bench_quality(server, chunkers, 'the README (bench/data/knowledge_corpus.md)', 'knowledge_corpus.md',
                      questions, QUALITY_VARIANTS)
        bench_quality(server, chunkers, 'Arabic handbook', 'knowledge_corpus_ar.md',
                      _questions('knowledge_questions_ar.json'), QUALITY_VARIANTS[1:])
        print('peak RSS of this process %.0f MB' % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0))
    finally:
        connection.close()
        server.stop()


if __name__ == '__main__':
    main()
