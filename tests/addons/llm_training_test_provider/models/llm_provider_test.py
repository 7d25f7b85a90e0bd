# -*- coding: utf-8 -*-
"""A scripted provider: each status check moves its job one step along a script chosen on the
provider, so the tests drive the whole workflow through the real dispatch, cron and ORM."""
import threading
import time

from odoo import fields, models

from odoo.addons.llm_training.lib.exceptions import TrainingFailedError, TrainingRetryableError

# The "remote service": runs by job key, visible to every worker at once (as a job folder, Ray's
# submission ids or OpenAI's job metadata are), so a repeated start finds its run.
_RUNS = {}
_RUNS_LOCK = threading.Lock()


class LlmProvider(models.Model):
    _inherit = 'llm.provider'

    service = fields.Selection(selection_add=[('test', 'Test (scripted)')])
    test_behavior = fields.Selection([
        ('succeed', 'queued -> running -> succeeded'),
        ('fail_job', 'queued -> running -> failed'),
        ('fail_start', 'start refused for good'),
        ('crash_start', 'start raises an unexpected error'),
        ('retry_check', 'status checks hit a transient error'),
        ('hold', 'queued -> running, and stays running'),
        ('instant', 'running at once, keeps nothing (the engine benchmark)'),
        ('crash_check', 'status checks raise an unexpected error'),
    ], default='succeed')
    test_start_delay = fields.Float(help='Seconds the start call sleeps, to widen race windows.')

    def _log_call(self, job, method):
        self.env['llm.test.provider.call'].sudo().create({'job_id': job.id, 'method': method})

    def _test_start_training_job(self, job):
        key = '%s:%s' % (self.env.cr.dbname, job.job_key)
        with _RUNS_LOCK:  # creating a run at the service is atomic, as it is at real ones
            if key in _RUNS:
                self._log_call(job, 'adopt')
                return _RUNS[key]
            self._log_call(job, 'start')
            if self.test_start_delay:
                time.sleep(self.test_start_delay)
            if self.test_behavior == 'fail_start':
                raise TrainingFailedError('test provider: start refused (quota exceeded)')
            if self.test_behavior == 'crash_start':
                raise RuntimeError('test provider: connection reset')
            _RUNS[key] = 'test-job-%d-%d' % (job.id, job.attempt)
        job._set_provider_data(polls=0)
        return _RUNS[key]

    def _test_check_training_job_status(self, job):
        if self.test_behavior == 'instant':
            return {'status': 'running', 'progress': 50.0}
        self._log_call(job, 'check')
        if self.test_behavior == 'retry_check':
            raise TrainingRetryableError('test provider: 503 Service Unavailable', seconds=5)
        if self.test_behavior == 'crash_check':
            raise ValueError('test provider: unexpected payload')
        data = job._get_provider_data()
        if data.get('cancelled'):
            return {'status': 'cancelled', 'events': [{'id': 'ev-cancel', 'message': 'Job cancelled'}]}
        polls = data.get('polls', 0) + 1
        job._set_provider_data(polls=polls)
        if polls == 1:
            return {'status': 'queued', 'progress': 0.0,
                    'events': [{'id': 'ev-1', 'message': 'Job queued', 'created_at': 1700000000}]}
        if polls > 2 and self.test_behavior == 'hold':
            return {'status': 'running', 'progress': 50.0}  # nothing new to say
        if polls == 2 or self.test_behavior == 'hold':
            return {'status': 'running', 'progress': 50.0, 'step': 5, 'total_steps': 10, 'epoch': 1.0,
                    'events': [{'id': 'ev-1', 'message': 'Job queued'},
                               {'id': 'ev-2', 'message': 'Training started'}],
                    'metrics': [{'step': 1, 'train_loss': 2.5}, {'step': 5, 'train_loss': 1.5},
                                {'step': 5, 'valid_loss': 1.7}]}
        if self.test_behavior == 'fail_job':
            return {'status': 'failed', 'error': 'test provider: out of memory at step 7'}
        return {'status': 'succeeded', 'progress': 100.0, 'step': 10, 'total_steps': 10, 'epoch': 2.0,
                'trained_tokens': 1234, 'metrics': [{'step': 10, 'train_loss': 0.9}],
                'events': [{'id': 'ev-3', 'message': 'Job succeeded'}],
                'result': {'name': '%s (fine-tuned)' % job.name, 'model_ref': 'test-ft-%d' % job.id}}

    def _test_cancel_training_job(self, job):
        self._log_call(job, 'cancel')
        job._set_provider_data(cancelled=True)
        return True
