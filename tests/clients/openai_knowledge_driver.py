"""Drive Odoo's embeddings and vector-store endpoints with the real `openai` SDK (client venv,
Python 3.11), one JSON command per stdin line as tests/clients/openai_sdk_driver.py does (its ops
work here too). Every /embeddings and /vector_stores answer is checked against the reference
schema (../shared/reference/openai-embeddings-vector-stores-openapi.json)."""
import base64
import io
import json
import os
import struct
import sys

import openai

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import openai_sdk_driver as base  # noqa: E402
from openapi_contract import Contract, schema_path  # noqa: E402

KNOWLEDGE = Contract(json.load(open(os.path.join(os.path.dirname(schema_path()),
                                                 'openai-embeddings-vector-stores-openapi.json'))))


def check_response(response):
    path = response.request.url.path.split('/v1', 1)[1]
    if not path.startswith(('/embeddings', '/vector_stores')):
        return base.check_response(response)
    response.read()
    try:
        body = json.loads(response.content)
    except ValueError:
        base.violations.append('%s %s: answer is not JSON' % (response.request.method, path))
        return
    if response.status_code >= 400:
        base.violations.extend('%s %s: %s' % (response.request.method, path, p) for p in base.error_problems(body))
        return
    if path == '/embeddings':  # the schema describes the float form; base64 is the same floats packed (float32 LE)
        for item in body.get('data') or ():
            if isinstance(item.get('embedding'), str):
                raw = base64.b64decode(item['embedding'])
                item['embedding'] = list(struct.unpack('<%df' % (len(raw) // 4), raw))
    base.violations.extend(KNOWLEDGE.check_response(response.request.method, path, response.status_code, body))


def make_client(base_url, key):
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120,
                         http_client=openai.DefaultHttpxClient(event_hooks={'response': [check_response]}))


def page(result):
    return {'data': [item.model_dump(mode='json') for item in result.data], 'has_more': result.has_more}


def run(client, op, args):
    stores = client.vector_stores
    if op == 'embed':
        return client.embeddings.create(**args)
    if op == 'upload_kb':
        return client.files.create(file=(args['filename'], io.BytesIO(base64.b64decode(args['content']))),
                                   purpose='assistants')
    if op == 'vs_create':
        return stores.create(**args)
    if op == 'vs_list':
        return page(stores.list(**args))
    if op == 'vs_get':
        return stores.retrieve(args['id'])
    if op == 'vs_delete':
        return stores.delete(args['id'])
    if op == 'vs_file_create':
        return stores.files.create(vector_store_id=args['store'], file_id=args['file'])
    if op == 'vs_file_get':
        return stores.files.retrieve(file_id=args['file'], vector_store_id=args['store'])
    if op == 'vs_files':
        return page(stores.files.list(vector_store_id=args['store']))
    if op == 'vs_file_delete':
        return stores.files.delete(file_id=args['file'], vector_store_id=args['store'])
    if op == 'vs_batch_create':
        return stores.file_batches.create(vector_store_id=args['store'], file_ids=args['files'])
    if op == 'vs_batch_get':
        return stores.file_batches.retrieve(batch_id=args['batch'], vector_store_id=args['store'])
    if op == 'vs_batch_files':
        return page(stores.file_batches.list_files(batch_id=args['batch'], vector_store_id=args['store']))
    if op == 'vs_search':
        return page(stores.search(args.pop('store'), **args))
    return base.run(client, op, args)


def main():
    base_url, key = sys.argv[1], sys.argv[2]
    clients = {key: make_client(base_url, key)}
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        use = command.get('key', key)
        client = clients.setdefault(use, make_client(base_url, use))
        try:
            answer = {'ok': base.dump(run(client, command['op'], command.get('args') or {}))}
        except openai.APIStatusError as e:
            try:
                body = e.response.json()
            except ValueError:
                body = e.response.text
            answer = {'error': {'status': e.status_code, 'body': body}}
        except Exception as e:
            answer = {'exception': '%s: %s' % (type(e).__name__, e)}
        sys.stdout.write(json.dumps(answer) + '\n')
        sys.stdout.flush()


if __name__ == '__main__':
    main()
