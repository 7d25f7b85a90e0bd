"""Training precision and thread count, chosen by measuring this machine, never by assuming it.

CPUs of one kind of machine differ: with bf16 units (avx512_bf16, amx_bf16) a bf16 matmul runs
about 4x fp32; without them it runs 5x to 60x *slower*. So on CPU the trainer times both
precisions on the model's own layer shapes, through the path it would really take (LoRA: the
frozen weights multiplied in bf16 by bf16_matmul; full fine-tuning: bf16 autocast), and keeps the
faster. A small slice of rows is timed first, so a CPU where bf16 is pathologically slow is
found in milliseconds, and the full-size timing is sized from the slice so it stays bounded on
any model. The choice is recorded in the job folder (precision.json) so a resumed run keeps it.
On CUDA: bf16 where the GPU supports it. `bf16` true/false in the config always wins.
With several training processes, rank 0 alone measures (with its share of the cores, while the
others wait) and the trainer broadcasts its choice: all ranks must compute in one precision.
"""
import json
import math
import os
import time

from . import job_files

RECORD = 'precision.json'
SLICE_ROWS = 16          # rows of the first, cheap timing
FULL_ROWS = 512          # rows of a training batch's worth of tokens, at most
TARGET_SECONDS = 0.02    # one full-size run aims at this long
ROUNDS = 2
PATHOLOGICAL = 4.0       # bf16 this many times slower than fp32 on the slice: no full timing
MAX_SHAPES = 4           # the heaviest distinct layer shapes are enough to rank the precisions


def available_cores():
    """Cores this process may really use: its CPU affinity, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota:
        cores = min(cores, max(1, int(math.ceil(quota))))
    return max(1, cores)


def _cgroup_quota():
    """CPUs allowed by a cgroup v2 (cpu.max) or v1 (cfs quota/period) limit; None when unlimited."""
    try:
        with open('/sys/fs/cgroup/cpu.max') as f:
            quota, period = f.read().split()[:2]
        return None if quota == 'max' else int(quota) / float(period)
    except (IOError, OSError, ValueError):
        pass
    try:
        with open('/sys/fs/cgroup/cpu/cpu.cfs_quota_us') as f:
            quota = int(f.read())
        with open('/sys/fs/cgroup/cpu/cpu.cfs_period_us') as f:
            period = int(f.read())
        return None if quota <= 0 else quota / float(period)
    except (IOError, OSError, ValueError):
        return None


def layer_shapes(model, lora):
    """{(in_features, out_features): count} of the linear layers whose matmuls the precision
    changes: the frozen base layers under LoRA adapters, or every linear layer (full)."""
    import torch
    shapes = {}
    for module in model.modules():
        layer = getattr(module, 'base_layer', None) if lora else module
        if isinstance(layer, torch.nn.Linear) and (not lora or not layer.weight.requires_grad):
            key = (layer.in_features, layer.out_features)
            shapes[key] = shapes.get(key, 0) + 1
    return shapes


def time_matmul(precision, shape, rows, path, min_runs=3, min_seconds=0.01, max_runs=50):
    """Seconds for one x[rows, in] @ W[out, in]^T as the trainer would run it: the best of at
    least `min_runs` runs and `min_seconds` in all, since one run of a millisecond is easily
    preempted by another process."""
    import torch
    import torch.nn.functional as F
    n_in, n_out = shape
    x = torch.randn(rows, n_in)
    weight = torch.randn(n_out, n_in) * 0.02
    if precision == 'fp32':
        def run():
            F.linear(x, weight)
    elif path == 'lora':  # bf16_matmul: frozen bf16 weight, fp32 activations converted per call
        weight16 = weight.to(torch.bfloat16)

        def run():
            F.linear(x.to(torch.bfloat16), weight16).to(torch.float32)
    else:  # full fine-tuning: bf16 autocast over fp32 tensors
        def run():
            with torch.autocast('cpu', dtype=torch.bfloat16):
                F.linear(x, weight)
    best, spent, runs = None, 0.0, 0
    while runs < max_runs and (runs < min_runs or spent < min_seconds):
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
        spent += elapsed
        runs += 1
    return max(best, 1e-9)


def measure(shapes, path, timer=time_matmul):
    """{'fp32': GFLOP/s, 'bf16': GFLOP/s, 'early': bool} on the heaviest of `shapes`.

    `timer(precision, shape, rows, path) -> seconds` is the timing source (tests give a fake)."""
    heaviest = sorted(shapes, key=lambda s: -s[0] * s[1] * shapes[s])[:MAX_SHAPES]
    if not heaviest:
        return {'fp32': None, 'bf16': None, 'early': False}
    big = heaviest[0]
    rates = {}
    for precision in ('fp32', 'bf16'):
        timer(precision, big, SLICE_ROWS, path)  # warm-up: first calls pay for kernel set-up
        rates[precision] = _gflops(big, SLICE_ROWS, timer(precision, big, SLICE_ROWS, path))
    if rates['bf16'] * PATHOLOGICAL < rates['fp32']:
        return {'fp32': rates['fp32'], 'bf16': rates['bf16'], 'early': True}
    # Both precisions in alternation, twice, best time per shape: another process slowing the
    # machine for a moment then weighs on both alike.
    best = {}
    for _round in range(ROUNDS):
        for shape in heaviest:
            for precision in ('fp32', 'bf16'):
                # Sized from the slice's rate: about TARGET_SECONDS a run, never a long wait.
                per_row = 2.0 * shape[0] * shape[1] / (rates[precision] * 1e9)
                rows = int(max(SLICE_ROWS, min(FULL_ROWS, TARGET_SECONDS / per_row)))
                seconds = timer(precision, shape, rows, path)
                key = (precision, shape)
                if key not in best or seconds / rows < best[key][1] / best[key][0]:
                    best[key] = (rows, seconds)
    totals = {}
    for precision in ('fp32', 'bf16'):
        flops = sum(shapes[s] * 2.0 * best[precision, s][0] * s[0] * s[1] for s in heaviest)
        seconds = sum(shapes[s] * best[precision, s][1] for s in heaviest)
        totals[precision] = flops / seconds / 1e9
    return {'fp32': totals['fp32'], 'bf16': totals['bf16'], 'early': False}


def _gflops(shape, rows, seconds):
    return 2.0 * rows * shape[0] * shape[1] / seconds / 1e9


def describe(choice):
    """The job event: 'precision: fp32 (fp32 122 GFLOP/s, bf16 1 GFLOP/s; measured, 2 threads)'."""
    figures = ''
    if choice.get('fp32_gflops') is not None:
        figures = 'fp32 %.0f GFLOP/s, bf16 %.0f GFLOP/s; ' % (choice['fp32_gflops'], choice['bf16_gflops'])
    return 'precision: %s (%s%s, %s threads)' % (choice['precision'], figures, choice['source'], choice['threads'])


def choose(folder_path, forced, cuda, bf16_supported_on_cuda, shapes_fn, path, resume=False, timer=time_matmul,
           threads=None):
    """Decide bf16 or fp32 for this job, record the decision in the job folder and return it.

    `forced`: the config's `bf16` (True/False) or None; `shapes_fn()` gives layer_shapes lazily
    (only a measurement needs them); `threads`: this process's threads (default: every available
    core), as the measurement runs with them."""
    record_path = os.path.join(folder_path, RECORD)
    threads = threads or available_cores()
    if forced is not None:
        choice = {'precision': 'bf16' if forced else 'fp32', 'source': 'set in the hyperparameters'}
    elif resume and os.path.exists(record_path):
        with open(record_path) as f:
            choice = json.load(f)
        choice['source'] = 'kept from the first run'
    elif cuda:
        choice = {'precision': 'bf16' if bf16_supported_on_cuda else 'fp32', 'source': 'CUDA'}
    else:
        rates = measure(shapes_fn(), path, timer)
        faster = 'bf16' if rates['bf16'] and rates['fp32'] and rates['bf16'] > rates['fp32'] else 'fp32'
        choice = {'precision': faster, 'fp32_gflops': rates['fp32'], 'bf16_gflops': rates['bf16'],
                  'source': 'measured on the %s path%s' % (path, ', bf16 pathologically slow' if rates['early'] else '')}
    choice['threads'] = threads
    job_files.write_json_atomic(record_path, choice)
    return choice
