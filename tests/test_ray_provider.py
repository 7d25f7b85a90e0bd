"""The Ray provider against a real single-node Ray head (loopback, free ports), with the real
trainer and SmolLM2, driven by the cron."""
import os
import shutil
import sys
import tempfile

import requests

from odoo import tools
from odoo.addons.llm_training.lib import trainer_folder

from .common import TrainingCase, jsonl
from .ray_head import RayHead
from .test_local_provider import code_word_examples


class TestRayProvider(TrainingCase):

    @classmethod
    def setUpClass(cls):
        super(TestRayProvider, cls).setUpClass()
        cls.head = RayHead(tools.config['llm_training_trainer_python'])
        cls.head.start()
        cls.storage = tempfile.mkdtemp(prefix='llmt-ray-storage-')
        cls.ray = cls.env['llm.provider'].create({
            'name': 'Ray', 'service': 'ray', 'ray_dashboard_url': cls.head.url, 'storage_path': cls.storage,
            'worker_python': tools.config['llm_training_trainer_python'], 'cpus_per_job': 1,
            'max_concurrent_jobs': 0, 'request_timeout': 10})
        cls.smol = cls.env['llm.model'].create({
            'name': 'SmolLM2 (cluster)', 'provider_id': cls.ray.id, 'context_length': 8192,
            'model_ref': os.path.join(tools.config['llm_training_models_dir'], 'SmolLM2-135M-Instruct')})
        cls.data = cls.make_dataset(jsonl(code_word_examples(16)), name='codes.jsonl')

    @classmethod
    def tearDownClass(cls):
        cls.head.stop()
        shutil.rmtree(cls.storage, ignore_errors=True)
        super(TestRayProvider, cls).tearDownClass()

    def ray_job(self, **values):
        return self.trainer_job(self.data, self.ray, self.smol, **values)


    def ray_jobs_of(self, job):
        return [j for j in self.head.jobs() if (j.get('metadata') or {}).get('odoo_job_id') == str(job.id)]

    def test_submit_trains_on_ray_and_registers_the_model_without_a_second_ray_job(self):
        job = self.ray_job()
        job.action_submit()
        self.run_cron()
        self.assertEqual((job.state, job.external_job_id), ('queued', job.job_key))
        # The start's answer was lost (a worker died before its commit): the next pass starts the
        # same attempt again, and Ray's "already exists" makes that an adoption, not a second job.
        job._write_workflow({'external_job_id': False, 'start_pending': True})
        job.action_check_status()
        self.assertEqual(job.external_job_id, job.job_key)
        self.assertIn('adopted', ' '.join(job.event_ids.mapped('message')))
        self.assertEqual([j['submission_id'] for j in self.ray_jobs_of(job)], [job.job_key])
        self.wait_until(job, lambda j: j.state == 'completed')
        model = job.result_model_id
        self.assertEqual((model.provider_id, model.base_model_id, model.kind), (self.ray, self.smol, 'fine_tuned'))
        self.assertTrue(os.path.isfile(os.path.join(model.model_ref, 'adapter_config.json')), model.model_ref)
        self.assertTrue(job.metric_ids.filtered('train_loss'))
        self.assertIn('Training finished', job.log + ' '.join(job.event_ids.mapped('message')))

    def test_cancel_keeps_a_checkpoint_resume_continues_and_a_lost_head_resubmits(self):
        job = self.ray_job(epochs=30, hyperparameters='{"save_steps": 2}')
        job.action_submit()
        self.wait_until(job, lambda j: j.state == 'training' and j.current_step >= 3)
        job.action_cancel()
        self.wait_until(job, lambda j: j.state == 'cancelled', timeout=120)
        self.assertTrue(trainer_folder.has_checkpoint(job.work_dir))
        self.assertEqual([j['status'] for j in self.ray_jobs_of(job)], ['STOPPED'])

        job.action_resume()  # a new attempt: a new Ray job
        self.wait_until(job, lambda j: j.state == 'training' and j.current_step >= 5)
        self.assertEqual(job.attempt, 2)
        self.assertIn('Resuming from checkpoint-', ' '.join(job.event_ids.mapped('message')))

        # The head dies with its jobs: polls fail and back off, the job is not failed.
        step = job.current_step
        self.head.kill()
        job.action_check_status()
        self.assertEqual(job.state, 'training')
        self.assertIn('did not answer', ' '.join(job.event_ids.mapped('message')))
        self.assertTrue(job.next_attempt_at)
        # Back, without its job history: the job is resubmitted from its last checkpoint.
        self.head.start()
        job._write_workflow({'next_attempt_at': False})
        self.wait_until(job, lambda j: j.attempt == 3 and j.state == 'training' and j.current_step > step)
        self.assertEqual(job.resubmit_count, 1)
        messages = ' '.join(job.event_ids.mapped('message'))
        self.assertIn('no longer knows job', messages)
        self.assertIn('Resubmitted from the last checkpoint as attempt 3', messages)
        job.action_cancel()
        self.wait_until(job, lambda j: j.state == 'cancelled', timeout=120)

    def test_connection_test_reports_the_version_and_what_is_wrong(self):
        self.ray.action_test_connection()
        self.assertRegex(self.ray.connection_status, r'^OK: Ray 2\.\d+\.\d+ at http://127\.0\.0\.1:\d+; shared storage')
        # a small Ray job imported the trainer's packages with the worker Python
        self.assertIn('imports torch, transformers, peft', self.ray.connection_status)
        bare = self.ray.copy({'name': 'Bare Python', 'worker_python': sys.executable})  # Odoo's: no torch
        bare.action_test_connection()
        self.assertIn("worker Python %s cannot import the trainer's packages: torch: ModuleNotFoundError"
                      % sys.executable, bare.connection_status)
        unreachable = self.ray.copy({'name': 'Nowhere', 'ray_dashboard_url': 'http://127.0.0.1:9'})
        unreachable.action_test_connection()
        self.assertIn('did not answer', unreachable.connection_status)
        read_only = self.ray.copy({'name': 'No storage', 'storage_path': '/proc/llmt-nowhere'})
        read_only.action_test_connection()
        self.assertIn('not writable', read_only.connection_status)

    def test_validating_names_the_base_model_folder_the_workers_lack(self):
        absent = self.env['llm.model'].create({'name': 'Not copied yet', 'provider_id': self.ray.id,
                                               'model_ref': 'Not-Copied-135M'})
        job = self.trainer_job(self.data, self.ray, absent)
        job.action_submit()
        self.run_cron()
        self.assertEqual(job.state, 'failed')
        self.assertIn('Base model "Not copied yet" is not where the Ray workers will look: %s has no config.json'
                      % os.path.join(self.storage, 'models', 'Not-Copied-135M'), job.error_message)
        self.assertFalse(self.ray_jobs_of(job), 'refused before anything reached Ray')

    def test_auth_header_is_sent_and_never_shown(self):
        self.ray.ray_auth_header = 'X-Cluster-Token: s3cr3t-token-value'
        self.ray.invalidate_cache()
        self.assertFalse(self.ray.ray_auth_header)
        self.assertEqual(self.ray.ray_auth_header_hint, u'\u2022\u2022\u2022\u2022alue')
        adapter = self.ray._adapter()
        sent = {}
        original = requests.request

        def spy(method, url, headers=None, **kwargs):
            sent.update(headers or {})
            return original(method, url, headers=headers, **kwargs)
        requests.request = spy
        try:
            adapter.test_connection()
        finally:
            requests.request = original
        self.assertEqual(sent, {'X-Cluster-Token': 's3cr3t-token-value'})

    def test_batch_that_processes_cannot_share_fails_at_validating(self):
        job = self.ray_job(batch_size=3, hyperparameters='{"num_processes": 2}')
        job.action_submit()
        self.run_cron()
        self.assertEqual(job.state, 'failed')
        self.assertIn('batch_size 3 cannot be shared by 2 processes', job.error_message)
