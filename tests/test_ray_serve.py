"""Serving a Ray provider's models on its cluster: the model server as a Ray Serve deployment
(trainer/serve_ray.py), deployed, updated and deleted from Odoo through the Serve REST API of a
real single-node Ray head (tests/ray_head.py), answering Odoo's /v1, Generate reply and Compare
Models with SmolLM2, only with its token. One head and one deployment for the whole class: Serve's
start is the cost (see README, Serving on a cluster)."""
import json
import os
import shutil
import struct
import tempfile
import time
import unittest
from unittest import mock

import requests

import odoo
from odoo import api, tools
from odoo.exceptions import UserError
from odoo.tests.common import HttpCase

from odoo.addons.llm_training.lib.serving import ray_serve

from .ray_head import RayHead, free_port
from .test_xmlrpc import ensure_http_server

SMOL = 'SmolLM2-135M-Instruct'
QUESTION = [{'role': 'user', 'content': 'What is the capital of France? Answer in one word.'}]


def write_lora_adapter(folder, base):
    """A real PEFT LoRA adapter folder for SmolLM2 (rank 1 on the first layer's q_proj, B zero, so
    it answers as its base does), written without torch: adapter_config.json and a safetensors
    file (an 8-byte header length, the JSON header, the raw float32 data)."""
    os.makedirs(folder)
    with open(os.path.join(folder, 'adapter_config.json'), 'w') as f:
        json.dump({'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': base, 'r': 1,
                   'lora_alpha': 2, 'lora_dropout': 0.0, 'target_modules': ['q_proj'], 'layers_to_transform': [0],
                   'bias': 'none', 'inference_mode': True}, f)
    prefix = 'base_model.model.model.layers.0.self_attn.q_proj.'
    tensors = [(prefix + 'lora_A.weight', [1, 576], [0.01] * 576), (prefix + 'lora_B.weight', [576, 1], [0.0] * 576)]
    header, data = {'__metadata__': {'format': 'pt'}}, b''
    for name, shape, values in tensors:
        blob = struct.pack('<%df' % len(values), *values)
        header[name] = {'dtype': 'F32', 'shape': shape, 'data_offsets': [len(data), len(data) + len(blob)]}
        data += blob
    text = json.dumps(header).encode()
    text += b' ' * (-len(text) % 8)
    with open(os.path.join(folder, 'adapter_model.safetensors'), 'wb') as f:
        f.write(struct.pack('<Q', len(text)) + text + data)


class TestServeConfig(unittest.TestCase):
    """The PUT body keeps the cluster's other applications: the REST API removes what it omits."""

    def test_other_applications_are_kept_and_ours_replaced_or_removed(self):
        other = {'name': 'theirs', 'import_path': 'x:app'}
        ours = ray_serve.application('llmt-db-p1', '/code', ['/m/b'], 'f' * 64)
        details = {'controller_info': {'actor_id': 'a'}, 'http_options': {'host': '0.0.0.0', 'port': 8123},
                   'proxy_location': 'EveryNode',
                   'applications': {'theirs': {'deployed_app_config': other},
                                    'llmt-db-p1': {'deployed_app_config': {'name': 'llmt-db-p1', 'old': 1}}}}
        body = ray_serve.deploy_body(details, 'http://127.0.0.1:8000', app=ours)
        self.assertEqual(body['applications'], [other, ours])
        self.assertEqual(body['http_options'], {'host': '0.0.0.0', 'port': 8123}, 'a running Serve keeps its own')
        self.assertEqual(ray_serve.deploy_body(details, None, remove='llmt-db-p1')['applications'], [other])
        details['applications']['script'] = {'deployed_app_config': None}
        with self.assertRaisesRegex(ray_serve.ServeConfigError, 'Serve application "script" .* not deployed from a'):
            ray_serve.deploy_body(details, None, app=ours)
        fresh = ray_serve.deploy_body({'controller_info': {}, 'applications': {}}, 'http://10.0.0.5:8300', app=ours)
        self.assertEqual(fresh['http_options'], {'host': '0.0.0.0', 'port': 8300})
        self.assertEqual(ray_serve.replicas_settings(2, 1, 4)['autoscaling_config']['initial_replicas'], 2)
        # the engine as for this host's server (odoo.conf), with the converters as the workers see them
        user_config = ray_serve.application('llmt-db-p1', '/code', ['/m/b'], 'f' * 64, engine='llamacpp',
                                             convert_dir='/storage/code/convert')['deployments'][0]['user_config']
        self.assertEqual((user_config['engine'], user_config['convert_dir']), ('llamacpp', '/storage/code/convert'))
        self.assertEqual(ours['deployments'][0]['user_config']['engine'], 'auto')
        with self.assertRaisesRegex(ray_serve.ServeConfigError, 'serving engine must be one of auto, transformers'):
            ray_serve.application('llmt-db-p1', '/code', ['/m/b'], 'f' * 64, engine='vllm')
        self.assertEqual(ray_serve.replicas_settings(3), {'num_replicas': 3})
        with self.assertRaisesRegex(ray_serve.ServeConfigError, 'minimum <= maximum'):
            ray_serve.replicas_settings(1, 3, 2)


class TestRayServe(HttpCase):

    @classmethod
    def setUpClass(cls):
        ensure_http_server()
        super(TestRayServe, cls).setUpClass()
        cls.head = RayHead(tools.config['llm_training_trainer_python'])
        cls.head.start()
        cls.storage = tempfile.mkdtemp(prefix='llmt-serve-storage-')
        cls.serve_url = 'http://127.0.0.1:%d' % free_port()

    @classmethod
    def tearDownClass(cls):
        cls.head.kill()  # at once: Serve's actors die with it (stop() gives each 10 s of grace)
        shutil.rmtree(cls.head.tmp, ignore_errors=True)
        shutil.rmtree(cls.storage, ignore_errors=True)
        super(TestRayServe, cls).tearDownClass()

    def setUp(self):
        super(TestRayServe, self).setUp()
        # Odoo 11: HTTP requests run on the registry's test cursor: work on it too (as ApiCase does)
        own_cr, own_env = self.cr, self.env
        self.cr = self.registry.test_cr
        self.env = api.Environment(self.cr, odoo.SUPERUSER_ID, {})
        self.addCleanup(setattr, self, 'cr', own_cr)
        self.addCleanup(setattr, self, 'env', own_env)
        self.env['ir.config_parameter'].set_param('llm_training.api_requests_per_minute', '0')

    def wait_serving(self, provider, state, timeout=180):
        """Refresh Serving until Serve reports `state` (its changes are asynchronous)."""
        deadline = time.time() + timeout
        while True:
            provider.action_serve_refresh()
            if provider.serve_state == state or time.time() > deadline:
                break
            time.sleep(0.5)
        self.assertEqual(provider.serve_state, state, provider.serve_status)

    def v1(self, key, model, stream=False):
        answer = requests.post('http://127.0.0.1:%d/v1/chat/completions' % tools.config['http_port'],
                               json={'model': model, 'messages': QUESTION, 'max_tokens': 4, 'temperature': 0,
                                     'stream': stream},
                               headers={'Authorization': 'Bearer %s' % key}, timeout=300, stream=stream)
        self.assertEqual(answer.status_code, 200, answer.text)
        if not stream:
            return answer.json()['choices'][0]['message']['content']
        chunks = [json.loads(line[6:]) for line in answer.iter_lines(decode_unicode=True)
                  if line.startswith('data: ') and line != 'data: [DONE]']
        return ''.join(c['choices'][0]['delta'].get('content') or '' for c in chunks if c.get('choices'))

    def test_deployment_answers_odoo_serves_new_adapters_after_an_update_only_with_its_token_and_is_deleted(self):
        # deployed with the production default, whatever engine the suite's own host server uses:
        # `auto`, which on this CPU head is llama.cpp (the base and each adapter converted to GGUF by
        # the replica with the converters Deploy copies to the storage)
        engine = mock.patch.dict(tools.config.options, {'llm_training_serve_engine': 'auto'})
        engine.start()
        self.addCleanup(engine.stop)
        ray = self.env['llm.provider'].create({
            'name': 'Ray serving', 'service': 'ray', 'ray_dashboard_url': self.head.url,
            'storage_path': self.storage, 'request_timeout': 30, 'serve_on': 'ray', 'serve_url': self.serve_url,
            'serve_replicas': 1, 'serve_cpus': 1})
        base_path = os.path.join(tools.config['llm_training_models_dir'], SMOL)
        smol = self.env['llm.model'].create({'name': 'smol-on-serve', 'provider_id': ray.id, 'model_ref': base_path})
        with self.assertRaisesRegex(UserError, 'no serving token yet: press Deploy Serving'):
            ray._call_adapter('chat', smol.model_ref, QUESTION, {'max_tokens': 2})
        # the one choice of endpoint (lib/serving/model_server.chat_endpoint): this host's model server
        # (reading Odoo's view of the storage) until the provider says the cluster
        ray.serve_on = 'host'
        self.assertEqual(ray._adapter().chat_endpoint().where, 'host')
        ray.serve_on = 'ray'

        ray.action_serve_deploy()
        self.assertTrue(ray.serve_token_hint, 'a token was made and kept as a secret')
        self.wait_serving(ray, 'RUNNING')
        self.assertRegex(ray.serve_status, r'^RUNNING: 1 replica\(s\) running, 1 model folder\(s\) served')
        token = ray._get_secret('serve_token')
        deployed = requests.get(self.head.url + '/api/serve/applications/', timeout=30).text
        self.assertNotIn(token, deployed, 'the dashboard shows the config: it holds only the token\'s hash')
        self.assertIn(ray_serve.token_sha256(token), deployed)

        # Odoo's /v1, whole and streamed (greedy: the same text), answered by the replica
        key = self.env['llm.api.key']._generate('serve', self.env.ref('base.user_root'))[1]
        whole = self.v1(key, smol.name)
        self.assertTrue(whole.strip())
        self.assertEqual(self.v1(key, smol.name, stream=True), whole)
        endpoint = ray._adapter().chat_endpoint()
        self.assertEqual(endpoint.where, 'cluster')
        health = endpoint.health()
        self.assertEqual(health['engine']['setting'], 'auto')
        self.assertEqual([m['base'] for m in health['engine']['llamacpp']['models']], [os.path.realpath(base_path)],
                         'llama.cpp answered on the replica')
        local_state = os.path.join(ray._adapter_config()['model_server_dir'], 'server.json')
        self.assertFalse(os.path.exists(local_state), 'nothing was answered by this host\'s model server')

        # a new fine-tune (an adapter on the shared storage) is refused until Deploy Serving adds it
        adapter = os.path.join(self.storage, 'job-1', 'result')
        write_lora_adapter(adapter, base_path)
        tuned = self.env['llm.model'].create({'name': 'smol-tuned-on-serve', 'provider_id': ray.id, 'kind': 'fine_tuned',
                                              'base_model_id': smol.id, 'model_ref': adapter,
                                              'test_prompt': QUESTION[0]['content']})
        with self.assertRaisesRegex(UserError, 'is not served by this deployment; deploy serving again'):
            ray._call_adapter('chat', tuned.model_ref, QUESTION, {'max_tokens': 2})
        ray.action_serve_deploy()
        ray.action_serve_deploy()  # twice: the same config, nothing more happens
        self.wait_serving(ray, 'RUNNING')
        self.assertIn('2 model folder(s) served', ray.serve_status)
        tuned.action_test_model()  # Generate reply: the fine-tune and its base, both on the cluster
        self.assertTrue(tuned.test_reply and tuned.test_base_reply)
        wizard = self.env['llm.model.compare.wizard'].create({'model_ids': [(6, 0, smol.ids)],
                                                               'prompt': QUESTION[0]['content']})
        wizard.action_compare()
        self.assertIn('=== smol-on-serve ===\n%s' % tuned.test_base_reply, wizard.result)
        after = endpoint.health()
        self.assertEqual(after['pid'], health['pid'], 'a new model list is a light update: the replica stayed')
        # llama.cpp serves each adapter on a server of its own beside its base's
        self.assertEqual(sorted(tuple(m['adapters']) for m in after['engine']['llamacpp']['models']),
                         [(), (os.path.realpath(adapter),)])
        self.assertFalse(os.path.exists(local_state))

        # only with the token: a wrong one or none is refused on every path
        for headers in ({'Authorization': 'Bearer wrong-token'}, {}):
            self.assertEqual(requests.get(endpoint.url + '/health', headers=headers, timeout=30).status_code, 401)
            refused = requests.post(endpoint.url + '/chat', headers=headers, timeout=30,
                                    json={'model': base_path, 'messages': QUESTION, 'max_tokens': 2})
            self.assertEqual(refused.status_code, 401)
        ray.serve_token = 'not-the-deployed-token'
        with self.assertRaisesRegex(UserError, 'needs its token'):
            ray._call_adapter('chat', smol.model_ref, QUESTION, {'max_tokens': 2})

        # Delete Serving: no Serve application left on the cluster; again: nothing to do
        ray.action_serve_delete()
        self.wait_serving(ray, 'NOT_DEPLOYED')
        ray.action_serve_delete()
        self.assertEqual(ray.serve_state, 'NOT_DEPLOYED')
        details = requests.get(self.head.url + '/api/serve/applications/', timeout=30).json()
        self.assertEqual(details['applications'], {})
        with self.assertRaisesRegex(UserError, 'no Ray Serve application answers at|could not be reached'):
            ray.serve_token = 'whatever'
            ray._call_adapter('chat', smol.model_ref, QUESTION, {'max_tokens': 2})
