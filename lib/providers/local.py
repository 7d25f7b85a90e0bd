"""The local provider: trains in a separate Python 3.11 process (trainer/), one folder per job.

Config: `trainer_python` (the trainer venv's python) and `models_dir` (where base models named by a
relative technical id live). The trainer is detached (own session), so it outlives the Odoo worker
that started it; `check` finds it again from its pid + start time and reads its folder."""
import hashlib
import json
import logging
import os
import signal
import subprocess

from . import register
from ..jobs import trainer_folder
from ..exceptions import InvalidRequestError, ModelNotFoundError, TrainingFailedError
from ..host import processes
from ..host.trainer_env import ADDON_ROOT, run_trainer_module, trainer_env
from ..serving.model_server import ModelServerError
from ..datasets.token_count import PipeCounter, TemplateCounter, tokenizer_counter
from .launcher import TrainerLauncher
from .serving import ServedChat, chat_options, generation_failed  # noqa: F401  (tests import them here)

_logger = logging.getLogger(__name__)
PROBE_TIMEOUT = 120
_TEMPLATE_TABLES = {}  # (model folder, tokenizer config mtime) -> chat template table


def chat_template_table(python, path, cache_dir=None):
    """What the model's chat template adds around messages (trainer/chat_template_costs.py),
    measured once per model folder (and its tokenizer config's mtime): kept in this process and,
    with `cache_dir`, in a file every process reads (the measure starts the trainer's Python, a few
    seconds a worker would otherwise pay at its first validation). None when the trainer
    environment fails."""
    config = os.path.join(path, 'tokenizer_config.json')
    key = (path, os.path.getmtime(config) if os.path.exists(config) else 0)
    if key in _TEMPLATE_TABLES:
        return _TEMPLATE_TABLES[key]
    cached = os.path.join(cache_dir, 'chat-template-%s.json' % hashlib.sha1(repr(key).encode()).hexdigest()) \
        if cache_dir else None
    if cached and os.path.exists(cached):
        try:
            with open(cached) as f:
                _TEMPLATE_TABLES[key] = json.load(f)
            return _TEMPLATE_TABLES[key]
        except (OSError, ValueError):
            pass  # unreadable: measured again below, and rewritten
    try:
        result = run_trainer_module(python, ['trainer.chat_template_costs', '--model', path], PROBE_TIMEOUT)
        table = json.loads(result.stdout.decode().strip().splitlines()[-1])
    except (TrainingFailedError, ValueError, IndexError):
        return None
    if cached:
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
        trainer_folder.write_json_atomic(cached, table)
    _TEMPLATE_TABLES[key] = table
    return table


@register
class LocalTrainer(ServedChat, TrainerLauncher):
    service = 'local'
    capabilities = {'can_resume': True, 'can_chat': True, 'supports_text': True, 'evaluates': True, 'exports': True,
                    'local_embeddings': True,
                    'techniques': ('lora', 'qlora', 'full')}

    @property
    def python(self):
        return self.config.get('trainer_python') or 'python3'

    def model_path(self, model_ref, model_name=None):
        path = model_ref if os.path.isabs(model_ref) else os.path.join(self.config['models_dir'], model_ref)
        if not os.path.isfile(os.path.join(path, 'config.json')) and \
                not os.path.isfile(os.path.join(path, 'adapter_config.json')):
            raise TrainingFailedError('Model "%s": no Hugging Face model folder at %s (set its technical id to '
                                      'a folder, or llm_training_models_dir in the Odoo configuration).'
                                      % (model_name or model_ref, path))
        return path

    def validate(self, spec):
        self.check_settings(spec)
        self.model_path(spec.base_model, spec.base_model_name)
        if spec.technique == 'qlora':
            probe = run_trainer_module(self.python, ['trainer.env_info'], PROBE_TIMEOUT)
            info = json.loads(probe.stdout.decode() or '{}')
            if not info.get('cuda'):
                raise TrainingFailedError('QLoRA needs a CUDA GPU and the trainer environment has none (%s). '
                                          'Choose LoRA or full fine-tuning, or run the trainer on a GPU host.'
                                          % (info.get('device') or 'CPU only'))
            if not info.get('bitsandbytes'):
                raise TrainingFailedError('QLoRA needs bitsandbytes in the trainer environment.')

    def start(self, spec):
        """Start the trainer for this attempt, or adopt the one a previous start of the same
        attempt launched (the launch lock and the pid file make a second trainer impossible, and
        the trainer's own lock on its folder backs that up)."""
        folder, data = spec.work_dir, spec.provider_data
        external_id = 'local-%s-%d-%d' % (spec.database, spec.job_id, spec.attempt)
        with trainer_folder.launch_lock(folder):
            running = trainer_folder.running_trainer(folder, spec.job_key)
            if running:
                data.update(pid=running['pid'], start_time=running['start_time'], resume=False)
                spec.note('Trainer already running (pid %d): adopted' % running['pid'])
                return external_id
            self.prepare_attempt(spec, self.model_path(spec.base_model, spec.base_model_name))
            with open(os.path.join(folder, trainer_folder.LOG), 'ab') as log:
                process = processes.spawn(
                    [self.python, '-m', 'trainer.train', '--job-dir', folder], cwd=ADDON_ROOT, env=trainer_env(),
                    detached=True, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            start_time = trainer_folder.process_start_time(process.pid)
            trainer_folder.write_pid_file(folder, process.pid, start_time, spec.job_key)
        data.update(pid=process.pid, start_time=start_time, resume=False)
        _logger.info('Training job %s: trainer started, pid %s, folder %s', spec.job_id, process.pid, folder)
        return external_id

    def check(self, spec):
        data = spec.provider_data
        report = self.folder_report(spec, trainer_folder.is_alive(data.get('pid'), data.get('start_time')))
        # the trainer's own start (status.json), else its process's, read before it wrote any
        report['started_at'] = report.get('started_at') or data.get('start_time')
        return report

    def cancel(self, spec):
        data = spec.provider_data
        if trainer_folder.is_alive(data.get('pid'), data.get('start_time')):
            # The trainer saves a checkpoint and reports "cancelled" itself.
            os.killpg(data['pid'], signal.SIGTERM)
        else:
            trainer_folder.mark_cancelled(spec.work_dir)

    # -- side jobs (evaluation, export: lib/providers/side_jobs.py) as detached processes here -----
    def runner_model_path(self, model_ref):
        return self.model_path(model_ref)

    def adopt_side_job(self, key, data):
        """The process a previous start of `key` launched, when it is still alive."""
        return data.get('key') == key and trainer_folder.is_alive(data.get('pid'), data.get('start_time'))

    def launch_side_job(self, key, args, folder, log_name, data):
        """`python -m <args>` of the trainer env, detached like the trainer (own session: it outlives
        the Odoo worker), its output appended to the folder's log."""
        try:
            log = open(os.path.join(folder, log_name), 'ab')
        except OSError as e:
            raise TrainingFailedError('Cannot write %s: %s' % (os.path.join(folder, log_name), e.strerror or e))
        try:
            with log:
                process = processes.spawn([self.python, '-m'] + list(args), cwd=ADDON_ROOT, env=trainer_env(),
                                          detached=True, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT)
        except OSError as e:
            raise TrainingFailedError('Cannot run the trainer Python %s (%s); set llm_training_trainer_python in the '
                                      'Odoo configuration.' % (self.python, e))
        where = 'process %d on this host' % process.pid
        data.update(key=key, pid=process.pid, start_time=trainer_folder.process_start_time(process.pid), where=where)
        _logger.info('%s: %s started, pid %s, folder %s', key, args[0], process.pid, folder)
        return where

    def side_job_status(self, data):
        return {'alive': trainer_folder.is_alive(data.get('pid'), data.get('start_time')), 'error': None}

    def side_job_log(self, data, folder, log_name):
        return trainer_folder.tail(folder, log_name)

    def stop_side_job(self, data):
        if trainer_folder.is_alive(data.get('pid'), data.get('start_time')):
            os.killpg(data['pid'], signal.SIGKILL)  # nothing to save: a retry starts again

    def token_counter(self, model_ref):
        """Count as the trainer will see it: the model's chat template (measured once per model
        in the trainer environment) around contents counted with its tokenizer.json; None when
        the model has no tokenizer (the estimate is used)."""
        try:
            path = self.model_path(model_ref)
            from tokenizers import Tokenizer  # noqa: F401
        except (TrainingFailedError, ImportError):
            return None
        tokenizer_json = os.path.join(path, 'tokenizer.json')
        if not os.path.exists(tokenizer_json):
            return None
        table = chat_template_table(self.python, path, self.config.get('cache_dir'))
        if table is None:
            _logger.warning('Model %s: the chat template could not be measured; contents are counted with '
                            'ChatML framing.', path)
            return tokenizer_counter(tokenizer_json)
        exact = PipeCounter([self.python, '-m', 'trainer.chat_template_costs', '--model', path, '--serve'],
                            env=trainer_env(), cwd=ADDON_ROOT, timeout=PROBE_TIMEOUT)
        return TemplateCounter(tokenizer_json, table, exact=exact)

    def served_path(self, model_ref, where):
        return self.model_path(model_ref)  # this host only: its models are on its own disk

    def embed(self, model_ref, texts, input_type='passage'):
        """Embeddings by a named model of this host's model server (trainer/knowledge/embed.py)."""
        try:
            return self.model_server().embed(texts, model_ref, input_type)['data']
        except ModelServerError as e:
            if e.status == 404:
                raise ModelNotFoundError('Embedding failed: %s' % e)
            if e.status == 400:
                raise InvalidRequestError('Embedding failed: %s' % e)
            raise generation_failed(e)
