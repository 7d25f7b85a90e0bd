"""The OpenAI shapes of embeddings and vector stores (the schemas in
../shared/reference/openai-embeddings-vector-stores-openapi.json): request checks and response
objects, no Odoo. Vector stores are knowledge collections (vs_<id>); a vector store's file is a
source made from a file uploaded with purpose "assistants" (file-kb-<attachment id>); a file
batch is the sources attached together (vsfb_<collection id>_<first source id>)."""
import base64
import struct

from ..api_v1.protocol import ApiError, parse_id

MAX_SEARCH_RESULTS = 50
FILE_PREFIX = 'file-kb-'
STORE_PREFIX = 'vs_'
SOURCE_STATUS = {'pending': 'in_progress', 'indexing': 'in_progress', 'done': 'completed', 'error': 'failed'}


def store_id(record_id):
    return '%s%d' % (STORE_PREFIX, record_id)


def parse_store_id(ident):
    return parse_id(STORE_PREFIX, ident)


def file_id(attachment_id):
    return '%s%d' % (FILE_PREFIX, attachment_id)


def parse_file_id(ident):
    return parse_id(FILE_PREFIX, ident)


def batch_id(collection_id, first_source_id):
    return 'vsfb_%d_%d' % (collection_id, first_source_id)


def embedding_request(body):
    """(model, [texts], encoding_format, dimensions) of a /v1/embeddings body, or ApiError."""
    model, texts = body.get('model'), body.get('input')
    if not isinstance(model, str) or not model:
        raise ApiError(400, "Missing required parameter: 'model'.", param='model', code='missing_required_parameter')
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise ApiError(400, "'input' must be a non-empty string or a list of non-empty strings (token arrays are "
                            "not accepted here).", param='input', code='invalid_value')
    encoding = body.get('encoding_format') or 'float'
    if encoding not in ('float', 'base64'):
        raise ApiError(400, "'encoding_format' must be 'float' or 'base64'.", param='encoding_format',
                       code='invalid_value')
    dimensions = body.get('dimensions')
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise ApiError(400, "'dimensions' must be a positive integer.", param='dimensions', code='invalid_value')
    return model, texts, encoding, dimensions


def embedding_response(model, vectors, encoding, token_counts):
    data = []
    for index, vector in enumerate(vectors):
        if encoding == 'base64':  # little-endian float32, as OpenAI sends and the SDKs decode
            value = base64.b64encode(struct.pack('<%df' % len(vector), *vector)).decode('ascii')
        else:
            value = list(vector)
        data.append({'object': 'embedding', 'index': index, 'embedding': value})
    tokens = sum(token_counts)
    return {'object': 'list', 'model': model, 'data': data, 'usage': {'prompt_tokens': tokens, 'total_tokens': tokens}}


def file_counts(states):
    counts = {'in_progress': 0, 'completed': 0, 'failed': 0, 'cancelled': 0, 'total': len(states)}
    for state in states:
        counts[SOURCE_STATUS[state]] += 1
    return counts


def store_object(record_id, name, created_at, last_active_at, usage_bytes, states):
    counts = file_counts(states)
    return {'id': store_id(record_id), 'object': 'vector_store', 'created_at': created_at, 'name': name or '',
            'usage_bytes': usage_bytes, 'file_counts': counts, 'last_active_at': last_active_at,
            'status': 'in_progress' if counts['in_progress'] else 'completed', 'metadata': {}, 'expires_at': None}


def store_file_object(source_file_id, collection_id, created_at, usage_bytes, state, error):
    last_error = None
    if state == 'error':
        last_error = {'code': 'invalid_file' if 'unreadable' in (error or '') or 'empty' in (error or '')
                      else 'server_error', 'message': error or 'failed'}
    return {'id': source_file_id, 'object': 'vector_store.file', 'usage_bytes': usage_bytes, 'created_at': created_at,
            'vector_store_id': store_id(collection_id), 'status': SOURCE_STATUS[state], 'last_error': last_error,
            'attributes': {}}


def batch_object(ident, collection_id, created_at, states):
    counts = file_counts(states)
    return {'id': ident, 'object': 'vector_store.files_batch', 'created_at': created_at,
            'vector_store_id': store_id(collection_id), 'file_counts': counts,
            'status': 'in_progress' if counts['in_progress'] else ('failed' if counts['failed'] == counts['total']
                                                                   else 'completed')}


def search_request(body):
    """(query, max results, score threshold) of a search body, or ApiError."""
    query = body.get('query')
    if isinstance(query, list):
        query = ' '.join(q for q in query if isinstance(q, str))
    if not isinstance(query, str) or not query.strip():
        raise ApiError(400, "Missing required parameter: 'query'.", param='query', code='missing_required_parameter')
    limit = body.get('max_num_results', 10)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_SEARCH_RESULTS:
        raise ApiError(400, "'max_num_results' must be an integer from 1 to %d." % MAX_SEARCH_RESULTS,
                       param='max_num_results', code='invalid_value')
    ranking = body.get('ranking_options') or {}
    threshold = ranking.get('score_threshold') if isinstance(ranking, dict) else None
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 <= threshold <= 1):
        raise ApiError(400, "'ranking_options.score_threshold' must be a number from 0 to 1.",
                       param='ranking_options', code='invalid_value')
    if body.get('filters'):
        raise ApiError(400, "'filters' on file attributes are not supported by this server.", param='filters',
                       code='unsupported_parameter')
    return query.strip(), limit, threshold


def search_page(query, results):
    """results: [{'file_id', 'filename', 'score', 'text'}] best first."""
    return {'object': 'vector_store.search_results.page', 'search_query': [query], 'has_more': False,
            'next_page': None,
            'data': [{'file_id': r['file_id'], 'filename': r['filename'], 'score': min(1.0, max(0.0, r['score'])),
                      'attributes': {}, 'content': [{'type': 'text', 'text': r['text']}]} for r in results]}
