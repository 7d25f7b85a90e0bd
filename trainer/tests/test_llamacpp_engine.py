"""The llama.cpp engine of the model server (trainer/llamacpp_engine.py) against the transformers
answers, and the choice between the two engines. One engine (one GGUF cache) for the module."""
import os
import queue
import sys
import threading

import pytest

from trainer import serve
from trainer.batching import Engine, Ticket
from trainer.llamacpp_engine import EngineChoice, GgufFiles, LlamaCppEngine
from trainer.serve import RequestError

PROMPTS = ['What is the capital of France?', 'Why is the sky blue?']
N = 12  # tokens compared: f16 (llama.cpp) and fp32 (transformers) agree on these prompts, greedy


def request(model, prompt, **options):
    return serve.parse_chat_request(dict({'model': model, 'messages': [{'role': 'user', 'content': prompt}],
                                          'max_tokens': N}, **options))


@pytest.fixture(scope='module')
def files(model_dir, adapters, tmp_path_factory):
    """The GGUFs of the base and both adapters, converted side by side (llama.cpp's converters); the
    base's from the cache the server uses too (converted once for every run, as the server does)."""
    files = GgufFiles(str(tmp_path_factory.mktemp('gguf')))

    def base():
        shared = GgufFiles().base(model_dir)
        os.symlink(shared, os.path.join(files.folder, os.path.basename(shared)))
    jobs = [base] + [lambda a=a: files.adapter(a, model_dir) for a in adapters]
    threads = [threading.Thread(target=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return files


@pytest.fixture(scope='module')
def llama(files, model_dir):
    engine = LlamaCppEngine(files, max_batch=2, max_queue=4, threads=2)  # 2 to share, whatever this host has
    yield engine
    engine.close()


@pytest.fixture(scope='module')
def reference(model_dir):
    """transformers' fp32 greedy answers (one at a time, its generate), by (model, prompt)."""
    import torch
    cache = serve.ModelCache(dtype=torch.float32)
    answers = {}

    def answer(model, prompt):
        if (model, prompt) not in answers:
            answers[(model, prompt)] = serve.whole_answer(cache, request(model, prompt))['text']
        return answers[(model, prompt)]
    answer.cache = cache
    return answer


def test_greedy_answers_on_the_base_in_f16_equal_transformers_fp32(llama, reference, model_dir):
    cached = llama.stats['prompt_cached']
    for prompt in PROMPTS:
        answer = llama.whole_answer(request(model_dir, prompt))
        assert answer['text'] == reference(model_dir, prompt), prompt
        assert answer['prompt_tokens'] > 10 and 1 <= answer['completion_tokens'] <= N
    # the second prompt starts as the first (the chat template's system prompt): its slot kept those
    # keys and prefilled only the rest, and the answer is still the transformers one
    assert llama.stats['prompt_cached'] - cached > 10


def follow(engine, tickets):
    texts = []
    for ticket in tickets:
        parts = []
        engine.follow(ticket, parts.append)
        texts.append(''.join(parts))
    return texts


def servers(engine):
    return [(m['base'], m['adapters']) for m in engine.describe()['models']]


def test_two_adapters_decode_at_once_each_on_its_own_server_as_alone(llama, reference, model_dir, adapters):
    alone = [llama.whole_answer(request(adapter, PROMPTS[1]))['text'] for adapter in adapters]  # each starts its server
    assert alone == [reference(adapter, PROMPTS[1]) for adapter in adapters]
    assert reference(model_dir, PROMPTS[1]) not in alone and alone[0] != alone[1]
    llama.stats['max_servers_busy'] = 0
    with llama._cond:  # both in the line before the engine looks: admitted together
        tickets = [llama.submit(request(adapter, PROMPTS[1])) for adapter in adapters]
    assert follow(llama, tickets) == alone
    # both decoding at once, on two servers (one server runs one adapter's rows, then the other's),
    # sharing the cores
    assert llama.stats['max_servers_busy'] == 2 and llama.stats['max_running'] == 2
    assert [m['threads'] for m in llama.describe()['models'] if m['adapters']] == [1, 1]
    # the base unchanged, on a server of its own
    assert llama.whole_answer(request(model_dir, PROMPTS[1]))['text'] == reference(model_dir, PROMPTS[1])
    base = os.path.realpath(model_dir)
    assert sorted(servers(llama)) == sorted([(base, [])] + [(base, [os.path.realpath(a)]) for a in adapters])


def widths(engine):
    """(adapter, threads) of the current servers, and of the spare ones."""
    state = engine.describe()
    return [sorted((os.path.basename(m['adapters'][0]) if m['adapters'] else 'base', m['threads']) for m in state[kind])
            for kind in ('models', 'spares')]


class Gate(queue.Queue):
    """A ticket's events whose first put waits until the test opens it: the request's stream
    stops after its first token."""

    def __init__(self):
        queue.Queue.__init__(self)
        self.reached, self.open = threading.Event(), threading.Event()

    def put(self, item, *args, **kwargs):
        if not self.reached.is_set():
            self.reached.set()
            self.open.wait(120)
        queue.Queue.put(self, item, *args, **kwargs)


def test_busy_servers_share_the_cores_and_their_requests_move(files, reference, model_dir, adapters):
    """Two threads to share (whatever this host has): a server alone gets both, two busy servers one
    each; a busy server is replaced by a narrower one and its requests move there (answered as
    alone, a streaming one going on from its tokens); a server gets its width back at its next
    request, its requests moving if it is busy; the servers swapped out are kept and taken again,
    not restarted; the servers alive hold at most cores - 1 OpenMP workers."""
    now = [0.0]
    engine = LlamaCppEngine(files, max_batch=4, max_queue=4, threads=2, clock=lambda: now[0])
    one, two = [os.path.basename(a) for a in adapters]
    gates = [Gate(), Gate(), Gate()]
    try:
        # admitted together: the first starts on 2 threads, then moves to a 1-thread server once
        # the second's has started (held after its first token meanwhile: it cannot end first)
        with engine._cond:
            tickets = [engine.submit(request(adapter, PROMPTS[1])) for adapter in adapters]
            tickets[0].events = gates[0]
            assert engine._cond.wait_for(lambda: engine.stats['narrowed'] == 1, 120)
        gates[0].open.set()
        assert follow(engine, tickets) == [reference(adapter, PROMPTS[1]) for adapter in adapters]
        assert (engine.stats['narrowed'], engine.stats['moved'], engine.stats['starts']) == (1, 1, 3)
        assert widths(engine) == [[(one, 1), (two, 1)], [(one, 2)]]

        # alone again: the first adapter's server gets both threads back at its next request
        assert engine.whole_answer(request(adapters[0], PROMPTS[1]))['text'] == reference(adapters[0], PROMPTS[1])
        assert widths(engine) == [[(one, 2), (two, 1)], [(one, 1)]]
        assert engine.describe()['rows'] == 0  # not busy once its caller has the answer: the next one sees the cores free

        # streaming when the second adapter's request comes: it moves too, to a 1-thread server, and
        # goes on from the token ids it had streamed: its answer is the one it has alone
        gate = gates[1]
        with engine._cond:
            streaming = engine.submit(request(adapters[0], PROMPTS[0]))
            streaming.events = gate
        assert gate.reached.wait(120)  # its first token streamed, the next waits
        with engine._cond:
            tickets = [engine.submit(request(adapter, PROMPTS[1])) for adapter in (adapters[1], adapters[0])]
            assert engine._cond.wait_for(lambda: engine.stats['narrowed'] == 2, 120)
        gate.open.set()
        assert follow(engine, tickets) == [reference(adapters[1], PROMPTS[1]), reference(adapters[0], PROMPTS[1])]
        parts = []
        final = engine.follow(streaming, parts.append)
        assert ''.join(parts) == reference(adapters[0], PROMPTS[0]) and final['completion_tokens'] == N
        assert (engine.stats['narrowed'], engine.stats['moved'], engine.stats['starts']) == (2, 2, 3)
        assert widths(engine) == [[(one, 1), (two, 1)], [(one, 2)]]

        # at most one 2-thread server alive on 2 cores (libgomp): the second adapter alone takes
        # the spare's threads; then the first alone waits for them until that server has been idle
        # keep_threads_for seconds
        assert engine.whole_answer(request(adapters[1], PROMPTS[1]))['text'] == reference(adapters[1], PROMPTS[1])
        assert widths(engine) == [[(one, 1), (two, 2)], [(two, 1)]] and engine.stats['starts'] == 4
        assert engine.whole_answer(request(adapters[0], PROMPTS[1]))['text'] == reference(adapters[0], PROMPTS[1])
        assert widths(engine) == [[(one, 1), (two, 2)], [(two, 1)]] and engine.stats['starts'] == 4
        now[0] += engine.keep_threads_for
        assert engine.whole_answer(request(adapters[0], PROMPTS[1]))['text'] == reference(adapters[0], PROMPTS[1])
        assert widths(engine) == [[(one, 2)], [(one, 1)]] and engine.stats['starts'] == 5
        assert engine.unloaded[-1]['reason'] == 'its threads for %s' % one

        # busy on 1 thread once the other adapter's request ended: its next request widens it (once
        # the other has been idle keep_threads_for), its streaming request moving with it
        gate = gates[2]
        with engine._cond:
            streaming = engine.submit(request(adapters[0], PROMPTS[0]))
            streaming.events = gate
            other = engine.submit(request(adapters[1], PROMPTS[1]))
        assert gate.reached.wait(120)
        assert follow(engine, [other]) == [reference(adapters[1], PROMPTS[1])]
        assert widths(engine) == [[(one, 1), (two, 1)], [(one, 2)]]
        now[0] += engine.keep_threads_for
        with engine._cond:
            tickets = [engine.submit(request(adapters[0], PROMPTS[1]))]
            assert engine._cond.wait_for(lambda: engine.stats['widened'] == 1, 120)
        gate.open.set()
        assert follow(engine, [streaming] + tickets) == [reference(adapters[0], PROMPTS[0]), reference(adapters[0], PROMPTS[1])]
        assert widths(engine) == [[(one, 2), (two, 1)], [(one, 1)]] and engine.stats['starts'] == 6
    finally:
        for gate in gates:  # a failed assertion leaves no request waiting on its gate
            gate.open.set()
        engine.close()


def test_a_moved_request_goes_on_from_the_ids_of_its_streamed_pieces(llama, model_dir):
    """The ids a moved request is prefilled with: one a piece where each piece is one token's text
    (as llama.cpp streams them), even where the text tokenized again would give other ids; else
    the whole text tokenized (a character split over tokens comes as one piece)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ticket = serve_ticket(model_dir)
    # the model may well decode " wat" then "er": those are its ids, not " water" tokenized again
    pieces = ['The', ' wat', 'er', ' cycle', '']  # the end of turn streams as an empty piece
    ids = [i for piece in pieces[:-1] for i in tokenizer.encode(piece, add_special_tokens=False)]
    assert len(ids) == 4 and ids != tokenizer.encode('The water cycle', add_special_tokens=False)
    assert llama._streamed_ids(ticket, {'pieces': pieces}) == ids
    # a character of three byte tokens comes whole with the last of them: not one id a piece
    pieces = ['Rain', ' in', ' 菱']
    assert len(tokenizer.encode(' 菱', add_special_tokens=False)) > 1
    assert llama._streamed_ids(ticket, {'pieces': pieces}) == tokenizer.encode('Rain in 菱', add_special_tokens=False)


def serve_ticket(model):
    """A ticket as the engine holds it once checked (its `prepared`), not admitted."""
    ticket = Ticket(request(model, PROMPTS[0]))
    ticket.prepared = (os.path.realpath(model), None, None)
    return ticket


def test_adapter_servers_bounded_and_each_unloaded_when_idle(files, reference, model_dir, adapters):
    now = [0.0]
    # one thread each: the servers' widths (the test above) do not come into it
    engine = LlamaCppEngine(files, max_batch=1, max_queue=2, max_adapters=1, idle_unload=150, threads=1,
                            clock=lambda: now[0])
    base, (one, two) = os.path.realpath(model_dir), [os.path.realpath(a) for a in adapters]
    try:
        engine.whole_answer(request(adapters[0], PROMPTS[1], max_tokens=2))
        now[0] = 100
        engine.whole_answer(request(model_dir, PROMPTS[1], max_tokens=2))
        now[0] = 140  # the first adapter's server idle 140 s, under idle_unload
        engine.whole_answer(request(adapters[1], PROMPTS[1], max_tokens=2))  # max_adapters 1: the idle one makes room
        assert servers(engine) == [(base, []), (base, [two])]
        assert (engine.unloaded[-1]['adapter'], engine.unloaded[-1]['reason']) == (one, 'room for %s (max_adapters 1)'
                                                                                   % os.path.basename(two))
        now[0] = 260
        with engine._cond:  # the base's server idle 160 s, the adapter's 120 s: only the base's goes
            engine._cond.notify_all()
            assert engine._cond.wait_for(lambda: len(engine.served) == 1, 60), 'the idle server stayed'
        assert servers(engine) == [(base, [two])] and engine.unloaded[-1]['reason'] == 'idle for 160 s'
        # the bound under load: the other adapter's request waits until the running one ends, then takes its room
        with engine._cond:
            tickets = [engine.submit(request(adapter, PROMPTS[1])) for adapter in (adapters[1], adapters[0])]
        assert follow(engine, tickets) == [reference(adapters[1], PROMPTS[1]), reference(adapters[0], PROMPTS[1])]
        assert servers(engine) == [(base, [one])] and engine.stats['max_servers_busy'] == 1
        # no memory bound set: one base's servers while they fit its share of the host's memory
        assert engine.spare_memory > 0, 'measured on this host'
        engine.spare_memory = engine._memory() + 1  # what runs now and not one more KV cache
        engine.whole_answer(request(model_dir, PROMPTS[1], max_tokens=2))
        assert servers(engine) == [(base, [])] and engine.unloaded[-1]['reason'] == 'room for %s' % base
    finally:
        engine.close()


def test_stop_strings_and_a_caller_that_goes_away(llama, reference, model_dir):
    full = reference(model_dir, PROMPTS[1])
    cut = full.split()[3]
    answer = llama.whole_answer(request(model_dir, PROMPTS[1], stop=[cut]))
    assert (answer['text'], answer['finish_reason']) == (full[:full.index(cut)], 'stop')

    class Gone(Exception):
        pass

    def emit(delta):
        raise Gone()
    # nothing runs now (a request stops counting before its caller hears 'done'): the counts before
    with llama._cond:
        assert llama._cond.wait_for(lambda: not llama._running, 60), 'the last request never ended'
        before, before_finished = llama.stats['cancelled'], llama.stats['finished']
    with pytest.raises(Gone):
        llama.chat(request(model_dir, PROMPTS[0], max_tokens=200), emit)
    with llama._cond:  # dropped at its next token, its thread ended long before 200 tokens
        assert llama._cond.wait_for(lambda: llama.stats['cancelled'] > before and not llama._running, 60), \
            'the request was not dropped'
        assert llama.stats['finished'] == before_finished + 1


@pytest.fixture
def broken_converter(tmp_path):
    """llama.cpp's converter as it answers a model architecture it does not know."""
    folder = tmp_path / 'convert'
    folder.mkdir()
    (folder / 'convert_hf_to_gguf.py').write_text(
        'import sys\nprint("ERROR:hf-to-gguf:Model FooForCausalLM is not supported")\nsys.exit(1)\n')
    return str(folder)


def test_the_setting_picks_the_engine(llama, reference, model_dir, broken_converter, tmp_path):
    transformers = Engine(reference.cache)
    try:
        forced = EngineChoice('transformers', transformers, llama, on_cuda=False)
        before = dict(llama.stats)
        answer = forced.whole_answer(request(model_dir, PROMPTS[0], max_tokens=3))
        transformers.sync()  # the loop counts a row after its last token is sent
        assert answer['completion_tokens'] == 3 and transformers.stats['finished'] == 1
        assert llama.stats == before  # llama.cpp never saw it
        assert forced.describe()['setting'] == 'transformers'

        assert EngineChoice('auto', transformers, llama, on_cuda=False).engine_for(request(model_dir, 'x'))[0] is llama
        assert EngineChoice('auto', transformers, llama, on_cuda=True).engine_for(request(model_dir, 'x'))[0] \
            is transformers  # CUDA: transformers batches on the GPU
        long = request(model_dir, 'word ' * 4200)  # over llama.cpp's slot, within the model's context
        assert EngineChoice('auto', transformers, llama, on_cuda=False).engine_for(long)[0] is transformers

        unconvertible = LlamaCppEngine(GgufFiles(str(tmp_path / 'gguf'), broken_converter), roots=None)
        engine, why = EngineChoice('auto', transformers, unconvertible, on_cuda=False).engine_for(request(model_dir, 'x'))
        assert engine is transformers and 'not supported' in why
        with pytest.raises(RequestError) as refused:
            EngineChoice('llamacpp', transformers, unconvertible, on_cuda=False).submit(request(model_dir, 'x'))
        assert 'cannot serve' in str(refused.value) and 'not supported' in str(refused.value)
        with pytest.raises(ValueError):
            EngineChoice('vllm', transformers, llama)
    finally:
        transformers.close()
    assert serve.make_parser().parse_args([]).engine == 'auto'  # the server's default


def test_the_server_streams_with_llamacpp_under_auto_and_says_so_in_health(files, reference, model_dir):
    import json
    import urllib.request
    server = serve.ModelServer(0, roots=[model_dir], engine='auto', gguf_cache=files.folder)
    server.engine.on_cuda = False
    threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True).start()

    def call(path, body=None):
        data = None if body is None else json.dumps(body).encode()
        with urllib.request.urlopen(urllib.request.Request(
                'http://127.0.0.1:%d%s' % (server.server_address[1], path), data=data,
                headers={'Authorization': 'Bearer %s' % server.token}), timeout=120) as answer:
            return [json.loads(line) for line in answer.read().decode().splitlines()]
    try:
        lines = call('/chat', {'model': model_dir, 'messages': [{'role': 'user', 'content': PROMPTS[0]}],
                               'max_tokens': N, 'stream': True})
        assert ''.join(line.get('delta', '') for line in lines) == reference(model_dir, PROMPTS[0])
        engine = call('/health')[0]['engine']
        assert engine['setting'] == 'auto' and engine['stats']['finished'] == 0  # transformers did nothing
        assert [m['base'] for m in engine['llamacpp']['models']] == [os.path.realpath(model_dir)]
    finally:
        server.shutdown()
        server.server_close()


if __name__ == '__main__':
    sys.exit(pytest.main([__file__, '-q']))

