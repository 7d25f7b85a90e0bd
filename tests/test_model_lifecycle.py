"""Model versions, deploy / archive, get_deployed, and the compare wizard."""
import importlib.util
import json
import math
import os

from odoo.exceptions import UserError

from .common import TrainingCase


class TestModelLifecycle(TrainingCase):

    def train(self, suffix=None):
        job = self.make_job(suffix=suffix, base_model_id=self.base_model.id)
        job.action_submit()
        self.run_cron(3)
        self.assertEqual(job.state, 'completed')
        return job.result_model_id

    def model(self, name, purpose=None, provider=None):
        return self.env['llm.model'].create({'name': name, 'provider_id': (provider or self.provider).id,
                                             'model_ref': 'ref-%s' % name, 'purpose': purpose})

    def test_trainer_metrics_become_labelled_fields_not_json(self):
        job = self.make_job()
        final = {'train_loss': 1.21, 'valid_loss': 2.925, 'perplexity': 18.64, 'valid_token_accuracy': 0.4375,
                 'tokens_per_second': 273.4, 'precision': 'bf16', 'threads': 2, 'train_runtime': 12.5}
        job._register_result({'model_ref': 'tiny-ft-metrics', 'metrics': final})
        model = job.result_model_id
        self.assertEqual((model.train_loss, model.valid_loss, model.perplexity, model.valid_token_accuracy,
                          model.training_tokens_per_second, model.training_precision),
                         (1.21, 2.925, 18.64, 0.4375, 273.4, 'bf16'))
        self.assertFalse(model.description, 'no raw metrics dict in the notes')
        form = self.env['llm.model'].fields_view_get(view_type='form')
        for name in ('train_loss', 'valid_loss', 'perplexity', 'valid_token_accuracy', 'training_tokens_per_second',
                     'training_precision'):
            self.assertIn(name, form['fields'])
            self.assertTrue(form['fields'][name]['string'])
        # a training price only where the provider bills per token
        self.assertIn("('bills_training', '=', False)", form['arch'])
        self.assertFalse(model.bills_training)
        self.assertTrue(self.env['llm.provider'].new({'service': 'openai'}).bills_training)
        self.assertFalse(self.env['llm.provider'].new({'service': 'local'}).bills_training)

    def test_migration_moves_the_old_json_description_into_the_fields(self):
        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'migrations', '11.0.1.3.0',
                            'post-migration.py')
        spec = importlib.util.spec_from_file_location('llm_training_migration_11_0_1_3_0', path)
        migration = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(migration)
        old = self.model('old-ft')
        note = self.model('noted-ft')
        (old | note).write({'kind': 'fine_tuned'})
        old.description = json.dumps({'precision': 'fp32', 'train_loss': 0.5, 'valid_loss': 1.0,
                                      'tokens_per_second': 99.5, 'threads': 2}, sort_keys=True)
        note.description = '{Written by a person} keep this'
        migration.migrate(self.env.cr, '11.0.1.2.0')
        self.env['llm.model'].invalidate_cache()
        self.assertEqual((old.train_loss, old.valid_loss, round(old.perplexity, 4), old.training_tokens_per_second,
                          old.training_precision, old.description), (0.5, 1.0, round(math.e, 4), 99.5, 'fp32', False))
        self.assertEqual(note.description, '{Written by a person} keep this')
        self.assertFalse(note.train_loss)

    def test_losses_the_provider_did_not_report_come_from_the_jobs_metrics(self):
        job = self.make_job()
        job.action_submit()
        self.run_cron(6)
        self.assertEqual(job.state, 'completed', job.error_message)
        model = job.result_model_id
        # the scripted run's last measured losses: train 0.9 at step 10, validation 1.7 at step 5
        self.assertEqual((model.train_loss, model.valid_loss), (0.9, 1.7))
        self.assertAlmostEqual(model.perplexity, math.exp(1.7), places=2)
        self.assertFalse(model.valid_token_accuracy)
        self.assertFalse(model.training_precision)

    def test_versions_increment_for_the_same_base_and_suffix(self):
        first, second = self.train('support'), self.train('support')
        other = self.train('sales')
        self.assertEqual((first.version, second.version, other.version), (1, 2, 1))
        self.assertEqual((first.suffix, other.suffix), ('support', 'sales'))
        job = second.job_id
        job._register_model('checkpoint-of-second', 'step 5')  # a checkpoint of the same job
        checkpoint = self.env['llm.model'].search([('model_ref', '=', 'checkpoint-of-second')])
        self.assertEqual(checkpoint.version, 2, 'a checkpoint belongs to its job\'s version')

    def test_deploy_moves_the_previous_one_of_the_purpose_to_draft(self):
        old, new = self.model('old', 'support'), self.model('new', 'support')
        other = self.model('sales-bot', 'sales')
        old.action_deploy()
        other.action_deploy()
        self.assertEqual(old.state, 'deployed')
        new.action_deploy()
        self.assertEqual((old.state, new.state, other.state), ('draft', 'deployed', 'deployed'))

    def test_deploy_refuses_without_a_purpose(self):
        model = self.model('aimless')
        with self.assertRaisesRegex(UserError, 'has no purpose: set one'):
            model.action_deploy()
        self.assertEqual(model.state, 'draft')

    def test_archive_clears_active_and_undeploys(self):
        model = self.model('retired', 'support')
        model.action_deploy()
        model.action_archive_model()
        self.assertEqual((model.state, model.active), ('archived', False))
        self.assertFalse(self.env['llm.model'].get_deployed('support'))
        with self.assertRaisesRegex(UserError, 'is archived; restore it'):
            model.action_deploy()

    def test_get_deployed_honours_the_company(self):
        other_company = self.env['res.company'].create({'name': 'Other LLM Co'})
        foreign = self.env['llm.provider'].create({'name': 'Theirs', 'service': 'test',
                                                   'company_id': other_company.id})
        ours = self.model('ours', 'support')
        self.assertEqual(ours.company_id, self.env.user.company_id)
        theirs = self.model('theirs', 'support', provider=foreign)
        billing = self.model('their-billing', 'billing', provider=foreign)
        (ours | theirs | billing).action_deploy()
        self.assertEqual(ours.state, 'deployed', 'another company\'s deploy leaves ours alone')
        Model = self.env['llm.model']
        self.assertEqual(Model.get_deployed('support'), ours)
        self.assertFalse(Model.get_deployed('billing'), 'deployed in another company only')
        self.assertEqual(Model.get_deployed('nothing'), Model.browse())
        self.env.user.write({'company_ids': [(4, other_company.id)], 'company_id': other_company.id})
        self.assertEqual(Model.get_deployed('billing'), billing)


class TestCompareWizard(TrainingCase):

    def test_models_that_cannot_generate_get_a_clear_message_each(self):
        second = self.env['llm.model'].create({'name': 'Tiny 2', 'provider_id': self.provider.id,
                                               'model_ref': 'tiny-2'})
        wizard = self.env['llm.model.compare.wizard'].with_context(
            active_model='llm.model', active_ids=(self.base_model | second).ids).create({'prompt': 'Hello?'})
        self.assertEqual(wizard.model_ids, self.base_model | second)
        wizard.action_compare()
        self.assertEqual(wizard.result.count('No answer: Provider "Scripted" cannot generate replies.'), 2)
        self.assertIn('=== Tiny ===', wizard.result)
        self.assertIn('=== Tiny 2 ===', wizard.result)

    def test_compare_needs_a_prompt(self):
        wizard = self.env['llm.model.compare.wizard'].create({'model_ids': [(6, 0, self.base_model.ids)]})
        with self.assertRaisesRegex(UserError, 'Write a prompt'):
            wizard.action_compare()
