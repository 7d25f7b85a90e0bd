"""Check HTTP traffic against OpenAI's published OpenAPI description of Files, Fine-tuning and Models.

The description lives beside the repo (../shared/reference/openai-fine-tuning-openapi.json, or
$LLMT_OPENAI_SCHEMA) and is not copied here. `load_contract()` fails loudly where it is absent: a
missing schema must not turn every contract check into a silent pass.

OpenAPI 3.1 is JSON Schema 2020-12 with two leftovers from 3.0 in this file: `nullable: true`
and boolean `exclusiveMinimum`; both are rewritten to their 2020-12 forms before checking.
"""
import copy
import json
import os
import re

SCHEMA_ENV = 'LLMT_OPENAI_SCHEMA'
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
DEFAULT_PATH = os.path.join(os.path.dirname(REPO_ROOT), 'shared', 'reference', 'openai-fine-tuning-openapi.json')


def schema_path():
    return os.environ.get(SCHEMA_ENV) or DEFAULT_PATH


def load_contract(*more):
    """The contract of the fine-tuning schema, with the paths and components of `more` schema
    files of the same folder merged in (e.g. 'openai-chat-completions-openapi.json')."""
    path = schema_path()
    paths = [path] + [os.path.join(os.path.dirname(path), name) for name in more]
    for each in paths:
        if not os.path.exists(each):
            raise RuntimeError('OpenAI schema not found at %s (the shared/ folder beside the repo, or set %s)'
                               % (each, SCHEMA_ENV))
    import jsonschema  # noqa: F401  (requirements-odoo.txt)
    with open(path) as f:
        spec = json.load(f)
    for each in paths[1:]:
        with open(each) as f:
            extra = json.load(f)
        spec['paths'].update(extra['paths'])
        for kind, items in extra.get('components', {}).items():
            spec.setdefault('components', {}).setdefault(kind, {}).update(items)
    return Contract(spec)


def _normalize(node):
    """Rewrite the OpenAPI 3.0 leftovers into JSON Schema 2020-12."""
    if isinstance(node, list):
        return [_normalize(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _normalize(value) for key, value in node.items()}
    for bound, limit in (('exclusiveMinimum', 'minimum'), ('exclusiveMaximum', 'maximum')):
        if isinstance(node.get(bound), bool):
            if node.pop(bound) and limit in node:
                node[bound] = node.pop(limit)
    if node.pop('nullable', False):
        node = {'anyOf': [node, {'type': 'null'}]}
    return node


class Contract(object):

    def __init__(self, spec):
        import jsonschema
        self.spec = _normalize(copy.deepcopy(spec))
        self._resolver = jsonschema.RefResolver.from_schema(self.spec)
        self._validator_class = jsonschema.Draft202012Validator
        self.operations = []
        for template, item in self.spec['paths'].items():
            pattern = re.compile('^' + re.sub(r'\{[^}]+\}', '[^/]+', template) + '$')
            for method, operation in item.items():
                self.operations.append((method.upper(), pattern, template, operation))

    def operation(self, method, path):
        for op_method, pattern, template, operation in self.operations:
            if op_method == method and pattern.match(path):
                return template, operation
        return None, None

    def _errors(self, schema, instance, where):
        validator = self._validator_class(schema, resolver=self._resolver)
        return ['%s: %s at %s' % (where, e.message, '/'.join(str(p) for p in e.absolute_path) or '(root)')
                for e in validator.iter_errors(instance)]

    def check_request(self, method, path, query, content_type=None, body=None):
        """Problems with a request. `query` maps names to string values; `body` is the parsed
        JSON, or for multipart the form fields (files as strings)."""
        template, operation = self.operation(method, path)
        if operation is None:
            return ['%s %s: no such operation in the OpenAI schema' % (method, path)]
        where = '%s %s request' % (method, template)
        problems = []
        parameters = {p['name']: p for p in operation.get('parameters', ()) if p.get('in') == 'query'}
        for name, value in query.items():
            base = name.split('[', 1)[0]
            if name.endswith(']') and parameters.get(base, {}).get('style') == 'deepObject':
                # metadata[k]=v: one property of an object parameter
                schema = parameters[base].get('schema', {}).get('additionalProperties') or {}
                problems += self._errors(schema, _coerce(value, schema), '%s query %s' % (where, name))
                continue
            if name not in parameters:
                problems.append('%s: unknown query parameter %r' % (where, name))
                continue
            problems += self._errors(parameters[name].get('schema', {}), _coerce(value, parameters[name].get('schema', {})),
                                     '%s query %s' % (where, name))
        request_body = operation.get('requestBody')
        if request_body:
            media = (content_type or '').split(';')[0].strip()
            content = request_body.get('content', {})
            if body is None:
                if request_body.get('required'):
                    problems.append('%s: body required' % where)
            elif media not in content:
                problems.append('%s: content type %r, the schema allows %s' % (where, media, sorted(content)))
            else:
                problems += self._errors(content[media].get('schema', {}), body, where)
        elif body:
            problems.append('%s: the operation takes no body' % where)
        return problems

    def check_response(self, method, path, status, body):
        template, operation = self.operation(method, path)
        if operation is None:
            return []  # already reported for the request
        response = operation.get('responses', {}).get(str(status))
        if response is None:
            return [] if status >= 400 else ['%s %s: status %s is not in the schema' % (method, template, status)]
        schema = response.get('content', {}).get('application/json', {}).get('schema')
        return self._errors(schema, body, '%s %s response %s' % (method, template, status)) if schema else []


def _coerce(value, schema):
    """Query strings are text; read them as the type the parameter declares."""
    kind = schema.get('type')
    try:
        if kind == 'integer':
            return int(value)
        if kind == 'number':
            return float(value)
        if kind == 'boolean':
            return {'true': True, 'false': False}[value]
    except (ValueError, KeyError):
        return value
    return value
