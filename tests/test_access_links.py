"""Access follows the data (issue 19): every link is checked, "runs as" is the caller, restricted
datasets and the models trained on them stay with their owner and managers, secrets are
write-only for people. Two companies; an LLM manager of company A who is not a system
administrator, a manager of company B, a plain internal user of A, a system administrator."""
import xmlrpc.client
from datetime import datetime, timedelta

import odoo
from odoo import SUPERUSER_ID, fields
from odoo.exceptions import AccessError, UserError, ValidationError

from odoo.addons.llm_training.lib.datasets import conversations as conv

from .common import TrainingCase, jsonl, valid_examples
from .test_openai_api import ApiCase

B_TEXT = 'Company B private question'


class AccessCase(TrainingCase):

    @classmethod
    def setUpClass(cls):
        super(AccessCase, cls).setUpClass()
        Users = cls.env['res.users'].with_context(no_reset_password=True)
        manager_group = cls.env.ref('llm_training.group_llm_manager')
        cls.company_a = cls.env.user.company_id
        cls.company_b = cls.env['res.company'].create({'name': 'Company B (links)'})

        def user(login, groups, company=None):
            company = company or cls.company_a
            return Users.create({'name': login.replace('_', ' ').title(), 'login': login,
                                 'email': '%s@example.com' % login, 'company_id': company.id,
                                 'company_ids': [(6, 0, company.ids)], 'groups_id': [(6, 0, groups.ids)]})
        cls.manager_a = user('llmt_links_manager_a', manager_group)
        cls.manager_b = user('llmt_links_manager_b', manager_group, cls.company_b)
        cls.plain = user('llmt_links_plain', cls.env.ref('base.group_user'))
        cls.sysadmin = user('llmt_links_sysadmin', cls.env.ref('base.group_system'))
        assert not cls.manager_a.has_group('base.group_system')
        # company B's provider, model and dataset, made by B's manager
        cls.provider_b = cls.env['llm.provider'].create({'name': 'B provider', 'service': 'test',
                                                         'company_id': cls.company_b.id, 'max_concurrent_jobs': 0})
        cls.base_model_b = cls.env['llm.model'].create({'name': 'Tiny B', 'provider_id': cls.provider_b.id,
                                                        'model_ref': 'tiny-b'})
        examples = valid_examples(prefix=B_TEXT)
        cls.dataset_b = cls.make_dataset(jsonl(examples), name='b.jsonl', env=cls.env(user=cls.manager_b))
        cls.attachment_b = cls.dataset_b.sudo().attachment_ids
        assert cls.dataset_b.company_id == cls.company_b and cls.provider.company_id == cls.company_a

    def as_user(self, user, model):
        return self.env[model].sudo(user)


class TestEveryLinkIsChecked(AccessCase):

    def test_a_manager_cannot_link_another_companys_file(self):
        attachment = self.attachment_b.id
        Dataset = self.as_user(self.manager_a, 'llm.training.dataset')
        with self.assertRaises(AccessError):
            Dataset.create({'name': 'stolen', 'attachment_ids': [(4, attachment)]})
        with self.assertRaises(AccessError):
            Dataset.create({'name': 'stolen', 'attachment_ids': [(6, 0, [attachment])]})
        mine = self.make_dataset(env=self.env(user=self.manager_a))
        with self.assertRaises(AccessError):
            mine.write({'attachment_ids': [(4, attachment)]})
        self.assertNotIn(B_TEXT, mine.preview or '')
        self.assertEqual(self.env['ir.attachment'].search_count([('datas_fname', '=', 'b.jsonl')]), 1, 'no copy made')

    def test_a_manager_may_link_a_file_they_can_read(self):
        mine = self.make_dataset(env=self.env(user=self.manager_a))
        second = self.as_user(self.manager_a, 'llm.training.dataset').create(
            {'name': 'second', 'attachment_ids': [(4, mine.attachment_ids.id)]})
        self.assertEqual(len(second.attachment_ids), 1)
        self.assertNotEqual(second.attachment_ids, mine.attachment_ids, 'copied, never shared')

    def test_a_job_of_company_a_refuses_company_bs_dataset_provider_and_model(self):
        Job = self.as_user(self.manager_a, 'llm.training.job')
        values = {'name': 'Job', 'provider_id': self.provider.id, 'base_model_id': self.base_model.id}
        with self.assertRaises(AccessError):
            Job.create(dict(values, dataset_ids=[(6, 0, self.dataset_b.ids)]))
        with self.assertRaises(AccessError):
            Job.create(dict(values, dataset_ids=[(6, 0, self.make_dataset(env=self.env(user=self.manager_a)).ids)],
                            validation_dataset_ids=[(4, self.dataset_b.id)]))
        with self.assertRaises(AccessError):
            Job.create({'name': 'Job', 'provider_id': self.provider_b.id, 'base_model_id': self.base_model_b.id,
                        'dataset_ids': [(6, 0, self.make_dataset(env=self.env(user=self.manager_a)).ids)]})
        with self.assertRaises(AccessError):
            Job.create(dict(values, company_id=self.company_b.id,
                            dataset_ids=[(6, 0, self.make_dataset(env=self.env(user=self.manager_a)).ids)]))
        job = self.make_job(env=self.env(user=self.manager_a))
        with self.assertRaises(AccessError):
            job.write({'dataset_ids': [(4, self.dataset_b.id)]})

    def test_the_job_wizard_refuses_another_companys_dataset(self):
        with self.assertRaises(AccessError):
            self.as_user(self.manager_a, 'llm.training.job.wizard').create(
                {'name': 'W', 'dataset_ids': [(6, 0, self.dataset_b.ids)]})

    def test_the_data_holds_it_even_for_the_superuser(self):
        with self.assertRaises(ValidationError):
            self.make_job(self.dataset_b)  # a company A job (the superuser's company) on B's dataset
        job = self.make_job()
        with self.assertRaises(ValidationError):
            job.write({'provider_id': self.provider_b.id, 'base_model_id': self.base_model_b.id})

    def test_the_engine_checks_again_before_it_reads_data_or_calls_the_provider(self):
        job = self.make_job(env=self.env(user=self.manager_a))
        job.action_submit()
        # linked behind the ORM's back (an old database, a bad import): the engine refuses it
        self.env.cr.execute('INSERT INTO llm_training_job_dataset_rel (job_id, dataset_id) VALUES (%s, %s)',
                            (job.id, self.dataset_b.id))
        job.invalidate_cache()
        self.run_cron()
        self.assertEqual(job.state, 'failed')
        self.assertIn('b.jsonl', job.error_message)
        self.assertEqual(self.calls(job, 'validate') + self.calls(job, 'start'), 0, 'the provider was not called')

    def test_submit_refuses_data_the_caller_cannot_read(self):
        job = self.make_job(env=self.env(user=self.manager_a))
        self.env.cr.execute('INSERT INTO llm_training_job_dataset_rel (job_id, dataset_id) VALUES (%s, %s)',
                            (job.id, self.dataset_b.id))
        job.invalidate_cache()
        with self.assertRaises(AccessError):
            job.action_submit()
        self.assertEqual(job.state, 'draft')

    def test_submit_checks_the_owner_can_still_read_the_data(self):
        dataset = self.make_dataset(env=self.env(user=self.manager_a))
        job = self.make_job(dataset, env=self.env(user=self.manager_a))
        dataset.sudo().write({'visibility': 'restricted', 'user_id': self.sysadmin.id})
        job.sudo().write({'user_id': self.plain.id})
        job.action_submit()  # the manager reads restricted data; the owner does not
        self.run_cron()
        self.assertEqual(job.state, 'failed')
        self.assertEqual(self.calls(job, 'validate'), 0)

    def test_a_schedule_refuses_another_companys_template_and_unreadable_channels(self):
        template_b = self.make_job(self.dataset_b, provider=self.provider_b, company_id=self.company_b.id)
        Schedule = self.as_user(self.manager_a, 'llm.training.schedule')
        with self.assertRaises(AccessError):
            Schedule.create({'name': 'S', 'template_job_id': template_b.id,
                             'assistant_partner_ids': [(6, 0, self.manager_a.partner_id.ids)]})
        secret_channel = self.env['mail.channel'].create({'name': 'Board only', 'public': 'private'})
        with self.assertRaises(AccessError):
            Schedule.create({'name': 'S', 'template_job_id': self.make_job().id,
                             'channel_ids': [(6, 0, secret_channel.ids)]})


class TestRunsAsTheCaller(AccessCase):

    def test_a_manager_cannot_make_a_key_for_another_user_or_the_superuser(self):
        Key = self.as_user(self.manager_a, 'llm.api.key')
        for user in (self.plain, self.env['res.users'].browse(SUPERUSER_ID)):
            with self.assertRaises(AccessError):
                Key._generate('other', user)
            with self.assertRaises(AccessError):
                self.as_user(self.manager_a, 'llm.api.key.wizard').create({'name': 'other', 'user_id': user.id})
        key, secret = Key._generate('mine', self.manager_a)
        self.assertEqual(key.user_id, self.manager_a)

    def test_a_system_administrator_may_with_a_warning_for_the_superuser(self):
        wizard = self.as_user(self.sysadmin, 'llm.api.key.wizard').create({'name': 'root', 'user_id': SUPERUSER_ID})
        self.assertTrue(wizard.runs_as_superuser)
        wizard.action_generate()
        key = self.env['llm.api.key'].search([('name', '=', 'root')])
        self.assertEqual(key.user_id.id, SUPERUSER_ID)
        self.assertTrue(key.runs_as_superuser)
        self.assertFalse(self.as_user(self.sysadmin, 'llm.api.key')._generate('plain', self.plain)[0].runs_as_superuser)

    def test_the_user_of_a_key_cannot_be_rewritten(self):
        key, secret = self.as_user(self.manager_a, 'llm.api.key')._generate('mine', self.manager_a)
        with self.assertRaises(AccessError):
            key.write({'user_id': SUPERUSER_ID})
        with self.assertRaises(AccessError):
            key.write({'user_id': self.plain.id})
        with self.assertRaises(AccessError):
            key.write({'key_hash': 'x' * 64})  # nor its hash: that would take over the key
        admin_key, _secret = self.as_user(self.sysadmin, 'llm.api.key')._generate('admin', self.sysadmin)
        with self.assertRaises(AccessError):
            admin_key.sudo(self.manager_a).write({'name': 'mine now', 'expires_at': False})
        self.assertEqual(key.user_id, self.manager_a)

    def test_a_schedule_runs_as_its_maker_unless_a_system_administrator_says(self):
        template = self.make_job(env=self.env(user=self.manager_a))
        values = {'name': 'Weekly', 'template_job_id': template.id,
                  'assistant_partner_ids': [(6, 0, self.manager_a.partner_id.ids)]}
        Schedule = self.as_user(self.manager_a, 'llm.training.schedule')
        for user_id in (self.plain.id, SUPERUSER_ID):
            with self.assertRaises(AccessError):
                Schedule.create(dict(values, user_id=user_id))
        schedule = Schedule.create(values)
        self.assertEqual(schedule.user_id, self.manager_a)
        with self.assertRaises(AccessError):
            schedule.write({'user_id': SUPERUSER_ID})
        root = self.as_user(self.sysadmin, 'llm.training.schedule').create(dict(values, user_id=SUPERUSER_ID))
        self.assertTrue(root.runs_as_superuser)
        with self.assertRaises(AccessError):  # acting as its owner: changing what it reads
            root.sudo(self.manager_a).write({'res_model': 'res.partner'})


class TestKeys(AccessCase):

    def test_a_revoked_key_cannot_be_activated_again(self):
        key, secret = self.as_user(self.manager_a, 'llm.api.key')._generate('mine', self.manager_a)
        Key = self.env['llm.api.key']
        self.assertEqual(Key._authenticate(secret), (key.id, self.manager_a.id))
        key.action_revoke()
        self.assertFalse(key.key_hash)
        self.assertTrue(key.revoked_at)
        with self.assertRaises(UserError):
            key.write({'active': True})
        with self.assertRaises(UserError):
            key.sudo().write({'active': True})
        self.assertIsNone(Key._authenticate(secret))

    def test_an_expired_key_is_refused_like_an_unknown_one(self):
        Key = self.as_user(self.manager_a, 'llm.api.key')
        past = fields.Datetime.to_string(datetime.utcnow() - timedelta(minutes=1))
        future = fields.Datetime.to_string(datetime.utcnow() + timedelta(days=1))
        expired, old_secret = Key._generate('old', self.manager_a, past)
        valid, new_secret = Key._generate('new', self.manager_a, future)
        self.assertIsNone(self.env['llm.api.key']._authenticate(old_secret))
        self.assertEqual(self.env['llm.api.key']._authenticate(new_secret), (valid.id, self.manager_a.id))


class TestRestrictedData(AccessCase):

    @classmethod
    def setUpClass(cls):
        super(TestRestrictedData, cls).setUpClass()
        cls.private = cls.make_dataset(jsonl(valid_examples(prefix='Private')), name='private.jsonl',
                                       env=cls.env(user=cls.manager_a))
        cls.private.write({'visibility': 'restricted'})
        cls.public = cls.make_dataset(env=cls.env(user=cls.manager_a))

    def test_a_plain_user_reads_no_restricted_dataset_preview_or_file(self):
        Dataset = self.as_user(self.plain, 'llm.training.dataset')
        self.assertIn(self.public, Dataset.search([]))
        self.assertNotIn(self.private, Dataset.search([]))
        with self.assertRaises(AccessError):
            self.private.sudo(self.plain).read(['name'])
        with self.assertRaises(AccessError):
            self.private.sudo(self.plain).read(['preview'])
        attachment = self.private.attachment_ids
        with self.assertRaises(AccessError):
            attachment.sudo(self.plain).read(['datas'])
        self.assertFalse(self.as_user(self.plain, 'ir.attachment').search([('id', '=', attachment.id)]))
        # its owner and managers read it
        self.assertIn('Private', self.private.sudo(self.manager_a).preview)
        self.assertIn(self.private, self.as_user(self.sysadmin, 'llm.training.dataset').search([]))

    def test_imports_from_conversations_are_restricted_by_default(self):
        self.assertEqual(self.env['llm.training.dataset.import.wizard'].default_get(['visibility'])['visibility'],
                         'restricted')
        self.assertEqual(self.env['llm.training.schedule'].default_get(['visibility'])['visibility'], 'restricted')
        self.assertTrue(self.env['llm.training.dataset.import.wizard'].default_get(['scrub_names'])['scrub_names'])

    def test_a_model_trained_on_restricted_data_is_restricted(self):
        job = self.make_job(self.private, env=self.env(user=self.manager_a))
        model = job._register_model('tiny-private-ft', 'Private fine-tune')
        other = self.make_job(self.public, env=self.env(user=self.manager_a))._register_model('tiny-public-ft', 'Public')
        self.assertEqual((model.visibility, model.user_id), ('restricted', self.manager_a))
        Model = self.as_user(self.plain, 'llm.model')
        self.assertNotIn(model, Model.search([]))
        self.assertIn(other, Model.search([]))
        with self.assertRaises(AccessError):
            model.sudo(self.plain).read(['name'])
        self.assertIn(model, self.as_user(self.manager_a, 'llm.model').search([]))


class TestSecretsAreWriteOnly(AccessCase):

    def test_no_manager_reads_a_secret_through_the_orm(self):
        self.provider.sudo(self.manager_a).api_key = 'sk-links-secret-4321'
        Secret = self.as_user(self.manager_a, 'llm.secret')
        for probe in (lambda: Secret.search_read([], ['value']),
                      lambda: Secret.search_count([('value', '=like', 'sk-links%')]),
                      lambda: Secret.read_group([], ['value'], ['value']),
                      lambda: Secret.search([], order='value'),
                      lambda: self.env['llm.secret'].search([]).sudo(self.manager_a).export_data(['value']),
                      lambda: self.env['llm.secret'].search([]).sudo(self.manager_a).read(['value'])):
            with self.assertRaises(AccessError):
                probe()
        self.assertEqual(self.provider._get_secret('api_key'), 'sk-links-secret-4321', 'the code still reads it')
        self.assertEqual(self.provider.sudo(self.manager_a).api_key_hint, u'\u2022\u2022\u2022\u20224321')

    def test_a_manager_cannot_make_a_secret_for_another_companys_record(self):
        with self.assertRaises(AccessError):
            self.as_user(self.manager_a, 'llm.secret').create({
                'res_model': 'llm.provider', 'res_id': self.provider_b.id, 'field_name': 'api_key', 'value': 'x'})
        with self.assertRaises(AccessError):
            self.as_user(self.manager_a, 'llm.secret')._write_value(self.provider_b.sudo(self.manager_a),
                                                                    'api_key', 'sk-planted')
        self.assertFalse(self.provider_b._get_secret('api_key'))


class TestScrub(AccessCase):

    def test_portal_links_tokens_short_phones_lower_case_ibans_and_names(self):
        text = ('See https://erp.example.com/my/orders/12?access_token=0f3c9a8b-77 or '
                '/mail/view?model=sale.order&res_id=3&access_token=abcdef123 (token=abc123def). Call 123456, '
                'IBAN de89 3704 0044 0532 0130 00. Jane Doe said: thanks jane!')
        self.assertEqual(conv.scrub_pii(text, conv.names_pattern(['Jane Doe'])),
                         'See [LINK] or [LINK] (token=[TOKEN]). Call [PHONE], IBAN [IBAN]. [NAME] said: thanks [NAME]!')
        self.assertEqual(conv.scrub_pii('3 items, 12345 points, on 2020-03-02'), '3 items, 12345 points, on 2020-03-02')

    def test_the_import_replaces_the_names_of_the_conversations_people(self):
        channel = self.env['mail.channel'].create({'name': 'Names', 'public': 'private',
                                                   'channel_partner_ids': [(6, 0, (self.plain | self.manager_a)
                                                                            .mapped('partner_id').ids)]})
        start = datetime(2020, 3, 2, 9, 0)
        for minutes, author, body in ((0, self.plain, 'Hello, I am Llmt Links Plain, call me'),
                                      (1, self.manager_a, 'Hi Plain, this is Manager from Llmt Links Manager A')):
            self.env['mail.message'].create({
                'model': 'mail.channel', 'res_id': channel.id, 'body': body, 'message_type': 'comment',
                'subtype_id': self.env.ref('mail.mt_comment').id, 'author_id': author.partner_id.id,
                'date': fields.Datetime.to_string(start + timedelta(minutes=minutes))})
        wizard = self.env['llm.training.dataset.import.wizard'].create({
            'source': 'channel', 'channel_ids': [(6, 0, channel.ids)], 'min_turns': 2,
            'assistant_partner_ids': [(6, 0, self.manager_a.partner_id.ids)], 'name': 'names'})
        text = str(wizard._build().examples)
        self.assertNotIn('Plain', text)
        self.assertNotIn('Links', text)
        self.assertIn('[NAME]', text)
        wizard.scrub_names = False
        self.assertIn('Plain', str(wizard._build().examples))


class TestOverHttp(ApiCase):
    """The same rules over /v1 (the OpenAI SDK) and XML-RPC, as real clients see them."""

    def setUp(self):
        super(TestOverHttp, self).setUp()
        Users = self.env['res.users'].with_context(no_reset_password=True)
        self.manager_a = Users.create({'name': 'Http Manager A', 'login': 'llmt_http_manager_a', 'password': 'pw-a-123',
                                       'email': 'http_manager_a@example.com',
                                       'groups_id': [(6, 0, self.env.ref('llm_training.group_llm_manager').ids)]})
        self.plain = Users.create({'name': 'Http Plain', 'login': 'llmt_http_plain', 'email': 'http_plain@example.com',
                                   'groups_id': [(6, 0, self.env.ref('base.group_user').ids)]})

    def test_a_restricted_file_and_model_are_not_served_to_a_plain_user(self):
        manager_key, plain_key = self.make_key(self.manager_a), self.make_key(self.plain)
        private = self.upload(jsonl(valid_examples(prefix='Private')), filename='private.jsonl', key=manager_key)
        self.assertIn('id', private, private)
        public = self.upload(jsonl(valid_examples()), filename='public.jsonl', key=manager_key)
        dataset = self.env['llm.training.dataset'].browse(int(private['id'].split('-')[1]))
        dataset.write({'visibility': 'restricted'})
        listed = [f['id'] for f in self.ok('files', key=plain_key)['data']]
        self.assertIn(public['id'], listed)
        self.assertNotIn(private['id'], listed)
        self.refused(404, 'file', key=plain_key, id=private['id'])
        self.refused(404, 'file_content', key=plain_key, id=private['id'])
        self.assertIn('Private', self.ok('file_content', key=manager_key, id=private['id']))
        job = self.env['llm.training.job'].sudo(self.manager_a).create({
            'name': 'Private job', 'provider_id': self.scripted.id, 'base_model_id': self.tiny.id,
            'dataset_ids': [(6, 0, dataset.ids)]})
        model = job._register_model('tiny-api-private', 'Private fine-tune')
        self.assertEqual(model.visibility, 'restricted')
        seen_by_plain = {m['id'] for m in self.ok('models', key=plain_key)}
        seen_by_manager = {m['id'] for m in self.ok('models', key=manager_key)}
        self.assertEqual(len(seen_by_manager - seen_by_plain), 1, 'the restricted model, for its owner only')
        self.assertFalse(seen_by_plain - seen_by_manager)

    def test_an_expired_key_gets_401(self):
        past = fields.Datetime.to_string(datetime.utcnow() - timedelta(minutes=1))
        expired = self.env['llm.api.key']._generate('old', self.manager_a, past)[1]
        self.refused(401, 'files', key=expired, code='invalid_api_key')

    def test_xmlrpc_cannot_rewrite_who_a_key_runs_as(self):
        key = self.env['llm.api.key'].sudo(self.manager_a)._generate('mine', self.manager_a)[0]
        self.cr.commit()  # a test cursor's commit is a savepoint: the RPC request sees the key
        url = 'http://127.0.0.1:%d/xmlrpc/2/object' % odoo.tools.config['http_port']
        rpc = xmlrpc.client.ServerProxy(url)
        args = (self.cr.dbname, self.manager_a.id, 'pw-a-123', 'llm.api.key')
        with self.assertRaises(xmlrpc.client.Fault) as refused:
            rpc.execute_kw(*(args + ('write', [[key.id], {'user_id': SUPERUSER_ID}])))
        self.assertIn('system administrator', refused.exception.faultString)
        with self.assertRaises(xmlrpc.client.Fault):
            rpc.execute_kw(*(args + ('write', [[key.id], {'key_hash': 'f' * 64}])))
        with self.assertRaises(xmlrpc.client.Fault):
            rpc.execute_kw(*(args[:3] + ('llm.secret', 'search_read', [[]], {'fields': ['value']})))
        key.invalidate_cache()
        self.assertEqual(key.user_id, self.manager_a)
