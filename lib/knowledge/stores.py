"""Vector stores behind one interface, like the training providers (lib/providers/).

A store holds the vectors of a collection's chunks (keyed by chunk id) and answers nearest
neighbours by cosine similarity. PostgreSQL's chunk rows stay the source of truth; a store is told
what changed and searched by the retrieval (retrieval.py), which filters by rights.

    store.add(collection, ids, vectors)      after chunks were written
    store.delete(collection, ids)            after chunks were removed
    store.search(collection, vector, k)      -> [(chunk id, score)], best first, at most k
    store.drop(collection)                   the collection is deleted

`collection` is a CollectionRef: its id, its vector dimensions, its version (a counter the ORM
raises in the database whenever its chunks change) and `load()`, which reads (ids, matrix) of its
vectors from PostgreSQL.

- EmbeddedStore (default, nothing to install): exact search over the vectors in memory for small
  collections; from APPROX_MIN vectors an approximate HNSW index (usearch) kept in one file per
  collection in Odoo's data folder. Each process keeps what it loaded with the version it was
  built for and compares it with the database's version at every search, so every worker sees an
  update; a stale index file is rebuilt from PostgreSQL by one process (a file lock), the others
  load it.
- PgVectorStore: the `vector` extension, when the server has it (detected, never assumed).
- MilvusStore: a Milvus server or cluster (`pymilvus`, the client a cluster uses), one Milvus
  collection per knowledge collection. PostgreSQL stays the source of truth: a chunk id Milvus
  returns that PostgreSQL no longer has (a rolled-back transaction) is dropped by the retrieval.
"""
import json
import os
import threading

import numpy

from ..host.file_lock import held
from .vectors import exact_top

APPROX_MIN = 20000  # vectors from which the embedded store searches an index rather than all of them
_STORES = {}


class StoreError(Exception):
    pass


class CollectionRef(object):
    def __init__(self, id, dimensions, version, load, cursor=None):
        self.id = id
        self.dimensions = dimensions
        self.version = version
        self.load = load
        self.cursor = cursor


def register(cls):
    _STORES[cls.service] = cls
    return cls


def store_class(service):
    if service not in _STORES:
        raise StoreError('vector store %r has no adapter (known: %s)' % (service, ', '.join(sorted(_STORES))))
    return _STORES[service]


class VectorStore(object):
    service = None

    def __init__(self, config):
        self.config = config

    def add(self, collection, ids, vectors):
        raise NotImplementedError

    def delete(self, collection, ids):
        raise NotImplementedError

    def search(self, collection, vector, k):
        raise NotImplementedError

    def drop(self, collection):
        """Forget the collection (deleted): its index, its rows."""
        raise NotImplementedError


@register
class EmbeddedStore(VectorStore):
    """config: {'index_dir': folder of the index files (Odoo's data folder), 'approx_min': int}."""
    service = 'embedded'
    _loaded = {}  # (index_dir, collection id) -> (version, kind, ids, matrix or index); per process
    _lock = threading.Lock()
    _search_lock = threading.Lock()

    def add(self, collection, ids, vectors):
        pass  # PostgreSQL holds them; the version the ORM raised makes every process reload

    def delete(self, collection, ids):
        pass

    def drop(self, collection):
        index_path, meta_path = self._paths(collection)
        for path in (index_path, meta_path, index_path + '.lock'):  # deleted: no one builds it any more
            try:
                os.remove(path)
            except OSError:
                pass
        self._loaded.pop((self.config['index_dir'], collection.id), None)

    @property
    def approx_min(self):
        return self.config.get('approx_min') or APPROX_MIN

    def _paths(self, collection):
        base = os.path.join(self.config['index_dir'], 'collection_%d' % collection.id)
        return base + '.usearch', base + '.json'

    def search(self, collection, vector, k):
        entry = self._current(collection)
        version, kind, ids, data = entry
        if kind == 'exact':
            return exact_top(data, ids, vector, k)
        k = min(k, len(data))
        if not k:
            return []
        with self._search_lock:  # usearch reads the expansion from the index's settings, not per call
            expansion = expansion_for(k)
            if data.expansion_search != expansion:
                data.expansion_search = expansion
            matches = data.search(numpy.asarray(vector, dtype=numpy.float32), k, exact=False)
        return [(int(key), 1.0 - float(distance)) for key, distance in zip(matches.keys, matches.distances)]

    def _current(self, collection):
        key = (self.config['index_dir'], collection.id)
        with self._lock:
            entry = self._loaded.get(key)
            if entry and entry[0] == collection.version:
                return entry
            entry = self._build(collection)
            self._loaded[key] = entry
            return entry

    def _build(self, collection):
        index_path, meta_path = self._paths(collection)
        meta = _read_json(meta_path)
        if meta.get('version') == collection.version and os.path.isfile(index_path):
            return (collection.version, 'approx', None, _load_index(index_path, collection.dimensions))
        ids, matrix = collection.load()
        if len(ids) < self.approx_min:
            return (collection.version, 'exact', ids, matrix)
        os.makedirs(self.config['index_dir'], exist_ok=True)
        with held(index_path + '.lock', 600, StoreError):
            meta = _read_json(meta_path)  # another process may have built it while we waited
            if meta.get('version') == collection.version and os.path.isfile(index_path):
                return (collection.version, 'approx', None, _load_index(index_path, collection.dimensions))
            index = new_index(collection.dimensions)
            index.add(numpy.asarray(ids, dtype=numpy.uint64), matrix)
            tmp = '%s.tmp.%d' % (index_path, os.getpid())
            index.save(tmp)
            os.replace(tmp, index_path)
            _write_json(meta_path, {'version': collection.version, 'count': int(len(ids))})
        return (collection.version, 'approx', None, index)


# The HNSW index's settings (usearch), chosen with bench/bench_knowledge.py (recall@10 against exact
# search and lookup time at 10,000 and 100,000 chunks, README "Benchmarks"):
CONNECTIVITY = 16  # links per vector (HNSW's M)
EXPANSION_ADD = 128  # candidates kept while linking a new vector (efConstruction)
EXPANSION_SEARCH = 256  # candidates a search keeps at least (ef)...
EXPANSION_PER_RESULT = 4  # ...and this many per result asked for
EXPANSION_MAX = 4096


def expansion_for(count):
    """The candidates (usearch's expansion_search, HNSW's ef) a search asking `count` results
    keeps: the retrieval asks 4 times top-k and more rounds after the rights filter, and the
    results deep in a list are found as well as the first ones only when ef grows with it (usearch
    keeps max(ef, count), which leaves the last of `count` results as poor as a search with ef = count)."""
    return int(min(max(EXPANSION_SEARCH, EXPANSION_PER_RESULT * count), max(EXPANSION_MAX, count)))


def new_index(dimensions):
    from usearch.index import Index
    # cosine on normalised vectors
    return Index(ndim=dimensions, metric='cos', dtype='f32', connectivity=CONNECTIVITY, expansion_add=EXPANSION_ADD,
                 expansion_search=EXPANSION_SEARCH)


def _load_index(path, dimensions):
    index = new_index(dimensions)
    index.load(path)
    return index


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_json(path, data):
    tmp = '%s.tmp.%d' % (path, os.getpid())
    with open(tmp, 'w') as f:
        json.dump(data, f)
    os.replace(tmp, path)


def pgvector_available(cursor):
    """Whether this PostgreSQL server can run the `vector` extension (installed or installable)."""
    cursor.execute("SELECT name, installed_version FROM pg_available_extensions WHERE name = 'vector'")
    return bool(cursor.fetchall())


@register
class PgVectorStore(VectorStore):
    """The `vector` extension: one table of (chunk id, collection id, embedding vector(N)), an HNSW
    index by cosine. Needs the extension on the server: StoreError saying so when it is missing."""
    service = 'pgvector'

    def _check(self, cursor):
        if not pgvector_available(cursor):
            raise StoreError('this PostgreSQL server has no "vector" extension (pgvector); install it on the '
                             'server or use the embedded store')
        cursor.execute('CREATE EXTENSION IF NOT EXISTS vector')
        cursor.execute('CREATE TABLE IF NOT EXISTS llm_knowledge_pgvector '
                       '(chunk_id integer PRIMARY KEY, collection_id integer NOT NULL, embedding vector NOT NULL)')

    def add(self, collection, ids, vectors):
        cursor = collection.cursor
        self._check(cursor)
        for chunk_id, vector in zip(ids, vectors):
            cursor.execute('INSERT INTO llm_knowledge_pgvector (chunk_id, collection_id, embedding) '
                           'VALUES (%s, %s, %s::vector) ON CONFLICT (chunk_id) DO UPDATE SET embedding = EXCLUDED.embedding',
                           (int(chunk_id), collection.id, '[%s]' % ','.join('%.7g' % x for x in vector)))

    def delete(self, collection, ids):
        self._check(collection.cursor)
        collection.cursor.execute('DELETE FROM llm_knowledge_pgvector WHERE chunk_id = ANY(%s)', (list(ids),))

    def drop(self, collection):
        self._check(collection.cursor)
        collection.cursor.execute('DELETE FROM llm_knowledge_pgvector WHERE collection_id = %s', (collection.id,))

    def search(self, collection, vector, k):
        cursor = collection.cursor
        self._check(cursor)
        cursor.execute('SELECT chunk_id, 1 - (embedding <=> %s::vector) FROM llm_knowledge_pgvector '
                       'WHERE collection_id = %s ORDER BY embedding <=> %s::vector LIMIT %s',
                       ('[%s]' % ','.join('%.7g' % x for x in vector), collection.id,
                        '[%s]' % ','.join('%.7g' % x for x in vector), k))
        return [(int(i), float(s)) for i, s in cursor.fetchall()]


MILVUS_TIMEOUT = 30  # seconds for each call to the Milvus server


@register
class MilvusStore(VectorStore):
    """config: {'milvus_uri': 'http://host:19530', 'milvus_token': optional, 'db': Odoo's database
    name}. One Milvus collection per knowledge collection, named after the database and its id,
    holding (chunk id, vector) with an HNSW index by cosine, strongly consistent (a search sees
    the writes before it: every worker sees an update)."""
    service = 'milvus'
    _loaded = set()  # (uri, name) of collections this process has loaded into the server's memory
    _lock = threading.Lock()

    def _alias(self):
        uri = self.config.get('milvus_uri')
        if not uri:
            raise StoreError('the Milvus store needs the server\'s address: set llm_training_milvus_uri '
                             '(e.g. http://127.0.0.1:19530) in odoo.conf')
        try:
            from pymilvus import connections
        except ImportError:
            raise StoreError('the Milvus store needs the pymilvus package in Odoo\'s Python')
        alias = 'llmt-%s' % uri
        with self._lock:
            if not connections.has_connection(alias):
                try:
                    connections.connect(alias, uri=uri, token=self.config.get('milvus_token') or '',
                                        timeout=MILVUS_TIMEOUT)
                except Exception as e:
                    raise StoreError('cannot reach the Milvus server at %s: %s' % (uri, e))
        return alias

    def name(self, collection):
        db = ''.join(ch if ch.isalnum() else '_' for ch in self.config.get('db') or 'odoo')
        return 'llmt_%s_%d' % (db, collection.id)

    def _collection(self, collection, create=False):
        """The Milvus collection (loaded), created when `create` and missing; None when missing."""
        from pymilvus import Collection, CollectionSchema, DataType, FieldSchema, utility
        alias, name = self._alias(), self.name(collection)
        key = (self.config['milvus_uri'], name)
        if key in self._loaded:
            try:
                return Collection(name, using=alias, timeout=MILVUS_TIMEOUT)
            except Exception:  # dropped by another worker since (a re-index): look again
                self._loaded.discard(key)
        try:
            if not utility.has_collection(name, using=alias, timeout=MILVUS_TIMEOUT):
                if not create:
                    return None
                schema = CollectionSchema([FieldSchema('chunk_id', DataType.INT64, is_primary=True),
                                           FieldSchema('vector', DataType.FLOAT_VECTOR, dim=collection.dimensions)],
                                          description='llm_training knowledge collection %d' % collection.id)
                found = Collection(name, schema, using=alias, consistency_level='Strong', timeout=MILVUS_TIMEOUT)
                found.create_index('vector', {'index_type': 'HNSW', 'metric_type': 'COSINE',
                                              'params': {'M': 16, 'efConstruction': 128}}, timeout=MILVUS_TIMEOUT)
            else:
                found = Collection(name, using=alias, timeout=MILVUS_TIMEOUT)
            found.load(timeout=MILVUS_TIMEOUT)
        except StoreError:
            raise
        except Exception as e:
            raise StoreError('Milvus collection %s: %s' % (name, e))
        self._loaded.add(key)
        return found

    def _call(self, what, function, *args, **kwargs):
        try:
            return function(*args, timeout=MILVUS_TIMEOUT, **kwargs)
        except Exception as e:
            raise StoreError('Milvus %s failed: %s' % (what, e))

    def add(self, collection, ids, vectors):
        if not len(ids):
            return
        found = self._collection(collection, create=True)
        rows = [[int(i) for i in ids], [[float(x) for x in vector] for vector in vectors]]
        self._call('upsert', found.upsert, rows)  # an id written again (a retried batch) replaces

    def delete(self, collection, ids):
        found = self._collection(collection)
        if found is not None and len(ids):
            self._call('delete', found.delete, 'chunk_id in %s' % [int(i) for i in ids])

    def search(self, collection, vector, k):
        found = self._collection(collection)
        if found is None or k <= 0:
            return []
        k = min(int(k), 16384)  # Milvus' largest top-k
        answer = self._call('search', found.search, [[float(x) for x in vector]], 'vector',
                            {'metric_type': 'COSINE', 'params': {'ef': max(64, k)}}, limit=k)
        return [(int(hit.id), float(hit.distance)) for hit in answer[0]]

    def drop(self, collection):
        from pymilvus import utility
        alias, name = self._alias(), self.name(collection)
        if self._call('lookup', utility.has_collection, name, using=alias):
            self._call('drop', utility.drop_collection, name, using=alias)
        self._loaded.discard((self.config['milvus_uri'], name))
