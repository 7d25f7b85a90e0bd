"""Two cron workers at once, on real committed data and real concurrent transactions."""
import base64
import threading
import unittest

import odoo
from odoo import SUPERUSER_ID, api
from odoo.tests.common import get_db_name

from .common import jsonl, valid_examples


def in_new_thread(registry, function):
    """Run function(env) on a fresh cursor in a fresh thread, committed at the end. Its own thread
    keeps its environments away from the test thread's (they are thread-local)."""
    result, errors = [], []

    def target():
        try:
            with api.Environment.manage(), registry.cursor() as cr:
                result.append(function(api.Environment(cr, SUPERUSER_ID, {})))
        except Exception as e:  # noqa: re-raised in the test thread
            errors.append(e)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), 'the thread did not end within 120 s'
    if errors:
        raise errors[0]
    return result[0] if result else None


class TestConcurrentCron(unittest.TestCase):

    def setUp(self):
        self.registry = odoo.registry(get_db_name())
        self.created = {}

    def tearDown(self):
        in_new_thread(self.registry, self._cleanup)

    def _cleanup(self, env):
        for model in ('llm.training.job', 'llm.training.dataset', 'llm.model', 'llm.provider'):
            records = env[model].browse(self.created.get(model, []))
            if model == 'llm.model':
                records = records.search([('provider_id', 'in', self.created.get('llm.provider', []))])
            if model == 'llm.training.job':
                env.cr.execute('UPDATE llm_training_job SET state = %s WHERE id IN %s', ('cancelled', tuple(records.ids) or (0,)))
            records.exists().unlink()

    def _setup_jobs(self, n, max_concurrent, delay, behavior='succeed'):
        return in_new_thread(self.registry, lambda env: self._create_jobs(env, n, max_concurrent, delay, behavior))

    def _create_jobs(self, env, n, max_concurrent, delay, behavior):
        provider = env['llm.provider'].create({'name': 'Race', 'service': 'test', 'max_concurrent_jobs': max_concurrent,
                                               'test_start_delay': delay, 'test_behavior': behavior})
        model = env['llm.model'].create({'name': 'M', 'provider_id': provider.id, 'model_ref': 'race-m'})
        attachment = env['ir.attachment'].create({'name': 'd.jsonl', 'datas_fname': 'd.jsonl',
                                                  'datas': base64.b64encode(jsonl(valid_examples()))})
        dataset = env['llm.training.dataset'].create({'name': 'd', 'attachment_ids': [(6, 0, attachment.ids)]})
        jobs = env['llm.training.job']
        for i in range(n):
            jobs |= env['llm.training.job'].create({
                'name': 'race %d' % i, 'provider_id': provider.id, 'base_model_id': model.id,
                'dataset_ids': [(6, 0, dataset.ids)]})
        jobs.action_submit()
        self.created = {'llm.training.job': jobs.ids, 'llm.training.dataset': dataset.ids,
                        'llm.model': model.ids, 'llm.provider': provider.ids}
        return jobs.ids

    def _run_workers(self, work, n=2):
        """`work(env)` in `n` threads on their own cursors, released together by a barrier."""
        errors = []
        barrier = threading.Barrier(n)

        def worker():
            try:
                def run(env):
                    barrier.wait(30)
                    return work(env)
                in_new_thread(self.registry, run)
            except Exception as e:  # noqa: a crash of any worker fails the test below
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        self.assertEqual([t for t in threads if t.is_alive()], [], 'workers still running after 120 s')
        self.assertEqual(errors, [])

    def _run_two_workers(self):
        self._run_workers(lambda env: env['llm.training.job']._cron_sync_training_jobs())

    def _starts(self, job_ids):
        return in_new_thread(self.registry, lambda env: self._count_starts(env.cr, job_ids))

    def _count_starts(self, cr, job_ids):
        """Start calls per job, adopted ones included: the scripted service turns a second start
        into an adopt, which would hide a double start by the engine."""
        cr.execute("SELECT job_id, count(*) FROM llm_test_provider_call WHERE method IN ('start', 'adopt') "
                   "AND job_id IN %s GROUP BY job_id", (tuple(job_ids),))
        return dict(cr.fetchall())

    def test_no_job_is_started_twice(self):
        job_ids = self._setup_jobs(4, max_concurrent=0, delay=0.5)
        # A job skipped (held by the other worker, a concurrent update, its dataset being
        # validated by the other worker) is picked up by a later run: run until every job is at
        # the provider, then count the starts. The bound only stops a broken engine.
        for _round in range(20):
            self._run_two_workers()
            if self._unstarted(job_ids) == 0:
                break
        self.assertEqual(self._unstarted(job_ids), 0)
        self.assertEqual(self._starts(job_ids), {job_id: 1 for job_id in job_ids})

    def _unstarted(self, job_ids):
        return in_new_thread(self.registry, lambda env: env['llm.training.job'].search_count(
            [('id', 'in', job_ids), ('external_job_id', '=', False)]))

    def test_concurrency_limit_holds_across_workers(self):
        # 'hold': the first job never finishes, so its slot is never legitimately freed
        job_ids = self._setup_jobs(3, max_concurrent=1, delay=0.5, behavior='hold')
        self._run_two_workers()
        self._run_two_workers()
        self.assertEqual(sum(self._starts(job_ids).values()), 1)
        started = in_new_thread(self.registry, lambda env: env['llm.training.job'].search_count(
            [('id', 'in', job_ids), ('external_job_id', '!=', False)]))
        self.assertEqual(started, 1)

    def test_parallel_check_status_starts_one_run(self):
        """4 Check Status at once on a queued job with no concurrency limit: one run at the
        provider (the claim, the committed intent and the keyed start)."""
        job_id, = self._setup_jobs(1, max_concurrent=0, delay=0.5)
        in_new_thread(self.registry, lambda env: env['llm.training.job'].browse(job_id)._write_workflow(
            {'state': 'queued'}))  # as prepared: the test provider needs no files
        self._run_workers(lambda env: env['llm.training.job'].browse(job_id).action_check_status(), n=4)
        self.assertEqual(self._starts([job_id]), {job_id: 1})
        external = in_new_thread(self.registry, lambda env: env['llm.training.job'].browse(job_id).external_job_id)
        self.assertEqual(external, 'test-job-%d-1' % job_id)
