"""Going through Ray: time from Submit to the first training step, local provider vs Ray provider.

    python bench/bench_ray.py [--repeats 2]     (Odoo's venv; scripts/bench.sh runs it)

Uses the provider adapters alone (lib/providers: plain Python, no Odoo): the same prepared job
folder is started by the local adapter (a detached trainer process) and by the Ray adapter (a Ray
job through the Jobs REST API of a real single-node head started here on free loopback ports),
`--repeats` times in alternation. Each run is timed from `start()` to the trainer's status
reporting step 1, then cancelled. Prints both times and the overhead of Ray (its job start, the
runtime env, the entrypoint), with the machine it ran on.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

from lib.jobs import trainer_folder  # noqa: E402
from lib.providers.base import JobSpec  # noqa: E402
from lib.providers.local import LocalTrainer  # noqa: E402
from lib.providers.ray_jobs import RayJobs  # noqa: E402
from ray_head import RayHead  # noqa: E402
from bench.machine import cpu_line  # noqa: E402

MODEL_DIR = os.environ.get('LLMT_BASE_MODEL_DIR', os.path.expanduser('~/.cache/llm_training/models/SmolLM2-135M-Instruct'))


def prepared_folder(root, name):
    folder = os.path.join(root, name)
    os.makedirs(folder)
    with open(os.path.join(folder, 'train.jsonl'), 'w') as f:
        for i in range(32):
            f.write(json.dumps({'messages': [{'role': 'user', 'content': 'What is code %d?' % i},
                                             {'role': 'assistant', 'content': 'Code %d is MANGO-%d.' % (i, i)}]}) + '\n')
    return folder


def time_to_first_step(adapter, spec, timeout=600):
    started = time.time()
    spec.external_id = adapter.start(spec)
    while time.time() - started < timeout:
        status = trainer_folder.read_status(spec.work_dir) or {}
        if status.get('step', 0) >= 1:
            seconds = time.time() - started
            adapter.cancel(spec)
            return seconds
        if status.get('state') == 'failed':
            raise RuntimeError('%s: %s' % (adapter.service, status.get('error')))
        time.sleep(0.2)
    raise RuntimeError('%s: no first step within %d s' % (adapter.service, timeout))


def wait_ended(adapter, spec, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if adapter.check(spec)['status'] in ('cancelled', 'failed', 'succeeded'):
            return
        time.sleep(0.5)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeats', type=int, default=2)
    args = parser.parse_args()
    python = os.environ['LLMT_TRAINER_PYTHON']
    print('machine: %s' % cpu_line())
    storage = tempfile.mkdtemp(prefix='llmt-bench-ray-')
    head = RayHead(python)
    head.start()
    try:
        common = {'name': 'bench', 'trainer_python': python, 'models_dir': os.path.dirname(MODEL_DIR),
                  'request_timeout': 30}
        adapters = {'local': LocalTrainer(common),
                    'ray': RayJobs(dict(common, dashboard_url=head.url, storage_path=storage, worker_python=python))}
        times = {'local': [], 'ray': []}
        for repeat in range(args.repeats):
            for service, adapter in adapters.items():
                name = '%s-%d' % (service, repeat)
                spec = JobSpec(job_key='bench-%s-%d' % (name, os.getpid()), attempt=1, database='bench', job_id=repeat,
                               name=name, base_model=MODEL_DIR, technique='lora', work_dir=prepared_folder(storage, name),
                               hyperparameters={'epochs': 50, 'batch_size': 4, 'max_seq_length': 64})
                times[service].append(time_to_first_step(adapter, spec))
                wait_ended(adapter, spec)
                print('  %-5s run %d: %.1f s from start to the first step' % (service, repeat + 1, times[service][-1]),
                      flush=True)
        local, ray = statistics.median(times['local']), statistics.median(times['ray'])
        print('submit to first step (median of %d): local %.1f s, Ray %.1f s; going through Ray adds %.1f s (%.2fx)'
              % (args.repeats, local, ray, ray - local, ray / local))
    finally:
        head.stop()


if __name__ == '__main__':
    main()
