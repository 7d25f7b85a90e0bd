from odoo.exceptions import AccessError

from .common import TrainingCase


class TestAccess(TrainingCase):

    @classmethod
    def setUpClass(cls):
        super(TestAccess, cls).setUpClass()
        Users = cls.env['res.users'].with_context(no_reset_password=True)
        cls.user = Users.create({'name': 'Plain User', 'login': 'llm_plain_user', 'email': 'user@example.com',
                                 'groups_id': [(6, 0, [cls.env.ref('base.group_user').id])]})
        cls.manager = Users.create({'name': 'LLM Manager', 'login': 'llm_manager_user', 'email': 'manager@example.com',
                                    'groups_id': [(6, 0, [cls.env.ref('llm_training.group_llm_manager').id])]})
        cls.provider.api_key = 'sk-secret-123'
        cls.job = cls.make_job()

    def test_user_reads_everything_but_the_key(self):
        for model in ('llm.training.job', 'llm.training.dataset', 'llm.model', 'llm.provider',
                      'llm.training.job.event', 'llm.training.job.metric'):
            self.env[model].sudo(self.user).search([]).read([] if model != 'llm.provider' else ['name'])
        provider = self.provider.sudo(self.user)
        self.assertEqual(provider.name, 'Scripted')
        with self.assertRaises(AccessError):
            provider.read(['api_key'])
        self.assertNotIn('api_key', provider.fields_get())

    def test_user_cannot_write(self):
        with self.assertRaises(AccessError):
            self.job.sudo(self.user).write({'name': 'changed'})
        with self.assertRaises(AccessError):
            self.job.sudo(self.user).action_submit()
        with self.assertRaises(AccessError):
            self.env['llm.provider'].sudo(self.user).create({'name': 'x', 'service': 'test'})
        with self.assertRaises(AccessError):
            self.base_model.sudo(self.user).unlink()

    def test_manager_has_full_access(self):
        provider = self.provider.sudo(self.manager)
        self.assertEqual(provider.api_key, 'sk-secret-123')
        job = self.make_job(env=self.env(user=self.manager.id))
        job.write({'name': 'renamed'})
        job.action_submit()
        self.assertEqual(job.state, 'validating')
        job.action_cancel()
        job.unlink()

    def test_settings_admin_is_manager(self):
        self.assertTrue(self.env.ref('base.user_root').has_group('llm_training.group_llm_manager'))
        admin_group = self.env.ref('base.group_system')
        self.assertIn(self.env.ref('llm_training.group_llm_manager'), admin_group.implied_ids)

    def test_key_never_in_errors_or_export(self):
        self.provider.test_behavior = 'fail_start'
        job = self.make_job()
        job.action_submit()
        self.run_cron()
        self.assertEqual(job.state, 'failed')
        for text in [job.error_message] + job.event_ids.mapped('message') + job.message_ids.mapped('body'):
            self.assertNotIn('sk-secret-123', text or '')
        exported = self.provider.sudo(self.user).export_data(['name', 'service'])['datas']
        self.assertNotIn('sk-secret-123', str(exported))

    def test_company_rule(self):
        other_company = self.env['res.company'].create({'name': 'Other Co'})
        foreign = self.env['llm.training.dataset'].create({'name': 'foreign', 'company_id': other_company.id})
        visible = self.env['llm.training.dataset'].sudo(self.user).search([('id', '=', foreign.id)])
        self.assertFalse(visible)
