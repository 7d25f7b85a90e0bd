"""Submit moves the job at once: it returns having done nothing but the state change, and right
after its transaction commits a background thread runs the job's due steps and polls until the
provider reports it running, with no cron run. Real committed data and real threads."""
import base64
import threading
import unittest
from unittest import mock

import odoo
from odoo.tests.common import get_db_name

from .common import jsonl, valid_examples
from .test_concurrency import in_new_thread

ENABLED = 'odoo.addons.llm_training.models.llm_training_engine._following_enabled'


class TestSubmitFollows(unittest.TestCase):

    def setUp(self):
        self.registry = odoo.registry(get_db_name())
        self.ids = in_new_thread(self.registry, self._create)

    def tearDown(self):
        in_new_thread(self.registry, self._cleanup)

    def _create(self, env):
        # 'hold': the first check says queued, the next ones running, and it never ends
        provider = env['llm.provider'].create({'name': 'Follow', 'service': 'test', 'max_concurrent_jobs': 0,
                                               'test_behavior': 'hold'})
        model = env['llm.model'].create({'name': 'M', 'provider_id': provider.id, 'model_ref': 'follow-m'})
        dataset = env['llm.training.dataset'].create({'name': 'follow', 'attachment_ids': [(0, 0, {
            'name': 'f.jsonl', 'datas_fname': 'f.jsonl', 'datas': base64.b64encode(jsonl(valid_examples()))})]})
        job = env['llm.training.job'].create({'name': 'follow', 'provider_id': provider.id, 'base_model_id': model.id,
                                              'dataset_ids': [(6, 0, dataset.ids)]})
        return {'provider': provider.id, 'model': model.id, 'dataset': dataset.id, 'job': job.id}

    def _cleanup(self, env):
        env.cr.execute("UPDATE llm_training_job SET state = 'cancelled' WHERE id = %s", (self.ids['job'],))
        env['llm.training.job'].browse(self.ids['job']).unlink()
        env['llm.training.dataset'].browse(self.ids['dataset']).unlink()
        env['llm.model'].browse(self.ids['model']).unlink()
        env['llm.provider'].browse(self.ids['provider']).unlink()

    def submitted(self, function):
        """Run function(env) on a committed transaction with following on; returns its result and
        the threads it started that follow the job."""
        started, real = [], threading.Thread

        class Recorded(real):
            def start(self):
                started.append(self)
                super(Recorded, self).start()
        with mock.patch(ENABLED, return_value=True), mock.patch.object(threading, 'Thread', Recorded):
            try:
                result, error = in_new_thread(self.registry, function), None
            except Exception as e:  # noqa: the caller asserts on it
                result, error = None, e
        name = 'llm-training-follow-%d' % self.ids['job']
        followers = [t for t in started if t.name == name]
        self.assertEqual(len(followers), 1, 'one background thread follows the submitted job')
        return result, error, followers[0]

    def job_state(self):
        return in_new_thread(self.registry, lambda env: env['llm.training.job'].browse(self.ids['job']).read(
            ['state', 'external_job_id'])[0])

    def test_submit_returns_at_once_and_the_job_reaches_training_without_the_cron(self):
        def submit(env):
            job = env['llm.training.job'].browse(self.ids['job'])
            job.action_submit()
            # Submit itself did nothing more: no validation, no start (the thread waits for this commit)
            seen = (job.state, job.external_job_id, self.starts(env))
            return seen
        seen, error, follower = self.submitted(submit)
        self.assertIsNone(error)
        self.assertEqual(seen, ('validating', False, 0))
        follower.join(120)  # it stops once the provider reports the job running
        self.assertFalse(follower.is_alive())
        job = self.job_state()
        self.assertEqual(job['state'], 'training')
        self.assertTrue(job['external_job_id'])
        self.assertEqual(in_new_thread(self.registry, self.starts), 1)

    def test_a_submit_rolled_back_is_not_followed(self):
        def submit_then_fail(env):
            env['llm.training.job'].browse(self.ids['job']).action_submit()
            raise RuntimeError('the request failed after Submit')
        _result, error, follower = self.submitted(submit_then_fail)
        self.assertIsInstance(error, RuntimeError)
        follower.join(120)
        self.assertFalse(follower.is_alive())
        self.assertEqual(self.job_state()['state'], 'draft')
        self.assertEqual(in_new_thread(self.registry, self.starts), 0)

    def starts(self, env):
        return env['llm.test.provider.call'].search_count([('job_id', '=', self.ids['job']), ('method', '=', 'start')])
