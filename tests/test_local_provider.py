"""The local provider with the real trainer process and the real SmolLM2 model, driven by the cron."""
import json
import math
import os
import signal
import stat
import tempfile
import unittest
from datetime import datetime

from odoo import fields
from odoo.exceptions import AccessError

from odoo.addons.llm_training.lib.jobs import trainer_folder
from odoo.addons.llm_training.lib.host.trainer_env import run_trainer_module
from odoo.addons.llm_training.lib.providers import local
from odoo.addons.llm_training.user_errors import JobRefused

from .common import TrainingCase, jsonl


def code_word_examples(n):
    return [{'messages': [{'role': 'user', 'content': 'What is the code word number %d?' % (i % 4)},
                          {'role': 'assistant', 'content': 'The code word is MANGO-%d.' % (i % 4)}]}
            for i in range(n)]


class TestLocalProvider(TrainingCase):

    @classmethod
    def setUpClass(cls):
        super(TestLocalProvider, cls).setUpClass()
        cls.local = cls.env['llm.provider'].create({'name': 'Local', 'service': 'local', 'max_concurrent_jobs': 2})
        cls.smol = cls.env['llm.model'].create({'name': 'SmolLM2', 'provider_id': cls.local.id,
                                                'model_ref': 'SmolLM2-135M-Instruct', 'context_length': 8192})
        cls.data = cls.make_dataset(jsonl(code_word_examples(16)), name='codes.jsonl')

    @classmethod
    def tearDownClass(cls):
        cls.local._adapter().model_server().stop()  # the Test button started it
        super(TestLocalProvider, cls).tearDownClass()

    def tearDown(self):
        # Trainers are detached processes: stop any a test left running, or they eat the CPU.
        for job in self.env['llm.training.job'].search([('provider_id', '=', self.local.id)]):
            data = job._get_provider_data()
            if trainer_folder.is_alive(data.get('pid'), data.get('start_time')):
                os.killpg(data['pid'], signal.SIGKILL)
        super(TestLocalProvider, self).tearDown()

    def local_job(self, **values):
        return self.trainer_job(self.data, self.local, self.smol, **values)


    def test_submit_train_complete_register(self):
        job = self.local_job()
        job.action_submit()
        self.run_cron()
        self.assertEqual(job.state, 'queued', job.error_message)
        self.assertTrue(job.external_job_id.startswith('local-'))
        self.wait_until(job, lambda j: j.state in ('completed', 'failed'))
        self.assertEqual(job.state, 'completed', job.error_message)
        self.assertEqual(job.progress, 100.0)
        self.assertGreater(job.total_steps, 0)
        # Started At is the trainer's start (its status.json), not the completion time
        with open(os.path.join(job.work_dir, 'status.json')) as f:
            began = datetime.utcfromtimestamp(json.load(f)['started_at'])
        self.assertEqual(job.started_at, fields.Datetime.to_string(began))
        self.assertLess(job.started_at, job.finished_at)
        losses = job.metric_ids.filtered('train_loss').sorted('step').mapped('train_loss')
        self.assertLess(losses[-1], losses[0])
        self.assertTrue(job.metric_ids.filtered('valid_loss'))
        model = job.result_model_id
        self.assertEqual((model.kind, model.base_model_id, model.job_id), ('fine_tuned', self.smol, job))
        # the trainer's final figures as the model's fields, no JSON in its notes
        self.assertGreater(model.valid_loss, 0)
        self.assertAlmostEqual(model.perplexity, math.exp(model.valid_loss), places=1)
        self.assertTrue(0 < model.valid_token_accuracy <= 1)
        self.assertGreater(model.training_tokens_per_second, 0)
        self.assertIn(model.training_precision, ('bf16', 'fp32'))
        self.assertNotIn('{', model.description or '')
        self.assertTrue(os.path.exists(os.path.join(model.model_ref, 'adapter_config.json')))
        self.assertIn('Training finished', ' '.join(job.event_ids.mapped('message')))
        self.assertIn('precision: ', ' '.join(job.event_ids.mapped('message')))
        # the speed this machine reached is kept, and the next job's time estimate comes from it
        speed = self.env['llm.provider.throughput']._lookup(self.local, self.smol, 'lora')
        self.assertEqual(speed.job_id, job)
        self.assertGreater(speed.tokens_per_second, 0)
        self.assertIn(speed.precision, ('bf16', 'fp32'))
        following = self.local_job(epochs=3)
        tokens = self.data.token_total * 0.75
        self.assertAlmostEqual(following.estimated_duration, tokens * 3 / speed.tokens_per_second / 3600.0, places=6)
        self.assertEqual(self.local_job(technique='full').estimated_duration, 0.0, 'no speed measured for full yet')
        # test the model from its form: base and fine-tuned side by side
        model.test_prompt = 'What is the code word number 2?'
        model.action_test_model()
        self.assertIn('MANGO', model.test_reply)
        self.assertTrue(model.test_base_reply)

    def test_token_counts_match_the_chat_template_exactly(self):
        """Odoo's counts (template table + tokenizer.json in Rust) equal apply_chat_template's in
        the trainer environment, default system prompt included, on examples of every shape."""
        count = self.local._adapter().token_counter(self.smol.model_ref)
        exact = count.exact  # the trainer env's apply_chat_template, one example per line
        examples = [m['messages'] for m in code_word_examples(4)] + [
            [{'role': 'user', 'content': 'Hello'}],
            [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': '\nLeading newline'},
             {'role': 'assistant', 'content': '  two spaces  '}, {'role': 'user', 'content': 'Ünïcödé 東京 – ok?'},
             {'role': 'assistant', 'content': 'ends with a newline\n'}],
            [{'role': 'user', 'content': [{'type': 'text', 'text': 'parts '}, {'type': 'text', 'text': 'joined'}]},
             {'role': 'assistant', 'content': 'x' * 500}]]
        try:
            expected = [exact(messages) for messages in examples]
            self.assertEqual([count(messages) for messages in examples], expected)
            # the validator's batches: each distinct text encoded once, kept for the next batch
            self.assertEqual(count.count_many(examples + examples), expected + expected)
            self.assertEqual(count.count_many(examples[::-1]), expected[::-1])
        finally:
            count.close()
        # "Hello" alone: SmolLM2's template adds its default system prompt (about 20 tokens)
        self.assertGreater(count([{'role': 'user', 'content': 'Hello'}]), 20)
        self.data._validate(self.smol)
        self.assertTrue(30 < self.data.token_min <= self.data.token_max < 80)

    def test_dataset_validate_counts_for_its_base_model_as_the_job_does(self):
        """Validate on the dataset counts with its base model's chat template: the same total the
        job's own validation gets; without a base model the counts are labelled an estimate."""
        default = self.env['llm.training.dataset'].default_get(['base_model_id'])['base_model_id']
        self.assertEqual(self.env['llm.model'].browse(default).mapped(lambda m: (m.kind, m.provider_id.service)),
                         [('base', 'local')], "the company's first local base model")
        dataset = self.make_dataset(jsonl(code_word_examples(16)), name='counted.jsonl')
        dataset.write({'base_model_id': False})
        dataset.action_validate()
        estimate = dataset.token_total
        self.assertEqual(dataset.token_counting, 'estimate')
        dataset.write({'base_model_id': self.smol.id})
        dataset.action_validate()
        self.assertEqual(dataset.token_counting, 'exact')
        counted = dataset.token_total
        self.assertNotEqual(counted, estimate)
        count = self.local._adapter().token_counter(self.smol.model_ref)
        try:
            self.assertEqual(counted, sum(count(e['messages']) for e in code_word_examples(16)))
        finally:
            count.close()
        job = self.local_job(dataset_ids=[(6, 0, dataset.ids)])
        job.action_submit()
        self.env['llm.training.engine']._validate(job)  # the job's Validating step alone: no trainer starts
        self.assertEqual(job.state, 'preparing', job.error_message)
        self.assertEqual(dataset.token_total, counted, "the job's validation counts the same")
        form = self.env['llm.training.dataset'].fields_view_get(view_type='form')['arch']
        self.assertIn('name="token_counting"', form)
        self.assertIn('are an estimate', form)

    def test_sigkill_fails_the_job_then_resume_continues(self):
        job = self.local_job(epochs=30, hyperparameters='{"save_steps": 2}')
        job.action_submit()
        self.run_cron()
        self.wait_until(job, lambda j: j.current_step >= 3)
        pid = job._get_provider_data()['pid']
        os.killpg(pid, signal.SIGKILL)
        self.wait_until(job, lambda j: j.state == 'failed', timeout=60)
        self.assertIn('trainer process stopped without reporting', job.error_message)
        self.assertTrue(trainer_folder.has_checkpoint(job.work_dir))
        # resume from the checkpoint, then cancel: the trainer saves and reports cancelled
        job.action_resume()
        self.assertEqual(job.state, 'queued')
        self.run_cron()
        self.assertEqual(job.state, 'queued', 'the new run has not reported yet')
        self.wait_until(job, lambda j: j.state == 'training' and j.current_step >= 3)
        events = ' '.join(job.event_ids.mapped('message'))
        self.assertIn('Resuming from checkpoint-', events)
        # an internal user's buttons are refused before they reach the live trainer
        user = self.env['res.users'].with_context(no_reset_password=True).create(
            {'name': 'Reader', 'login': 'llm_local_reader', 'groups_id': [(6, 0, [self.env.ref('base.group_user').id])]})
        data = job._get_provider_data()
        for action in ('action_cancel', 'action_check_status', 'action_resume', 'action_reset_to_draft'):
            with self.assertRaises(AccessError):
                getattr(job.sudo(user), action)()
            self.assertTrue(trainer_folder.is_alive(data['pid'], data['start_time']), action)
        job.invalidate_cache()
        self.assertEqual((job.state, job.cancel_requested, job._get_provider_data()['pid']), ('training', False, data['pid']))
        job.action_cancel()
        self.wait_until(job, lambda j: j.state == 'cancelled', timeout=120)
        self.assertTrue(job.cancel_requested)

    def test_qlora_on_cpu_fails_at_validating(self):
        info = json.loads(run_trainer_module(self.local._adapter().python, ['trainer.env_info'], 120).stdout.decode())
        if info['cuda']:
            self.skipTest('the trainer environment has a CUDA GPU')
        job = self.local_job(technique='qlora')
        job.action_submit()
        self.run_cron()
        self.assertEqual(job.state, 'failed')
        self.assertIn('QLoRA needs a CUDA GPU', job.error_message)
        self.assertFalse(job.external_job_id, 'nothing was started')

    def test_preference_data_is_refused_at_submit(self):
        pairs = [{'input': {'messages': [{'role': 'user', 'content': 'Q%d' % i}]},
                  'preferred_output': [{'role': 'assistant', 'content': 'Yes %d' % i}],
                  'non_preferred_output': [{'role': 'assistant', 'content': 'No %d' % i}]} for i in range(10)]
        dataset = self.make_dataset(jsonl(pairs), name='pairs.jsonl')
        dataset.data_format = 'preference'
        job = self.make_job(dataset, provider_id=self.local.id, base_model_id=self.smol.id)
        with self.assertRaisesRegex(JobRefused, r'preference \(DPO\) datasets need a provider that trains them'):
            job.action_submit()
        self.assertEqual(job.state, 'draft')


class TestChatTemplateTableCache(unittest.TestCase):
    """The chat template's table is measured once per model folder for every process: a new
    process (an Odoo worker) reads the file the first one wrote instead of starting the trainer's
    Python again."""

    def test_measured_once_then_read_from_the_cache_file(self):
        work = tempfile.mkdtemp()
        model = os.path.join(work, 'model')
        os.makedirs(model)
        with open(os.path.join(model, 'tokenizer_config.json'), 'w') as f:
            f.write('{}')
        calls = os.path.join(work, 'calls')
        python = os.path.join(work, 'python')  # stands in for the trainer's Python: counts its runs
        with open(python, 'w') as f:
            f.write('#!/bin/sh\necho run >> %s\necho \'{"prefix": 7, "additive": true}\'\n' % calls)
        os.chmod(python, stat.S_IRWXU)
        cache = os.path.join(work, 'cache')
        runs = lambda: len(open(calls).read().split()) if os.path.exists(calls) else 0  # noqa: E731
        local._TEMPLATE_TABLES.clear()
        self.assertEqual(local.chat_template_table(python, model, cache), {'prefix': 7, 'additive': True})
        self.assertEqual(runs(), 1)
        local._TEMPLATE_TABLES.clear()  # another process
        self.assertEqual(local.chat_template_table(python, model, cache), {'prefix': 7, 'additive': True})
        self.assertEqual(runs(), 1, 'the second process read the file')
        os.utime(os.path.join(model, 'tokenizer_config.json'), (1, 1))  # the tokenizer changed
        local.chat_template_table(python, model, cache)
        self.assertEqual(runs(), 2, 'a changed tokenizer config is measured again')
        local._TEMPLATE_TABLES.clear()
