"""Evaluation and export as side jobs of the trainer environment, run where the provider trains:
`python -m trainer.evaluate` / `python -m trainer.export`, on this host as a detached process
(local), on the cluster as a Ray job (ray_jobs). Not an adapter: a mixin the adapters that launch
the trainer share, as serving.py's ServedChat is for chat, so that neither imports the other.

The folders (the evaluation's, under the job folder; the export's) are written and read by Odoo
where it sees them; the side job gets every path as its machine sees it. An adapter gives:
    runner_path(path)              a path under its storage as the side job sees it
    runner_model_path(model_ref)   a model's folder as the side job sees it
    runner_converters(convert_dir) llama.cpp's converters where the side job finds them
    export_root(default)           where its exports' folders go (as Odoo sees it)
    adopt_side_job(key, data)      True when a run of `key` is known (kept in `data`): not started twice
    launch_side_job(key, args, folder, log_name, data)   start `python -m <args>`; returns where, in words
    side_job_status(data)          {'alive': bool, 'error': why it ended badly (with the tail of its
                                   output), or None when nothing says more than its log}
    side_job_log(data, folder, log_name)   the tail of its output
    stop_side_job(data)            stop the run (a stuck evaluation), when it is still running
"""
import os

from ..evaluation import files as evaluation_files
from ..exceptions import TrainingFailedError
from ..export import runner

# A retry starts clean: what the evaluator wrote last time goes.
_EVALUATION_OUTPUTS = (evaluation_files.STATUS, evaluation_files.SUMMARY, evaluation_files.EXAMPLES)


class TrainerSideJobs(object):

    # -- what each adapter gives (see the module's docstring) ---------------------------------------
    def runner_path(self, path):
        return path

    def runner_model_path(self, model_ref):
        raise NotImplementedError

    def runner_converters(self, convert_dir):
        return convert_dir

    def export_root(self, default):
        return default

    def adopt_side_job(self, key, data):
        raise NotImplementedError

    def launch_side_job(self, key, args, folder, log_name, data):
        raise NotImplementedError

    def side_job_status(self, data):
        raise NotImplementedError

    def side_job_log(self, data, folder, log_name):
        raise NotImplementedError

    def stop_side_job(self, data):
        raise NotImplementedError

    # -- evaluation ------------------------------------------------------------------------------------
    def start_evaluation(self, spec):
        """trainer/evaluate.py as a side job: it writes its status and results into the evaluation
        folder, which check_evaluation reads. A start that finds the run of the same key adopts it."""
        data = spec.provider_data
        if self.adopt_side_job(spec.key, data):
            return data.get('where')
        config = dict(spec.limits, reference=self.runner_model_path(spec.reference),
                      candidate=self.runner_model_path(spec.candidate), examples=self.runner_path(spec.examples),
                      data_format=spec.data_format or 'chat')
        for name in _EVALUATION_OUTPUTS:
            if os.path.exists(os.path.join(spec.folder, name)):
                os.remove(os.path.join(spec.folder, name))
        evaluation_files.write_config(spec.folder, config)
        return self.launch_side_job(spec.key, ['trainer.evaluate', '--dir', self.runner_path(spec.folder)],
                                    spec.folder, evaluation_files.LOG, data)

    def check_evaluation(self, spec):
        data = spec.provider_data
        status = evaluation_files.read_status(spec.folder)
        if status.get('state') == 'done':
            return {'status': 'done', 'progress': 100.0, 'summary': evaluation_files.read_summary(spec.folder),
                    'examples': evaluation_files.read_examples(spec.folder)}
        if status.get('state') == 'failed':
            return {'status': 'failed', 'error': status.get('error') or 'the evaluator failed',
                    'log': self.side_job_log(data, spec.folder, evaluation_files.LOG)}
        job = self.side_job_status(data)
        if not job['alive']:
            status = evaluation_files.read_status(spec.folder)  # it may have ended since the first read
            if status.get('state') in ('done', 'failed'):
                return self.check_evaluation(spec)
            return {'status': 'failed', 'error': job.get('error') or 'the evaluator process ended without a result',
                    'log': self.side_job_log(data, spec.folder, evaluation_files.LOG)}
        return {'status': 'running', 'progress': status.get('progress') or 0.0}

    def cancel_evaluation(self, spec):
        self.stop_side_job(spec.provider_data)

    # -- export ----------------------------------------------------------------------------------------
    def start_export(self, spec):
        """trainer/export.py as a side job, writing into the export's out/ folder."""
        data = spec.provider_data
        if self.adopt_side_job(spec.key, data):
            return data.get('where')
        runner.prepare(spec.folder, spec.card)
        convert = spec.convert_dir if spec.convert_dir and spec.format.startswith('gguf') else None
        args = runner.module_args(
            self.runner_path(spec.folder), self.runner_model_path(spec.model), spec.format,
            job_dir=self.runner_path(spec.job_dir) if spec.job_dir else None,
            convert_dir=self.runner_converters(convert) if convert else None)
        return self.launch_side_job(spec.key, args, spec.folder, runner.LOG, spec.provider_data)

    def check_export(self, spec):
        data = spec.provider_data
        if not data:
            raise TrainingFailedError('Export %s has no record of its run (started before an upgrade?); make a new '
                                      'export.' % spec.key)
        job = self.side_job_status(data)

        def ended_error():
            if job.get('error'):
                return job['error']
            tail = (self.side_job_log(data, spec.folder, runner.LOG) or '').strip()[-1500:]
            return 'The export process ended without finishing; its log: %s' % tail
        return runner.check(spec.folder, spec.offset, job['alive'], ended_error)
