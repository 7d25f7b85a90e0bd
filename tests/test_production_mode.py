"""Production mode: a real Odoo multi-process server (workers=2, a cron worker, a longpolling
process, Odoo's default memory limits, proxy_mode) serving two databases behind a db filter, driven
as people and clients drive it: Submit starts training without waiting for the cron, the OpenAI SDK flow trains a local job to Completed in the cron
worker while that worker is recycled, a streamed chat outlasting limit_time_real ends cleanly, a
model form's Generate reply answers in the second database, forwarded headers choose the
database and the logged address, and the longpolling process starts once and stays up.

The databases are template copies of the test database that scripts/test.sh makes
(<db>_pfa, <db>_pfb). The cron worker sleeps a minute between passes: a test makes our crons due
and wakes it (SIGQUIT writes to the worker's wake-up pipe; its handler only logs the threads' stacks;
SIGUSR1's cache statistics crash Odoo 11's worker),
then waits until the crons have run, so every pass is an explicit trigger, never a guess.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import xmlrpc.client

import psutil
import psycopg2
import pytest
import requests

import odoo
from odoo import SUPERUSER_ID, api

from ..lib.serving.model_server import ModelServer
from .test_local_provider import code_word_examples
from .test_openai_api import DRIVER, client_python

ADDON_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ADDON_ROOT, 'scripts', 'odoo')
# Short, so that a streamed chat outlasts it in a short test; the cron worker keeps Odoo's default
# 120 s (limit_time_real_cron); every other limit is Odoo's default.
LIMIT_TIME_REAL = 40
CRONS = ('ir_cron_sync_training_jobs', 'ir_cron_process_api_files')
WAIT = 240  # seconds any one condition below may take on a busy 2-core machine


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_for(predicate, what, timeout=WAIT):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError('timed out after %d s waiting for %s' % (timeout, what))


def limits_of(pid):
    """{'as': (soft, hard), 'cpu': (soft, hard)} from /proc/<pid>/limits ('unlimited' kept as is)."""
    found = {}
    with open('/proc/%d/limits' % pid) as f:
        for line in f:
            for key, label in (('as', 'Max address space'), ('cpu', 'Max cpu time')):
                if line.startswith(label):
                    found[key] = tuple(line[len(label):].split()[:2])
    return found


class PreforkOdoo(object):
    """The server, its two databases (one setting-up environment each) and how to reach them."""

    def __init__(self, folder):
        config = odoo.tools.config
        test_db = config['db_name']
        self.dbs = {'a': test_db + '_pfa', 'b': test_db + '_pfb'}
        self.port, self.longpolling_port = free_port(), free_port()
        self.folder = folder
        self.log = os.path.join(folder, 'odoo.log')
        self.conf = os.path.join(folder, 'odoo.conf')
        self.data_dir = config['data_dir']  # the test's: the same filestore copies and model server
        options = {
            'addons_path': config['addons_path'], 'db_name': ','.join(sorted(self.dbs.values())),
            'dbfilter': '^%d$', 'list_db': 'False', 'http_interface': '127.0.0.1', 'http_port': self.port,
            'longpolling_port': self.longpolling_port, 'data_dir': self.data_dir, 'workers': 2,
            'max_cron_threads': 1, 'limit_time_real': LIMIT_TIME_REAL, 'limit_time_real_cron': 120,
            'proxy_mode': 'True',
            'admin_passwd': 'admin', 'log_level': 'info',
            'llm_training_trainer_python': config['llm_training_trainer_python'],
            'llm_training_models_dir': config['llm_training_models_dir'],
            'llm_training_serve_engine': config.get('llm_training_serve_engine') or 'auto',  # the suite's engine
        }
        with open(self.conf, 'w') as f:
            f.write('[options]\n' + ''.join('%s = %s\n' % item for item in options.items()))
        self.keys = {name: self._prepare(db, name) for name, db in self.dbs.items()}
        self.model_server = ModelServer(None, os.path.join(self.data_dir, 'llm_training', 'model_server'))
        self.model_server.stop()  # the one an earlier test left would answer for ours
        self.process = subprocess.Popen([sys.executable, LAUNCHER, '-c', self.conf, '--logfile', self.log],
                                        cwd=folder, stdin=subprocess.DEVNULL, start_new_session=True)
        for name in self.dbs:
            wait_for(lambda: self._answers(name), 'Odoo to serve database %s' % self.dbs[name])

    def _prepare(self, db, name):
        """Settings and data each database needs, written before the server starts: no API limits
        in the way, a local provider with the real SmolLM2, an API key (its secret returned)."""
        with odoo.registry(db).cursor() as cr:
            env = api.Environment(cr, SUPERUSER_ID, {})
            env['ir.config_parameter'].set_param('llm_training.api_requests_per_minute', '0')
            env['ir.config_parameter'].set_param('llm_training.api_running_jobs_per_company', '0')
            env['llm.model'].search([('model_ref', '=', 'SmolLM2-135M-Instruct')]).write({'active': False})
            local = env['llm.provider'].create({'name': 'Local %s' % name, 'service': 'local', 'max_concurrent_jobs': 1})
            env['llm.model'].create({'name': 'SmolLM2 %s' % name, 'provider_id': local.id,
                                     'model_ref': 'SmolLM2-135M-Instruct', 'context_length': 8192,
                                     'test_prompt': 'What is the capital of France?'})
            return env['llm.api.key']._generate('prefork', env.ref('base.user_root'))[1]

    def host(self, name):
        return '%s.test:%d' % (self.dbs[name], self.port)

    def url(self, path, port=None):
        return 'http://127.0.0.1:%d%s' % (port or self.port, path)

    def _answers(self, name, port=None):
        try:
            return requests.get(self.url('/web/login', port), headers={'Host': self.host(name)}, timeout=30).ok
        except requests.RequestException:
            return False

    def xmlrpc(self, name, model, method, *args, **kwargs):
        """execute_kw as admin in database `name`, over XML-RPC with that database's Host."""
        body = xmlrpc.client.dumps((self.dbs[name], SUPERUSER_ID, 'admin', model, method, list(args), kwargs),
                                   'execute_kw', allow_none=True)
        answer = requests.post(self.url('/xmlrpc/2/object'), data=body, timeout=120,
                               headers={'Host': self.host(name), 'Content-Type': 'text/xml'})
        answer.raise_for_status()
        return xmlrpc.client.loads(answer.content)[0][0]

    # -- processes -------------------------------------------------------------------------------
    def children(self, marker):
        return [p for p in psutil.Process(self.process.pid).children() if marker in ' '.join(p.cmdline())]

    def cron_worker_pid(self):
        """The live cron worker: the newest 'WorkerCron (pid) alive' line naming a live child."""
        with open(self.log) as f:
            pids = [int(pid) for pid in re.findall(r'Worker WorkerCron \((\d+)\) alive', f.read())]
        children = {p.pid for p in psutil.Process(self.process.pid).children()}
        live = [pid for pid in pids if pid in children]
        return live[-1] if live else None

    def run_crons(self, name):
        """One pass of our crons in database `name`, run by the cron worker: make them due, wake
        the worker, wait until each has run (its next call moved past the trigger)."""
        with psycopg2.connect(dbname=self.dbs[name]) as conn, conn.cursor() as cr:
            cr.execute("""UPDATE ir_cron SET nextcall = (now() at time zone 'UTC') - interval '1 second'
                           WHERE id IN (SELECT res_id FROM ir_model_data
                                         WHERE module = 'llm_training' AND model = 'ir.cron' AND name IN %s)
                       RETURNING nextcall""", (CRONS,))
            triggered_at = max(row[0] for row in cr.fetchall())
        conn.close()
        os.kill(wait_for(self.cron_worker_pid, 'a cron worker'), signal.SIGQUIT)

        def ran():
            with psycopg2.connect(dbname=self.dbs[name]) as conn, conn.cursor() as cr:
                cr.execute("""SELECT min(nextcall) FROM ir_cron WHERE id IN (SELECT res_id FROM ir_model_data
                               WHERE module = 'llm_training' AND model = 'ir.cron' AND name IN %s)""", (CRONS,))
                done = cr.fetchone()[0] > triggered_at
            conn.close()
            return done
        wait_for(ran, 'the cron worker to run the crons of %s' % self.dbs[name])

    def log_text(self):
        with open(self.log) as f:
            return f.read()

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # the master stops its workers and longpolling process
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


class SdkDriver(object):
    """The real openai SDK (client venv) against the prefork server, as tests/test_openai_api.py
    drives it, with the Host header that selects database `name`."""

    def __init__(self, server, name):
        env = dict(os.environ, LLMT_SDK_HEADERS=json.dumps({'Host': server.host(name)}))
        self.process = subprocess.Popen([client_python(), DRIVER, server.url('/v1'), server.keys[name]], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, universal_newlines=True)

    def __call__(self, op, **args):
        self.process.stdin.write(json.dumps({'op': op, 'args': args}) + '\n')
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        assert 'ok' in answer, answer
        return answer['ok']

    def close(self):
        self.process.stdin.close()
        self.process.wait(30)


@pytest.fixture(scope='module')
def server(tmp_path_factory):
    if not client_python():
        pytest.fail('the client venv ($LLMT_CLIENT_VENV) is missing: run scripts/setup.sh')
    prefork = PreforkOdoo(str(tmp_path_factory.mktemp('prefork')))
    prefork.state = {}
    yield prefork
    prefork.stop()
    for pid in prefork.state.get('trainers', ()):
        if psutil.pid_exists(pid):
            os.killpg(pid, signal.SIGKILL)
    prefork.model_server.stop()


def test_longpolling_process_starts_and_answers_on_its_port(server):
    longpolling = wait_for(lambda: server.children(' gevent '), 'the longpolling process')
    assert len(longpolling) == 1, longpolling
    assert server._answers('a', port=server.longpolling_port)
    server.state['longpolling_pid'] = longpolling[0].pid


def test_submit_returns_at_once_and_training_starts_without_a_cron_pass(server):
    with psycopg2.connect(dbname=server.dbs['b']) as conn, conn.cursor() as cr:
        # our crons are not due for an hour: whatever moves the job now is Submit's own run
        cr.execute("""UPDATE ir_cron SET nextcall = (now() at time zone 'UTC') + interval '1 hour'
                       WHERE id IN (SELECT res_id FROM ir_model_data
                                     WHERE module = 'llm_training' AND model = 'ir.cron' AND name IN %s)""", (CRONS,))
    conn.close()
    provider = server.xmlrpc('b', 'llm.provider', 'search', [('name', '=', 'Local b')])[0]
    model = server.xmlrpc('b', 'llm.model', 'search', [('name', '=', 'SmolLM2 b')])[0]
    dataset = server.xmlrpc('b', 'ir.model.data', 'xmlid_to_res_id', 'llm_training.demo_dataset_northwind')
    job = server.xmlrpc('b', 'llm.training.job', 'create', {
        'name': 'Submitted', 'provider_id': provider, 'base_model_id': model, 'dataset_ids': [(6, 0, [dataset])],
        'epochs': 1, 'batch_size': 4, 'max_seq_length': 128})
    assert server.xmlrpc('b', 'llm.training.job', 'action_submit', [job]) is True
    # Submit answered before any of the work: validating, preparing, starting the trainer
    assert server.xmlrpc('b', 'llm.training.job', 'read', [job], ['state'])[0]['state'] != 'training'
    state = wait_for(lambda: (lambda s: s if s in ('training', 'completed', 'failed', 'cancelled') else None)(
        server.xmlrpc('b', 'llm.training.job', 'read', [job], ['state'])[0]['state']), 'the job to start training')
    assert state in ('training', 'completed'), server.xmlrpc('b', 'llm.training.job', 'read', [job], ['error_message'])
    if state == 'training':
        server.xmlrpc('b', 'llm.training.job', 'action_cancel', [job])  # its CPU is for the tests below


def test_sdk_trains_a_local_job_in_the_cron_worker_through_a_recycled_worker(server):
    sdk = SdkDriver(server, 'a')
    try:
        content = ''.join(json.dumps(e) + '\n' for e in code_word_examples(16))
        file = sdk('upload', filename='codes.jsonl', content=content)
        server.run_crons('a')
        assert sdk('file', id=file['id'])['status'] == 'processed'
        job = sdk('create_job', model='SmolLM2-135M-Instruct', training_file=file['id'], suffix='codes', seed=3,
                  method={'type': 'supervised', 'supervised': {'hyperparameters': {
                      'n_epochs': 2, 'batch_size': 4, 'learning_rate_multiplier': 5,
                      'max_seq_length': 128, 'validation_split': 0.25}}})

        job_id = int(job['id'].split('-')[1])

        def trainer_pid():
            server.run_crons('a')
            data = server.xmlrpc('a', 'llm.training.job', 'read', [job_id], ['provider_data'])[0]['provider_data']
            return json.loads(data or '{}').get('pid')
        trainer = wait_for(trainer_pid, 'the cron worker to start the trainer')
        server.state['trainers'] = [trainer]
        # Hold the trainer (a barrier: it needs far longer than this to train) while its worker goes.
        os.kill(trainer, signal.SIGSTOP)
        try:
            # Started by the cron worker, yet none of its limits: Odoo's 2.5 GB address space and its
            # CPU-time budget killed every local job before.
            for soft, hard in limits_of(trainer).values():
                assert soft == hard, limits_of(trainer)
            # The cron worker is recycled (as after limit_request or limit_memory_soft): the trainer goes on.
            recycled = server.cron_worker_pid()
            os.kill(recycled, signal.SIGINT)  # a worker's graceful exit
            wait_for(lambda: server.cron_worker_pid() not in (None, recycled), 'a new cron worker')
            assert not psutil.pid_exists(recycled) or psutil.Process(recycled).status() == psutil.STATUS_ZOMBIE
            assert psutil.Process(trainer).status() == psutil.STATUS_STOPPED
        finally:
            os.kill(trainer, signal.SIGCONT)

        def finished():
            server.run_crons('a')
            return sdk('job', id=job['id'])['status'] in ('succeeded', 'failed', 'cancelled')
        wait_for(finished, 'the job to finish', timeout=600)
        final = sdk('job', id=job['id'])
        assert final['status'] == 'succeeded', final
        assert final['trained_tokens'] > 0
        assert 'State: Completed' in [e['message'] for e in sdk('events', id=job['id'], limit=100)['data']]
        assert sdk('checkpoints', id=job['id'])['data']
        assert final['fine_tuned_model'] in [m['id'] for m in sdk('models')]
        reply = sdk('chat', model=final['fine_tuned_model'], max_tokens=16, temperature=0,
                    messages=[{'role': 'user', 'content': 'What is the code word number 2?'}])
        assert 'MANGO' in reply['choices'][0]['message']['content']
        chunks = sdk('chat_stream', model=final['fine_tuned_model'], max_tokens=16, temperature=0,
                     stream_options={'include_usage': True},
                     messages=[{'role': 'user', 'content': 'What is the code word number 2?'}])
        assert 'MANGO' in ''.join((c['choices'][0]['delta'].get('content') or '') for c in chunks if c['choices'])
        assert sdk('violations') == []
    finally:
        sdk.close()


def test_streamed_chat_longer_than_limit_time_real_ends_cleanly(server):
    # Greedy SmolLM2 counts on for thousands of tokens here: far longer than the worker may run.
    started = time.time()
    answer = requests.post(server.url('/v1/chat/completions'), stream=True, timeout=(10, 120), json={
        'model': 'SmolLM2-135M-Instruct', 'stream': True, 'max_tokens': 4000, 'temperature': 0,
        'stream_options': {'include_usage': True},
        'messages': [{'role': 'user', 'content': 'Write the numbers from 1 to 1000 separated by commas.'}]},
        headers={'Host': server.host('a'), 'Authorization': 'Bearer %s' % server.keys['a']})
    assert answer.status_code == 200, answer.text
    assert answer.headers['X-Accel-Buffering'] == 'no'  # a proxy passes each chunk on at once
    events = [line[len(b'data: '):] for line in answer.iter_lines() if line.startswith(b'data: ')]
    elapsed = time.time() - started
    assert events[-1] == b'[DONE]', events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert not [c for c in chunks if 'error' in c], chunks[-3:]
    assert chunks[-2]['choices'][0]['finish_reason'] == 'length'
    usage = chunks[-1]['usage']
    assert 0 < usage['completion_tokens'] < 4000 and usage['prompt_tokens'] > 0
    assert elapsed < LIMIT_TIME_REAL, elapsed  # answered whole before the worker's limit...
    assert 'timeout after' not in server.log_text()  # ...so the master killed no worker


def test_generate_reply_on_a_model_form_in_the_second_database(server):
    model_id = server.xmlrpc('b', 'llm.model', 'search', [('name', '=', 'SmolLM2 b')])[0]
    assert server.xmlrpc('b', 'llm.model', 'action_test_model', [model_id]) is True
    reply = server.xmlrpc('b', 'llm.model', 'read', [model_id], ['test_reply'])[0]['test_reply']
    assert 'Paris' in reply
    # the model server was started by an HTTP worker: none of that worker's limits either
    with open(os.path.join(server.data_dir, 'llm_training', 'model_server', 'server.json')) as f:
        model_server = json.load(f)['pid']
    for soft, hard in limits_of(model_server).values():
        assert soft == hard, limits_of(model_server)


def test_forwarded_headers_choose_the_database_and_the_logged_address(server):
    # What nginx sends with the README's configuration: the client's Host, X-Forwarded-*. (Werkzeug
    # 0.16's ProxyFix, which Odoo 11 applies in proxy_mode, takes X-Forwarded-For and -Proto but
    # not -Host: the database is chosen by the Host the proxy passes on.)
    headers = {'Host': server.host('b'), 'X-Forwarded-Host': server.host('b'), 'X-Forwarded-For': '203.0.113.7',
               'X-Forwarded-Proto': 'https', 'Authorization': 'Bearer %s' % server.keys['b']}
    answer = requests.get(server.url('/v1/models'), headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text
    assert 'SmolLM2-135M-Instruct' in [m['id'] for m in answer.json()['data']]
    # database b's key is unknown in database a: the host chose b
    headers.update({'Host': server.host('a'), 'X-Forwarded-Host': server.host('a')})
    assert requests.get(server.url('/v1/models'), headers=headers, timeout=60).status_code == 401
    assert re.search(r'203\.0\.113\.7 .*"GET /v1/models', server.log_text())


def test_longpolling_process_kept_its_pid_through_the_run(server):
    assert [p.pid for p in server.children(' gevent ')] == [server.state['longpolling_pid']]
    assert server.log_text().count('Evented Service (longpolling) running') == 1
