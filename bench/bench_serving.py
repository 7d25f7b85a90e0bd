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
  f16 converted by it, streamed through the same seam), what `auto` serves with on a CPU.
It prints aggregate tokens/s (every completion token over the wave's wall time) and first-token
p50/p95 (from the wave's start), the best of the repeats, and the ratios batched/one at a time.
Then: a mixed batch of two LoRA adapters (random weights) against a batch of one adapter
(aggregate tokens/s); in bf16, how many greedy answers of a batch differ from the same prompts
one at a time (near-ties that flip); and llama.cpp with 8 parallel slots on the model as GGUF
f16 (made with llama.cpp's converter unless --gguf is given), single stream and N at once
(non-streamed calls: its first token is not timed). In-process (no HTTP): the HTTP layer costs
the same on both sides.
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


def wave(call, requests):
    """Run `call(request, emit)` for every request in its own thread, all started together:
    (wall seconds, total completion tokens, first-token seconds from the start, texts)."""
    start = threading.Event()
    firsts, tokens, texts = [None] * len(requests), [0] * len(requests), [None] * len(requests)
    began = []

    def one(i):
        parts = []

        def emit(delta):
            if firsts[i] is None:
                firsts[i] = time.perf_counter() - began[0]
            parts.append(delta)
        start.wait()
        final = call(requests[i], emit)
        tokens[i] = final['completion_tokens']
        texts[i] = ''.join(parts)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    began.append(time.perf_counter())
    start.set()
    for thread in threads:
        thread.join()
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


def gguf_file(folder, given):
    if given:
        return given
    from trainer import export
    out = os.path.join(folder, 'model-f16.gguf')
    export.convert_hf_to_gguf(MODEL_DIR, out, 'f16', export.convert_dir(), lambda *a, **k: None)
    return out


class LlamaCpp(object):
    """llama.cpp's server in-process (xllamacpp): `slots` parallel sequences, continuous batching."""

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
        self.server = xlc.Server(params)

    def chat(self, request, emit):
        answer = self.server.handle_chat_completions({'messages': request['messages'], 'max_tokens': request['max_tokens'],
                                                      'temperature': 0.0, 'top_k': 1, 'stream': False})
        if isinstance(answer, str):
            answer = json.loads(answer)
        if 'error' in answer:
            raise RuntimeError(answer['error'])
        emit(answer['choices'][0]['message']['content'])  # whole: its first token is not timed
        return {'completion_tokens': answer['usage']['completion_tokens'], 'timings': answer.get('timings')}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--concurrency', default='1,4,8,16')
    parser.add_argument('--max-tokens', type=int, default=64)
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--gguf', help='the model as GGUF f16 (default: converted here with llama.cpp\'s converter)')
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

    old_cache, lock = serve.ModelCache(), threading.Lock()

    def one_at_a_time(request, emit):
        with lock:
            return serve.run_chat(old_cache, request, emit)
    engine = Engine(serve.ModelCache(), max_batch=max(levels), max_queue=max(levels))
    sides = [('one at a time', one_at_a_time), ('batched', engine.chat)]
    llama_engine = None
    if not args.no_llamacpp_engine:
        from trainer.llamacpp_engine import LlamaCppEngine
        llama_engine = LlamaCppEngine(max_batch=max(levels), max_queue=max(levels))
        sides.append(('llama.cpp engine', llama_engine.chat))
    for _name, call in sides:  # load and warm both
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
            print('%2d concurrent, %-13s: %6.1f tokens/s in all, first token p50 %.2f s p95 %.2f s'
                  % (n, name, rate, p50, p95))
        print('%2d concurrent: batched/one at a time %.2fx tokens/s; greedy texts equal %d of %d'
              % (n, best['batched'][0] / best['one at a time'][0], same, n))
        if llama_engine is not None:
            ours = best['llama.cpp engine']
            print('%2d concurrent: llama.cpp engine/batched %.2fx tokens/s; its greedy texts (f16) equal the fp32 ones '
                  '%d of %d' % (n, ours[0] / best['batched'][0],
                                sum(a == b for a, b in zip(best['one at a time'][3], ours[3])), n))
    one_stream = max(r[0] for r in results[(levels[0], 'one at a time')])
    if 8 in levels:
        print('goal at 8 concurrent: batched %.1f tokens/s = %.2fx today\'s one stream (%.1f; goal >= 4x)'
              % (max(r[0] for r in results[(8, 'batched')]), max(r[0] for r in results[(8, 'batched')]) / one_stream,
                 one_stream))
    old_cache.entries.clear()
    if llama_engine is not None:
        llama_engine.close()

    work = tempfile.mkdtemp(prefix='bench-serving-')
    n = min(8, max(levels))
    if not args.no_adapters:
        adapters = make_adapters(work)
        engine.cache.max_adapters = 4
        single = [chat_request(adapters[0], p, args.max_tokens) for p in prompts[:n]]
        mixed = [chat_request(adapters[i % 2], p, args.max_tokens) for i, p in enumerate(prompts[:n])]
        wave(engine.chat, [chat_request(a, PROMPTS[0], 2) for a in adapters])
        rates = {'one adapter': [], 'two adapters': []}
        for repeat in range(args.repeats):
            for name, requests in (('one adapter', single), ('two adapters', mixed)):
                wall, tokens, _firsts, _texts = wave(engine.chat, requests)
                rates[name].append(tokens / wall)
        print('%d concurrent on LoRA adapters (r=16, all linear layers): one adapter %.1f tokens/s, two adapters mixed '
              '%.1f tokens/s: %.2fx (goal >= 0.8x)' % (n, max(rates['one adapter']), max(rates['two adapters']),
                                                        max(rates['two adapters']) / max(rates['one adapter'])))
    engine.close()

    if not args.no_bf16:
        bf16 = Engine(serve.ModelCache(dtype=torch.bfloat16), max_batch=len(prompts))
        requests = [chat_request(MODEL_DIR, p, args.max_tokens) for p in prompts]
        alone = [bf16.whole_answer(r)['text'] for r in requests]
        _wall, _tokens, _firsts, batched = wave(bf16.chat, requests)
        flips = sum(a != b for a, b in zip(alone, batched))
        print('bf16: %d of %d greedy answers differ between one at a time and a batch of %d (near-ties that flip)'
              % (flips, len(prompts), len(prompts)))
        bf16.close()

    if not args.no_llamacpp:
        try:
            gguf = gguf_file(work, args.gguf)
        except Exception as e:  # no converter here: say so, the rest stands
            print('llama.cpp: no GGUF f16 of the model (%s): line left out' % e)
            return 0
        llama = LlamaCpp(gguf, slots=8)
        llama.chat(chat_request(MODEL_DIR, PROMPTS[0], 4), lambda d: None)
        single = llama.chat(chat_request(MODEL_DIR, PROMPTS[0], args.max_tokens), lambda d: None)
        print('llama.cpp GGUF f16, single stream decode %.1f tokens/s (its own timing)'
              % single['timings']['predicted_per_second'])
        for n in levels:
            requests = [chat_request(MODEL_DIR, p, args.max_tokens) for p in prompts[:n]]
            rates = []
            for _repeat in range(args.repeats):
                wall, tokens, _firsts, _texts = wave(llama.chat, requests)
                rates.append(tokens / wall)
            best = max(rates)
            ours = max(r[0] for r in results[(n, 'batched')])
            print('%2d concurrent, llama.cpp 8 slots: %6.1f tokens/s in all; batched engine/llama.cpp %.2fx'
                  % (n, best, ours / best))
    return 0


if __name__ == '__main__':
    sys.exit(main())
