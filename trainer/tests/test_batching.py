"""Continuous batching in the model server (trainer/batching.py): one engine on the real SmolLM2
(fp32) and two random LoRA adapters, shared by the module; a few tokens a request."""
import json
import os
import socket
import threading
import time

import pytest

from trainer import serve
from trainer import batching
from trainer.batching import Engine

PROMPTS = ['What is the capital of France?', 'Write a poem about the sea.', 'Name three colours.',
           'Explain what a database index is.']


def request(model, prompt, **options):
    return serve.parse_chat_request(dict({'model': model, 'messages': [{'role': 'user', 'content': prompt}],
                                          'max_tokens': 8}, **options))


def wait_for(condition, what, timeout=60):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, 'never happened: %s' % what
        time.sleep(0.02)


@pytest.fixture(scope='module')
def engine():
    engine = Engine(serve.ModelCache(max_adapters=4), max_batch=16, max_queue=16, idle_unload=0)
    yield engine
    engine.close()


def test_batched_greedy_answers_equal_one_at_a_time_answers_with_two_adapters(engine, model_dir, adapters,
                                                                              monkeypatch):
    models = [model_dir] + adapters
    wave = [request(models[i % 3], PROMPTS[i % 3 if i < 3 else 1], max_tokens=6) for i in range(4)]  # 3 models, 2 prompts
    wave += [request(model_dir, PROMPTS[1], temperature=1.0, seed=seed, max_tokens=4) for seed in (7, 7, 8)]
    late = request(adapters[0], PROMPTS[3], max_tokens=6)
    # One at a time: each request alone in the engine, and the first two (base, adapter) through
    # the old path too (transformers' generate, the adapter switched on the model).
    expected = [engine.whole_answer(r) for r in wave[:4] + [late]]
    assert [serve.whole_answer(engine.cache, r) for r in wave[:2]] == expected[:2]
    assert len(set(a['text'] for a in expected[:3])) == 3  # base and adapters answer differently
    engine.sync()
    engine.stats['max_rows'] = 0
    gate, step = threading.Event(), batching.Batch.step

    def gated_step(batch, clock):  # the first decode step waits until the late request is queued
        assert gate.wait(60)
        step(batch, clock)
    monkeypatch.setattr(batching.Batch, 'step', gated_step)
    with engine._cond:  # the loop waits while nothing is queued: let the wave queue up whole
        tickets = [engine.submit(r) for r in wave]
    answers = [None] * len(tickets)

    def follow(i):
        parts = []
        final = engine.follow(tickets[i], parts.append)
        answers[i] = dict(final, text=''.join(parts))
    threads = [threading.Thread(target=follow, args=(i,)) for i in range(len(tickets))]
    for thread in threads:
        thread.start()
    wait_for(lambda: engine._rows() == len(wave), 'the wave was prefilled')
    late_ticket = [engine.submit(late)]  # arrives while the others decode: joins at the next step
    gate.set()
    for thread in threads:
        thread.join(120)
    late_parts = []
    late_answer = dict(engine.follow(late_ticket[0], late_parts.append), text=''.join(late_parts))

    assert answers[:4] + [late_answer] == expected
    assert engine.stats['max_rows'] == len(wave) + 1  # the late one joined while all the others decoded
    sampled = [a['text'] for a in answers[4:]]
    assert sampled[0] == sampled[1] != sampled[2]  # each row its own generator, seeded by its request
    assert engine.whole_answer(wave[4])['text'] == sampled[0]  # and alone, the same
    engine.sync()
    assert engine.describe()['rows'] == 0


def test_n_samples_of_one_prompt_share_the_batch_each_with_its_seed(engine, model_dir):
    answer = engine.whole_answer(request(model_dir, PROMPTS[1], temperature=1.0, seed=7, max_tokens=4, n=3))
    texts = [choice['text'] for choice in answer['choices']]
    assert texts[0] == answer['text'] and len(set(texts)) == 3  # seeds 7, 8, 9
    assert texts[1] == engine.whole_answer(request(model_dir, PROMPTS[1], temperature=1.0, seed=8, max_tokens=4))['text']
    assert answer['completion_tokens'] == sum(choice['completion_tokens'] for choice in answer['choices'])
    with pytest.raises(serve.RequestError):
        request(model_dir, PROMPTS[1], n=2, stream=True)


def test_a_client_that_goes_away_frees_its_row(engine, model_dir):
    server = serve.ModelServer(0, roots=[model_dir])
    server.engine.close()
    server.engine, server.cache = engine, engine.cache  # the module's loaded model
    threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True).start()
    try:
        engine.sync()  # the loop counts a finished row after its caller hears 'done': let the last test's land
        before = dict(engine.stats)
        body = json.dumps({'model': model_dir, 'max_tokens': 2000, 'stream': True,
                           'messages': [{'role': 'user', 'content': 'Count from 1 to 1000, separated by commas.'}]})
        sock = socket.create_connection(server.server_address, timeout=60)
        sock.sendall(('POST /chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n'
                      'Content-Length: %d\r\n\r\n%s' % (server.token, len(body), body)).encode())
        received = b''
        while b'"delta"' not in received:  # it is decoding
            received += sock.recv(4096)
        sock.close()
        wait_for(lambda: engine.stats['cancelled'] == before['cancelled'] + 1, 'the row was dropped')
        wait_for(lambda: engine.describe()['rows'] == 0, 'the batch emptied')
        assert engine.stats['finished'] == before['finished']  # it never ran to its end
    finally:
        server.shutdown()
        socket.socket.close(server.socket)


def test_two_models_stay_loaded_within_the_memory_bound(model_dir, tmp_path):
    other = tmp_path / 'other-base'  # a second base: the same files under another folder
    other.mkdir()
    for name in os.listdir(model_dir):
        os.symlink(os.path.join(model_dir, name), str(other / name))
    roomy = serve.ModelCache(max_memory_mb=1200)
    for path in (model_dir, str(other), model_dir):
        roomy.entry(path)
    assert [m['base'] for m in roomy.models] == [str(other), os.path.realpath(model_dir)] and roomy.loads == 2

    tight = serve.ModelCache(max_memory_mb=700)  # room for one of them
    tight.entry(model_dir)
    assert tight.entry(str(other), busy={os.path.realpath(model_dir)}) == (None, None, None)  # waits its turn
    tight.entry(str(other))
    assert [m['base'] for m in tight.models] == [str(other)]
    assert 'memory bound 700 MB' in tight.unloaded[-1]['reason']


def test_an_idle_model_is_unloaded_said_in_health_and_reloaded(engine, model_dir):
    server = serve.ModelServer(0, roots=[model_dir])
    server.engine.close()
    server.engine, server.cache = engine, engine.cache
    threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True).start()

    def health():
        import urllib.request
        call = urllib.request.Request('http://127.0.0.1:%d/health' % server.server_address[1],
                                      headers={'Authorization': 'Bearer %s' % server.token})
        with urllib.request.urlopen(call, timeout=60) as answer:
            return json.loads(answer.read().decode())
    try:
        first = engine.whole_answer(request(model_dir, PROMPTS[0], max_tokens=3))
        loads = engine.cache.loads
        assert [m['base'] for m in health()['models']] == [os.path.realpath(model_dir)]
        engine.idle_unload = 0.2
        engine.sync()  # the loop reads the new idle time
        wait_for(lambda: not engine.cache.entries, 'the idle model was unloaded')
        engine.idle_unload = 0
        answer = health()
        assert answer['models'] == [] and answer['loaded']['base'] is None
        assert answer['unloaded'][-1]['base'] == os.path.realpath(model_dir)
        assert answer['unloaded'][-1]['reason'].startswith('idle')
        assert engine.whole_answer(request(model_dir, PROMPTS[0], max_tokens=3)) == first  # loaded again
        assert engine.cache.loads == loads + 1
    finally:
        engine.idle_unload = 0
        server.shutdown()
        socket.socket.close(server.socket)
