"""The local provider answers through one persistent model server (trainer/serve.py) per data
folder: the Test button, Compare Models and chat / chat_stream, with the real SmolLM2 model."""
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import unittest
from unittest import mock

import psutil
import requests

from odoo import tools
from odoo.exceptions import UserError
from odoo.addons.llm_training.models.llm_provider import _as_user_error
from odoo.addons.llm_training.user_errors import InvalidServiceRequest, ServiceBusy
from odoo.addons.llm_training.lib.exceptions import TrainingRetryableError
from odoo.addons.llm_training.lib.providers.local import generation_failed

from odoo.addons.llm_training.lib.serving import model_server as model_server_lib
from odoo.addons.llm_training.lib.serving.model_server import (STATE_FILE, TOKEN_FILE, ModelServer,
                                                               read_state, serve_settings)

from .common import TrainingCase


def server_processes(run_dir):
    """The live trainer.serve processes whose state file is in `run_dir`."""
    state_file = os.path.join(run_dir, STATE_FILE)
    found = []
    for process in psutil.process_iter(['cmdline']):
        cmdline = process.info['cmdline'] or []
        if 'trainer.serve' in cmdline and state_file in cmdline:
            found.append(process.pid)
    return found


class TestModelServer(TrainingCase):

    @classmethod
    def setUpClass(cls):
        super(TestModelServer, cls).setUpClass()
        cls.local = cls.env['llm.provider'].create({'name': 'Local', 'service': 'local'})
        cls.smol = cls.env['llm.model'].create({'name': 'SmolLM2', 'provider_id': cls.local.id,
                                                'model_ref': 'SmolLM2-135M-Instruct'})
        cls.server = cls.local._adapter().model_server()
        cls.server.stop()  # start from no server, whatever an earlier test left

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        super(TestModelServer, cls).tearDownClass()

    def test_one_server_answers_every_call_and_stops(self):
        run_dir = self.server.run_dir
        self.assertEqual(run_dir, os.path.join(self.local._adapter_config()['model_server_dir']))
        # two workers asking at once start one server between them (the start lock)
        states = []
        clients = [ModelServer(self.server.python, run_dir, env=self.server.env, cwd=self.server.cwd,
                               allowed_roots=self.server.allowed_roots, engine=self.server.engine) for _ in range(2)]
        threads = [threading.Thread(target=lambda c=c: states.append(c.ensure_running())) for c in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        self.assertEqual(len(states), 2)
        self.assertEqual(states[0]['pid'], states[1]['pid'])
        pid = states[0]['pid']
        self.assertEqual(server_processes(run_dir), [pid])

        self.smol.test_prompt = 'What is the capital of France?'
        self.smol.action_test_model()
        self.assertIn('Paris', self.smol.test_reply)
        wizard = self.env['llm.model.compare.wizard'].create({'model_ids': [(6, 0, self.smol.ids)],
                                                               'prompt': 'What is the capital of France?'})
        wizard.action_compare()
        self.assertIn('Paris', wizard.result)
        self.assertEqual(read_state(run_dir)['pid'], pid, 'the second and third calls used the same server')
        self.assertEqual(server_processes(run_dir), [pid])
        self.assertTrue(self.server.health()['loaded']['base'].endswith('SmolLM2-135M-Instruct'))

        self.assertTrue(self.server.stop())
        self.assertFalse(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
        self.assertIsNone(read_state(run_dir))
        self.assertFalse(self.server.stop(), 'nothing left to stop')

    def test_chat_and_chat_stream_through_the_provider(self):
        messages = [{'role': 'user', 'content': 'What is the capital of France?'}]
        options = {'max_tokens': 30, 'temperature': 0, 'stop': None}
        whole = self.local._call_adapter('chat', self.smol.model_ref, messages, options)
        self.assertEqual(set(whole), {'text', 'finish_reason', 'prompt_tokens', 'completion_tokens'})
        self.assertIn('Paris', whole['text'])
        items = list(self.local._call_adapter('chat_stream', self.smol.model_ref, messages, options))
        self.assertTrue(all(set(item) == {'delta'} for item in items[:-1]))
        self.assertEqual(''.join(item['delta'] for item in items[:-1]), whole['text'])
        self.assertEqual(items[-1], {k: whole[k] for k in ('finish_reason', 'prompt_tokens', 'completion_tokens')})
        # a stream left after its first item closes its connection; the server answers the next call
        stream = self.local._call_adapter('chat_stream', self.smol.model_ref, messages, {'max_tokens': 200})
        self.assertIn('delta', next(stream))
        stream.close()
        self.assertEqual(self.local._call_adapter('chat', self.smol.model_ref, messages, options), whole)

    def test_refusals_are_user_errors(self):
        messages = [{'role': 'user', 'content': 'Hi'}]
        with self.assertRaisesRegex(UserError, 'Unknown chat option.*presence_penalty'):
            self.local._call_adapter('chat', self.smol.model_ref, messages, {'presence_penalty': 1})
        with self.assertRaisesRegex(UserError, 'no Hugging Face model folder'):
            self.local._call_adapter('chat_stream', 'no-such-model', messages, {})
        with self.assertRaisesRegex(UserError, 'Generation failed: "max_tokens"'):
            self.local._call_adapter('chat_stream', self.smol.model_ref, messages, {'max_tokens': -1})
        # the request's own fault (over the context) is told apart from a failing server
        too_long = [{'role': 'user', 'content': 'word ' * 9000}]
        with self.assertRaisesRegex(InvalidServiceRequest, "Generation failed: .*the model's context is 8192"):
            self.local._call_adapter('chat', self.smol.model_ref, too_long, {})
        with self.assertRaises(InvalidServiceRequest):
            self.local._call_adapter('chat_stream', self.smol.model_ref, too_long, {})
        with self.assertRaisesRegex(UserError, 'Provider "Scripted" cannot chat'):
            self.provider._call_adapter('chat', 'tiny-1', messages, {})
        self.assertTrue(self.local.can_chat)
        self.assertFalse(self.provider.can_chat)


class TestBusyServer(unittest.TestCase):

    def test_a_full_waiting_line_is_retryable_not_a_failure(self):
        """The server's 503 (its waiting line full) becomes a retry-later with its Retry-After, which
        the provider turns into ServiceBusy and the API into a 429; other failures stay failures."""
        busy = generation_failed(model_server_lib.ModelServerError('the server is busy', 503, retry_after=5))
        self.assertIsInstance(busy, TrainingRetryableError)
        self.assertEqual(busy.seconds, 5)
        self.assertIsInstance(_as_user_error(busy), ServiceBusy)
        self.assertEqual(_as_user_error(busy).seconds, 5)
        failed = generation_failed(model_server_lib.ModelServerError('exploded', 500))
        self.assertNotIsInstance(failed, TrainingRetryableError)
        self.assertNotIsInstance(_as_user_error(failed), ServiceBusy)


class TestServeSettings(TrainingCase):

    def test_the_batching_settings_come_from_odoo_conf_and_a_server_with_others_is_replaced(self):
        conf = {'llm_training_serve_max_queue': '3', 'llm_training_serve_max_batch': '4',
                'llm_training_serve_idle_unload': '60', 'llm_training_serve_max_memory_mb': '2048'}
        conf.update(llm_training_serve_engine='llamacpp', llm_training_llama_convert_dir='/opt/convert',
                    llm_training_embed_precision='fp32')
        self.assertEqual(serve_settings(conf.get), {'max_waiting': 3, 'max_batch': 4, 'idle_unload': 60.0,
                                                    'max_memory_mb': 2048, 'engine': 'llamacpp',
                                                    'convert_dir': '/opt/convert', 'embed_precision': 'fp32'})
        self.assertEqual(serve_settings({}.get), {'max_waiting': 16, 'max_batch': 8, 'idle_unload': 900,
                                                  'max_memory_mb': 0, 'engine': 'auto', 'convert_dir': None,
                                                  'embed_precision': 'auto'})
        for key, bad in (('llm_training_serve_max_batch', '0'), ('llm_training_serve_idle_unload', 'soon'),
                         ('llm_training_serve_engine', 'vllm'), ('llm_training_embed_precision', 'fp16')):
            with self.assertRaisesRegex(ValueError, key):
                serve_settings({key: bad}.get)
        local = self.env['llm.provider'].create({'name': 'Local', 'service': 'local'})
        with mock.patch.dict(tools.config.options, conf):
            client = local._adapter().model_server()
        self.assertEqual((client.max_waiting, client.max_batch, client.idle_unload, client.max_memory_mb, client.engine,
                          client.convert_dir, client.embed_precision), (3, 4, 60.0, 2048, 'llamacpp', '/opt/convert', 'fp32'))
        health = {'allowed_roots': client.allowed_roots,
                  'engine': {'max_queue': 3, 'max_batch': 4, 'idle_unload': 60.0, 'max_memory_mb': 2048,
                             'setting': 'llamacpp'}, 'embed': {'precision_setting': 'fp32'}}
        self.assertTrue(client._serves_ours(health))
        health['embed']['precision_setting'] = 'auto'  # odoo.conf now forces fp32 embeddings: replaced
        self.assertFalse(client._serves_ours(health))
        health['embed']['precision_setting'] = 'fp32'
        health['engine']['setting'] = 'transformers'  # started before odoo.conf changed: replaced
        self.assertFalse(client._serves_ours(health))
        health['engine'].update(setting='llamacpp', max_batch=8)
        self.assertFalse(client._serves_ours(health))


class TestModelServerSecret(TrainingCase):
    """The model server trusts no local process: its token, its allowed roots, its private folder.
    One server for the class; the test that restarts and stops it runs last (names sort)."""

    @classmethod
    def setUpClass(cls):
        super(TestModelServerSecret, cls).setUpClass()
        cls.local = cls.env['llm.provider'].create({'name': 'Local', 'service': 'local'})
        cls.smol = cls.env['llm.model'].create({'name': 'SmolLM2', 'provider_id': cls.local.id,
                                                'model_ref': 'SmolLM2-135M-Instruct'})
        cls.server = cls.local._adapter().model_server()
        cls.server.stop()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()
        super(TestModelServerSecret, cls).tearDownClass()

    def url(self, path):
        return 'http://127.0.0.1:%d%s' % (self.server.ensure_running()['port'], path)  # one server for the class

    def test_its_folder_and_token_are_private_and_nothing_answers_without_the_token(self):
        run_dir = self.server.run_dir
        self.url('/')
        for folder in (run_dir, os.path.dirname(run_dir)):  # <data_dir>/llm_training/model_server and its parent
            self.assertEqual(stat.S_IMODE(os.stat(folder).st_mode), 0o700, folder)
        token_file = os.path.join(run_dir, TOKEN_FILE)
        self.assertEqual(stat.S_IMODE(os.stat(token_file).st_mode), 0o600)
        pid = read_state(run_dir)['pid']
        body = {'model': self.local._adapter().model_path(self.smol.model_ref),
                'messages': [{'role': 'user', 'content': 'Hi'}], 'max_tokens': 2}
        for headers in ({}, {'Authorization': 'Bearer wrong'}):
            for method, path, json_body in (('get', '/health', None), ('post', '/chat', body),
                                            ('post', '/shutdown', {})):
                answer = getattr(requests, method)(self.url(path), json=json_body, headers=headers, timeout=60)
                self.assertEqual(answer.status_code, 401, (path, answer.text))
                self.assertNotIn('loaded', answer.text)
        self.assertEqual(read_state(run_dir)['pid'], pid, 'the refused /shutdown stopped nothing')
        self.assertEqual(self.server.health()['pid'], pid)  # the client has the token

    def test_a_model_folder_outside_the_allowed_roots_is_refused(self):
        """A real model, linked file by file into a folder the addon does not put models in: the
        weights would load; the server refuses the folder itself (403)."""
        source = self.local._adapter().model_path(self.smol.model_ref)
        outside = tempfile.mkdtemp(prefix='llmt-outside-')
        self.addCleanup(shutil.rmtree, outside)
        for name in os.listdir(source):
            os.symlink(os.path.join(source, name), os.path.join(outside, name))
        self.assertNotIn(os.path.realpath(outside), self.local._model_roots())
        stranger = self.env['llm.model'].create({'name': 'Stranger', 'provider_id': self.local.id,
                                                 'model_ref': outside})
        messages = [{'role': 'user', 'content': 'Hi'}]
        with self.assertRaisesRegex(UserError, 'outside the folders this server serves'):
            self.local._call_adapter('chat', stranger.model_ref, messages, {'max_tokens': 2})
        with self.assertRaisesRegex(UserError, 'outside the folders this server serves'):
            self.local._call_adapter('chat_stream', stranger.model_ref, messages, {'max_tokens': 2})
        roots = self.server.health()['allowed_roots']
        self.assertIn(os.path.realpath(os.path.join(tools.config['data_dir'], 'llm_training')), roots)
        self.assertIn(os.path.realpath(tools.config['llm_training_models_dir']), roots)

    def test_new_provider_storage_restarts_the_server_with_it_and_make_stop_still_works(self):
        storage = tempfile.mkdtemp(prefix='llmt-storage-')
        self.addCleanup(shutil.rmtree, storage)
        self.env['llm.provider'].create({'name': 'Shared storage', 'service': 'local', 'storage_path': storage})
        before = self.server.ensure_running()['pid']
        client = self.local._adapter().model_server()
        self.assertIn(os.path.realpath(storage), client.allowed_roots)
        after = client.ensure_running()['pid']
        self.assertNotEqual(after, before, 'the running server lacked the new root: restarted')
        health = client.health()
        self.assertIn(os.path.realpath(storage), health['allowed_roots'])
        self.assertTrue(set(self.server.allowed_roots) <= set(health['allowed_roots']))
        self.assertEqual(self.server.ensure_running()['pid'], after, 'a client needing fewer roots keeps it')
        # `make stop` runs lib/serving/model_server.py alone (no Odoo): it reads the token and stops the server
        out = subprocess.run([sys.executable, '-m', 'lib.serving.model_server', 'stop', client.run_dir],
                             cwd=model_server_lib.ADDON_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             timeout=120).stdout.decode()
        self.assertIn('stopped', out)
        self.assertNotIn('was not running', out)
        self.assertFalse(psutil.pid_exists(after) and psutil.Process(after).status() != psutil.STATUS_ZOMBIE)


class TestStuckServer(unittest.TestCase):

    def test_a_chat_with_a_deadline_waits_no_longer_than_it_on_a_stuck_server(self):
        """Under workers > 0 a chat carries max_seconds (the worker's time left): a server that
        accepts the connection and never answers is given up on by then, not after 300 s."""
        with socket.socket() as listener:
            listener.bind(('127.0.0.1', 0))
            listener.listen(1)  # connections are accepted (the backlog) and never answered
            client = ModelServer(None, tempfile.mkdtemp(prefix='llmt-stuck-'), request_timeout=300)
            client.ensure_running = lambda: {'port': listener.getsockname()[1]}
            client._headers = lambda: {}
            messages = [{'role': 'user', 'content': 'Hi'}]
            with self.assertRaisesRegex(model_server_lib.ModelServerError, 'did not answer within 2 s'):
                client.chat('/models/m', messages, max_seconds=0.5)
            with self.assertRaisesRegex(model_server_lib.ModelServerError, 'did not answer within 3 s'):
                list(client.chat_stream('/models/m', messages, max_seconds=1.5))
