from odoo.tests.common import TransactionCase


class TestSmoke(TransactionCase):
    def test_models_exist(self):
        self.assertTrue(self.env['llm.training.job']._name)
