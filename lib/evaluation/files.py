"""The evaluation folder, as lib/trainer_folder.py is the job folder: what Odoo writes for
trainer/evaluate.py and reads back (the same file names; no trainer import here)."""
import json
import os

CONFIG = 'config.json'
STATUS = 'status.json'
EXAMPLES = 'examples.jsonl'
SUMMARY = 'summary.json'
PID = 'evaluator.pid'
LOG = 'evaluator.log'


def write_config(folder, config):
    os.makedirs(folder, mode=0o700, exist_ok=True)
    tmp = os.path.join(folder, CONFIG + '.tmp')
    with open(tmp, 'w') as f:
        json.dump(config, f)
    os.replace(tmp, os.path.join(folder, CONFIG))


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
    path = os.path.join(folder, LOG)
    if not os.path.exists(path):
        return ''
    with open(path, 'rb') as f:
        f.seek(max(0, os.path.getsize(path) - size))
        return f.read().decode('utf-8', 'replace')
