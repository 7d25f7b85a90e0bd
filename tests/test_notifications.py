"""How a finished job tells people: a chatter summary, a To Do for the owner on failure, the
creator following; unmeasured values blank; a readable log."""
import json
import unittest

from odoo.addons.llm_training.lib.jobs import job_summary

from .common import TrainingCase


class TestSummaryTexts(unittest.TestCase):

    def test_unmeasured_values_are_blank(self):
        title, rows = job_summary.summary_lines('completed', duration=125, trained_tokens=1234, train_loss=0.9,
                                                valid_loss=None, compute_seconds=61, result_model='M v2')
        rows = dict(rows)
        self.assertEqual(title, 'Training completed')
        self.assertEqual((rows['Duration'], rows['Trained tokens'], rows['Compute time']), ('2 min', '1234', '1 min'))
        self.assertEqual((rows['Final train loss'], rows['Final valid loss']), ('0.9000', ''))
        self.assertNotIn('Cost', rows, 'an unpriced provider: compute time, not a cost of 0')

    def test_log_drops_library_warnings_and_reads_line_by_line(self):
        tail = ('step 1 loss 2.5\n'
                '/venv/lib/python3.11/site-packages/transformers/trainer.py:123: FutureWarning: `tokenizer` is '
                'deprecated\n'
                '  warnings.warn(\n'
                '/venv/lib/torch/utils.py:9: UserWarning: TypedStorage is deprecated\n'
                '  return self.fget.__get__(instance, owner)()\n'
                'step 2 loss 1.9\n')
        text = job_summary.readable_log([('2026-11-26 10:00:05', 'error', 'Failed\nout of memory'),
                                         ('2026-11-26 10:00:00', 'info', 'State: Validating')], tail)
        lines = text.splitlines()
        self.assertEqual(lines[0], '2026-11-26 10:00:00  INFO     State: Validating')
        self.assertEqual(lines[1], '2026-11-26 10:00:05  ERROR    Failed')
        self.assertEqual(lines[2].strip(), 'out of memory')
        self.assertIn('step 1 loss 2.5\nstep 2 loss 1.9', text)
        self.assertNotIn('Warning', text)
        self.assertNotIn('warnings.warn', text)


class TestNotifications(TrainingCase):

    def summaries(self, job, title):
        return job.message_ids.filtered(lambda m: m.subject == title)

    def test_completion_posts_a_summary_in_the_chatter(self):
        job = self.make_job()
        job.action_submit()
        self.run_cron(3)
        self.assertEqual(job.state, 'completed')
        message = self.summaries(job, 'Training completed')
        self.assertEqual(len(message), 1)
        body = message.body
        self.assertIn('Trained tokens: 1234', body)
        self.assertIn('Final train loss: 0.9000', body, 'the last step that measured it (10)')
        self.assertIn('Final valid loss: 1.7000', body, 'step 10 did not measure it: step 5 did')
        self.assertIn('Compute time: ', body)
        self.assertIn('Duration: ', body)
        self.assertIn('Result model: %s' % job.result_model_id.name, body)
        self.assertFalse(job.activity_ids, 'no To Do for a success')

    def test_priced_completion_says_the_cost(self):
        self.base_model.training_price = 2000.0
        job = self.make_job()
        job.action_submit()
        self.run_cron(3)
        self.assertIn('Cost: %.2f USD' % job.final_cost, self.summaries(job, 'Training completed').body)

    def test_failure_gives_the_owner_a_todo_with_the_reason(self):
        owner = self.env['res.users'].with_context(no_reset_password=True).create({
            'name': 'Owner', 'login': 'llm_job_owner',
            'groups_id': [(6, 0, [self.env.ref('llm_training.group_llm_manager').id])]})
        provider = self.env['llm.provider'].create({'name': 'OOM', 'service': 'test', 'test_behavior': 'fail_job'})
        job = self.make_job(provider=provider, user_id=owner.id)
        job.action_submit()
        self.run_cron(3)
        self.assertEqual(job.state, 'failed')
        activity = self.env['mail.activity'].search([('res_model', '=', 'llm.training.job'), ('res_id', '=', job.id)])
        self.assertEqual(len(activity), 1)
        self.assertEqual(activity.user_id, owner)
        self.assertEqual(activity.activity_type_id, self.env.ref('mail.mail_activity_data_todo'))
        self.assertIn('out of memory at step 7', activity.note)
        self.assertIn('Resume it from its last checkpoint', activity.note, 'the scripted provider can resume')
        self.assertIn('Reason: test provider: out of memory at step 7', self.summaries(job, 'Training failed').body)

    def test_failure_without_owner_goes_to_the_creator(self):
        provider = self.env['llm.provider'].create({'name': 'OOM', 'service': 'test', 'test_behavior': 'fail_job'})
        job = self.make_job(provider=provider, user_id=False)
        job.action_submit()
        self.run_cron(3)
        self.assertEqual(job.activity_ids.user_id, job.create_uid)

    def test_cancel_posts_a_summary(self):
        job = self.make_job()
        job.action_submit()
        job.action_cancel()
        self.assertEqual(len(self.summaries(job, 'Training cancelled')), 1)

    def test_the_creator_follows_the_job(self):
        manager = self.env['res.users'].with_context(no_reset_password=True).create({
            'name': 'Creator', 'login': 'llm_job_creator',
            'groups_id': [(6, 0, [self.env.ref('llm_training.group_llm_manager').id])]})
        env = self.env(user=manager.id, context=dict(self.env.context, tracking_disable=True))
        job = self.make_job(env=env, dataset=self.make_dataset())
        self.assertIn(manager.partner_id, job.message_partner_ids)


class TestUnmeasuredMetrics(TrainingCase):

    def test_an_unmeasured_valid_loss_reads_as_not_measured(self):
        job = self.make_job()
        job.action_submit()
        self.run_cron(2)  # steps 1 (train loss only) and 5 (train and valid)
        step1, step5 = job.metric_ids.sorted('step')
        self.assertEqual((step1.has_train_loss, step1.has_valid_loss), (True, False))
        self.assertEqual((step5.has_train_loss, step5.has_valid_loss), (True, True))
        self.env.cr.execute('SELECT valid_loss FROM llm_training_job_metric WHERE id = %s', (step1.id,))
        self.assertIsNone(self.env.cr.fetchone()[0], 'stored as not measured, not 0')
        self.assertTrue(job.has_final_valid_loss)
        self.assertAlmostEqual(job.final_valid_loss, 1.7, places=5)

    def test_the_loss_curve_has_a_point_per_measured_step_and_none_for_unmeasured(self):
        job = self.make_job()
        self.assertEqual(json.loads(job.loss_curve), [], 'no metrics: no series')
        job.action_submit()
        self.run_cron(2)  # steps 1 (train loss only) and 5 (train and valid)
        job.invalidate_cache()
        self.assertEqual(json.loads(job.loss_curve), [
            {'key': 'Training loss', 'values': [{'x': 1, 'y': 2.5}, {'x': 5, 'y': 1.5}]},
            {'key': 'Validation loss', 'values': [{'x': 5, 'y': 1.7}]}])

    def test_a_job_without_metrics_has_no_final_losses(self):
        job = self.make_job()
        self.assertEqual((job.has_final_train_loss, job.has_final_valid_loss), (False, False))

    def test_the_log_tab_lists_the_events_with_time_and_level(self):
        job = self.make_job()
        job.action_submit()
        job._write_workflow({'log': 'loading\n/x.py:1: FutureWarning: old\n  warnings.warn(\ntraining\n'})
        lines = job.log_text.splitlines()
        self.assertRegex(lines[0], r'^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  INFO     State: Validating$')
        self.assertIn('loading\ntraining', job.log_text)
        self.assertNotIn('FutureWarning', job.log_text)
