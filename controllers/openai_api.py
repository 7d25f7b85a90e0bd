# -*- coding: utf-8 -*-
"""The OpenAI-compatible API (/v1): Files, Fine-tuning jobs, Models and Chat completions.

Thin handlers: the protocol (shapes, status mapping, checks, errors) is lib/api_v1/protocol.py; the
work is the same ORM methods the UI and XML-RPC use. Every request runs as its key's user
(`env(user=...)`), never as superuser on its behalf, so access rights and record rules decide
what it sees (anything else is a 404) and what it may do (403).

Odoo 11 traps handled here and in v1_hooks.py (the one module that changes Odoo's request
handling, for /v1/ paths only): the request kind, the body limit before the body is read, the
database choice, the request id. auth='none' routes get the database from the db filter
(single-database set-up: --db-filter or db_name; see README). A streamed answer runs after the
request's cursor is closed: the stream opens nothing of its own.

Errors never carry server paths or logs: what went wrong is logged with the request id, the
caller gets the id (in the message and the x-request-id header).
"""
import base64
import functools
import json
import logging
import os
import time
import uuid

import psycopg2
import werkzeug

import odoo
from odoo import http, tools
from odoo.exceptions import AccessError, UserError, ValidationError
from odoo.http import request, Response

from ..lib.api_v1 import protocol as oa
from ..lib.jobs import job_status
from ..lib.host import limits
from ..lib.exceptions import TrainingFailedError, TrainingRetryableError
from ..user_errors import BudgetExceeded, InvalidServiceRequest, JobRefused, ServiceBusy
from . import v1_hooks

_logger = logging.getLogger(__name__)

SNIFF_BYTES = 65536


def rate_clock():
    """The time a request counts in (its minute of the per-key rate limit); tests fix it."""
    return time.time()


def _setting(env, name, default):
    """An API limit: odoo.conf's llm_training_<name>, else the system parameter llm_training.<name>."""
    value = tools.config.get('llm_training_' + name)
    if value in (None, ''):
        value = env['ir.config_parameter'].sudo().get_param('llm_training.' + name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


# -- responses ------------------------------------------------------------------------------------------------
def _json(body, status=200, headers=None):
    data = json.dumps(body)
    return Response(data, status=status, headers=[('Content-Type', 'application/json'),
                                                  ('x-request-id', v1_hooks.request_id())] + list(headers or []))


def _error(error):
    return _json(error.body(), error.status, error.headers)


def _logged(status, message, code, detail, param=None, headers=None):
    """An ApiError whose details stay in the server log under the request id: the caller gets
    `message` and the id to quote, never paths or the model server's log."""
    rid = v1_hooks.request_id()
    _logger.warning('OpenAI-compatible API %s: %s %s: %s', rid, request.httprequest.method,
                    request.httprequest.path, detail)
    return oa.ApiError(status, '%s (request id %s)' % (message, rid), param=param, code=code, headers=headers)


def endpoint(handler):
    """Authenticate the key, apply the rate limit, run the handler as the key's user inside a
    savepoint (a refused request leaves nothing behind) and turn every failure into OpenAI's
    error object. The key itself never reaches a message or a log line."""
    @functools.wraps(handler)
    def wrapper(self, **kw):
        # no session file per API call (Odoo 11 saves the session it made for the db choice)
        request.session.modified = False
        try:
            if not request.db:
                raise oa.ApiError(503, 'No database is selected for this server: run Odoo with one database '
                                       '(--db-filter or db_name).', code='no_database')
            key = request.env['llm.api.key'].sudo()._authenticate(oa.bearer_key(
                request.httprequest.headers.get('Authorization')))
            if key is None:
                missing = not request.httprequest.headers.get('Authorization')
                raise oa.ApiError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
                                  if missing else 'Incorrect API key provided.',
                                  code='missing_api_key' if missing else 'invalid_api_key')
            key_id, user_id = key
            allowed, wait = request.env['llm.api.key'].sudo()._record_use(
                key_id, _setting(request.env, 'api_requests_per_minute', 600), rate_clock())
            if not allowed:
                raise oa.ApiError(429, 'Rate limit reached for this API key; try again in %d s.' % wait,
                                  code='rate_limit_exceeded', headers=[('Retry-After', str(wait))])
            env = request.env(user=user_id, context={})
            with env.cr.savepoint():
                return handler(self, env, **kw)
        except oa.ApiError as e:
            return _error(e)
        except BudgetExceeded as e:  # no override over the API: OpenAI's exhausted quota
            return _error(oa.ApiError(429, e.name, code='insufficient_quota',
                                      headers=[('x-should-retry', 'false')]))  # the SDKs' hint: a retry cannot help
        except AccessError as e:
            return _error(oa.ApiError(403, 'You do not have access to this operation: %s' % oa.without_paths(e.name),
                                      code='insufficient_permissions'))
        except (UserError, ValidationError) as e:
            return _error(oa.ApiError(400, oa.without_paths(e.name), code='invalid_request'))
        except werkzeug.exceptions.RequestEntityTooLarge:
            return _error(_too_large())
        except (psycopg2.Error, MemoryError):
            raise  # Odoo retries serialization failures and answers the rest itself
        except Exception:
            rid = v1_hooks.request_id()
            _logger.exception('OpenAI-compatible API %s: %s %s failed', rid, request.httprequest.method,
                              request.httprequest.path)
            return _error(oa.ApiError(500, 'The server had an error while processing your request (request id %s).'
                                      % rid, code='server_error'))
    return wrapper


def _too_large():
    return oa.ApiError(413, 'The file is larger than this server accepts (%d bytes).' % v1_hooks.max_file_bytes(),
                       param='file', code='file_too_large')


def _route(path, methods):
    return http.route(path, type='http', auth='none', csrf=False, methods=methods)


def _created(record):
    return record.create_date


def _org(company):
    return oa.slug(company.name) if company else 'org'


class OpenAIApi(http.Controller):

    @http.route('/v1/<path:unknown>', type='http', auth='none', csrf=False)
    def unknown_url(self, unknown, **kw):
        """Any other /v1 URL (pause and resume included): OpenAI's 404, not Odoo's HTML page."""
        request.session.modified = False
        return _error(oa.ApiError(404, 'Unknown request URL: %s /v1/%s. Please check the URL for typos, or see '
                                       'the README for the supported endpoints.'
                                  % (request.httprequest.method, unknown), code='unknown_url'))

    # -- files ---------------------------------------------------------------------------------------
    @_route('/v1/files', ['POST'])
    @endpoint
    def create_file(self, env, **kw):
        max_file = v1_hooks.max_file_bytes()  # a larger body was refused unread (v1_hooks)
        Dataset = env['llm.training.dataset']
        from . import knowledge_api  # imports this module: imported here
        if request.httprequest.form.get('purpose') in knowledge_api.PURPOSES and request.httprequest.files.get('file'):
            return knowledge_api.create_file(env, request.httprequest.files['file'], max_file)  # for vector stores
        Dataset.check_access_rights('create')
        if request.httprequest.form.get('purpose') != 'fine-tune':
            raise oa.ApiError(400, "purpose must be 'fine-tune' (the only purpose this server accepts).",
                              param='purpose', code='invalid_value')
        upload = request.httprequest.files.get('file')
        if upload is None:
            raise oa.ApiError(400, "Missing required parameter: 'file'.", param='file', code='missing_required_parameter')
        content = upload.read(max_file + 1)
        if len(content) > max_file:
            raise _too_large()
        data_format = oa.sniff_jsonl(content[:SNIFF_BYTES])
        filename = os.path.basename(upload.filename or 'upload.jsonl')
        attachment = env['ir.attachment'].create({'name': filename, 'datas_fname': filename,
                                                  'datas': base64.b64encode(content), 'mimetype': 'application/jsonl'})
        dataset = Dataset.create({'name': filename, 'attachment_ids': [(6, 0, attachment.ids)],
                                  'data_format': data_format, 'description': 'Uploaded through the API'})
        dataset.sudo().write({'api_uploaded': True})  # a workflow flag the ACL gives nobody to write
        return _json(self._file(dataset))

    @_route('/v1/files', ['GET'])
    @endpoint
    def list_files(self, env, purpose=None, after=None, limit=None, order='desc', **kw):
        limit = oa.limit_param(limit, default=oa.MAX_LIMIT)
        domain = [('attachment_ids', '!=', False)]
        if purpose not in (None, '', 'fine-tune'):
            domain.append(('id', '=', 0))
        if after:
            after_id = oa.parse_id('file-', after)
            if after_id is None:
                raise oa.ApiError(400, 'after must be a file id.', param='after', code='invalid_value')
            domain.append(('id', '<' if order != 'asc' else '>', after_id))
        datasets = env['llm.training.dataset'].search(domain, limit=limit + 1,
                                                       order='id asc' if order == 'asc' else 'id desc')
        items = [self._file(d) for d in datasets[:limit]]
        return _json({'object': 'list', 'data': items, 'first_id': items[0]['id'] if items else None,
                      'last_id': items[-1]['id'] if items else None, 'has_more': len(datasets) > limit})

    @_route('/v1/files/<string:file_ident>', ['GET'])
    @endpoint
    def get_file(self, env, file_ident, **kw):
        return _json(self._file(self._find_file(env, file_ident)))

    @_route('/v1/files/<string:file_ident>/content', ['GET'])
    @endpoint
    def file_content(self, env, file_ident, **kw):
        dataset = self._find_file(env, file_ident)
        env['ir.attachment'].check_access_rights('read')
        return Response(dataset.file_content(), status=200, headers=[('Content-Type', 'application/octet-stream'),
                                                               ('x-request-id', v1_hooks.request_id())])

    @_route('/v1/files/<string:file_ident>', ['DELETE'])
    @endpoint
    def delete_file(self, env, file_ident, **kw):
        dataset = self._find_file(env, file_ident)
        dataset.check_access_rights('unlink')
        dataset.check_access_rule('unlink')
        if dataset.sudo().job_ids:
            raise oa.ApiError(409, 'File %s is used by fine-tuning jobs and cannot be deleted.' % file_ident,
                              param='file_id', code='file_in_use')
        attachments = dataset.attachment_ids
        attachments.unlink()
        dataset.unlink()
        return _json({'id': file_ident, 'object': 'file', 'deleted': True})

    def _find_file(self, env, ident, param=None):
        record_id = oa.parse_id('file-', ident)
        dataset = env['llm.training.dataset'].search([('id', '=', record_id)]) if record_id else None
        if not dataset:
            raise oa.not_found('file', ident, param=param)
        return dataset

    def _file(self, dataset):
        attachments = dataset.attachment_ids.sudo()  # size and name only; reading them was checked on the dataset
        return oa.file_object({'id': dataset.id, 'created_at': dataset.create_date, 'state': dataset.state,
                               'filename': attachments[:1].datas_fname or dataset.name,
                               'bytes': sum(attachments.mapped('file_size')), 'report': dataset.validation_report})

    # -- fine-tuning jobs ---------------------------------------------------------------------------------
    @_route('/v1/fine_tuning/jobs', ['POST'])
    @endpoint
    def create_job(self, env, **kw):
        spec = oa.job_request(oa.json_body(request.httprequest.get_data()))
        Job = env['llm.training.job']
        Job.check_access_rights('create')
        model = self._find_model(env, spec['model'], param='model')
        if model.kind != 'base':
            raise oa.ApiError(400, 'Model %s is a fine-tuned model; this server fine-tunes base models.' % spec['model'],
                              param='model', code='invalid_model')
        # the method asked for, against what the model's provider offers (its capability)
        if spec['method'] == 'reinforcement' or (spec['method'] == 'dpo' and not model.provider_id.supports_dpo):
            raise oa.ApiError(400, 'Method %s is not supported for model %s (provider "%s").'
                              % (spec['method'], spec['model'], model.provider_id.name), param='method.type',
                              code='unsupported_method')
        training = self._find_file(env, spec['training_file'], param='training_file')
        validation = self._find_file(env, spec['validation_file'], param='validation_file') \
            if spec['validation_file'] else env['llm.training.dataset']
        wanted = 'preference' if spec['method'] == 'dpo' else 'chat'
        for name, dataset in (('training_file', training), ('validation_file', validation)):
            if dataset and dataset.state == 'invalid':
                raise oa.ApiError(400, 'File %s failed validation: %s'
                                  % (spec[name], oa.without_paths(dataset.validation_report or '')[:500]),
                                  param=name, code='invalid_file')
            if dataset and dataset.data_format != wanted:
                raise oa.ApiError(400, 'File %s holds %s data; method %s needs %s data.'
                                  % (spec[name], dataset.data_format, spec['method'], wanted), param=name,
                                  code='invalid_file_format')
        settings = dict(spec['settings'])
        if spec['seed'] is not None:
            settings['seed'] = spec['seed']
        values = {'name': '%s%s' % (spec['model'], (' ' + spec['suffix']) if spec['suffix'] else ''),
                  'provider_id': model.provider_id.id, 'base_model_id': model.id,
                  'dataset_ids': [(6, 0, training.ids)], 'validation_dataset_ids': [(6, 0, validation.ids)],
                  'epochs': 0, 'batch_size': 0, 'learning_rate_multiplier': 0.0,  # OpenAI's default: "auto"
                  'suffix': spec['suffix'] or False, 'hyperparameters': json.dumps(settings),
                  'api_metadata': json.dumps(spec['metadata'], sort_keys=True) if spec['metadata'] else False}
        try:
            job = Job.create(values)
        except ValidationError as e:
            raise oa.ApiError(400, oa.without_paths(e.name), param=spec['method_param'], code='invalid_hyperparameter')
        try:  # the job's own rules, as for its Submit button; the organisation's limit is the API's
            job.with_context(llm_active_jobs_limit=_setting(env, 'api_running_jobs_per_company', 10)).action_submit()
        except JobRefused as e:
            raise self._refusal(e, spec)
        return _json(self._job(job))

    def _refusal(self, error, spec):
        """The ApiError OpenAI gives for what the job's rules refused (JobRefused)."""
        message = oa.without_paths(error.name)
        if error.kind == 'limit':
            return oa.ApiError(429, message, code='rate_limit_exceeded')
        if error.kind == 'unsupported' and error.field == 'dataset_ids':
            return oa.ApiError(400, 'Method %s is not supported for model %s: %s' % (spec['method'], spec['model'], message),
                               param='method.type', code='unsupported_method')
        return oa.ApiError(400, message, param='training_file' if error.field == 'dataset_ids' else None,
                           code='invalid_request')

    @_route('/v1/fine_tuning/jobs', ['GET'])
    @endpoint
    def list_jobs(self, env, after=None, limit=None, **kw):
        limit = oa.limit_param(limit)
        domain = []
        if after:
            after_id = oa.parse_id('ftjob-', after)
            if after_id is None:
                raise oa.ApiError(400, 'after must be a fine-tuning job id.', param='after', code='invalid_value')
            domain.append(('id', '<', after_id))
        wanted = oa.metadata_filter(request.httprequest.args)
        for name, value in sorted(wanted.items()):
            domain.append(('api_metadata', 'like', '%s: %s' % (json.dumps(name), json.dumps(value))))
        if request.httprequest.args.get('metadata') == 'null':
            domain.append(('api_metadata', '=', False))
        jobs = env['llm.training.job'].search(domain, limit=limit + 1, order='id desc')
        items = [self._job(job) for job in jobs[:limit]]
        return _json(oa.page(items, len(jobs) > limit))

    @_route('/v1/fine_tuning/jobs/<string:job_ident>', ['GET'])
    @endpoint
    def get_job(self, env, job_ident, **kw):
        return _json(self._job(self._find_job(env, job_ident)))

    @_route('/v1/fine_tuning/jobs/<string:job_ident>/cancel', ['POST'])
    @endpoint
    def cancel_job(self, env, job_ident, **kw):
        job = self._find_job(env, job_ident)
        if job.state in job_status.FINAL_STATES:
            raise oa.ApiError(409, 'Job %s has already %s; it cannot be cancelled.'
                              % (job_ident, oa.JOB_STATUS[job.state]), code='invalid_state')
        job.action_cancel()
        job.invalidate_cache()
        return _json(self._job(job))

    @_route('/v1/fine_tuning/jobs/<string:job_ident>/events', ['GET'])
    @endpoint
    def job_events(self, env, job_ident, after=None, limit=None, **kw):
        job = self._find_job(env, job_ident)
        limit = oa.limit_param(limit)
        domain = [('job_id', '=', job.id)]
        if after:
            after_id = oa.parse_id('ftevent-', after)
            if after_id is None:
                raise oa.ApiError(400, 'after must be an event id.', param='after', code='invalid_value')
            domain.append(('id', '<', after_id))
        events = env['llm.training.job.event'].search(domain, limit=limit + 1, order='id desc')
        items = [oa.event_object({'id': e.id, 'event_time': e.event_time, 'level': e.level, 'message': e.message,
                                  'data': _loads(e.data)}) for e in events[:limit]]
        return _json(oa.page(items, len(events) > limit))

    @_route('/v1/fine_tuning/jobs/<string:job_ident>/checkpoints', ['GET'])
    @endpoint
    def job_checkpoints(self, env, job_ident, after=None, limit=None, **kw):
        job = self._find_job(env, job_ident)
        limit = oa.limit_param(limit, default=10)
        checkpoints = sorted(self._checkpoints(job), key=lambda c: -c['step_number'])
        if after:
            position = next((i for i, c in enumerate(checkpoints) if c['id'] == after), None)
            if position is None:
                raise oa.ApiError(400, 'after must be a checkpoint id of this job.', param='after', code='invalid_value')
            checkpoints = checkpoints[position + 1:]
        page = oa.page(checkpoints[:limit], len(checkpoints) > limit)
        page.update(first_id=page['data'][0]['id'] if page['data'] else None,
                    last_id=page['data'][-1]['id'] if page['data'] else None)
        return _json(page)

    def _find_job(self, env, ident):
        record_id = oa.parse_id('ftjob-', ident)
        job = env['llm.training.job'].search([('id', '=', record_id)]) if record_id else None
        if not job:
            raise oa.not_found('fine-tuning job', ident)
        return job

    def _job(self, job):
        data_format = (job.dataset_ids[:1].data_format or 'chat')
        hyper = job.get_hyperparameters()
        return oa.job_object({
            'id': job.id, 'created_at': job.create_date, 'state': job.state, 'model': self._model_id(job.base_model_id),
            'fine_tuned_model': self._model_id(job.result_model_id) if job.result_model_id else None,
            'training_file': oa.file_id(job.dataset_ids[:1].id) if job.dataset_ids else None,
            'validation_file': oa.file_id(job.validation_dataset_ids[:1].id) if job.validation_dataset_ids else None,
            'epochs': job.epochs, 'batch_size': job.batch_size, 'learning_rate_multiplier': job.learning_rate_multiplier,
            'dpo_beta': hyper.get('dpo_beta'), 'seed': job.seed, 'trained_tokens': job.trained_tokens,
            'error_message': job.error_message, 'finished_at': job.finished_at,
            'estimated_finish': job.estimated_finish, 'organization_id': 'org-%d' % job.company_id.id,
            'method': 'dpo' if data_format == 'preference' else 'supervised', 'suffix': job.suffix,
            'metadata': _loads(job.api_metadata)})

    def _checkpoints(self, job):
        """The job's intermediate checkpoints: those the provider registered (OpenAI keeps the last
        three), or the complete ones in a local trainer's job folder."""
        metrics = {m.step: m for m in job.metric_ids}
        if job.result_model_id:
            ident = self._model_id(job.result_model_id)
        else:  # the id its result will have: the version its line gives it
            ident = oa.fine_tuned_model_id(None, self._model_id(job.base_model_id), job.company_id.name, job.suffix,
                                           job.get_result_version())
        found = []
        for checkpoint in job.get_checkpoints():
            step, ref = checkpoint['step'], checkpoint['model_ref']
            found.append((step, ref if ref and ref.startswith('ft:') else '%s:ckpt-step-%d' % (ident, step),
                          checkpoint['metrics'], checkpoint['created']))
        out = []
        for step, model_ref, measured, created in found:
            metric = metrics.get(step)
            values = dict(measured, step=float(step))
            if metric and metric.has_train_loss:
                values['train_loss'] = metric.train_loss
            if metric and metric.has_valid_loss:
                values['valid_loss'] = metric.valid_loss
            if metric and metric.has_valid_token_accuracy:
                values['valid_mean_token_accuracy'] = metric.valid_token_accuracy
            out.append(oa.checkpoint_object(job.id, step, model_ref, values, created or oa.unix(job.write_date)))
        return out

    # -- models -----------------------------------------------------------------------------------------
    @_route('/v1/models', ['GET'])
    @endpoint
    def list_models(self, env, **kw):
        models = env['llm.model'].search([('state', '!=', 'archived')], order='id')
        return _json({'object': 'list', 'data': [self._model(m) for m in models]})

    @_route('/v1/models/<path:model_ident>', ['GET'])
    @endpoint
    def get_model(self, env, model_ident, **kw):
        return _json(self._model(self._find_model(env, model_ident)))

    @_route('/v1/models/<path:model_ident>', ['DELETE'])
    @endpoint
    def delete_model(self, env, model_ident, **kw):
        model = self._find_model(env, model_ident)
        if model.kind != 'fine_tuned':
            raise oa.ApiError(403, 'Model %s is a base model; only fine-tuned models can be deleted.' % model_ident,
                              code='insufficient_permissions')
        model.action_archive_model()
        return _json({'id': model_ident, 'object': 'model', 'deleted': True})

    def _model_id(self, model):
        """The model's API id: a name, never a folder path (see lib/api_v1/protocol.py)."""
        if model.kind != 'fine_tuned':
            return oa.base_model_id(model.model_ref, model.name)
        base = model.base_model_id
        base_name = oa.base_model_id(base.model_ref, base.name) if base else oa.slug(model.name)
        return oa.fine_tuned_model_id(model.model_ref, base_name, model.company_id.name or model.env.user.company_id.name,
                                      model.suffix, model.version)

    def _model(self, model):
        owner = _org(model.company_id or model.env.user.company_id) if model.kind == 'fine_tuned' \
            else oa.slug(model.provider_id.name)
        return oa.model_object(self._model_id(model), oa.unix(model.create_date), owner)

    def _find_model(self, env, ident, param=None):
        """The visible, not archived model with this API id (the oldest if two share it): a
        fine-tuned id of ours (its version last), else a technical id that is a name, else a base
        model's id or name. A folder path finds nothing: ids are names."""
        Model = env['llm.model']
        candidates = Model.browse()
        version = oa.fine_tuned_version(ident)
        if version is not None:
            candidates |= Model.search([('kind', '=', 'fine_tuned'), ('version', '=', version),
                                        ('state', '!=', 'archived')], order='id')
        if not os.path.isabs(ident):
            candidates |= Model.search([('model_ref', '=', ident), ('state', '!=', 'archived')], order='id')
        candidates |= Model.search([('kind', '=', 'base'), ('state', '!=', 'archived')], order='id')
        for model in candidates:
            if self._model_id(model) == ident:
                return model
        model = Model.search([('name', '=', ident), ('state', '!=', 'archived')], limit=1, order='id')
        if model:
            return model
        raise oa.ApiError(404, 'The model %r does not exist or you do not have access to it.' % ident,
                          param=param, code='model_not_found')

    # -- chat completions ------------------------------------------------------------------------------
    @_route('/v1/chat/completions', ['POST'])
    @endpoint
    def chat_completions(self, env, **kw):
        started = time.time()
        model_name, messages, options, stream, include_usage = oa.chat_request(
            oa.json_body(request.httprequest.get_data()))
        # Under workers > 0 the request is killed at limit_time_real: the answer ends before
        # that, cleanly, with finish_reason "length" (see README, Deploying).
        deadline = limits.deadline(tools.config, started, evented=odoo.evented)
        if deadline is not None:
            options['max_seconds'] = max(deadline - time.time(), 0.1)
        assistant = env['llm.assistant'].search([('name', '=', model_name)], limit=1)
        if assistant:  # a RAG assistant answers with retrieval (controllers/knowledge_api.py)
            from . import knowledge_api
            return knowledge_api.assistant_completion(env, assistant, model_name, messages, stream, include_usage)
        model = self._find_model(env, model_name, param='model')
        if not model.provider_id.can_chat:
            raise oa.ApiError(400, 'Model %s cannot chat: its provider "%s" serves no chat completions.'
                              % (model_name, model.provider_id.name), param='model', code='model_not_supported')
        completion_id = 'chatcmpl-%s' % uuid.uuid4().hex
        created = int(time.time())
        try:
            # a stream's request is sent (or refused) here, so a refusal is still an HTTP error
            answer = model.chat(messages, options, stream=stream)
        except InvalidServiceRequest as e:
            raise oa.ApiError(400, oa.without_paths(e.name), param='messages', code='invalid_request')
        except ServiceBusy as e:  # over the model server's waiting line: told at once, not held for minutes
            wait = e.seconds or 5
            raise _logged(429, 'The model server is busy; try again in %d s.' % wait, 'rate_limit_exceeded', e.name,
                          headers=[('Retry-After', str(wait))])
        except UserError as e:
            raise _logged(503, 'The model server failed.', 'model_server_error', e.name)
        if not stream and (options.get('n') or 1) > 1 and len(answer.get('choices') or ()) != options['n']:
            raise oa.ApiError(400, 'Model %s answers one choice at a time: n must be 1.' % model_name, param='n',
                              code='unsupported_parameter')  # its provider does not honour n
        if not stream:
            return _json(oa.completion_object(completion_id, created, model_name, answer))
        rid = v1_hooks.request_id()
        return Response(_stream(answer, model_name, include_usage, completion_id, created, rid), status=200,
                        headers=[('Content-Type', 'text/event-stream'), ('Cache-Control', 'no-cache'),
                                 ('X-Accel-Buffering', 'no'), ('x-request-id', rid)], direct_passthrough=True)


def _stream(items, model_name, include_usage, completion_id, created, rid):
    """Server-sent events of the adapter's items. This runs after the request's cursor is closed,
    so it touches no database: the adapter call was made (and its refusal answered) in the
    request; what is left is the model server's stream."""
    chunk = functools.partial(oa.chunk_object, completion_id, created, model_name, with_usage=include_usage)
    try:
        yield oa.sse(chunk(delta={'role': 'assistant', 'content': ''}))
        final = {}
        for piece in items:
            if 'delta' in piece:
                if piece['delta']:
                    yield oa.sse(chunk(delta={'content': piece['delta']}))
            else:
                final = piece
        yield oa.sse(chunk(finish_reason=final.get('finish_reason') or 'stop'))
        if include_usage:
            yield oa.sse(oa.chunk_object(completion_id, created, model_name, usage_chunk=oa.usage(final)))
    except (UserError, TrainingFailedError, TrainingRetryableError) as e:
        _logger.warning('OpenAI-compatible API %s: chat stream failed: %s', rid, getattr(e, 'name', None) or e)
        yield oa.sse(oa.error_body(500, 'The model server failed (request id %s).' % rid, code='model_server_error'))
    except Exception:
        _logger.exception('OpenAI-compatible API %s: chat stream failed', rid)
        yield oa.sse(oa.error_body(500, 'The server had an error while streaming (request id %s).' % rid,
                                   code='server_error'))
    finally:
        if hasattr(items, 'close'):
            items.close()  # a client that went away stops the generation
    yield oa.sse('[DONE]')


def _loads(text):
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None
