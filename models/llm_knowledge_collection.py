# -*- coding: utf-8 -*-
import logging
import os
import threading
import time

import numpy
from psycopg2.extras import execute_values

from odoo import _, api, fields, models, tools
from odoo.exceptions import UserError, ValidationError

from ..lib.knowledge import chunking, documents, retrieval, stores
from ..lib.knowledge.vectors import to_bytes
from ..lib.providers.local import trainer_env

_logger = logging.getLogger(__name__)

DEFAULT_EMBEDDING_MODEL = 'all-MiniLM-L6-v2'
EMBED_BATCH = 64  # texts per embedding request
SYNC_BATCH = 50  # source records per sync batch (one commit each in the cron)
CRON_SECONDS = 50  # a cron run stops starting batches after this: under Odoo's limit_time_real
REINDEX_FIELDS = ('provider_id', 'embedding_model', 'chunk_size', 'chunk_overlap', 'store')
_CHUNKERS = {}  # tokenizer.json path -> TokenizerChunker, per process


class LlmKnowledgeCollection(models.Model):
    """A knowledge collection: documents and records cut into chunks, embedded and searched by
    meaning, within the rights of whoever asks (lib/knowledge/retrieval.py). PostgreSQL keeps
    the chunks and their vectors; the vector store (lib/knowledge/stores.py) answers the
    nearest ones."""
    _name = 'llm.knowledge.collection'
    _description = 'Knowledge Collection'
    _order = 'name'

    def _default_provider(self):
        return self.env['llm.provider'].search([('service', '=', 'local')], limit=1)

    name = fields.Char(required=True)
    active = fields.Boolean(default=True)
    description = fields.Text()
    company_id = fields.Many2one('res.company', default=lambda self: self.env.user.company_id, index=True)
    provider_id = fields.Many2one('llm.provider', string='Embedding Provider', required=True, ondelete='restrict',
                                  default=_default_provider,
                                  help='Who embeds the chunks: the local model server, or OpenAI.')
    embedding_model = fields.Char(required=True, default=DEFAULT_EMBEDDING_MODEL,
                                  help='all-MiniLM-L6-v2 (local, the default, English), multilingual-e5-small '
                                       '(local: Arabic and about 100 other languages), or an OpenAI embedding model '
                                       '(text-embedding-3-small) with an OpenAI provider. Changing it re-indexes '
                                       'the collection.')
    # 128: all-MiniLM-L6-v2 was trained on texts of at most 128 tokens (its model card); longer
    # chunks blur several topics into one vector. A quarter overlaps the chunk before.
    chunk_size = fields.Integer(default=128, required=True, help='Tokens per chunk (the embedding model\'s).')
    chunk_overlap = fields.Integer(default=32, required=True, help='Tokens each chunk repeats of the one before.')
    max_file_mb = fields.Float(string='Max File Size (MB)', default=50.0, required=True)
    store = fields.Selection([('embedded', 'Embedded (PostgreSQL + index file)'), ('pgvector', 'pgvector'),
                              ('milvus', 'Milvus')],
                             default='embedded', required=True,
                             help='Embedded: nothing to install, exact search for small collections and an index '
                                  'file per collection in Odoo\'s data folder for large ones. pgvector: needs the '
                                  'extension on the PostgreSQL server. Milvus: a Milvus server or cluster at '
                                  'odoo.conf\'s llm_training_milvus_uri.')
    reader_group_ids = fields.Many2many('res.groups', string='Readers',
                                        help='Users of these groups may ask this collection (none: every internal '
                                             'user). Fields restricted to groups are indexed only when every reader '
                                             'group is within them.')
    source_ids = fields.One2many('llm.knowledge.source', 'collection_id', string='Sources')
    dimensions = fields.Integer(readonly=True, copy=False)
    index_version = fields.Integer(readonly=True, copy=False, default=0,
                                   help='Raised whenever chunks change; every worker reloads its index then.')
    chunk_count = fields.Integer(compute='_compute_counts')
    source_error_count = fields.Integer(compute='_compute_counts')
    progress = fields.Char(compute='_compute_counts')

    @api.multi
    def _compute_counts(self):
        for collection in self:
            if not collection.id:
                continue
            self.env.cr.execute('SELECT count(*) FROM llm_knowledge_chunk WHERE collection_id = %s', (collection.id,))
            collection.chunk_count = self.env.cr.fetchone()[0]
            sources = collection.sudo().source_ids
            collection.source_error_count = len(sources.filtered(lambda s: s.state == 'error'))
            done = len(sources.filtered(lambda s: s.state in ('done', 'error')))
            collection.progress = _('%d of %d sources indexed, %d chunks') % (done, len(sources),
                                                                             collection.chunk_count)

    @api.constrains('chunk_size', 'chunk_overlap', 'max_file_mb')
    def _check_sizes(self):
        for collection in self:
            error = chunking.check_sizes(collection.chunk_size, collection.chunk_overlap)
            if error:
                raise ValidationError(error)
            if collection.max_file_mb <= 0:
                raise ValidationError(_('The maximum file size must be positive.'))

    @api.constrains('store')
    def _check_store(self):
        """pgvector only where the server has the extension: detected, never assumed."""
        if any(c.store == 'pgvector' for c in self) and not stores.pgvector_available(self.env.cr):
            raise ValidationError(_('This PostgreSQL server has no "vector" extension (pgvector): install it on the '
                                    'database server, or keep the embedded store.'))
        if any(c.store == 'milvus' for c in self) and not tools.config.get('llm_training_milvus_uri'):
            raise ValidationError(_('The Milvus store needs the address of a Milvus server: set '
                                    'llm_training_milvus_uri (e.g. http://127.0.0.1:19530) in odoo.conf.'))

    @api.multi
    def write(self, values):
        reindex = [c for c in self if any(f in values and values[f] != (c[f].id if isinstance(c[f], models.BaseModel)
                                                                        else c[f]) for f in REINDEX_FIELDS)]
        for collection in reindex:
            collection._store_drop()  # the store it had: a new model may not even have the same dimensions
        result = super(LlmKnowledgeCollection, self).write(values)
        for collection in reindex:
            collection._reset_index(dropped=True)
        return result

    @api.multi
    def unlink(self):
        for collection in self:
            collection.sudo()._store().drop(collection.sudo()._ref())
        return super(LlmKnowledgeCollection, self).unlink()

    # -- actions ----------------------------------------------------------------------------------
    @api.multi
    def action_sync_now(self):
        """Index what is pending now (the cron does the same every few minutes)."""
        self.ensure_one()
        self.check_access_rights('write')
        self.check_access_rule('write')
        self.sudo()._sync(deadline=time.time() + CRON_SECONDS)
        return True

    @api.multi
    def action_reindex(self):
        self.ensure_one()
        self.check_access_rights('write')
        self.check_access_rule('write')
        self._reset_index()
        return True

    # -- indexing ---------------------------------------------------------------------------------
    def _reset_index(self, dropped=False):
        """Forget every chunk: the sources are indexed again (a new embedding model, new sizes)."""
        self.ensure_one()
        if not dropped:
            self._store_drop()
        self.env.cr.execute('DELETE FROM llm_knowledge_chunk WHERE collection_id = %s', (self.id,))
        self.sudo().source_ids.write({'state': 'pending', 'sync_cursor': 0, 'error': False})
        self.sudo().write({'dimensions': 0})
        self._bump_version()

    def _store_drop(self):
        """Empty the collection's store (its Milvus collection, its pgvector rows, its index file).
        A store that cannot be reached does not block moving away from it: logged, left behind."""
        try:
            self.sudo()._store().drop(self.sudo()._ref())
        except stores.StoreError as e:
            _logger.warning('Knowledge collection %s: its %s store was not emptied: %s', self.id, self.store, e)

    def _bump_version(self):
        self.env.cr.execute('UPDATE llm_knowledge_collection SET index_version = index_version + 1 WHERE id = %s',
                            (self.id,))
        self.invalidate_cache(['index_version'], self.ids)

    @api.model
    def _cron_sync_knowledge(self, seconds=CRON_SECONDS, batch_size=SYNC_BATCH):
        """Index pending files and keep record sources in sync, in batches that each commit, so a
        run cut off by Odoo's time limit loses nothing: the next one resumes where it stopped."""
        deadline = time.time() + seconds
        for collection in self.sudo().search([]):
            if time.time() >= deadline:
                break
            collection._sync(deadline, batch_size)
        return True

    def _sync(self, deadline, batch_size=SYNC_BATCH, max_batches=None):
        """Work on this collection's sources until `deadline` (or `max_batches` batches)."""
        self.ensure_one()
        batches = 0
        for source in self.source_ids.sorted('id').filtered(lambda s: s.kind == 'records' or s.state == 'pending'):
            while time.time() < deadline and (max_batches is None or batches < max_batches):
                more = source._sync_batch(batch_size)
                batches += 1
                self._commit()
                if not more:
                    break
        return batches

    def _commit(self):
        if not getattr(threading.currentThread(), 'testing', False):
            self.env.cr.commit()  # each batch is whole: its chunks, vectors, cursor and version together

    def _chunker(self):
        """Token chunking with the embedding model's tokenizer (the local default model's for an
        OpenAI model: its tokenizer does not run on Odoo's Python; sizes are then close, not exact)."""
        model = self.embedding_model if self.provider_id.local_embeddings else DEFAULT_EMBEDDING_MODEL
        return self._chunker_of(model)

    @api.model
    def count_tokens(self, texts):
        """The token count of each text as the default embedding model counts (the usage of
        /v1/embeddings)."""
        count = self._chunker_of(DEFAULT_EMBEDDING_MODEL).count
        return [count(text) for text in texts]

    @api.model
    def _chunker_of(self, model):
        try:
            info = documents.tokenizer_info(self._trainer_python(), trainer_env(), model)
        except documents.DocumentError as e:
            raise UserError(_('Embedding model %s: %s') % (model, e))
        path = info['tokenizer']
        if path not in _CHUNKERS:
            _CHUNKERS[path] = chunking.TokenizerChunker(path)
        return _CHUNKERS[path]

    @api.model
    def _trainer_python(self):
        return tools.config.get('llm_training_trainer_python') or 'python3'

    def _embed(self, texts, input_type='passage'):
        """Vectors of chunks ('passage') or of a question ('query': asymmetric models such as E5
        embed it with another prefix)."""
        vectors = []
        for start in range(0, len(texts), EMBED_BATCH):
            vectors.extend(self.provider_id._call_adapter('embed', self.embedding_model, texts[start:start + EMBED_BATCH],
                                                          input_type))
        return vectors

    def _add_chunks(self, source, items):
        """Embed and store chunks: items are (res_model, res_id, title, content_hash, chunk dict)."""
        if not items:
            return []
        vectors = self._embed([item[4]['text'] for item in items])
        dimensions = len(vectors[0])
        if self.dimensions and self.dimensions != dimensions:
            raise UserError(_('Embedding model %s gives %d dimensions; this collection has %d. Re-index it.')
                            % (self.embedding_model, dimensions, self.dimensions))
        if not self.dimensions:
            self.sudo().write({'dimensions': dimensions})
        uid = self.env.uid
        rows = [(self.id, source.id, res_model, res_id, title, chunk['position'], chunk['text'], chunk['tokens'],
                 content_hash, to_bytes(vector), uid, uid)
                for (res_model, res_id, title, content_hash, chunk), vector in zip(items, vectors)]
        ids = [row[0] for row in execute_values(
            self.env.cr, 'INSERT INTO llm_knowledge_chunk (collection_id, source_id, res_model, res_id, name, position, '
                         'text, token_count, content_hash, vector, create_uid, write_uid, create_date, write_date) '
                         'VALUES %s RETURNING id', rows,
            template='(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now() at time zone \'UTC\', '
                     'now() at time zone \'UTC\')', page_size=len(rows), fetch=True)]
        if self.store != 'embedded':
            self._store().add(self._ref(), ids, vectors)
        return ids

    def _delete_chunks(self, ids):
        if not ids:
            return
        if self.store != 'embedded':
            self._store().delete(self._ref(), ids)
        self.env.cr.execute('DELETE FROM llm_knowledge_chunk WHERE id = ANY(%s)', (list(ids),))

    # -- the vector store -----------------------------------------------------------------------------
    def _store(self):
        index_dir = os.path.join(tools.config['data_dir'], 'llm_training', 'knowledge', self.env.cr.dbname)
        return stores.store_class(self.store)({'index_dir': index_dir, 'db': self.env.cr.dbname,
                                               'milvus_uri': tools.config.get('llm_training_milvus_uri'),
                                               'milvus_token': tools.config.get('llm_training_milvus_token')})

    def _ref(self):
        self.ensure_one()
        self.env.cr.execute('SELECT index_version, dimensions FROM llm_knowledge_collection WHERE id = %s', (self.id,))
        version, dimensions = self.env.cr.fetchone()  # read now, not from the cache: other workers write it
        return stores.CollectionRef(self.id, dimensions, version, self._load_vectors, cursor=self.env.cr)

    def _load_vectors(self):
        self.env.cr.execute('SELECT id, vector FROM llm_knowledge_chunk WHERE collection_id = %s '
                            'AND vector IS NOT NULL ORDER BY id', (self.id,))
        rows = self.env.cr.fetchall()
        ids = numpy.array([row[0] for row in rows], dtype=numpy.int64)
        dimensions = self.dimensions or (len(rows[0][1]) // 4 if rows else 0)
        matrix = numpy.frombuffer(b''.join(bytes(row[1]) for row in rows), dtype=numpy.float32) \
            .reshape(len(rows), dimensions) if rows else numpy.zeros((0, dimensions), dtype=numpy.float32)
        return ids, matrix

    # -- retrieval --------------------------------------------------------------------------------
    @api.multi
    def search_chunks(self, query, top_k=4, threshold=None):
        """The chunks most similar to `query` that the current user may read, best first:
        [{'chunk_id', 'score', 'text', 'title', 'res_model', 'res_id', 'url', 'collection_id',
        'token_count'}]. Rights are checked now, on each chunk's source record (access rights,
        record rules, companies); top_k counts only readable chunks.

        XML-RPC: ``execute_kw(db, uid, pw, 'llm.knowledge.collection', 'search_chunks', [[id], 'question'],
        {'top_k': 4})``."""
        collections = self.filtered(lambda c: c.dimensions)  # the ORM's rules chose `self`: only readable ones
        if not query or not collections:
            return []
        by_provider = {}
        for collection in collections:
            by_provider.setdefault((collection.provider_id, collection.embedding_model), []).append(collection)
        searches = []
        for (provider, model), group in by_provider.items():
            vector = numpy.asarray(group[0].sudo()._embed([query], 'query')[0], dtype=numpy.float32)
            for collection in group:
                store, ref = collection.sudo()._store(), collection.sudo()._ref()
                searches.append(lambda n, store=store, ref=ref, vector=vector: store.search(ref, vector, n))
        hits = retrieval.readable_top_k(lambda n: retrieval.merge([search(n) for search in searches], n),
                                        self._readable_chunks, top_k, threshold)
        return self._chunk_hits(hits)

    @api.model
    def _readable_chunks(self, chunk_ids):
        """The chunks whose source record the current user can read now."""
        self.env.cr.execute('SELECT id, res_model, res_id FROM llm_knowledge_chunk WHERE id = ANY(%s)', (list(chunk_ids),))
        by_model = {}
        for chunk_id, res_model, res_id in self.env.cr.fetchall():
            by_model.setdefault(res_model, []).append((chunk_id, res_id))
        readable = set()
        for res_model, pairs in by_model.items():
            if res_model not in self.env:
                continue
            Model = self.env[res_model]
            if not Model.check_access_rights('read', raise_exception=False):
                continue
            visible = set(Model.search([('id', 'in', [res_id for _c, res_id in pairs])]).ids)
            readable.update(chunk_id for chunk_id, res_id in pairs if res_id in visible)
        return readable

    @api.model
    def _chunk_hits(self, hits):
        if not hits:
            return []
        self.env.cr.execute('SELECT id, collection_id, res_model, res_id, name, text, token_count '
                            'FROM llm_knowledge_chunk WHERE id = ANY(%s)', ([h[0] for h in hits],))
        rows = {row[0]: row for row in self.env.cr.fetchall()}
        result = []
        for chunk_id, score in hits:
            row = rows.get(chunk_id)
            if row is None:
                continue  # deleted since the search
            result.append({'chunk_id': chunk_id, 'score': round(score, 4), 'collection_id': row[1], 'res_model': row[2],
                           'res_id': row[3], 'title': row[4] or '', 'text': row[5], 'token_count': row[6] or 0,
                           'url': '/web#model=%s&id=%d' % (row[2], row[3])})
        return result
