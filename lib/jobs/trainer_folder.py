"""Read what the trainer process writes into a job folder.

Runs on Odoo's Python 3.7. Of the trainer it imports only trainer/job_files.py (standard library
alone), which owns the folder's file names and the atomic JSON write. JSON-lines files are read from a byte
offset, so each poll reads only what is new; a trailing partial line is left for the next poll.
"""
import json
import os

import psutil

from ..host.file_lock import held

try:
    from ...trainer.job_files import (CHECKPOINTS, CONFIG, CONFIG_DEFAULTS, EVAL_EXAMPLES, EVAL_FILE,  # noqa: F401
                                      EVAL_LOG, EVAL_SUMMARY, EVENTS, LOG, METRICS, STATUS, TRAIN_FILE,
                                      VALIDATION_FILE, write_json_atomic)
except (ImportError, ValueError):  # lib imported as a top-level package (bench/), the addon root on the path
    from trainer.job_files import (CHECKPOINTS, CONFIG, CONFIG_DEFAULTS, EVAL_EXAMPLES, EVAL_FILE,  # noqa: F401
                                   EVAL_LOG, EVAL_SUMMARY, EVENTS, LOG, METRICS, STATUS, TRAIN_FILE,
                                   VALIDATION_FILE, write_json_atomic)

PID_FILE = 'trainer.pid'     # written by the launcher: pid, start time and job key of the trainer
LAUNCH_LOCK = 'launch.lock'  # held by a launcher while it checks and starts

# trainer state -> provider status (lib/jobs/job_status.py)
TRAINER_STATUS = {'starting': 'queued', 'running': 'running', 'completed': 'succeeded',
                  'failed': 'failed', 'cancelled': 'cancelled'}


def read_status(folder):
    path = os.path.join(folder, STATUS)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_new_lines(folder, name, offset):
    """(records, new offset) of the complete lines after byte `offset`."""
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return [], offset
    with open(path, 'rb') as f:
        f.seek(offset)
        chunk = f.read()
    end = chunk.rfind(b'\n') + 1
    records = [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]
    return records, offset + end


def tail(folder, name=LOG, size=4000):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return ''
    with open(path, 'rb') as f:
        f.seek(max(0, os.path.getsize(path) - size))
        return f.read().decode('utf-8', 'replace')


def has_checkpoint(folder):
    """Whether the folder holds a complete checkpoint (trainer_state.json is written last; see
    trainer/train.py's last_checkpoint)."""
    path = os.path.join(folder, CHECKPOINTS)
    return os.path.isdir(path) and any(
        d.startswith('checkpoint-') and os.path.isfile(os.path.join(path, d, 'trainer_state.json'))
        for d in os.listdir(path))


def list_checkpoints(folder):
    """[(step, path, mtime)] of the folder's complete checkpoints, oldest first."""
    path = os.path.join(folder, CHECKPOINTS)
    if not os.path.isdir(path):
        return []
    found = []
    for name in os.listdir(path):
        step = name[len('checkpoint-'):]
        full = os.path.join(path, name)
        if name.startswith('checkpoint-') and step.isdigit() and os.path.isfile(os.path.join(full, 'trainer_state.json')):
            found.append((int(step), full, int(os.path.getmtime(os.path.join(full, 'trainer_state.json')))))
    return sorted(found)


def process_start_time(pid):
    """When `pid` started (psutil's create_time), or None if there is no such live process.
    Stored with the pid, it tells our trainer from a later process reusing its pid."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:  # exited, not yet reaped
            return None
        return process.create_time()
    except (psutil.Error, ValueError):
        return None


def is_alive(pid, start_time):
    if not pid:
        return False
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child and has exited
    except ChildProcessError:
        pass
    started = process_start_time(pid)
    return started is not None and start_time is not None and abs(started - start_time) < 0.01


def running_trainer(folder, job_key):
    """The live trainer this job attempt already launched in `folder` ({'pid', 'start_time'}), or None."""
    path = os.path.join(folder, PID_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        launched = json.load(f)
    if launched.get('job_key') == job_key and is_alive(launched.get('pid'), launched.get('start_time')):
        return launched
    return None


def launch_lock(folder, timeout=30):
    """One launcher at a time in a job folder: a second start waits, then finds the first's trainer."""
    return held(os.path.join(folder, LAUNCH_LOCK), timeout, RuntimeError)


def write_pid_file(folder, pid, start_time, job_key):
    write_json_atomic(os.path.join(folder, PID_FILE), {'pid': pid, 'start_time': start_time, 'job_key': job_key})


def prepare_run(folder, config, resume):
    """Write the run's config.json. A fresh status always (a stale "running" must not be read as
    this run's); the metrics and events of an earlier run are kept on resume, with the offsets
    already read."""
    write_json_atomic(os.path.join(folder, CONFIG), config)
    for name in (STATUS,) if resume else (STATUS, METRICS, EVENTS):
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))


def mark_cancelled(folder):
    """A run with no live trainer is cancelled by saying so in its status (unless it ended)."""
    status = read_status(folder) or {}
    if status.get('state') not in ('completed', 'failed', 'cancelled'):
        status['state'] = 'cancelled'
        write_json_atomic(os.path.join(folder, STATUS), status)


def provider_report(folder, offsets, alive):
    """A status report (lib/jobs/job_status.py) from the folder; offsets = {'metrics': n, 'events': m}."""
    status = read_status(folder) or {'state': 'starting'}
    metrics, offsets['metrics'] = read_new_lines(folder, METRICS, offsets.get('metrics', 0))
    events, offsets['events'] = read_new_lines(folder, EVENTS, offsets.get('events', 0))
    report = {'status': TRAINER_STATUS.get(status.get('state'), 'running'),
              'progress': status.get('progress'), 'step': status.get('step'),
              'total_steps': status.get('total_steps'), 'epoch': status.get('epoch'),
              'eta': status.get('eta'), 'trained_tokens': status.get('tokens_seen'),
              'started_at': status.get('started_at'),
              'metrics': metrics, 'events': events, 'log': tail(folder)}
    if report['status'] in ('succeeded', 'failed', 'cancelled') and alive:
        # The trainer writes its final state just before it exits: the job ends once the process
        # has, so a resume never meets the old trainer still holding the folder.
        report['status'] = 'running'
    if report['status'] == 'failed':
        report['error'] = 'The trainer failed: %s' % status.get('error')
    elif report['status'] in ('queued', 'running') and not alive:
        # Final states are written before the process exits; a dead trainer without one was killed.
        report['status'] = 'failed'
        report['error'] = ('The trainer process stopped without reporting (killed, out of memory, or the '
                           'machine restarted) at step %s. Resume the job to continue from its last '
                           'checkpoint.' % status.get('step', 0))
    if report['status'] == 'succeeded':
        result = status.get('result') or {}
        final = status.get('final_metrics') or {}
        report['result'] = {'model_ref': result.get('model_ref'), 'metrics': final}
        # the speed this machine reached, for later jobs' time estimates
        report['tokens_per_second'] = final.get('tokens_per_second')
        report['precision'] = final.get('precision')
    return report

