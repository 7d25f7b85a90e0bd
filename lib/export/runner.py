"""The export folder and its reading, as lib/jobs/trainer_folder.py is the job folder's: the provider
that trained the model runs `python -m trainer.export` (lib/providers/side_jobs.py: a detached
process on this host, a Ray job on the cluster) and this module prepares its folder, names its
arguments and reads what it wrote.

An export has a folder of its own: `out/` (what the user takes away), `card.json` (facts only Odoo
knows), `events.jsonl` and `export.log` (what the trainer writes while it works; on Ray its output
is in Ray's job log). Python 3.7, no Odoo import."""
import json
import os
import shutil
import zipfile

from ..jobs import trainer_folder
from ..exceptions import TrainingFailedError

FORMATS = [('hf_adapter', 'Hugging Face adapter (LoRA)'), ('hf_merged', 'Hugging Face merged model'),
           ('gguf_f16', 'GGUF f16 (llama.cpp, Ollama)'), ('gguf_q8_0', 'GGUF q8_0 (llama.cpp, Ollama)'),
           ('gguf_q4_0', 'GGUF q4_0, 4-bit (llama.cpp, Ollama)'),
           ('gguf_lora', 'GGUF base + LoRA adapter (llama.cpp, Ollama)')]
OUT = 'out'
EVENTS = 'events.jsonl'
LOG = 'export.log'
CARD = 'card.json'
MANIFEST = 'export.json'  # written by trainer/export.py into out/ when it is done
CHUNK = 1 << 20


def out_dir(folder):
    return os.path.join(folder, OUT)


def prepare(folder, card=None):
    """Create the export's folder with its card facts (out/ is the trainer's to create: it refuses
    one that is not empty)."""
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CARD), 'w') as f:
            json.dump(card or {}, f)
    except OSError as e:
        raise TrainingFailedError('Cannot write the export folder %s: %s' % (folder, e.strerror or e))


def module_args(folder, model_dir, fmt, job_dir=None, convert_dir=None):
    """The arguments of `python -m trainer.export` for this export folder, every path as the process
    that runs it sees them (the caller translates them for a cluster's workers)."""
    args = ['trainer.export', '--model', model_dir, '--out', out_dir(folder), '--format', fmt,
            '--events', os.path.join(folder, EVENTS), '--card', os.path.join(folder, CARD)]
    if job_dir:
        args += ['--job-dir', job_dir]
    if convert_dir:
        args += ['--convert-dir', convert_dir]
    return args


def _read_manifest(folder):
    with open(os.path.join(out_dir(folder), MANIFEST)) as f:
        return json.load(f)


def check(folder, offset, alive, ended_error=None):
    """What happened since `offset` in events.jsonl: {'events', 'offset', 'state' (running, done,
    failed), 'manifest' (when done), 'error' (when failed)}. `alive`: whether the export's process
    (or cluster job) still runs; `ended_error()`: why it ended, when it ended without a result
    (default: the tail of export.log)."""
    events, offset = trainer_folder.read_new_lines(folder, EVENTS, offset)
    report = {'events': events, 'offset': offset, 'state': 'running'}
    failed = [e for e in events if e.get('level') == 'error' and e.get('message', '').startswith('Export failed')]
    manifest_path = os.path.join(out_dir(folder), MANIFEST)
    if failed:
        report.update(state='failed', error=failed[-1]['message'])
    elif os.path.exists(manifest_path):
        report.update(state='done', manifest=_read_manifest(folder))
    elif not alive:
        # Read once more: the process may have written its last lines as it ended.
        late, offset = trainer_folder.read_new_lines(folder, EVENTS, offset)
        report['events'] += late
        report['offset'] = offset
        failed = [e for e in late if e.get('level') == 'error' and e.get('message', '').startswith('Export failed')]
        if failed:
            report.update(state='failed', error=failed[-1]['message'])
        elif os.path.exists(manifest_path):
            report.update(state='done', manifest=_read_manifest(folder))
        else:
            report.update(state='failed', error=(ended_error and ended_error()) or
                          'The export process ended without finishing; its log: %s'
                          % trainer_folder.tail(folder, LOG, 1500).strip()[-1500:])
    return report


def main_file(manifest):
    """The file whose checksum the export shows: the GGUF, else the weights."""
    files = manifest.get('files') or []
    for suffix in ('.gguf', 'model.safetensors', '.safetensors'):
        for entry in sorted(files, key=lambda e: -e['size']):
            if entry['path'].endswith(suffix):
                return entry
    return files[0] if files else None


def delete(folder):
    """Remove an export's folder; a missing one is already deleted."""
    if folder and os.path.isdir(folder):
        shutil.rmtree(folder)


class _Sink(object):
    """A write-only stream zipfile writes into; the generator drains it after each piece, so no
    more than about one chunk is ever held in memory."""

    def __init__(self):
        self.parts = []
        self.position = 0

    def write(self, data):
        self.parts.append(bytes(data))
        self.position += len(data)
        return len(data)

    def tell(self):
        return self.position

    def flush(self):
        pass

    def drain(self):
        data, self.parts = b''.join(self.parts), []
        return data


def zip_stream(folder, prefix):
    """The files under `folder` as a zip (stored, not compressed: weights do not compress),
    produced piece by piece: a generator of bytes for a streamed HTTP response."""
    sink = _Sink()
    with zipfile.ZipFile(sink, 'w', zipfile.ZIP_STORED, allowZip64=True) as archive:
        for root, dirs, names in os.walk(folder):
            dirs.sort()
            for name in sorted(names):
                path = os.path.join(root, name)
                arcname = os.path.join(prefix, os.path.relpath(path, folder))
                with open(path, 'rb') as source, archive.open(arcname, 'w', force_zip64=True) as target:
                    for block in iter(lambda: source.read(CHUNK), b''):
                        target.write(block)
                        yield sink.drain()
                yield sink.drain()
    yield sink.drain()
