"""Did the fine-tune help? The evaluation after a job completes, with the real trainer and the
real SmolLM2 model (one small training run shared by the class), and its plain functions."""
import json
import os
import shutil
import signal
import tempfile
import time
import unittest

from odoo.tools import config

from odoo.addons.llm_training.lib import trainer_folder
from odoo.addons.llm_training.lib.evaluation import holdout, report, stats

from .common import TrainingCase, jsonl

OBJECTS = ('printer', 'laptop', 'phone', 'badge')
# the answers are 10 tokens and their end token; a short evaluation
# (evaluations run in test runs only where a test turns them on: llm_training_run_evaluations)
EVAL_CONFIG = {'llm_training_eval_max_new_tokens': 14, 'llm_training_eval_max_examples': 10,
               'llm_training_run_evaluations': True}


def ticket_examples(n):
    """A fixed answer format the base model cannot know: a ticket tag, then one template. A short
    system prompt keeps SmolLM2's default one (16 tokens) out of every example."""
    return [{'messages': [{'role': 'system', 'content': 'Support desk.'},
                          {'role': 'user', 'content': 'My %s is broken (request %d).' % (OBJECTS[i % 4], i)},
                          {'role': 'assistant', 'content': '[T7] Logged: %s repair.' % OBJECTS[i % 4]}]}
            for i in range(n)]


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
                                  learning_rate=3e-3)
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
