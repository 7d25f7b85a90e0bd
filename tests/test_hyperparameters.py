"""Hyperparameters: one list of canonical names, the names users bring, one visible value each."""
import unittest

from odoo.exceptions import ValidationError

from odoo.addons.llm_training.lib.jobs import hyperparameters as hp

from .common import TrainingCase


class TestHyperparameterNames(unittest.TestCase):

    def test_openai_names_as_written(self):
        settings = hp.parse_extra('{"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 0.1}')
        self.assertEqual(settings, {'epochs': 3, 'batch_size': 1, 'learning_rate_multiplier': 0.1})
        self.assertEqual(hp.parse_extra('{"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}'),
                         {'epochs': 0, 'batch_size': 0, 'learning_rate_multiplier': 0.0})

    def test_hugging_face_and_peft_names(self):
        settings = hp.parse_extra(
            '{"num_train_epochs": 2, "per_device_train_batch_size": 8, "learning_rate": 1e-4, '
            '"gradient_accumulation_steps": 2, "warmup_ratio": 0.1, "warmup_steps": 5, "weight_decay": 0.01, '
            '"lr_scheduler_type": "cosine", "max_grad_norm": 0.5, "group_by_length": true, "logging_steps": 2, '
            '"save_steps": 10, "eval_steps": 5, "max_length": 512, "r": 8, "lora_alpha": 16, '
            '"lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}')
        self.assertEqual((settings['epochs'], settings['batch_size'], settings['max_seq_length'], settings['lora_r']),
                         (2, 8, 512, 8))
        self.assertEqual(hp.parse_extra('{"max_seq_length": 256}'), hp.parse_extra('{"max_length": 256}'))

    def test_two_names_of_one_setting_must_agree(self):
        self.assertEqual(hp.parse_extra('{"n_epochs": 2, "num_train_epochs": 2}'), {'epochs': 2})
        with self.assertRaisesRegex(ValueError, "'n_epochs' and 'num_train_epochs' name the same setting"):
            hp.parse_extra('{"n_epochs": 2, "num_train_epochs": 3}')

    def test_refused_values_say_what_to_fix(self):
        for text, message in (('{"warmup_ratio": NaN}', 'finite'), ('{"learning_rate": Infinity}', 'finite'),
                              ('{"lr_scheduler_type": "sawtooth"}', 'use one of linear, cosine'),
                              ('{"unknown_knob": 1}', "unknown hyperparameter 'unknown_knob'"),
                              ('{"warmup_ratio": 0.9}', 'allowed: 0.0 to 0.5'),
                              ('{"n_epochs": "lots"}', 'must be an integer or "auto"'),
                              ('{"warmup_ratio": "high"}', 'must be a number'),
                              ('{not json', 'not valid JSON'), ('[1]', 'must be a JSON object')):
            with self.assertRaisesRegex(ValueError, message, msg=text):
                hp.parse_extra(text)

    def test_local_trainer_config(self):
        config = hp.trainer_config({'epochs': 1, 'learning_rate': 5e-4, 'learning_rate_multiplier': 0.5,
                                    'validation_split': 0.1, 'dpo_beta': 0.1})
        self.assertEqual(config, {'epochs': 1, 'learning_rate': hp.DEFAULTS['learning_rate'] * 0.5})
        self.assertEqual(hp.trainer_config({'learning_rate': 5e-4, 'learning_rate_multiplier': 0.0}),
                         {'learning_rate': 5e-4})


class TestJobHyperparameters(TrainingCase):

    def test_json_setting_is_the_jobs_value_and_shows_in_its_field(self):
        job = self.make_job(epochs=5, hyperparameters='{"n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 0.1, '
                                                      '"warmup_steps": 4}')
        self.assertEqual((job.epochs, job.batch_size, job.learning_rate_multiplier), (3, 1, 0.1))
        self.assertEqual(job.hyperparameters, '{"warmup_steps": 4}', 'the JSON keeps only what has no field')
        settings = job._get_hyperparameters()
        self.assertEqual((settings['epochs'], settings['warmup_steps']), (3, 4))
        job.write({'hyperparameters': '{"num_train_epochs": 2, "per_device_train_batch_size": 8, "r": 4}'})
        self.assertEqual((job.epochs, job.batch_size, job.lora_r, job.hyperparameters), (2, 8, 4, '{}'))

    def test_bad_json_is_refused_on_the_job(self):
        with self.assertRaisesRegex(ValidationError, "name the same setting"):
            self.make_job(hyperparameters='{"n_epochs": 2, "num_train_epochs": 3}')
