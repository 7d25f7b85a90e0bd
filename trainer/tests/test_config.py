"""The trainer's config: the addon's canonical settings, nothing silently dropped."""
import importlib.util
import os
from dataclasses import fields

import pytest

import trainer
from trainer.train import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.realpath(trainer.__file__)))


def addon_hyperparameters():
    """lib/hyperparameters.py of the addon: the one list of setting names (plain Python)."""
    spec = importlib.util.spec_from_file_location('addon_hyperparameters', os.path.join(REPO, 'lib', 'hyperparameters.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
