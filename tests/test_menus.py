"""What Odoo 11 opens when a user clicks the LLM app: the first leaf with an action, depth-first by
sequence (web's Menu.menu_click). The browser test shows it in Chromium; this one needs no browser."""
from odoo.tests.common import TransactionCase


class TestAppLanding(TransactionCase):

    def first_leaf(self, menu):
        for child in menu.child_id.sorted(lambda m: (m.sequence, m.id)):
            if child.action:
                return child
            leaf = self.first_leaf(child)
            if leaf:
                return leaf
        return None

    def test_llm_app_opens_on_the_jobs_list_not_a_wizard(self):
        root = self.env.ref('llm_training.llm_root_menu')
        leaf = self.first_leaf(root)
        jobs = self.env.ref('llm_training.llm_training_job_action')
        self.assertEqual(leaf, self.env.ref('llm_training.llm_training_job_menu'))
        self.assertEqual(leaf.action, jobs)
        self.assertEqual(jobs.res_model, 'llm.training.job')
        self.assertIn('tree', jobs.view_mode.split(',')[0])
        self.assertNotEqual(jobs.target, 'new')
