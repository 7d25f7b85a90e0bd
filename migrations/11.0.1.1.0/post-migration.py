# -*- coding: utf-8 -*-
"""11.0.1.1.0: credentials move to llm.secret; dataset files get an owner.

- `llm_provider.api_key` was a plain column that any internal user could reach through
  read_group, domains and ORDER BY: its values move into llm.secret (managers only) and the column
  is dropped, so no copy of a key stays readable.
- Events and metrics get their job's company, which their new record rules read.
- Dataset files uploaded before this version belong to no record, which lets Odoo 11 show them to
  every internal user: each gets its dataset as owner (a file shared by two datasets is copied).
"""
import logging

from odoo import SUPERUSER_ID, api

_logger = logging.getLogger(__name__)


def move_api_keys(env):
    cr = env.cr
    cr.execute("""SELECT 1 FROM information_schema.columns
                   WHERE table_name = 'llm_provider' AND column_name = 'api_key'""")
    if not cr.fetchone():
        return 0
    cr.execute("SELECT id FROM llm_provider WHERE api_key IS NOT NULL AND api_key != ''")
    ids = [row[0] for row in cr.fetchall()]
    for provider_id in ids:
        cr.execute('SELECT api_key FROM llm_provider WHERE id = %s', (provider_id,))
        provider = env['llm.provider'].with_context(active_test=False).browse(provider_id)
        env['llm.secret']._write_value(provider, 'api_key', cr.fetchone()[0])
    cr.execute('ALTER TABLE llm_provider DROP COLUMN api_key')
    return len(ids)


def migrate(cr, version):
    if not version:
        return
    env = api.Environment(cr, SUPERUSER_ID, {})
    keys = move_api_keys(env)
    for table in ('llm_training_job_event', 'llm_training_job_metric'):  # company rules read company_id
        env.cr.execute('UPDATE %s AS r SET company_id = j.company_id FROM llm_training_job j '  # noqa: not user input
                       'WHERE r.job_id = j.id AND r.company_id IS NULL' % table)
    env['llm.training.dataset'].with_context(active_test=False).search([])._own_attachments()
    _logger.info('llm_training %s: %d API key(s) moved to llm.secret, dataset files owned', version, keys)
