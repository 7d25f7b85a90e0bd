"""The contract for other addons, over real XML-RPC on the test server's HTTP port."""
import base64
import socket
import time
import xmlrpc.client

import odoo
from odoo.tests.common import HttpCase

from .common import jsonl, valid_examples
from .openai_fake_server import FakeOpenAI
from .openapi_contract import load_contract


def ensure_http_server():
    """pytest-odoo starts Odoo without its HTTP thread; start it once (HttpCase talks to it)."""
    port = odoo.tools.config['http_port']
    for attempt in range(100):
        with socket.socket() as probe:
            if probe.connect_ex(('127.0.0.1', port)) == 0:
                return
        if attempt == 0:
            odoo.service.server.server.http_spawn()
        time.sleep(0.1)
    raise RuntimeError('the Odoo HTTP server did not start on port %s' % port)


class TestXmlRpc(HttpCase):

    @classmethod
    def setUpClass(cls):
        ensure_http_server()
        super(TestXmlRpc, cls).setUpClass()

    def setUp(self):
        super(TestXmlRpc, self).setUp()
        # odoo.tests.common reads the port before pytest-odoo loads our config: use the real one.
        url = 'http://127.0.0.1:%d/xmlrpc/2/' % odoo.tools.config['http_port']
        self.xmlrpc_common = xmlrpc.client.ServerProxy(url + 'common')
        self.xmlrpc_object = xmlrpc.client.ServerProxy(url + 'object')

    def call(self, model, method, *args, **kw):
        return self.xmlrpc_object.execute_kw(self.env.cr.dbname, self.uid, 'admin', model, method, list(args), kw)

    def test_dataset_and_job_flow(self):
        uid = self.xmlrpc_common.authenticate(self.env.cr.dbname, 'admin', 'admin', {})
        self.assertTrue(uid)
        self.uid = uid
        provider_id = self.call('llm.provider', 'create', {'name': 'RPC provider', 'service': 'test'})
        model_id = self.call('llm.model', 'create', {'name': 'RPC base', 'provider_id': provider_id,
                                                     'model_ref': 'rpc-base'})
        good = base64.b64encode(jsonl(valid_examples(12))).decode()
        attachment_id = self.call('ir.attachment', 'create', {'name': 'rpc.jsonl', 'datas_fname': 'rpc.jsonl',
                                                              'datas': good})
        dataset_id = self.call('llm.training.dataset', 'create', {'name': 'RPC data',
                                                                  'attachment_ids': [(6, 0, [attachment_id])]})
        self.assertIs(self.call('llm.training.dataset', 'action_validate', [dataset_id]), True)
        dataset = self.call('llm.training.dataset', 'read', [dataset_id], ['state', 'example_count', 'validation_report'])[0]
        self.assertEqual((dataset['state'], dataset['example_count']), ('valid', 12))

        bad = base64.b64encode(jsonl(valid_examples(10)) + b'{"messages": 1}\n').decode()
        bad_attachment = self.call('ir.attachment', 'create', {'name': 'bad.jsonl', 'datas_fname': 'bad.jsonl', 'datas': bad})
        bad_id = self.call('llm.training.dataset', 'create', {'name': 'Bad', 'attachment_ids': [(6, 0, [bad_attachment])]})
        self.call('llm.training.dataset', 'action_validate', [bad_id])
        report = self.call('llm.training.dataset', 'read', [bad_id], ['state', 'validation_report'])[0]
        self.assertEqual(report['state'], 'invalid')
        self.assertIn('bad.jsonl:11: messages: is a number', report['validation_report'])

        job_id = self.call('llm.training.job', 'create', {
            'name': 'RPC job', 'provider_id': provider_id, 'base_model_id': model_id,
            'dataset_ids': [(6, 0, [dataset_id])], 'hyperparameters': '{"warmup_ratio": 0.1}'})
        self.assertIs(self.call('llm.training.job', 'action_submit', [job_id]), True)
        cron_id = self.call('ir.model.data', 'xmlid_to_res_id', 'llm_training.ir_cron_sync_training_jobs')
        for _ in range(3):
            self.call('ir.cron', 'method_direct_trigger', [cron_id])
        self.assertIs(self.call('llm.training.job', 'action_check_status', [job_id]), True)
        job = self.call('llm.training.job', 'read', [job_id], ['state', 'progress', 'error_message', 'result_model_id'])[0]
        self.assertEqual((job['state'], job['progress'], job['error_message']), ('completed', 100.0, False))
        result = self.call('llm.model', 'read', [job['result_model_id'][0]], ['kind', 'model_ref'])[0]
        self.assertEqual(result['kind'], 'fine_tuned')

        second = self.call('llm.training.job', 'copy', [job_id])
        self.call('llm.training.job', 'action_submit', [second])
        self.assertIs(self.call('llm.training.job', 'action_cancel', [second]), True)
        self.assertEqual(self.call('llm.training.job', 'read', [second], ['state'])[0]['state'], 'cancelled')

    def test_openai_job_from_xmlrpc_alone(self):
        """Another addon fine-tunes on OpenAI (here the local OpenAI-compatible server) over XML-RPC."""
        server = FakeOpenAI('sk-rpc-test-key', load_contract()).start()
        self.addCleanup(server.stop)
        self.uid = self.xmlrpc_common.authenticate(self.env.cr.dbname, 'admin', 'admin', {})
        provider_id = self.call('llm.provider', 'create', {'name': 'OpenAI', 'service': 'openai',
                                                           'api_key': 'sk-rpc-test-key', 'base_url': server.base_url})
        model_id = self.call('llm.model', 'create', {'name': 'GPT-4o mini', 'provider_id': provider_id,
                                                     'model_ref': 'gpt-4o-mini-2024-07-18', 'training_price': 3.0})
        data = base64.b64encode(jsonl(valid_examples(12))).decode()
        attachment_id = self.call('ir.attachment', 'create', {'name': 'rpc.jsonl', 'datas_fname': 'rpc.jsonl', 'datas': data})
        dataset_id = self.call('llm.training.dataset', 'create', {'name': 'RPC data',
                                                                  'attachment_ids': [(6, 0, [attachment_id])]})
        job_id = self.call('llm.training.job', 'create', {
            'name': 'RPC OpenAI job', 'provider_id': provider_id, 'base_model_id': model_id,
            'dataset_ids': [(6, 0, [dataset_id])], 'epochs': 0, 'suffix': 'rpc'})
        self.call('llm.training.job', 'action_submit', [job_id])
        cron_id = self.call('ir.model.data', 'xmlid_to_res_id', 'llm_training.ir_cron_sync_training_jobs')
        for _ in range(6):
            self.call('ir.cron', 'method_direct_trigger', [cron_id])
        job = self.call('llm.training.job', 'read', [job_id], ['state', 'error_message', 'result_model_id',
                                                              'trained_tokens', 'final_cost', 'estimated_epochs'])[0]
        self.assertEqual((job['state'], job['error_message']), ('completed', False))
        self.assertEqual(job['estimated_epochs'], 8, 'auto: 100 examples seen at least (100 // 12)')
        self.assertGreater(job['final_cost'], 0)
        result = self.call('llm.model', 'read', [job['result_model_id'][0]], ['kind', 'model_ref', 'base_model_id'])[0]
        self.assertEqual((result['kind'], result['base_model_id'][0]), ('fine_tuned', model_id))
        self.assertTrue(result['model_ref'].startswith('ft:gpt-4o-mini-2024-07-18:llmt-test:rpc:'))
        self.assertEqual(server.violations, [])


class TestXmlRpcAccess(HttpCase):
    """What an internal user (read-only) can reach over XML-RPC: no engine, no service."""

    @classmethod
    def setUpClass(cls):
        ensure_http_server()
        super(TestXmlRpcAccess, cls).setUpClass()

    def test_internal_user_reaches_no_service(self):
        url = 'http://127.0.0.1:%d/xmlrpc/2/object' % odoo.tools.config['http_port']
        rpc = xmlrpc.client.ServerProxy(url)
        reader = self.env['res.users'].with_context(no_reset_password=True).create({
            'name': 'RPC reader', 'login': 'llm_rpc_reader', 'password': 'llm_rpc_reader',
            'groups_id': [(6, 0, [self.env.ref('base.group_user').id])]})
        provider = self.env['llm.provider'].create({'name': 'RPC scripted', 'service': 'test', 'test_behavior': 'hold'})
        model = self.env['llm.model'].create({'name': 'M', 'provider_id': provider.id, 'model_ref': 'rpc-access'})
        attachment = self.env['ir.attachment'].create({'name': 'a.jsonl', 'datas_fname': 'a.jsonl',
                                                       'datas': base64.b64encode(jsonl(valid_examples()))})
        dataset = self.env['llm.training.dataset'].create({'name': 'a', 'attachment_ids': [(6, 0, attachment.ids)]})
        job = self.env['llm.training.job'].create({'name': 'rpc access', 'provider_id': provider.id,
                                                   'base_model_id': model.id, 'dataset_ids': [(6, 0, dataset.ids)]})
        job.action_submit()
        for _pass in range(2):
            self.env['llm.training.job']._cron_sync_training_jobs()
        job.invalidate_cache()
        self.assertEqual(job.state, 'training')
        probes = (('llm.training.engine', '_cron', []), ('llm.training.job', '_cron_sync_training_jobs', []),
                  ('llm.provider', 'action_test_connection', [[provider.id]]),
                  ('llm.training.job', 'action_cancel', [[job.id]]),
                  ('llm.training.job', 'action_check_status', [[job.id]]))
        for model_name, method, args in probes:
            with self.assertRaises(xmlrpc.client.Fault, msg=method):
                rpc.execute_kw(self.env.cr.dbname, reader.id, 'llm_rpc_reader', model_name, method, args)
        job.invalidate_cache()
        self.assertEqual((job.state, job.cancel_requested), ('training', False))
        self.assertFalse(self.env['llm.test.provider.call'].search_count([('job_id', '=', job.id), ('method', '=', 'cancel')]))
