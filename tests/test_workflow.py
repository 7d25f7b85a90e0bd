from datetime import datetime, timedelta

from odoo import fields
from odoo.exceptions import UserError

from .common import TrainingCase, jsonl, valid_examples


class TestWorkflow(TrainingCase):

    def test_submit_to_completed_through_the_cron(self):
        job = self.make_job(validation_split=0.25, seed=7)
        job.action_submit()
        self.run_cron()  # validating -> preparing -> queued -> started; provider says queued
        self.assertEqual(job.state, 'queued')
        self.assertEqual(job.external_job_id, 'test-job-%d-1' % job.id)
        self.assertEqual(job.train_examples + job.validation_examples, 12)
        self.assertTrue(job.validation_examples)
        self.run_cron()  # provider: running
        self.assertEqual((job.state, job.progress, job.current_step), ('training', 50.0, 5))
        self.assertEqual(job.metric_ids.mapped('step'), [1, 5])
        step5 = job.metric_ids.filtered(lambda m: m.step == 5)
        self.assertEqual((step5.train_loss, step5.valid_loss), (1.5, 1.7))
        self.run_cron()  # provider: succeeded
        self.assertEqual(job.state, 'completed')
        self.assertEqual(job.trained_tokens, 1234)
        model = job.result_model_id
        self.assertEqual((model.kind, model.model_ref, model.base_model_id), ('fine_tuned', 'test-ft-%d' % job.id,
                                                                               self.base_model))
        self.assertEqual(model.job_id, job)
        external = job.event_ids.filtered('external_id').mapped('external_id')
        self.assertEqual(sorted(external), ['ev-1', 'ev-2', 'ev-3'])  # ev-1 sent twice, stored once
        self.run_cron()
        self.assertEqual(self.calls(job, 'check'), 3, 'a finished job is not polled again')

    def test_check_status_button_moves_the_job(self):
        job = self.make_job()
        job.action_submit()
        for _ in range(3):
            job.action_check_status()
        self.assertEqual(job.state, 'completed')

    def test_prepared_files_are_written(self):
        job = self.make_job(validation_split=0.5, seed=1)
        job.action_submit()
        self.run_cron()
        with open('%s/train.jsonl' % job.work_dir) as f:
            train = f.read().splitlines()
        with open('%s/validation.jsonl' % job.work_dir) as f:
            validation = f.read().splitlines()
        self.assertEqual((len(train), len(validation)), (job.train_examples, job.validation_examples))
        self.assertEqual(len(train) + len(validation), 12)

    def test_invalid_dataset_fails_at_validating(self):
        dataset = self.make_dataset(jsonl(valid_examples(10)) + b'{"messages": [{"role": "bot"}]}\n', name='bad.jsonl')
        job = self.make_job(dataset)
        job.action_submit()
        self.run_cron()
        self.assertEqual(job.state, 'failed')
        self.assertIn('bad.jsonl:11: messages[0].role', job.error_message)
        self.assertEqual(dataset.state, 'invalid')
        self.assertEqual(self.calls(job, 'start'), 0)

    def test_provider_failure_marks_that_job_only(self):
        bad_provider = self.env['llm.provider'].create({'name': 'Refuses', 'service': 'test',
                                                        'test_behavior': 'fail_start'})
        bad = self.make_job(provider=bad_provider)
        good = self.make_job()
        (bad | good).action_submit()
        self.run_cron()
        self.assertEqual(bad.state, 'failed')
        self.assertIn('quota exceeded', bad.error_message)
        self.assertEqual(good.state, 'queued')
        self.run_cron(2)
        self.assertEqual(good.state, 'completed')

    def test_unexpected_error_is_retried_then_fails(self):
        crashing = self.env['llm.provider'].create({'name': 'Crashes', 'service': 'test',
                                                    'test_behavior': 'crash_start'})
        job = self.make_job(provider=crashing)
        job.action_submit()
        self.run_cron()
        self.assertEqual((job.state, job.retry_count), ('queued', 1))
        self.assertTrue(job.next_attempt_at)
        self.run_cron()
        self.assertEqual(job.retry_count, 1, 'postponed: not retried before next_attempt_at')
        for attempt in range(2, 6):
            job.write({'next_attempt_at': False})
            self.run_cron()
        self.assertEqual(job.state, 'failed')
        self.assertIn('Gave up after 5 attempts', job.error_message)
        self.assertIn('connection reset', job.error_message)

    def test_transient_check_error_keeps_state(self):
        flaky = self.env['llm.provider'].create({'name': 'Flaky', 'service': 'test', 'test_behavior': 'retry_check'})
        job = self.make_job(provider=flaky)
        job.action_submit()
        self.run_cron()
        self.assertEqual((job.state, job.retry_count), ('queued', 1))
        self.assertIn('503', job.event_ids[0].message)
        flaky.test_behavior = 'succeed'
        job.write({'next_attempt_at': False})
        self.run_cron()
        self.assertEqual(job.retry_count, 0, 'a good pass resets the retry counter')

    def test_estimate_uses_the_provider_default_epochs(self):
        self.base_model.training_price = 2.0
        dataset = self.make_dataset()
        dataset._validate()
        job = self.make_job(dataset=dataset, epochs=0)
        self.assertEqual(job.estimated_epochs, 3, 'not a local or scripted trainer: its default, not OpenAI\'s rule')
        self.assertAlmostEqual(job.estimated_cost, dataset.token_total * 3 * 2.0 / 1e6, places=4)

    def test_provider_reports_failure(self):
        provider = self.env['llm.provider'].create({'name': 'OOM', 'service': 'test', 'test_behavior': 'fail_job'})
        job = self.make_job(provider=provider)
        job.action_submit()
        self.run_cron(3)
        self.assertEqual(job.state, 'failed')
        self.assertEqual(job.error_message, 'test provider: out of memory at step 7')
        self.assertFalse(job.result_model_id)

    def test_cancel_before_provider_is_immediate(self):
        job = self.make_job()
        job.action_submit()
        job.action_cancel()
        self.assertEqual(job.state, 'cancelled')
        self.run_cron()
        self.assertEqual(self.calls(job, 'start'), 0)
        draft = self.make_job()
        draft.action_cancel()
        self.assertEqual(draft.state, 'cancelled')

    def test_cancel_while_the_start_is_pending_stops_the_run_too(self):
        job = self.make_job()
        job.action_submit()
        job._write_workflow({'state': 'queued', 'start_pending': True})  # committed intent, call not recorded
        job.action_cancel()
        self.assertEqual((job.state, job.cancel_requested), ('queued', True))
        self.run_cron()  # the keyed start finds or makes the run, then cancels it there
        self.assertEqual(self.calls(job, 'cancel'), 1)
        self.run_cron()
        self.assertEqual(job.state, 'cancelled')

    def test_cancel_at_provider_waits_for_confirmation(self):
        job = self.make_job()
        job.action_submit()
        self.run_cron(2)
        self.assertEqual(job.state, 'training')
        job.action_cancel()
        self.assertEqual(self.calls(job, 'cancel'), 1)
        self.assertEqual(job.state, 'cancelled')  # the scripted provider confirms on the next check
        self.assertTrue(job.cancel_requested)

    def test_job_that_dies_after_a_cancel_request_is_cancelled(self):
        provider = self.env['llm.provider'].create({'name': 'Dies', 'service': 'test', 'test_behavior': 'fail_job'})
        job = self.make_job(provider=provider)
        job.action_submit()
        self.run_cron(2)
        self.assertEqual(job.state, 'training')
        job.write({'cancel_requested': True})  # as action_cancel does, before the process died
        self.run_cron()
        self.assertEqual(job.state, 'cancelled')

    def test_missing_service_implementation_is_a_clear_error(self):
        provider = self.env['llm.provider'].create({'name': 'Bare', 'service': 'test'})
        with self.assertRaisesRegex(UserError, 'Provider "Bare" cannot generate replies'):
            provider._call_adapter('generate', 'test-model', 'Hello')

    def test_concurrency_limit_keeps_extra_jobs_queued(self):
        limited = self.env['llm.provider'].create({'name': 'Two slots', 'service': 'test', 'max_concurrent_jobs': 2})
        jobs = [self.make_job(provider=limited) for _ in range(3)]
        for job in jobs:
            job.action_submit()
        self.run_cron()
        started = [j for j in jobs if j.external_job_id]
        self.assertEqual(len(started), 2)
        waiting = [j for j in jobs if not j.external_job_id][0]
        self.assertEqual(waiting.state, 'queued')
        self.run_cron()  # the first two are training; still no slot
        self.assertFalse(waiting.external_job_id)
        self.run_cron()  # the first two complete; the slot frees and the third starts
        self.assertTrue(all(j.state == 'completed' for j in started))
        self.run_cron()
        self.assertTrue(waiting.external_job_id)

    def test_stuck_job_is_failed(self):
        job = self.make_job()
        job.action_submit()
        self.run_cron(2)
        self.assertEqual(job.state, 'training')
        old = fields.Datetime.to_string(datetime.utcnow() - timedelta(hours=30))
        self.env.cr.execute('UPDATE llm_training_job SET last_progress_at = %s WHERE id = %s', (old, job.id))
        self.run_cron()
        self.assertEqual(job.state, 'failed')
        self.assertIn('No progress for 24', job.error_message)
        self.assertEqual(self.calls(job, 'cancel'), 1, 'the provider is told to stop it')


class TestDatasetModel(TrainingCase):

    def test_validate_stores_statistics_and_report(self):
        dataset = self.make_dataset(jsonl(valid_examples(12)))
        dataset.action_validate()
        self.assertEqual((dataset.state, dataset.example_count, dataset.message_count), ('valid', 12, 24))
        self.assertTrue(0 < dataset.token_min <= dataset.token_mean <= dataset.token_max)

    def test_invalid_file_report(self):
        dataset = self.make_dataset(b'\xef\xbb\xbf' + jsonl(valid_examples(3)), name='short.jsonl')
        dataset.action_validate()
        self.assertEqual(dataset.state, 'invalid')
        self.assertIn('short.jsonl:1: the file starts with a byte-order mark', dataset.validation_report)
        self.assertIn('at least 10', dataset.validation_report)
        self.assertEqual(dataset.error_count, 2)

    def test_new_file_resets_verdict(self):
        dataset = self.make_dataset()
        dataset.action_validate()
        attachment = self.env['ir.attachment'].create({'name': 'more.jsonl', 'datas': b''})
        dataset.write({'attachment_ids': [(4, attachment.id)]})
        self.assertEqual(dataset.state, 'draft')

    def test_no_file(self):
        dataset = self.env['llm.training.dataset'].create({'name': 'empty'})
        with self.assertRaisesRegex(UserError, 'has no file; upload at least one file or set a server path'):
            dataset.action_validate()


class TestEngine(TrainingCase):
    """The sync engine: fair, prompt, and never failing a job that may still run."""

    def test_unexpected_poll_errors_never_fail_a_job_at_the_provider(self):
        crashing = self.env['llm.provider'].create({'name': 'Crashes on check', 'service': 'test',
                                                    'test_behavior': 'crash_check'})
        job = self.make_job(provider=crashing)
        job.action_submit()
        self.run_cron()
        self.assertTrue(job.external_job_id)
        for _attempt in range(8):  # well past MAX_RETRIES
            job._write_workflow({'next_attempt_at': False})
            self.run_cron()
        self.assertEqual(job.state, 'queued', 'it may still be training there: never failed blindly')
        self.assertEqual(job.retry_count, 9)
        retries = job.event_ids.filtered(lambda e: 'unexpected payload' in e.message and e.level == 'warning')
        self.assertEqual(len(retries), 9, 'each failed attempt is an event')

    def test_cron_visits_least_recently_synced_first(self):
        jobs = [self.make_job() for _ in range(3)]
        for job in jobs:
            job.action_submit()
        jobs[0]._write_workflow({'last_synced_at': '2026-01-02 00:00:00'})
        jobs[1]._write_workflow({'last_synced_at': '2026-01-01 00:00:00'})
        due = [i for i in self.env['llm.training.engine']._due_job_ids() if i in [j.id for j in jobs]]
        self.assertEqual(due, [jobs[2].id, jobs[1].id, jobs[0].id])

    def test_one_pass_moves_every_submitted_job_behind_a_limit(self):
        limited = self.env['llm.provider'].create({'name': 'One at a time', 'service': 'test',
                                                   'max_concurrent_jobs': 1, 'test_behavior': 'hold'})
        dataset = self.make_dataset()
        jobs = self.env['llm.training.job']
        for _i in range(30):
            jobs |= self.make_job(dataset=dataset, provider=limited)
        jobs.action_submit()
        self.run_cron()
        # validate, prepare and start chain in one pass; the limit keeps the rest Queued
        self.assertEqual(sorted(set(jobs.mapped('state'))), ['queued'])
        self.assertEqual(len(jobs.filtered('external_job_id')), 1)
        self.assertTrue(all(jobs.mapped('last_synced_at')), 'every job was visited')

    def test_a_job_read_ahead_then_changed_elsewhere_is_read_again_at_its_claim(self):
        engine = self.env['llm.training.engine']
        job = self.make_job(provider=self.env['llm.provider'].create(
            {'name': 'Holding', 'service': 'test', 'test_behavior': 'hold'}))
        job.action_submit()
        self.run_cron(2)
        self.assertEqual((job.state, job.cancel_requested), ('training', False))
        seen = engine._read_ahead([job.id])
        self.assertTrue(job._cache.has_value('cancel_requested'))
        # unchanged since the read: the claim keeps what was read (no second query for it)
        self.assertTrue(engine._claim(job.id, seen=seen[job.id]))
        self.assertTrue(job._cache.has_value('cancel_requested'))
        # another worker's write (its own transaction, so its own time) after the read-ahead
        self.env.cr.execute("UPDATE llm_training_job SET cancel_requested = true, write_date = clock_timestamp() "
                            "AT TIME ZONE 'UTC' WHERE id = %s", (job.id,))
        self.assertFalse(job.cancel_requested, 'the cache still holds what was read ahead')
        self.assertTrue(engine._claim(job.id, seen=seen[job.id]))
        self.assertTrue(job.cancel_requested, 'the claim dropped the stale read')

    def test_loss_curve_opens_the_job_measured_losses_by_step(self):
        job = self.make_job()
        job.action_submit()
        self.run_cron(3)
        self.assertEqual(job.state, 'completed')
        action = job.action_open_loss_curve()
        self.assertEqual((action['res_model'], action['view_mode']), ('llm.training.job.metric', 'graph,pivot'))
        self.assertEqual(action['context'], {'search_default_train_measured': 1})
        Metric = self.env[action['res_model']]
        # what the graph draws: train loss per step over the measured steps of this job only
        groups = Metric.read_group(action['domain'] + [('has_train_loss', '=', True)], ['step', 'train_loss'],
                                   ['step'], orderby='step')
        self.assertEqual([(g['step'], g['train_loss']) for g in groups], [(1, 2.5), (5, 1.5), (10, 0.9)])
        valid = Metric.read_group(action['domain'] + [('has_valid_loss', '=', True)], ['step', 'valid_loss'],
                                  ['step'], orderby='step')
        self.assertEqual([(g['step'], g['valid_loss']) for g in valid], [(5, 1.7)])
