"""The API's protocol as plain functions (lib/api_v1/protocol.py), and its keys."""
import unittest

from odoo.exceptions import AccessError, UserError
from odoo.tests.common import TransactionCase

from odoo.addons.llm_training.lib.api_v1 import protocol as oa


def job(**values):
    base = {'id': 7, 'created_at': '2026-01-02 03:04:05', 'state': 'training', 'model': 'tiny',
            'fine_tuned_model': 'ft:tiny:org::9', 'training_file': 'file-1', 'validation_file': None, 'epochs': 0,
            'batch_size': 4, 'learning_rate_multiplier': 0.0, 'seed': 42, 'trained_tokens': 99,
            'error_message': None, 'finished_at': None, 'estimated_finish': None, 'organization_id': 'org-1',
            'method': 'supervised', 'metadata': None, 'suffix': None}
    base.update(values)
    return base


class TestProtocol(unittest.TestCase):

    def test_status_mapping_covers_every_state_with_schema_values(self):
        from odoo.addons.llm_training.lib.jobs.job_status import STATES
        self.assertEqual(set(oa.JOB_STATUS), {s for s, _ in STATES})
        self.assertLessEqual(set(oa.JOB_STATUS.values()),
                             {'validating_files', 'queued', 'running', 'succeeded', 'failed', 'cancelled'})

    def test_job_object(self):
        running = oa.job_object(job())
        self.assertEqual((running['id'], running['status'], running['created_at']), ('ftjob-7', 'running', 1767323045))
        self.assertEqual(running['hyperparameters'], {'n_epochs': 'auto', 'batch_size': 4,
                                                      'learning_rate_multiplier': 'auto'})
        self.assertIsNone(running['fine_tuned_model'], 'named once succeeded only')
        self.assertIsNone(running['trained_tokens'])
        failed = oa.job_object(job(state='failed', error_message='Dataset "x":\nline 3: bad'))
        self.assertEqual(failed['error'], {'code': 'invalid_training_file', 'message': 'Dataset "x":\nline 3: bad',
                                           'param': 'training_file'})
        done = oa.job_object(job(state='completed', finished_at='2026-01-02 04:00:00'))
        self.assertEqual((done['fine_tuned_model'], done['trained_tokens'], done['finished_at']),
                         ('ft:tiny:org::9', 99, 1767326400))

    def test_job_request_checks_before_anything_is_looked_up(self):
        spec = oa.job_request({'model': 'm', 'training_file': 'file-1', 'method': {
            'type': 'supervised', 'supervised': {'hyperparameters': {'n_epochs': 'auto', 'batch_size': 2,
                                                                     'learning_rate_multiplier': 0.5}}}})
        self.assertEqual(spec['settings'], {'epochs': 0, 'batch_size': 2, 'learning_rate_multiplier': 0.5})
        legacy = oa.job_request({'model': 'm', 'training_file': 'f', 'hyperparameters': {'n_epochs': 3}})
        self.assertEqual((legacy['settings'], legacy['method_param']), ({'epochs': 3}, 'hyperparameters'))
        for body, param in (({'training_file': 'f'}, 'model'),
                            ({'model': 'm', 'training_file': 'f', 'method': {'type': 'rl'}}, 'method.type'),
                            ({'model': 'm', 'training_file': 'f', 'hyperparameters': {'n_epochs': 0}},
                             'hyperparameters.n_epochs'),
                            ({'model': 'm', 'training_file': 'f', 'hyperparameters': {'epochz': 1}}, 'hyperparameters'),
                            ({'model': 'm', 'training_file': 'f', 'suffix': 'x' * 65}, 'suffix'),
                            ({'model': 'm', 'training_file': 'f', 'metadata': {'k': 1}}, 'metadata'),
                            ({'model': 'm', 'training_file': 'f', 'colour': 'red'}, 'colour')):
            with self.assertRaises(oa.ApiError) as caught:
                oa.job_request(body)
            self.assertEqual((caught.exception.status, caught.exception.param), (400, param), body)

    def test_errors_keys_ids(self):
        self.assertEqual(oa.ApiError(429, 'slow down', code='rate_limit_exceeded').body(),
                         {'error': {'message': 'slow down', 'type': 'rate_limit_exceeded', 'param': None,
                                    'code': 'rate_limit_exceeded'}})
        self.assertEqual(oa.bearer_key('Bearer sk-llmt-abc'), 'sk-llmt-abc')
        self.assertIsNone(oa.bearer_key('Basic abc'))
        self.assertEqual((oa.parse_id('ftjob-', 'ftjob-12'), oa.parse_id('ftjob-', 'ftjob-x'),
                          oa.parse_id('file-', 'ftjob-1')), (12, None, None))
        ident = oa.fine_tuned_model_id('/models/job-3/result', 'SmolLM2', 'My Company, Inc.', 'Support v2', 2)
        self.assertEqual(ident, 'ft:SmolLM2:my-company-inc:support-v2:2')
        self.assertEqual(oa.fine_tuned_version(ident), 2)
        self.assertEqual(oa.fine_tuned_model_id('/m', 'SmolLM2', 'Org', None, 3, step=40), 'ft:SmolLM2:org::3:ckpt-step-40')
        self.assertIsNone(oa.fine_tuned_version('ft:SmolLM2:org::3:ckpt-step-40'))
        self.assertEqual(oa.fine_tuned_model_id('ft:gpt-4o:org:x:abc', 'gpt-4o', 'o', 'x', 1), 'ft:gpt-4o:org:x:abc')

    def test_model_ids_are_names_never_folder_paths(self):
        self.assertEqual(oa.base_model_id('SmolLM2-135M-Instruct', 'SmolLM2'), 'SmolLM2-135M-Instruct')
        self.assertEqual(oa.base_model_id('HuggingFaceTB/SmolLM2-135M', 'Smol'), 'HuggingFaceTB/SmolLM2-135M')
        self.assertEqual(oa.base_model_id('/srv/models/SmolLM2-135M-Instruct', 'SmolLM2 135M'), 'smollm2-135m')
        self.assertEqual(oa.base_model_id('a:b', 'A B'), 'a-b')
        base = oa.base_model_id('/home/odoo/models/Qwen', 'Qwen 0.5B')
        self.assertNotIn('/home', oa.fine_tuned_model_id('/home/odoo/data/job-3/result', base, 'Org', 'x', 1))

    def test_errors_lose_their_paths(self):
        self.assertEqual(oa.without_paths('Generation failed: no model folder at /home/u/.cache/m-1/x (see /tmp/a/b.log)'),
                         'Generation failed: no model folder at <path> (see <path>)')
        kept = 'Unknown request URL: POST /v1, see https://example.com/v1/files or and/or a 1/2 ratio.'
        self.assertEqual(oa.without_paths(kept), kept)
        self.assertIsNone(oa.without_paths(None))
        failed = oa.job_object(job(state='failed', error_message='Trainer died: /srv/llm/db/job-7/train.log'))
        self.assertEqual(failed['error']['message'], 'Trainer died: <path>')
        event = oa.event_object({'id': 1, 'event_time': '2026-01-02 03:04:05', 'level': 'info',
                                 'message': 'folder /srv/llm/db/job-7 ready'})
        self.assertEqual(event['message'], 'folder <path> ready')

    def test_sniff_and_chat_request(self):
        self.assertEqual(oa.sniff_jsonl(b'{"messages": []}\n'), 'chat')
        self.assertEqual(oa.sniff_jsonl(b'{"input": {}, "preferred_output": [], "non_preferred_output": []}\n'),
                         'preference')
        for bad in (b'', b'a,b,c\n1,2,3\n', b'[1, 2]\n'):
            with self.assertRaises(oa.ApiError):
                oa.sniff_jsonl(bad)
        model, messages, options, stream, usage = oa.chat_request({
            'model': 'm', 'messages': [{'role': 'developer', 'content': [{'type': 'text', 'text': 'Hi'}]}],
            'max_tokens': 5, 'stop': 'x', 'stream': True, 'stream_options': {'include_usage': True}})
        # no temperature given: OpenAI's default of 1 (sampled), not the model server's greedy one
        self.assertEqual((messages, options, stream, usage),
                         ([{'role': 'system', 'content': 'Hi'}], {'max_tokens': 5, 'stop': ['x'], 'temperature': 1.0}, True, True))
        with self.assertRaises(oa.ApiError):
            oa.chat_request({'model': 'm', 'messages': [{'role': 'user', 'content': 'x'}], 'temperature': 3})

    def test_n_answers_ask_the_model_server_for_them_and_come_back_as_choices(self):
        question = [{'role': 'user', 'content': 'x'}]
        self.assertEqual(oa.chat_request({'model': 'm', 'messages': question, 'n': 3})[2]['n'], 3)
        self.assertNotIn('n', oa.chat_request({'model': 'm', 'messages': question, 'n': 1})[2])
        for bad in ({'n': 0}, {'n': 9}, {'n': '2'}, {'n': 2, 'stream': True}):
            with self.assertRaises(oa.ApiError) as refused:
                oa.chat_request(dict(bad, model='m', messages=question))
            self.assertEqual((refused.exception.status, refused.exception.param), (400, 'n'))
        answer = oa.completion_object('c', 1, 'm', {
            'text': 'a', 'finish_reason': 'stop', 'prompt_tokens': 5, 'completion_tokens': 7,
            'choices': [{'text': 'a', 'finish_reason': 'stop'}, {'text': 'b', 'finish_reason': 'length'}]})
        self.assertEqual([(c['index'], c['message']['content'], c['finish_reason']) for c in answer['choices']],
                         [(0, 'a', 'stop'), (1, 'b', 'length')])
        self.assertEqual(answer['usage'], {'prompt_tokens': 5, 'completion_tokens': 7, 'total_tokens': 12})


class TestApiKeys(TransactionCase):

    def test_wizard_shows_the_secret_once_and_stores_its_hash(self):
        wizard = self.env['llm.api.key.wizard'].create({'name': 'CI'})
        action = wizard.action_generate()
        secret = action['context']['default_secret']
        self.assertTrue(secret.startswith('sk-llmt-'))
        self.assertGreaterEqual(len(secret), 40)
        key = self.env['llm.api.key'].search([('name', '=', 'CI')])
        self.assertEqual(key.key_hash, oa.hash_key(secret))
        self.assertNotIn(secret, (key.key_prefix, wizard.secret or ''))
        self.assertEqual(key._authenticate(secret), (key.id, self.env.uid))
        key.active = False
        self.assertIsNone(key._authenticate(secret))

    def test_only_managers_make_keys_for_internal_users(self):
        user = self.env['res.users'].create({'name': 'U', 'login': 'key-user',
                                             'groups_id': [(6, 0, [self.env.ref('base.group_user').id])]})
        with self.assertRaises(AccessError):
            self.env['llm.api.key'].sudo(user)._generate('mine', user)
        with self.assertRaises(AccessError):
            self.env['llm.api.key'].sudo(user).search([])
        portal = self.env['res.users'].create({'name': 'P', 'login': 'key-portal',
                                               'groups_id': [(6, 0, [self.env.ref('base.group_portal').id])]})
        with self.assertRaises(UserError):
            self.env['llm.api.key']._generate('portal', portal)
