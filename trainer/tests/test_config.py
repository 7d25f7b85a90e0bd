"""The trainer's config: the addon's canonical settings, nothing silently dropped."""
import importlib
import os
import sys
from dataclasses import fields

import pytest

import trainer
from trainer.train import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.realpath(trainer.__file__)))


def addon_hyperparameters():
    """lib/jobs/hyperparameters.py of the addon: the one list of setting names (plain Python; it takes
    the trainer's defaults from trainer/job_files.py through lib/jobs/trainer_folder.py)."""
    if REPO not in sys.path:
        sys.path.append(REPO)  # after the trainer's own path: `trainer` stays the one imported
    return importlib.import_module('lib.jobs.hyperparameters')


def test_every_setting_the_addon_sends_is_a_trainer_field():
    hp = addon_hyperparameters()
    sent = set(hp.CANONICAL) - set(hp.ODOO_ONLY)
    assert sent <= {f.name for f in fields(TrainConfig)}, sent - {f.name for f in fields(TrainConfig)}


def test_scheduler_names_are_transformers_own():
    from transformers.trainer_utils import SchedulerType
    assert set(addon_hyperparameters().SCHEDULERS) <= {s.value for s in SchedulerType}


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match='unknown setting.*lora_rank'):
        TrainConfig.from_dict({'base_model_path': '/m', 'lora_rank': 8})
    assert TrainConfig.from_dict({'base_model_path': '/m', 'lora_r': 8}).lora_r == 8


def test_resume_skips_a_checkpoint_killed_while_saving(tmp_path):
    """trainer_state.json is the last file a save writes: a folder without it is incomplete."""
    from trainer.train import last_checkpoint
    assert last_checkpoint(str(tmp_path / 'missing')) is None
    for step, complete in ((2, True), (4, True), (6, False), (10, False)):
        folder = tmp_path / ('checkpoint-%d' % step)
        folder.mkdir()
        (folder / 'adapter_model.safetensors').write_bytes(b'partial')
        if complete:
            (folder / 'trainer_state.json').write_text('{}')
    assert last_checkpoint(str(tmp_path)) == str(tmp_path / 'checkpoint-4')
    (tmp_path / 'checkpoint-10' / 'trainer_state.json').write_text('{}')
    assert last_checkpoint(str(tmp_path)) == str(tmp_path / 'checkpoint-10')
