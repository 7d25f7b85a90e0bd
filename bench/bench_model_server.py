"""Answering through the persistent model server vs a plain in-process transformers `generate`.

    python -m bench.bench_model_server [--max-tokens 64] [--repeats 3]   (trainer venv; scripts/bench.sh)

Same model (SmolLM2-135M-Instruct), same chat prompt (chat template with the generation prompt),
greedy, the same number of new tokens. First the cold start: a fresh `python -m trainer.serve`
process, timed from its launch to the first streamed token of its first request (process start,
imports, model load, generation: what every Test button click cost before, when each request ran
its own `python -m trainer.generate`). Then, `--repeats` times in alternation, a warm request to
the server (model loaded, streamed over HTTP) and the baseline: `model.generate` on a model held
in this process, its first token timed with a streamer. Prints time to first token and decode
tokens/s (tokens after the first, over the time after the first) for both, the medians, the best
of each side (the least disturbed by other processes) and the ratios server/baseline, and the
machine it ran on.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.bench_training import MODEL_DIR, machine_report  # noqa: E402

MESSAGES = [{'role': 'user', 'content': 'Write a short story about a robot who learns to paint.'}]


def timed_stream(url, max_tokens, token):
    """(seconds to the first delta, seconds to the end, completion tokens, text) of one streamed /chat."""
    body = json.dumps({'model': MODEL_DIR, 'messages': MESSAGES, 'max_tokens': max_tokens, 'stream': True}).encode()
    start = time.perf_counter()
    first, parts, final = None, [], None
    request = urllib.request.Request(url + '/chat', data=body, headers={'Authorization': 'Bearer ' + token})
    with urllib.request.urlopen(request, timeout=600) as answer:
        for line in answer:
            item = json.loads(line)
            if 'delta' in item:
                first = first or time.perf_counter() - start
                parts.append(item['delta'])
            else:
                final = item
    if 'error' in final:
        raise RuntimeError(final['error'])
    return first, time.perf_counter() - start, final['completion_tokens'], ''.join(parts)


class FirstTokenTimer(object):
    """A streamer that only notes when generate() produced its first new token."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:  # the first call is the prompt
            self.first = time.perf_counter()

    def end(self):
        pass


def baseline(model, tokenizer, max_tokens):
    """The same as timed_stream, with a plain model.generate in this process."""
    import torch
    start = time.perf_counter()
    inputs = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors='pt', return_dict=True)
    timer = FirstTokenTimer()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, streamer=timer,
                                pad_token_id=tokenizer.eos_token_id)
    end = time.perf_counter() - start
    new = output[0][inputs['input_ids'].shape[1]:]
    return timer.first - start, end, int(new.shape[0]), tokenizer.decode(new, skip_special_tokens=True)


def decode_rate(run):
    first, end, tokens, _ = run
    return (tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--max-tokens', type=int, default=64)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args(argv)
    for line in machine_report():
        print(line)
    print('model %s, prompt %d chars, greedy, max_tokens %d' % (os.path.basename(MODEL_DIR), len(MESSAGES[0]['content']),
                                                                 args.max_tokens))
    folder = tempfile.mkdtemp(prefix='bench-serve-')
    state_file = os.path.join(folder, 'server.json')
    launched = time.perf_counter()
    server = subprocess.Popen([sys.executable, '-m', 'trainer.serve', '--port', '0', '--state-file', state_file,
                               '--allowed-root', os.path.dirname(MODEL_DIR)],
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM='false'),
                              stdout=subprocess.DEVNULL, stderr=open(os.path.join(folder, 'server.log'), 'wb'))
    try:
        deadline = time.time() + 120
        while not os.path.exists(state_file):
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError('the server did not start: see %s' % folder)
            time.sleep(0.05)
        listening = time.perf_counter() - launched
        with open(state_file) as f:
            url = 'http://127.0.0.1:%d' % json.load(f)['port']
        with open(os.path.join(folder, 'server.token')) as f:
            token = f.read()
        before = time.perf_counter()
        cold = timed_stream(url, args.max_tokens, token)
        print('cold start: process listening after %.2f s; its first request (model load included): first token '
              'at %.2f s, %d tokens in %.2f s; launch to first token %.2f s'
              % (listening, cold[0], cold[2], cold[1], before - launched + cold[0]))

        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()
        tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
        baseline(model, tokenizer, 4)  # warm both alike: the server already answered once
        served, plain = [], []
        for i in range(args.repeats):
            served.append(timed_stream(url, args.max_tokens, token))
            plain.append(baseline(model, tokenizer, args.max_tokens))
            print('pair %d: server first token %.3f s, %d tokens, %.1f tokens/s | in-process generate first token '
                  '%.3f s, %d tokens, %.1f tokens/s | same text: %s'
                  % (i + 1, served[-1][0], served[-1][2], decode_rate(served[-1]), plain[-1][0], plain[-1][2],
                     decode_rate(plain[-1]), served[-1][3] == plain[-1][3]))
        ttft_s, ttft_p = statistics.median(r[0] for r in served), statistics.median(r[0] for r in plain)
        rate_s, rate_p = statistics.median(map(decode_rate, served)), statistics.median(map(decode_rate, plain))
        print('median time to first token: server %.3f s, in-process %.3f s (%.2fx); cold start %.2f s = %.0fx a warm one'
              % (ttft_s, ttft_p, ttft_s / ttft_p, before - launched + cold[0], (before - launched + cold[0]) / ttft_s))
        print('median decode speed: server %.1f tokens/s, in-process %.1f tokens/s: %.2fx'
              % (rate_s, rate_p, rate_s / rate_p))
        # other processes on the machine slow single runs by up to 10x: the best of each side is
        # the figure least touched by them
        best_ttft_s, best_ttft_p = min(r[0] for r in served), min(r[0] for r in plain)
        best_rate_s, best_rate_p = max(map(decode_rate, served)), max(map(decode_rate, plain))
        print('best of %d: time to first token server %.3f s, in-process %.3f s (%.2fx); decode server %.1f, '
              'in-process %.1f tokens/s (%.2fx)' % (args.repeats, best_ttft_s, best_ttft_p, best_ttft_s / best_ttft_p,
                                                   best_rate_s, best_rate_p, best_rate_s / best_rate_p))
    finally:
        server.terminate()
        server.wait(30)
    return 0


if __name__ == '__main__':
    sys.exit(main())
