"""Training throughput: our trainer vs a plain transformers.Trainer + peft LoRA baseline.

    bash scripts/bench.sh            (runs this in the trainer venv)
    python -m bench.bench_training [--examples 48] [--epochs 2] [--repeats 2] [--scale]

Same model (SmolLM2-135M-Instruct), same tokenized chat data (assistant-only labels), same LoRA
(r=16, all linear projections, dropout 0.05), batch size, learning rate and seed, run back to back
in one invocation, `--repeats` times in alternation (this machine's speed drifts, so each pair's
ratio is printed and the median one is the result). The baseline is what the docs show: fp32,
random batches padded to their longest. Ours is trainer/train.py as Odoo runs it, through its
real CLI on a job folder. Prints non-padding tokens/s, peak RSS, the final loss (the trained
model's mean loss over the whole training set, in fp32, the same yardstick for both), the ratio,
and the share of the measured matmul limit (6 N FLOPs per token) for the precision the trainer
chose. First it prints the machine (CPU model, torch's CPU capability, bf16/amx flags, cores) and
the matmul GFLOP/s of both precisions; last, a capped run forced to the other precision, so the
output shows the automatic choice is the faster one on this machine.

Contended (alone with --contended): the trainer as it was before its tuning controller (all threads,
a start-up matmul probe: the trainer/ folder of OLD_REF, taken from git) against today's, each quiet
and beside a competing busy process pinned to one core (a bounded busy loop that stops by itself),
runs interleaved and repeated `--repeats` times: tokens/s (the training loop plus the tuning
measurements), the ratio contended/quiet of each, and today's quiet over the old quiet.

Then the scale line (alone with --scale): the same job through the trainer's CLI with 1 and with
2 data-parallel processes (num_processes, same global batch), `--repeats` times in alternation:
the trainer's tokens/s (training loop), the wall time of the whole run (start-up, torchrun,
model load, saving included) and the ratios, 2 processes over 1.
"""
import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH_SIZE = 4  # examples per step of the trainer's runs
sys.path.insert(0, ROOT)

MODEL_DIR = os.environ.get('LLMT_BASE_MODEL_DIR', os.path.expanduser('~/.cache/llm_training/models/SmolLM2-135M-Instruct'))


def make_examples(n, seed=0):
    """Support conversations of very different lengths, as real company data has."""
    rng = random.Random(seed)
    words = ('invoice order delivery refund stock price customer support warehouse product account payment '
             'shipping discount warranty contract please thanks today tomorrow number reference').split()
    examples = []
    for _ in range(n):
        q = ' '.join(rng.choice(words) for _ in range(rng.choice([4, 8, 16, 40, 80])))
        a = ' '.join(rng.choice(words) for _ in range(rng.choice([6, 12, 30, 60, 120])))
        examples.append({'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]})
    return examples


def machine_report():
    """Lines saying what this machine is: CPU, torch's kernel level, bf16 flags, threads."""
    import torch

    from bench.machine import cpu_line
    from trainer.precision import available_cores
    return ['CPU: %s; torch %s, CPU capability %s; %d cores available to threads'
            % (cpu_line(), torch.__version__, torch.backends.cpu.get_cpu_capability(), available_cores())]


def model_matmul_gflops():
    """fp32 and bf16 GFLOP/s on SmolLM2's own layer shapes, as the trainer measures them (lora path)."""
    from trainer.precision import measure
    shapes = {(576, 576): 60, (576, 192): 60, (576, 1536): 90, (1536, 576): 30}
    rates = measure(shapes, 'lora')  # where bf16 is pathologically slow, its rate is the slice's
    return {'fp32': rates['fp32'], 'bf16': rates['bf16']}


def dataset_loss(model, features, pad_token_id, batch_size=8):
    """Mean loss per target token of the trained model over the whole training set, in fp32 and
    padded batches: the same yardstick for both runs, whatever order they saw the batches in."""
    import torch
    import torch.nn.functional as F

    from trainer.data import ChatCollator
    model = model.float().eval()
    collate = ChatCollator(pad_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = collate(features[start:start + batch_size])
            logits = model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits
            labels = batch['labels'][:, 1:]
            total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                     ignore_index=-100, reduction='sum').item()
            count += int((labels != -100).sum())
    return total / count


def baseline_child(job_dir):
    """Plain Trainer + peft, fp32, random sampler: the reference point."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from trainer.data import ChatCollator, tokenize_file
    from trainer.train import ListDataset
    config = json.load(open(os.path.join(job_dir, 'config.json')))
    torch.manual_seed(config['seed'])
    tokenizer = AutoTokenizer.from_pretrained(config['base_model_path'])
    features, _long, _empty = tokenize_file(tokenizer, os.path.join(job_dir, 'train.jsonl'), config['max_seq_length'])
    model = AutoModelForCausalLM.from_pretrained(config['base_model_path'], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=config['lora_r'], lora_alpha=config['lora_alpha'], lora_dropout=0.05,
                                             target_modules='all-linear', task_type='CAUSAL_LM'))
    args = TrainingArguments(output_dir=os.path.join(job_dir, 'baseline'), num_train_epochs=config['epochs'],
                             per_device_train_batch_size=config['batch_size'], learning_rate=config['learning_rate'],
                             logging_steps=1, save_strategy='no', report_to='none', seed=config['seed'],
                             use_cpu=not torch.cuda.is_available(), remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(features),
                      data_collator=ChatCollator(tokenizer.pad_token_id))
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    return {'seconds': seconds, 'tokens': sum(len(f['input_ids']) for f in features) * config['epochs'],
            'final_loss': dataset_loss(model, features, tokenizer.pad_token_id), 'train_loss': output.training_loss}


def ours_child(job_dir):
    from trainer.train import main
    assert main(['--job-dir', job_dir]) == 0, open(os.path.join(job_dir, 'status.json')).read()
    status = json.load(open(os.path.join(job_dir, 'status.json')))
    config = json.load(open(os.path.join(job_dir, 'config.json')))
    final = status['final_metrics']
    if config.get('max_steps'):  # a capped run: its speed only, the loss of a few steps means nothing
        return {'seconds': final['train_runtime'], 'tokens_per_second': final['tokens_per_second'],
                'precision': final['precision']}
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.data import tokenize_file
    tokenizer = AutoTokenizer.from_pretrained(config['base_model_path'])
    features, _long, _empty = tokenize_file(tokenizer, os.path.join(job_dir, 'train.jsonl'), config['max_seq_length'])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config['base_model_path']),
                                      status['result']['model_ref'])
    return {'seconds': final['train_runtime'], 'precision': final['precision'],
            'tokens': sum(len(f['input_ids']) for f in features) * config['epochs'],
            'final_loss': dataset_loss(model, features, tokenizer.pad_token_id), 'train_loss': final['train_loss']}


def child(which, job_dir):
    result = {'baseline': baseline_child, 'ours': ours_child}[which](job_dir)
    result['rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print('RESULT ' + json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--examples', type=int, default=48)
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--other-steps', type=int, default=4,
                        help='step cap of the run forced to the precision the trainer did not choose')
    parser.add_argument('--scale', action='store_true', help='only the machine and the 1 vs 2 processes line')
    parser.add_argument('--contended', action='store_true',
                        help='only old vs new trainer, quiet and beside a busy process on one core')
    parser.add_argument('--child', nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    import torch

    from bench.machine import cpu_line
    from trainer.precision import available_cores
    torch.set_num_threads(available_cores())
    n_params = 134.5e6
    for line in machine_report():
        print(line)
    limits = model_matmul_gflops()
    print('matmul on the model\'s layer shapes: fp32 %.0f GFLOP/s, bf16 %.0f GFLOP/s'
          % (limits['fp32'], limits['bf16']))
    if args.scale:
        return scale(args, limits)
    if args.contended:
        return contended(args)
    ratios, baseline_tps, chosen = [], [], None
    for attempt in range(args.repeats):
        results = {which: run_child(which, args) for which in ('baseline', 'ours')}
        chosen = results['ours']['precision']
        for which, precision in (('baseline', 'fp32'), ('ours', chosen)):
            r = results[which]
            tps = r['tokens'] / r['seconds']
            share = tps * 6 * n_params / (limits[precision] * 1e9)
            print('%-9s %6.1f s  %6.0f tokens/s  peak RSS %5.0f MB  final loss %.4f  %s  (%.0f%% of the %s 6N limit)'
                  % (which, r['seconds'], tps, r['rss_mb'], r['final_loss'], precision, 100 * share, precision))
        b, o = results['baseline'], results['ours']
        baseline_tps.append(b['tokens'] / b['seconds'])
        ratios.append((o['tokens'] / o['seconds']) / baseline_tps[-1])
        print('pair %d: ours is %.2fx the baseline throughput (non-padding tokens/s); final loss over the '
              'training set %.4f vs %.4f' % (attempt + 1, ratios[-1], o['final_loss'], b['final_loss']))
    print('ratio (median of %d pairs): %.2fx, trainer chose %s' % (len(ratios), statistics.median(ratios), chosen))
    # The precision not chosen, capped: a forced bf16 run on a CPU without bf16 units takes hours.
    other = 'fp32' if chosen == 'bf16' else 'bf16'
    r = run_child('ours', args, bf16=(other == 'bf16'), max_steps=args.other_steps)
    print('forced %s (%d steps): %.0f tokens/s, %.2fx the baseline; the automatic choice (%s) was %.2fx'
          % (other, args.other_steps, r['tokens_per_second'], r['tokens_per_second'] / statistics.median(baseline_tps),
             chosen, statistics.median(ratios)))
    scale(args, limits)


def write_job(folder, args, **config):
    """The benchmark's job folder; `config` overrides the job's settings."""
    with open(os.path.join(folder, 'train.jsonl'), 'w') as f:
        f.writelines(json.dumps(e) + '\n' for e in make_examples(args.examples))
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump({'base_model_path': MODEL_DIR, 'technique': 'lora', 'epochs': args.epochs, 'batch_size': BATCH_SIZE,
                   'learning_rate': 2e-4, 'lora_r': 16, 'lora_alpha': 32, 'max_seq_length': 256,
                   'seed': 42, 'save_steps': 100000, **config}, f)


def run_scaled(args, processes, bf16):
    """The trainer's CLI on the benchmark job with `processes` data-parallel processes."""
    with tempfile.TemporaryDirectory() as tmp:
        write_job(tmp, args, num_processes=processes, bf16=bf16)
        start = time.perf_counter()
        out = subprocess.run([sys.executable, '-m', 'trainer.train', '--job-dir', tmp], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=ROOT))
        wall = time.perf_counter() - start
        status = json.load(open(os.path.join(tmp, 'status.json')))
    if status['state'] != 'completed':
        sys.exit('%d-process run failed: %s\n%s' % (processes, status.get('error'), out.stdout.decode()[-3000:]))
    return dict(status['final_metrics'], wall=wall)


def scale(args, limits):
    """1 against 2 processes, same job, same global batch, in alternation. Both in the precision
    faster on this machine (`limits`): each run's own measurement, with 2 threads or 1, could pick
    differently and the ratio would then compare precisions, not process counts."""
    bf16 = limits['bf16'] > limits['fp32']
    tps_ratios, wall_ratios = [], []
    for attempt in range(args.repeats):
        runs = {n: run_scaled(args, n, bf16) for n in (1, 2)}
        for n, r in runs.items():
            print('scale: %d process%s x %d thread%s: %6.1f tokens/s, wall %5.1f s, train loss %.4f, %s'
                  % (n, 'es' if n > 1 else '  ', r['threads'], 's' if r['threads'] > 1 else ' ',
                     r['tokens_per_second'], r['wall'], r['train_loss'], r['precision']))
        tps_ratios.append(runs[2]['tokens_per_second'] / runs[1]['tokens_per_second'])
        wall_ratios.append(runs[2]['wall'] / runs[1]['wall'])
        print('scale pair %d: 2 processes are %.2fx the tokens/s of 1, %.2fx its wall time'
              % (attempt + 1, tps_ratios[-1], wall_ratios[-1]))
    print('scale (median of %d pairs): 2 processes vs 1: %.2fx tokens/s, %.2fx wall time'
          % (len(tps_ratios), statistics.median(tps_ratios), statistics.median(wall_ratios)))


OLD_REF = '579c56e'  # the last commit whose trainer chose precision by a start-up matmul probe, all threads
BUSY_SECONDS = 600   # the busy loop's own bound: it stops by itself even if this bench dies


def start_busy(core):
    """A competing process: a plain busy loop pinned to `core`, bounded in time."""
    code = ('import os, time\nos.sched_setaffinity(0, {%d})\nend = time.time() + %d\n'
            'while time.time() < end:\n    pass\n' % (core, BUSY_SECONDS))
    return subprocess.Popen([sys.executable, '-c', code])


def old_trainer(tmp):
    """The trainer/ folder of OLD_REF, extracted from git into `tmp`; returns the folder to run it in."""
    archive = subprocess.run(['git', '-C', ROOT, 'archive', OLD_REF, 'trainer'], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, timeout=60)
    if archive.returncode:
        sys.exit('cannot take the old trainer from git (%s): %s' % (OLD_REF, archive.stderr.decode()))
    subprocess.run(['tar', '-x', '-C', tmp], input=archive.stdout, check=True, timeout=60)
    return tmp


def run_trainer(args, code_dir):
    """One run of the trainer in `code_dir` through its CLI on the benchmark job."""
    with tempfile.TemporaryDirectory() as tmp:
        write_job(tmp, args)
        start = time.perf_counter()
        out = subprocess.run([sys.executable, '-m', 'trainer.train', '--job-dir', tmp], cwd=code_dir,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=code_dir),
                             timeout=1800)
        wall = time.perf_counter() - start
        status = json.load(open(os.path.join(tmp, 'status.json')))
    if status['state'] != 'completed':
        sys.exit('run in %s failed: %s\n%s' % (code_dir, status.get('error'), out.stdout.decode()[-3000:]))
    return dict(status['final_metrics'], wall=wall)


def contended(args):
    """Old (all threads, start-up probe) vs new (tuning controller), quiet and contended."""
    cores = sorted(os.sched_getaffinity(0))
    # Enough steps that the new trainer tunes on its own steps (shorter jobs keep the start-up
    # probe, trainer/train.py TUNE_MIN_STEPS): the controller is what this line measures.
    from trainer.train import TUNE_MIN_STEPS
    needed = -(-TUNE_MIN_STEPS // args.epochs) * BATCH_SIZE
    if args.examples < needed:
        print('contended: %d examples instead of %d, so that the job has the %d steps the tuning controller needs'
              % (needed, args.examples, TUNE_MIN_STEPS))
        args.examples = needed
    print('contended: the busy process is pinned to core %d of %s; %d examples x %d epochs a run'
          % (cores[-1], cores, args.examples, args.epochs))
    runs = {}
    with tempfile.TemporaryDirectory() as old_dir:
        codes = {'old': old_trainer(old_dir), 'new': ROOT}
        for attempt in range(args.repeats):
            conditions = ('quiet', 'contended') if attempt % 2 == 0 else ('contended', 'quiet')
            for condition in conditions:
                for which in (('old', 'new') if attempt % 2 == 0 else ('new', 'old')):
                    busy = start_busy(cores[-1]) if condition == 'contended' else None
                    try:
                        r = run_trainer(args, codes[which])
                    finally:
                        if busy is not None:
                            busy.kill()
                            busy.wait()
                    runs.setdefault((which, condition), []).append(r)
                    print('contended: %s %-9s %6.1f tokens/s  %s x %d thread%s  tuning %4.1f s  wall %5.1f s'
                          % (which, condition, r['tokens_per_second'], r['precision'], r['threads'],
                             '' if r['threads'] == 1 else 's', r.get('tuning_seconds', 0.0), r['wall']))
    tps = {key: statistics.median(r['tokens_per_second'] for r in value) for key, value in runs.items()}
    for which in ('old', 'new'):
        pairs = [c['tokens_per_second'] / q['tokens_per_second']
                 for q, c in zip(runs[which, 'quiet'], runs[which, 'contended'])]
        print('contended: %s: quiet %.1f, contended %.1f tokens/s (medians): contended/quiet %.2fx '
              '(per repeat: %s)' % (which, tps[which, 'quiet'], tps[which, 'contended'],
                                    tps[which, 'contended'] / tps[which, 'quiet'],
                                    ', '.join('%.2f' % p for p in pairs)))
    print('contended: new/old quiet %.2fx (goal >= 0.95), new/old contended %.2fx; new contended/quiet %.2fx '
          '(goal >= 0.5)' % (tps['new', 'quiet'] / tps['old', 'quiet'], tps['new', 'contended'] / tps['old', 'contended'],
                             tps['new', 'contended'] / tps['new', 'quiet']))


def run_child(which, args, **config):
    """One training run in a fresh process, on its own job folder; `config` overrides the job's."""
    with tempfile.TemporaryDirectory() as tmp:
        write_job(tmp, args, **config)
        out = subprocess.run([sys.executable, '-m', 'bench.bench_training', '--child', which, tmp],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=dict(os.environ, PYTHONPATH=ROOT))
    line = [l for l in out.stdout.decode().splitlines() if l.startswith('RESULT ')]
    if not line:
        sys.exit('%s run failed:\n%s' % (which, out.stderr.decode()[-3000:]))
    return json.loads(line[0][7:])

if __name__ == '__main__':
    main()
