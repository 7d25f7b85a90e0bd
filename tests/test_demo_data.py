from odoo.tests.common import TransactionCase


class TestDemoData(TransactionCase):
    """The test database is created with demo data: the records `make demo` shows are there."""

    def test_demo_records(self):
        job = self.env.ref('llm_training.demo_job_northwind')
        self.assertEqual(job.state, 'draft')
        self.assertEqual(job.provider_id, self.env.ref('llm_training.demo_provider_local'))
        self.assertEqual(job.base_model_id.model_ref, 'SmolLM2-135M-Instruct')
        dataset = self.env.ref('llm_training.demo_dataset_northwind')
        self.assertEqual(dataset.state, 'valid', dataset.validation_report)
        self.assertEqual(dataset.example_count, 25)

    def test_cron_and_menus(self):
        cron = self.env.ref('llm_training.ir_cron_sync_training_jobs')
        self.assertEqual((cron.interval_number, cron.interval_type, cron.numbercall), (1, 'minutes', -1))
        self.assertTrue(cron.active)
        for xmlid in ('llm_training_job_menu', 'llm_training_dataset_menu', 'llm_provider_menu', 'llm_model_menu'):
            self.assertTrue(self.env.ref('llm_training.' + xmlid).action)
        self.assertEqual(self.env.ref('llm_training.llm_training_job_menu').complete_name, 'LLM/Training/Jobs')

    def test_cron_record_moves_a_submitted_job(self):
        """The cron record's own code (noupdate data) reaches the engine."""
        provider = self.env['llm.provider'].create({'name': 'Scripted', 'service': 'test', 'test_behavior': 'hold'})
        model = self.env['llm.model'].create({'name': 'M', 'provider_id': provider.id, 'model_ref': 'demo-cron-m'})
        job = self.env.ref('llm_training.demo_job_northwind').copy({'provider_id': provider.id, 'base_model_id': model.id})
        job.action_submit()
        self.env.ref('llm_training.ir_cron_sync_training_jobs').method_direct_trigger()
        job.invalidate_cache()
        self.assertEqual(job.state, 'queued')
        self.assertTrue(job.external_job_id)
