"""lib/openai_mapping.py as plain functions."""
import unittest

from odoo.addons.llm_training.lib.jobs import pricing
from odoo.addons.llm_training.lib.providers import openai_mapping


class TestOpenAIJobs(unittest.TestCase):

    def test_every_documented_status_maps(self):
        self.assertEqual({s: openai_mapping.provider_status(s, 'queued')[0] for s in openai_mapping.STATUS_MAP},
                         {'validating_files': 'queued', 'queued': 'queued', 'running': 'running',
                          'succeeded': 'succeeded', 'failed': 'failed', 'cancelled': 'cancelled'})
        for status in ('pausing', 'paused', 'something_new'):
            mapped, note = openai_mapping.provider_status(status, 'running')
            self.assertEqual(mapped, 'running')
            self.assertIn(status, note)

    def test_auto_epochs_follows_openai(self):
        self.assertEqual([openai_mapping.auto_epochs(n) for n in (1, 10, 12, 34, 100, 8333, 8334, 30000, 100000)],
                         [25, 10, 8, 3, 3, 3, 2, 1, 1])

    def test_method_payload(self):
        hyper = {'epochs': 0, 'batch_size': 8, 'learning_rate_multiplier': 0.5, 'dpo_beta': 0.2}
        self.assertEqual(openai_mapping.method_payload(hyper), {'type': 'supervised', 'supervised': {'hyperparameters': {
            'n_epochs': 'auto', 'batch_size': 8, 'learning_rate_multiplier': 0.5}}})
        self.assertEqual(openai_mapping.method_payload(hyper, 'dpo')['dpo']['hyperparameters']['beta'], 0.2)

    def test_metric_events(self):
        event = {'type': 'metrics', 'data': {'step': 7, 'train_loss': 1.5, 'valid_loss': 1.9,
                                             'full_valid_loss': 1.7, 'valid_mean_token_accuracy': 0.6}}
        self.assertEqual(openai_mapping.metric_from_event(event),
                         {'step': 7, 'train_loss': 1.5, 'valid_loss': 1.7, 'valid_token_accuracy': 0.6})
        self.assertIsNone(openai_mapping.metric_from_event({'type': 'message', 'data': {}}))
        self.assertIsNone(openai_mapping.metric_from_event({'type': 'metrics', 'data': {'train_loss': 1}}))

    def test_redact(self):
        key = 'sk-proj-abcdef123456'
        text = 'Incorrect API key provided: %s and sk-pro**********3456 and key=%s' % (key, key)
        redacted = openai_mapping.redact(text, key)
        self.assertNotIn('3456', redacted)
        self.assertEqual(redacted.count('[API key]'), 3)

    def test_cost_and_model_names(self):
        self.assertEqual(pricing.cost(2000000, 3.0), 6.0)
        self.assertEqual(pricing.cost(None, 3.0), 0.0)
        self.assertEqual(openai_mapping.base_of_fine_tuned('ft:gpt-4o-mini-2024-07-18:org:x:abc'), 'gpt-4o-mini-2024-07-18')
        self.assertIsNone(openai_mapping.base_of_fine_tuned('gpt-4o-mini'))
