"""The OpenAI provider: the real openai SDK over real HTTP against a local, stateful
OpenAI-compatible server (tests/openai_fake_server.py) that checks every request and response
against OpenAI's published schema."""
import json

from odoo.exceptions import UserError
from odoo.tests.common import SavepointCase

from odoo.addons.llm_training.lib.providers import openai_fine_tuning
from odoo.addons.llm_training.user_errors import JobRefused

from .common import TrainingCase, chat, jsonl
from .openai_fake_server import FakeOpenAI
from .test_dataset_validator import preference
from .openapi_contract import load_contract

API_KEY = 'sk-llmt-test-0123456789abcdefSECRET'
CONTRACT = load_contract()


class OpenAICase(TrainingCase):

    @classmethod
    def setUpClass(cls):
        super(OpenAICase, cls).setUpClass()
        cls.openai = cls.env['llm.provider'].create({
            'name': 'OpenAI (local server)', 'service': 'openai', 'api_key': API_KEY, 'request_timeout': 30,
            'max_concurrent_jobs': 0})
        cls.gpt = cls.env['llm.model'].create({'name': 'GPT-4o mini', 'provider_id': cls.openai.id,
                                               'model_ref': 'gpt-4o-mini-2024-07-18', 'context_length': 65536,
                                               'training_price': 3.0})

    def setUp(self):
        super(OpenAICase, self).setUp()
        self.server = FakeOpenAI(API_KEY, CONTRACT).start()
        self.addCleanup(self.server.stop)
        self.openai.base_url = self.server.base_url

    def tearDown(self):
        self.assertEqual(self.server.violations, [], 'traffic broke OpenAI\'s schema')
        super(OpenAICase, self).tearDown()

    def make_openai_job(self, **values):
        values.setdefault('base_model_id', self.gpt.id)
        return self.make_job(provider=self.openai, **values)

    def remote(self, job):
        return self.server.jobs[job.external_job_id]

    def enterContext(self, context):
        result = context.__enter__()
        self.addCleanup(context.__exit__, None, None, None)
        return result

    def assertNoKey(self, job, key):
        texts = [job.error_message or '', job.log or ''] + job.event_ids.mapped('message') + \
            job.message_ids.mapped('body')
        for text in texts:
            self.assertNotIn(key, text)
            self.assertNotIn(key[-4:], text, 'not even the masked key OpenAI echoes')


class TestOpenAIWorkflow(OpenAICase):

    def test_happy_path_to_completed_with_model_registered(self):
        job = self.make_openai_job(suffix='support-bot', epochs=2, batch_size=0, validation_split=0.25, seed=7)
        job.action_submit()
        self.run_cron()  # validate, prepare, upload, create
        self.assertEqual(job.state, 'queued', job.error_message)
        remote = self.remote(job)
        self.assertEqual(remote['model'], 'gpt-4o-mini-2024-07-18')
        self.assertEqual(remote['method'], {'type': 'supervised', 'supervised': {'hyperparameters': {
            'n_epochs': 2, 'batch_size': 'auto', 'learning_rate_multiplier': 'auto'}}})
        self.assertEqual(remote['metadata'], {'odoo_job_id': str(job.id), 'odoo_database': self.env.cr.dbname,
                                              'llm_training_job_key': job.job_key})
        self.assertEqual((remote['_suffix'], remote['seed']), ('support-bot', 7))
        files = self.server.files
        self.assertEqual(files[remote['training_file']]['purpose'], 'fine-tune')
        self.assertEqual(len(files[remote['training_file']]['content'].splitlines()), job.train_examples)
        self.assertEqual(len(files[remote['validation_file']]['content'].splitlines()), job.validation_examples)
        self.assertEqual((job.train_examples + job.validation_examples, bool(job.validation_examples)), (12, True))
        self.run_cron(2)  # validating_files -> queued -> running
        self.assertEqual(job.state, 'training')
        self.assertTrue(job.estimated_finish)
        self.run_cron(4)
        self.assertEqual(job.state, 'completed', job.error_message)
        self.assertEqual(job.metric_ids.mapped('step'), list(range(1, 11)))
        self.assertAlmostEqual(job.metric_ids.filtered(lambda m: m.step == 5).valid_loss, 0.44)
        self.assertEqual((job.current_step, job.total_steps, job.progress), (10, 10, 100.0))
        messages = job.event_ids.mapped('message')
        self.assertIn('Fine-tuning job started', messages)
        self.assertEqual(len(job.event_ids.filtered('external_id')), len(self.server.events[remote['id']]),
                         'each OpenAI event once')
        model = job.result_model_id
        self.assertEqual((model.kind, model.model_ref, model.base_model_id, model.provider_id),
                         ('fine_tuned', remote['fine_tuned_model'], self.gpt, self.openai))
        self.assertEqual(job.trained_tokens, remote['trained_tokens'])
        self.assertAlmostEqual(job.final_cost, remote['trained_tokens'] * 3.0 / 1e6, places=4)
        checkpoints = job._get_provider_data()['checkpoints']
        self.assertEqual([c['step'] for c in checkpoints], [5, 10])
        job.action_register_checkpoints()
        step5 = self.env['llm.model'].search([('model_ref', '=', checkpoints[0]['model_ref'])])
        self.assertEqual((step5.kind, step5.job_id, step5.base_model_id), ('fine_tuned', job, self.gpt))
        self.assertIn('step 5', step5.name)
        self.run_cron()
        self.assertEqual(self.server.count('GET', r'^/fine_tuning/jobs/[^/]+$'), 5, 'a completed job is not polled')

    def test_events_are_paginated_and_read_once(self):
        self.server.max_page_size = 3
        self.server.steps_per_read = 10
        job = self.make_openai_job()
        job.action_submit()
        self.run_cron(4)
        self.assertEqual(job.state, 'completed', job.error_message)
        self.assertEqual(job.metric_ids.mapped('step'), list(range(1, 11)))
        self.assertGreater(self.server.count('GET', r'/events$'), 5, 'several pages were read')
        remote_ids = [e['id'] for e in self.server.events[job.external_job_id]]
        local = job.event_ids.filtered('external_id').sorted('id')
        self.assertEqual(local.mapped('external_id'), remote_ids, 'all of them, once, oldest first')

    def test_unknown_status_keeps_the_job_where_it_is(self):
        self.server.hold_status, self.server.hold_reads = 'paused', 2
        job = self.make_openai_job()
        job.action_submit()
        self.run_cron(3)
        self.assertEqual(job.state, 'training')
        self.run_cron()
        self.assertEqual((job.state, self.remote(job)['status']), ('training', 'paused'))
        self.assertIn('OpenAI reports the job as paused.', job.event_ids.mapped('message'))
        self.run_cron(5)
        self.assertEqual(job.state, 'completed', job.error_message)
        # OpenAI's schema lists six statuses; "paused" is not among them. Our server broke it on purpose.
        self.assertTrue(all("'paused' is not one of" in v for v in self.server.violations), self.server.violations)
        self.server.violations[:] = []
        from odoo.addons.llm_training.lib.providers.openai_mapping import provider_status
        self.assertEqual(provider_status('fine_tuning_v9_status', 'running')[0], 'running')

    def test_cancel_waits_for_openai_to_confirm(self):
        self.server.cancel_delay_reads = 2
        self.server.steps_per_read = 1
        job = self.make_openai_job()
        job.action_submit()
        self.run_cron(3)
        self.assertEqual(job.state, 'training')
        job.action_cancel()
        self.assertEqual((job.state, job.cancel_requested), ('training', True), 'not cancelled before OpenAI says so')
        self.assertEqual(self.server.count('POST', r'/cancel$'), 1)
        self.run_cron()
        self.assertEqual(job.state, 'training')
        self.run_cron()
        self.assertEqual((job.state, self.remote(job)['status']), ('cancelled', 'cancelled'))
        self.assertIn('Fine-tuning job cancelled', job.event_ids.mapped('message'))

    def test_failed_at_openai_gives_its_error(self):
        self.server.outcome = 'failed'
        job = self.make_openai_job()
        job.action_submit()
        self.run_cron(6)
        self.assertEqual(job.state, 'failed')
        self.assertIn('invalid training file', job.error_message)
        self.assertIn('field training_file', job.error_message)


    def test_preference_dataset_trains_with_dpo(self):
        dataset = self.make_dataset(jsonl([preference(i) for i in range(10)]), name='pairs.jsonl')
        dataset.data_format = 'preference'
        job = self.make_openai_job(dataset=dataset, hyperparameters='{"dpo_beta": 0.3}')
        job.action_submit()
        self.run_cron()
        self.assertEqual(job.state, 'queued', job.error_message)
        self.assertEqual(self.remote(job)['method'], {'type': 'dpo', 'dpo': {'hyperparameters': {
            'n_epochs': 3, 'batch_size': 4, 'learning_rate_multiplier': 'auto', 'beta': 0.3}}})
        uploaded = self.server.files[self.remote(job)['training_file']]['content'].splitlines()
        self.assertEqual(json.loads(uploaded[0]), preference(0))

    def test_chat_and_preference_datasets_do_not_mix(self):
        pairs = self.make_dataset(jsonl([preference(i) for i in range(10)]), name='pairs.jsonl')
        pairs.data_format = 'preference'
        job = self.make_openai_job(validation_dataset_ids=[(6, 0, pairs.ids)])
        with self.assertRaisesRegex(JobRefused, 'mix chat and preference'):
            job.action_submit()
        self.assertEqual(job.state, 'draft')


class TestOpenAIFaults(OpenAICase):

    def test_rate_limit_then_success_within_one_run(self):
        self.server.inject('POST', r'^/fine_tuning/jobs$', 429)
        job = self.make_openai_job()
        job.action_submit()
        self.run_cron()
        self.assertEqual((job.state, job.retry_count), ('queued', 0), job.error_message)
        self.assertTrue(job.external_job_id)
        self.assertEqual(self.server.count('POST', r'^/fine_tuning/jobs$'), 2, 'the SDK retried once')

    def test_server_errors_keep_training_then_complete(self):
        job = self.make_openai_job()
        job.action_submit()
        self.run_cron(3)
        self.assertEqual(job.state, 'training')
        # More 500s than the SDK retries, for more cron runs than the retry limit.
        self.server.inject('GET', r'^/fine_tuning/jobs/[^/]+$', 500, times=(openai_fine_tuning.MAX_RETRIES + 1) * 6)
        for attempt in range(6):
            job.write({'next_attempt_at': False})
            self.run_cron()
            self.assertEqual(job.state, 'training', job.error_message)
        self.assertEqual(job.retry_count, 6)
        self.assertIn('HTTP 500', job.event_ids.sorted('id')[-1].message)
        job.write({'next_attempt_at': False})
        self.run_cron(4)
        self.assertEqual(job.state, 'completed', job.error_message)
        self.assertEqual(job.retry_count, 0)

    def test_timeout_is_retried(self):
        self.openai.request_timeout = 1  # this test's alone: a short wait elsewhere turns a slow answer into a retry
        self.server.timeout_seconds = 2.5
        self.server.inject('GET', r'^/files/[^/]+$', 'timeout')
        job = self.make_openai_job()
        job.action_submit()
        self.run_cron()
        self.assertEqual(job.state, 'queued', job.error_message)
        self.assertTrue(job.external_job_id)

    def test_bad_key_fails_clearly_without_the_key(self):
        self.openai.api_key = 'sk-wrong-key-that-leaks-9999'
        job = self.make_openai_job()
        job.action_submit()
        self.run_cron()
        self.assertEqual(job.state, 'failed')
        self.assertIn('HTTP 401', job.error_message)
        self.assertIn('Check the API key of provider', job.error_message)
        self.assertNoKey(job, 'sk-wrong-key-that-leaks-9999')

    def test_job_creation_refused_deletes_the_uploads(self):
        self.server.inject('POST', r'^/fine_tuning/jobs$', 400, message='Invalid suffix', code='invalid_suffix')
        job = self.make_openai_job(validation_split=0.25)
        job.action_submit()
        self.run_cron()
        self.assertEqual(job.state, 'failed')
        self.assertIn('Invalid suffix', job.error_message)
        self.assertEqual(self.server.count('POST', r'^/files$'), 2)
        self.assertEqual(self.server.count('DELETE', r'^/files/'), 2)
        self.assertEqual(self.server.files, {}, 'nothing left at OpenAI')

    def test_file_not_processed_yet_is_checked_again_with_the_same_upload(self):
        self.server.file_processing_reads = 3
        job = self.make_openai_job()
        job.action_submit()
        self.run_cron()
        # no waiting in the cron: the job waits, holding its upload and its slot
        self.assertEqual((job.state, job.retry_count, job.start_pending, job.external_job_id),
                         ('queued', 1, True, False))
        self.assertEqual(len(self.server.files), 1)
        for _pass in range(2):
            job._write_workflow({'next_attempt_at': False})
            self.run_cron()
        self.assertTrue(job.external_job_id)
        self.assertFalse(job.start_pending)
        self.assertEqual(self.server.count('POST', r'^/files$'), 1, 'uploaded once')
        self.assertEqual(self.remote(job)['training_file'], list(self.server.files)[0])

    def test_repeated_start_of_an_attempt_finds_its_openai_job(self):
        job = self.make_openai_job()
        job.action_submit()
        self.run_cron()
        created = job.external_job_id
        self.assertTrue(created)
        # as if the transaction that recorded the start had been lost after the call
        job._write_workflow({'external_job_id': False, 'start_pending': True})
        self.run_cron()
        self.assertEqual(job.external_job_id, created)
        self.assertEqual(self.server.count('POST', r'^/fine_tuning/jobs$'), 1, 'no second OpenAI job')
        self.assertIn('adopted', ' '.join(job.event_ids.mapped('message')))

    def test_file_rejected_by_openai_fails_the_job(self):
        self.server.file_status_final = 'error'
        job = self.make_openai_job()
        job.action_submit()
        self.run_cron()
        self.assertEqual(job.state, 'failed')
        self.assertIn('line 3 is not valid JSON', job.error_message)
        self.assertEqual(self.server.files, {})

    def test_no_key_fails_at_validating(self):
        self.openai.action_clear_api_key()
        job = self.make_openai_job()
        job.action_submit()
        self.run_cron()
        self.assertEqual(job.state, 'failed')
        self.assertIn('has no API key', job.error_message)
        self.assertEqual(self.server.requests, [])


class TestOpenAIModelsAndTokens(OpenAICase):

    def test_fetch_models(self):
        job = self.make_openai_job()
        job.action_submit()
        self.run_cron(7)
        self.assertEqual(job.state, 'completed')
        job.result_model_id.unlink()
        self.openai.action_fetch_models()
        models = {m.model_ref: m for m in self.openai.model_ids}
        self.assertIn('gpt-3.5-turbo-0125', models)
        fine_tuned = models[self.remote(job)['fine_tuned_model']]
        self.assertEqual((fine_tuned.kind, fine_tuned.base_model_id), ('fine_tuned', self.gpt))
        self.openai.action_fetch_models()
        self.assertEqual(len(self.openai.model_ids), len(models), 'fetching twice adds nothing')

    def test_fetch_models_with_a_bad_key_is_a_clear_error(self):
        self.openai.api_key = 'sk-nope-0000'
        with self.assertRaisesRegex(UserError, 'HTTP 401'):
            self.openai.action_fetch_models()

    def test_tokens_counted_with_tiktoken_and_cost_estimated(self):
        counter = self.openai._adapter().token_counter(self.gpt.model_ref)
        try:
            # 3 (frame) + 1 ("user") + 2 ("Hello world") + 3 (reply priming)
            self.assertEqual(counter([{'role': 'user', 'content': 'Hello world'}]), 9)
        finally:
            counter.close()
        examples = [chat('Hello world', 'Hi') for _ in range(10)]
        dataset = self.make_dataset(jsonl(examples))
        dataset._validate(self.gpt)
        per_example = 3 + 1 + 2 + 3 + 1 + 1  # + assistant frame, role and "Hi"
        self.assertEqual(dataset.token_total, 10 * (per_example + 3))
        job = self.make_openai_job(dataset=dataset, epochs=0)
        self.assertEqual(job.estimated_epochs, 10, 'auto: at least 100 examples seen, so 10 epochs of 10')
        self.assertAlmostEqual(job.estimated_cost, dataset.token_total * 10 * 3.0 / 1e6, places=4)
        job.epochs = 2
        self.assertAlmostEqual(job.estimated_cost, dataset.token_total * 2 * 3.0 / 1e6, places=4)


class TestOpenAIContract(SavepointCase):

    def test_server_checks_traffic_against_openai_schema(self):
        problems = CONTRACT.check_request('POST', '/fine_tuning/jobs', {}, 'application/json',
                                          {'model': 'gpt-4o-mini', 'suffix': 'x' * 65})
        self.assertTrue(any("'training_file' is a required property" in p for p in problems), problems)
        self.assertTrue(any(p.endswith('at suffix') for p in problems), problems)
        problems = CONTRACT.check_request('GET', '/fine_tuning/jobs/ftjob-1/events', {'limit': 'ten', 'page': '2'})
        self.assertEqual(len(problems), 2, problems)
        problems = CONTRACT.check_response('GET', '/fine_tuning/jobs/ftjob-1', 200, {'id': 'ftjob-1', 'status': 'done'})
        self.assertTrue(any("'done' is not one of" in p for p in problems), problems)
        self.assertEqual(CONTRACT.check_request('POST', '/files', {}, 'multipart/form-data; boundary=x',
                                                {'file': '{}', 'purpose': 'fine-tune'}), [])
