"""Access rights as a hostile internal user, a manager and another company's user probe them."""
import base64
import importlib.util
import io
import os

import odoo
from odoo.exceptions import AccessError
from odoo.tests.common import get_db_name

from odoo.addons.llm_training.lib.datasets.dataset_validator import DatasetValidator
from odoo.addons.llm_training.user_errors import DatasetBusyError

from .common import TrainingCase, chat, jsonl, valid_examples

SECRET = 'sk-secret-P4ssw0rd-9876'


class SecurityCase(TrainingCase):

    @classmethod
    def setUpClass(cls):
        super(SecurityCase, cls).setUpClass()
        Users = cls.env['res.users'].with_context(no_reset_password=True)
        cls.user = Users.create({'name': 'Plain User', 'login': 'llm_plain_user', 'email': 'user@example.com',
                                 'groups_id': [(6, 0, [cls.env.ref('base.group_user').id])]})
        cls.manager = Users.create({'name': 'LLM Manager', 'login': 'llm_manager_user', 'email': 'manager@example.com',
                                    'groups_id': [(6, 0, [cls.env.ref('llm_training.group_llm_manager').id])]})
        cls.company_b = cls.env['res.company'].create({'name': 'Company B'})
        cls.user_b = Users.create({'name': 'B User', 'login': 'llm_b_user', 'email': 'b@example.com',
                                   'company_id': cls.company_b.id, 'company_ids': [(6, 0, cls.company_b.ids)],
                                   'groups_id': [(6, 0, [cls.env.ref('llm_training.group_llm_manager').id])]})
        cls.provider.sudo(cls.manager).api_key = SECRET


class TestSecretKey(SecurityCase):

    def test_key_is_stored_apart_and_masked(self):
        self.provider.invalidate_cache()  # as a new request sees it
        self.assertFalse(self.provider.sudo(self.manager).read(['api_key'])[0]['api_key'], 'never sent back')
        self.assertEqual(self.provider.sudo(self.manager).api_key_hint, u'\u2022\u2022\u2022\u20229876')
        self.assertEqual(self.provider._get_secret('api_key'), SECRET)
        self.env.cr.execute('SELECT * FROM llm_provider WHERE id = %s', (self.provider.id,))
        self.assertNotIn(SECRET, str(self.env.cr.fetchall()), 'no copy in the provider row')

    def test_user_reaches_the_key_by_no_orm_path(self):
        Provider = self.env['llm.provider'].sudo(self.user)
        provider = self.provider.sudo(self.user)
        self.assertNotIn('api_key', Provider.fields_get())
        self.assertNotIn('api_key_hint', Provider.fields_get())
        with self.assertRaises(AccessError):
            provider.read(['api_key'])
        with self.assertRaises(AccessError):
            provider.read(['api_key_hint'])
        self.assertNotIn(SECRET, str(Provider.search_read([('id', '=', self.provider.id)])))
        # domains cannot test the key: a right and a wrong prefix find the same records
        self.assertEqual(Provider.search_count([('api_key', '=like', 'sk-secret-P%')]),
                         Provider.search_count([('api_key', '=like', 'zz-wrong%')]))
        # no ordering by it, no grouping by it
        ordered = Provider.search([], order='api_key')
        self.assertEqual(ordered, Provider.search([]).sorted(lambda p: (p.sequence, p.name)))
        # the key is stored in no column of the provider: Odoo refuses to group by it
        with self.assertRaisesRegex(AssertionError, 'database-persisted'):
            Provider.read_group([], ['name', 'api_key'], ['api_key'])
        exported = provider.export_data(['name', 'api_key', 'api_key_hint'])
        self.assertNotIn(SECRET, str(exported))
        self.assertNotIn('9876', str(exported), 'not even the last four characters')
        # the secrets model itself is closed to users: read, search, group, order
        Secret = self.env['llm.secret'].sudo(self.user)
        for probe in (lambda: Secret.search([]), lambda: Secret.search_count([('value', '=like', 'sk%')]),
                      lambda: Secret.read_group([], ['value'], ['value']),
                      lambda: Secret.search([], order='value'),
                      lambda: self.env['llm.secret'].sudo().search([]).sudo(self.user).read(['value'])):
            with self.assertRaises(AccessError):
                probe()

    def test_manager_form_data_onchange_and_copy_hold_no_key(self):
        provider = self.provider.sudo(self.manager)
        data = provider.read()[0]
        self.assertNotIn(SECRET, str(data))
        spec = {name: '' for name in ('name', 'service', 'api_key', 'api_key_hint', 'base_url')}
        result = provider.onchange(dict(data, name='Renamed'), 'name', spec)
        self.assertNotIn(SECRET, str(result))
        copy = provider.copy()
        self.assertFalse(copy._get_secret('api_key'), 'a copied provider starts without a key')
        self.assertNotIn(SECRET, str(provider.export_data(['name', 'api_key', 'api_key_hint'])))

    def test_manager_replaces_and_clears_the_key(self):
        provider = self.provider.sudo(self.manager)
        provider.write({'api_key': ''})  # an empty field on save keeps the key
        self.assertEqual(provider._get_secret('api_key'), SECRET)
        provider.write({'api_key': 'sk-new-key-1111'})
        self.assertEqual(provider._get_secret('api_key'), 'sk-new-key-1111')
        provider.action_clear_api_key()
        self.assertFalse(provider._get_secret('api_key'))
        with self.assertRaises(AccessError):
            self.provider.sudo(self.user).action_clear_api_key()

    def test_other_company_manager_cannot_read_the_key(self):
        with self.assertRaises(AccessError):
            self.env['llm.secret'].sudo(self.user_b).search([('res_model', '=', 'llm.provider')])

    def test_key_never_in_errors_or_export(self):
        self.provider.test_behavior = 'fail_start'
        job = self.make_job()
        job.action_submit()
        self.run_cron()
        self.assertEqual(job.state, 'failed')
        for text in [job.error_message] + job.event_ids.mapped('message') + job.message_ids.mapped('body'):
            self.assertNotIn(SECRET, text or '')


class TestCheckBeforeActing(SecurityCase):
    """A user without write access is refused before any provider call, process or record."""

    def running_job(self):
        job = self.make_job()
        job.action_submit()
        self.run_cron(2)
        self.assertEqual(job.state, 'training')
        return job

    def test_internal_user_buttons_touch_nothing(self):
        job = self.running_job()
        before = {m: self.calls(job, m) for m in ('start', 'check', 'cancel')}
        events = len(job.event_ids)
        as_user = job.sudo(self.user)
        for action in (as_user.action_cancel, as_user.action_check_status, as_user.action_submit,
                       as_user.action_resume, as_user.action_reset_to_draft, as_user.action_register_checkpoints):
            with self.assertRaises(AccessError):
                action()
        job.invalidate_cache()
        self.assertEqual({m: self.calls(job, m) for m in ('start', 'check', 'cancel')}, before)
        self.assertEqual((job.state, job.cancel_requested, len(job.event_ids)), ('training', False, events))

    def test_check_status_of_a_queued_job_starts_nothing_for_a_user(self):
        job = self.make_job()
        job.action_submit()
        with self.assertRaises(AccessError):
            job.sudo(self.user).action_check_status()
        self.assertEqual((job.state, self.calls(job, 'start')), ('validating', 0))

    def test_register_checkpoints_creates_no_model_for_a_user(self):
        job = self.running_job()
        job._set_provider_data(checkpoints=[{'model_ref': 'ckpt-1', 'step': 3}])
        models_before = self.env['llm.model'].search_count([])
        with self.assertRaises(AccessError):
            job.sudo(self.user).action_register_checkpoints()
        self.assertEqual(self.env['llm.model'].search_count([]), models_before)

    def test_fetch_models_and_validate_and_test_refused_for_a_user(self):
        with self.assertRaises(AccessError):
            self.provider.sudo(self.user).action_fetch_models()
        dataset = self.make_dataset()
        with self.assertRaises(AccessError):
            dataset.sudo(self.user).action_validate()
        self.assertEqual(dataset.state, 'draft')
        self.base_model.test_prompt = 'Hello'
        with self.assertRaises(AccessError):
            self.base_model.sudo(self.user).action_test_model()
        self.assertFalse(self.base_model.test_reply)

    def test_events_and_metrics_are_read_only_even_for_managers(self):
        job = self.running_job()
        event = job.event_ids[:1].sudo(self.manager)
        with self.assertRaises(AccessError):
            event.write({'message': 'forged'})
        with self.assertRaises(AccessError):
            self.env['llm.training.job.metric'].sudo(self.manager).create({'job_id': job.id, 'step': 99})

    def test_manager_has_full_access(self):
        job = self.make_job(env=self.env(user=self.manager.id))
        job.write({'name': 'renamed'})
        job.action_submit()
        self.assertEqual(job.state, 'validating')
        job.action_cancel()
        self.assertEqual(job.state, 'cancelled')
        job.unlink()

    def test_settings_admin_is_manager(self):
        self.assertTrue(self.env.ref('base.user_root').has_group('llm_training.group_llm_manager'))
        self.assertIn(self.env.ref('llm_training.group_llm_manager'), self.env.ref('base.group_system').implied_ids)


class TestCompanyIsolation(SecurityCase):

    def test_other_company_sees_no_events_metrics_or_files(self):
        job = self.make_job()
        job.action_submit()
        self.run_cron(3)
        self.assertTrue(job.event_ids and job.metric_ids)
        attachments = job.dataset_ids.attachment_ids
        for model, records in (('llm.training.job.event', job.event_ids), ('llm.training.job.metric', job.metric_ids),
                               ('llm.training.job', job), ('llm.training.dataset', job.dataset_ids)):
            self.assertFalse(self.env[model].sudo(self.user_b).search([('id', 'in', records.ids)]), model)
        self.assertFalse(self.env['ir.attachment'].sudo(self.user_b).search([('id', 'in', attachments.ids)]))
        with self.assertRaises(AccessError):
            attachments.sudo(self.user_b).read(['datas'])
        # the own company's internal user reads them (read-only)
        self.assertEqual(len(self.env['llm.training.job.event'].sudo(self.user).search([('job_id', '=', job.id)])),
                         len(job.event_ids))
        attachments.sudo(self.user).read(['datas'])

    def test_each_file_belongs_to_exactly_one_dataset(self):
        # Odoo 11's upload gives a record not yet saved res_id 0
        upload = self.env['ir.attachment'].create({'name': 'u.jsonl', 'datas_fname': 'u.jsonl',
                                                   'datas': base64.b64encode(jsonl(valid_examples())),
                                                   'res_model': 'llm.training.dataset', 'res_id': 0})
        first = self.env['llm.training.dataset'].create({'name': 'first', 'attachment_ids': [(6, 0, upload.ids)]})
        self.assertEqual((upload.res_model, upload.res_id), ('llm.training.dataset', first.id))
        second = self.env['llm.training.dataset'].create({'name': 'second', 'attachment_ids': [(6, 0, upload.ids)]})
        self.assertNotEqual(second.attachment_ids, upload, 'a file of another dataset is copied')
        self.assertEqual(second.attachment_ids.res_id, second.id)
        self.assertEqual(second.attachment_ids.datas, upload.datas)
        self.assertEqual((upload.res_model, upload.res_id), ('llm.training.dataset', first.id))

    def test_migration_moves_keys_and_owns_files(self):
        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'migrations', '11.0.1.1.0', 'post-migration.py')
        spec = importlib.util.spec_from_file_location('llm_training_migration_11_0_1_1_0', path)
        migration = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(migration)
        dataset = self.make_dataset()
        self.env.cr.execute('UPDATE ir_attachment SET res_model = NULL, res_id = 0 WHERE id IN %s',
                            (tuple(dataset.attachment_ids.ids),))
        self.env.cr.execute("ALTER TABLE llm_provider ADD COLUMN api_key varchar")
        self.env.cr.execute("UPDATE llm_provider SET api_key = 'sk-old-column-5555' WHERE id = %s", (self.provider.id,))
        self.env['llm.secret'].search([('res_id', '=', self.provider.id)]).unlink()
        migration.migrate(self.env.cr, '11.0.1.0.0')
        self.env.invalidate_all() if hasattr(self.env, 'invalidate_all') else self.env['llm.provider'].invalidate_cache()
        self.assertEqual(self.provider._get_secret('api_key'), 'sk-old-column-5555')
        self.env.cr.execute("SELECT 1 FROM information_schema.columns WHERE table_name = 'llm_provider' "
                            "AND column_name = 'api_key'")
        self.assertFalse(self.env.cr.fetchone(), 'the plain column is gone')
        self.assertEqual(dataset.attachment_ids.mapped('res_id'), [dataset.id])


class TestBoundedWork(SecurityCase):

    def test_huge_line_is_refused_with_its_line_named(self):
        huge = jsonl([chat('x' * (30 << 20))])
        dataset = self.make_dataset(jsonl(valid_examples()) + huge, name='huge.jsonl')
        report = dataset._validate(self.base_model)
        self.assertFalse(report.valid)
        self.assertIn('huge.jsonl:13: the line is %d bytes, over the limit of 1048576' % len(huge),
                      report.as_text())
        self.assertEqual(report.examples, 12, 'the other lines are still checked')

    def test_file_over_the_limit_is_refused(self):
        dataset = self.make_dataset(jsonl(valid_examples(20)), name='big.jsonl')
        with _config(llm_training_max_file_bytes=str(len(jsonl(valid_examples(5))))):
            report = dataset._validate(self.base_model)
        self.assertIn('big.jsonl:6: the file is over the limit', report.as_text())

    def test_context_check_stops_counting_early(self):
        counted = []

        def counter(messages, limit=None):
            counted.append(limit)
            return limit + 1 if limit else 10
        validator = DatasetValidator(count_tokens=counter, max_tokens=2048)
        validator.validate_file(io.BytesIO(jsonl(valid_examples(1))), 'c.jsonl')
        self.assertEqual(counted, [2048], 'the counter is given the context as its limit')
        self.assertIn("over the model's context of 2048 tokens", validator.finish().as_text())

    def test_one_validation_per_dataset_at_a_time(self):
        dataset = self.env.ref('llm_training.demo_dataset_northwind')  # committed: another cursor sees it
        job = self.make_job(dataset)
        with odoo.registry(get_db_name()).cursor() as other:
            other.execute('SELECT id FROM llm_training_dataset WHERE id = %s FOR NO KEY UPDATE', (dataset.id,))
            with self.assertRaises(DatasetBusyError):
                dataset._validate()
            # a job on it waits for the next pass: not failed, no attempt spent
            job.action_submit()
            self.run_cron()
            self.assertEqual((job.state, job.retry_count), ('validating', 0))
            other.rollback()
        self.run_cron()
        self.assertEqual(job.state, 'queued', 'validated once the other validation is over')


class _config(object):
    """Set odoo.conf options for the duration of a with block."""

    def __init__(self, **options):
        self.options = options

    def __enter__(self):
        self.saved = {k: odoo.tools.config.get(k) for k in self.options}
        odoo.tools.config.options.update(self.options)

    def __exit__(self, *exc):
        for key, value in self.saved.items():
            if value is None:
                odoo.tools.config.options.pop(key, None)
            else:
                odoo.tools.config.options[key] = value
