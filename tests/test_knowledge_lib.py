"""The knowledge library without Odoo's ORM: chunking by tokens, retrieval within rights, and the
embedded vector store's index file shared by processes through a version."""
import os
import shutil
import tempfile
import unittest

import numpy

from odoo.addons.llm_training.lib.knowledge import chunking, retrieval, stores
from odoo.addons.llm_training.lib.knowledge.vectors import exact_top, from_bytes, to_bytes


def words_offsets(text):
    """A whitespace tokenizer's offsets: one token per word."""
    offsets, start = [], None
    for i, ch in enumerate(text + ' '):
        if ch.isspace():
            if start is not None:
                offsets.append((start, i))
                start = None
        elif start is None:
            start = i
    return offsets


class TestChunking(unittest.TestCase):

    def test_windows_overlap_and_cover_the_text(self):
        text = ' '.join('w%d' % i for i in range(25))
        chunks = chunking.chunk_text(text, words_offsets(text), size=10, overlap=3)
        self.assertEqual([c['position'] for c in chunks], [0, 1, 2, 3])
        self.assertEqual(chunks[0]['text'], ' '.join('w%d' % i for i in range(10)))
        self.assertTrue(chunks[1]['text'].startswith('w7 w8 w9 w10'))  # 3 tokens repeated
        self.assertTrue(chunks[-1]['text'].endswith('w24'))
        self.assertEqual(chunks[0]['tokens'], 10)

    def test_bad_sizes_are_refused(self):
        self.assertIn('overlap', chunking.check_sizes(10, 10))
        self.assertIn('at least', chunking.check_sizes(4, 0))
        self.assertIn('over', chunking.check_sizes(300, 0, max_tokens=256))
        with self.assertRaises(ValueError):
            chunking.chunk_text('a b', [(0, 1), (2, 3)], 10, 20)


class TestRetrieval(unittest.TestCase):

    def test_top_k_counts_only_readable_chunks(self):
        ranked = [(i, 1.0 - i / 100.0) for i in range(1, 60)]  # ids 1..59, best first
        calls = []

        def search(n):
            calls.append(n)
            return ranked[:n]

        readable = lambda ids: [i for i in ids if i % 10 == 0]  # one chunk in ten
        hits = retrieval.readable_top_k(search, readable, k=4)
        self.assertEqual([h[0] for h in hits], [10, 20, 30, 40])
        self.assertEqual(calls, [16, 64], 'fetched more until k readable were found')

    def test_exhausted_and_threshold(self):
        ranked = [(1, 0.9), (2, 0.8), (3, 0.2)]
        hits = retrieval.readable_top_k(lambda n: ranked[:n], lambda ids: ids, k=5, threshold=0.5)
        self.assertEqual(hits, [(1, 0.9), (2, 0.8)])
        self.assertEqual(retrieval.readable_top_k(lambda n: ranked[:n], lambda ids: [], k=2), [])


class TestEmbeddedStore(unittest.TestCase):

    def setUp(self):
        self.folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.folder)
        rng = numpy.random.RandomState(0)
        matrix = rng.standard_normal((600, 32)).astype(numpy.float32)
        self.matrix = matrix / numpy.linalg.norm(matrix, axis=1, keepdims=True)
        self.ids = numpy.arange(1000, 1600, dtype=numpy.int64)
        self.loads = 0
        stores.EmbeddedStore._loaded.clear()

    def ref(self, version, rows=600):
        def load():
            self.loads += 1
            return self.ids[:rows], self.matrix[:rows]
        return stores.CollectionRef(7, 32, version, load)

    def test_vectors_round_trip_as_bytes(self):
        self.assertTrue(numpy.array_equal(from_bytes(to_bytes(self.matrix[0]), 32), self.matrix[0]))

    def test_small_collections_are_searched_exactly(self):
        store = stores.EmbeddedStore({'index_dir': self.folder, 'approx_min': 1000})
        hits = store.search(self.ref(1), self.matrix[5], 3)
        self.assertEqual(hits[0][0], 1005)
        self.assertAlmostEqual(hits[0][1], 1.0, places=5)
        self.assertFalse(os.listdir(self.folder), 'no index file for an exact search')

    def test_index_file_is_shared_and_reloaded_on_a_new_version(self):
        store = stores.EmbeddedStore({'index_dir': self.folder, 'approx_min': 100})
        query = self.matrix[42]
        hits = store.search(self.ref(1), query, 10)
        exact = exact_top(self.matrix, self.ids, query, 10)
        self.assertEqual(hits[0][0], 1042)
        recall = len(set(h[0] for h in hits) & set(h[0] for h in exact)) / 10.0
        self.assertGreaterEqual(recall, 0.9)
        self.assertEqual(self.loads, 1)
        self.assertTrue(os.path.isfile(os.path.join(self.folder, 'collection_7.usearch')))
        # another worker (a fresh process cache) loads the file of this version: no rebuild
        stores.EmbeddedStore._loaded.clear()
        store.search(self.ref(1), query, 10)
        self.assertEqual(self.loads, 1)
        # the database's version moved (chunks removed): every worker rebuilds or reloads
        hits = store.search(self.ref(2, rows=300), self.matrix[400], 5)
        self.assertEqual(self.loads, 2)
        self.assertTrue(all(h[0] < 1300 for h in hits), 'vectors gone from the new version are gone from the index')
        store.drop(self.ref(2))
        self.assertEqual(os.listdir(self.folder), [])

    def test_the_index_keeps_more_candidates_when_more_results_are_asked(self):
        self.assertEqual(stores.expansion_for(10), stores.EXPANSION_SEARCH)
        self.assertEqual(stores.expansion_for(160), 160 * stores.EXPANSION_PER_RESULT)  # the retrieval's second round at top-k 10
        self.assertEqual(stores.expansion_for(2000), stores.EXPANSION_MAX)
        self.assertEqual(stores.expansion_for(10 ** 5), 10 ** 5, 'never fewer candidates than results')
        store = stores.EmbeddedStore({'index_dir': self.folder, 'approx_min': 100})
        self.assertEqual(len(store.search(self.ref(1), self.matrix[3], 160)), 160)
        index = stores.EmbeddedStore._loaded[(self.folder, 7)][3]
        self.assertEqual(index.expansion_search, stores.expansion_for(160))
        store.search(self.ref(1), self.matrix[3], 10)
        self.assertEqual(index.expansion_search, stores.EXPANSION_SEARCH)


class TestPgVector(unittest.TestCase):

    def test_missing_extension_is_a_clear_error(self):
        class Cursor(object):
            def execute(self, *args):
                pass

            def fetchall(self):
                return []
        store = stores.store_class('pgvector')({})
        with self.assertRaisesRegex(stores.StoreError, 'no "vector" extension'):
            store.search(stores.CollectionRef(1, 3, 1, None, cursor=Cursor()), [1, 0, 0], 3)


class TestHeadings(unittest.TestCase):

    def test_a_markdown_chunk_carries_its_heading(self):
        text = '# Refunds\nwithin thirty days of delivery to the card used\n# Shipping\nfrom Rotterdam'
        chunks = chunking.chunk_text(text, words_offsets(text), size=8, overlap=0)
        headed = chunking.with_headings(text, chunks)
        self.assertEqual(headed[0]['text'], chunks[0]['text'], 'a chunk starting with its heading keeps it once')
        self.assertEqual(headed[1]['text'], 'Refunds\nthe card used\n# Shipping\nfrom Rotterdam')

    def test_the_path_of_nested_headings_leads_each_chunk_and_code_is_not_a_heading(self):
        text = ('# Guide\nintro words here\n## Refunds\nwithin thirty days of delivery\n```\n# not a heading\n```\n'
                'to the card used for the order\n## Shipping\nfrom Rotterdam on Mondays')
        self.assertEqual([(level, title) for _o, level, title in chunking.headings(text)],
                         [(1, 'Guide'), (2, 'Refunds'), (2, 'Shipping')], 'a shell comment in a code block is no heading')
        chunks = chunking.chunk_text(text, words_offsets(text), size=8, overlap=0)
        self.assertEqual([c['text'] for c in chunking.with_headings(text, chunks)], [
            '# Guide\nintro words here\n## Refunds\nwithin',  # starts with its own heading: kept once
            'Guide > Refunds\nthirty days of delivery\n```\n# not a',
            'Guide > Refunds\nheading\n```\nto the card used for the',  # the code's `# not a heading` is no section
            'Guide > Refunds\norder\n## Shipping\nfrom Rotterdam on Mondays'])

    def test_a_record_chunk_carries_its_title_once(self):
        chunks = [{'position': 0, 'text': 'Desk Lamp, brass, 40 W', 'start': 0, 'end': 22, 'tokens': 5},
                  {'position': 1, 'text': 'ships within two days', 'start': 23, 'end': 44, 'tokens': 4}]
        titled = chunking.with_title('Desk Lamp', chunks)
        self.assertEqual(titled[0]['text'], 'Desk Lamp, brass, 40 W', 'already there: not repeated')
        self.assertEqual(titled[1]['text'], 'Desk Lamp\nships within two days')
        self.assertEqual(chunking.with_title('', chunks), chunks)
