"""The OpenAI-compatible API (/v1) driven by the newest `openai` SDK over real HTTP.

The SDK runs in the client venv (Python 3.11) as a subprocess (tests/clients/openai_sdk_driver.py)
that takes one command per line, so this test steps it and runs the cron between steps. Every
answer is checked against the reference OpenAPI schemas by the driver."""
import json
import os
import signal
import subprocess
import time
from unittest import mock

import odoo
from odoo import api
from odoo.tests.common import HttpCase

from odoo.addons.llm_training.controllers import openai_api as openai_api_controller
from odoo.addons.llm_training.lib.jobs import trainer_folder

from .common import jsonl, valid_examples
from .test_local_provider import code_word_examples
from .test_xmlrpc import ensure_http_server

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'clients', 'openai_sdk_driver.py')


def client_python():
    venv = os.environ.get('LLMT_CLIENT_VENV')
    python = venv and os.path.join(venv, 'bin', 'python')
    return python if python and os.path.exists(python) else None


class ApiCase(HttpCase):

    @classmethod
    def setUpClass(cls):
        ensure_http_server()
        super(ApiCase, cls).setUpClass()

    def setUp(self):
        super(ApiCase, self).setUp()
        # Odoo 11: requests run on the registry's test cursor, not on the test's own: work on it
        # too, so both see the same data; it is rolled back when the test leaves test mode.
        own_cr, own_env = self.cr, self.env
        self.cr = self.registry.test_cr
        self.env = api.Environment(self.cr, odoo.SUPERUSER_ID, {})
        self.addCleanup(setattr, self, 'cr', own_cr)  # the test's own cleanups use its own cursor
        self.addCleanup(setattr, self, 'env', own_env)
        if not client_python():
            self.skipTest('the client venv ($LLMT_CLIENT_VENV) is missing: run scripts/setup.sh')
        self.base_url = 'http://127.0.0.1:%d/v1' % odoo.tools.config['http_port']
        self.env['ir.config_parameter'].set_param('llm_training.api_requests_per_minute', '0')
        self.env['ir.config_parameter'].set_param('llm_training.api_running_jobs_per_company', '0')
        self.scripted = self.env['llm.provider'].create({'name': 'Scripted', 'service': 'test_chat',
                                                         'max_concurrent_jobs': 0})
        self.tiny = self.env['llm.model'].create({'name': 'Tiny', 'provider_id': self.scripted.id,
                                                  'model_ref': 'tiny-api', 'context_length': 2048})
        self.manager_key = self.make_key(self.env.ref('base.user_root'))
        self.driver = None

    def tearDown(self):
        if self.driver:
            self.driver.stdin.close()
            self.driver.wait(timeout=30)
        super(ApiCase, self).tearDown()

    def make_key(self, user, name='test'):
        return self.env['llm.api.key']._generate(name, user)[1]

    def start_driver(self):
        self.driver = subprocess.Popen([client_python(), DRIVER, self.base_url, self.manager_key],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True)

    def call(self, op, key=None, **args):
        """One SDK call: its result, or {'status', 'body'} of an error answer."""
        if not self.driver:
            self.start_driver()
        command = {'op': op, 'args': args}
        if key:
            command['key'] = key
        self.cr.commit()  # a test cursor's commit is a savepoint: what a failing request rolls back stays
        self.driver.stdin.write(json.dumps(command) + '\n')
        self.driver.stdin.flush()
        answer = json.loads(self.driver.stdout.readline())
        self.assertNotIn('exception', answer, answer.get('exception'))
        self.env['res.users'].invalidate_cache()
        return answer['ok'] if 'ok' in answer else answer['error']

    def ok(self, op, key=None, **args):
        result = self.call(op, key=key, **args)
        self.assertFalse(isinstance(result, dict) and 'status' in result and 'body' in result and
                         isinstance(result['body'], dict) and 'error' in result['body'], result)
        return result

    def refused(self, status, op, key=None, code=None, param=None, **args):
        result = self.call(op, key=key, **args)
        self.assertEqual(result.get('status'), status, result)
        error = result['body']['error']
        self.assertEqual(set(error), {'message', 'type', 'param', 'code'})
        if code:
            self.assertEqual(error['code'], code, error)
        if param:
            self.assertEqual(error['param'], param, error)
        return error

    def assert_no_violations(self):
        self.assertEqual(self.call('violations'), [])

    def upload(self, content, filename='train.jsonl', key=None):
        return self.call('upload', key=key, filename=filename, content=content.decode('utf-8'))

    def run_cron(self):
        self.env['llm.training.dataset']._cron_validate_uploaded()
        self.env['llm.training.job']._cron_sync_training_jobs()
        self.env['res.users'].invalidate_cache()

    def counts(self):
        return tuple(self.env[m].sudo().with_context(active_test=False).search_count([])
                     for m in ('llm.training.job', 'llm.training.dataset', 'ir.attachment', 'llm.model'))


class TestOpenAIApiRequests(ApiCase):
    """Files, jobs, paging, cancel, models on the scripted provider; every refused request."""

    def test_files_jobs_paging_cancel_models(self):
        file = self.upload(jsonl(valid_examples(12)))
        self.assertEqual((file['status'], file['purpose'], file['filename']), ('uploaded', 'fine-tune', 'train.jsonl'))
        self.run_cron()
        self.assertEqual(self.ok('file', id=file['id'])['status'], 'processed')
        self.assertIn('Question 3?', self.ok('file_content', id=file['id']))
        self.assertIn(file['id'], [f['id'] for f in self.ok('files')['data']])

        hyper = {'n_epochs': 2, 'batch_size': 'auto', 'learning_rate_multiplier': 0.5}
        jobs = [self.ok('create_job', model='tiny-api', training_file=file['id'], suffix='s%d' % i,
                        metadata={'team': 'red' if i % 2 else 'blue', 'n': str(i)},
                        method={'type': 'supervised', 'supervised': {'hyperparameters': hyper}})
                for i in range(3)]
        self.assertEqual(jobs[0]['status'], 'validating_files')
        self.assertEqual(jobs[0]['hyperparameters'], {'n_epochs': 2, 'batch_size': 'auto',
                                                      'learning_rate_multiplier': 0.5})
        record = self.env['llm.training.job'].browse(int(jobs[0]['id'].split('-')[1]))
        self.assertEqual((record.epochs, record.batch_size, record.learning_rate_multiplier), (2, 0, 0.5))
        # paging, newest first, and the SDK's auto-paging iterator
        first = self.ok('jobs', limit=2)
        self.assertEqual([j['id'] for j in first['data']], [jobs[2]['id'], jobs[1]['id']])
        self.assertTrue(first['has_more'])
        second = self.ok('jobs', limit=2, after=jobs[1]['id'])
        self.assertEqual(second['data'][0]['id'], jobs[0]['id'])
        self.assertEqual(self.ok('all_jobs', limit=1)[:3], [jobs[2]['id'], jobs[1]['id'], jobs[0]['id']])
        blue = self.ok('jobs', metadata={'team': 'blue'})
        self.assertEqual([j['id'] for j in blue['data']], [jobs[2]['id'], jobs[0]['id']])
        self.assertEqual(blue['data'][0]['metadata'], {'team': 'blue', 'n': '2'})

        # the scripted provider: queued -> running -> succeeded, with events and a fine-tuned model
        for _ in range(4):
            self.run_cron()
        done = self.ok('job', id=jobs[0]['id'])
        self.assertEqual(done['status'], 'succeeded', done)
        self.assertEqual(done['trained_tokens'], 1234)
        model_id = done['fine_tuned_model']
        self.assertRegex(model_id, r'^ft:tiny-api:[a-z0-9-]+:s0:\d+$')
        events = self.ok('events', id=jobs[0]['id'], limit=3)
        self.assertEqual(len(events['data']), 3)
        self.assertTrue(events['has_more'])
        older = self.ok('events', id=jobs[0]['id'], after=events['data'][-1]['id'], limit=100)
        messages = [e['message'] for e in events['data'] + older['data']]
        self.assertIn('Training started', messages)
        self.assertEqual(messages[0], 'State: Completed')

        # models: the fine-tuned one is listed, read, then deleted (archived)
        self.assertIn(model_id, [m['id'] for m in self.ok('models')])
        self.assertEqual(self.ok('model', id=model_id)['id'], model_id)
        self.assertEqual(self.ok('delete_model', id=model_id), {'id': model_id, 'object': 'model', 'deleted': True})
        self.assertEqual(record.result_model_id.with_context(active_test=False).state, 'archived')
        self.refused(404, 'model', id=model_id, code='model_not_found')
        self.refused(403, 'delete_model', id='tiny-api')

        # cancel a running job; a finished one cannot be
        self.scripted.test_behavior = 'hold'
        held = self.ok('create_job', model='tiny-api', training_file=file['id'])
        for _ in range(3):
            self.run_cron()
        self.assertEqual(self.ok('job', id=held['id'])['status'], 'running')
        cancelled = self.ok('cancel', id=held['id'])
        self.assertEqual(cancelled['status'], 'cancelled')
        self.refused(409, 'cancel', id=held['id'], code='invalid_state')
        self.refused(404, 'pause', id=held['id'], code='unknown_url')  # not offered
        # a file used by a job stays; an unused one is deleted with its attachment
        self.refused(409, 'delete_file', id=file['id'])
        spare = self.upload(jsonl(valid_examples(3)), filename='spare.jsonl')
        self.assertEqual(self.ok('delete_file', id=spare['id'])['deleted'], True)
        self.refused(404, 'file', id=spare['id'])
        self.assert_no_violations()

    def test_chat_completions(self):
        messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'one two three'}]
        reply = self.ok('chat', model='tiny-api', messages=messages, temperature=0, seed=1)
        self.assertEqual(reply['choices'][0]['message'], {'role': 'assistant', 'content': 'tiny-api heard: one two three',
                                                          'refusal': None, 'annotations': None, 'audio': None,
                                                          'function_call': None, 'tool_calls': None})
        self.assertEqual((reply['choices'][0]['finish_reason'], reply['usage']['total_tokens']), ('stop', 5 + 5))
        cut = self.ok('chat', model='tiny-api', messages=messages, max_completion_tokens=2)
        self.assertEqual((cut['choices'][0]['message']['content'], cut['choices'][0]['finish_reason']),
                         ('tiny-api heard:', 'length'))
        chunks = self.ok('chat_stream', model='tiny-api', messages=messages, stop=[' three'],
                         stream_options={'include_usage': True})
        self.assertEqual(chunks[0]['choices'][0]['delta']['role'], 'assistant')
        self.assertEqual(''.join(c['choices'][0]['delta'].get('content') or '' for c in chunks if c['choices']),
                         'tiny-api heard: one two')
        self.assertEqual(chunks[-2]['choices'][0]['finish_reason'], 'stop')
        self.assertEqual((chunks[-1]['choices'], chunks[-1]['usage']['completion_tokens']), ([], 4))
        plain = self.ok('chat_stream', model='tiny-api', messages=messages)
        self.assertNotIn('usage', plain[-1])
        two = self.ok('chat', model='tiny-api', messages=messages, n=2)
        self.assertEqual([(c['index'], c['message']['content']) for c in two['choices']],
                         [(0, 'tiny-api heard: one two three'), (1, 'tiny-api heard: one two three')])
        self.assertEqual(two['usage']['completion_tokens'], 2 * 5)
        self.refused(400, 'chat', model='tiny-api', messages=messages, n=9, param='n')
        self.refused(404, 'chat', model='nope', messages=messages, code='model_not_found')
        mute = self.env['llm.provider'].create({'name': 'Mute', 'service': 'test'})
        self.env['llm.model'].create({'name': 'Mute', 'provider_id': mute.id, 'model_ref': 'mute-1'})
        self.refused(400, 'chat', model='mute-1', messages=messages, code='model_not_supported')
        self.assert_no_violations()

    def test_dpo_goes_to_a_provider_that_trains_it(self):
        openai_provider = self.env['llm.provider'].create({'name': 'OpenAI', 'service': 'openai'})
        self.env['llm.model'].create({'name': 'GPT-4o mini', 'provider_id': openai_provider.id,
                                      'model_ref': 'gpt-4o-mini-api-test'})
        pairs = [{'input': {'messages': [{'role': 'user', 'content': 'Q%d?' % i}]},
                  'preferred_output': [{'role': 'assistant', 'content': 'Short %d.' % i}],
                  'non_preferred_output': [{'role': 'assistant', 'content': 'Long and rambling %d.' % i}]}
                 for i in range(12)]
        file = self.upload(jsonl(pairs), filename='pairs.jsonl')
        self.refused(400, 'create_job', model='gpt-4o-mini-api-test', training_file=file['id'], param='training_file',
                     code='invalid_file_format')
        job = self.ok('create_job', model='gpt-4o-mini-api-test', training_file=file['id'],
                      method={'type': 'dpo', 'dpo': {'hyperparameters': {'beta': 0.2, 'n_epochs': 1}}})
        self.assertEqual(job['method']['type'], 'dpo')
        self.assertEqual(job['hyperparameters'], {'n_epochs': 1, 'batch_size': 'auto',
                                                  'learning_rate_multiplier': 'auto', 'beta': 0.2})
        record = self.env['llm.training.job'].browse(int(job['id'].split('-')[1]))
        self.assertEqual((record.provider_id, record._get_hyperparameters()['dpo_beta']), (openai_provider, 0.2))
        self.assert_no_violations()

    def test_refused_requests_are_openai_errors_and_leave_nothing(self):
        good = self.upload(jsonl(valid_examples(12)))
        self.run_cron()
        user = self.env['res.users'].create({'name': 'Reader', 'login': 'api-reader',
                                             'groups_id': [(6, 0, [self.env.ref('base.group_user').id])]})
        reader_key = self.make_key(user)
        other_company = self.env['res.company'].create({'name': 'Other Co'})
        outsider = self.env['res.users'].create({
            'name': 'Outsider', 'login': 'api-outsider', 'company_id': other_company.id,
            'company_ids': [(6, 0, other_company.ids)],
            'groups_id': [(6, 0, [self.env.ref('llm_training.group_llm_manager').id])]})
        outsider_key = self.make_key(outsider)
        inactive_key = self.make_key(user, name='revoked')
        self.env['llm.api.key'].search([('name', '=', 'revoked')]).active = False
        job = self.ok('create_job', model='tiny-api', training_file=good['id'])
        before = self.counts()

        missing = self.call('raw', method='GET', path='/fine_tuning/jobs')
        self.assertEqual((missing['status'], missing['body']['error']['code']), (401, 'missing_api_key'))
        self.refused(401, 'jobs', key='sk-llmt-wrong', code='invalid_api_key')
        self.refused(401, 'jobs', key=inactive_key, code='invalid_api_key')
        # an internal user reads but cannot create or cancel
        self.assertIn(job['id'], [j['id'] for j in self.ok('jobs', key=reader_key)['data']])
        self.refused(403, 'create_job', key=reader_key, model='tiny-api', training_file=good['id'])
        self.refused(403, 'cancel', key=reader_key, id=job['id'])
        self.refused(403, 'upload', key=reader_key, filename='x.jsonl', content=jsonl(valid_examples(2)).decode())
        # another company's job and file do not exist for this key
        self.refused(404, 'job', key=outsider_key, id=job['id'], code='fine_tuning_job_not_found')
        self.refused(404, 'file', key=outsider_key, id=good['id'])
        self.assertEqual(self.ok('jobs', key=outsider_key)['data'], [])
        self.refused(404, 'create_job', key=outsider_key, model='tiny-api-missing', training_file=good['id'],
                     param='model')
        # malformed JSON, a non-JSONL file, an unknown model, an unknown hyperparameter, DPO here
        malformed = self.call('raw', method='POST', path='/fine_tuning/jobs', bearer=self.manager_key,
                              content='{"model": "tiny-api", ', headers={'Content-Type': 'application/json'})
        self.assertEqual((malformed['status'], malformed['body']['error']['code']), (400, 'invalid_json'))
        self.refused(400, 'upload', filename='notes.txt', content='Just some notes,\nnot JSON.\n',
                     code='invalid_file_format', param='file')
        self.refused(404, 'create_job', model='gpt-9', training_file=good['id'], code='model_not_found', param='model')
        self.refused(400, 'create_job', model='tiny-api', training_file=good['id'],
                     method={'type': 'supervised', 'supervised': {'hyperparameters': {'n_epochz': 2}}},
                     code='invalid_hyperparameter', param='method.supervised.hyperparameters')
        self.refused(400, 'create_job', model='tiny-api', training_file=good['id'],
                     method={'type': 'dpo', 'dpo': {'hyperparameters': {'beta': 0.1}}}, param='method.type')
        self.refused(404, 'create_job', model='tiny-api', training_file='file-999999', param='training_file')
        # an oversized file: refused before it is stored
        odoo.tools.config['llm_training_max_file_bytes'] = 2000
        try:
            self.refused(413, 'upload', filename='big.jsonl', content=jsonl(valid_examples(100)).decode(),
                         code='file_too_large')
        finally:
            del odoo.tools.config.options['llm_training_max_file_bytes']
        self.assertEqual(self.counts(), before, 'a refused request created something')

        # limits: running jobs per company, requests per key and minute
        self.env['ir.config_parameter'].set_param('llm_training.api_running_jobs_per_company', '1')
        self.refused(429, 'create_job', model='tiny-api', training_file=good['id'], code='rate_limit_exceeded')
        self.env['ir.config_parameter'].set_param('llm_training.api_requests_per_minute', '2')
        limited = self.make_key(self.env.ref('base.user_root'), name='limited')
        with mock.patch.object(openai_api_controller, 'rate_clock', lambda: 1800000010.0):  # all in one minute
            self.ok('jobs', key=limited)
            self.ok('jobs', key=limited)
            self.refused(429, 'jobs', key=limited, code='rate_limit_exceeded')
        self.assertEqual(self.counts(), before)
        # the key is stored hashed, shown nowhere
        stored = self.env['llm.api.key'].search([('name', '=', 'limited')])
        self.assertNotIn(limited, (stored.key_hash, stored.key_prefix))
        self.assertTrue(stored.last_used)
        self.assert_no_violations()


class TestOpenAIApiTraining(ApiCase):
    """The SDK fine-tunes SmolLM2 for real on the local trainer and reads the result."""

    def test_sdk_fine_tunes_for_real(self):
        local = self.env['llm.provider'].create({'name': 'Local API', 'service': 'local', 'max_concurrent_jobs': 1})
        # the demo's SmolLM2 (other provider) is hidden so the model name is ours
        self.env['llm.model'].search([('model_ref', '=', 'SmolLM2-135M-Instruct')]).write({'active': False})
        smol = self.env['llm.model'].create({'name': 'SmolLM2', 'provider_id': local.id,
                                             'model_ref': 'SmolLM2-135M-Instruct', 'context_length': 8192})
        self.addCleanup(self.kill_trainers, local)
        self.addCleanup(local._adapter().model_server().stop)  # the chat below starts it
        file = self.upload(jsonl(code_word_examples(16)), filename='codes.jsonl')
        job = self.ok('create_job', model='SmolLM2-135M-Instruct', training_file=file['id'], suffix='codes', seed=3,
                      metadata={'purpose': 'api-test'},
                      method={'type': 'supervised', 'supervised': {'hyperparameters': {
                          'n_epochs': 2, 'batch_size': 4, 'learning_rate_multiplier': 5,
                          'max_seq_length': 128, 'validation_split': 0.25}}})
        self.assertEqual(job['model'], 'SmolLM2-135M-Instruct')
        record = self.env['llm.training.job'].browse(int(job['id'].split('-')[1]))
        self.assertEqual((record.provider_id, record.base_model_id, record.max_seq_length), (local, smol, 128))
        seen = set()
        status = job['status']
        for _ in range(600):
            self.run_cron()
            status = self.ok('job', id=job['id'])['status']
            seen.add(status)
            if status in ('succeeded', 'failed', 'cancelled'):
                break
            time.sleep(1)
        final = self.ok('job', id=job['id'])
        self.assertEqual(final['status'], 'succeeded', '%s\n%s' % (final, record.log))
        self.assertIn('running', seen)
        self.assertGreater(final['trained_tokens'], 0)
        self.assertTrue(final['fine_tuned_model'].startswith('ft:SmolLM2-135M-Instruct:'))
        events = self.ok('events', id=job['id'], limit=100)['data']
        self.assertIn('State: Completed', [e['message'] for e in events])
        checkpoints = self.ok('checkpoints', id=job['id'])['data']
        self.assertTrue(checkpoints)
        self.assertTrue(checkpoints[0]['fine_tuned_model_checkpoint'].startswith(final['fine_tuned_model'] + ':ckpt-step-'))
        self.assertIn('train_loss', checkpoints[0]['metrics'])
        self.assertIn(final['fine_tuned_model'], [m['id'] for m in self.ok('models')])
        if local.can_chat:
            reply = self.ok('chat', model=final['fine_tuned_model'], max_tokens=16, temperature=0,
                            messages=[{'role': 'user', 'content': 'What is the code word number 2?'}])
            self.assertIn('MANGO', reply['choices'][0]['message']['content'])
            chunks = self.ok('chat_stream', model=final['fine_tuned_model'], max_tokens=16, temperature=0,
                             stream_options={'include_usage': True},
                             messages=[{'role': 'user', 'content': 'What is the code word number 2?'}])
            self.assertIn('MANGO', ''.join((c['choices'][0]['delta'].get('content') or '') for c in chunks if c['choices']))
            self.assertGreater(chunks[-1]['usage']['completion_tokens'], 0)
            # a prompt over the model's context is the request's fault: a 400, not a server failure
            self.refused(400, 'chat', model=final['fine_tuned_model'], code='invalid_request', param='messages',
                         messages=[{'role': 'user', 'content': 'word ' * 9000}])
        self.assert_no_violations()

    def kill_trainers(self, provider):
        for job in self.env['llm.training.job'].search([('provider_id', '=', provider.id)]):
            data = job._get_provider_data()
            if trainer_folder.is_alive(data.get('pid'), data.get('start_time')):
                os.killpg(data['pid'], signal.SIGKILL)
