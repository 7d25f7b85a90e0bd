"""The Ray provider against a real single-node Ray head (loopback, free ports), with the real
trainer and SmolLM2, driven by the cron: one job trained on Ray is shared by the class (its
evaluation and its export run on Ray too)."""
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile

import requests

from odoo import tools
from odoo.addons.llm_training.lib.jobs import trainer_folder
from odoo.addons.llm_training.lib.export import runner

from .common import TrainingCase, jsonl
from .ray_head import RayHead
from .test_local_provider import code_word_examples
from .test_model_export import _config

# A short evaluation: 4 validation examples, answers cut at 8 new tokens.
EVAL_CONFIG = {'llm_training_run_evaluations': True, 'llm_training_eval_max_new_tokens': 8,
               'llm_training_eval_max_examples': 4}


def folder_digest(folder):
    digest = hashlib.sha256()
    for root, dirs, names in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(names):
            with open(os.path.join(root, name), 'rb') as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()


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
        cls._train_shared_job()

    @classmethod
    def _train_shared_job(cls):
        """The class's one Ray training (the first test checks it): submitted, its start's answer
        lost once (re-adopted), followed by the cron until it ends."""
        cls.job = job = cls.trainer_job(cls.data, cls.ray, cls.smol)
        job.action_submit()
        Job = cls.env['llm.training.job']
        Job._cron_sync_training_jobs()
        Job.invalidate_cache()
        cls.first_pass = (job.state, job.external_job_id)
        # The start's answer was lost (a worker died before its commit): the next pass starts the
        # same attempt again, and Ray's "already exists" makes that an adoption, not a second job.
        job._write_workflow({'external_job_id': False, 'start_pending': True})
        job.action_check_status()
        cls.after_lost_start = job.external_job_id
        deadline = time.time() + 600
        while job.state not in ('completed', 'failed', 'cancelled') and time.time() < deadline:
            time.sleep(1)
            Job._cron_sync_training_jobs()
            Job.invalidate_cache()
        # read now: a later test restarts the head, which forgets its jobs
        cls.ray_jobs_after_training = [j['submission_id'] for j in cls.head.jobs()
                                       if (j.get('metadata') or {}).get('odoo_job_id') == str(job.id)]

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
        job = self.job
        self.assertEqual(self.first_pass, ('queued', job.job_key))
        self.assertEqual(self.after_lost_start, job.job_key)
        self.assertIn('adopted', ' '.join(job.event_ids.mapped('message')))
        self.assertEqual(self.ray_jobs_after_training, [job.job_key])
        self.assertEqual(job.state, 'completed', '%s\n%s' % (job.error_message, job.log))
        model = job.result_model_id
        self.assertEqual((model.provider_id, model.base_model_id, model.kind), (self.ray, self.smol, 'fine_tuned'))
        self.assertTrue(os.path.isfile(os.path.join(model.model_ref, 'adapter_config.json')), model.model_ref)
        self.assertTrue(job.metric_ids.filtered('train_loss'))
        self.assertIn('Training finished', job.log + ' '.join(job.event_ids.mapped('message')))

    def side_jobs(self, module):
        return {j['submission_id']: j for j in self.head.jobs()
                if (j.get('metadata') or {}).get('llm_training_module') == module}

    def export(self, fmt):
        wizard = self.env['llm.model.export.wizard'].with_context(active_id=self.job.result_model_id.id).create(
            {'format': fmt})
        return self.env['llm.model.export'].browse(wizard.action_export()['res_id'])

    def test_the_model_is_evaluated_and_exported_on_ray_where_it_was_trained(self):
        job, model = self.job, self.job.result_model_id
        evaluation = job.evaluation_ids
        self.assertEqual((evaluation.state, evaluation.eval_set), ('pending', 'validation'))
        with _config(**EVAL_CONFIG):
            export = self.export('hf_adapter')  # started at once, as a Ray job
            self.assertEqual(export.state, 'running', export.log)
            self.assertIn('Export started: Ray job llm-export-', export.log)
            deadline = time.time() + 600
            while time.time() < deadline and (evaluation.state in ('pending', 'running') or
                                              export.state in ('pending', 'running')):
                self.run_cron()  # the jobs' cron moves evaluations on too
                self.env['llm.model.export']._cron_run_exports()
                evaluation.invalidate_cache()
                export.invalidate_cache()
                time.sleep(1)
        # The evaluation: a Ray job with the worker Python, its results read from the storage.
        self.assertEqual(evaluation.state, 'done', '%s\n%s' % (evaluation.error_message, evaluation.log))
        ray_evaluations = self.side_jobs('trainer.evaluate')
        key = json.loads(evaluation.provider_data)['ray_job']
        self.assertIn(ray_evaluations[key]['status'], ('RUNNING', 'SUCCEEDED'), 'done: its process is ending')
        self.assertIn("%s -m trainer.evaluate --dir %s" % (self.ray.worker_python, evaluation._folder()),
                      ray_evaluations[key]['entrypoint'])
        summary = json.loads(evaluation.summary)
        self.assertEqual(summary['n'], 4)
        for metrics in (summary['reference'], summary['candidate']):
            self.assertGreater(metrics['loss'], 0.0)
            self.assertIn('rouge_l', metrics)
        self.assertEqual(len(evaluation.example_ids), 4)
        self.assertTrue(all(line.candidate_answer for line in evaluation.example_ids))
        self.assertTrue(os.path.isfile(os.path.join(evaluation._folder(), 'summary.json')))
        self.assertIn('Evaluation done', ' '.join(job.event_ids.mapped('message')))
        self.assertEqual(job.state, 'completed')
        # The export: on the shared storage, verified by loading it back on the worker.
        self.assertEqual(export.state, 'done', '%s\n%s' % (export.error, export.log))
        self.assertIn(self.side_jobs('trainer.export')['llm-export-%s-%d' % (self.env.cr.dbname, export.id)]
                      ['status'], ('RUNNING', 'SUCCEEDED'))
        self.assertEqual(export.path, os.path.join(self.storage, 'exports', self.env.cr.dbname,
                                                   'export-%d' % export.id, 'out'))
        self.assertIn('Verified the adapter folder', export.log)
        self.assertEqual(export.verification, '16/16 tokens equal')
        with open(os.path.join(export.path, export.main_file), 'rb') as f:
            self.assertEqual(hashlib.sha256(f.read()).hexdigest(), export.sha256)
        self.assertTrue(os.path.isfile(os.path.join(export.path, 'README.md')))
        # The download's zip is read from the storage as Odoo sees it.
        archive = zipfile.ZipFile(io.BytesIO(b''.join(runner.zip_stream(export.path, 'x'))))
        self.assertIn('x/adapter_model.safetensors', archive.namelist())
        self.assertEqual(model.export_ids, export)

    def test_a_failing_ray_side_job_leaves_an_event_and_the_model_untouched(self):
        model = self.job.result_model_id
        before, values = folder_digest(model.model_ref), model.read(['model_ref', 'state', 'kind', 'active'])
        self.ray.worker_python = '/nonexistent/llmt-python'  # the workers cannot run it
        export = self.export('hf_merged')
        deadline = time.time() + 120
        while export.state in ('pending', 'running') and time.time() < deadline:
            time.sleep(0.5)
            export.action_check()  # Check Status: the cron's step at once
        self.assertEqual(export.state, 'failed', export.log)
        self.assertIn('Ray job llm-export-%s-%d FAILED: ' % (self.env.cr.dbname, export.id), export.error)
        self.assertIn('/nonexistent/llmt-python', export.error, "Ray's error tail")
        self.assertIn('ERROR Ray job llm-export-', export.log)
        # An evaluation whose Ray job fails: an error event on the job, which stays Completed.
        evaluation = self.job._queue_evaluation()
        engine = self.env['llm.training.engine']
        with _config(**EVAL_CONFIG):
            engine._step_evaluation(evaluation)  # starts it
            while evaluation.state == 'running' and time.time() < deadline:
                time.sleep(0.5)
                engine._step_evaluation(evaluation)
                evaluation.invalidate_cache()
        self.assertEqual(evaluation.state, 'failed')
        self.assertIn('/nonexistent/llmt-python', evaluation.error_message)
        failed = [m for m in self.job.event_ids.mapped('message') if m.startswith('Evaluation failed: Ray job')]
        self.assertTrue(failed and '/nonexistent/llmt-python' in failed[0], self.job.event_ids.mapped('message'))
        self.assertEqual(self.job.state, 'completed')
        self.assertEqual((folder_digest(model.model_ref), model.read(['model_ref', 'state', 'kind', 'active'])),
                         (before, values))

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
