# -*- coding: utf-8 -*-
"""A scripted provider: each status check moves its job one step along a script chosen on the
provider, so the tests drive the whole workflow through the real engine, cron and ORM."""
import threading
import time

from odoo import fields, models

from odoo.addons.llm_training.lib import providers
from odoo.addons.llm_training.lib.exceptions import TrainingFailedError, TrainingRetryableError
from odoo.addons.llm_training.lib.providers.base import TrainingProvider

# The "remote service": runs by job key, visible to every worker at once (as a job folder, Ray's
# submission ids or OpenAI's job metadata are), so a repeated start finds its run.
_RUNS = {}
_RUNS_LOCK = threading.Lock()


@providers.register
class ScriptedProvider(TrainingProvider):
    service = 'test'
    capabilities = {'can_resume': True, 'tests_connection': True}

    def log(self, spec, method):
        self.config['log_call'](spec.job_id, method)

    def start(self, spec):
        key = '%s:%s' % (spec.database, spec.job_key)
        with _RUNS_LOCK:  # creating a run at the service is atomic, as it is at real ones
            if key in _RUNS:
                self.log(spec, 'adopt')
                return _RUNS[key]
            self.log(spec, 'start')
            if self.config['test_start_delay']:
                time.sleep(self.config['test_start_delay'])
            if self.config['test_behavior'] == 'fail_start':
                raise TrainingFailedError('test provider: start refused (quota exceeded)')
            if self.config['test_behavior'] == 'crash_start':
                raise RuntimeError('test provider: connection reset')
            _RUNS[key] = 'test-job-%d-%d' % (spec.job_id, spec.attempt)
        spec.provider_data['polls'] = 0
        return _RUNS[key]

    def check(self, spec):
        behavior, data = self.config['test_behavior'], spec.provider_data
        if behavior == 'instant':
            return {'status': 'running', 'progress': 50.0}
        self.log(spec, 'check')
        if behavior == 'retry_check':
            raise TrainingRetryableError('test provider: 503 Service Unavailable', seconds=5)
        if behavior == 'crash_check':
            raise ValueError('test provider: unexpected payload')
        if data.get('cancelled'):
            return {'status': 'cancelled', 'events': [{'id': 'ev-cancel', 'message': 'Job cancelled'}]}
        data['polls'] = polls = data.get('polls', 0) + 1
        if polls == 1:
            return {'status': 'queued', 'progress': 0.0,
                    'events': [{'id': 'ev-1', 'message': 'Job queued', 'created_at': 1700000000}]}
        if polls > 2 and behavior == 'hold':
            return {'status': 'running', 'progress': 50.0}  # nothing new to say
        if polls == 2 or behavior == 'hold':
            return {'status': 'running', 'progress': 50.0, 'step': 5, 'total_steps': 10, 'epoch': 1.0,
                    'events': [{'id': 'ev-1', 'message': 'Job queued'},
                               {'id': 'ev-2', 'message': 'Training started'}],
                    'metrics': [{'step': 1, 'train_loss': 2.5}, {'step': 5, 'train_loss': 1.5},
                                {'step': 5, 'valid_loss': 1.7}]}
        if behavior == 'fail_job':
            return {'status': 'failed', 'error': 'test provider: out of memory at step 7'}
        return {'status': 'succeeded', 'progress': 100.0, 'step': 10, 'total_steps': 10, 'epoch': 2.0,
                'trained_tokens': 1234, 'metrics': [{'step': 10, 'train_loss': 0.9}],
                'events': [{'id': 'ev-3', 'message': 'Job succeeded'}],
                'result': {'name': '%s (fine-tuned)' % spec.name, 'model_ref': 'test-ft-%d' % spec.job_id}}

    def cancel(self, spec):
        self.log(spec, 'cancel')
        spec.provider_data['cancelled'] = True

    def test_connection(self):
        if self.config['test_behavior'] == 'fail_start':
            raise TrainingFailedError('test provider: unreachable')
        return 'test provider answers'


@providers.register
class ScriptedChatProvider(ScriptedProvider):
    """The scripted provider that also chats, deterministically (the OpenAI-compatible API tests)."""
    service = 'test_chat'
    capabilities = dict(ScriptedProvider.capabilities, can_chat=True)

    def chat(self, model_ref, messages, options=None):
        """A deterministic answer: "<model_ref> heard: <last message>", one token per word,
        cut at max_tokens words or at a stop string."""
        options = options or {}
        words = ('%s heard: %s' % (model_ref, messages[-1]['content'])).split(' ')
        finish = 'stop'
        if options.get('max_tokens') and len(words) > options['max_tokens']:
            words, finish = words[:options['max_tokens']], 'length'
        text = ' '.join(words)
        for stop in options.get('stop') or ():
            if stop in text:
                text, finish = text[:text.index(stop)], 'stop'
        answer = {'text': text, 'finish_reason': finish, 'completion_tokens': len(text.split(' ')),
                  'prompt_tokens': sum(len(m['content'].split(' ')) for m in messages)}
        if (options.get('n') or 1) > 1:  # n answers, as the model server gives them
            answer['choices'] = [{'text': text, 'finish_reason': finish}] * options['n']
            answer['completion_tokens'] *= options['n']
        return answer

    def chat_stream(self, model_ref, messages, options=None):
        answer = self.chat(model_ref, messages, options)
        words = answer.pop('text').split(' ')
        return iter([{'delta': (' ' if i else '') + w} for i, w in enumerate(words)] + [answer])


class LlmProvider(models.Model):
    _inherit = 'llm.provider'

    service = fields.Selection(selection_add=[('test', 'Test (scripted)'), ('test_chat', 'Test (scripted, chats)')])
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

    def _adapter_config(self):
        config = super(LlmProvider, self)._adapter_config()
        # The service's own record of the calls it received, committed with the job's transaction.
        log_call = lambda job_id, method: self.env['llm.test.provider.call'].sudo().create(  # noqa: E731
            {'job_id': job_id, 'method': method})
        config.update(test_behavior=self.test_behavior, test_start_delay=self.test_start_delay, log_call=log_call)
        return config
