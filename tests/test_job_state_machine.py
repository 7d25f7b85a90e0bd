from datetime import datetime, timedelta

from odoo import fields
from odoo.exceptions import ValidationError, UserError

from odoo.addons.llm_training.lib.jobs import job_summary

from odoo.addons.llm_training.lib.jobs.job_status import PROVIDER_STATUSES, plan_transitions
from odoo.addons.llm_training.lib.jobs.job_status import STATES, TRANSITIONS

from .common import TrainingCase


class TestStateMachine(TrainingCase):

    def test_every_transition(self):
        """Each (from, to) pair: legal ones move and stamp, illegal ones raise and change nothing."""
        job = self.make_job()
        states = [s for s, _label in STATES]
        for old in states:
            for new in states:
                job.invalidate_cache()
                # put the job in `old` directly: this test is about the guard, not the route there
                self.env.cr.execute('UPDATE llm_training_job SET state = %s WHERE id = %s', (old, job.id))
                job.invalidate_cache()
                if new in TRANSITIONS[old]:
                    job._change_state(new)
                    self.assertEqual(job.state, new, '%s -> %s' % (old, new))
                else:
                    with self.assertRaises(UserError, msg='%s -> %s should be refused' % (old, new)):
                        job._change_state(new)
                    job.invalidate_cache()
                    self.assertEqual(job.state, old)

    def test_unknown_state_is_refused(self):
        job = self.make_job()
        with self.assertRaises(ValueError):
            job._change_state('paused')

    def test_timestamps(self):
        job = self.make_job()
        job.action_submit()
        self.assertEqual(job.state, 'validating')
        self.assertTrue(job.submitted_at)
        self.assertFalse(job.started_at)
        job._change_state('preparing')
        job._change_state('queued')
        job._change_state('training')
        self.assertTrue(job.started_at)
        job._change_state('completed')
        self.assertTrue(job.finished_at)
        self.assertEqual(job.progress, 100.0)
        self.assertIn('State: Completed', job.event_ids.mapped('message'))

    def test_started_at_is_when_the_provider_started_not_when_we_saw_it_end(self):
        """A short run seen only once it ended (queued -> training -> completed in one check)
        keeps the start the provider reported; Started At is not the completion time."""
        job = self.make_job()
        self.env.cr.execute("UPDATE llm_training_job SET state = 'queued' WHERE id = %s", (job.id,))
        job.invalidate_cache()
        began = datetime.utcnow().replace(microsecond=0) - timedelta(minutes=7)
        started = (began - datetime(1970, 1, 1)).total_seconds()
        self.env['llm.training.engine']._apply_report(job, {
            'status': 'succeeded', 'started_at': started, 'result': {'model_ref': 'tiny-ft-started'}})
        self.assertEqual(job.state, 'completed')
        self.assertEqual(job.started_at, fields.Datetime.to_string(began))
        self.assertGreater(job.finished_at, job.started_at)
        # a provider that gives no start time: when a check first saw it run
        other = self.make_job()
        self.env.cr.execute("UPDATE llm_training_job SET state = 'queued' WHERE id = %s", (other.id,))
        other.invalidate_cache()
        self.env['llm.training.engine']._apply_report(other, {'status': 'running'})
        self.assertEqual(other.state, 'training')
        self.assertTrue(other.started_at)

    def test_estimated_training_time_in_words(self):
        self.assertEqual(job_summary.estimated_duration_text(0.4), 'under a minute')
        self.assertEqual(job_summary.estimated_duration_text(59), 'under a minute')
        self.assertEqual(job_summary.estimated_duration_text(12 * 60 + 5), '12 min')
        self.assertEqual(job_summary.estimated_duration_text(2 * 3600 + 5 * 60), '2 h 05 min')
        job = self.make_job()
        job.dataset_ids.action_validate()
        self.env['llm.provider.throughput'].create({
            'provider_id': self.provider.id, 'base_model_id': self.base_model.id, 'technique': job.technique,
            'tokens_per_second': 1e6, 'job_id': job.id})
        job.invalidate_cache()
        self.assertGreater(job.estimated_duration, 0)
        self.assertEqual(job.estimated_duration_text, 'under a minute')
        view = self.env.ref('llm_training.llm_training_job_view_form').arch
        self.assertIn('name="estimated_duration_text"', view)
        self.assertNotIn('widget="float_time"', view)

    def test_state_is_tracked_in_chatter(self):
        job = self.make_job()
        before = len(job.message_ids)
        job.action_submit()
        self.assertGreater(len(job.message_ids), before)

    def test_setup_locked_after_submit(self):
        job = self.make_job()
        job.action_submit()
        with self.assertRaises(UserError):
            job.write({'technique': 'full'})
        job.write({'description': 'notes are fine'})

    def test_cannot_submit_twice(self):
        job = self.make_job()
        job.action_submit()
        with self.assertRaises(UserError):
            job.action_submit()

    def test_cannot_delete_active_job(self):
        job = self.make_job()
        job.action_submit()
        with self.assertRaises(UserError):
            job.unlink()
        job.action_cancel()
        job.unlink()

    def test_reset_to_draft_after_failure(self):
        job = self.make_job()
        job.action_submit()
        job._set_failed('boom')
        job.action_reset_to_draft()
        self.assertEqual((job.state, job.error_message), ('draft', False))

    def test_hyperparameters_checked(self):
        for bad in ('{not json', '[1]', '{"unknown_knob": 1}', '{"warmup_ratio": "high"}',
                    '{"warmup_ratio": 0.9}'):
            with self.assertRaises(ValidationError, msg=bad):
                with self.env.cr.savepoint():
                    self.make_job(hyperparameters=bad)
        job = self.make_job(hyperparameters='{"warmup_ratio": 0.1, "eval_steps": 5}')
        self.assertEqual(job._get_hyperparameters()['warmup_ratio'], 0.1)

    def test_base_model_must_belong_to_provider(self):
        other = self.env['llm.provider'].create({'name': 'Other', 'service': 'test'})
        with self.assertRaisesRegex(ValidationError, 'belongs to provider'):
            with self.env.cr.savepoint():
                self.make_job(provider_id=other.id)


class TestPlanTransitions(TrainingCase):
    """The reconcile rule as a plain function."""

    def test_plan(self):
        self.assertEqual(plan_transitions('queued', 'running'), ('training',))
        self.assertEqual(plan_transitions('queued', 'succeeded'), ('training', 'completed'))
        self.assertEqual(plan_transitions('training', 'succeeded'), ('completed',))
        self.assertEqual(plan_transitions('training', 'failed'), ('failed',))
        self.assertEqual(plan_transitions('training', 'cancelled'), ('cancelled',))
        self.assertEqual(plan_transitions('training', 'running'), ())
        self.assertEqual(plan_transitions('training', 'queued'), ())

    def test_plans_are_legal_and_idempotent(self):
        for state, _label in STATES:
            for status in PROVIDER_STATUSES:
                current = state
                for new in plan_transitions(state, status):
                    self.assertIn(new, TRANSITIONS[current], '%s/%s' % (state, status))
                    current = new
                self.assertEqual(plan_transitions(current, status), (), 'applying twice must do nothing')

    def test_unknown_status_raises(self):
        with self.assertRaises(ValueError):
            plan_transitions('training', 'paused')
