# -*- coding: utf-8 -*-
"""The local provider: trains in a separate Python 3.11 process (trainer/), one folder per job.

Paths come from odoo.conf: `llm_training_trainer_python` (the trainer venv's python) and
`llm_training_models_dir` (where base models named by a relative technical id live). The
process is detached (own session), so it outlives the Odoo worker that started it; the poller
finds it again from its pid + start time and reads its folder."""
import json
import logging
import os
import signal
import subprocess

from odoo import _, models, tools

from ..lib import trainer_folder
from ..lib.hyperparameters import trainer_config
from ..lib.token_count import PipeCounter, TemplateCounter, tokenizer_counter
from ..lib.exceptions import TrainingFailedError

_logger = logging.getLogger(__name__)
ADDON_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE_TIMEOUT = 120
GENERATE_TIMEOUT = 300
_TEMPLATE_TABLES = {}  # (model folder, tokenizer config mtime) -> chat template table


def trainer_python():
    return tools.config.get('llm_training_trainer_python') or 'python3'


def models_dir():
    return tools.config.get('llm_training_models_dir') or os.path.join(tools.config['data_dir'], 'llm_training', 'models')


def trainer_env():
    """The environment of every trainer-env process (one place)."""
    return dict(os.environ, PYTHONPATH=ADDON_ROOT, TOKENIZERS_PARALLELISM='false')


def chat_template_table(path):
    """What the model's chat template adds around messages (trainer/chat_template_costs.py),
    measured once per model folder and Odoo process; None when the trainer environment fails."""
    key = (path, os.path.getmtime(os.path.join(path, 'tokenizer_config.json'))
           if os.path.exists(os.path.join(path, 'tokenizer_config.json')) else 0)
    if key not in _TEMPLATE_TABLES:
        try:
            result = run_trainer_module(['trainer.chat_template_costs', '--model', path], PROBE_TIMEOUT)
            _TEMPLATE_TABLES[key] = json.loads(result.stdout.decode().strip().splitlines()[-1])
        except (TrainingFailedError, ValueError, IndexError):
            return None
    return _TEMPLATE_TABLES[key]


def run_trainer_module(args, timeout):
    """Run `python -m trainer.<args>` in the trainer env and return its completed process."""
    try:
        return subprocess.run([trainer_python(), '-m'] + args, env=trainer_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout, cwd=ADDON_ROOT)
    except subprocess.TimeoutExpired:
        raise TrainingFailedError(_('The trainer environment did not answer within %d s.') % timeout)
    except OSError as e:
        raise TrainingFailedError(_('Cannot run the trainer Python %s (%s); set llm_training_trainer_python '
                                    'in the Odoo configuration.') % (trainer_python(), e))


class LlmProvider(models.Model):
    _inherit = 'llm.provider'

    def _local_model_path(self, model):
        path = model.model_ref if os.path.isabs(model.model_ref) else os.path.join(models_dir(), model.model_ref)
        if not os.path.isfile(os.path.join(path, 'config.json')) and \
                not os.path.isfile(os.path.join(path, 'adapter_config.json')):
            raise TrainingFailedError(_('Model "%s": no Hugging Face model folder at %s (set its technical id to '
                                        'a folder, or llm_training_models_dir in the Odoo configuration).')
                                      % (model.name, path))
        return path

    def _local_token_counter(self, model):
        """Count as the trainer will see it: the model's chat template (measured once per model
        in the trainer environment) around contents counted with its tokenizer.json; None when
        the model has no tokenizer (the estimate is used)."""
        try:
            path = self._local_model_path(model)
            from tokenizers import Tokenizer  # noqa: F401
        except (TrainingFailedError, ImportError):
            return None
        tokenizer_json = os.path.join(path, 'tokenizer.json')
        if not os.path.exists(tokenizer_json):
            return None
        exact = PipeCounter([trainer_python(), '-m', 'trainer.chat_template_costs', '--model', path, '--serve'],
                            env=trainer_env(), cwd=ADDON_ROOT, timeout=PROBE_TIMEOUT)
        table = chat_template_table(path)
        if table is None:
            _logger.warning('Model %s: the chat template could not be measured; contents are counted with '
                            'ChatML framing.', path)
            return tokenizer_counter(tokenizer_json)
        return TemplateCounter(tokenizer_json, table, exact=exact)

    def _local_capabilities(self):
        return {'can_resume': True, 'techniques': ('lora', 'qlora', 'full')}

    def _local_validate_training_job(self, job):
        self._local_model_path(job.base_model_id)
        if job.technique == 'qlora':
            probe = run_trainer_module(['trainer.env_info'], PROBE_TIMEOUT)
            info = json.loads(probe.stdout.decode() or '{}')
            if not info.get('cuda'):
                raise TrainingFailedError(_('QLoRA needs a CUDA GPU and the trainer environment has none (%s). '
                                            'Choose LoRA or full fine-tuning, or run the trainer on a GPU host.')
                                          % (info.get('device') or 'CPU only'))
            if not info.get('bitsandbytes'):
                raise TrainingFailedError(_('QLoRA needs bitsandbytes in the trainer environment.'))

    def _local_start_training_job(self, job):
        """Start the trainer for this attempt, or adopt the one a previous start of the same
        attempt launched (idempotent: the launch lock and the pid file make a second trainer
        impossible, and the trainer's own lock on its folder backs that up)."""
        folder = job.work_dir
        external_id = 'local-%s-%d-%d' % (self.env.cr.dbname, job.id, job.attempt)
        with trainer_folder.launch_lock(folder):
            running = trainer_folder.running_trainer(folder, job.job_key)
            if running:
                job._set_provider_data(pid=running['pid'], start_time=running['start_time'], resume=False)
                job._add_event(_('Trainer already running (pid %d): adopted') % running['pid'])
                return external_id
            data = job._get_provider_data()
            resume = bool(data.get('resume')) and trainer_folder.has_checkpoint(folder)
            config = dict(trainer_config(job._get_hyperparameters()),
                          base_model_path=self._local_model_path(job.base_model_id), technique=job.technique,
                          resume=resume)
            trainer_folder.write_json_atomic(os.path.join(folder, trainer_folder.CONFIG), config)
            # A fresh status always (a stale "running" must not be read as this run's); the metrics
            # and events of an earlier run are kept on resume, with the offsets already read.
            stale = (trainer_folder.STATUS,) if resume else (trainer_folder.STATUS, trainer_folder.METRICS,
                                                              trainer_folder.EVENTS)
            for name in stale:
                if os.path.exists(os.path.join(folder, name)):
                    os.remove(os.path.join(folder, name))
            if not resume:
                data['offsets'] = {}
            with open(os.path.join(folder, trainer_folder.LOG), 'ab') as log:
                process = subprocess.Popen(
                    [trainer_python(), '-m', 'trainer.train', '--job-dir', folder],
                    cwd=ADDON_ROOT, env=trainer_env(), stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)  # detached: outlives this worker
            start_time = trainer_folder.process_start_time(process.pid)
            trainer_folder.write_pid_file(folder, process.pid, start_time, job.job_key)
        job._set_provider_data(pid=process.pid, start_time=start_time, offsets=data.get('offsets') or {}, resume=False)
        _logger.info('Training job %s: trainer started, pid %s, folder %s', job.id, process.pid, folder)
        return external_id

    def _local_check_training_job_status(self, job):
        data = job._get_provider_data()
        offsets = data.get('offsets') or {}
        alive = trainer_folder.is_alive(data.get('pid'), data.get('start_time'))
        report = trainer_folder.provider_report(job.work_dir, offsets, alive)
        job._set_provider_data(offsets=offsets)
        return report

    def _local_cancel_training_job(self, job):
        data = job._get_provider_data()
        if trainer_folder.is_alive(data.get('pid'), data.get('start_time')):
            # The trainer saves a checkpoint and reports "cancelled" itself.
            os.killpg(data['pid'], signal.SIGTERM)
        else:
            status = trainer_folder.read_status(job.work_dir) or {}
            if status.get('state') not in ('completed', 'failed', 'cancelled'):
                status['state'] = 'cancelled'
                trainer_folder.write_json_atomic(os.path.join(job.work_dir, trainer_folder.STATUS), status)
        return True

    def _local_generate(self, model, prompt, max_new_tokens=128):
        path = self._local_model_path(model)
        result = run_trainer_module(['trainer.generate', '--model', path, '--prompt', prompt,
                                     '--max-new-tokens', str(max_new_tokens)], GENERATE_TIMEOUT)
        try:
            answer = json.loads(result.stdout.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            answer = {'error': result.stderr.decode()[-2000:]}
        if 'error' in answer:
            raise TrainingFailedError(_('Generation failed: %s') % answer['error'])
        return answer['reply']
