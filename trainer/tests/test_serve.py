"""The model server (trainer/serve.py): its pure parts alone, then a real server process on a port
the OS chooses, with the real SmolLM2 model and small random LoRA adapters made here."""
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from trainer import serve
from trainer.serve import RequestError, StopText, parse_chat_request

TRAINER_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUESTION = [{'role': 'user', 'content': 'What is the capital of France?'}]


# -- pure parts ---------------------------------------------------------------------------------------
def feed_all(stop, pieces):
    text, out = StopText(stop), []
    growing = ''
    for piece in pieces:
        growing += piece
        out.append(text.feed(growing))
        if text.stopped:
            break
    else:
        out.append(text.feed(growing, final=True))
    return out, text.stopped


def test_stop_text_holds_back_a_possible_stop_string_then_releases_it():
    out, stopped = feed_all(['END'], ['Hello E', 'N', 'ough'])
    assert out == ['Hello ', '', 'ENough', '']
    assert not stopped


def test_stop_text_cuts_at_the_stop_string_and_never_shows_part_of_it():
    out, stopped = feed_all(['\n\n', 'END'], ['Hello E', 'N', 'D and more'])
    assert out == ['Hello ', '', '']
    assert stopped
    out, stopped = feed_all(['\n\n', 'END'], ['one\n', '\ntwo'])
    assert ''.join(out) == 'one' and stopped


def test_stop_text_without_stop_strings_sends_everything():
    assert feed_all([], ['a', 'b'])[0] == ['a', 'b', '']


def test_request_defaults_and_refusals():
    request = parse_chat_request({'model': '/m', 'messages': QUESTION})
    assert (request['max_tokens'], request['temperature'], request['stop'], request['stream']) == (256, 0.0, [], False)
    assert parse_chat_request({'model': '/m', 'messages': QUESTION, 'stop': 'x'})['stop'] == ['x']
    for bad in ({'messages': QUESTION}, {'model': '/m', 'messages': []}, {'model': '/m', 'messages': [{'role': 'user'}]},
                {'model': '/m', 'messages': QUESTION, 'max_tokens': 0},
                {'model': '/m', 'messages': QUESTION, 'temperature': 3},
                {'model': '/m', 'messages': QUESTION, 'stop': ['']},
                {'model': '/m', 'messages': QUESTION, 'max_seconds': 0}, [1]):
        with pytest.raises(RequestError):
            parse_chat_request(bad)


# -- a real server --------------------------------------------------------------------------------------
class Server(object):
    def __init__(self, folder, roots):
        self.state_file = os.path.join(folder, 'server.json')
        self.log = open(os.path.join(folder, 'server.log'), 'wb')
        self.process = subprocess.Popen(
            [sys.executable, '-m', 'trainer.serve', '--port', '0', '--state-file', self.state_file,
             '--max-adapters', '1', '--engine', 'transformers'] + ['--allowed-root=%s' % root for root in roots],
            cwd=TRAINER_ROOT, env=dict(os.environ, PYTHONPATH=TRAINER_ROOT), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while not os.path.exists(self.state_file):  # written once the socket listens
            assert self.process.poll() is None and time.time() < deadline, 'server did not start'
            time.sleep(0.1)
        with open(self.state_file) as f:
            self.url = 'http://127.0.0.1:%d' % json.load(f)['port']
        self.token_file = os.path.join(folder, serve.TOKEN_FILE)  # written before the state file
        with open(self.token_file) as f:
            self.token = f.read()

    def call(self, path, body=None, token=True):
        """(status, parsed body); a streamed answer is a list of its lines."""
        data = None if body is None else json.dumps(body).encode()
        headers = {'Authorization': 'Bearer %s' % (self.token if token is True else token)} if token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url + path, data=data, headers=headers),
                                        timeout=120) as answer:
                status, raw = answer.status, answer.read().decode()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read().decode()
        if (body or {}).get('stream') and status == 200:
            return status, [json.loads(line) for line in raw.splitlines()]
        return status, json.loads(raw)

    def chat(self, model, **options):
        status, answer = self.call('/chat', dict(options, model=model, messages=options.pop('messages', QUESTION)))
        assert status == 200, answer
        return answer

    def stream(self, model, **options):
        lines = self.chat(model, stream=True, **options)
        assert all(set(line) == {'delta'} for line in lines[:-1]), lines
        return ''.join(line['delta'] for line in lines[:-1]), lines[-1]


@pytest.fixture(scope='module')
def server(tmp_path_factory, model_dir):
    server = Server(str(tmp_path_factory.mktemp('serve')), [model_dir, str(tmp_path_factory.getbasetemp())])
    yield server
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(30)
    server.log.close()


def test_health_names_the_process(server):
    status, health = server.call('/health')
    assert status == 200
    assert (health['status'], health['pid']) == ('ok', server.process.pid)


def test_the_token_file_is_private_and_every_path_needs_the_token(server, model_dir):
    assert stat.S_IMODE(os.stat(server.token_file).st_mode) == 0o600
    assert len(server.token) >= 32
    for token in (None, 'not-the-token'):
        for path, body in (('/health', None), ('/chat', {'model': model_dir, 'messages': QUESTION}),
                           ('/shutdown', {})):
            status, answer = server.call(path, body, token=token)
            assert status == 401 and set(answer) == {'error'}, (path, answer)
    assert server.call('/health')[0] == 200  # the refused /shutdown stopped nothing


def test_a_folder_outside_the_allowed_roots_is_refused(server, tmp_path):
    status, answer = server.call('/chat', {'model': '/usr/share', 'messages': QUESTION})
    assert status == 403 and 'outside' in answer['error']
    os.symlink('/usr/share', str(tmp_path / 'link'))  # under a root by name, outside it for real
    status, answer = server.call('/chat', {'model': str(tmp_path / 'link'), 'messages': QUESTION, 'stream': True})
    assert status == 403 and 'outside' in answer['error']


def test_stream_and_whole_answers_give_the_same_greedy_text(server, model_dir):
    whole = server.chat(model_dir, max_tokens=40)
    text, final = server.stream(model_dir, max_tokens=40)
    assert whole['text'] and 'Paris' in whole['text']
    assert text == whole['text']
    assert final == {k: whole[k] for k in ('finish_reason', 'prompt_tokens', 'completion_tokens')}
    assert whole['finish_reason'] == 'stop' and whole['completion_tokens'] < 40  # ended by the model


def test_max_tokens_ends_with_length(server, model_dir):
    answer = server.chat(model_dir, max_tokens=3, messages=[{'role': 'user', 'content': 'Write a long poem.'}])
    assert (answer['finish_reason'], answer['completion_tokens']) == ('length', 3)
    assert answer['text']


def test_max_seconds_ends_the_answer_with_length_in_both_modes(server, model_dir):
    # What an Odoo worker's time limit asks for: the answer ends cleanly, its usage exact.
    poem = [{'role': 'user', 'content': 'Write a very long poem about the sea.'}]
    whole = server.chat(model_dir, max_tokens=2000, max_seconds=0.05, messages=poem)
    text, final = server.stream(model_dir, max_tokens=2000, max_seconds=0.05, messages=poem)
    for answer in (whole, final):
        assert answer['finish_reason'] == 'length'
        assert 1 <= answer['completion_tokens'] < 2000 and answer['prompt_tokens'] > 10
    unlimited = server.chat(model_dir, max_tokens=5, max_seconds=600, messages=poem)
    assert (unlimited['finish_reason'], unlimited['completion_tokens']) == ('length', 5)


def test_sampling_with_a_seed_repeats(server, model_dir):
    sampled = [server.chat(model_dir, max_tokens=16, temperature=1.2, top_p=0.95, seed=seed)['text'] for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1]
    assert sampled[0] != sampled[2]


def test_stop_strings_cut_the_text_in_both_modes(server, model_dir):
    full = server.chat(model_dir, max_tokens=40)['text']
    assert 'Paris' in full
    whole = server.chat(model_dir, max_tokens=40, stop=['Paris', 'unrelated'])
    text, final = server.stream(model_dir, max_tokens=40, stop=['Paris', 'unrelated'])
    assert whole['text'] == text == full[:full.index('Paris')]
    assert whole['finish_reason'] == final['finish_reason'] == 'stop'


def test_adapters_swap_on_one_base_and_the_base_is_unchanged(server, model_dir, adapters):
    base_before = server.chat(model_dir, max_tokens=12)['text']
    first = server.chat(adapters[0], max_tokens=12)['text']
    second = server.chat(adapters[1], max_tokens=12)['text']
    assert first != base_before and second != base_before and first != second
    loaded = server.call('/health')[1]['loaded']
    assert loaded == {'base': os.path.realpath(model_dir), 'adapters': [os.path.realpath(adapters[1])]}  # LRU of 1
    assert server.chat(adapters[0], max_tokens=12)['text'] == first  # evicted, loaded again, same answer
    assert server.chat(model_dir, max_tokens=12)['text'] == base_before


def test_errors_have_their_status(server, model_dir, tmp_path):
    status, answer = server.call('/chat', {'model': str(tmp_path), 'messages': QUESTION})
    assert status == 404 and 'no model folder' in answer['error']
    status, answer = server.call('/chat', {'model': str(tmp_path), 'messages': QUESTION, 'stream': True})
    assert status == 404 and 'no model folder' in answer['error']
    status, answer = server.call('/chat', {'model': model_dir, 'messages': 'hello'})
    assert status == 400 and 'messages' in answer['error']
    status, answer = server.call('/chat', {'model': model_dir, 'messages': [{'role': 'user', 'content': 'hi ' * 9000}]})
    assert status == 400 and 'context' in answer['error']
    assert server.call('/health')[0] == 200  # still serving


def test_sigterm_exits_cleanly_and_removes_its_state_file(server):
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0
    assert not os.path.exists(server.state_file)


# -- the HTTP layer in this process (no model loaded) -------------------------------------------------------
@pytest.fixture
def http_server():
    """A ModelServer in a thread, roots and limits set per test: (server, url, call)."""
    made = []

    def start(**options):
        server = serve.ModelServer(0, **options)
        threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True).start()
        made.append(server)
        url = 'http://127.0.0.1:%d' % server.server_address[1]

        def call(path, body=None, token=server.token):
            data = None if body is None else json.dumps(body).encode()
            request = urllib.request.Request(url + path, data=data,
                                             headers={'Authorization': 'Bearer %s' % token} if token else {})
            try:
                with urllib.request.urlopen(request, timeout=60) as answer:
                    return answer.status, dict(answer.headers), json.loads(answer.read().decode())
            except urllib.error.HTTPError as e:
                return e.code, dict(e.headers), json.loads(e.read().decode())
        return server, call
    yield start
    for server in made:
        server.shutdown()
        server.server_close()


def test_no_allowed_root_serves_nothing_and_a_real_model_outside_them_is_refused(http_server, model_dir, tmp_path):
    server, call = http_server(roots=[str(tmp_path)])
    status, _headers, answer = call('/chat', {'model': model_dir, 'messages': QUESTION})
    assert status == 403 and 'outside' in answer['error']
    assert server.cache.describe()['base'] is None  # refused before anything was loaded
    _server, call = http_server(roots=[])
    assert call('/chat', {'model': model_dir, 'messages': QUESTION})[0] == 403
    status, _headers, health = call('/health')
    assert status == 200 and health['allowed_roots'] == []


def test_over_the_waiting_line_a_request_is_refused_at_once(http_server, monkeypatch, model_dir):
    entered, release = threading.Event(), threading.Event()

    def blocking_entry(cache, path, **kwargs):  # the engine's loop is loading the first one's model
        entered.set()
        assert release.wait(60)
        raise RequestError('released', 400)
    monkeypatch.setattr(serve.ModelCache, 'entry', blocking_entry)
    server, call = http_server(roots=[model_dir], max_waiting=1, max_batch=1)
    answers = []
    body = {'model': model_dir, 'messages': QUESTION}
    first = threading.Thread(target=lambda: answers.append(call('/chat', body)))
    first.start()
    assert entered.wait(60)  # the first one is being started (holds the batch's one row)
    second = threading.Thread(target=lambda: answers.append(call('/chat', body)))
    second.start()
    deadline = time.time() + 60
    while len(server.engine._waiting) < 1:  # the second one waits in the line
        assert time.time() < deadline, 'the second request never reached the waiting line'
        time.sleep(0.01)
    status, headers, answer = call('/chat', body)  # a third: over the line, answered now
    assert status == 503 and 'busy' in answer['error'] and int(headers['Retry-After']) > 0
    release.set()
    first.join(60)
    second.join(60)
    assert not first.is_alive() and not second.is_alive()
    assert [a[0] for a in answers] == [400, 400]  # both were served (here: refused by the fake load)
    assert not server.engine._waiting


def test_a_silent_connection_is_dropped(http_server):
    server, _call = http_server(roots=[], read_timeout=0.5)
    with socket.create_connection(server.server_address, timeout=60) as sock:
        sock.sendall(b'POST /chat HTTP/1.1\r\nHost: x\r\n')  # and never the rest
        assert sock.recv(1024) == b''  # closed by the server, long before our 60 s


def test_the_token_is_written_private(tmp_path):
    path = str(tmp_path / 'server.token')
    serve.write_token(path, 'secret-1')
    serve.write_token(path, 'secret-2')
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open(path) as f:
        assert f.read() == 'secret-2'
