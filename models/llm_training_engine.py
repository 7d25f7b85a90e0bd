# -*- coding: utf-8 -*-
"""The sync engine: the only code that moves a training job between states.

A reconcile loop. For each job it claims the row (FOR UPDATE SKIP LOCKED, so two workers or a
worker and a button never act on one job), then runs the cheap steps in a chain (validate,
prepare, start, poll) until the job waits on something, each in a savepoint so a failing step
keeps what earlier ones did. Before a provider is asked to start a job, the engine commits the
intent (`start_pending`, which also holds the provider slot): a crash or rollback after the call
is reconciled on the next pass by starting again, which every provider makes idempotent with the
job's key (`job_key`). The cron, Submit, Check Status, Cancel and XML-RPC all come here.
"""
import json
import logging
import threading
import time
from datetime import datetime, timedelta

import psycopg2

import odoo
from odoo import SUPERUSER_ID, _, api, fields, models, tools
from odoo.exceptions import UserError, ValidationError
from odoo.tools import html_escape

from ..lib.jobs import job_status, pricing
from ..lib.host import limits
from ..lib.exceptions import TrainingFailedError, TrainingRetryableError
from ..user_errors import DatasetBusyError, JobRefused
from .llm_training_evaluation import TIMEOUT_OPTION as EVAL_TIMEOUT_OPTION
from .llm_training_evaluation import timeout_minutes as evaluation_timeout_minutes

_logger = logging.getLogger(__name__)

MAX_RESUBMITS = 3  # runs the provider lost (a restarted Ray head) started again from their checkpoint
MAX_RETRIES = 5  # before a job reaches its provider; after, it goes on there and is never given up
RETRY_DELAYS = (30, 60, 120, 300, 600)  # seconds before attempt n+1
PREFETCH_JOBS = 200  # jobs read ahead in one query by the cron
CRON_BUDGET_SECONDS = 45  # one cron run (less if the cron worker's time limit is lower); the rest waits for the next run
DEFAULT_STUCK_HOURS = 24
COMMIT = 'commit'  # what a step returns to have its writes committed before the next step
# After Submit commits, a background thread follows the job this long (validate, prepare, start,
# then a poll a second until the trainer reports running); the cron goes on after that.
FOLLOW_SECONDS = 300
FOLLOW_POLL_SECONDS = 1.0
FOLLOWED_STATES = ('validating', 'preparing', 'queued')


def _following_enabled():
    """odoo.conf `llm_training_submit_starts_at_once = False` leaves everything to the cron. Not in
    test runs: a thread waiting on a test's rows (never committed) would hold a connection until
    the test ends; the tests of this behaviour turn it on."""
    option = str(tools.config.get('llm_training_submit_starts_at_once', True)).lower()
    return option not in ('0', 'false', 'no') and not tools.config.get('test_enable')


def _follow_jobs(dbname, job_ids, seconds=FOLLOW_SECONDS):
    """The background part of Submit: once the submitting transaction has ended (its row locks on
    the jobs are the signal), run the jobs' due steps and poll until the provider reports them
    running, a final state, or `seconds` have passed. Each pass is its own committed
    transaction, claimed like the cron's, so the cron or a button meanwhile never doubles a step."""
    deadline = time.time() + seconds
    try:
        with api.Environment.manage():
            registry = odoo.registry(dbname)
            with registry.cursor() as cr:
                try:
                    cr.execute("SET LOCAL lock_timeout = %s", ('%dms' % (seconds * 1000),))
                    cr.execute('SELECT id FROM llm_training_job WHERE id IN %s FOR UPDATE', (tuple(job_ids),),
                               log_exceptions=False)
                except psycopg2.extensions.TransactionRollbackError:
                    pass  # the Submit committed its change after our snapshot: it has ended
                cr.rollback()
            pending = list(job_ids)
            while pending and time.time() < deadline:
                with registry.cursor() as cr:
                    env = api.Environment(cr, SUPERUSER_ID, {})
                    now = _now()
                    jobs = env['llm.training.job'].browse(pending).exists().filtered(
                        lambda j: j.state in FOLLOWED_STATES and not (j.next_attempt_at and j.next_attempt_at > now))
                    if jobs:
                        env['llm.training.engine']._sync(jobs)
                        cr.commit()  # this pass's work is kept before the next poll
                        jobs.invalidate_cache()
                    pending = jobs.filtered(lambda j: j.state in FOLLOWED_STATES).ids
                if pending:
                    time.sleep(FOLLOW_POLL_SECONDS)
    except psycopg2.OperationalError as e:
        if e.pgcode != '55P03':  # lock_not_available: the Submit never ended in time, the cron goes on
            _logger.exception('Training jobs %s: following them after Submit failed; the cron goes on', job_ids)
    except Exception:
        _logger.exception('Training jobs %s: following them after Submit failed; the cron goes on', job_ids)


def _evaluations_enabled():
    """odoo.conf `llm_training_run_evaluations = False` leaves evaluations pending (queued, not
    run). Off in test runs unless a test turns it on: the suite's other trainings would each start
    an evaluator process that outlives its test and takes CPU from the next ones."""
    option = tools.config.get('llm_training_run_evaluations')
    if option is None:
        return not tools.config.get('test_enable')
    return str(option).lower() not in ('0', 'false', 'no')


def _now():
    return fields.Datetime.now()


class LlmTrainingEngine(models.AbstractModel):
    """Every method is private (underscore): XML-RPC reaches the engine only through the job's
    actions, which check access first."""
    _name = 'llm.training.engine'
    _description = 'LLM Training Sync Engine'

    # -- entry points ------------------------------------------------------------------------
    @api.model
    def _sync(self, jobs):
        """Move `jobs` on now (the job's buttons, also over XML-RPC), as the cron would. A job
        another worker holds is left to it. The caller has checked access."""
        for job in jobs:
            if self._claim(job.id):
                self._step(job)
        return True

    @api.model
    def _submit(self, jobs, budget_override_reason=None):
        """Submit (the job's Submit, XML-RPC, /v1): Draft -> Validating, refused over the provider's
        monthly budget (BudgetExceeded, with the figures) unless `budget_override_reason` says why
        to go over (kept as a job event). The caller has checked access."""
        for job in jobs:
            if not job.dataset_ids:
                raise UserError(_('Add at least one training dataset before submitting.'))
            job._check_readable_links()  # what was linked may have been restricted since
            job._check_trainable()
            job._check_company_active_jobs(self.env.context.get('llm_active_jobs_limit') or 0)
            over = job._check_budget(budget_override_reason)
            job._change_state('validating', error_message=False, retry_count=0, next_attempt_at=False,
                              cancel_requested=False, progress=0.0)
            if over:
                job._add_event(_('Submitted over the monthly budget by %s: %s Reason: %s')
                               % (self.env.user.name, over, budget_override_reason.strip()), level='warning')
        # the job moves on right after this commits, not at the cron's next minute
        self._follow_after_commit(jobs)
        return True

    @api.model
    def _resume(self, jobs):
        """A failed or cancelled job again from its last checkpoint, as a new attempt (Queued).
        The caller has checked access."""
        for job in jobs:
            if job.state not in job_status.RESUMABLE_STATES:
                raise UserError(_('Job "%s" is %s; only a failed or cancelled job can be resumed.') % (job.name, job.state))
            if not job.provider_can_resume:
                raise UserError(_('Provider "%s" cannot resume a job from a checkpoint; submit a copy instead.')
                                % job.provider_id.name)
            job._set_provider_data(resume=True)
            job._change_state('queued', error_message=False, external_job_id=False, retry_count=0,
                              next_attempt_at=False, cancel_requested=False, finished_at=False,
                              attempt=job.attempt + 1, start_pending=False, resubmit_count=0)
        self._follow_after_commit(jobs)
        return True

    @api.model
    def _reset_to_draft(self, jobs):
        """A failed or cancelled job back to Draft, its provider data forgotten (a new attempt when
        submitted again). The caller has checked access."""
        for job in jobs:
            job._change_state('draft', error_message=False, external_job_id=False, provider_data='{}',
                              progress=0.0, current_step=0, total_steps=0, current_epoch=0.0,
                              retry_count=0, next_attempt_at=False, cancel_requested=False,
                              attempt=job.attempt + 1, start_pending=False)
        return True

    @api.model
    def _follow_after_commit(self, jobs):
        """Move just-submitted jobs on in the background once this transaction commits (it
        returns at once); see _follow_jobs."""
        if jobs and _following_enabled():
            threading.Thread(target=_follow_jobs, args=(self.env.cr.dbname, jobs.ids),
                             name='llm-training-follow-%s' % jobs.ids[0], daemon=True).start()

    @api.model
    def _cron(self, budget=None):
        """Visit every active job that is due, least recently synced first, within `budget`
        seconds; what is left is first in line next run, so no job starves."""
        started = time.time()
        if budget is None:
            budget = limits.cron_budget(tools.config, CRON_BUDGET_SECONDS)
        self._sweep_stuck_jobs()
        due = self._due_job_ids()
        self._commit()  # the sweep's work is kept; each claim below starts from a clean transaction
        visited, seen = 0, {}
        for position, job_id in enumerate(due):
            if time.time() - started > budget:
                break
            if job_id not in seen:
                seen = self._read_ahead(due[position:position + PREFETCH_JOBS])
            if not self._claim(job_id, own_transaction=self._auto_commit(), seen=seen[job_id]):
                continue  # another worker holds it
            self._step(self.env['llm.training.job'].browse(job_id))
            visited += 1
            # Ends this job's transaction: keeps its progress and releases its row lock.
            self._commit()
        if time.time() - started <= budget:
            visited += self._run_evaluations(started, budget)
        return visited

    def _read_ahead(self, job_ids):
        """Read a batch of jobs in one query (the ORM would read each claimed job alone, the
        larger part of a pass), with each row's write_date to the microsecond: a claim that finds
        its row written since drops what was read of that job (see _claim)."""
        self.env['llm.training.job'].browse(job_ids).mapped('state')  # loads the batch's prefetched fields
        self.env.cr.execute('SELECT id, write_date FROM llm_training_job WHERE id IN %s', (tuple(job_ids),))
        return dict(self.env.cr.fetchall())

    @api.model
    def _due_job_ids(self):
        """Active jobs not waiting for a retry, least recently synced (never synced) first."""
        self.env.cr.execute("""
            SELECT id FROM llm_training_job
             WHERE state IN %s AND (next_attempt_at IS NULL OR next_attempt_at <= %s)
             ORDER BY last_synced_at ASC NULLS FIRST, id""", (job_status.ACTIVE_STATES, _now()))
        return [row[0] for row in self.env.cr.fetchall()]

    # -- claim and commit --------------------------------------------------------------------
    def _auto_commit(self):
        return not getattr(threading.currentThread(), 'testing', False)

    def _commit(self):
        """Commit when not in a test (Odoo's test transaction must not be committed)."""
        if self._auto_commit():
            self.env.cr.commit()

    def _claim(self, job_id, own_transaction=False, seen=None):
        """Lock the job's row and stamp the visit, or say no when another worker holds it or has
        just changed it (under REPEATABLE READ, a row updated since our snapshot fails with a
        serialization error). `own_transaction`: the claim is the first statement of a
        transaction that holds nothing else (the cron's), so a refusal rolls it back whole
        instead of paying for a savepoint. Such a transaction also commits without waiting for the
        disk (synchronous_commit off, in the same round trip): everything it writes is re-derived
        from the provider on the next pass if a crash loses it (reports are applied idempotently,
        starts are keyed), and a wait on every job's commit was half of a cron pass. `seen`: the
        row's write_date when it was read ahead (_read_ahead); if it changed, that read is dropped."""
        query = ("""UPDATE llm_training_job SET last_synced_at = %s
                     WHERE id = (SELECT id FROM llm_training_job WHERE id = %s AND state IN %s FOR UPDATE SKIP LOCKED)
                    RETURNING id, write_date""", (_now(), job_id, job_status.ACTIVE_STATES))
        try:
            if own_transaction:
                self.env.cr.execute('SET LOCAL synchronous_commit TO OFF;' + query[0], query[1])
                claimed = self.env.cr.fetchone()
            else:
                with self.env.cr.savepoint():
                    self.env.cr.execute(*query)
                    claimed = self.env.cr.fetchone()
        except psycopg2.extensions.TransactionRollbackError:
            if own_transaction:
                self.env.cr.rollback()
                self.env.clear()
            return False
        if claimed:
            changed = seen is not None and claimed[1] != seen
            self.env['llm.training.job'].invalidate_cache(None if changed else ['last_synced_at'], ids=[job_id])
        return bool(claimed)

    # -- one reconcile pass ------------------------------------------------------------------
    def _step(self, job):
        """The chain of steps for one claimed job; errors end up on this job only. A step returns
        True to go on, False when the job must wait, COMMIT to have what it wrote committed (and
        the row claimed again) before the next step: a commit cannot happen inside a savepoint."""
        for step, due in self._steps(job):
            if not due():
                continue  # checked before the savepoint: a polled job pays for one step, not five
            try:
                with self.env.cr.savepoint():
                    keep_going = step(job)
            except psycopg2.extensions.TransactionRollbackError:
                # Another worker changed a row we need (e.g. the same dataset) since our snapshot:
                # nothing was lost, the next run picks the job up again.
                _logger.info('Training job %s: concurrent update, retried on the next run', job.id)
                return
            except (psycopg2.Error, MemoryError):
                raise
            except TrainingRetryableError as e:
                if e.keep:
                    job._set_provider_data(**e.keep)
                return self._postpone(job, str(e), e.seconds)
            except (TrainingFailedError, UserError, ValidationError) as e:
                return self._fail(job, e.name if hasattr(e, 'name') else str(e))
            except Exception as e:
                _logger.exception('Training job %s: unexpected error', job.id)
                return self._postpone(job, '%s: %s' % (type(e).__name__, e))
            if keep_going is COMMIT and self._auto_commit():
                self._commit()
                if not self._claim(job.id):
                    return  # another worker took the job between our commit and now: it goes on
            elif keep_going is False:
                break
        if job.retry_count:
            job._write_workflow({'retry_count': 0, 'next_attempt_at': False})

    def _postpone(self, job, message, seconds=None):
        """Try again later, with backoff. Before the provider has the job, give up after
        MAX_RETRIES (a failing start is retried with the same key, so a run it made would have
        been found); once it has it, never: it may still be training (and billing) there."""
        job.invalidate_cache()
        at_provider = bool(job.external_job_id)
        if not at_provider and job.retry_count + 1 >= MAX_RETRIES:
            return self._fail(job, _('Gave up after %d attempts: %s') % (MAX_RETRIES, message))
        delay = seconds or RETRY_DELAYS[min(job.retry_count, len(RETRY_DELAYS) - 1)]
        job._write_workflow({
            'retry_count': job.retry_count + 1,
            'next_attempt_at': fields.Datetime.to_string(datetime.utcnow() + timedelta(seconds=delay)),
        })
        job._add_event(_('Attempt %d failed, retrying in %d s: %s') % (job.retry_count, delay, message),
                       level='warning')

    def _fail(self, job, message):
        job.invalidate_cache()
        if job.state in job_status.ACTIVE_STATES:
            job._set_failed(message)

    # -- the steps: each returns False when the job must wait ----------------------------------
    def _steps(self, job):
        """(step, when it is due) in chain order; `due` is read again after each step."""
        at_provider = lambda: job.state == 'queued' and not job.external_job_id  # noqa: E731
        return ((self._validate, lambda: job.state == 'validating'),
                (self._prepare, lambda: job.state == 'preparing'),
                (self._reserve_start, lambda: at_provider() and not job.start_pending),
                (self._start, lambda: at_provider() and job.start_pending),
                (self._poll, lambda: job.state in ('queued', 'training') and bool(job.external_job_id)))

    def _validate(self, job):
        job._check_engine_links()
        problems = []
        for dataset in job.dataset_ids | job.validation_dataset_ids:
            try:
                report = dataset._validate(job.base_model_id)
            except DatasetBusyError:
                # Another job or person is validating this dataset right now: not a failure, the
                # job waits for the next pass (as for a concurrent update).
                _logger.info('Training job %s: dataset %s is being validated elsewhere; next pass', job.id, dataset.id)
                return False
            if not report.valid:
                problems.append(_('Dataset "%s":\n%s') % (dataset.name, report.as_text()))
        if problems:
            # Not raised: the datasets' reports are kept for the user to act on.
            job._set_failed('\n\n'.join(problems))
            return False
        hyper = job._get_hyperparameters()
        if job.validation_dataset_ids and hyper['validation_split']:
            raise TrainingFailedError(_('Use either validation datasets or a validation split, not both.'))
        try:
            job._check_trainable()
        except JobRefused as e:
            raise TrainingFailedError(e.name)
        self._call(job, 'validate')
        job._change_state('preparing')
        return True

    def _prepare(self, job):
        job._check_engine_links()
        job._prepare_files()
        job._change_state('queued')
        return True

    def _reserve_start(self, job):
        """Take a provider slot and record the intent to start, committed before any call: if
        anything fails after the call, the next pass starts again with the same key, which finds
        the run instead of making a second one."""
        if job.cancel_requested:
            job._change_state('cancelled')
            return False
        if not job.provider_id._has_free_slot():
            return False  # stays Queued until a slot frees
        job._write_workflow({'start_pending': True})
        return COMMIT

    def _start(self, job):
        external_id = self._call(job, 'start')
        if not external_id:
            raise TrainingFailedError(_('The provider did not return a job id.'))
        job._write_workflow({'external_job_id': external_id, 'start_pending': False, 'last_progress_at': _now()})
        job._add_event(_('Started at the provider as %s') % external_id)
        if job.cancel_requested:  # cancelled while the start was pending: stop it there too
            self._call(job, 'cancel')
            job._add_event(_('Cancel sent to the provider'), level='warning')
        return True

    def _poll(self, job):
        self._apply_report(job, self._call(job, 'check'))
        return True

    def _call(self, job, method):
        """Call the provider's adapter with the job's spec, then keep what the adapter changed in
        its provider data and the events it noted (a failing call keeps nothing: its savepoint
        is rolled back, and a retry's `keep` says what must survive)."""
        spec = job._job_spec()
        before = json.dumps(spec.provider_data, sort_keys=True)  # a deep snapshot: adapters change nested values
        result = getattr(job.provider_id._adapter(), method)(spec)
        after = json.dumps(spec.provider_data, sort_keys=True)
        if after != before:
            job._write_workflow({'provider_data': after})
        for event in spec.events:
            job._add_event(event['message'], level=event['level'])
        return result

    def _apply_report(self, job, report):
        """Bring the job in line with what the provider reports. Idempotent."""
        status = report['status']
        if status == 'lost':
            return self._resubmit(job, report.get('error') or _('The provider no longer knows the run.'))
        if status == 'failed' and job.cancel_requested:
            status = 'cancelled'  # stopped because we asked: a cancel, whatever way it ended
        values = {}
        for key, field in (('progress', 'progress'), ('step', 'current_step'), ('total_steps', 'total_steps'),
                           ('epoch', 'current_epoch'), ('trained_tokens', 'trained_tokens'), ('log', 'log')):
            if report.get(key) is not None and report[key] != job[field]:
                values[field] = report[key]
        if report.get('eta'):
            values['estimated_finish'] = fields.Datetime.to_string(datetime.utcfromtimestamp(report['eta']))
        if set(values) & {'progress', 'current_step'}:
            values['last_progress_at'] = _now()
        if values:
            job._write_workflow(values)
        events = report.get('events') or ()
        known = job._known_event_ids([str(e['id']) for e in events if e.get('id') is not None])
        for event in events:
            external_id = str(event['id']) if event.get('id') is not None else False
            if external_id in known:
                continue
            job._add_event(event.get('message') or '', level=event.get('level') or 'info', external_id=external_id,
                           data=event.get('data'),
                           created_at=event.get('created_at') and fields.Datetime.to_string(
                               datetime.utcfromtimestamp(event['created_at'])))
        self.env['llm.training.job.metric'].sudo()._record(job, report.get('metrics') or ())
        for new_state in job_status.plan_transitions(job.state, status):
            if new_state == 'completed':
                job._register_result(report.get('result') or {})
                if report.get('tokens_per_second'):
                    self.env['llm.provider.throughput'].sudo()._record(job, report['tokens_per_second'],
                                                                       report.get('precision'))
                job._change_state('completed', final_cost=pricing.cost(
                    job.trained_tokens, job.base_model_id.training_price))
                self._queue_evaluation(job)  # its own step after the job, run by the next passes
            elif new_state == 'failed':
                job._set_failed(report.get('error') or _('The provider reported the job as failed.'))
            elif new_state == 'training' and report.get('started_at'):
                job._change_state('training', started_at=fields.Datetime.to_string(
                    datetime.utcfromtimestamp(report['started_at'])))
            else:
                job._change_state(new_state)

    def _resubmit(self, job, reason):
        """The provider lost the run (it is not running there any more): start it again from its
        last checkpoint as a new attempt, MAX_RESUBMITS times at most, then fail with the reason."""
        if job.cancel_requested:
            job._change_state('cancelled')
            return
        if job.resubmit_count >= MAX_RESUBMITS or not job.provider_can_resume:
            job._set_failed(_('%s Resubmitted %d times already; not again. Resume the job once the provider '
                              'is stable.') % (reason, job.resubmit_count))
            return
        job._set_provider_data(resume=True)
        values = dict(external_job_id=False, start_pending=False, attempt=job.attempt + 1,
                      resubmit_count=job.resubmit_count + 1)
        if job.state == 'queued':
            job._write_workflow(values)
        else:
            job._change_state('queued', **values)
        job._add_event(_('%s Resubmitted from the last checkpoint as attempt %d (%d of %d).')
                       % (reason, job.attempt, job.resubmit_count, MAX_RESUBMITS), level='warning')

    # -- evaluations: their own step after a job completes, never a job state ---------------------
    @api.model
    def _run_evaluations(self, started=None, budget=None):
        """Move every pending or running evaluation on (start it, or read where it stands), each
        claimed and committed alone, within the cron's budget. A failure fails the evaluation,
        with an event on its job: the job stays Completed."""
        started = started or time.time()
        if not _evaluations_enabled():
            return 0
        self._sweep_stuck_evaluations()
        self.env.cr.execute("SELECT id FROM llm_training_evaluation WHERE state IN ('pending', 'running') ORDER BY id")
        visited = 0
        for evaluation_id in [row[0] for row in self.env.cr.fetchall()]:
            if budget is not None and time.time() - started > budget:
                break
            if not self._claim_evaluation(evaluation_id):
                continue
            self._step_evaluation(self.env['llm.training.evaluation'].browse(evaluation_id))
            visited += 1
            self._commit()  # ends this evaluation's transaction and releases its row lock
        return visited

    def _queue_evaluation(self, job):
        """Queue the completed job's evaluation; whatever goes wrong there never undoes the
        completion (a savepoint of its own, an error event)."""
        try:
            with self.env.cr.savepoint():
                job._queue_evaluation()
        except (psycopg2.Error, MemoryError):
            raise
        except Exception as e:
            _logger.exception('Training job %s: the evaluation could not be queued', job.id)
            job._add_event(_('Evaluation not queued: %s') % (e.name if hasattr(e, 'name') else e), level='error')

    def _claim_evaluation(self, evaluation_id):
        try:
            with self.env.cr.savepoint():
                self.env.cr.execute("""SELECT id FROM llm_training_evaluation WHERE id = %s
                                         AND state IN ('pending', 'running') FOR UPDATE SKIP LOCKED""",
                                    (evaluation_id,))
                claimed = self.env.cr.fetchone()
        except psycopg2.extensions.TransactionRollbackError:
            return False
        self.env['llm.training.evaluation'].invalidate_cache(ids=[evaluation_id])
        return bool(claimed)

    def _step_evaluation(self, evaluation):
        if evaluation.state == 'pending':
            # the intent first, committed: a start that then fails is retried as 'running' without a
            # process, which the adapter starts (the same key) instead of making a second
            evaluation._change_state('running', progress=0.0)
            if self._auto_commit():
                self._commit()
                if not self._claim_evaluation(evaluation.id):
                    return
        try:
            with self.env.cr.savepoint():
                adapter = evaluation.job_id.provider_id._adapter()
                spec = evaluation._spec()
                if not spec.provider_data.get('key'):
                    adapter.start_evaluation(spec)
                    evaluation.sudo().write({'provider_data': json.dumps(spec.provider_data, sort_keys=True)})
                    evaluation.job_id._add_event(_('Evaluation started: %s') % evaluation.name)
                    return
                report = adapter.check_evaluation(spec)
                if report['status'] == 'done':
                    self._finish_evaluation(evaluation, report)
                elif report['status'] == 'failed':
                    self._fail_evaluation(evaluation, report.get('error'), report.get('log'))
                elif report.get('progress') is not None and report['progress'] != evaluation.progress:
                    evaluation.sudo().write({'progress': report['progress']})
        except (psycopg2.Error, MemoryError):
            raise
        except TrainingRetryableError as e:
            _logger.info('Evaluation %s: %s; next pass', evaluation.id, e)
        except Exception as e:
            if not isinstance(e, (TrainingFailedError, UserError, ValidationError)):
                _logger.exception('Evaluation %s: unexpected error', evaluation.id)
            self._fail_evaluation(evaluation, e.name if hasattr(e, 'name') else str(e))

    def _sweep_stuck_evaluations(self):
        """Evaluations running longer than odoo.conf llm_training_eval_timeout_minutes: their
        process is stopped and they fail with an event (the job stays Completed, Retry is there)."""
        Evaluation = self.env['llm.training.evaluation']
        minutes = evaluation_timeout_minutes()
        deadline = fields.Datetime.to_string(datetime.utcnow() - timedelta(minutes=minutes))
        for evaluation in Evaluation.search([('state', '=', 'running'), ('started_at', '<', deadline)]):
            if not self._claim_evaluation(evaluation.id) or evaluation.state != 'running':
                continue
            try:
                with self.env.cr.savepoint():
                    evaluation.job_id.provider_id._adapter().cancel_evaluation(evaluation._spec())
            except (psycopg2.Error, MemoryError):
                raise
            except Exception:
                _logger.exception('Evaluation %s: stopping it failed; failed anyway', evaluation.id)
            self._fail_evaluation(evaluation, _('The evaluation ran longer than %d minutes (odoo.conf %s) and was '
                                                'stopped.') % (minutes, EVAL_TIMEOUT_OPTION))
            self._commit()  # this evaluation's failure is kept whatever the next one does

    def _finish_evaluation(self, evaluation, report):
        evaluation._apply_results(report.get('summary') or {}, report.get('examples') or [])
        evaluation._run_judge()
        job = evaluation.job_id
        where = dict(evaluation._fields['eval_set'].selection).get(evaluation.eval_set, '').lower()
        job._add_event(_('Evaluation done (%s): %s') % (evaluation.name, evaluation.headline))
        if evaluation.kind == 'job':
            body = '<p><strong>%s</strong> %s</p><p>%s</p>' % (
                html_escape(_('Evaluation:')), html_escape(evaluation.headline or _('no figures')),
                html_escape(_('%s vs %s on %d %s.') % (evaluation.model_id.display_name,
                                                       evaluation.reference_model_id.display_name,
                                                       evaluation.example_count, where)))
            job.with_context(mail_notify_force_send=False).message_post(
                body=body, subject=_('Evaluation of %s') % job.name, subtype='mail.mt_comment',
                message_type='notification')

    def _fail_evaluation(self, evaluation, message, log=None):
        evaluation.invalidate_cache()
        message = message or _('The evaluation failed.')
        if evaluation.state in ('pending', 'running'):
            evaluation._change_state('failed', error_message=message, log=log or False)
        evaluation.job_id._add_event(_('Evaluation failed: %s The job stays Completed; Retry on its Evaluation tab.')
                                     % message, level='error')

    # -- cancel --------------------------------------------------------------------------------
    @api.model
    def _cancel(self, jobs):
        """Cancel `jobs`: at the provider when it has them (it confirms, the poll then moves the
        job to Cancelled), at once otherwise. The caller has checked access."""
        for job in jobs:
            if job.state in job_status.FINAL_STATES:
                raise UserError(_('Job "%s" is already %s.') % (job.name, job.state))
            if job.state == 'draft':
                job._change_state('cancelled')
                continue
            if not self._claim(job.id):
                raise UserError(_('Job "%s" is being updated right now; try again in a moment.') % job.name)
            if job.external_job_id and job.state in ('queued', 'training'):
                self._call(job, 'cancel')
                job._write_workflow({'cancel_requested': True})
                job._add_event(_('Cancel requested'), level='warning')
                self._step(job)
            elif job.start_pending:
                # the start may have reached the provider: stop it there on the next pass
                job._write_workflow({'cancel_requested': True})
                job._add_event(_('Cancel requested while starting'), level='warning')
            else:
                job._change_state('cancelled')
        return True

    # -- the stuck-job sweep ---------------------------------------------------------------------
    @api.model
    def _sweep_stuck_jobs(self):
        """Jobs that have not moved for longer than the deadline: cancelled at their provider,
        then failed with the reason. A cancel that does not go through leaves the job as it is
        (with an event): it may still be running there."""
        Job = self.env['llm.training.job']
        hours = float(self.env['ir.config_parameter'].sudo().get_param(
            'llm_training.stuck_job_hours', DEFAULT_STUCK_HOURS))
        deadline = fields.Datetime.to_string(datetime.utcnow() - timedelta(hours=hours))
        stuck = Job.search([('state', 'in', ('validating', 'preparing', 'training')),
                            ('last_progress_at', '<', deadline)])
        stuck |= Job.search([('state', '=', 'queued'), ('external_job_id', '!=', False),
                             ('last_progress_at', '<', deadline)])
        for job in stuck:
            if not self._claim(job.id):
                continue
            if job.external_job_id:
                try:
                    with self.env.cr.savepoint():
                        self._call(job, 'cancel')
                except Exception as e:
                    _logger.exception('Training job %s: cancel of a stuck job failed', job.id)
                    job._add_event(_('No progress for %s hours, and the cancel at the provider failed (%s); '
                                     'the job is kept and the cancel tried again.') % (hours, e), level='error')
                    continue
            job._set_failed(_('No progress for %s hours (since %s); cancelled at the provider and marked as '
                              'failed. Check the provider, then resume or resubmit.') % (hours, job.last_progress_at))
