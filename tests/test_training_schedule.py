import base64
import json
from datetime import datetime
from unittest import mock

from odoo.exceptions import AccessError

from .common import TrainingCase
from .conversations_common import ConversationCase

NOW = 'odoo.addons.llm_training.models.llm_training_schedule._now'


class TestTrainingSchedule(TrainingCase, ConversationCase):
    """The hourly cron turns new channel conversations into a submitted copy of the template job."""

    @classmethod
    def setUpClass(cls):
        super(TestTrainingSchedule, cls).setUpClass()
        cls.template = cls.make_job(name='Support template', epochs=2)
        cls.cron = cls.env.ref('llm_training.ir_cron_run_training_schedules')

    def make_schedule(self, **values):
        vals = {'name': 'Support weekly', 'user_id': self.manager.id, 'template_job_id': self.template.id,
                'source': 'channel', 'channel_ids': [(6, 0, self.channel.ids)],
                'assistant_partner_ids': [(6, 0, self.agent.partner_id.ids)], 'interval_number': 1,
                'interval_type': 'weeks', 'next_run': '2020-03-09 00:00:00', 'min_new_examples': 10}
        vals.update(values)
        return self.env['llm.training.schedule'].create(vals)

    def exchanges(self, count, day, first=0):
        """`count` question/answer pairs on 2020-03-`day`, two hours apart (separate conversations)."""
        start = datetime(2020, 3, day, 6, 0)
        for i in range(first, first + count):
            minutes = 120 * (i - first)
            self.post(self.channel, minutes, self.alice, '<p>Question %d?</p>' % i, start=start)
            self.post(self.channel, minutes + 1, self.agent, '<p>Answer %d.</p>' % i, start=start)

    def run_schedules(self, at):
        with mock.patch(NOW, return_value=at):
            self.cron.method_direct_trigger()

    def notes(self, schedule):
        return schedule.message_ids.filtered(lambda m: m.subtype_id == self.note).mapped('body')

    def dataset_questions(self, job):
        content = base64.b64decode(job.dataset_ids.attachment_ids.datas).decode('utf-8')
        return [json.loads(line)['messages'][0]['content'] for line in content.splitlines()]

    def test_cron_creates_and_submits_a_copy_of_the_template(self):
        self.exchanges(12, day=2)
        schedule = self.make_schedule()
        self.run_schedules('2020-03-10 00:00:00')
        job = schedule.job_ids
        self.assertEqual(len(job), 1)
        self.assertEqual((job.name, job.state, job.user_id, job.create_uid, job.schedule_id),
                         ('Support weekly 2020-03-10', 'validating', self.manager, self.manager, schedule))
        self.assertEqual((job.provider_id, job.base_model_id, job.epochs),
                         (self.template.provider_id, self.template.base_model_id, 2))
        self.assertEqual((job.dataset_ids.state, job.dataset_ids.example_count), ('valid', 12))
        self.assertEqual(self.dataset_questions(job), ['Question %d?' % i for i in range(12)])
        self.assertEqual((schedule.last_run, schedule.last_job_id, schedule.next_run),
                         ('2020-03-10 00:00:00', job, '2020-03-16 00:00:00'))
        self.assertTrue(any('Submitted job' in body for body in self.notes(schedule)))
        self.run_cron()  # the jobs' own cron takes it on: really submitted
        self.assertEqual(job.state, 'queued')
        self.assertEqual(self.template.state, 'draft')

    def test_too_few_new_examples_skip_with_a_note(self):
        self.exchanges(3, day=2)
        schedule = self.make_schedule()
        datasets = self.env['llm.training.dataset'].search_count([])
        self.run_schedules('2020-03-10 00:00:00')
        self.assertFalse(schedule.job_ids)
        self.assertEqual(self.env['llm.training.dataset'].search_count([]), datasets)
        self.assertTrue(any('Skipped: 3 new examples so far, fewer than the 10 needed' in body
                            for body in self.notes(schedule)), self.notes(schedule))
        self.assertEqual((schedule.last_run, schedule.next_run), (False, '2020-03-16 00:00:00'))

    def test_over_the_monthly_budget_the_run_is_skipped_with_a_note(self):
        self.exchanges(12, day=2)
        self.template.base_model_id.training_price = 1e6
        self.template.provider_id.monthly_budget = 0.01
        schedule = self.make_schedule()
        datasets = self.env['llm.training.dataset'].search_count([])
        self.run_schedules('2020-03-10 00:00:00')
        self.assertFalse(schedule.job_ids)
        self.assertEqual(self.env['llm.training.dataset'].search_count([]), datasets, 'nothing of the run is kept')
        self.assertTrue(any('Skipped: Provider' in body and 'would go over its monthly budget' in body
                            and 'the budget is 0.01 USD' in body for body in self.notes(schedule)),
                        self.notes(schedule))
        self.assertEqual((schedule.last_run, schedule.next_run), (False, '2020-03-16 00:00:00'))

    def test_second_run_uses_only_conversations_after_the_first(self):
        self.exchanges(10, day=2)
        schedule = self.make_schedule()
        self.run_schedules('2020-03-10 00:00:00')
        self.exchanges(10, day=12, first=100)
        self.run_schedules('2020-03-13 00:00:00')  # not due before 2020-03-16
        self.assertEqual(len(schedule.job_ids), 1)
        self.run_schedules('2020-03-16 00:00:00')
        second = schedule.last_job_id
        self.assertEqual(len(schedule.job_ids), 2)
        self.assertEqual(second.name, 'Support weekly 2020-03-16')
        self.assertEqual(self.dataset_questions(second), ['Question %d?' % i for i in range(100, 110)])
        self.assertTrue(any('since 2020-03-10 00:00:00' in body for body in self.notes(schedule)))
        self.assertEqual(schedule.next_run, '2020-03-23 00:00:00')

    def test_runs_with_the_owner_rights(self):
        self.exchanges(12, day=2)
        schedule = self.make_schedule(user_id=self.outsider.id)  # a manager who is not in the channel
        self.run_schedules('2020-03-10 00:00:00')
        self.assertFalse(schedule.job_ids)
        notes = self.notes(schedule)
        self.assertTrue(any('Skipped: 0 new examples' in body and 'cannot read them: 1' in body for body in notes), notes)

    def test_a_failed_run_is_noted_and_leaves_nothing(self):
        self.exchanges(12, day=2)
        schedule = self.make_schedule(user_id=self.alice.id)  # may read the channel, not create datasets
        datasets = self.env['llm.training.dataset'].search_count([])
        self.run_schedules('2020-03-10 00:00:00')
        self.assertFalse(schedule.job_ids)
        self.assertEqual(self.env['llm.training.dataset'].search_count([]), datasets)
        self.assertTrue(any('Run failed' in body for body in self.notes(schedule)), self.notes(schedule))
        self.assertEqual((schedule.last_run, schedule.next_run), (False, '2020-03-16 00:00:00'))

    def test_run_now_checks_write_access_then_runs_at_once(self):
        self.exchanges(12, day=2)
        schedule = self.make_schedule()
        with self.assertRaises(AccessError):
            schedule.sudo(self.alice).action_run_now()
        self.assertFalse(schedule.job_ids)
        self.assertTrue(schedule.sudo(self.manager).action_run_now())
        self.assertEqual(len(schedule.job_ids), 1)
        self.assertEqual(schedule.next_run, '2020-03-09 00:00:00', 'Run Now leaves the next run as it is')

    def test_a_run_archives_the_draft_models_beyond_keep_models(self):
        schedule = self.make_schedule(keep_models=2)
        Model = self.env['llm.model']
        made = Model.browse()
        for version in (1, 2, 3, 4):
            job = self.template.copy({'name': 'run %d' % version, 'schedule_id': schedule.id})
            made |= Model.create({'name': 'support v%d' % version, 'provider_id': self.provider.id, 'kind': 'fine_tuned',
                                  'model_ref': 'support-v%d' % version, 'job_id': job.id, 'version': version})
        made[3].write({'purpose': 'support'})
        made[3].action_deploy()  # deployed: never archived by the schedule
        schedule.sudo(self.manager)._archive_old_models()
        self.assertEqual([m.state for m in made.with_context(active_test=False)],
                         ['archived', 'draft', 'draft', 'deployed'])
        self.assertFalse(made[0].active)
        self.assertIn('Archived 1 older model(s), keeping the newest 2', ' '.join(self.notes(schedule)))
