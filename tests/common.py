import base64
import json
import time

from odoo.tests.common import SavepointCase


def chat(user='Hello', assistant='Hi there!', system=None, **extra):
    messages = [{'role': 'system', 'content': system}] if system else []
    messages += [{'role': 'user', 'content': user}, {'role': 'assistant', 'content': assistant}]
    return dict(extra, messages=messages)


def jsonl(examples):
    return ''.join(json.dumps(e) + '\n' for e in examples).encode('utf-8')


def valid_examples(n=12, prefix='Question'):
    return [chat('%s %d?' % (prefix, i), 'Answer number %d.' % i) for i in range(n)]


class TrainingCase(SavepointCase):
    """Creates a scripted provider with a base model; helpers for datasets and jobs."""

    @classmethod
    def setUpClass(cls):
        super(TrainingCase, cls).setUpClass()
        cls.provider = cls.env['llm.provider'].create({'name': 'Scripted', 'service': 'test',
                                                       'max_concurrent_jobs': 0})
        cls.base_model = cls.env['llm.model'].create({'name': 'Tiny', 'provider_id': cls.provider.id,
                                                      'model_ref': 'tiny-1', 'context_length': 2048})

    @classmethod
    def make_dataset(cls, content=None, name='data.jsonl', env=None):
        env = env or cls.env
        content = jsonl(valid_examples()) if content is None else content
        attachment = env['ir.attachment'].create({'name': name, 'datas_fname': name,
                                                  'datas': base64.b64encode(content)})
        return env['llm.training.dataset'].create({'name': name, 'attachment_ids': [(6, 0, attachment.ids)]})

    @classmethod
    def make_job(cls, dataset=None, provider=None, env=None, **values):
        env = env or cls.env
        provider = provider or cls.provider
        base_model = env['llm.model'].search([('provider_id', '=', provider.id)], limit=1) or env['llm.model'].create(
            {'name': 'Tiny', 'provider_id': provider.id, 'model_ref': 'tiny-%d' % provider.id})
        vals = {'name': 'Job', 'provider_id': provider.id, 'base_model_id': base_model.id,
                'dataset_ids': [(6, 0, (dataset or cls.make_dataset(env=env)).ids)]}
        vals.update(values)
        return env['llm.training.job'].create(vals)

    def run_cron(self, times=1):
        for _ in range(times):
            self.env['llm.training.job']._cron_sync_training_jobs()
            self.env['llm.training.job'].invalidate_cache()

    def wait_until(self, job, predicate, timeout=600):
        """Run the cron until `predicate(job)` holds while a real trainer works, or fail after
        `timeout` seconds with the job's state, error and log."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.run_cron()
            if predicate(job):
                return
            time.sleep(1)
        self.fail('job %s stuck in %s: %s\n%s' % (job.id, job.state, job.error_message, job.log))

    @classmethod
    def trainer_job(cls, dataset, provider, base_model, **values):
        """A small real training job (SmolLM2, 2 epochs of short examples)."""
        vals = dict(provider_id=provider.id, base_model_id=base_model.id, epochs=2, batch_size=4,
                    learning_rate=1e-3, max_seq_length=128, validation_split=0.25, seed=3)
        vals.update(values)
        return cls.make_job(dataset, **vals)

    def calls(self, job, method):
        return self.env['llm.test.provider.call'].search_count([('job_id', '=', job.id), ('method', '=', method)])
