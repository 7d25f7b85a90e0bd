# -*- coding: utf-8 -*-
"""The one place this addon changes how Odoo 11 handles a request, and only for /v1/ paths.

Odoo 11 decides a request's kind and reads its body before any route runs, and offers no
supported switch for either; the OpenAI-compatible API (controllers/openai_api.py) needs three
things there, so `install()` wraps two methods of `odoo.http.Root` once, at import. Every other
path goes to Odoo's own methods, untouched (tests/test_openai_api.py checks a JSON-RPC call
beside /v1 calls).

1. `get_request`: a /v1/ request is a plain HTTP request whatever its Content-Type (Odoo 11 turns
   application/json into JSON-RPC: the body parsed as JSON-RPC, the answer wrapped in it). Its
   body is NOT read here: the route's parameters come from the query string only; the handler
   reads the body itself, after the key is checked. A Content-Length over the path's limit is
   answered 413 at once, the body unread (no memory, no spooled temp file); werkzeug's
   `max_content_length` is set on the request too, as a backstop for the form parser. A chunked
   body (no Content-Length) is refused with 411: werkzeug 0.16 reads one without any limit.
2. `setup_db`: without a session Odoo 11 lists the databases on every request (a new connection
   to PostgreSQL each time, a third of a GET); API clients keep no session, so the choice is kept
   a minute per Host header (the db filter may name the host), in a bounded table.
3. Each /v1/ request gets an id (`request_id()`), sent back as the `x-request-id` header and
   named in server-side logs, so an error's details stay in the log and the caller can quote it.
"""
import json
import time
import uuid

import werkzeug
from werkzeug.wrappers import Response

from odoo import http, tools

from ..lib.api_v1 import protocol as oa
from ..lib.host import limits

PREFIX = '/v1/'
DB_CHOICE_SECONDS = 60
DB_CHOICE_HOSTS = 256
MULTIPART_SLACK = 64 * 1024  # the form's other fields and boundaries around the file
MAX_JSON_BODY = 4 * 1024 * 1024  # a chat or job request; odoo.conf llm_training_api_max_body_bytes
REQUEST_ID = 'llm_training.request_id'

_db_choice = {}


def is_v1(httprequest):
    return httprequest.path.startswith(PREFIX)


def request_id(httprequest=None):
    """The id of this /v1/ request ('req_' and 32 hex digits), made on first use."""
    environ = (httprequest or http.request.httprequest).environ
    if REQUEST_ID not in environ:
        environ[REQUEST_ID] = 'req_%s' % uuid.uuid4().hex
    return environ[REQUEST_ID]


def max_file_bytes():
    """The largest dataset file accepted (odoo.conf llm_training_max_file_bytes; the dataset's rule)."""
    return limits.dataset_size_limits(tools.config)[1]


def body_limit(httprequest):
    """(bytes, error) for the body of this /v1/ request: an upload may carry a whole file."""
    if httprequest.path.rstrip('/') == '/v1/files' and httprequest.method == 'POST':
        limit = max_file_bytes()
        return limit + MULTIPART_SLACK, oa.ApiError(
            413, 'The file is larger than this server accepts (%d bytes).' % limit, param='file', code='file_too_large')
    limit = int(tools.config.get('llm_training_api_max_body_bytes') or MAX_JSON_BODY)
    return limit, oa.ApiError(413, 'The request body is larger than this server accepts (%d bytes).' % limit,
                              code='request_too_large')


def error_response(error, httprequest):
    """OpenAI's error object for a refusal made before any route runs."""
    headers = [('Content-Type', 'application/json'), ('x-request-id', request_id(httprequest))] + list(error.headers)
    if error.status in (411, 413):
        headers.append(('Connection', 'close'))  # the body is left unread: this connection cannot go on
    return Response(json.dumps(error.body()), status=error.status, headers=headers)


class V1Request(http.HttpRequest):
    """An HTTP request whose body the handler reads (after authentication), never the constructor."""

    def __init__(self, httprequest):
        http.WebRequest.__init__(self, httprequest)
        self.params = dict(httprequest.args)
        self.params.pop('session_id', None)


def _get_request(original):
    def get_request(self, httprequest):
        if not is_v1(httprequest):
            return original(self, httprequest)
        limit, error = body_limit(httprequest)
        httprequest.max_content_length = limit
        if (httprequest.content_length or 0) > limit:
            raise werkzeug.exceptions.RequestEntityTooLarge(response=error_response(error, httprequest))
        if 'chunked' in httprequest.headers.get('Transfer-Encoding', '').lower():
            refusal = oa.ApiError(411, 'Send the body with a Content-Length header; a chunked body is not accepted.',
                                  code='length_required')
            raise werkzeug.exceptions.LengthRequired(response=error_response(refusal, httprequest))
        return V1Request(httprequest)
    return get_request


def _setup_db(original):
    def setup_db(self, httprequest):
        if not is_v1(httprequest) or httprequest.session.db:
            return original(self, httprequest)
        host = httprequest.environ.get('HTTP_HOST', '')
        db, until = _db_choice.get(host, (None, 0))
        if until > time.time():
            httprequest.session.db = db
            return None
        result = original(self, httprequest)
        if len(_db_choice) >= DB_CHOICE_HOSTS:  # Host is the client's to choose: keep the table bounded
            _db_choice.clear()
        _db_choice[host] = (httprequest.session.db, time.time() + DB_CHOICE_SECONDS)
        return result
    return setup_db


def install():
    """Wrap Root.get_request and Root.setup_db once per process (a module reload must not wrap twice)."""
    if getattr(http.Root, '_llm_training_v1_hooks', False):
        return
    http.Root.get_request = _get_request(http.Root.get_request)
    http.Root.setup_db = _setup_db(http.Root.setup_db)
    http.Root._llm_training_v1_hooks = True


install()
