"""The model server (trainer/serve.py): its pure parts alone, then a real server process on a port
the OS chooses, with the real SmolLM2 model and small random LoRA adapters made here."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

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
    def __init__(self, folder):
        self.state_file = os.path.join(folder, 'server.json')
        self.log = open(os.path.join(folder, 'server.log'), 'wb')
        self.process = subprocess.Popen(
            [sys.executable, '-m', 'trainer.serve', '--port', '0', '--state-file', self.state_file,
             '--max-adapters', '1'], cwd=TRAINER_ROOT, env=dict(os.environ, PYTHONPATH=TRAINER_ROOT),
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while not os.path.exists(self.state_file):  # written once the socket listens
            assert self.process.poll() is None and time.time() < deadline, 'server did not start'
            time.sleep(0.1)
        with open(self.state_file) as f:
            self.url = 'http://127.0.0.1:%d' % json.load(f)['port']

    def call(self, path, body=None):
        """(status, parsed body); a streamed answer is a list of its lines."""
        data = None if body is None else json.dumps(body).encode()
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url + path, data=data), timeout=120) as answer:
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
def server(tmp_path_factory):
    server = Server(str(tmp_path_factory.mktemp('serve')))
    yield server
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(30)
    server.log.close()


@pytest.fixture(scope='module')
def adapters(model_dir, tmp_path_factory):
    """Two LoRA adapters with random weights (no training) on the base model, saved as folders."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    folders = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=['q_proj', 'v_proj'],
                                                init_lora_weights=False))
        folder = str(tmp_path_factory.mktemp('adapter%d' % seed))
        model.save_pretrained(folder)
        with open(os.path.join(folder, 'adapter_config.json')) as f:
            assert json.load(f)['base_model_name_or_path'] == model_dir
        folders.append(folder)
    return folders


def test_health_names_the_process(server):
    status, health = server.call('/health')
    assert status == 200
    assert (health['status'], health['pid']) == ('ok', server.process.pid)


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
