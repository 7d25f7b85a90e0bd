"""The Ray provider: each attempt is a Ray job, submitted through the Jobs REST API of the head's
dashboard (plain HTTP with `requests`; Odoo never imports ray).

The job folder lives on storage shared with the workers (`storage_path` as Odoo sees it,
`worker_storage_path` as the workers do): Odoo prepares the data there, the trainer writes its
status, metrics, events, checkpoints and result there, exactly as for the local provider, and the
trainer's code is copied there once per version. Ray's own job status says whether the run is
alive. `submission_id` is the attempt's job key: a repeated start is refused by Ray ("already
exists") and adopted; a resume is a new attempt, so a new submission. A head that restarts
without the job reports it unknown (HTTP 404): the engine resubmits it from the last checkpoint.
A trained model's evaluation and exports are Ray jobs too (lib/providers/side_jobs.py), their
folders on the same storage."""
import hashlib
import logging
import os
import shlex
import shutil
import time
import uuid

import requests

from . import register
from ..jobs import trainer_folder
from ..serving import ray_serve
from ..exceptions import TrainingAuthError, TrainingFailedError, TrainingRetryableError
from .launcher import TrainerLauncher
from ..host.trainer_env import ADDON_ROOT
from .serving import ServedChat

_logger = logging.getLogger(__name__)
RAY_STATUS = {'PENDING': 'queued', 'RUNNING': 'running', 'SUCCEEDED': 'succeeded', 'FAILED': 'failed',
              'STOPPED': 'cancelled'}
ALIVE = ('PENDING', 'RUNNING')
# Seconds Ray waits after its SIGTERM before it kills the job: the trainer saves a checkpoint in
# that time (Ray's default, 3 s, is too short for a large model).
STOP_WAIT_SECONDS = 120
_CODE_VERSIONS = {}  # trainer folder -> hash of its files, computed once per process
# What Test Connection imports with the workers' Python, as trainer/train.py will.
TRAINER_PACKAGES = ('torch', 'transformers', 'peft')
PROBE_TIMEOUT = 180  # seconds for the probe job: a worker must be free, and importing torch takes a while
PROBE_CODE = ('import importlib\n'
              'for name in %r:\n'
              '    try:\n'
              '        importlib.import_module(name)\n'
              '    except Exception as e:\n'
              '        print("LLMT-MISSING %%s: %%s: %%s" %% (name, type(e).__name__, e))\n'
              'print("LLMT-PROBE-DONE")\n' % (TRAINER_PACKAGES,))


def trainer_code_version(root=os.path.join(ADDON_ROOT, 'trainer')):
    if root not in _CODE_VERSIONS:
        digest = hashlib.sha1()
        for folder, dirs, files in sorted(os.walk(root)):
            dirs[:] = sorted(d for d in dirs if d not in ('__pycache__', 'tests'))
            for name in sorted(f for f in files if f.endswith('.py')):
                digest.update(os.path.relpath(os.path.join(folder, name), root).encode())
                with open(os.path.join(folder, name), 'rb') as f:
                    digest.update(f.read())
        _CODE_VERSIONS[root] = digest.hexdigest()[:12]
    return _CODE_VERSIONS[root]


@register
class RayJobs(ServedChat, TrainerLauncher):
    service = 'ray'
    capabilities = {'can_resume': True, 'uses_api_key': False, 'tests_connection': True, 'supports_text': True,
                    'can_chat': True, 'serves_on_cluster': True, 'evaluates': True, 'exports': True,
                    'techniques': ('lora', 'qlora', 'full')}

    # -- paths: Odoo's view and the workers' view of the shared storage ----------------------------
    @property
    def storage(self):
        path = self.config.get('storage_path')
        if not path:
            raise TrainingFailedError('Provider "%s" has no shared storage path; set the folder that Odoo and the '
                                      'Ray workers both see.' % self.name)
        return path

    def on_workers(self, path):
        """`path` (under the storage, as Odoo sees it) as the workers see it."""
        worker_root = self.config.get('worker_storage_path') or self.storage
        return os.path.join(worker_root, os.path.relpath(path, self.storage))

    def worker_model_path(self, model_ref):
        """An absolute technical id as is; a relative one under the storage's models/ folder."""
        return model_ref if os.path.isabs(model_ref) else self.on_workers(os.path.join(self.storage, 'models', model_ref))

    def code_dir(self):
        """The trainer's code on the shared storage (copied once per version): workers need only
        the trainer's Python environment, not this addon."""
        target = os.path.join(self.storage, 'code', 'trainer-%s' % trainer_code_version())
        return self._copy_once(os.path.join(ADDON_ROOT, 'trainer'), target, 'trainer',
                               shutil.ignore_patterns('__pycache__', 'tests'))

    def _copy_once(self, source, target, name=None, ignore=None):
        """`source` copied to `target` (or `target`/`name`) on the storage, unless already there (a
        versioned target: a new version is a new folder). Returns `target`."""
        if not os.path.isdir(target):
            tmp = '%s.tmp.%d' % (target, os.getpid())
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, os.path.join(tmp, name) if name else tmp, ignore=ignore)
            try:
                os.rename(tmp, target)
            except OSError:  # another worker copied it first
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    # -- HTTP --------------------------------------------------------------------------------------
    def url(self, path):
        return (self.config.get('dashboard_url') or 'http://127.0.0.1:8265').rstrip('/') + path

    def request(self, method, path, action, **kwargs):
        """One call to the Jobs API; errors become ours, with the auth header never in a message."""
        headers = {}
        header = self.secret('ray_auth_header')  # "Name: value", e.g. "Authorization: Bearer ..."
        if header:
            name, _sep, value = header.partition(':')
            headers[name.strip()] = value.strip()
        try:
            response = requests.request(method, self.url(path), headers=headers,
                                        timeout=float(self.config.get('request_timeout') or 60), **kwargs)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise TrainingRetryableError('The Ray head at %s did not answer while %s (%s); tried again later.'
                                         % (self.url(''), action, type(e).__name__))
        if response.status_code in (401, 403):
            raise TrainingAuthError('The Ray head refused %s (HTTP %d): check the auth header of provider "%s".'
                                    % (action, response.status_code, self.name))
        return response

    def error_text(self, response):
        text = (response.text or '').strip()[-1000:]
        header = self.secret('ray_auth_header')
        for secret in filter(None, (header, header and header.partition(':')[2].strip())):
            text = text.replace(secret, '[auth header]')
        return text

    def job_info(self, submission_id):
        """Ray's details of the job, or None when the head does not know it."""
        response = self.request('GET', '/api/jobs/%s' % submission_id, 'reading job %s' % submission_id)
        if response.status_code == 404:
            return None
        if response.status_code >= 500:
            raise TrainingRetryableError('The Ray head had an error (HTTP %d) reading job %s: %s'
                                         % (response.status_code, submission_id, self.error_text(response)))
        if response.status_code != 200:
            raise TrainingFailedError('The Ray head refused to read job %s (HTTP %d): %s'
                                      % (submission_id, response.status_code, self.error_text(response)))
        return response.json()

    # -- the provider contract -----------------------------------------------------------------------
    def validate(self, spec):
        self.check_settings(spec)
        if not os.path.isdir(self.storage) or not os.access(self.storage, os.W_OK):
            raise TrainingFailedError('Shared storage %s of provider "%s" is missing or not writable from Odoo.'
                                      % (self.storage, self.name))
        self.check_base_model(spec.base_model, spec.base_model_name)
        if spec.technique == 'qlora' and not float(self.config.get('gpus_per_job') or 0):
            raise TrainingFailedError('QLoRA needs a GPU: set "GPUs per job" on provider "%s", or choose LoRA.'
                                      % self.name)

    def check_base_model(self, model_ref, model_name=None):
        """The base model's folder must be where the workers will look: a relative technical id
        under the shared storage's models/ folder. An absolute path outside the shared storage is
        on the workers' own disks, which Odoo cannot see: it is left to the job."""
        worker_path = self.worker_model_path(model_ref)
        worker_root = self.config.get('worker_storage_path') or self.storage
        if os.path.isabs(model_ref) and os.path.relpath(model_ref, worker_root).startswith(os.pardir):
            return
        odoo_path = os.path.join(self.storage, os.path.relpath(worker_path, worker_root))
        if not os.path.isfile(os.path.join(odoo_path, 'config.json')):
            raise TrainingFailedError(
                'Base model "%s" is not where the Ray workers will look: %s has no config.json (on the shared '
                'storage as Odoo sees it: %s). Copy the model\'s Hugging Face folder there, or give the model '
                'an absolute path the workers see as its technical id.'
                % (model_name or model_ref, worker_path, odoo_path))

    def runner_model_path(self, model_ref):
        """A model's folder as the workers see it: a relative technical id under the storage's
        models/; an absolute one under the storage translated; any other absolute one as is (on
        the workers' own disks)."""
        if not os.path.isabs(model_ref):
            return self.worker_model_path(model_ref)
        under_storage = not os.path.relpath(model_ref, self.storage).startswith(os.pardir)
        return self.on_workers(model_ref) if under_storage else model_ref

    def entrypoint(self, spec):
        folder = self.on_workers(spec.work_dir)
        python = self.config.get('worker_python') or 'python3'
        # The log goes to the shared folder (the Log tab reads it there); exec: Ray's SIGTERM
        # reaches the trainer itself.
        return "cd '%s' && exec '%s' -m trainer.train --job-dir '%s' >> '%s' 2>&1" % (
            self.on_workers(self.code_dir()), python, folder, os.path.join(folder, trainer_folder.LOG))

    def start(self, spec):
        data = spec.provider_data
        info = self.job_info(spec.job_key)
        if info is not None:  # a previous start of this attempt reached Ray
            data.update(resume=False)
            spec.note('Ray job %s of this attempt found (%s): adopted' % (spec.job_key, info.get('status')))
            return spec.job_key
        self.prepare_attempt(spec, self.worker_model_path(spec.base_model))
        body = {
            'entrypoint': self.entrypoint(spec),
            'submission_id': spec.job_key,
            'runtime_env': {'env_vars': {'TOKENIZERS_PARALLELISM': 'false',
                                         'RAY_JOB_STOP_WAIT_TIME_S': str(STOP_WAIT_SECONDS)}},
            'metadata': {'llm_training_job_key': spec.job_key, 'odoo_database': spec.database,
                         'odoo_job_id': str(spec.job_id)},
            'entrypoint_num_cpus': float(self.config.get('cpus_per_job') or 1),
            'entrypoint_num_gpus': float(self.config.get('gpus_per_job') or 0),
        }
        response = self.request('POST', '/api/jobs/', 'submitting the job', json=body)
        if response.status_code == 500 and 'already exists' in response.text:
            spec.note('Ray job %s of this attempt already submitted: adopted' % spec.job_key)
        elif response.status_code >= 500:
            raise TrainingRetryableError('The Ray head had an error (HTTP %d) submitting the job: %s'
                                         % (response.status_code, self.error_text(response)))
        elif response.status_code != 200:
            raise TrainingFailedError('The Ray head refused the job (HTTP %d): %s'
                                      % (response.status_code, self.error_text(response)))
        data.update(resume=False)
        _logger.info('Training job %s: Ray job %s submitted', spec.job_id, spec.job_key)
        return spec.job_key

    def check(self, spec):
        info = self.job_info(spec.external_id)
        if info is None:
            return {'status': 'lost', 'error': 'The Ray head no longer knows job %s (it was restarted without '
                                               'its job history).' % spec.external_id}
        ray_status = info.get('status')
        report = self.folder_report(spec, ray_status in ALIVE)
        if ray_status == 'PENDING':
            report['status'] = 'queued'
        elif ray_status == 'STOPPED' and report['status'] != 'succeeded':
            report['status'] = 'cancelled'
        elif ray_status == 'FAILED' and report['status'] != 'succeeded':
            report['status'] = 'failed'
            report['error'] = '%s\nRay: %s' % (report.get('error') or 'The Ray job failed.',
                                               info.get('message') or info.get('error_type') or 'no message')
        elif ray_status == 'SUCCEEDED' and report['status'] != 'succeeded':
            report['status'] = 'failed'
            report['error'] = 'The Ray job ended without the trainer reporting a result; see the log.'
        return report

    def cancel(self, spec):
        response = self.request('POST', '/api/jobs/%s/stop' % spec.external_id, 'stopping the job')
        if response.status_code == 404:
            trainer_folder.mark_cancelled(spec.work_dir)  # Ray no longer runs it: nothing to stop
        elif response.status_code != 200:
            raise TrainingRetryableError('The Ray head did not stop job %s (HTTP %d): %s'
                                         % (spec.external_id, response.status_code, self.error_text(response)))

    def test_connection(self):
        try:
            response = self.request('GET', '/api/version', 'reading its version')
        except TrainingRetryableError as e:
            raise TrainingFailedError(str(e))
        if response.status_code != 200:
            raise TrainingFailedError('The Ray dashboard at %s answered HTTP %d to /api/version: %s'
                                      % (self.url(''), response.status_code, self.error_text(response)))
        version = response.json().get('ray_version') or '?'
        probe = os.path.join(self.storage, '.llm_training_probe.%d' % os.getpid())
        try:
            with open(probe, 'w') as f:
                f.write('ok')
            os.remove(probe)
        except OSError as e:
            raise TrainingFailedError('Ray %s answers, but the shared storage %s is not writable from Odoo: %s'
                                      % (version, self.storage, e))
        return 'Ray %s at %s; shared storage %s writable; %s' % (version, self.url(''), self.storage,
                                                                  self.probe_workers())

    def probe_workers(self):
        """Run a small Ray job, with a job's resources and the worker Python, that imports the
        trainer's packages: a worker environment that lacks them is found here, not after a
        Submit. Returns what it found; raises TrainingFailedError naming what is missing."""
        python = self.config.get('worker_python') or 'python3'
        submission_id = 'llmt-probe-%s' % uuid.uuid4().hex[:12]
        body = {'entrypoint': '%s -c %s' % (shlex.quote(python), shlex.quote(PROBE_CODE)),
                'submission_id': submission_id, 'metadata': {'llm_training_probe': '1'},
                'entrypoint_num_cpus': float(self.config.get('cpus_per_job') or 1),
                'entrypoint_num_gpus': float(self.config.get('gpus_per_job') or 0)}
        response = self.request('POST', '/api/jobs/', 'submitting the probe job', json=body)
        if response.status_code != 200:
            raise TrainingFailedError('The Ray head refused the probe job (HTTP %d): %s'
                                      % (response.status_code, self.error_text(response)))
        deadline = time.time() + PROBE_TIMEOUT
        info = {}
        while time.time() < deadline:
            info = self.job_info(submission_id) or {}
            if info.get('status') in ('SUCCEEDED', 'FAILED', 'STOPPED'):
                break
            time.sleep(0.5)
        else:
            self.request('POST', '/api/jobs/%s/stop' % submission_id, 'stopping the probe job')
            raise TrainingFailedError('The probe job found no free worker within %d s (it asks for a job\'s CPUs '
                                      'and GPUs); the cluster may be full.' % PROBE_TIMEOUT)
        logs = self.request('GET', '/api/jobs/%s/logs' % submission_id, 'reading the probe job\'s log')
        text = (logs.json().get('logs') or '') if logs.status_code == 200 else ''
        self.request('DELETE', '/api/jobs/%s' % submission_id, 'removing the probe job')  # best effort
        missing = [line.split(' ', 1)[1] for line in text.splitlines() if line.startswith('LLMT-MISSING ')]
        if missing:
            raise TrainingFailedError('The Ray head answers, but the worker Python %s cannot import the trainer\'s '
                                      'packages: %s. Set Worker Python to a Python that has the trainer\'s '
                                      'requirements (requirements-trainer.txt).' % (python, '; '.join(missing)))
        if 'LLMT-PROBE-DONE' not in text:
            raise TrainingFailedError('The probe job with worker Python %s ended %s without running: %s'
                                      % (python, info.get('status'), (info.get('message') or text)[-500:]))
        return 'worker Python %s imports %s.' % (python, ', '.join(TRAINER_PACKAGES))

    # -- side jobs (evaluation, export: lib/providers/side_jobs.py) as Ray jobs on the cluster ------
    def runner_path(self, path):
        return self.on_workers(path)

    def runner_converters(self, convert_dir):
        """llama.cpp's converters (a few MB of scripts) copied to the storage once per version, so
        that the workers need only the trainer's Python environment."""
        target = os.path.join(self.storage, 'code', os.path.basename(convert_dir.rstrip('/')))
        return self.on_workers(self._copy_once(convert_dir, target, ignore=shutil.ignore_patterns('__pycache__')))

    def export_root(self, default):
        """The workers write the export: it goes on the shared storage, where Odoo reads it too."""
        return os.path.join(self.storage, 'exports')

    def adopt_side_job(self, key, data):
        """A previous start of `key` reached Ray (its submission_id is the key)."""
        info = self.job_info(key)
        if info is None:
            return False
        data.update(key=key, ray_job=key, where=data.get('where') or 'Ray job %s on %s' % (key, self.url('')))
        return True

    def launch_side_job(self, key, args, folder, log_name, data):
        """`python -m <args>` as a Ray job with the worker Python, from the trainer's code on the
        storage, with a job's CPUs and GPUs; its output stays in Ray's job log. The same key twice
        is refused by Ray ("already exists") and adopted."""
        python = self.config.get('worker_python') or 'python3'
        body = {
            'entrypoint': 'cd %s && exec %s -m %s' % (shlex.quote(self.on_workers(self.code_dir())), shlex.quote(python),
                                                      ' '.join(shlex.quote(arg) for arg in args)),
            'submission_id': key,
            'runtime_env': {'env_vars': {'TOKENIZERS_PARALLELISM': 'false'}},
            'metadata': {'llm_training_key': key, 'llm_training_module': args[0]},
            'entrypoint_num_cpus': float(self.config.get('cpus_per_job') or 1),
            'entrypoint_num_gpus': float(self.config.get('gpus_per_job') or 0),
        }
        response = self.request('POST', '/api/jobs/', 'submitting %s' % args[0], json=body)
        if response.status_code >= 500 and 'already exists' not in response.text:
            raise TrainingRetryableError('The Ray head had an error (HTTP %d) submitting %s: %s'
                                         % (response.status_code, args[0], self.error_text(response)))
        if response.status_code not in (200, 500):
            raise TrainingFailedError('The Ray head refused %s (HTTP %d): %s'
                                      % (args[0], response.status_code, self.error_text(response)))
        where = 'Ray job %s on %s, writing %s as the workers see it' % (key, self.url(''), self.on_workers(folder))
        data.update(key=key, ray_job=key, where=where)
        _logger.info('%s: %s submitted as Ray job %s', key, args[0], key)
        return where

    def side_job_status(self, data):
        info = self.job_info(data['ray_job'])
        if info is None:
            return {'alive': False, 'error': 'The Ray head no longer knows job %s (it was restarted without its job '
                                             'history); retry.' % data['ray_job']}
        status = info.get('status')
        if status in ALIVE:
            return {'alive': True, 'error': None}
        if status in ('FAILED', 'STOPPED'):
            return {'alive': False, 'error': 'Ray job %s %s: %s' % (
                data['ray_job'], status, _head_and_tail(info.get('message') or info.get('error_type') or 'no message'))}
        return {'alive': False, 'error': None}

    def stop_side_job(self, data):
        if data.get('ray_job'):
            self.request('POST', '/api/jobs/%s/stop' % data['ray_job'], 'stopping a job')

    def side_job_log(self, data, folder, log_name):
        """The tail of the job's output, as Ray keeps it."""
        try:
            response = self.request('GET', '/api/jobs/%s/logs' % data['ray_job'], 'reading a job\'s log')
        except TrainingRetryableError as e:
            return str(e)
        return ((response.json().get('logs') or '') if response.status_code == 200 else '')[-4000:]

    # -- serving: this host's model server, or a Ray Serve deployment on the cluster ----------------
    def served_path(self, model_ref, where):
        """The model folder as the side that answers reads it: the workers' view of the shared
        storage for the cluster, Odoo's for this host (whose model server then needs the folder
        where the workers put it: the same path unless worker_storage_path differs)."""
        if where == 'cluster':
            return self.runner_model_path(model_ref)
        path = model_ref if os.path.isabs(model_ref) else os.path.join(self.storage, 'models', model_ref)
        if not os.path.isfile(os.path.join(path, 'config.json')) and \
                not os.path.isfile(os.path.join(path, 'adapter_config.json')):
            raise TrainingFailedError('Model %s: no Hugging Face model folder at %s on this host.' % (model_ref, path))
        return path

    def serve_details(self):
        """What Serve runs on the cluster (GET /api/serve/applications/)."""
        response = self.request('GET', '/api/serve/applications/', 'reading its Serve applications')
        if response.status_code == 501:
            raise TrainingFailedError('The Ray head at %s has no Ray Serve (HTTP 501): install ray[serve] in the '
                                      'Python that runs the head (requirements-trainer.txt has it).' % self.url(''))
        if response.status_code != 200:
            raise TrainingFailedError('The Ray head refused to list its Serve applications (HTTP %d): %s'
                                      % (response.status_code, self.error_text(response)))
        return response.json()

    def _put_applications(self, body, action):
        response = self.request('PUT', '/api/serve/applications/', action, json=body)
        if response.status_code != 200:
            raise TrainingFailedError('The Ray head refused %s (HTTP %d): %s'
                                      % (action, response.status_code, self.error_text(response)))

    def serve_deploy(self, model_refs, token):
        """Create or update this provider's Serve application so that it serves `model_refs` (its
        models' technical ids) with `token`; the same call twice changes nothing. Returns
        (status, text) as serve_status."""
        name = self.config['serve_application']
        settings = self.config.get('serve_settings') or {}  # odoo.conf's, as for this host's server
        engine, convert = settings.get('engine') or 'auto', settings.get('convert_dir')
        try:
            app = ray_serve.application(
                name, self.on_workers(self.code_dir()), [self.served_path(ref, 'cluster') for ref in model_refs],
                ray_serve.token_sha256(token), replicas=int(self.config.get('serve_replicas') or 1),
                min_replicas=int(self.config.get('serve_min_replicas') or 0),
                max_replicas=int(self.config.get('serve_max_replicas') or 0),
                cpus=float(self.config.get('serve_cpus') or 1), engine=engine,
                convert_dir=self.runner_converters(convert) if convert and engine != 'transformers' else None)
            body = ray_serve.deploy_body(self.serve_details(), self.config.get('serve_url'), app=app)
        except ray_serve.ServeConfigError as e:
            raise TrainingFailedError('Provider "%s": %s' % (self.name, e))
        self._put_applications(body, 'deploying Serve application %s' % name)
        _logger.info('Ray Serve application %s deployed with %d model folder(s)', name, len(model_refs))
        return self.serve_status()

    def serve_status(self):
        return ray_serve.describe(self.serve_details(), self.config['serve_application'])

    def serve_delete(self):
        """Remove this provider's Serve application (the others stay); nothing to do when absent."""
        name = self.config['serve_application']
        details = self.serve_details()
        if name in (details.get('applications') or {}):
            try:
                body = ray_serve.deploy_body(details, self.config.get('serve_url'), remove=name)
            except ray_serve.ServeConfigError as e:
                raise TrainingFailedError('Provider "%s": %s' % (self.name, e))
            self._put_applications(body, 'deleting Serve application %s' % name)
        return self.serve_status()


def _head_and_tail(text, size=2000):
    """Ray's message: its first line (what happened) and its last characters (the log's end,
    where the error is)."""
    text = text.strip()
    if len(text) <= size:
        return text
    return '%s\n...\n%s' % (text.splitlines()[0][:300], text[-(size - 300):])
