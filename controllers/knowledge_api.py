# -*- coding: utf-8 -*-
"""The OpenAI-compatible API for knowledge: POST /v1/embeddings, /v1/vector_stores (create,
list, get, delete), their files and file batches, search; and a chat completion whose model is an
assistant (called from controllers/openai_api.py).

Thin handlers with the same authentication, rate limit and error mapping as the rest of /v1
(`endpoint` of openai_api.py): each request runs as its key's user, so the ORM's rights decide;
searches return only chunks that user may read. Shapes and checks: lib/knowledge/openai_shapes.py.
Vector stores are knowledge collections; writing them needs the LLM manager group (their ACL)."""
import base64
import os
import time
import uuid

from odoo import http
from odoo.http import request

from ..lib.api_v1 import protocol as oa
from ..lib.knowledge import openai_shapes as shapes
from .openai_api import _json, _route, endpoint
from . import v1_hooks
from ..user_errors import UnknownModel

PURPOSES = ('assistants', 'user_data')  # uploads that become knowledge files, not fine-tuning datasets


def create_file(env, upload, max_file):
    """POST /v1/files with purpose "assistants": an attachment a vector store can take."""
    content = upload.read(max_file + 1)
    if len(content) > max_file:
        raise oa.ApiError(413, 'The file is larger than this server accepts (%d bytes).' % max_file, param='file',
                          code='file_too_large')
    filename = os.path.basename(upload.filename or 'upload.txt')
    attachment = env['ir.attachment'].create({'name': filename, 'datas_fname': filename,
                                              'datas': base64.b64encode(content),
                                              'description': 'Uploaded through the API for knowledge'})
    return _json(_file_object(attachment))


def _file_object(attachment):
    return {'object': 'file', 'id': shapes.file_id(attachment.id), 'bytes': attachment.file_size or 0,
            'created_at': oa.unix(attachment.create_date), 'filename': attachment.datas_fname or attachment.name,
            'purpose': 'assistants', 'status': 'processed'}


def assistant_completion(env, assistant, model_name, messages, stream, include_usage):
    """A chat completion answered by an assistant: the last user message is the question, the
    answer ends with its numbered sources (those the key's user may read)."""
    question = next((m['content'] for m in reversed(messages) if m.get('role') == 'user'), '')
    if not isinstance(question, str) or not question.strip():
        raise oa.ApiError(400, 'An assistant answers the last user message: send one with text.', param='messages',
                          code='invalid_value')
    result = assistant.answer(question)
    text = result['text']
    if result['sources']:
        text += '\n\nSources:\n' + '\n'.join('[%d] %s (%s)' % (s['number'], s['title'], s['url'])
                                             for s in result['sources'])
    answer = {'text': text, 'finish_reason': 'stop', 'prompt_tokens': result['prompt_tokens'],
              'completion_tokens': result['completion_tokens']}
    completion_id, created = 'chatcmpl-%s' % uuid.uuid4().hex, int(time.time())
    if not stream:
        return _json(oa.completion_object(completion_id, created, model_name, answer))
    from .openai_api import _stream
    items = iter([{'delta': text}, {'finish_reason': 'stop', 'prompt_tokens': answer['prompt_tokens'],
                                    'completion_tokens': answer['completion_tokens']}])
    rid = v1_hooks.request_id()
    return http.Response(_stream(items, model_name, include_usage, completion_id, created, rid), status=200,
                         headers=[('Content-Type', 'text/event-stream'), ('Cache-Control', 'no-cache'),
                                  ('x-request-id', rid)], direct_passthrough=True)


class KnowledgeApi(http.Controller):

    # -- embeddings ------------------------------------------------------------------------------
    @_route('/v1/embeddings', ['POST'])
    @endpoint
    def create_embeddings(self, env, **kw):
        model, texts, encoding, dimensions = shapes.embedding_request(oa.json_body(request.httprequest.get_data()))
        Provider = env['llm.provider']
        try:
            vectors = Provider.embedding_provider(model).embed(model, texts)
        except UnknownModel:
            raise oa.ApiError(404, 'The model %r does not exist or you do not have access to it.' % model,
                              param='model', code='model_not_found')
        if dimensions is not None and dimensions != len(vectors[0]):
            raise oa.ApiError(400, 'Model %s gives %d dimensions; it cannot shorten them to %d.'
                              % (model, len(vectors[0]), dimensions), param='dimensions', code='invalid_value')
        token_counts = env['llm.knowledge.collection'].count_tokens(texts)
        return _json(shapes.embedding_response(model, vectors, encoding, token_counts))

    # -- vector stores ---------------------------------------------------------------------------
    @_route('/v1/vector_stores', ['POST'])
    @endpoint
    def create_store(self, env, **kw):
        body = oa.json_body(request.httprequest.get_data() or b'{}')
        Collection = env['llm.knowledge.collection']
        Collection.check_access_rights('create')
        name = body.get('name') or 'Vector store'
        if not isinstance(name, str):
            raise oa.ApiError(400, "'name' must be a string.", param='name', code='invalid_value')
        collection = Collection.create({'name': name, 'description': body.get('description') or False})
        file_ids = body.get('file_ids') or []
        if file_ids:
            self._attach(env, collection, file_ids)
        return _json(self._store(collection))

    @_route('/v1/vector_stores', ['GET'])
    @endpoint
    def list_stores(self, env, after=None, limit=None, order='desc', **kw):
        limit = oa.limit_param(limit, default=20)
        domain = []
        if after:
            after_id = shapes.parse_store_id(after)
            if after_id is None:
                raise oa.ApiError(400, 'after must be a vector store id.', param='after', code='invalid_value')
            domain.append(('id', '<' if order != 'asc' else '>', after_id))
        found = env['llm.knowledge.collection'].search(domain, limit=limit + 1,
                                                       order='id asc' if order == 'asc' else 'id desc')
        items = [self._store(c) for c in found[:limit]]
        return _json({'object': 'list', 'data': items, 'first_id': items[0]['id'] if items else None,
                      'last_id': items[-1]['id'] if items else None, 'has_more': len(found) > limit})

    @_route('/v1/vector_stores/<string:store_ident>', ['GET'])
    @endpoint
    def get_store(self, env, store_ident, **kw):
        return _json(self._store(self._find_store(env, store_ident)))

    @_route('/v1/vector_stores/<string:store_ident>', ['DELETE'])
    @endpoint
    def delete_store(self, env, store_ident, **kw):
        collection = self._find_store(env, store_ident)
        collection.check_access_rights('unlink')
        collection.check_access_rule('unlink')
        collection.unlink()
        return _json({'id': store_ident, 'object': 'vector_store.deleted', 'deleted': True})

    # -- files of a vector store -------------------------------------------------------------------
    @_route('/v1/vector_stores/<string:store_ident>/files', ['POST'])
    @endpoint
    def add_file(self, env, store_ident, **kw):
        body = oa.json_body(request.httprequest.get_data())
        collection = self._find_store(env, store_ident)
        if not isinstance(body.get('file_id'), str):
            raise oa.ApiError(400, "Missing required parameter: 'file_id'.", param='file_id',
                              code='missing_required_parameter')
        source = self._attach(env, collection, [body['file_id']])
        return _json(self._file(source))

    @_route('/v1/vector_stores/<string:store_ident>/files', ['GET'])
    @endpoint
    def list_files(self, env, store_ident, limit=None, **kw):
        collection = self._find_store(env, store_ident)
        limit = oa.limit_param(limit, default=20)
        sources = env['llm.knowledge.source'].search([('collection_id', '=', collection.id),
                                                      ('api_file_id', '!=', False)], order='id desc')
        items = [self._file(s) for s in sources[:limit]]
        return _json({'object': 'list', 'data': items, 'first_id': items[0]['id'] if items else None,
                      'last_id': items[-1]['id'] if items else None, 'has_more': len(sources) > limit})

    @_route('/v1/vector_stores/<string:store_ident>/files/<string:file_ident>', ['GET'])
    @endpoint
    def get_file(self, env, store_ident, file_ident, **kw):
        return _json(self._file(self._find_source(env, store_ident, file_ident)))

    @_route('/v1/vector_stores/<string:store_ident>/files/<string:file_ident>', ['DELETE'])
    @endpoint
    def delete_file(self, env, store_ident, file_ident, **kw):
        source = self._find_source(env, store_ident, file_ident)
        source.check_access_rights('unlink')
        source.check_access_rule('unlink')
        source.unlink()
        return _json({'id': file_ident, 'object': 'vector_store.file.deleted', 'deleted': True})

    # -- file batches ------------------------------------------------------------------------------
    @_route('/v1/vector_stores/<string:store_ident>/file_batches', ['POST'])
    @endpoint
    def create_batch(self, env, store_ident, **kw):
        body = oa.json_body(request.httprequest.get_data())
        collection = self._find_store(env, store_ident)
        file_ids = body.get('file_ids') or [f.get('file_id') for f in body.get('files') or [] if isinstance(f, dict)]
        if not file_ids:
            raise oa.ApiError(400, "Missing required parameter: 'file_ids'.", param='file_ids',
                              code='missing_required_parameter')
        sources = self._attach(env, collection, file_ids)
        batch = shapes.batch_id(collection.id, sources[0].id)
        sources.sudo().write({'api_batch_id': batch})
        return _json(self._batch(collection, batch))

    @_route('/v1/vector_stores/<string:store_ident>/file_batches/<string:batch_ident>', ['GET'])
    @endpoint
    def get_batch(self, env, store_ident, batch_ident, **kw):
        return _json(self._batch(self._find_store(env, store_ident), batch_ident))

    @_route('/v1/vector_stores/<string:store_ident>/file_batches/<string:batch_ident>/files', ['GET'])
    @endpoint
    def batch_files(self, env, store_ident, batch_ident, **kw):
        collection = self._find_store(env, store_ident)
        self._batch(collection, batch_ident)  # 404 when unknown
        sources = env['llm.knowledge.source'].search([('collection_id', '=', collection.id),
                                                      ('api_batch_id', '=', batch_ident)], order='id')
        items = [self._file(s) for s in sources]
        return _json({'object': 'list', 'data': items, 'first_id': items[0]['id'] if items else None,
                      'last_id': items[-1]['id'] if items else None, 'has_more': False})

    # -- search ------------------------------------------------------------------------------------
    @_route('/v1/vector_stores/<string:store_ident>/search', ['POST'])
    @endpoint
    def search(self, env, store_ident, **kw):
        query, limit, threshold = shapes.search_request(oa.json_body(request.httprequest.get_data()))
        collection = self._find_store(env, store_ident)
        hits = collection.search_chunks(query, top_k=limit, threshold=threshold)
        sources = env['llm.knowledge.source'].sudo().browse(
            [h['res_id'] for h in hits if h['res_model'] == 'llm.knowledge.source'])
        file_ids = {s.id: s.api_file_id or 'source-%d' % s.id for s in sources}
        results = [{'file_id': file_ids.get(h['res_id']) if h['res_model'] == 'llm.knowledge.source'
                    else '%s-%d' % (h['res_model'], h['res_id']), 'filename': h['title'], 'score': h['score'],
                    'text': h['text']} for h in hits]
        return _json(shapes.search_page(query, results))

    # -- helpers -----------------------------------------------------------------------------------
    def _find_store(self, env, ident):
        record_id = shapes.parse_store_id(ident)
        collection = env['llm.knowledge.collection'].search([('id', '=', record_id)]) if record_id else None
        if not collection:
            raise oa.not_found('vector store', ident, param='vector_store_id')
        return collection

    def _find_source(self, env, store_ident, file_ident):
        collection = self._find_store(env, store_ident)
        source = env['llm.knowledge.source'].search([('collection_id', '=', collection.id),
                                                     ('api_file_id', '=', file_ident)], limit=1)
        if not source:
            raise oa.not_found('file', file_ident, param='file_id')
        return source

    def _attach(self, env, collection, file_idents):
        """A pending source per uploaded file (indexed by the cron: status in_progress, then completed)."""
        collection.check_access_rights('write')
        collection.check_access_rule('write')
        sources = env['llm.knowledge.source']
        for ident in file_idents:
            attachment_id = shapes.parse_file_id(ident) if isinstance(ident, str) else None
            attachment = env['ir.attachment'].search([('id', '=', attachment_id)]) if attachment_id else None
            if not attachment:
                raise oa.ApiError(404, 'No file found with id %r (upload it with purpose "assistants").' % ident,
                                  param='file_id', code='file_not_found')
            sources |= sources.create_from_file(collection, attachment, api_file_id=ident)
        return sources

    def _store(self, collection):
        sources = collection.sudo().source_ids
        return shapes.store_object(collection.id, collection.name, oa.unix(collection.create_date),
                                   oa.unix(collection.write_date), sum(sources.mapped('file_size')),
                                   sources.mapped('state'))

    def _file(self, source):
        return shapes.store_file_object(source.api_file_id, source.collection_id.id, oa.unix(source.create_date),
                                        source.file_size, source.state, oa.without_paths(source.error or ''))

    def _batch(self, collection, ident):
        sources = request.env['llm.knowledge.source'].sudo().search([('collection_id', '=', collection.id),
                                                                     ('api_batch_id', '=', ident)], order='id')
        if not sources:
            raise oa.not_found('file batch', ident, param='batch_id')
        return shapes.batch_object(ident, collection.id, oa.unix(sources[0].create_date), sources.mapped('state'))
