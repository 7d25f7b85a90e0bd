"""Drive Odoo's OpenAI-compatible API with the real `openai` SDK (the client venv, Python 3.11).

One JSON command per stdin line, one JSON answer per stdout line, so a test on Odoo's Python can
step it and run the cron between steps: {"op": ..., "args": {...}, "key": optional other key}
-> {"ok": result} or {"error": {"status", "body"}}. Every response body is checked against the
reference OpenAPI schemas (fine-tuning and chat completions); "violations" returns what failed.
"""
import io
import json
import os
import sys

import openai

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from openapi_contract import Contract, schema_path  # noqa: E402

FINE_TUNING = Contract(json.load(open(schema_path())))
CHAT_PATH = os.path.join(os.path.dirname(schema_path()), 'openai-chat-completions-openapi.json')
CHAT = Contract(json.load(open(CHAT_PATH)))
violations = []


def error_problems(body):
    """Every error answer must be OpenAI's error object (the chat schema's Error)."""
    error = (body or {}).get('error') if isinstance(body, dict) else None
    schema = {'$ref': '#/components/schemas/Error'}
    return CHAT._errors(schema, error, 'error object') if error is not None else ['error answer without "error"']


def check_response(response):
    if 'text/event-stream' in response.headers.get('content-type', ''):
        return  # streamed chunks are checked one by one in chat_stream
    response.read()
    path = response.request.url.path.split('/v1', 1)[1]
    if path.endswith('/content'):
        return
    try:
        body = json.loads(response.content)
    except ValueError:
        violations.append('%s %s: answer is not JSON: %r' % (response.request.method, path, response.content[:200]))
        return
    if response.status_code >= 400:
        violations.extend('%s %s: %s' % (response.request.method, path, p) for p in error_problems(body))
        return
    contract = CHAT if path.startswith('/chat') else FINE_TUNING
    violations.extend(contract.check_response(response.request.method, path, response.status_code, body))


def make_client(base_url, key):
    # LLMT_SDK_HEADERS (JSON): headers every request carries, e.g. the Host that picks a database
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120,
                         default_headers=json.loads(os.environ.get('LLMT_SDK_HEADERS') or '{}'),
                         http_client=openai.DefaultHttpxClient(event_hooks={'response': [check_response]}))


def dump(result):
    if hasattr(result, 'model_dump'):
        return result.model_dump(mode='json')
    if hasattr(result, 'data') and hasattr(result, 'has_more'):  # a page
        return {'data': [item.model_dump(mode='json') for item in result.data], 'has_more': result.has_more}
    return result


def chat_stream(client, args):
    schema = {'$ref': '#/components/schemas/CreateChatCompletionStreamResponse'}
    chunks = []
    for chunk in client.chat.completions.create(stream=True, **args):
        data = chunk.model_dump(mode='json', exclude_unset=True)
        violations.extend(CHAT._errors(schema, data, 'chat stream chunk'))
        chunks.append(data)
    return chunks


def run(client, op, args):
    if op == 'upload':
        return client.files.create(file=(args['filename'], io.BytesIO(args['content'].encode('utf-8'))),
                                   purpose=args.get('purpose', 'fine-tune'))
    if op == 'file':
        return client.files.retrieve(args['id'])
    if op == 'files':
        return client.files.list()
    if op == 'file_content':
        return client.files.content(args['id']).text
    if op == 'delete_file':
        return client.files.delete(args['id'])
    if op == 'create_job':
        return client.fine_tuning.jobs.create(**args)
    if op == 'job':
        return client.fine_tuning.jobs.retrieve(args['id'])
    if op == 'jobs':
        page = client.fine_tuning.jobs.list(**args)
        return {'data': [j.model_dump(mode='json') for j in page.data], 'has_more': page.has_more}
    if op == 'all_jobs':  # the SDK's auto-paging iterator
        return [j.id for j in client.fine_tuning.jobs.list(**args)]
    if op == 'cancel':
        return client.fine_tuning.jobs.cancel(args['id'])
    if op == 'pause':
        return client.fine_tuning.jobs.pause(args['id'])
    if op == 'events':
        page = client.fine_tuning.jobs.list_events(args.pop('id'), **args)
        return {'data': [e.model_dump(mode='json') for e in page.data], 'has_more': page.has_more}
    if op == 'checkpoints':
        page = client.fine_tuning.jobs.checkpoints.list(args.pop('id'), **args)
        return {'data': [c.model_dump(mode='json') for c in page.data], 'has_more': page.has_more}
    if op == 'models':
        return [m.model_dump(mode='json') for m in client.models.list()]
    if op == 'model':
        return client.models.retrieve(args['id'])
    if op == 'delete_model':
        return client.models.delete(args['id'])
    if op == 'chat':
        return client.chat.completions.create(**args)
    if op == 'chat_stream':
        return chat_stream(client, args)
    if op == 'raw':  # what the SDK would never send: malformed JSON, no key
        headers = dict(args.get('headers') or {})
        if 'bearer' in args:
            headers['Authorization'] = 'Bearer %s' % args['bearer']
        response = client._client.request(args['method'], str(client.base_url).rstrip('/') + args['path'],
                                          content=args.get('content', '').encode('utf-8'), headers=headers)
        try:
            body = response.json()
        except ValueError:
            body = response.text
        return {'status': response.status_code, 'body': body}
    if op == 'violations':
        return violations
    raise ValueError('unknown op %r' % op)


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
            answer = {'ok': dump(run(client, command['op'], command.get('args') or {}))}
        except openai.APIStatusError as e:
            try:
                body = e.response.json()
            except ValueError:
                body = e.response.text
            answer = {'error': {'status': e.status_code, 'body': body}}
        except Exception as e:  # reported to the test, which fails with it
            answer = {'exception': '%s: %s' % (type(e).__name__, e)}
        sys.stdout.write(json.dumps(answer) + '\n')
        sys.stdout.flush()


if __name__ == '__main__':
    main()
