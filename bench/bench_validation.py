"""Dataset validation throughput: our streaming validator vs a cookbook-style baseline.

    python bench/bench_validation.py [--examples 100000]

Generates a chat JSONL file, then validates it (each in a fresh subprocess, so peak RSS is per
run) with (1) a baseline written the way OpenAI's cookbook validator works: read every line
into a list with json.loads, then the per-field checks, and (2) lib/datasets/dataset_validator.py with the
same token estimate. Prints examples/s and peak RSS of both, and the ratios. Then the same for
prompt/completion rows in CSV and Parquet: ours (streamed, converted, checked) vs loading all rows.
"""
import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.environ.get('LLMT_BASE_MODEL_DIR', os.path.expanduser('~/.cache/llm_training/models/SmolLM2-135M-Instruct'))


def generate(path, n, seed=0):
    rng = random.Random(seed)
    words = ('invoice order delivery refund stock price customer support warehouse product account '
             'payment shipping discount warranty contract').split()
    with open(path, 'w') as f:
        for i in range(n):
            turns = [{'role': 'system', 'content': 'You are a helpful assistant.'}]
            for _ in range(rng.randint(1, 3)):
                turns.append({'role': 'user', 'content': ' '.join(rng.choice(words) for _ in range(rng.randint(5, 60)))})
                turns.append({'role': 'assistant', 'content': ' '.join(rng.choice(words) for _ in range(rng.randint(10, 120)))})
            f.write(json.dumps({'messages': turns}) + '\n')


def baseline(path):
    """The cookbook's shape: load all, then check each example's fields."""
    from lib.datasets.dataset_validator import estimate_tokens
    with open(path, 'r', encoding='utf-8') as f:
        dataset = [json.loads(line) for line in f]
    errors = {}
    tokens = []
    for ex in dataset:
        if not isinstance(ex, dict):
            errors['data_type'] = errors.get('data_type', 0) + 1
            continue
        messages = ex.get('messages', None)
        if not messages:
            errors['missing_messages_list'] = errors.get('missing_messages_list', 0) + 1
            continue
        for message in messages:
            if 'role' not in message or 'content' not in message:
                errors['message_missing_key'] = errors.get('message_missing_key', 0) + 1
            if any(k not in ('role', 'content', 'name', 'function_call', 'weight') for k in message):
                errors['message_unrecognized_key'] = errors.get('message_unrecognized_key', 0) + 1
            if message.get('role', None) not in ('system', 'user', 'assistant', 'function'):
                errors['unrecognized_role'] = errors.get('unrecognized_role', 0) + 1
            content = message.get('content', None)
            if not content or not isinstance(content, str):
                errors['missing_content'] = errors.get('missing_content', 0) + 1
        if not any(m.get('role', None) == 'assistant' for m in messages):
            errors['example_missing_assistant_message'] = errors.get('example_missing_assistant_message', 0) + 1
        tokens.append(estimate_tokens(messages))
    return len(dataset), sum(errors.values())


def ours(path):
    from lib.datasets.dataset_validator import validate_files
    with open(path, 'rb') as f:
        report = validate_files([(os.path.basename(path), f)], long_tokens=4096)
    return report.examples, report.error_count


def generate_rows(tmp, n, seed=0):
    """The same prompt/completion rows as a CSV and a Parquet file (row groups of 10,000)."""
    import csv
    import pyarrow
    import pyarrow.parquet as pq
    rng = random.Random(seed)
    words = 'invoice order delivery refund stock price customer support warehouse product'.split()
    prompts = [' '.join(rng.choice(words) for _ in range(rng.randint(5, 60))) for _ in range(n)]
    completions = [' '.join(rng.choice(words) for _ in range(rng.randint(10, 120))) for _ in range(n)]
    paths = {'csv': os.path.join(tmp, 'rows.csv'), 'parquet': os.path.join(tmp, 'rows.parquet')}
    with open(paths['csv'], 'w', newline='', encoding='utf-8') as f:
        writer = csv.writer(f)
        writer.writerow(['prompt', 'completion'])
        writer.writerows(zip(prompts, completions))
    pq.write_table(pyarrow.table({'prompt': prompts, 'completion': completions}), paths['parquet'],
                   row_group_size=10000)
    return paths


def rows_baseline(path):
    """Load every row (csv.DictReader into a list; pyarrow's read_table().to_pylist()), then
    convert each to the chat shape: the usual short script."""
    from lib.datasets.dataset_formats import prompt_completion_example
    if path.endswith('.csv'):
        import csv
        with open(path, newline='', encoding='utf-8') as f:
            rows = list(csv.DictReader(f))
    else:
        import pyarrow.parquet as pq
        rows = pq.read_table(path).to_pylist()
    examples = [prompt_completion_example(row) for row in rows]
    return len(examples), 0


def rows_ours(path):
    from lib.datasets.dataset_validator import validate_files
    with open(path, 'rb') as f:
        report = validate_files([(os.path.basename(path), f)], data_format='prompt_completion',
                                file_type='csv' if path.endswith('.csv') else 'parquet')
    return report.examples, report.error_count


def formats_bench(tmp, n, repeat):
    """CSV and Parquet prompt/completion files: ours (row by row / batch by batch, converted and
    checked) vs loading all rows first."""
    try:
        paths = generate_rows(tmp, n)
    except ImportError:
        print('CSV/Parquet: skipped (pyarrow is not installed in this Python)')
        return
    for kind, path in sorted(paths.items()):
        b, o = measure('rows_baseline', path, repeat), measure('rows_ours', path, repeat)
        print('%-7s %d rows, %.1f MB: load-all %.2f s %.0f MB, ours %.2f s %.0f MB (checked, converted): '
              '%.2fx the throughput, %.2fx the peak memory'
              % (kind, n, os.path.getsize(path) / 1e6, b['seconds'], b['rss_mb'], o['seconds'], o['rss_mb'],
                 b['seconds'] / o['seconds'], o['rss_mb'] / b['rss_mb']))


def huge_line(path):
    """The security probe: 12 good examples and one 30 MB line, validated as a job would (the
    model's own tokenizer, its context as the limit). Returns seconds and the RSS it added."""
    from lib.datasets.dataset_validator import DatasetValidator
    from lib.datasets.token_count import tokenizer_counter
    counter = tokenizer_counter(os.path.join(MODEL_DIR, 'tokenizer.json'))
    counter([{'role': 'user', 'content': 'warm up'}])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    start = time.perf_counter()
    validator = DatasetValidator(count_tokens=counter, max_tokens=8192)
    with open(path, 'rb') as f:
        validator.validate_file(f, os.path.basename(path))
    report = validator.finish()
    seconds = time.perf_counter() - start
    refused = [str(p) for p in report.errors if 'over the limit' in p.message]
    return {'seconds': seconds, 'rss_added_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - rss_before,
            'refused': refused[0] if refused else None}


def tokens_baseline(path):
    """The cookbook's loop with real token counts: load all, check, apply_chat_template each
    (trainer venv: transformers renders the template)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    start = time.perf_counter()
    with open(path, 'r', encoding='utf-8') as f:
        dataset = [json.loads(line) for line in f]
    errors, total = 0, 0
    for ex in dataset:
        messages = ex.get('messages') if isinstance(ex, dict) else None
        if not messages or any(m.get('role') not in ('system', 'user', 'assistant') or not isinstance(m.get('content'), str)
                               for m in messages):
            errors += 1
            continue
        total += len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    return len(dataset), errors, total, time.perf_counter() - start


def tokens_ours(path):
    """Our streaming validator counting through the template table (Odoo's venv)."""
    from lib.datasets.dataset_validator import DatasetValidator
    from lib.datasets.token_count import TemplateCounter
    table = json.loads(os.environ['LLMT_TEMPLATE_TABLE'])
    counter = TemplateCounter(os.path.join(MODEL_DIR, 'tokenizer.json'), table)
    start = time.perf_counter()
    validator = DatasetValidator(count_tokens=counter, max_tokens=8192)
    with open(path, 'rb') as f:
        validator.validate_file(f, os.path.basename(path))
    report = validator.finish()
    return report.examples, report.error_count, report.tokens_total, time.perf_counter() - start


def run_one(which, path):
    """Child process: time one validator, print JSON with its figures."""
    sys.path.insert(0, ROOT)
    if which == 'huge_line':
        print(json.dumps(huge_line(path)))
        return
    if which.startswith('tokens_'):
        examples, errors, tokens, seconds = {'tokens_baseline': tokens_baseline, 'tokens_ours': tokens_ours}[which](path)
        print(json.dumps({'examples': examples, 'errors': errors, 'tokens': tokens, 'seconds': seconds,
                          'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}))
        return
    start = time.perf_counter()
    examples, errors = {'baseline': baseline, 'ours': ours, 'rows_baseline': rows_baseline,
                        'rows_ours': rows_ours}[which](path)
    seconds = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({'examples': examples, 'errors': errors, 'seconds': seconds, 'rss_mb': rss_mb}))


def measure(which, path, repeat):
    best = None
    for _ in range(repeat):
        out = subprocess.check_output([sys.executable, __file__, '--child', which, path])
        result = json.loads(out.decode().strip().splitlines()[-1])
        if best is None or result['seconds'] < best['seconds']:
            best = result
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--examples', type=int, default=100000)
    parser.add_argument('--repeat', type=int, default=3, help='runs of each; the fastest counts')
    parser.add_argument('--token-examples', type=int, nargs='+', default=[10000, 40000],
                        help='file sizes of the token-count comparison')
    parser.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_one(*args.child)
    sys.path.insert(0, ROOT)
    from bench.machine import cpu_line
    print('machine: %s' % cpu_line())
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'chat.jsonl')
        generate(path, args.examples)
        size_mb = os.path.getsize(path) / 1e6
        print('file: %d examples, %.1f MB; Python %s' % (args.examples, size_mb, sys.version.split()[0]))
        results = {}
        for which in ('baseline', 'ours'):  # alternate-free but back to back, same file, same machine
            results[which] = measure(which, path, args.repeat)
        for which, r in results.items():
            print('%-9s %7.2f s  %9.0f examples/s  peak RSS %6.1f MB  (%d examples, %d errors)' % (
                which, r['seconds'], r['examples'] / r['seconds'], r['rss_mb'], r['examples'], r['errors']))
        b, o = results['baseline'], results['ours']
        print('ratio: ours is %.2fx the baseline throughput, with %.2fx its peak memory'
              % (b['seconds'] / o['seconds'], o['rss_mb'] / b['rss_mb']))
        huge = os.path.join(tmp, 'huge.jsonl')
        with open(huge, 'w') as f:
            for i in range(12):
                f.write(json.dumps({'messages': [{'role': 'user', 'content': 'Question %d?' % i},
                                                 {'role': 'assistant', 'content': 'Answer %d.' % i}]}) + '\n')
            f.write(json.dumps({'messages': [{'role': 'user', 'content': 'x' * (30 << 20)},
                                             {'role': 'assistant', 'content': 'ok'}]}) + '\n')
        out = subprocess.check_output([sys.executable, __file__, '--child', 'huge_line', huge])
        r = json.loads(out.decode().strip().splitlines()[-1])
        print('30 MB line: refused in %.2f s, RSS +%.0f MB (goal: under 5 s and 200 MB): %s'
              % (r['seconds'], r['rss_added_mb'], r['refused']))
        formats_bench(tmp, args.examples, args.repeat)
        token_bench(tmp, args.token_examples)


def token_bench(tmp, sizes):
    """Validation with token counts as the trainer sees them (SmolLM2's chat template): the
    cookbook's loop with apply_chat_template (trainer venv) vs our streaming validator with the
    template table (Odoo's venv), same files; ours at two sizes to show its memory is flat."""
    trainer_python = os.environ.get('LLMT_TRAINER_PYTHON')
    if not trainer_python:
        print('token counts: skipped (set LLMT_TRAINER_PYTHON to the trainer venv python)')
        return
    start = time.perf_counter()
    table = subprocess.check_output([trainer_python, '-m', 'trainer.chat_template_costs', '--model', MODEL_DIR],
                                    cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT)).decode().strip().splitlines()[-1]
    print('token counts: chat template table measured once per model in %.1f s: %s'
          % (time.perf_counter() - start, table))
    env = dict(os.environ, LLMT_TEMPLATE_TABLE=table, PYTHONPATH=ROOT)
    for n in sizes:
        path = os.path.join(tmp, 'tokens-%d.jsonl' % n)
        generate(path, n, seed=1)
        runs = {}
        for which, python in (('tokens_baseline', trainer_python), ('tokens_ours', sys.executable)):
            out = subprocess.check_output([python, __file__, '--child', which, path], env=env)
            runs[which] = json.loads(out.decode().strip().splitlines()[-1])
        b, o = runs['tokens_baseline'], runs['tokens_ours']
        for label, r in (('baseline', b), ('ours', o)):
            print('  %6d examples %-9s %6.2f s %8.0f examples/s  peak RSS %6.1f MB  tokens %d'
                  % (n, label, r['seconds'], r['examples'] / r['seconds'], r['rss_mb'], r['tokens']))
        print('  %6d examples: ours is %.2fx the baseline, %.2fx its peak memory, same token total: %s'
              % (n, b['seconds'] / o['seconds'], o['rss_mb'] / b['rss_mb'], b['tokens'] == o['tokens']))


if __name__ == '__main__':
    main()
