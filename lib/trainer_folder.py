"""Read what the trainer process writes into a job folder (names as in trainer/job_files.py).

Runs on Odoo's Python 3.7 and never imports the trainer. JSON-lines files are read from a byte
offset, so each poll reads only what is new; a trailing partial line is left for the next poll.
"""
import json
import os

CONFIG = 'config.json'
STATUS = 'status.json'
METRICS = 'metrics.jsonl'
EVENTS = 'events.jsonl'
LOG = 'trainer.log'
CHECKPOINTS = 'checkpoints'

# trainer state -> provider status (lib/job_status.py)
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
    path = os.path.join(folder, CHECKPOINTS)
    return os.path.isdir(path) and any(d.startswith('checkpoint-') for d in os.listdir(path))


def process_start_time(pid):
    """The kernel's start time of `pid` (clock ticks since boot), or None if there is no such
    process. Stored with the pid, it tells our trainer from a later process reusing its pid."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            stat = f.read()
    except (IOError, OSError):
        return None
    fields = stat[stat.rindex(')') + 2:].split()
    if fields[0] == 'Z':  # exited, not yet reaped
        return None
    return int(fields[19])


def is_alive(pid, start_time):
    if not pid:
        return False
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child and has exited
    except ChildProcessError:
        pass
    return process_start_time(pid) == start_time


def provider_report(folder, offsets, alive):
    """A status report (lib/job_status.py) from the folder; offsets = {'metrics': n, 'events': m}."""
    status = read_status(folder) or {'state': 'starting'}
    metrics, offsets['metrics'] = read_new_lines(folder, METRICS, offsets.get('metrics', 0))
    events, offsets['events'] = read_new_lines(folder, EVENTS, offsets.get('events', 0))
    report = {'status': TRAINER_STATUS.get(status.get('state'), 'running'),
              'progress': status.get('progress'), 'step': status.get('step'),
              'total_steps': status.get('total_steps'), 'epoch': status.get('epoch'),
              'eta': status.get('eta'), 'trained_tokens': status.get('tokens_seen'),
              'metrics': metrics, 'events': events, 'log': tail(folder)}
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
        report['result'] = {'model_ref': result.get('model_ref'), 'description': json.dumps(final, sort_keys=True)}
        # the speed this machine reached, for later jobs' time estimates
        report['tokens_per_second'] = final.get('tokens_per_second')
        report['precision'] = final.get('precision')
    return report


def write_json_atomic(path, data):
    tmp = '%s.tmp.%d' % (path, os.getpid())
    with open(tmp, 'w') as f:
        json.dump(data, f)
    os.replace(tmp, path)
