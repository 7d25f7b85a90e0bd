"""The evaluation folder, as lib/jobs/trainer_folder.py is the job folder: what Odoo writes for
trainer/evaluate.py and reads back (the names are trainer/job_files.py's)."""
import json
import os

from ..jobs import trainer_folder
from ..jobs.trainer_folder import CONFIG, STATUS

EXAMPLES = trainer_folder.EVAL_EXAMPLES
SUMMARY = trainer_folder.EVAL_SUMMARY
LOG = trainer_folder.EVAL_LOG
PID = 'evaluator.pid'


def write_config(folder, config):
    os.makedirs(folder, mode=0o700, exist_ok=True)
    trainer_folder.write_json_atomic(os.path.join(folder, CONFIG), config)


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (IOError, OSError, ValueError):
        return None


def read_status(folder):
    return _read_json(os.path.join(folder, STATUS)) or {}


def read_summary(folder):
    return _read_json(os.path.join(folder, SUMMARY))


def read_examples(folder):
    path = os.path.join(folder, EXAMPLES)
    if not os.path.exists(path):
        return []
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]


def log_tail(folder, size=4000):
    return trainer_folder.tail(folder, LOG, size)
