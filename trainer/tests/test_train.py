"""Real training of the real SmolLM2-135M for a few steps, through the trainer's CLI process."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from trainer.tests.helpers import read_jsonl, read_status, write_job

TRAINER_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launch(job_dir, *extra):
    env = dict(os.environ, PYTHONPATH=TRAINER_ROOT)
    log = open(os.path.join(job_dir, 'trainer.log'), 'ab')
    return subprocess.Popen([sys.executable, '-m', 'trainer.train', '--job-dir', job_dir] + list(extra),
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def run(job_dir, *extra, timeout=600):
    proc = launch(job_dir, *extra)
    assert proc.wait(timeout) == 0, open(os.path.join(job_dir, 'trainer.log')).read()[-3000:]
    return read_status(job_dir)


def wait_for_step(job_dir, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(os.path.join(job_dir, 'status.json')) and read_status(job_dir).get('step', 0) >= step:
            return
        time.sleep(0.2)
    raise AssertionError('the trainer did not reach step %d' % step)


def test_lora_trains_and_loss_goes_down(tmp_path, model_dir):
    job = write_job(str(tmp_path / 'lora'), model_dir, epochs=3, batch_size=2)
    status = run(job)
    assert status['state'] == 'completed', status
    assert status['step'] == status['total_steps'] == 36  # 24 examples / batch 2 x 3 epochs
    metrics = read_jsonl(os.path.join(job, 'metrics.jsonl'))
    losses = [m['train_loss'] for m in metrics if 'train_loss' in m]
    assert len(losses) == 36
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.7, losses
    assert any('valid_loss' in m for m in metrics)
    assert any(m.get('tokens_per_second', 0) > 0 for m in metrics)
    final = status['final_metrics']
    assert final['precision'] in ('bf16', 'fp32') and final['tokens_per_second'] > 0
    events = [e['message'] for e in read_jsonl(os.path.join(job, 'events.jsonl'))]
    # 36 steps: precision and threads are chosen on the job's first training steps (kept)
    tuned = [m for m in events if m.startswith('precision: %s, %d thread' % (final['precision'], final['threads']))]
    assert tuned and 'measured on' in tuned[-1] and 'training steps of this job (start)' in tuned[0], events
    assert final['tuning_measurements'] >= 1
    assert final['perplexity'] > 1 and 0 <= final['valid_token_accuracy'] <= 1
    result = status['result']['model_ref']
    assert os.path.exists(os.path.join(result, 'adapter_config.json'))
    assert os.path.exists(os.path.join(result, 'tokenizer.json'))
    # the result loads and answers with what it learned
    from trainer.serve import ModelCache, chat
    reply = chat(ModelCache(), result, [{'role': 'user', 'content': 'What is the code word number 3?'}], max_tokens=12)
    assert 'PINEAPPLE' in reply['text'], reply


def test_full_fine_tuning(tmp_path, model_dir):
    job = write_job(str(tmp_path / 'full'), model_dir, technique='full', epochs=1, learning_rate=5e-5, n_valid=0)
    status = run(job)
    assert status['state'] == 'completed', status
    result = status['result']['model_ref']
    assert os.path.exists(os.path.join(result, 'model.safetensors'))
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(result).num_parameters() > 100e6


def test_qlora_without_cuda_fails_clearly(tmp_path, model_dir):
    import torch
    if torch.cuda.is_available():
        pytest.skip('this machine has a CUDA GPU')
    job = write_job(str(tmp_path / 'qlora'), model_dir, technique='qlora')
    proc = launch(job)
    assert proc.wait(120) == 1
    status = read_status(job)
    assert status['state'] == 'failed'
    assert 'QLoRA needs a CUDA GPU' in status['error']


def test_cancel_saves_checkpoint_then_resume_continues(tmp_path, model_dir):
    job = write_job(str(tmp_path / 'cancel'), model_dir, epochs=20, save_steps=1000)
    proc = launch(job)
    wait_for_step(job, 3)
    # a second trainer on the same folder is refused by the folder lock and touches nothing
    status_before = read_status(job)
    second = launch(job)
    assert second.wait(60) == 3
    assert proc.poll() is None, 'the first trainer goes on'
    assert read_status(job)['pid'] == status_before['pid'] == proc.pid
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(120) == 0
    status = read_status(job)
    assert status['state'] == 'cancelled'
    checkpoints = [d for d in os.listdir(os.path.join(job, 'checkpoints')) if d.startswith('checkpoint-')]
    assert checkpoints, 'a checkpoint is saved on cancel'
    stopped_at = int(sorted(checkpoints, key=lambda d: int(d.split('-')[1]))[-1].split('-')[1])
    assert stopped_at >= 3
    # resume: continues from the checkpoint's step, not from 0
    config = json.load(open(os.path.join(job, 'config.json')))
    config.update(epochs=20, max_steps=stopped_at + 2)
    json.dump(config, open(os.path.join(job, 'config.json'), 'w'))
    status = run(job, '--resume')
    assert status['state'] == 'completed'
    events = [e['message'] for e in read_jsonl(os.path.join(job, 'events.jsonl'))]
    assert any(m.startswith('Resuming from checkpoint-%d' % stopped_at) for m in events), events
    # chosen again on resume (the machine and its load may have changed since the first run); the
    # first run was cancelled within the steps its tuning measures on, so it may have none
    resumed = events[max(i for i, m in enumerate(events) if m.startswith('Cancel')) + 1:]
    assert sum(1 for m in resumed if m.startswith('precision: ')) == 1, events
    steps = [m['step'] for m in read_jsonl(os.path.join(job, 'metrics.jsonl')) if 'train_loss' in m]
    assert steps[-1] == stopped_at + 2
    assert steps.count(1) == 1, 'the resumed run did not start again from step 1'


def test_bad_config_fails_with_message(tmp_path, model_dir):
    job = write_job(str(tmp_path / 'bad'), model_dir, technique='prefix-tuning')
    proc = launch(job)
    assert proc.wait(120) == 1
    assert "unknown technique 'prefix-tuning'" in read_status(job)['error']
