"""Serving many chats at once: the batching engine (trainer/batching.py) against today's one-at-a-time
path, and llama.cpp's server (xllamacpp, in-process) as the anchor of what CPU serving reaches.

    python -m bench.bench_serving [--concurrency 1,4,8,16] [--max-tokens 64] [--repeats 2] [--gguf FILE]
                                  [--no-llamacpp] [--no-llamacpp-engine] [--no-adapters] [--no-bf16]
                                  (trainer venv; scripts/bench.sh)

Same model (SmolLM2-135M-Instruct, fp32), same prompts (one per chat), greedy, `--max-tokens` new
tokens at most. For each concurrency, in turn and `--repeats` times (interleaved): N threads start
together and stream their chats
- one at a time: a lock around `serve.run_chat` (transformers' generate), what the server did before;
- batched: `Engine.chat`, the rows decoding together (transformers);
- llama.cpp engine: our server's llama.cpp engine (trainer/llamacpp_engine.py, the base as GGUF
  f16 converted by it, streamed through the same seam), what `auto` serves with on a CPU;
- llama.cpp 8 slots: llama.cpp's own server (its chat template, its defaults) on the same GGUF
  file, 8 parallel slots, streamed: the anchor of what CPU serving reaches.
It prints aggregate tokens/s (every completion token over the wave's wall time) and first-token
p50/p95 (from the wave's start), the best of the repeats, and the ratios.
Then: single stream, our llama.cpp engine against llama.cpp's server, alternating over 4 prompts
and the repeats: decode tokens/s measured alike on both (from a chat's first streamed token to its
last; median), with the prompt, and llama.cpp's own timing; a mixed batch of two LoRA adapters
(random weights) against a batch of one adapter (aggregate tokens/s), on the transformers engine
and on our llama.cpp engine, all chats at once and staggered (the second half comes once the first
streams: the other adapter's, or the same one's); in bf16, how many greedy answers of a batch
differ from the same prompts one at a time (near-ties that flip). In-process (no HTTP): the HTTP layer costs the same
on both sides. The CPU and its flags come first.
"""
import argparse
import json
import os
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.bench_training import MODEL_DIR, machine_report  # noqa: E402

PROMPTS = [
    'Write a short story about a robot who learns to paint.', 'Explain how a bicycle stays upright.',
    'What are the main causes of inflation?', 'Describe the water cycle for a child.',
    'Give three tips for writing clear emails.', 'Why is the sky blue?', 'Summarise the plot of Hamlet.',
    'How does a refrigerator keep food cold?', 'Write a haiku about autumn leaves.',
    'What is the difference between a virus and a bacterium?', 'Explain recursion with an example.',
    'List the planets of the solar system.', 'How do I make a good cup of tea?',
    'What is a database index and why use one?', 'Describe a sunset over the sea.',
    'Why do cats purr?',
]


def chat_request(model, prompt, max_tokens, **options):
    from trainer import serve
    return serve.parse_chat_request(dict({'model': model, 'messages': [{'role': 'user', 'content': prompt}],
                                          'max_tokens': max_tokens}, **options))


def wave(call, requests, decode=None, stagger=None):
    """Run `call(request, emit)` for every request in its own thread, all started together:
    (wall seconds, total completion tokens, first-token seconds from the start, texts). `decode`,
    a list, gets each chat's decode rate: tokens after the first over the time from its first
    streamed token to its last (the same measure for every side). `stagger` k: the requests from
    the k-th on start once one before them has streamed a token (chats that come while others
    stream)."""
    start, streaming = threading.Event(), threading.Event()
    first_part = len(requests) if stagger is None else stagger
    firsts, tokens, texts = [None] * len(requests), [0] * len(requests), [None] * len(requests)
    lasts = [None] * len(requests)
    began, errors = [], []

    def one(i):
        parts = []

        def emit(delta):
            now = time.perf_counter() - began[0]
            if firsts[i] is None:
                firsts[i] = now
                if i < first_part:
                    streaming.set()
            lasts[i] = now
            parts.append(delta)
        (start if i < first_part else streaming).wait()
        try:
            final = call(requests[i], emit)
        except Exception as e:  # said by the wave, not lost in its thread
            errors.append(e)
            return
        finally:
            if i < first_part:
                streaming.set()  # the rest never waits for a chat that failed
        tokens[i] = final['completion_tokens']
        texts[i] = ''.join(parts)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    began.append(time.perf_counter())
    start.set()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    if decode is not None:
        decode.extend((n - 1) / (last - first) for n, first, last in zip(tokens, firsts, lasts)
                      if n > 1 and first is not None and last > first)
    return time.perf_counter() - began[0], sum(tokens), [f for f in firsts if f is not None], texts


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float('nan')


def make_adapters(folder):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(MODEL_DIR),
                               LoraConfig(r=16, lora_alpha=32, target_modules='all-linear', init_lora_weights=False))
        for name, param in model.named_parameters():  # small deltas: the adapted model still talks
            if 'lora_B' in name:
                param.data.mul_(0.01)
        path = os.path.join(folder, 'adapter%d' % seed)
        model.save_pretrained(path)
        paths.append(path)
    return paths


def gguf_file(given):
    """The model as GGUF f16: the file our llama.cpp engine serves (its cache, converted by
    llama.cpp's converter once), so both llama.cpp lines run the same file."""
    if given:
        return given
    from trainer.llamacpp_engine import GgufFiles
    return GgufFiles().base(MODEL_DIR)


def engine_files(work, gguf):
    """Our llama.cpp engine's GGUF cache for this run: the base linked from `gguf`, the bench's
    adapters converted into `work` (not left in the shared cache)."""
    from trainer.llamacpp_engine import GgufFiles
    files = GgufFiles(os.path.join(work, 'gguf'))
    os.makedirs(files.folder)
    os.symlink(gguf, files.path('base', MODEL_DIR))
    return files


def median(values):
    return percentile(values, 0.5)


class LlamaCpp(object):
    """llama.cpp's server in-process (xllamacpp): `slots` parallel sequences, continuous batching,
    its defaults otherwise (its chat template, its prompt cache), streamed."""

    def __init__(self, gguf, slots):
        import xllamacpp as xlc
        from trainer.precision import available_cores
        params = xlc.CommonParams()
        params.model.path = gguf
        params.n_parallel = slots
        params.cont_batching = True
        params.n_ctx = 1024 * slots
        params.cpuparams.n_threads = available_cores()
        params.cpuparams_batch.n_threads = available_cores()
        params.verbosity = -1  # as our engine's: no log line per request
        self.server = xlc.Server(params)
        self.timings = []  # llama.cpp's own, one per chat

    def chat(self, request, emit):
        state = {'tokens': 0, 'timings': None, 'error': None}

        def on_chunk(chunk):
            if isinstance(chunk, str):
                chunk = json.loads(chunk)
            if 'error' in chunk:
                state['error'] = chunk['error']
                return True
            for choice in chunk.get('choices') or []:
                text = (choice.get('delta') or {}).get('content')
                if text:
                    state['tokens'] += 1
                    emit(text)
            state['timings'] = chunk.get('timings') or state['timings']
            return False
        self.server.handle_chat_completions({'messages': request['messages'], 'max_tokens': request['max_tokens'],
                                             'temperature': 0.0, 'top_k': 1, 'stream': True}, on_chunk)
        if state['error'] is not None:
            raise RuntimeError(state['error'])
        timings = state['timings'] or {}
        self.timings.append(timings)
        return {'completion_tokens': timings.get('predicted_n', state['tokens']), 'timings': timings}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--concurrency', default='1,4,8,16')
    parser.add_argument('--max-tokens', type=int, default=64)
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--gguf', help='the model as GGUF f16 (default: our llama.cpp engine\'s, converted once by '
                        'llama.cpp\'s converter)')
    parser.add_argument('--no-llamacpp', action='store_true')
    parser.add_argument('--no-llamacpp-engine', action='store_true', help='leave out our llama.cpp engine\'s line')
    parser.add_argument('--no-adapters', action='store_true')
    parser.add_argument('--no-bf16', action='store_true')
    args = parser.parse_args(argv)
    import torch
    from trainer import serve
    from trainer.batching import Engine
    for line in machine_report():
        print(line)
    levels = [int(n) for n in args.concurrency.split(',')]
    print('model %s fp32, greedy, max_tokens %d, concurrency %s, torch threads %d'
          % (os.path.basename(MODEL_DIR), args.max_tokens, levels, torch.get_num_threads()))
    prompts = (PROMPTS * (max(levels) // len(PROMPTS) + 1))[:max(levels)]

    work = tempfile.mkdtemp(prefix='bench-serving-')
    gguf = None
    if not (args.no_llamacpp and args.no_llamacpp_engine):
        try:
            gguf = gguf_file(args.gguf)
        except Exception as e:  # no converter here: say so, the rest stands
            print('llama.cpp: no GGUF f16 of the model (%s): its lines left out' % e)
    old_cache, lock = serve.ModelCache(), threading.Lock()

    def one_at_a_time(request, emit):
        with lock:
            return serve.run_chat(old_cache, request, emit)
    engine = Engine(serve.ModelCache(), max_batch=max(levels), max_queue=max(levels))
    sides = [('one at a time', one_at_a_time), ('batched', engine.chat)]
    llama_engine = None
    if not args.no_llamacpp_engine and gguf:
        from trainer.llamacpp_engine import LlamaCppEngine
        llama_engine = LlamaCppEngine(engine_files(work, gguf), max_batch=max(levels), max_queue=max(levels))
        sides.append(('llama.cpp engine', llama_engine.chat))
    llama = None
    if not args.no_llamacpp and gguf:  # the anchor, in the same waves (interleaved)
        llama = LlamaCpp(gguf, slots=8)
        sides.append(('llama.cpp 8 slots', llama.chat))
    for _name, call in sides:  # load and warm each
        wave(call, [chat_request(MODEL_DIR, PROMPTS[0], 4)])
    results = {}
    for n in levels:
        requests = [chat_request(MODEL_DIR, p, args.max_tokens) for p in prompts[:n]]
        for repeat in range(args.repeats):
            for name, call in sides:
                wall, tokens, firsts, texts = wave(call, requests)
                results.setdefault((n, name), []).append((tokens / wall, percentile(firsts, 0.5),
                                                          percentile(firsts, 0.95), texts))
        best = {name: max(results[(n, name)], key=lambda r: r[0]) for name, _call in sides}
        same = sum(a == b for a, b in zip(best['one at a time'][3], best['batched'][3]))
        for name, _call in sides:
            rate, p50, p95, _texts = best[name]
            print('%2d concurrent, %-17s: %6.1f tokens/s in all, first token p50 %.2f s p95 %.2f s'
                  % (n, name, rate, p50, p95))
        print('%2d concurrent: batched/one at a time %.2fx tokens/s; greedy texts equal %d of %d'
              % (n, best['batched'][0] / best['one at a time'][0], same, n))
        if llama_engine is not None:
            ours = best['llama.cpp engine']
            print('%2d concurrent: llama.cpp engine/batched %.2fx tokens/s; its greedy texts (f16) equal the fp32 ones '
                  '%d of %d' % (n, ours[0] / best['batched'][0],
                                sum(a == b for a, b in zip(best['one at a time'][3], ours[3])), n))
    one_stream = max(r[0] for r in results[(levels[0], 'one at a time')])
    if 8 in levels:  # the goals, on the figures at 8 concurrent
        at8 = {name: max(r[0] for r in results[(8, name)]) for name, _call in sides}
        for name in ('batched', 'llama.cpp engine'):
            if name in at8:
                line = 'goal at 8 concurrent, %s: %.1f tokens/s = %.2fx today\'s one stream (%.1f; goal >= 4x)' % (
                    name, at8[name], at8[name] / one_stream, one_stream)
                if 'llama.cpp 8 slots' in at8:
                    line += '; %.2fx llama.cpp\'s server with 8 slots (%.1f; goal >= 1x)' % (
                        at8[name] / at8['llama.cpp 8 slots'], at8['llama.cpp 8 slots'])
                print(line)
    old_cache.entries.clear()

    if llama is not None and llama_engine is not None:
        # One stream at a time, both streamed and timed alike, interleaved over prompts and repeats.
        sides = (('llama.cpp engine', llama_engine.chat), ('llama.cpp server', llama.chat))
        decode = {name: [] for name, _call in sides}
        rates = {name: [] for name, _call in sides}
        firsts = {name: [] for name, _call in sides}
        del llama.timings[:]
        for _repeat in range(args.repeats):
            for prompt in PROMPTS[:4]:
                for name, call in sides:
                    wall, tokens, first, _texts = wave(call, [chat_request(MODEL_DIR, prompt, args.max_tokens)],
                                                       decode[name])
                    rates[name].append(tokens / wall)
                    firsts[name].extend(first)
        own = llama.timings
        for name, _call in sides:
            print('single stream, %-16s: decode %.1f tokens/s (median of %d chats; from its first streamed token to '
                  'its last), %.1f with the prompt, first token p50 %.3f s'
                  % (name, median(decode[name]), len(decode[name]), median(rates[name]), median(firsts[name])))
        print('single stream, llama.cpp server by its own timing: decode %.1f tokens/s, prompt %.0f ms (%d of its '
              'tokens from its cache)' % (median([t['predicted_per_second'] for t in own]),
                                           median([t['prompt_ms'] for t in own]), median([t.get('cache_n', 0) for t in own])))
        print('single stream decode: our llama.cpp engine/llama.cpp\'s server %.2fx (goal >= 0.8x); with the prompt '
              '%.2fx' % (median(decode['llama.cpp engine']) / median(decode['llama.cpp server']),
                         median(rates['llama.cpp engine']) / median(rates['llama.cpp server'])))

    # The anchor goes before the adapters' lines: its OpenMP worker would count in libgomp's budget
    # of the process (trainer/llamacpp_engine.py, LlamaCppEngine._fit) and slow the engine's servers.
    sides = llama = None  # (sides holds its chat method)
    n = min(8, max(levels))
    if not args.no_adapters:
        adapters = make_adapters(work)
        engine.cache.max_adapters = 4
        single = [chat_request(adapters[0], p, args.max_tokens) for p in prompts[:n]]
        mixed = [chat_request(adapters[i % 2], p, args.max_tokens) for i, p in enumerate(prompts[:n])]
        # staggered: the first half's chats (the first adapter's) stream when the second half's come
        # (the same adapter, or the other one): the llama.cpp engine then moves streaming chats
        half = [chat_request(adapters[i * 2 // n], p, args.max_tokens) for i, p in enumerate(prompts[:n])]
        waves = [('one adapter', single, None), ('two adapters', mixed, None)]
        hows = ['', ', staggered'] if n > 1 else ['']
        if n > 1:
            waves += [('one adapter, staggered', single, n // 2), ('two adapters, staggered', half, n // 2)]
        for name, side in (('transformers batched', engine), ('llama.cpp engine', llama_engine)):
            if side is None:
                continue
            try:
                wave(side.chat, [chat_request(a, PROMPTS[0], 2) for a in adapters])  # loaded (llama.cpp: converted)
            except Exception as e:  # e.g. no converters here: say so, the rest stands
                print('%d concurrent on LoRA adapters, %s: line left out (%s)' % (n, name, e))
                continue
            rates = dict((kind, []) for kind, _requests, _stagger in waves)
            for repeat in range(args.repeats):
                for kind, requests, stagger in waves:
                    wall, tokens, _firsts, _texts = wave(side.chat, requests, stagger=stagger)
                    rates[kind].append(tokens / wall)
            for how in hows:
                one, two = max(rates['one adapter' + how]), max(rates['two adapters' + how])
                print('%d concurrent on LoRA adapters (r=16, all linear layers)%s, %s: one adapter %.1f tokens/s, '
                      'two adapters mixed %.1f tokens/s: %.2fx (goal >= 0.8x)' % (n, how, name, one, two, two / one))
    engine.close()
    if llama_engine is not None:
        llama_engine.close()

    if not args.no_bf16:
        bf16 = Engine(serve.ModelCache(dtype=torch.bfloat16), max_batch=len(prompts))
        requests = [chat_request(MODEL_DIR, p, args.max_tokens) for p in prompts]
        alone = [bf16.whole_answer(r)['text'] for r in requests]
        _wall, _tokens, _firsts, batched = wave(bf16.chat, requests)
        flips = sum(a != b for a, b in zip(alone, batched))
        print('bf16: %d of %d greedy answers differ between one at a time and a batch of %d (near-ties that flip)'
              % (flips, len(prompts), len(prompts)))
        bf16.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
