"""The job folder: what Odoo writes for the trainer and what the trainer writes back.

Odoo writes   config.json, train.jsonl, validation.jsonl, eval.jsonl
The trainer   status.json  (rewritten atomically: temp file + os.replace, never half-read)
writes        metrics.jsonl, events.jsonl (appended, one JSON object a line)
              trainer.log, checkpoints/, result/ (adapter or full weights + tokenizer),
              precision.json (the last precision/threads choice and its step times), trainer.lock
The Odoo side (lib/jobs/trainer_folder.py, Python 3.7) imports this module for the names and the atomic
write: keep it to the standard library and Python 3.7.
With several training processes (distributed.py) only rank 0 writes: the others' writes are no-ops.
"""
import json
import os
import time

CONFIG = 'config.json'
STATUS = 'status.json'
METRICS = 'metrics.jsonl'
EVENTS = 'events.jsonl'
CHECKPOINTS = 'checkpoints'
RESULT = 'result'
TRAIN_FILE = 'train.jsonl'
VALIDATION_FILE = 'validation.jsonl'
EVAL_FILE = 'eval.jsonl'  # the evaluation hold-out: Odoo moves it out of train.jsonl, never trained on
# The trainer's defaults for the settings Odoo shows on a job (its form, the job wizard, the
# estimate): config.json may leave any of them out, and 0 in epochs or batch_size means these.
CONFIG_DEFAULTS = {'epochs': 3, 'batch_size': 4, 'learning_rate': 2e-4, 'lora_r': 16, 'lora_alpha': 32,
                   'lora_dropout': 0.05, 'max_seq_length': 1024, 'seed': 42}
LOG = 'trainer.log'  # the trainer's stdout and stderr, written by whoever launched it
# An evaluation's folder (trainer/evaluate.py; Odoo: lib/evaluation/files.py) has its own CONFIG and
# STATUS (the names above) and these:
EVAL_EXAMPLES = 'examples.jsonl'  # one scored example a line
EVAL_SUMMARY = 'summary.json'     # the metrics of both models
EVAL_LOG = 'evaluator.log'        # the evaluator's stdout and stderr
TRAINER_LOCK = 'trainer.lock'  # held (flock) by the one trainer that writes this folder


def write_json_atomic(path, data):
    """Replace `path` by `data` as JSON: a reader sees the old file or the new one, never half of
    it, and after a crash the new one is whole (fsync before the rename)."""
    tmp = '%s.tmp.%d' % (path, os.getpid())
    with open(tmp, 'w') as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def append_jsonl(path, record):
    # One write() per line, flushed: a reader sees whole lines (it ignores a trailing partial one).
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


class JobFolder(object):
    def __init__(self, path):
        self.path = path
        # RANK: set by torchrun for each worker; the folder has one writer, rank 0.
        self.writes = os.environ.get('RANK', '0') == '0'
        # The pid whoever started the trainer tracks: the launcher's, also seen from its workers.
        pid = int(os.environ.get('TRAINER_LAUNCHER_PID') or os.getpid())
        self.status = {'state': 'starting', 'step': 0, 'total_steps': 0, 'epoch': 0.0, 'progress': 0.0,
                       'eta': None, 'tokens_seen': 0, 'error': None, 'pid': pid, 'updated_at': time.time(),
                       'started_at': time.time()}  # when this run began: the job's Started At

    def file(self, name):
        return os.path.join(self.path, name)

    def read_config(self):
        with open(self.file(CONFIG)) as f:
            return json.load(f)

    def update_status(self, **values):
        self.status.update(values, updated_at=time.time())
        if self.writes:
            write_json_atomic(self.file(STATUS), self.status)

    def event(self, message, level='info', **data):
        if self.writes:
            append_jsonl(self.file(EVENTS), {'id': '%d-%s' % (os.getpid(), time.time()), 'created_at': int(time.time()),
                                             'level': level, 'message': message, 'data': data or None})

    def metric(self, record):
        if self.writes:
            append_jsonl(self.file(METRICS), record)
