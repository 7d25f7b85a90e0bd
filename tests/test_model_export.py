"""Exports of a fine-tuned model: run by the cron in the trainer environment (a real export of a
real LoRA adapter on SmolLM2, checked by loading it back), a failed export, Delete, and the
download route's zip and access check over real HTTP."""
import hashlib
import io
import os
import shutil
import subprocess
import tempfile
import threading
import time
import unittest
import zipfile

import odoo
from odoo import api, tools
from odoo.tests.common import HttpCase, get_db_name

from .common import TrainingCase
from .test_concurrency import in_new_thread
from .test_xmlrpc import ensure_http_server

# A LoRA adapter with random weights on the base model (no training: the export's checks compare
# the export with this adapter's own answers, whatever they are).
MAKE_ADAPTER = '''
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(1)
base, out = sys.argv[1], sys.argv[2]
model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                       LoraConfig(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'], init_lora_weights=False))
model.save_pretrained(out)
AutoTokenizer.from_pretrained(base).save_pretrained(out)
'''


class _config(object):
    """tools.config values for the duration of a test."""

    def __init__(self, **values):
        self.values, self.saved = values, {}

    def __enter__(self):
        for key, value in self.values.items():
            self.saved[key] = tools.config.get(key)
            tools.config[key] = value

    def __exit__(self, *exc):
        for key, value in self.saved.items():
            tools.config[key] = value


def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


class TestModelExport(TrainingCase):

    @classmethod
    def setUpClass(cls):
        super(TestModelExport, cls).setUpClass()
        cls.tmp = tempfile.mkdtemp(prefix='llmt-export-test-')
        cls.local = cls.env['llm.provider'].create({'name': 'Local', 'service': 'local'})
        base_dir = cls.local._adapter().model_path('SmolLM2-135M-Instruct')
        cls.smol = cls.env['llm.model'].create({'name': 'SmolLM2', 'provider_id': cls.local.id,
                                                'model_ref': base_dir})
        cls.adapter_dir = os.path.join(cls.tmp, 'adapter')
        subprocess.run([tools.config['llm_training_trainer_python'], '-c', MAKE_ADAPTER, base_dir, cls.adapter_dir],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cls.tuned = cls.env['llm.model'].create({'name': 'Smol support', 'provider_id': cls.local.id,
                                                 'kind': 'fine_tuned', 'base_model_id': cls.smol.id,
                                                 'model_ref': cls.adapter_dir})

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)
        super(TestModelExport, cls).tearDownClass()

    def setUp(self):
        super(TestModelExport, self).setUp()
        self.exports_root = tempfile.mkdtemp(dir=self.tmp)
        patch = _config(llm_training_export_dir=self.exports_root)
        patch.__enter__()
        self.addCleanup(patch.__exit__)

    def follow(self, export, timeout=600):
        """Run the cron until the export's process has finished (a real export takes a while;
        nothing here depends on how long)."""
        deadline = time.time() + timeout
        while export.state in ('pending', 'running') and time.time() < deadline:
            self.env['llm.model.export']._cron_run_exports()
            export.invalidate_cache()
            if export.state == 'running':
                time.sleep(1)
        self.assertIn(export.state, ('done', 'failed'), export.log)
        return export

    def export(self, fmt):
        wizard = self.env['llm.model.export.wizard'].with_context(active_id=self.tuned.id).create({'format': fmt})
        action = wizard.action_export()
        export = self.env['llm.model.export'].browse(action['res_id'])
        self.assertEqual(export.model_id, self.tuned)
        return export

    def test_export_runs_is_verified_listed_and_delete_removes_its_files(self):
        export = self.export('hf_adapter')
        self.assertEqual(export.state, 'running', export.log)
        self.follow(export)
        self.assertEqual(export.state, 'done', export.log)
        self.assertIn('Verified the adapter folder', export.log)
        self.assertEqual(export.verification, '16/16 tokens equal')
        main = os.path.join(export.path, export.main_file)
        self.assertEqual(export.main_file, 'adapter_model.safetensors')
        self.assertEqual(export.sha256, sha256(main))
        total = sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(export.path)
                    for name in names if name != 'export.json')
        self.assertEqual(int(export.size), total)
        self.assertTrue(os.path.exists(os.path.join(export.path, 'README.md')))
        self.assertEqual(self.tuned.export_ids, export)
        folder = export.folder
        export.unlink()
        self.assertFalse(os.path.exists(folder))

    def test_a_target_that_cannot_be_written_fails_with_an_event_and_leaves_the_model_untouched(self):
        before = {name: sha256(os.path.join(self.adapter_dir, name)) for name in os.listdir(self.adapter_dir)}
        model_values = self.tuned.read(['model_ref', 'state', 'kind', 'active'])
        export = self.env['llm.model.export'].create({'model_id': self.tuned.id, 'format': 'hf_merged'})
        # A file where the export's out/ folder goes: the trainer cannot create it.
        folder = os.path.join(self.exports_root, self.env.cr.dbname, 'export-%d' % export.id)
        os.makedirs(folder)
        with open(os.path.join(folder, 'out'), 'w') as f:
            f.write('in the way')
        self.follow(export)
        self.assertEqual(export.state, 'failed')
        self.assertIn('cannot write the export folder', export.error)
        self.assertIn('ERROR Export failed: cannot write the export folder', export.log)
        self.assertEqual(self.tuned.read(['model_ref', 'state', 'kind', 'active']), model_values)
        self.assertEqual({name: sha256(os.path.join(self.adapter_dir, name)) for name in os.listdir(self.adapter_dir)},
                         before)

    def test_only_models_of_a_provider_that_exports_are_exported(self):
        other = self.env['llm.model'].create({'name': 'Remote tune', 'provider_id': self.provider.id,
                                              'kind': 'fine_tuned', 'model_ref': 'ft-remote-1'})
        export = self.env['llm.model.export'].create({'model_id': other.id, 'format': 'gguf_f16'})
        export.action_check()
        self.assertEqual(export.state, 'failed')
        self.assertIn('Only fine-tuned models of a provider that runs the trainer (local, Ray)', export.error)
        self.assertEqual(export.provider_data, '{}', 'nothing was started')


class TestExportDownload(HttpCase):

    @classmethod
    def setUpClass(cls):
        ensure_http_server()
        super(TestExportDownload, cls).setUpClass()

    def setUp(self):
        super(TestExportDownload, self).setUp()
        # Odoo 11: requests run on the registry's test cursor: create the records on it too.
        own_cr, own_env = self.cr, self.env
        self.cr = self.registry.test_cr
        self.env = api.Environment(self.cr, odoo.SUPERUSER_ID, {})
        self.addCleanup(setattr, self, 'cr', own_cr)
        self.addCleanup(setattr, self, 'env', own_env)
        self.folder = tempfile.mkdtemp(prefix='llmt-export-dl-')
        self.addCleanup(shutil.rmtree, self.folder, True)
        out = os.path.join(self.folder, 'out')
        os.makedirs(os.path.join(out, 'sub'))
        self.payload = os.urandom(3 * (1 << 20) + 17)  # several chunks
        with open(os.path.join(out, 'sub', 'model.gguf'), 'wb') as f:
            f.write(self.payload)
        with open(os.path.join(out, 'Modelfile'), 'w') as f:
            f.write('FROM ./sub/model.gguf\n')
        provider = self.env['llm.provider'].create({'name': 'Local', 'service': 'local'})
        model = self.env['llm.model'].create({'name': 'Smol support', 'provider_id': provider.id,
                                              'kind': 'fine_tuned', 'model_ref': '/nowhere'})
        self.export = self.env['llm.model.export'].create({'model_id': model.id, 'format': 'gguf_f16'})
        # What a finished export has (written as the workflow does, without running one).
        self.export.write({'state': 'done', 'folder': self.folder, 'path': out})
        self.url = 'http://127.0.0.1:%d/llm_training/export/%d/download' % (tools.config['http_port'], self.export.id)
        other_company = self.env['res.company'].create({'name': 'Other Co'})
        self.outsider = self.env['res.users'].create({
            'name': 'Outsider', 'login': 'llm_export_outsider', 'password': 'outsider',
            'company_id': other_company.id, 'company_ids': [(6, 0, other_company.ids)],
            'groups_id': [(6, 0, [self.env.ref('base.group_user').id])]})
        self.reader = self.env['res.users'].create({
            'name': 'Reader', 'login': 'llm_export_reader', 'password': 'reader',
            'groups_id': [(6, 0, [self.env.ref('base.group_user').id])]})

    def test_a_reader_downloads_the_folder_as_a_streamed_zip(self):
        self.authenticate('llm_export_reader', 'reader')
        answer = self.opener.get(self.url, timeout=60, stream=True)
        self.assertEqual(answer.status_code, 200, answer.text[:500])
        self.assertEqual(answer.headers['Content-Type'], 'application/zip')
        self.assertNotIn('Content-Length', answer.headers)  # streamed, not built in memory first
        self.assertIn('Smol-support-gguf_f16-%d.zip' % self.export.id, answer.headers['Content-Disposition'])
        archive = zipfile.ZipFile(io.BytesIO(answer.content))
        stem = 'Smol-support-gguf_f16-%d' % self.export.id
        self.assertEqual(sorted(archive.namelist()), [stem + '/Modelfile', stem + '/sub/model.gguf'])
        self.assertEqual(archive.read(stem + '/sub/model.gguf'), self.payload)
        self.assertIsNone(archive.testzip())

    def test_a_user_who_cannot_read_the_model_is_refused(self):
        self.authenticate('llm_export_outsider', 'outsider')
        answer = self.opener.get(self.url, timeout=60)
        self.assertEqual(answer.status_code, 404)
        self.assertNotIn(b'PK', answer.content[:2])

    def test_a_folder_this_host_cannot_read_is_said_so(self):
        # e.g. a Ray export on shared storage that this web server does not mount
        self.export.write({'path': os.path.join(self.folder, 'not-mounted', 'out')})
        self.authenticate('llm_export_reader', 'reader')
        answer = self.opener.get(self.url, timeout=60)
        self.assertEqual(answer.status_code, 409)
        self.assertIn('its folder cannot be read from this Odoo host', answer.text)

    def test_no_session_no_download(self):
        answer = self.opener.get(self.url, timeout=60, allow_redirects=False)
        self.assertIn(answer.status_code, (302, 303))  # to the login page


class TestDeleteExportsOfArchivedModel(TrainingCase):

    def test_the_model_card_facts_name_the_data_and_its_system_prompt(self):
        first, second = self.make_dataset(name='faq.jsonl'), self.make_dataset(name='tickets.jsonl')
        job = self.make_job(first)
        job.write({'dataset_ids': [(6, 0, (first | second).ids)]})
        tuned = self.env['llm.model'].create({'name': 'Support', 'provider_id': self.provider.id, 'kind': 'fine_tuned',
                                              'model_ref': 'ft-card', 'base_model_id': self.base_model.id})
        tuned.job_id = job
        export = self.env['llm.model.export'].create({'model_id': tuned.id, 'format': 'gguf_f16'})
        card = export._card()
        self.assertEqual(card['base_name'], 'Tiny')
        self.assertEqual(sorted(d['name'] for d in card['datasets']), ['faq.jsonl', 'tickets.jsonl'])
        self.assertNotIn('system_prompt', card)
        (first | second).write({'system_prompt': 'You are the support desk.'})
        self.assertEqual(export._card()['system_prompt'], 'You are the support desk.')
        second.system_prompt = 'Something else.'
        self.assertNotIn('system_prompt', export._card(), 'datasets that disagree give no SYSTEM line')

    def test_the_archived_models_exports_are_deleted_with_their_files(self):
        tuned = self.env['llm.model'].create({'name': 'Old tune', 'provider_id': self.provider.id,
                                              'kind': 'fine_tuned', 'model_ref': 'ft-old'})
        kept = self.env['llm.model'].create({'name': 'Kept tune', 'provider_id': self.provider.id,
                                             'kind': 'fine_tuned', 'model_ref': 'ft-kept'})
        root = tempfile.mkdtemp(prefix='llmt-export-del-')
        self.addCleanup(shutil.rmtree, root, True)
        exports = self.env['llm.model.export']
        for model, name in ((tuned, 'a'), (tuned, 'b'), (kept, 'c')):
            folder = os.path.join(root, name)
            os.makedirs(os.path.join(folder, 'out'))
            exports |= exports.create({'model_id': model.id, 'format': 'hf_merged'})
            exports[-1:].write({'folder': folder})
            exports[-1:].write({'state': 'failed'})
        tuned.action_archive_model()
        action = self.env.ref('llm_training.llm_model_delete_exports_action')
        action.with_context(active_model='llm.model', active_id=tuned.id, active_ids=tuned.ids).run()
        self.assertFalse(tuned.export_ids)
        self.assertEqual(sorted(os.listdir(root)), ['c'])
        self.assertEqual(len(kept.export_ids), 1)


class TestOneWorkerPerExport(unittest.TestCase):
    """Real committed rows and two transactions: a cron run skips an export another transaction
    holds (two workers stepping it would start two export processes)."""

    def setUp(self):
        self.registry = odoo.registry(get_db_name())
        self.ids = in_new_thread(self.registry, self._create)

    def _create(self, env):
        provider = env['llm.provider'].create({'name': 'Export race', 'service': 'test'})
        model = env['llm.model'].create({'name': 'Tune', 'provider_id': provider.id, 'kind': 'fine_tuned',
                                         'model_ref': 'ft-race'})
        export = env['llm.model.export'].create({'model_id': model.id, 'format': 'hf_merged'})
        return provider.id, model.id, export.id

    def tearDown(self):
        def cleanup(env):
            env['llm.model.export'].browse(self.ids[2]).exists().unlink()
            env['llm.model'].browse(self.ids[1]).unlink()
            env['llm.provider'].browse(self.ids[0]).unlink()
        in_new_thread(self.registry, cleanup)

    def run_cron(self, env):
        env.cr.execute("SET lock_timeout = '5s'")  # a cron that waited for the lock would fail here
        env['llm.model.export']._cron_run_exports()
        return env['llm.model.export'].browse(self.ids[2]).state

    def test_a_held_export_is_skipped_then_stepped_once_free(self):
        locked, release = threading.Event(), threading.Event()

        def hold(env):
            env.cr.execute('SELECT id FROM llm_model_export WHERE id = %s FOR UPDATE', (self.ids[2],))
            locked.set()
            release.wait(120)

        holder = threading.Thread(target=in_new_thread, args=(self.registry, hold))
        holder.start()
        try:
            self.assertTrue(locked.wait(60))
            self.assertEqual(in_new_thread(self.registry, self.run_cron), 'pending')
        finally:
            release.set()
            holder.join(120)
        # Free again: the cron steps it (a scripted provider's model cannot be exported: failed).
        self.assertEqual(in_new_thread(self.registry, self.run_cron), 'failed')
