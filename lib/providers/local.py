"""The local provider: trains in a separate Python 3.11 process (trainer/), one folder per job.

Config: `trainer_python` (the trainer venv's python) and `models_dir` (where base models named by a
relative technical id live). The trainer is detached (own session), so it outlives the Odoo worker
that started it; `check` finds it again from its pid + start time and reads its folder."""
import json
import logging
import os
import signal
import subprocess

from . import register
from .. import trainer_folder
from ..evaluation import files as evaluation_files
from ..exceptions import InvalidRequestError, TrainingFailedError
from ..host import processes
from ..host.trainer_env import ADDON_ROOT, run_trainer_module, trainer_env
from ..hyperparameters import check_processes, trainer_config
from ..model_server import ModelServerError
from ..token_count import PipeCounter, TemplateCounter, tokenizer_counter
from .base import TrainingProvider
from .serving import ServedChat, chat_options, generation_failed  # noqa: F401  (tests import them here)

_logger = logging.getLogger(__name__)
PROBE_TIMEOUT = 120
_TEMPLATE_TABLES = {}  # (model folder, tokenizer config mtime) -> chat template table


def chat_template_table(python, path):
    """What the model's chat template adds around messages (trainer/chat_template_costs.py),
    measured once per model folder and process; None when the trainer environment fails."""
    config = os.path.join(path, 'tokenizer_config.json')
    key = (path, os.path.getmtime(config) if os.path.exists(config) else 0)
    if key not in _TEMPLATE_TABLES:
        try:
            result = run_trainer_module(python, ['trainer.chat_template_costs', '--model', path], PROBE_TIMEOUT)
            _TEMPLATE_TABLES[key] = json.loads(result.stdout.decode().strip().splitlines()[-1])
        except (TrainingFailedError, ValueError, IndexError):
            return None
    return _TEMPLATE_TABLES[key]


@register
class LocalTrainer(ServedChat, TrainingProvider):
    service = 'local'
    capabilities = {'can_resume': True, 'can_chat': True, 'supports_text': True, 'evaluates': True,
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

    def trainer_config(self, spec, resume):
        """What the trainer reads from the job folder's config.json."""
        return dict(trainer_config(spec.hyperparameters), technique=spec.technique, resume=resume,
                    data_format=spec.data_format or 'chat',
                    base_model_path=self.model_path(spec.base_model, spec.base_model_name))

    def validate(self, spec):
        try:
            check_processes(spec.hyperparameters)
        except ValueError as e:
            raise TrainingFailedError(str(e))
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
            resume = bool(spec.resume) and trainer_folder.has_checkpoint(folder)
            trainer_folder.prepare_run(folder, self.trainer_config(spec, resume), resume)
            if not resume:
                data['offsets'] = {}
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
        offsets = data.setdefault('offsets', {})
        alive = trainer_folder.is_alive(data.get('pid'), data.get('start_time'))
        report = trainer_folder.provider_report(spec.work_dir, offsets, alive)
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

    def start_evaluation(self, spec):
        """trainer/evaluate.py as a detached process of the trainer env, like the trainer: it
        writes its status and results into the evaluation folder, which check_evaluation reads.
        A start that finds the process of the same run alive adopts it."""
        data = spec.provider_data
        if data.get('key') == spec.key and trainer_folder.is_alive(data.get('pid'), data.get('start_time')):
            return data['pid']
        config = dict(spec.limits, reference=self.model_path(spec.reference), candidate=self.model_path(spec.candidate),
                      examples=spec.examples, data_format=spec.data_format or 'chat')
        for name in (evaluation_files.STATUS, evaluation_files.SUMMARY, evaluation_files.EXAMPLES):
            if os.path.exists(os.path.join(spec.folder, name)):
                os.remove(os.path.join(spec.folder, name))  # a retry starts clean
        evaluation_files.write_config(spec.folder, config)
        with open(os.path.join(spec.folder, evaluation_files.LOG), 'ab') as log:
            process = processes.spawn([self.python, '-m', 'trainer.evaluate', '--dir', spec.folder], cwd=ADDON_ROOT,
                                      env=trainer_env(), detached=True, stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT)
        data.update(key=spec.key, pid=process.pid, start_time=trainer_folder.process_start_time(process.pid))
        _logger.info('Evaluation %s: evaluator started, pid %s, folder %s', spec.key, process.pid, spec.folder)
        return process.pid

    def check_evaluation(self, spec):
        data = spec.provider_data
        status = evaluation_files.read_status(spec.folder)
        if status.get('state') == 'done':
            return {'status': 'done', 'progress': 100.0, 'summary': evaluation_files.read_summary(spec.folder),
                    'examples': evaluation_files.read_examples(spec.folder)}
        if status.get('state') == 'failed':
            return {'status': 'failed', 'error': status.get('error') or 'the evaluator failed',
                    'log': evaluation_files.log_tail(spec.folder)}
        if not trainer_folder.is_alive(data.get('pid'), data.get('start_time')):
            status = evaluation_files.read_status(spec.folder)  # it may have ended since the first read
            if status.get('state') in ('done', 'failed'):
                return self.check_evaluation(spec)
            return {'status': 'failed', 'error': 'the evaluator process ended without a result',
                    'log': evaluation_files.log_tail(spec.folder)}
        return {'status': 'running', 'progress': status.get('progress') or 0.0}

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
        table = chat_template_table(self.python, path)
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
            if e.status in (400, 404):
                raise InvalidRequestError('Embedding failed: %s' % e)
            raise generation_failed(e)
