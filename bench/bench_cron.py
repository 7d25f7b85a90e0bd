"""The sync engine at scale: a full cron pass over many active jobs.

    python bench/bench_cron.py -c ODOO_CONF -d DB [--jobs 250 1000]

Runs in Odoo's venv on a database with llm_training and the scripted test provider
(tests/addons), as scripts/bench.sh makes it. For each job count it creates that many jobs
training on an instant provider (the scripted one in its 'instant' behaviour: it answers
"running" at once and keeps nothing, so the figures are the engine's own), commits, then runs the
cron's engine pass exactly as production does (a claim and a commit per job) and prints: the time
of the pass, the SQL queries per job (which must not grow with the job count) and how many jobs
the pass visited (all of them), twice. The jobs are deleted at the end.
"""
import argparse
import base64
import json
import os
import sys
import time

import odoo
from odoo import SUPERUSER_ID, api

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.machine import cpu_line  # noqa: E402


def make_jobs(env, n):
    provider = env['llm.provider'].create({'name': 'Bench instant', 'service': 'test', 'max_concurrent_jobs': 0,
                                           'test_behavior': 'instant'})
    model = env['llm.model'].create({'name': 'Bench model', 'provider_id': provider.id, 'model_ref': 'bench-%d' % n})
    lines = ''.join(json.dumps({'messages': [{'role': 'user', 'content': 'Q%d' % i},
                                             {'role': 'assistant', 'content': 'A%d' % i}]}) + '\n' for i in range(12))
    attachment = env['ir.attachment'].create({'name': 'b.jsonl', 'datas_fname': 'b.jsonl',
                                              'datas': base64.b64encode(lines.encode())})
    dataset = env['llm.training.dataset'].create({'name': 'bench', 'attachment_ids': [(6, 0, attachment.ids)]})
    job_ids = []
    for i in range(n):
        job_ids.append(env['llm.training.job'].create({
            'name': 'bench %d' % i, 'provider_id': provider.id, 'base_model_id': model.id,
            'dataset_ids': [(6, 0, dataset.ids)]}).id)
    # Already at the provider and training: the pass measured is the poll every active job gets.
    env.cr.execute("""UPDATE llm_training_job SET state = 'training', external_job_id = 'bench-' || id,
                             provider_data = '{"polls": 1}', last_progress_at = now() at time zone 'UTC'
                       WHERE id IN %s""", (tuple(job_ids),))
    return provider, model, dataset, job_ids


def one_pass(registry):
    with api.Environment.manage(), registry.cursor() as cr:
        env = api.Environment(cr, SUPERUSER_ID, {})
        before = cr.sql_log_count
        start = time.perf_counter()
        visited = env['llm.training.engine']._cron(budget=600)
        seconds = time.perf_counter() - start
        queries = cr.sql_log_count - before
        cr.commit()
    return seconds, queries, visited


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-c', '--config', required=True)
    parser.add_argument('-d', '--database', required=True)
    parser.add_argument('--jobs', type=int, nargs='+', default=[250, 1000])
    args = parser.parse_args()
    print('machine: %s' % cpu_line())
    odoo.tools.config.parse_config(['-c', args.config, '-d', args.database, '--log-level=warn'])
    registry = odoo.registry(args.database)
    for n in args.jobs:
        with api.Environment.manage(), registry.cursor() as cr:
            env = api.Environment(cr, SUPERUSER_ID, {})
            env['llm.training.job'].search([('state', 'in', ('validating', 'preparing', 'queued', 'training'))]) \
                ._write_workflow({'state': 'cancelled'})  # only this run's jobs are active
            provider, model, dataset, job_ids = make_jobs(env, n)
            cr.commit()
        try:
            for label in ('first pass', 'second pass'):
                seconds, queries, visited = one_pass(registry)
                print('%5d active jobs, %-11s %6.2f s (%5.2f s per 1,000)  %5.1f SQL queries per job  '
                      'visited %d of %d' % (n, label, seconds, seconds * 1000.0 / n, queries / float(max(visited, 1)),
                                            visited, n))
        finally:
            with api.Environment.manage(), registry.cursor() as cr:
                env = api.Environment(cr, SUPERUSER_ID, {})
                jobs = env['llm.training.job'].browse(job_ids)
                jobs._write_workflow({'state': 'cancelled'})
                jobs.unlink()
                env['llm.model'].browse(model.id).unlink()
                env['llm.training.dataset'].browse(dataset.id).unlink()
                env['llm.provider'].browse(provider.id).unlink()
                cr.commit()


if __name__ == '__main__':
    main()
