"""What the adapters that launch our own trainer share (the local process, the Ray job): the
trainer's config for an attempt, the job folder made ready for it, the settings check, and the
side jobs (evaluation, export: side_jobs.py). Each adapter keeps only how it starts, watches and
stops a process; they import nothing from each other."""
from ..jobs import trainer_folder
from ..exceptions import TrainingFailedError
from ..jobs.hyperparameters import check_processes, trainer_config
from .base import TrainingProvider
from .side_jobs import TrainerSideJobs


class TrainerLauncher(TrainerSideJobs, TrainingProvider):
    """A provider whose jobs run trainer/train.py from a job folder it can write."""

    def check_settings(self, spec):
        """The job's settings as the trainer will take them (processes per job and the like)."""
        try:
            check_processes(spec.hyperparameters)
        except ValueError as e:
            raise TrainingFailedError(str(e))

    def prepare_attempt(self, spec, base_model_path):
        """Write the attempt's config.json into the job folder and clear what a fresh run must not
        inherit; returns whether it resumes from the folder's last checkpoint (asked and one is
        there). A fresh run reads the folder's reports from their start."""
        resume = bool(spec.resume) and trainer_folder.has_checkpoint(spec.work_dir)
        config = dict(trainer_config(spec.hyperparameters), technique=spec.technique, resume=resume,
                      data_format=spec.data_format or 'chat', base_model_path=base_model_path)
        trainer_folder.prepare_run(spec.work_dir, config, resume)
        if not resume:
            spec.provider_data['offsets'] = {}
        return resume

    def folder_report(self, spec, alive):
        """The trainer's report from the job folder (status, new metrics, events, log tail), read
        from where the last check stopped."""
        return trainer_folder.provider_report(spec.work_dir, spec.provider_data.setdefault('offsets', {}), alive)
