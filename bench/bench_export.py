"""Exporting to GGUF, and what running the result in llama.cpp gains over our model server.

    python -m bench.bench_export [--model ADAPTER_DIR] [--max-tokens 64] [--repeats 3]   (trainer venv)

1. Time and peak memory of `python -m trainer.export` to GGUF f16, q8_0 and q4_0 (the whole export: the
   reference answer, the merge, llama.cpp's converter, the check in llama.cpp); peak memory is the
   largest resident set of the export process and the converter it runs (wait4's rusage).
2. Single-stream decode speed on the same chat prompt, greedy, the same number of new tokens: our
   persistent model server (trainer/serve.py, transformers, the LoRA adapter on its base, as Odoo
   serves a fine-tuned model) vs llama.cpp in-process (xllamacpp) on the f16, q8_0 and q4_0 GGUFs,
   `--repeats` times in alternation; medians, best of each side and the ratios.
Without --model, a LoRA adapter with random weights on SmolLM2-135M-Instruct stands in for the demo
model (same shapes: r=16 on all 7 projections, as the demo job trains).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.bench_training import MODEL_DIR, machine_report  # noqa: E402

MESSAGES = [{'role': 'user', 'content': 'Write a short story about a robot who learns to paint.'}]


def make_adapter(folder):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(1)
    targets = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(MODEL_DIR),
                           LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(MODEL_DIR).save_pretrained(folder)
    return folder


def timed_export(model, out, fmt, job_dir=None):
    """(seconds, peak RSS in MB, bytes written) of one export process."""
    command = [sys.executable, '-m', 'trainer.export', '--model', model, '--out', out, '--format', fmt]
    if job_dir:
        command += ['--job-dir', job_dir]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
    manifest = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if status:
        raise RuntimeError('export %s failed (status %d)' % (fmt, status))
    return seconds, usage.ru_maxrss / 1024.0, json.loads(manifest.decode().strip().splitlines()[-1])


def server_rate(url, token, model, max_tokens):
    """Decode tokens/s of one streamed /chat to the model server (tokens after the first)."""
    body = json.dumps({'model': model, 'messages': MESSAGES, 'max_tokens': max_tokens, 'stream': True}).encode()
    first, final = None, None
    request = urllib.request.Request(url + '/chat', data=body, headers={'Authorization': 'Bearer %s' % token})
    with urllib.request.urlopen(request, timeout=600) as answer:
        for line in answer:
            item = json.loads(line)
            if 'delta' in item:
                first = first or time.perf_counter()
            else:
                final = item
    if 'error' in final:
        raise RuntimeError(final['error'])
    end = time.perf_counter()
    return (final['completion_tokens'] - 1) / (end - first) if end > first else 0.0


class LlamaCpp(object):
    def __init__(self, gguf):
        import xllamacpp as xlc
        from trainer.precision import available_cores
        params = xlc.CommonParams()
        params.model.path = gguf
        params.n_ctx = 1024
        params.cpuparams.n_threads = available_cores()
        self.server = xlc.Server(params)

    def rate(self, max_tokens):
        answer = self.server.handle_chat_completions({'messages': MESSAGES, 'max_tokens': max_tokens,
                                                      'temperature': 0.0, 'top_k': 1, 'ignore_eos': True})
        return answer['timings']['predicted_per_second']


def start_server(folder):
    state_file = os.path.join(folder, 'server.json')
    # the transformers engine: the adapter on its base, as Odoo serves a fine-tune where llama.cpp does not
    # (the default engine on a CPU is llama.cpp itself); it serves only this run's folder and the base
    server = subprocess.Popen([sys.executable, '-m', 'trainer.serve', '--port', '0', '--state-file', state_file,
                               '--engine', 'transformers', '--allowed-root', folder, '--allowed-root', MODEL_DIR],
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM='false'),
                              stdout=subprocess.DEVNULL, stderr=open(os.path.join(folder, 'server.log'), 'wb'))
    deadline = time.time() + 120
    while not os.path.exists(state_file):
        if server.poll() is not None or time.time() > deadline:
            raise RuntimeError('the model server did not start: see %s' % folder)
        time.sleep(0.05)
    with open(state_file) as f:
        port = json.load(f)['port']
    with open(os.path.join(folder, 'server.token')) as f:  # written before the state file
        token = f.read().strip()
    return server, 'http://127.0.0.1:%d' % port, token


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', help='a fine-tuned LoRA adapter folder (default: a random-weight one)')
    parser.add_argument('--job-dir')
    parser.add_argument('--max-tokens', type=int, default=64)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args(argv)
    for line in machine_report():
        print(line)
    work = tempfile.mkdtemp(prefix='bench-export-')
    server = None
    try:
        model = args.model or make_adapter(os.path.join(work, 'adapter'))
        print('model: %s' % (args.model or 'random-weight LoRA r=16 on all projections of %s'
                                            % os.path.basename(MODEL_DIR)))
        ggufs = {}
        for fmt in ('gguf_f16', 'gguf_q8_0', 'gguf_q4_0'):
            out = os.path.join(work, fmt)
            seconds, peak, manifest = timed_export(model, out, fmt, args.job_dir)
            gguf = [f for f in manifest['files'] if f['path'].endswith('.gguf')][0]
            ggufs[fmt] = os.path.join(out, gguf['path'])
            check = manifest['verification']
            print('export %s: %.1f s, peak RSS %.0f MB, GGUF %.1f MB; check: %d of the first %d greedy tokens equal '
                  'the fine-tuned model\'s' % (fmt, seconds, peak, gguf['size'] / 1e6, check['same_tokens'],
                                               check['compared_tokens']))
        server, url, token = start_server(work)
        server_rate(url, token, model, 4)  # load the model: warm, as llama.cpp's below
        engines = {fmt: LlamaCpp(path) for fmt, path in ggufs.items()}
        for engine in engines.values():
            engine.rate(4)
        rates = {'server': []}
        rates.update((fmt, []) for fmt in engines)
        for i in range(args.repeats):
            rates['server'].append(server_rate(url, token, model, args.max_tokens))
            for fmt, engine in engines.items():
                rates[fmt].append(engine.rate(args.max_tokens))
            print('round %d: model server %.1f tokens/s | %s' % (i + 1, rates['server'][-1], ' | '.join(
                'llama.cpp %s %.1f tokens/s' % (fmt[5:], rates[fmt][-1]) for fmt in engines)))
        base_median, base_best = statistics.median(rates['server']), max(rates['server'])
        for fmt in engines:
            print('llama.cpp %s vs model server, decode tokens/s (%d new tokens, single stream): median %.1f vs %.1f '
                  '(%.2fx), best %.1f vs %.1f (%.2fx)' % (
                      fmt[5:], args.max_tokens, statistics.median(rates[fmt]), base_median,
                      statistics.median(rates[fmt]) / base_median, max(rates[fmt]), base_best,
                      max(rates[fmt]) / base_best))
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == '__main__':
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc(file=sys.stdout)  # `make bench` drops stderr (llama.cpp's log): say why here
        sys.exit(1)
