"""The web client in a real Chromium, driven by playwright (tests/browser/drive_odoo.py, in the
client venv): the LLM app's landing, the job wizard walked to Submit, a completed job's loss curve drawn, the import
wizard's preview. Screenshots go to .run/test/screenshots/."""
import base64
import json
import os
import subprocess
from contextlib import contextmanager
from datetime import datetime, timedelta

import odoo
from odoo import api, fields
from odoo.tests.common import HttpCase

from .common import jsonl, valid_examples
from .test_xmlrpc import ensure_http_server

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(HERE, 'browser', 'drive_odoo.py')
BROWSER_TIMEOUT = 240


def client_python():
    venv = os.environ.get('LLMT_CLIENT_VENV')
    if not venv:
        raise RuntimeError('LLMT_CLIENT_VENV is not set: run the tests with `make test`')
    return os.path.join(venv, 'bin', 'python')


def screenshots_dir():
    return os.path.join(os.environ.get('LLMT_RUN') or os.getcwd(), 'test', 'screenshots')


def warm_backend_assets(dbname):
    """Compile the backend's JS and CSS bundles once and keep them (committed, as a first page
    load would): each test's browser then loads them instead of compiling them again inside its
    rolled-back transaction."""
    from odoo.addons.base.ir.ir_qweb.assetsbundle import AssetsBundle
    with odoo.registry(dbname).cursor() as cr:
        env = api.Environment(cr, odoo.SUPERUSER_ID, {})
        files, remains = env['ir.qweb']._get_asset_content('web.assets_backend', {})
        bundle = AssetsBundle('web.assets_backend', files, remains, env=env)
        bundle.js()
        bundle.css()


class TestBrowser(HttpCase):

    @classmethod
    def setUpClass(cls):
        ensure_http_server()
        super(TestBrowser, cls).setUpClass()
        warm_backend_assets(odoo.tests.common.get_db_name())

    @contextmanager
    def data_env(self):
        """An environment on the cursor the HTTP server uses in test mode: what it writes, the
        browser sees, and all of it is rolled back with the test. The block holds the cursor's
        lock: the browser runs between blocks."""
        with self.registry.cursor() as cr:
            env = api.Environment(cr, odoo.SUPERUSER_ID, {})
            env.clear()
            yield env

    def browse(self, scenario, **args):
        command = [client_python(), DRIVER, '--url', 'http://127.0.0.1:%d' % odoo.tools.config['http_port'],
                   '--db', odoo.tests.common.get_db_name(), '--screenshots', screenshots_dir(),
                   scenario, json.dumps(args)]
        run = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=BROWSER_TIMEOUT)
        lines = run.stdout.decode().strip().splitlines()
        result = json.loads(lines[-1]) if lines else {'error': run.stderr.decode()[-3000:]}
        if run.returncode or 'error' in result:
            self.fail('%s in the browser: %s\n%s\nconsole: %s\n%s' % (
                scenario, result.get('error'), result.get('trace', ''), result.get('console'), run.stderr.decode()[-2000:]))
        return result

    def scripted_setup(self, env):
        provider = env['llm.provider'].create({'name': 'Browser provider', 'service': 'test', 'max_concurrent_jobs': 0})
        model = env['llm.model'].create({'name': 'Browser base', 'provider_id': provider.id,
                                         'model_ref': 'browser-base', 'context_length': 2048})
        attachment = env['ir.attachment'].create({'name': 'browser.jsonl', 'datas_fname': 'browser.jsonl',
                                                  'datas': base64.b64encode(jsonl(valid_examples(12)))})
        dataset = env['llm.training.dataset'].create({'name': 'Browser support data',
                                                      'attachment_ids': [(6, 0, attachment.ids)]})
        dataset.action_validate()
        return provider, model, dataset

    def test_llm_app_opens_on_the_jobs_list_in_chromium(self):
        seen = self.browse('landing', app='LLM')
        self.assertEqual((seen['list'], seen['modals']), (1, 0), 'the app lands on a list, no wizard dialog')
        action = self.env.ref('llm_training.llm_training_job_action')
        self.assertEqual(seen['breadcrumb'].strip(), action.name)
        self.assertIn('action=%d' % action.id, seen['hash'])

    def test_job_wizard_walked_to_submit_in_chromium(self):
        with self.data_env() as env:
            provider, model, dataset = self.scripted_setup(env)
            names = dict(dataset=dataset.name, provider=provider.name, base_model=model.name)
            ids = (provider.id, model.id, dataset.ids)
        seen = self.browse('job_wizard', name='Browser wizard job', **names)
        self.assertIn('Examples: ', seen['estimate'])
        self.assertIn('Trained tokens: ', seen['estimate'])
        self.assertIn('Browser wizard job', seen['breadcrumb'])
        with self.data_env() as env:
            job = env['llm.training.job'].search([('name', '=', 'Browser wizard job')])
            self.assertEqual(len(job), 1)
            self.assertEqual((job.provider_id.id, job.base_model_id.id, job.dataset_ids.ids), ids)
            self.assertNotEqual(job.state, 'draft', 'Submit in the wizard submits the job')
            self.assertEqual(seen['state'].strip(), dict(job._fields['state'].selection)[job.state])

    def test_completed_job_draws_its_loss_curve_in_chromium(self):
        with self.data_env() as env:
            job_id, train_steps, valid_steps = self.completed_job(env)
        seen = self.browse('loss_curve', job_id=job_id)
        self.assertEqual(seen['legend'], ['Training loss', 'Validation loss'])
        self.assertEqual(seen['axis_labels'], ['Step', 'Loss'])
        # d3's linear line is "Mx,yLx,y...": one point per logged step of each series.
        points = [line['path'].count('L') + 1 for line in seen['lines']]
        self.assertEqual(points, [len(train_steps), len(valid_steps)])

    def completed_job(self, env):
        provider, model, dataset = self.scripted_setup(env)
        job = env['llm.training.job'].create({'name': 'Browser curve job', 'provider_id': provider.id,
                                              'base_model_id': model.id, 'dataset_ids': [(6, 0, dataset.ids)]})
        job.action_submit()
        for _ in range(6):
            env['llm.training.job']._cron_sync_training_jobs()
        job.invalidate_cache()
        self.assertEqual(job.state, 'completed')
        # The trainer's own rhythm: a train loss every step, a validation loss every 4 steps.
        env['llm.training.job.metric']._record(job, [
            dict({'step': step, 'train_loss': 3.0 - 0.1 * step}, **({'valid_loss': 3.2 - 0.1 * step} if step % 4 == 0 else {}))
            for step in range(1, 21)])
        return (job.id, job.metric_ids.filtered('has_train_loss').mapped('step'),
                job.metric_ids.filtered('has_valid_loss').mapped('step'))

    def test_import_wizard_previews_a_channel_in_chromium(self):
        with self.data_env() as env:
            names = self.support_channel(env)
        seen = self.browse('import_wizard', **names)
        preview = seen['preview']
        self.assertIn('Examples: 2', preview)
        self.assertIn('Skipped conversations: 1', preview)
        self.assertIn('password', preview)
        self.assertNotIn('<b>', preview)
        self.assertNotIn('jane.doe@example.org', preview)

    def support_channel(self, env):
        """A channel with two answered questions and one left unanswered."""
        Users = env['res.users'].with_context(no_reset_password=True)
        agent = Users.create({'name': 'Browser Agent', 'login': 'llmt_browser_agent',
                              'groups_id': [(6, 0, env.ref('base.group_user').ids)]})
        customer = Users.create({'name': 'Browser Customer', 'login': 'llmt_browser_customer',
                                 'groups_id': [(6, 0, env.ref('base.group_user').ids)]})
        admin = env.ref('base.user_root')
        channel = env['mail.channel'].create({
            'name': 'Browser support channel', 'public': 'private',
            'channel_partner_ids': [(6, 0, (admin | agent | customer).mapped('partner_id').ids)]})
        start = datetime.now() - timedelta(days=2)
        talk = [(0, customer, 'How do I reset my <b>password</b>?'), (1, agent, 'Use the link on the login page.'),
                (300, customer, 'Mail me at jane.doe@example.org please'), (301, agent, 'Done, check your inbox.'),
                (600, customer, 'Anyone there?')]  # no reply: skipped
        for minutes, author, body in talk:
            env['mail.message'].create({
                'model': 'mail.channel', 'res_id': channel.id, 'body': body, 'message_type': 'comment',
                'subtype_id': env.ref('mail.mt_comment').id, 'author_id': author.partner_id.id,
                'date': fields.Datetime.to_string(start + timedelta(minutes=minutes))})
        return {'channel': channel.name, 'assistant': agent.name}
