"""The /v1 API's limits come before work, and its answers carry no server paths.

Real HTTP to the test's Odoo server (in this process), raw sockets where a client library would
send the body anyway; the request counter on real PostgreSQL connections of its own."""
import json
import os
import random
import socket
import tempfile
import threading
from unittest import mock

import psutil
import requests

import odoo
from odoo import tools

from odoo.addons.llm_training.controllers import openai_api as openai_api_controller, v1_hooks
from odoo.addons.llm_training.lib.api_v1 import key_usage, protocol as oa
from odoo.addons.llm_training.lib.exceptions import TrainingFailedError, TrainingRetryableError
from odoo.addons.llm_training.lib.providers.local import LocalTrainer

from .test_openai_api import ApiCase


def raw_request(port, head, timeout=60):
    """Send only the request line and headers (no body) and read the whole answer: (status,
    headers, body). The server must answer without waiting for the body it was promised."""
    with socket.create_connection(('127.0.0.1', port), timeout=timeout) as sock:
        sock.sendall(head.encode('latin-1'))
        data = b''
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                raise AssertionError('no answer within %d s: the server waits for the body' % timeout)
            if not chunk:
                break
            data += chunk
            if b'\r\n\r\n' in data:
                head_part, body = data.split(b'\r\n\r\n', 1)
                length = [int(line.split(b':')[1]) for line in head_part.split(b'\r\n')
                          if line.lower().startswith(b'content-length:')]
                if length and len(body) >= length[0]:
                    break
        # the body it never read: refused too (the connection is closed)
        refused = False
        try:
            for _ in range(64):
                sock.sendall(b'x' * 65536)
        except OSError:
            refused = True
    head_part, body = data.split(b'\r\n\r\n', 1)
    lines = head_part.decode('latin-1').split('\r\n')
    headers = {line.split(':', 1)[0].strip().lower(): line.split(':', 1)[1].strip() for line in lines[1:]}
    return int(lines[0].split()[1]), headers, json.loads(body.decode()), refused


class TestApiLimitsBeforeWork(ApiCase):

    def setUp(self):
        super(TestApiLimitsBeforeWork, self).setUp()
        self.port = odoo.tools.config['http_port']
        self.cr.commit()  # the key exists for the requests (a savepoint of the test cursor)

    def test_an_oversize_body_is_refused_unread(self):
        """Headers announce a body over the limit, and no byte of it is sent: the answer comes at
        once (today's Odoo 11 would read, parse and spool the body first, so it waits)."""
        tmp = tempfile.gettempdir()
        tmp_before = set(os.listdir(tmp))
        rss_before = psutil.Process().memory_info().rss
        big = 200 * 1024 * 1024
        odoo.tools.config['llm_training_max_file_bytes'] = 1024 * 1024
        self.addCleanup(odoo.tools.config.options.pop, 'llm_training_max_file_bytes')
        status, headers, body, refused = raw_request(self.port, (
            'POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n'
            'Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: %d\r\n\r\n') % (self.manager_key, big))
        self.assertEqual(status, 413)
        self.assertEqual((body['error']['code'], body['error']['param']), ('file_too_large', 'file'))
        self.assertTrue(headers['x-request-id'].startswith('req_'))
        self.assertTrue(refused, 'the body was accepted after the refusal')
        # a JSON body (chat, jobs) has a limit of its own, and no key is needed to be refused
        status, _headers, body, _refused = raw_request(self.port, (
            'POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n'
            'Content-Length: %d\r\n\r\n') % big)
        self.assertEqual((status, body['error']['code']), (413, 'request_too_large'))
        # a chunked body has no length to check (and werkzeug would read it whole): refused unread
        status, _headers, body, refused = raw_request(self.port, (
            'POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n'
            'Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n') % self.manager_key)
        self.assertEqual((status, body['error']['code']), (411, 'length_required'))
        self.assertTrue(refused)
        self.assertLess(psutil.Process().memory_info().rss - rss_before, 20 * 1024 * 1024)
        self.assertEqual(set(os.listdir(tmp)) - tmp_before, set(), 'nothing spooled to the temp folder')
        # under the limit, the same route still reads its body
        self.assertEqual(self.upload(b'{"messages": [{"role": "user", "content": "a"}, '
                                     b'{"role": "assistant", "content": "b"}]}\n')['purpose'], 'fine-tune')

    def test_other_paths_keep_odoo_s_own_handling(self):
        """The hooks act on /v1/ only: a JSON-RPC call elsewhere is still JSON-RPC."""
        url = 'http://127.0.0.1:%d' % self.port
        answer = requests.post(url + '/web/webclient/version_info', json={'jsonrpc': '2.0', 'params': {}}, timeout=60)
        self.assertEqual(answer.json().get('jsonrpc'), '2.0')
        self.assertIn('server_version', answer.json()['result'])
        self.assertNotIn('x-request-id', answer.headers)
        listed = requests.get(url + '/v1/models', headers={'Authorization': 'Bearer %s' % self.manager_key,
                                                           'Content-Type': 'application/json'}, timeout=60)
        self.assertEqual(listed.json()['object'], 'list')
        self.assertTrue(listed.headers['x-request-id'].startswith('req_'))

    def test_the_database_choice_is_kept_per_host(self):
        """With a db filter naming the database by host (%d), this server holds every database
        PostgreSQL lists (other test databases included): each Host gets its own choice, and the
        kept choice of one host never answers another."""
        url = 'http://127.0.0.1:%d/v1/models' % self.port
        auth = {'Authorization': 'Bearer %s' % self.manager_key}
        ours, other = '%s.localhost' % self.cr.dbname, 'no-such-db-%d.localhost' % random.randint(1, 10 ** 9)
        v1_hooks._db_choice.clear()
        self.addCleanup(v1_hooks._db_choice.clear)
        with mock.patch.dict(tools.config.options, {'dbfilter': '^%d$'}):
            for host in (other, ours, other, ours):
                answer = requests.get(url, headers=dict(auth, Host=host), timeout=60)
                if host == ours:
                    self.assertEqual((answer.status_code, answer.json()['object']), (200, 'list'), host)
                else:  # no database for this host: not ours, kept or not
                    self.assertNotEqual(answer.status_code, 200, host)
        self.assertEqual(v1_hooks._db_choice[ours][0], self.cr.dbname)
        self.assertIsNone(v1_hooks._db_choice[other][0])

    @mock.patch.object(openai_api_controller, 'rate_clock', lambda: 1800000010.0)  # one minute for all three
    def test_the_request_rate_is_counted_in_postgresql(self):
        self.env['ir.config_parameter'].set_param('llm_training.api_requests_per_minute', '2')
        limited = self.make_key(self.env.ref('base.user_root'), name='limited')
        key = self.env['llm.api.key'].search([('name', '=', 'limited')])
        bad = self.call('raw', method='POST', path='/fine_tuning/jobs', bearer=limited, content='{',
                        headers={'Content-Type': 'application/json'})
        self.assertEqual(bad['status'], 400)  # its work was rolled back; its count was not
        self.ok('jobs', key=limited)
        error = self.refused(429, 'jobs', key=limited, code='rate_limit_exceeded')
        self.assertIn('try again', error['message'])
        self.cr.execute('SELECT sum(hits) FROM llm_api_rate WHERE key_id = %s', (key.id,))
        self.assertEqual(self.cr.fetchone()[0], 3, 'every request counted in the table every worker shares')
        self.assertTrue(key.last_used)

    def test_two_connections_share_one_count_and_never_fail(self):
        """Two workers are two processes with their own connections: here two threads, each on a
        real PostgreSQL connection of its own, counting the same key at once."""
        key_id = -random.randint(1000, 10 ** 9)  # no such key: the counter needs none
        per_minute, each = 25, 20
        barrier = threading.Barrier(2)
        results, errors = [], []
        db = odoo.sql_db.db_connect(self.cr.dbname)

        def worker():
            try:
                with db.cursor() as cr:
                    cr.autocommit(True)
                    barrier.wait(60)
                    for _ in range(each):
                        results.append(key_usage.count_request(cr, key_id, per_minute, 1800000000.0)[0])
            except Exception as e:  # reported below: the test fails with it
                errors.append(e)
        threads = [threading.Thread(target=worker) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        try:
            self.assertFalse(any(thread.is_alive() for thread in threads), 'a counting thread hung')
            self.assertEqual(errors, [])
            self.assertEqual((results.count(True), results.count(False)), (per_minute, 2 * each - per_minute))
            # a new minute starts a new count and forgets the old one
            with db.cursor() as cr:
                cr.autocommit(True)
                self.assertEqual(key_usage.count_request(cr, key_id, per_minute, 1800000060.0), (True, 0))
                cr.execute('SELECT minute, hits FROM llm_api_rate WHERE key_id = %s', (key_id,))
                self.assertEqual(cr.fetchall(), [(1800000060 // 60, 1)])
        finally:
            with db.cursor() as cr:
                cr.autocommit(True)
                cr.execute('DELETE FROM llm_api_rate WHERE key_id = %s', (key_id,))


    def test_a_key_row_held_by_someone_else_does_not_hold_the_request(self):
        """A manager's transaction holding the key's row (editing the key) must not make an API
        request wait for last_used: the stamp skips a locked row. Committed rows on real
        connections; the statement would wait for the lock without SKIP LOCKED (lock_timeout turns
        that wait into an error here)."""
        db = odoo.sql_db.db_connect(self.cr.dbname)
        with db.cursor() as setup:
            setup.execute("""INSERT INTO llm_api_key (name, user_id, key_hash, active)
                             VALUES ('lock test', 1, %s, true) RETURNING id""", ('lock-test-%d' % random.randint(1, 10 ** 9),))
            key_id = setup.fetchone()[0]
            setup.commit()
        try:
            with db.cursor() as manager, db.cursor() as api:
                manager.execute('SELECT id FROM llm_api_key WHERE id = %s FOR UPDATE', (key_id,))
                api.autocommit(True)
                api.execute("SET lock_timeout = '20s'")
                self.assertFalse(key_usage.stamp_last_used(api, key_id), 'skipped, not waited for')
                manager.rollback()
                self.assertTrue(key_usage.stamp_last_used(api, key_id))
                self.assertFalse(key_usage.stamp_last_used(api, key_id), 'at most once a minute')
        finally:
            with db.cursor() as cleanup:
                cleanup.execute('DELETE FROM llm_api_key WHERE id = %s', (key_id,))
                cleanup.commit()


class TestApiAnswersWithoutPaths(ApiCase):

    def setUp(self):
        super(TestApiAnswersWithoutPaths, self).setUp()
        self.local = self.env['llm.provider'].create({'name': 'Local paths', 'service': 'local'})
        models_dir = tools.config['llm_training_models_dir']
        self.base = self.env['llm.model'].create({
            'name': 'Smol by path', 'provider_id': self.local.id,
            'model_ref': os.path.join(models_dir, 'SmolLM2-135M-Instruct')})
        self.folder = os.path.join(tools.config['data_dir'], 'llm_training', self.cr.dbname, 'job-999999', 'result')
        self.tuned = self.env['llm.model'].create({
            'name': 'Tuned by path', 'provider_id': self.local.id, 'kind': 'fine_tuned', 'base_model_id': self.base.id,
            'model_ref': self.folder, 'suffix': 'support', 'version': 3})

    def tuned_id(self):
        return 'ft:smol-by-path:%s:support:3' % oa.slug(self.local.company_id.name or self.env.user.company_id.name)

    def assert_no_path(self, value):
        text = json.dumps(value)
        for root in (tools.config['data_dir'], tools.config['llm_training_models_dir'], os.path.expanduser('~')):
            self.assertNotIn(root, text)

    def test_model_ids_are_names(self):
        ids = [m['id'] for m in self.ok('models')]
        self.assert_no_path(ids)
        self.assertIn('smol-by-path', ids)
        tuned_id = self.tuned_id()
        self.assertIn(tuned_id, ids)
        self.assertEqual(self.ok('model', id=tuned_id)['id'], tuned_id)
        self.refused(404, 'chat', model=self.folder, messages=[{'role': 'user', 'content': 'Hi'}],
                     code='model_not_found')  # a folder path is no id

    def test_errors_carry_a_request_id_and_no_path(self):
        messages = [{'role': 'user', 'content': 'Hi'}]
        with mock.patch.object(LocalTrainer, 'chat', side_effect=TrainingFailedError(
                'Generation failed: no model folder at %s; server log: Traceback in /usr/lib/python3/x.py' % self.folder)):
            error = self.refused(503, 'chat', model='smol-by-path', messages=messages, code='model_server_error')
        self.assert_no_path(error)
        self.assertNotIn('Traceback', error['message'])
        self.assertRegex(error['message'], r'request id req_[0-9a-f]{32}')
        raw = self.call('raw', method='POST', path='/chat/completions', bearer=self.manager_key,
                        content=json.dumps({'model': self.tuned_id(), 'messages': messages}),
                        headers={'Content-Type': 'application/json'})
        self.assertEqual(raw['status'], 503)  # the model folder is missing: the provider says where, we do not
        self.assert_no_path(raw)
        # a busy model server: 429 with Retry-After at once, not a worker held for minutes
        url = 'http://127.0.0.1:%d/v1/chat/completions' % odoo.tools.config['http_port']
        self.cr.commit()
        with mock.patch.object(LocalTrainer, 'chat', side_effect=TrainingRetryableError(
                'Generation failed: the server is busy', seconds=7)):
            answer = requests.post(url, json={'model': 'smol-by-path', 'messages': messages}, timeout=60,
                                   headers={'Authorization': 'Bearer %s' % self.manager_key})
        self.assertEqual((answer.status_code, answer.headers['Retry-After']), (429, '7'))
        self.assertEqual(answer.json()['error']['code'], 'rate_limit_exceeded')
        self.assertIn(answer.headers['x-request-id'], answer.json()['error']['message'])
        self.assert_no_violations()
