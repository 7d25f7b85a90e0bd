"""The provider's monthly budget is a guard: Submit over it is refused with the figures through
the form's button (a confirmation wizard asks for a reason), XML-RPC (an explicit
budget_override_reason) and /v1 (always refused: insufficient_quota); two Submits at once cannot
both pass; the month's cost counts the calendar month's submitted jobs, a failed one at what it
trained."""
import base64
import threading
import unittest
import xmlrpc.client
from datetime import datetime, timedelta

import psycopg2

import odoo
from odoo import fields
from odoo.exceptions import UserError
from odoo.tests.common import get_db_name

from odoo.addons.llm_training.lib.jobs import budget
from odoo.addons.llm_training.user_errors import BudgetExceeded

from .common import TrainingCase, jsonl, valid_examples
from .test_concurrency import in_new_thread
from .test_openai_api import ApiCase

PRICE = 1e6  # USD per 1M tokens: a job costs 1 USD per trained token, round figures


class TestBudgetRules(unittest.TestCase):

    def test_month_bounds_cost_and_limit(self):
        self.assertEqual(budget.month_bounds(datetime(2026, 12, 4, 13, 5)),
                         (datetime(2026, 12, 1), datetime(2027, 1, 1)))
        self.assertEqual(budget.month_bounds(datetime(2026, 3, 31, 23, 59)), (datetime(2026, 3, 1), datetime(2026, 4, 1)))
        self.assertEqual(budget.job_cost('failed', 3.0, 9.0), 3.0)
        self.assertEqual(budget.job_cost('training', 0.0, 9.0), 9.0)
        self.assertTrue(budget.over_budget(80.0, 30.0, 100.0))
        self.assertFalse(budget.over_budget(70.0, 30.0, 100.0))
        self.assertFalse(budget.over_budget(500.0, 30.0, 0.0), 'no budget, no limit')


class BudgetCase(TrainingCase):

    @classmethod
    def setUpClass(cls):
        super(BudgetCase, cls).setUpClass()
        cls.base_model.training_price = PRICE
        cls.data = cls.make_dataset()
        cls.data.action_validate()

    def priced_job(self, **values):
        return self.make_job(dataset=self.data, base_model_id=self.base_model.id, **values)

    def figures(self, month_cost, estimate, budget_):
        return ("this month's jobs cost %.2f USD so far, this job is estimated at %.2f USD, the budget is %.2f USD"
                % (month_cost, estimate, budget_))


class TestMonthCost(BudgetCase):

    def test_counts_the_calendar_month_and_what_failed_jobs_trained(self):
        done, failed, active, last_month = (self.priced_job(name=n) for n in ('done', 'failed', 'active', 'old'))
        (done | failed | active | last_month).action_submit()
        self.priced_job(name='draft')  # never submitted: costs nothing
        done._write_workflow({'trained_tokens': 40})
        for state in ('preparing', 'queued', 'training', 'completed'):
            done._change_state(state)
        failed._write_workflow({'trained_tokens': 25})
        failed._set_failed('out of memory halfway')
        self.assertEqual((done.final_cost, failed.final_cost), (40.0, 25.0), 'trained tokens x price, also when failed')
        # submitted in the previous month (and still active): that month's cost, not this one's
        old = fields.Datetime.to_string(budget.month_bounds(datetime.utcnow())[0] - timedelta(seconds=1))
        self.env.cr.execute('UPDATE llm_training_job SET submitted_at = %s WHERE id = %s', (old, last_month.id))
        self.env['llm.training.job'].invalidate_cache()
        self.provider.invalidate_cache()
        self.assertGreater(active.estimated_cost, 0)
        self.assertAlmostEqual(self.provider.month_cost, 40.0 + 25.0 + active.estimated_cost, places=2)


class TestBudgetGuard(BudgetCase):

    def setUp(self):
        super(TestBudgetGuard, self).setUp()
        self.first = self.priced_job(name='first')
        self.estimate = self.first.estimated_cost
        self.provider.monthly_budget = self.estimate * 1.5  # one job fits, two do not
        self.assertIs(self.first.action_submit_from_form(), True)
        self.assertEqual(self.first.state, 'validating')

    def test_form_submit_asks_for_a_reason_then_keeps_it(self):
        job = self.priced_job(name='second')
        action = job.action_submit_from_form()
        self.assertEqual((action['res_model'], action['target']), ('llm.training.job.budget.wizard', 'new'))
        wizard = self.env[action['res_model']].browse(action['res_id'])
        self.assertIn(self.figures(self.estimate, self.estimate, self.estimate * 1.5), wizard.figures)
        self.assertEqual(job.state, 'draft')
        with self.assertRaises(UserError):
            wizard.action_submit_anyway()  # no reason given
        self.assertEqual(job.state, 'draft')
        wizard.reason = 'Quarter-end model for the support team'
        wizard.action_submit_anyway()
        self.assertEqual(job.state, 'validating')
        event = job.event_ids.filtered(lambda e: 'over the monthly budget' in e.message)
        self.assertEqual(len(event), 1)
        self.assertIn('Quarter-end model for the support team', event.message)
        self.assertIn(self.figures(self.estimate, self.estimate, self.estimate * 1.5), event.message)

    def test_new_job_wizard_keeps_the_job_and_asks_for_a_reason(self):
        wizard = self.env['llm.training.job.wizard'].create({
            'name': 'from the wizard', 'provider_id': self.provider.id, 'base_model_id': self.base_model.id,
            'dataset_ids': [(6, 0, self.data.ids)]})
        action = wizard.action_submit()
        self.assertEqual((action['res_model'], action['target']), ('llm.training.job.budget.wizard', 'new'))
        job = wizard.job_id
        self.assertEqual((job.name, job.state), ('from the wizard', 'draft'), 'the job is kept, not rolled back')
        confirm = self.env[action['res_model']].browse(action['res_id'])
        self.assertIn(self.figures(self.estimate, job.estimated_cost, self.estimate * 1.5), confirm.figures)
        confirm.reason = 'Launch week'
        confirm.action_submit_anyway()
        self.assertEqual(job.state, 'validating')

    def test_submit_is_refused_with_the_figures_unless_a_reason_is_given(self):
        job = self.priced_job(name='second')
        with self.assertRaises(BudgetExceeded) as refused:
            job.action_submit()
        self.assertIn(self.figures(self.estimate, self.estimate, self.estimate * 1.5), refused.exception.name)
        self.assertEqual(job.state, 'draft')
        with self.assertRaises(BudgetExceeded):
            job.action_submit(budget_override_reason='   ')
        with self.assertRaises(BudgetExceeded, msg='a button passes its context first: no reason'):
            job.action_submit({'lang': 'en_US'})
        job.action_submit(budget_override_reason='Approved by finance')
        self.assertEqual(job.state, 'validating')


class TestBudgetOverTheWire(ApiCase):
    """XML-RPC and /v1 on the same scripted provider, over real HTTP."""

    def setUp(self):
        super(TestBudgetOverTheWire, self).setUp()
        self.tiny.training_price = PRICE
        self.scripted.monthly_budget = 1.0  # under any job's estimate here

    def test_xmlrpc_refuses_with_the_figures_and_takes_an_explicit_reason(self):
        dataset = self.env['llm.training.dataset'].create({'name': 'rpc budget', 'attachment_ids': [(0, 0, {
            'name': 'b.jsonl', 'datas_fname': 'b.jsonl', 'datas': base64.b64encode(jsonl(valid_examples()))})]})
        dataset.action_validate()  # the refusal rolls back what its request did: the estimate is known here
        job = self.env['llm.training.job'].create({'name': 'RPC over budget', 'provider_id': self.scripted.id,
                                                   'base_model_id': self.tiny.id, 'dataset_ids': [(6, 0, dataset.ids)]})
        self.assertGreater(job.estimated_cost, 1.0)
        url = 'http://127.0.0.1:%d/xmlrpc/2/' % odoo.tools.config['http_port']
        uid = xmlrpc.client.ServerProxy(url + 'common').authenticate(self.cr.dbname, 'admin', 'admin', {})
        rpc = xmlrpc.client.ServerProxy(url + 'object')
        self.cr.commit()  # a test cursor's commit is a savepoint: the refused call rolls back to here
        with self.assertRaises(xmlrpc.client.Fault) as refused:
            rpc.execute_kw(self.cr.dbname, uid, 'admin', 'llm.training.job', 'action_submit', [[job.id]])
        job.invalidate_cache()
        self.assertIn('would go over its monthly budget', refused.exception.faultString)
        self.assertIn('the budget is 1.00 USD', refused.exception.faultString)
        self.assertIn('this job is estimated at %.2f USD' % job.estimated_cost, refused.exception.faultString)
        self.assertEqual(job.state, 'draft')
        self.assertIs(rpc.execute_kw(self.cr.dbname, uid, 'admin', 'llm.training.job', 'action_submit', [[job.id]],
                                     {'budget_override_reason': 'Nightly retrain agreed'}), True)
        job.invalidate_cache()
        self.assertEqual(job.state, 'validating')
        self.assertIn('Nightly retrain agreed', ' '.join(job.event_ids.mapped('message')))

    def test_v1_is_refused_as_openai_refuses_an_exhausted_quota(self):
        file = self.upload(jsonl(valid_examples(12)))
        self.run_cron()
        before = self.counts()
        error = self.refused(429, 'create_job', model='tiny-api', training_file=file['id'], code='insufficient_quota')
        self.assertEqual(error['type'], 'insufficient_quota')
        self.assertIn('would go over its monthly budget', error['message'])
        self.assertIn('the budget is 1.00 USD', error['message'])
        self.assertEqual(self.counts(), before, 'no job left behind')
        self.scripted.monthly_budget = 0.0
        self.assertEqual(self.ok('create_job', model='tiny-api', training_file=file['id'])['status'], 'validating_files')


class TestBudgetRace(unittest.TestCase):
    """Two Submits at once on real committed data and real concurrent transactions: the second
    waits on the provider's row, then decides on the first's job, never on an older snapshot."""

    def setUp(self):
        self.registry = odoo.registry(get_db_name())
        self.ids = in_new_thread(self.registry, self._create)

    def tearDown(self):
        in_new_thread(self.registry, self._cleanup)

    def _create(self, env):
        provider = env['llm.provider'].create({'name': 'Budget race', 'service': 'test', 'max_concurrent_jobs': 0})
        model = env['llm.model'].create({'name': 'M', 'provider_id': provider.id, 'model_ref': 'budget-race',
                                         'training_price': PRICE})
        dataset = env['llm.training.dataset'].create({'name': 'budget race', 'attachment_ids': [(0, 0, {
            'name': 'r.jsonl', 'datas_fname': 'r.jsonl', 'datas': base64.b64encode(jsonl(valid_examples()))})]})
        dataset.action_validate()
        jobs = [env['llm.training.job'].create({'name': 'race %d' % i, 'provider_id': provider.id,
                                                'base_model_id': model.id, 'dataset_ids': [(6, 0, dataset.ids)]})
                for i in range(2)]
        provider.monthly_budget = jobs[0].estimated_cost * 1.5
        return {'provider': provider.id, 'model': model.id, 'dataset': dataset.id, 'jobs': [j.id for j in jobs]}

    def _cleanup(self, env):
        env.cr.execute("UPDATE llm_training_job SET state = 'cancelled' WHERE id IN %s", (tuple(self.ids['jobs']),))
        env['llm.training.job'].browse(self.ids['jobs']).unlink()
        env['llm.training.dataset'].browse(self.ids['dataset']).unlink()
        env['llm.model'].browse(self.ids['model']).unlink()
        env['llm.provider'].browse(self.ids['provider']).unlink()

    def _waiting_on_a_lock(self):
        def count(env):
            env.cr.execute("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                           "WHERE NOT l.granted AND a.datname = current_database()")
            return env.cr.fetchone()[0]
        return in_new_thread(self.registry, count)

    def test_two_submits_at_once_cannot_both_pass(self):
        first_id, second_id = self.ids['jobs']
        first_locked, second_ready, release = threading.Event(), threading.Event(), threading.Event()
        outcome = {}

        def first(env):
            env['llm.training.job'].browse(first_id).action_submit()
            first_locked.set()
            release.wait(60)  # commits (leaving the block) only once the second waits on the lock

        def second(env):
            env['llm.training.job'].browse(second_id).read(['state'])  # its snapshot: before the first commits
            second_ready.set()
            env['llm.training.job'].browse(second_id).action_submit()

        def second_with_retries():
            # as Odoo's RPC layer does: a serialization failure is retried on a fresh transaction
            for attempt in range(3):
                try:
                    in_new_thread(self.registry, second if attempt == 0 else
                                  lambda env: env['llm.training.job'].browse(second_id).action_submit())
                    outcome['second'] = 'submitted'
                    return
                except psycopg2.extensions.TransactionRollbackError:
                    outcome.setdefault('retries', 0)
                    outcome['retries'] += 1
                except BudgetExceeded as e:
                    outcome['second'] = e.name
                    return

        thread_first = threading.Thread(target=in_new_thread, args=(self.registry, first))
        thread_first.start()
        self.assertTrue(first_locked.wait(60))
        thread_second = threading.Thread(target=second_with_retries)
        thread_second.start()
        self.assertTrue(second_ready.wait(60))
        deadline = datetime.utcnow() + timedelta(seconds=60)
        while not self._waiting_on_a_lock():  # a condition, not a guess: the second is blocked on the row
            self.assertLess(datetime.utcnow(), deadline, 'the second Submit never waited on the provider row')
            threading.Event().wait(0.05)
        release.set()
        thread_first.join(60)
        thread_second.join(60)
        self.assertIn('would go over its monthly budget', outcome.get('second', ''), outcome)
        states = in_new_thread(self.registry, lambda env: env['llm.training.job'].browse([first_id, second_id]).mapped('state'))
        self.assertEqual(states, ['validating', 'draft'])
