"""The New Fine-tuning Job wizard: three steps, an estimate and warnings, a submitted job."""
import unittest
import xmlrpc.client

import odoo
from odoo.exceptions import AccessError, UserError
from odoo.tests.common import HttpCase

from odoo.addons.llm_training.lib.jobs import job_estimate

from .common import TrainingCase, jsonl, valid_examples
from .test_xmlrpc import ensure_http_server


class TestEstimateTexts(unittest.TestCase):
    """The plain functions behind the review step."""

    def test_priced_provider_shows_the_cost(self):
        text = job_estimate.estimate_text(examples=100, tokens=50000, epochs=3, price=8.0)
        self.assertIn('Trained tokens: 150000', text)
        self.assertIn('Estimated cost: 1.20 USD (150000 tokens x 8 USD per 1M tokens)', text)
        self.assertNotIn('training time', text)

    def test_measured_throughput_gives_the_time(self):
        text = job_estimate.estimate_text(examples=100, tokens=36000, epochs=2, tokens_per_second=20.0)
        self.assertIn('Expected training time: 1 h 00 min (at 20.0 tokens/s measured on this provider)', text)

    def test_unmeasured_provider_says_so(self):
        text = job_estimate.estimate_text(examples=100, tokens=36000, epochs=2)
        self.assertIn('not measured yet on this provider', text)

    def test_warnings(self):
        text = job_estimate.warnings_text(
            5, [{'name': 'a', 'state': 'invalid', 'token_max': 0}, {'name': 'b', 'state': 'draft', 'token_max': 0},
                {'name': 'c', 'state': 'valid', 'token_max': 9000}],
            context_length=8192, cost=30.0, month_cost=80.0, monthly_budget=100.0).splitlines()
        self.assertEqual(len(text), 5)
        self.assertIn('Too few examples: 5', text[0])
        self.assertIn('Dataset "a" is invalid', text[1])
        self.assertIn('Dataset "b" is not validated yet', text[2])
        self.assertIn('Dataset "c" has examples of 9000 tokens, over the base model\'s context of 8192', text[3])
        self.assertIn('Over the provider\'s monthly budget: 80.00 USD this month plus 30.00 USD', text[4])
        self.assertEqual(job_estimate.warnings_text(None, [], cost=1.0, month_cost=0.0, monthly_budget=0.0), '',
                         'unknown example count and no budget: nothing to say')

    def test_presets_fill_only_what_is_not_given(self):
        self.assertEqual(job_estimate.preset_values('quick', {'epochs': 2}),
                         {'learning_rate': 2e-4, 'lora_r': 8, 'lora_alpha': 16})


class TestJobWizard(TrainingCase):

    def wizard(self, **values):
        dataset = values.pop('dataset', None) or self.validated_dataset()
        vals = {'name': 'Wizard job', 'dataset_ids': [(6, 0, dataset.ids)], 'provider_id': self.provider.id,
                'base_model_id': self.base_model.id}
        vals.update(values)
        return self.env['llm.training.job.wizard'].create(vals)

    def validated_dataset(self, n=12):
        dataset = self.make_dataset(jsonl(valid_examples(n)))
        dataset._validate(self.base_model)
        return dataset

    def test_steps_then_submit_creates_and_submits_the_job(self):
        wizard = self.wizard(preset='quick', suffix='support')
        self.assertEqual((wizard.epochs, wizard.lora_r, wizard.lora_alpha), (1, 8, 16), 'the preset filled them')
        self.assertEqual(wizard.action_next()['res_id'], wizard.id)
        self.assertEqual(wizard.step, 'settings')
        wizard.action_next()
        self.assertEqual(wizard.step, 'review')
        wizard.action_back()
        self.assertEqual(wizard.step, 'settings')
        wizard.action_next()
        action = wizard.action_submit()
        job = self.env['llm.training.job'].browse(action['res_id'])
        self.assertEqual((action['res_model'], wizard.job_id), ('llm.training.job', job))
        self.assertEqual((job.state, job.epochs, job.lora_r, job.suffix), ('validating', 1, 8, 'support'))
        with self.assertRaisesRegex(UserError, 'already submitted job "Wizard job"'):
            wizard.action_submit()

    def test_next_says_what_a_step_needs(self):
        wizard = self.env['llm.training.job.wizard'].create({'name': 'No data'})
        with self.assertRaisesRegex(UserError, r'Choose at least one training dataset \(step Data\)'):
            wizard.action_next()
        wizard = self.wizard(hyperparameters='{"warmup_ratio": 5}')
        wizard.action_next()
        with self.assertRaisesRegex(UserError, 'Settings: .*warmup_ratio'):
            wizard.action_next()

    def test_estimate_for_a_priced_provider_gives_the_cost(self):
        self.base_model.training_price = 10.0
        wizard = self.wizard(epochs=2, preset=False)
        dataset = wizard.dataset_ids
        self.assertIn('Examples: 12', wizard.estimate)
        self.assertIn('Epochs: 2', wizard.estimate)
        self.assertIn('Trained tokens: %d' % (dataset.token_total * 2), wizard.estimate)
        self.assertIn('Estimated cost: %.2f USD' % (dataset.token_total * 2 * 10.0 / 1e6), wizard.estimate)

    def test_estimate_time_from_the_measured_throughput(self):
        wizard = self.wizard()
        self.assertIn('Expected training time: not measured yet on this provider', wizard.estimate)
        measured_on = self.make_job()
        self.env['llm.provider.throughput']._record(measured_on, 0.5)
        wizard.invalidate_cache()
        seconds = wizard.dataset_ids.token_total * 3 / 0.5  # balanced preset: 3 epochs
        self.assertIn('Expected training time: %s (at 0.5 tokens/s measured on this provider)'
                      % job_estimate.format_duration(seconds), wizard.estimate)

    def test_warns_about_too_few_examples(self):
        wizard = self.wizard(dataset=self.make_dataset(jsonl(valid_examples(5))))
        self.assertIn('not validated yet', wizard.warnings)
        self.assertNotIn('Too few', wizard.warnings, 'unknown until validated')
        wizard.dataset_ids._validate(self.base_model)
        wizard.invalidate_cache()
        self.assertIn('Dataset "data.jsonl" is invalid', wizard.warnings)
        self.assertIn('Too few examples: 5; fine-tuning needs at least 10', wizard.warnings)

    def test_warns_over_the_monthly_budget(self):
        self.base_model.training_price = 1e6  # 1 USD per token
        self.provider.monthly_budget = 100.0
        wizard = self.wizard()
        self.assertFalse(self.provider.month_cost)
        self.assertIn("Over the provider's monthly budget: 0.00 USD this month plus", wizard.warnings)
        self.provider.monthly_budget = 0.0
        wizard.invalidate_cache()
        self.assertFalse(wizard.warnings, 'no budget, valid data: nothing to warn about')

    def test_month_cost_counts_finished_and_active_jobs(self):
        self.base_model.training_price = 1000.0
        done = self.make_job(dataset=self.validated_dataset(), base_model_id=self.base_model.id)
        done.action_submit()
        self.run_cron(3)
        self.assertEqual(done.state, 'completed')
        active = self.make_job(dataset=self.validated_dataset(), base_model_id=self.base_model.id)
        active.action_submit()
        self.provider.invalidate_cache()
        self.assertAlmostEqual(self.provider.month_cost, done.final_cost + active.estimated_cost, places=2)
        self.assertGreater(done.final_cost, 0)

    def test_a_user_who_cannot_create_jobs_is_refused(self):
        reader = self.env['res.users'].with_context(no_reset_password=True).create({
            'name': 'Reader', 'login': 'llm_wizard_reader', 'groups_id': [(6, 0, [self.env.ref('base.group_user').id])]})
        wizard = self.env['llm.training.job.wizard'].sudo(reader).create({'name': 'Not mine to run'})
        with self.assertRaises(AccessError):
            wizard.action_next()
        self.assertEqual(wizard.step, 'data')


class TestJobWizardXmlRpc(HttpCase):
    """Another addon drives the wizard over XML-RPC to a submitted job."""

    @classmethod
    def setUpClass(cls):
        ensure_http_server()
        super(TestJobWizardXmlRpc, cls).setUpClass()

    def test_wizard_over_xmlrpc_submits_the_job(self):
        url = 'http://127.0.0.1:%d/xmlrpc/2/' % odoo.tools.config['http_port']
        db = self.env.cr.dbname
        uid = xmlrpc.client.ServerProxy(url + 'common').authenticate(db, 'admin', 'admin', {})
        rpc = xmlrpc.client.ServerProxy(url + 'object', allow_none=True)

        def call(model, method, *args):
            return rpc.execute_kw(db, uid, 'admin', model, method, list(args))

        provider_id = call('llm.provider', 'create', {'name': 'RPC wizard provider', 'service': 'test'})
        model_id = call('llm.model', 'create', {'name': 'RPC wizard base', 'provider_id': provider_id,
                                                'model_ref': 'rpc-wizard-base', 'training_price': 4.0})
        import base64
        attachment_id = call('ir.attachment', 'create', {
            'name': 'w.jsonl', 'datas_fname': 'w.jsonl', 'datas': base64.b64encode(jsonl(valid_examples(12))).decode()})
        dataset_id = call('llm.training.dataset', 'create', {'name': 'W', 'attachment_ids': [(6, 0, [attachment_id])]})
        call('llm.training.dataset', 'action_validate', [dataset_id])

        wizard_id = call('llm.training.job.wizard', 'create', {'name': 'RPC wizard job',
                                                               'dataset_ids': [(6, 0, [dataset_id])]})
        call('llm.training.job.wizard', 'action_next', [wizard_id])
        call('llm.training.job.wizard', 'write', [wizard_id], {'provider_id': provider_id, 'base_model_id': model_id,
                                                               'preset': 'thorough'})
        call('llm.training.job.wizard', 'action_next', [wizard_id])
        review = call('llm.training.job.wizard', 'read', [wizard_id], ['step', 'estimate', 'warnings', 'epochs'])[0]
        self.assertEqual((review['step'], review['epochs']), ('review', 5))
        self.assertIn('Estimated cost:', review['estimate'])
        self.assertFalse(review['warnings'])
        action = call('llm.training.job.wizard', 'action_submit', [wizard_id])
        self.assertEqual(action['res_model'], 'llm.training.job')
        job = call('llm.training.job', 'read', [action['res_id']], ['state', 'name', 'epochs', 'user_id'])[0]
        self.assertEqual((job['state'], job['name'], job['epochs'], job['user_id'][0]),
                         ('validating', 'RPC wizard job', 5, uid))
