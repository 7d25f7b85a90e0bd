"""Data-parallel training (distributed.py): the real model, the real torchrun, gloo, 2 processes."""
import os
import signal
import subprocess
import sys
import time

import pytest

from trainer.precision import available_cores
from trainer.tests.helpers import read_jsonl, read_status, write_job
from trainer.tests.test_train import launch, run, wait_for_step


def two_processes_can_run():
    import torch
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip('two processes on CUDA need two GPUs')


def train_losses(job):
    return [m['train_loss'] for m in read_jsonl(os.path.join(job, 'metrics.jsonl')) if 'train_loss' in m]


def test_two_processes_reach_the_loss_of_one(tmp_path, model_dir):
    """Two processes with a global batch of 8 (4 each) follow the one-process run with batch 8.

    Made deterministic: fp32 forced, no LoRA dropout, 8 examples of one token length (the helper's
    questions differ by one digit) and a global batch equal to the whole data set, so both runs
    see the same examples at every step, packed into rows whose per-example attention does not
    depend on the neighbours. What differs is the order of the fp32 sums (each process's partial
    gradients, then gloo's all_reduce; 1 thread per process against 2 threads), about 1e-7 relative
    per sum. Measured: 4e-7 apart after 3 steps. Tolerance 1e-4: 250x that, while training
    without DDP's gradient sync (each process following its own half) ends 1.4e-3 away after
    3 steps, and a loss not scaled back up for DDP's gradient average logs half the loss."""
    two_processes_can_run()
    losses = {}
    for processes in (1, 2):
        job = write_job(str(tmp_path / ('p%d' % processes)), model_dir, n_train=8, n_valid=0, batch_size=8,
                        max_steps=3, bf16=False, lora_dropout=0, max_seq_length=64, save_steps=1000,
                        num_processes=processes)
        status = run(job)
        assert status['state'] == 'completed', status
        losses[processes] = train_losses(job) + [status['final_metrics']['train_loss']]
    assert len(losses[1]) == 4, losses
    assert losses[2] == pytest.approx(losses[1], abs=1e-4), losses
    assert losses[1][2] < losses[1][0] * 0.5, 'it trained'
    events = [e['message'] for e in read_jsonl(os.path.join(str(tmp_path / 'p2'), 'events.jsonl'))]
    threads = max(1, available_cores() // 2)
    assert 'Data parallel: 2 processes (gloo), 4 examples each per step, %d CPU thread(s) each' % threads in events


def worker_pid(launcher_pid, rank):
    import psutil
    for child in psutil.Process(launcher_pid).children():
        if child.environ().get('RANK') == str(rank):
            return child.pid
    raise AssertionError('no worker of rank %d under %d' % (rank, launcher_pid))


@pytest.mark.parametrize('target', ['launcher group', 'rank 1 only'])
def test_cancel_with_two_processes(tmp_path, model_dir, target):
    """Cancel as Odoo sends it (SIGTERM to the launcher's process group: torchrun alone, since
    torchrun gives each worker a session of its own) and as one worker alone may get it (rank 0
    learns it from the step-end agreement): both ranks stop at one step, the checkpoint is saved,
    the job ends "cancelled" and torchrun exits 0."""
    two_processes_can_run()
    job = write_job(str(tmp_path / 'cancel'), model_dir, n_train=24, n_valid=0, batch_size=4, epochs=20,
                    max_seq_length=64, save_steps=1000, num_processes=2)
    proc = launch(job)
    wait_for_step(job, 1)
    assert read_status(job)['pid'] == proc.pid, 'the status names the launcher, which became torchrun'
    if target == 'launcher group':
        # the exec kept the folder lock: a second trainer is refused and touches nothing
        assert launch(job).wait(60) == 3
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.kill(worker_pid(proc.pid, 1), signal.SIGTERM)
    assert proc.wait(120) == 0, open(os.path.join(job, 'trainer.log')).read()[-3000:]
    status = read_status(job)
    assert status['state'] == 'cancelled', status
    checkpoint = os.path.join(job, 'checkpoints', 'checkpoint-%d' % status['step'])
    assert os.path.isdir(checkpoint), 'the checkpoint of the step both ranks stopped at'
    assert {'adapter_model.safetensors', 'rng_state_0.pth', 'rng_state_1.pth'} <= set(os.listdir(checkpoint))
    events = [e['message'] for e in read_jsonl(os.path.join(job, 'events.jsonl'))]
    assert 'Cancel received: saving a checkpoint at step %d and stopping' % status['step'] in events, events


def test_batch_that_does_not_divide_is_refused_before_starting(tmp_path, model_dir):
    job = write_job(str(tmp_path / 'odd'), model_dir, batch_size=5, num_processes=2)
    proc = launch(job)
    assert proc.wait(60) == 1
    assert read_status(job)['error'] == ('ValueError: batch_size 5 cannot be shared evenly by 2 processes '
                                         '(num_processes): use a multiple of 2')


def test_only_rank_zero_writes_the_folder(tmp_path, monkeypatch):
    from trainer.job_files import JobFolder
    monkeypatch.setenv('RANK', '1')
    folder = JobFolder(str(tmp_path))
    folder.update_status(state='running')
    folder.event('hello')
    folder.metric({'step': 1})
    assert os.listdir(str(tmp_path)) == []
    monkeypatch.setenv('RANK', '0')
    JobFolder(str(tmp_path)).update_status(state='running')
    assert os.listdir(str(tmp_path)) == ['status.json']


def test_a_sigterm_blocked_at_the_launcher_is_seen_by_its_workers(monkeypatch):
    """The launcher's pending SIGTERM is how a Cancel sent to its process group reaches the workers."""
    from trainer import distributed
    code = ('import signal, sys, time; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); '
            'print("ready", flush=True); time.sleep(60)')
    launcher = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE)
    try:
        assert launcher.stdout.readline().strip() == b'ready'
        monkeypatch.setenv(distributed.LAUNCHER_PID, str(launcher.pid))
        assert distributed.launcher_cancelled(), 'not our parent: a launcher gone'
        monkeypatch.setattr(os, 'getppid', lambda: launcher.pid)  # as in a worker
        assert not distributed.launcher_cancelled()
        launcher.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        while not distributed.launcher_cancelled():
            assert time.time() < deadline, 'the pending SIGTERM is not seen'
            time.sleep(0.01)
        assert launcher.poll() is None, 'blocked, not delivered'
    finally:
        launcher.kill()
        launcher.wait()
