"""Did the fine-tune help? The evaluation after a job completes, with the real trainer and the
real SmolLM2 model (one small training run shared by the class), and its plain functions."""
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import unittest
import xmlrpc.client

import odoo
from odoo import api
from odoo.tests.common import HttpCase
from odoo.tools import config

from odoo.addons.llm_training.lib.jobs import trainer_folder
from odoo.addons.llm_training.lib.evaluation import holdout, judge, report, stats

from .common import TrainingCase, jsonl
from .openai_fake_server import FakeOpenAI
from .openapi_contract import load_contract
from .test_xmlrpc import ensure_http_server

OBJECTS = ('printer', 'laptop', 'phone', 'badge')
# the answers are 10 tokens and their end token; a short evaluation
# (evaluations run in test runs only where a test turns them on: llm_training_run_evaluations)
# (the judge: SmolLM2 through the local model server, on 2 of the 5 examples: 4 calls)
EVAL_CONFIG = {'llm_training_eval_max_new_tokens': 14, 'llm_training_eval_max_examples': 10,
               'llm_training_run_evaluations': True, 'llm_training_eval_max_judge_calls': 5}


def ticket_examples(n):
    """A fixed answer format the base model cannot know: a ticket tag, then one template. A short
    system prompt keeps SmolLM2's default one (16 tokens) out of every example."""
    return [{'messages': [{'role': 'system', 'content': 'Support desk.'},
                          {'role': 'user', 'content': 'My %s is broken (request %d).' % (OBJECTS[i % 4], i)},
                          {'role': 'assistant', 'content': '[T7] Logged: %s repair.' % OBJECTS[i % 4]}]}
            for i in range(n)]


def ticket_reply(model, messages):
    """The fake OpenAI's answers: its fine-tuned models learnt the ticket format, its base did not."""
    thing = messages[-1]['content'].split()[1]
    return ('[T7] Logged: %s repair.' if model.startswith('ft:') else 'Sorry to hear about your %s.') % thing


class TestEvaluationFunctions(unittest.TestCase):
    """lib/evaluation: plain functions, values worked out by hand."""

    def test_holdout_size(self):
        self.assertEqual(holdout.holdout_size(100), 10)
        self.assertEqual(holdout.holdout_size(3000), 200, 'at most 200')
        self.assertEqual(holdout.holdout_size(20), 5, 'never below 5')
        self.assertEqual(holdout.holdout_size(14), 0, '5 held out would leave 9 < 10 to train on: in-sample')
        self.assertEqual(holdout.holdout_size(15), 5)
        self.assertEqual(holdout.holdout_size(100, 0.0), 0)

    def test_split_holdout_moves_lines_out_of_training(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        train, held = os.path.join(folder, 'train.jsonl'), os.path.join(folder, 'eval.jsonl')
        lines = ['{"n": %d}\n' % i for i in range(30)]
        with open(train, 'w') as f:
            f.writelines(lines)
        self.assertEqual(holdout.split_holdout(train, held, 0.1, seed=3), 5)
        with open(train) as f:
            kept = f.readlines()
        with open(held) as f:
            out = f.readlines()
        self.assertEqual((len(kept), len(out)), (25, 5))
        self.assertFalse(set(kept) & set(out))
        self.assertEqual(sorted(kept + out), sorted(lines))
        self.assertEqual(kept, [line for line in lines if line not in out], 'training keeps its order')

    def test_bootstrap_interval(self):
        self.assertEqual(stats.bootstrap_interval([0.5] * 10), (0.5, 0.5))
        self.assertIsNone(stats.bootstrap_interval([]))
        values = [0.0, 1.0] * 20
        low, high = stats.bootstrap_interval(values)
        self.assertLess(low, 0.5)
        self.assertGreater(high, 0.5)
        self.assertEqual(stats.bootstrap_interval(values), (low, high), 'seeded: the same data, the same interval')
        # the mean of 40 fair 0/1 draws: the 95% interval is about +-1.96 * 0.5 / sqrt(40) = +-0.155
        self.assertAlmostEqual(high - low, 0.31, delta=0.06)

    def test_compare_verdicts(self):
        worse = [(1.0, 0.0)] * 15 + [(1.0, 1.0)] * 10
        self.assertEqual(report.compare(worse, 'rouge_l')['verdict'], 'worse')
        self.assertEqual(report.compare(worse[:19], 'rouge_l')['verdict'], 'inform', 'fewer than 20: informs')
        mixed = [(1.0, 0.0), (0.0, 1.0)] * 15
        self.assertEqual(report.compare(mixed, 'rouge_l')['verdict'], 'ok')
        # lower is better for perplexity: a higher one is worse
        self.assertEqual(report.compare([(2.0, 3.0)] * 25, 'perplexity')['verdict'], 'worse')

    def test_main_metric_and_headline(self):
        self.assertEqual(report.main_metric('auto', 'chat', 3.0), 'exact_match')
        self.assertEqual(report.main_metric('auto', 'chat', 12.0), 'rouge_l')
        self.assertEqual(report.main_metric('rouge_l', 'chat', 3.0), 'rouge_l')
        self.assertEqual(report.main_metric('auto', 'preference', None), 'preference_win')
        self.assertEqual(report.main_metric('auto', 'text', None), 'perplexity')
        summary = {'data_format': 'chat', 'reference': {'exact_match': 0.12, 'rouge_l': 0.31},
                   'candidate': {'exact_match': 0.64, 'rouge_l': 0.58}}
        self.assertEqual(report.headline(summary), 'exact match 12% -> 64%, ROUGE-L 0.31 -> 0.58')

    def test_chart_rows(self):
        summary = {'reference': {'exact_match': 0.25, 'rouge_l': 0.5, 'loss': 4.0, 'perplexity': None},
                   'candidate': {'exact_match': 0.75, 'rouge_l': 1.0, 'loss': 1.0, 'perplexity': 2.7}}
        self.assertEqual(report.chart_rows(summary), [
            ('exact_match', 'exact match', 0.25, 0.75, 25.0, 75.0),  # on the 0-1 scale
            ('rouge_l', 'ROUGE-L', 0.5, 1.0, 50.0, 100.0),
            ('loss', 'loss', 4.0, 1.0, 100.0, 25.0)])  # against the larger; perplexity: one side only

    def test_judge_verdict_parsing(self):
        for reply, verdict in (('A', 'A'), ('B', 'B'), ('T', 'T'), (' **B**', 'B'), ('(A) is better', 'A'),
                               ('Verdict: B', 'B'), ('verdict - T.', 'T'), ('Tie.', 'T'), ('tie', 'T'),
                               ('A.\nBecause it follows the reference', 'A'), ('"B"', 'B'),
                               ('a better answer is B', None), ('Both are fine', None), ('', None), (None, None),
                               ('AB', None), ('C', None), ('Answer A is better', 'A'), ('I think B', None)):
            self.assertEqual(judge.parse_verdict(reply), verdict, reply)

    def test_judge_outcomes_and_win_rate(self):
        # first: the compared (reference) model's answer as A; second: the evaluated (candidate) one's as A
        self.assertEqual(judge.outcome('B', 'A'), 'candidate', 'B first, A second: the candidate both times')
        self.assertEqual(judge.outcome('A', 'B'), 'reference')
        self.assertEqual(judge.outcome('A', 'A'), 'tie', 'always the first position: position bias, a tie')
        self.assertEqual(judge.outcome('T', 'A'), 'tie')
        self.assertEqual(judge.outcome('T', 'T'), 'tie')
        self.assertEqual(judge.outcome(None, 'A'), 'invalid', 'one unreadable verdict: never guessed')
        outcomes = ['candidate', 'candidate', 'candidate', 'reference', 'tie', 'invalid']
        self.assertEqual(judge.win_rate(outcomes), {'judged': 6, 'wins': 3, 'losses': 1, 'ties': 1, 'invalid': 1,
                                                    'win_rate': 0.6, 'tie_rate': 0.2})
        self.assertEqual(judge.win_rate(['invalid'])['win_rate'], None)
        self.assertEqual(judge.examples_to_judge(5, 7), 3, 'two calls an example')
        self.assertEqual(judge.examples_to_judge(5, 100), 5)
        messages = judge.judge_messages('Q?', 'ref', 'first', 'second')
        self.assertIn('Answer A:\nfirst\n\nAnswer B:\nsecond', messages[1]['content'])


class TestEvaluation(TrainingCase):
    """One real training run (15 ticket examples: 5 held out, 10 trained on, 1 epoch of 3 steps at a
    high learning rate: enough to learn the format) and its evaluation, shared by every test here."""

    @classmethod
    def setUpClass(cls):
        super(TestEvaluation, cls).setUpClass()
        cls._saved_config = {key: config.get(key) for key in EVAL_CONFIG}
        config.options.update(EVAL_CONFIG)
        cls.local = cls.env['llm.provider'].create({'name': 'Local', 'service': 'local', 'max_concurrent_jobs': 2})
        cls.smol = cls.env['llm.model'].create({'name': 'SmolLM2', 'provider_id': cls.local.id,
                                                'model_ref': 'SmolLM2-135M-Instruct', 'context_length': 8192})
        cls.data = cls.make_dataset(jsonl(ticket_examples(15)), name='tickets.jsonl')
        cls.data._validate(cls.smol)
        cls.job = cls.trainer_job(cls.data, cls.local, cls.smol, validation_split=0.0, epochs=1,
                                  learning_rate=3e-3, evaluation_judge_id=cls.smol.id)
        cls.plan_before_submit = cls.job.evaluation_plan
        cls.job.action_submit()
        Job = cls.env['llm.training.job']
        deadline = time.time() + 600
        while time.time() < deadline:
            Job._cron_sync_training_jobs()
            Job.invalidate_cache()
            cls.env['llm.training.evaluation'].invalidate_cache()
            if cls.job.state in ('failed', 'cancelled') or cls.job.evaluation_ids.filtered(
                    lambda e: e.state in ('done', 'failed')):
                break
            time.sleep(0.5)
        cls.evaluation = cls.job.evaluation_ids[:1]

    @classmethod
    def tearDownClass(cls):
        for key, value in cls._saved_config.items():
            if value is None:
                config.options.pop(key, None)
            else:
                config.options[key] = value
        cls._kill_processes()
        cls.local._adapter().model_server().stop()  # the judge's
        super(TestEvaluation, cls).tearDownClass()

    @classmethod
    def _kill_processes(cls):
        records = cls.env['llm.training.job'].search([('provider_id', '=', cls.local.id)])
        evaluations = cls.env['llm.training.evaluation'].search([('job_id.provider_id', '=', cls.local.id)])
        for record in list(records) + list(evaluations):
            data = json.loads(record.provider_data or '{}')
            if trainer_folder.is_alive(data.get('pid'), data.get('start_time')):
                os.killpg(data['pid'], signal.SIGKILL)

    def test_fine_tuned_model_beats_its_base_on_held_out_examples(self):
        job, evaluation = self.job, self.evaluation
        self.assertEqual(job.state, 'completed', job.error_message)
        self.assertEqual(evaluation.state, 'done', '%s\n%s' % (evaluation.error_message, evaluation.log))
        self.assertEqual((evaluation.kind, evaluation.eval_set, evaluation.example_count), ('job', 'holdout', 5))
        self.assertEqual((evaluation.model_id, evaluation.reference_model_id), (job.result_model_id, self.smol))
        summary = json.loads(evaluation.summary)
        base, tuned = summary['reference'], summary['candidate']
        self.assertGreater(tuned['rouge_l'], base['rouge_l'] + 0.2)
        self.assertGreater(tuned['chrf'], base['chrf'])
        self.assertGreater(tuned['exact_match'], base['exact_match'])
        self.assertLess(tuned['loss'], base['loss'], 'the held-out reference answers are likelier after training')
        self.assertGreater(tuned['token_accuracy'], base['token_accuracy'])
        self.assertEqual(evaluation.main_metric, 'exact_match', 'answers of 4 words: exact match')
        self.assertAlmostEqual(evaluation.candidate_score, tuned['exact_match'], places=4)
        # side by side, worst regression first
        lines = evaluation.example_ids
        self.assertEqual(len(lines), 5)
        self.assertEqual(lines.mapped('difference'), sorted(lines.mapped('difference')))
        self.assertTrue(all(line.expected.startswith('[T7]') for line in lines))
        self.assertTrue(any(line.candidate_answer.startswith('[T7]') for line in lines), lines.mapped(
            'candidate_answer'))
        self.assertFalse(any(line.reference_answer.startswith('[T7]') for line in lines))
        self.assertIn('ROUGE-L', evaluation.headline)
        self.assertIn('<td>', evaluation.metrics_html)
        # the headline in the job's chatter; the job never left Completed
        self.assertTrue(any('ROUGE-L' in (m.body or '') for m in job.message_ids), job.message_ids.mapped('body'))
        self.assertIn('Evaluation done', ' '.join(job.event_ids.mapped('message')))

    def test_holdout_is_never_trained_on(self):
        self.assertEqual(self.plan_before_submit, '5 held-out examples (not trained on)')
        self.assertEqual((self.job.train_examples, self.job.validation_examples), (10, 0))
        with open(os.path.join(self.job.work_dir, 'train.jsonl')) as f:
            trained = [json.loads(line) for line in f]
        with open(os.path.join(self.job.work_dir, 'eval.jsonl')) as f:
            held = [json.loads(line) for line in f]
        self.assertEqual((len(trained), len(held)), (10, 5))
        questions = {e['messages'][1]['content'] for e in trained}
        self.assertFalse(questions & {e['messages'][1]['content'] for e in held})
        self.assertEqual(set(self.evaluation.example_ids.mapped('prompt')),
                         {'system: Support desk.\nuser: %s' % e['messages'][1]['content'] for e in held})

    def test_the_evaluation_set_is_shown_before_submit(self):
        wizard = self.env['llm.training.job.wizard'].create({
            'name': 'Tickets', 'dataset_ids': [(6, 0, self.data.ids)], 'provider_id': self.local.id,
            'base_model_id': self.smol.id})
        self.assertIn('Evaluation after training: 5 held-out examples (not trained on)', wizard.estimate)
        small = self.make_dataset(jsonl(ticket_examples(12)), name='few.jsonl')
        small._validate(self.smol)
        job = self.make_job(small, provider=self.local, base_model_id=self.smol.id)
        self.assertEqual(job.evaluation_plan, 'Training examples (in-sample: too few examples to hold some out)')
        job.validation_split = 0.2
        self.assertEqual(job.evaluation_plan, 'The validation examples')
        scripted = self.make_job(small)
        self.assertIn('cannot evaluate models yet', scripted.evaluation_plan)

    def test_readable_by_internal_users(self):
        user = self.env['res.users'].create({'name': 'Reader', 'login': 'eval-reader',
                                             'groups_id': [(6, 0, [self.env.ref('base.group_user').id])]})
        rows = self.env['llm.training.evaluation'].sudo(user).search_read(
            [('id', '=', self.evaluation.id)], ['state', 'headline', 'summary', 'example_ids'])
        self.assertEqual((rows[0]['state'], len(rows[0]['example_ids'])), ('done', 5))
        lines = self.env['llm.training.evaluation.example'].sudo(user).search_read(
            [('evaluation_id', '=', self.evaluation.id)], ['candidate_answer', 'difference'])
        self.assertEqual(len(lines), 5)

    def test_failed_evaluation_leaves_the_job_completed_and_can_be_retried(self):
        evaluation = self.job._queue_evaluation()
        evaluation.sudo().write({'examples_file': os.path.join(self.job.work_dir, 'missing.jsonl')})
        deadline = time.time() + 120
        while evaluation.state in ('pending', 'running') and time.time() < deadline:
            self.env['llm.training.engine']._run_evaluations()
            evaluation.invalidate_cache()
            time.sleep(0.2)
        self.assertEqual(evaluation.state, 'failed')
        self.assertIn('missing.jsonl', evaluation.error_message)
        self.assertEqual(self.job.state, 'completed')
        self.assertIn('Evaluation failed', ' '.join(self.job.event_ids.filtered(
            lambda e: e.level == 'error').mapped('message')))
        evaluation.action_retry()
        self.assertEqual((evaluation.state, evaluation.attempt, evaluation.error_message), ('pending', 2, False))

    def test_deploy_guard_informs_below_20_examples(self):
        self.smol.write({'purpose': 'support'})
        self.smol.action_deploy()  # nothing deployed before it: no comparison
        model = self.job.result_model_id
        model.write({'purpose': 'support'})
        self.assertIs(model.action_deploy(), True)
        self.assertEqual((model.state, self.smol.state), ('deployed', 'draft'))
        self.assertIn('for information only', model.deploy_check)
        self.assertIn('exact match on 5 examples', model.deploy_check)

    def test_deploy_guard_warns_when_worse_and_a_manager_overrides_with_a_reason(self):
        deployed = self.job.result_model_id
        deployed.write({'purpose': 'helpdesk'})
        deployed.action_deploy()
        worse = self.job._register_model('worse-candidate', 'Worse one')
        worse.write({'purpose': 'helpdesk'})
        evaluation = self.env['llm.training.evaluation'].create({
            'job_id': self.job.id, 'kind': 'deploy_check', 'model_id': worse.id, 'reference_model_id': deployed.id,
            'state': 'done', 'main_metric': 'rouge_l', 'example_count': 25, 'reference_score': 0.8,
            'candidate_score': 0.4})
        Line = self.env['llm.training.evaluation.example']
        for n in range(25):
            candidate = 0.4 if n % 5 else 0.8
            Line.create({'evaluation_id': evaluation.id, 'sequence': n, 'reference_score': 0.8,
                         'candidate_score': candidate, 'difference': candidate - 0.8})
        action = worse.action_deploy()
        self.assertEqual(action['res_model'], 'llm.model.deploy.wizard')
        self.assertEqual((worse.state, deployed.state), ('draft', 'deployed'), 'not deployed on a warning')
        wizard = self.env['llm.model.deploy.wizard'].browse(action['res_id'])
        self.assertIn('Worse than the deployed model', wizard.figures)
        self.assertIn('on 25 examples', wizard.figures)
        wizard.reason = 'the old model is being retired'
        wizard.action_deploy_anyway()
        self.assertEqual((worse.state, deployed.state), ('deployed', 'draft'))
        self.assertIn('the old model is being retired', worse.deploy_override_reason)

    def test_deploy_guard_queues_the_missing_comparison(self):
        deployed = self.job.result_model_id
        deployed.write({'purpose': 'sales'})
        deployed.action_deploy()
        other = self.job._register_model('other-candidate', 'Other candidate')
        other.write({'purpose': 'sales'})
        action = other.action_deploy()
        self.assertEqual(action['res_model'], 'llm.model.deploy.wizard')
        self.assertEqual(other.state, 'draft')
        comparison = other.evaluation_ids
        self.assertEqual((comparison.kind, comparison.state, comparison.reference_model_id, comparison.eval_set),
                         ('deploy_check', 'pending', deployed, 'holdout'))
        self.assertIn('Comparing with the deployed model', self.env['llm.model.deploy.wizard'].browse(
            action['res_id']).figures)

    def test_compare_wizard_shows_the_evaluation(self):
        wizard = self.env['llm.model.compare.wizard'].create({'model_ids': [(6, 0, self.job.result_model_id.ids)]})
        self.assertIn(self.evaluation.headline, wizard.evaluation_summary)

    def test_chart_shows_base_and_fine_tuned_per_metric(self):
        chart = self.evaluation.chart_html
        summary = json.loads(self.evaluation.summary)
        self.assertEqual(chart.count('o_llm_eval_bar_reference'), chart.count('o_llm_eval_bar_candidate'))
        self.assertGreaterEqual(chart.count('o_llm_eval_bar_candidate'), 7, 'a pair of bars a metric')
        for name in (self.smol.display_name, self.job.result_model_id.display_name):
            self.assertIn(name, chart)
        # the exact match pair: 0-1 metrics are drawn on their scale
        self.assertIn('o_llm_eval_bar_reference" style="background:#9e9e9e;height:10px;width:%s%%' % round(
            100.0 * summary['reference']['exact_match'], 1), chart)
        self.assertIn('o_llm_eval_bar_candidate" style="background:#1f77b4;height:10px;width:%s%%' % round(
            100.0 * summary['candidate']['exact_match'], 1), chart)
        # on the Evaluation tab of the job and of the model
        self.assertEqual(self.job.evaluation_chart, chart)
        self.assertEqual(self.job.result_model_id.evaluation_chart, chart)
        for model, view in (('llm.training.job', 'llm_training_job_view_form'),
                            ('llm.model', 'llm_model_view_form'),
                            ('llm.training.evaluation', 'llm_training_evaluation_view_form')):
            arch = self.env[model].fields_view_get(self.env.ref('llm_training.' + view).id, 'form')['arch']
            self.assertIn('name="%s"' % ('chart_html' if model == 'llm.training.evaluation' else 'evaluation_chart'),
                          arch)

    def test_judge_compares_both_orders_within_its_call_limit(self):
        evaluation = self.evaluation
        self.assertEqual(evaluation.judge_model_id, self.smol)
        self.assertFalse(evaluation.judge_error)
        self.assertEqual(evaluation.judge_calls, 4, '5 calls allowed: 2 examples, both orders')
        self.assertEqual(evaluation.judge_wins + evaluation.judge_losses + evaluation.judge_ties +
                         evaluation.judge_invalid, 2)
        judged = evaluation.example_ids.filtered('judge_outcome')
        self.assertEqual(sorted(judged.mapped('sequence')), [1, 2], 'the first examples')
        for line in judged:
            replies = json.loads(line.judge_replies)
            self.assertEqual(len(replies), 2)
            verdicts = [judge.parse_verdict(reply) for reply in replies]
            self.assertEqual(line.judge_outcome, judge.outcome(*verdicts), replies)
        valid = evaluation.judge_wins + evaluation.judge_losses + evaluation.judge_ties
        if valid:
            self.assertAlmostEqual(evaluation.judge_win_rate, evaluation.judge_wins / valid, places=4)
            self.assertIn('judge', evaluation.headline)

    def test_stuck_evaluation_is_failed_by_the_cron(self):
        evaluation = self.job._queue_evaluation()
        evaluator = subprocess.Popen(['sleep', '600'], start_new_session=True)  # stands for a hung evaluator
        self.addCleanup(lambda: evaluator.poll() is None and evaluator.kill())
        evaluation.sudo().write({'state': 'running', 'started_at': '2020-01-01 00:00:00', 'provider_data': json.dumps({
            'key': 'x', 'pid': evaluator.pid, 'start_time': trainer_folder.process_start_time(evaluator.pid)})})
        recent = self.job._queue_evaluation()
        recent._change_state('running')
        config.options['llm_training_eval_timeout_minutes'] = 60
        self.addCleanup(config.options.pop, 'llm_training_eval_timeout_minutes', None)
        self.env['llm.training.engine']._sweep_stuck_evaluations()
        self.assertEqual((evaluation.state, recent.state), ('failed', 'running'))
        self.assertIn('longer than 60 minutes', evaluation.error_message)
        self.assertEqual(evaluator.wait(timeout=30), -signal.SIGKILL, 'its process is stopped')
        self.assertEqual(self.job.state, 'completed')
        self.assertIn('longer than 60 minutes', ' '.join(self.job.event_ids.filtered(
            lambda e: e.level == 'error').mapped('message')))
        evaluation.action_retry()
        self.assertEqual(evaluation.state, 'pending')


class TestEvaluationXmlRpc(HttpCase):
    """Other addons read evaluations and their example lines over real XML-RPC, within the rights
    of the job: a user of another company (no access to the job) reads none of them."""

    @classmethod
    def setUpClass(cls):
        ensure_http_server()
        super(TestEvaluationXmlRpc, cls).setUpClass()

    def setUp(self):
        super(TestEvaluationXmlRpc, self).setUp()
        # Odoo 11: requests run on the registry's test cursor, not on the test's own: the records
        # are made there too (rolled back when the test leaves test mode), as tests/test_openai_api.py
        own_cr, own_env = self.cr, self.env
        self.cr = self.registry.test_cr
        self.env = api.Environment(self.cr, odoo.SUPERUSER_ID, {})
        self.addCleanup(setattr, self, 'cr', own_cr)
        self.addCleanup(setattr, self, 'env', own_env)

    def _user(self, login, company):
        return self.env['res.users'].with_context(no_reset_password=True).create({
            'name': login, 'login': login, 'password': login + '-pw', 'company_id': company.id,
            'company_ids': [(6, 0, company.ids)], 'groups_id': [(6, 0, [self.env.ref('base.group_user').id])]})

    def test_evaluation_and_lines_over_xmlrpc(self):
        provider = self.env['llm.provider'].create({'name': 'Scripted', 'service': 'test'})
        base = self.env['llm.model'].create({'name': 'Base', 'provider_id': provider.id, 'model_ref': 'base-x'})
        tuned = self.env['llm.model'].create({'name': 'Tuned', 'provider_id': provider.id, 'model_ref': 'tuned-x',
                                              'kind': 'fine_tuned', 'base_model_id': base.id})
        attachment = self.env['ir.attachment'].create({'name': 'd.jsonl', 'datas_fname': 'd.jsonl',
                                                       'datas': base64.b64encode(jsonl(ticket_examples(12)))})
        dataset = self.env['llm.training.dataset'].create({'name': 'd', 'attachment_ids': [(6, 0, attachment.ids)]})
        job = self.env['llm.training.job'].create({'name': 'Tickets', 'provider_id': provider.id,
                                                   'base_model_id': base.id, 'dataset_ids': [(6, 0, dataset.ids)]})
        summary = {'n': 2, 'data_format': 'chat', 'reference': {'exact_match': 0.0, 'rouge_l': 0.2},
                   'candidate': {'exact_match': 0.5, 'rouge_l': 0.9}}
        evaluation = self.env['llm.training.evaluation'].create({
            'job_id': job.id, 'model_id': tuned.id, 'reference_model_id': base.id, 'state': 'done',
            'eval_set': 'holdout', 'main_metric': 'exact_match', 'summary': json.dumps(summary),
            'headline': report.headline(summary), 'example_count': 2, 'reference_score': 0.0, 'candidate_score': 0.5})
        for sequence, (candidate, score) in enumerate((('[T7] Logged: printer repair.', 1.0), ('No idea.', 0.0)), 1):
            self.env['llm.training.evaluation.example'].create({
                'evaluation_id': evaluation.id, 'sequence': sequence, 'prompt': 'user: My printer is broken.',
                'expected': '[T7] Logged: printer repair.', 'reference_answer': 'Try restarting it.',
                'candidate_answer': candidate, 'reference_score': 0.0, 'candidate_score': score,
                'difference': score, 'judge_outcome': 'candidate' if score else 'tie'})
        reader = self._user('eval-rpc-reader', self.env.user.company_id)
        stranger = self._user('eval-rpc-stranger', self.env['res.company'].create({'name': 'Other company'}))

        # a request closing the test cursor rolls back to its last commit, a savepoint: set it here
        self.cr.commit()
        rpc = xmlrpc.client.ServerProxy('http://127.0.0.1:%d/xmlrpc/2/object' % odoo.tools.config['http_port'])

        def call(user, model, method, *args, **kw):
            return rpc.execute_kw(self.env.cr.dbname, user.id, user.login + '-pw', model, method, list(args), kw)

        rows = call(reader, 'llm.training.evaluation', 'search_read', [('job_id', '=', job.id)],
                    fields=['state', 'headline', 'summary', 'main_metric', 'example_ids', 'judge_win_rate'])
        self.assertEqual(len(rows), 1)
        self.assertEqual((rows[0]['state'], rows[0]['headline'], rows[0]['main_metric']),
                         ('done', 'exact match 0% -> 50%, ROUGE-L 0.20 -> 0.90', 'exact_match'))
        self.assertEqual(json.loads(rows[0]['summary']), summary)
        lines = call(reader, 'llm.training.evaluation.example', 'search_read',
                     [('evaluation_id', '=', evaluation.id)],
                     fields=['sequence', 'candidate_answer', 'difference', 'judge_outcome'])
        self.assertEqual(sorted(line['id'] for line in lines), sorted(rows[0]['example_ids']))
        self.assertEqual([(line['sequence'], line['judge_outcome']) for line in lines],
                         [(2, 'tie'), (1, 'candidate')], 'worst regression first')
        # another company's user: no access to the job, none to its evaluation or lines
        self.assertEqual(call(stranger, 'llm.training.evaluation', 'search_read', [('job_id', '=', job.id)],
                              fields=['state']), [])
        self.assertEqual(call(stranger, 'llm.training.evaluation.example', 'search_count',
                              [('evaluation_id', '=', evaluation.id)]), 0)
        for model, ids, field in (('llm.training.job', job.ids, 'name'), ('llm.training.evaluation', evaluation.ids,
                                                                          'summary'),
                                  ('llm.training.evaluation.example', evaluation.example_ids.ids, 'candidate_answer')):
            with self.assertRaises(xmlrpc.client.Fault) as refused:
                call(stranger, model, 'read', ids, fields=[field])
            self.assertEqual(refused.exception.faultCode, 4, model)  # an AccessError (RPC_FAULT_CODE_ACCESS_ERROR)
            self.assertIn('security restrictions', refused.exception.faultString, model)


class TestOpenAIEvaluation(TrainingCase):
    """A job on OpenAI (the local fake, checked against OpenAI's schemas for fine-tuning and chat)
    with Evaluate with chat on: the hold-out is kept out of the upload, the estimate prices the
    evaluation, and both models answer through the chat API once the job completes."""

    API_KEY = 'sk-llmt-eval-0123456789abcdef'

    @classmethod
    def setUpClass(cls):
        super(TestOpenAIEvaluation, cls).setUpClass()
        cls._saved_run = config.get('llm_training_run_evaluations')
        config.options['llm_training_run_evaluations'] = True
        cls.server = FakeOpenAI(cls.API_KEY, load_contract('openai-chat-completions-openapi.json')).start()
        cls.server.chat_reply = ticket_reply
        cls.openai = cls.env['llm.provider'].create({
            'name': 'OpenAI (local server)', 'service': 'openai', 'api_key': cls.API_KEY, 'request_timeout': 30,
            'max_concurrent_jobs': 0, 'base_url': cls.server.base_url, 'evaluate_with_chat': True})
        cls.gpt = cls.env['llm.model'].create({
            'name': 'GPT-4o mini', 'provider_id': cls.openai.id, 'model_ref': 'gpt-4o-mini-2024-07-18',
            'context_length': 65536, 'training_price': 3.0, 'chat_input_price': 0.15, 'chat_output_price': 0.6,
            'fine_tuned_chat_input_price': 0.3, 'fine_tuned_chat_output_price': 1.2})

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        if cls._saved_run is None:
            config.options.pop('llm_training_run_evaluations', None)
        else:
            config.options['llm_training_run_evaluations'] = cls._saved_run
        super(TestOpenAIEvaluation, cls).tearDownClass()

    def test_openai_job_is_evaluated_through_the_chat_api(self):
        self.assertTrue(self.openai.evaluates)
        data = self.make_dataset(jsonl(ticket_examples(15)), name='tickets.jsonl')
        data._validate(self.gpt)
        wizard = self.env['llm.training.job.wizard'].create({
            'name': 'Tickets', 'dataset_ids': [(6, 0, data.ids)], 'provider_id': self.openai.id,
            'base_model_id': self.gpt.id})
        # 5 held-out prompts of the mean example size, up to 64 answer tokens, each model at its prices
        size = float(data.token_total) / data.example_count
        cost = 5 * (size * 0.15 + 64 * 0.6 + size * 0.3 + 64 * 1.2) / 1e6
        self.assertIn('Evaluation through the chat API: 5 examples, both models, at most $%.4f' % cost,
                      wizard.estimate)
        job = self.make_job(data, provider=self.openai, base_model_id=self.gpt.id, epochs=1, validation_split=0.0)
        job.action_submit()
        Evaluation = self.env['llm.training.evaluation']
        for _ in range(20):  # the fake moves a job on at each read, and answers at once
            self.run_cron()
            Evaluation.invalidate_cache()
            if job.evaluation_ids.filtered(lambda e: e.state in ('done', 'failed')):
                break
        self.assertEqual(job.state, 'completed', job.error_message)
        evaluation = job.evaluation_ids
        self.assertEqual(evaluation.state, 'done', evaluation.error_message)
        self.assertEqual((evaluation.eval_set, evaluation.example_count), ('holdout', 5))
        uploaded = self.server.files[self.server.jobs[job.external_job_id]['training_file']]['content']
        self.assertEqual(len(uploaded.splitlines()), 10, 'the hold-out is not uploaded')
        summary = json.loads(evaluation.summary)
        self.assertEqual((summary['reference']['exact_match'], summary['candidate']['exact_match']), (0.0, 1.0))
        self.assertNotIn('loss', summary['candidate'], 'the chat API gives no loss')
        self.assertEqual(self.server.count('POST', '/chat/completions'), 10, 'both models, each example once')
        self.assertTrue(all(line.candidate_answer.startswith('[T7]') for line in evaluation.example_ids))
        self.assertIn('exact match 0% -> 100%', evaluation.headline)
        self.assertEqual(self.server.violations, [])
