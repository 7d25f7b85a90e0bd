# -*- coding: utf-8 -*-
"""An export of a fine-tuned model (Hugging Face folder, GGUF + Ollama Modelfile) made by
trainer/export.py in the trainer environment, where the model was trained: the model's provider
adapter runs it (a detached process on this host, a Ray job on the cluster) and the cron follows it."""
import json
import logging
import os
import threading

from odoo import _, api, fields, models, tools
from odoo.exceptions import UserError

from ..lib.exceptions import TrainingFailedError, TrainingRetryableError
from ..lib.export import runner
from ..lib.providers.base import ExportSpec

_logger = logging.getLogger(__name__)

STATES = [('pending', 'Pending'), ('running', 'Running'), ('done', 'Done'), ('failed', 'Failed')]
# The legal moves: a failed or finished export is not run again (make a new one).
TRANSITIONS = {'pending': ('running', 'failed'), 'running': ('done', 'failed'), 'done': (), 'failed': ()}


class LlmModelExport(models.Model):
    _name = 'llm.model.export'
    _description = 'LLM Model Export'
    _order = 'id desc'

    model_id = fields.Many2one('llm.model', required=True, ondelete='cascade', index=True, readonly=True)
    company_id = fields.Many2one(related='model_id.company_id', store=True, readonly=True)
    format = fields.Selection(runner.FORMATS, required=True, readonly=True)
    state = fields.Selection(STATES, default='pending', required=True, readonly=True, index=True, copy=False)
    folder = fields.Char(readonly=True, copy=False, help='The export\'s folder as Odoo sees it (on a cluster '
                                                        'provider: on its shared storage); out/ is the export.')
    path = fields.Char(readonly=True, copy=False, help='Where the exported files are, as Odoo sees them.')
    size = fields.Float(readonly=True, digits=(20, 0), help='Bytes, all files together.')
    size_mb = fields.Float(string='Size (MB)', compute='_compute_size_mb', digits=(16, 1))
    main_file = fields.Char(readonly=True, help='The weights file the checksum is of.')
    sha256 = fields.Char(string='SHA-256', readonly=True)
    verification = fields.Char(readonly=True, help='How the export answered a training prompt compared with '
                                                   'the fine-tuned model (greedy, first 16 tokens).')
    date_started = fields.Datetime(readonly=True, copy=False)
    date_done = fields.Datetime(readonly=True, copy=False)
    log = fields.Text(readonly=True, copy=False, help='The export\'s events, oldest first.')
    error = fields.Text(readonly=True, copy=False)
    provider_data = fields.Text(readonly=True, copy=False, default='{}',
                                help='What the provider keeps to find its run again (a pid, a Ray job id).')
    events_offset = fields.Integer(readonly=True, copy=False)

    @api.depends('size')
    def _compute_size_mb(self):
        for export in self:
            export.size_mb = export.size / 1e6

    # -- state machine ---------------------------------------------------------------------------
    def _set_state(self, state, **values):
        for export in self:
            if state not in TRANSITIONS[export.state]:
                raise UserError(_('Export %d cannot go from %s to %s.') % (export.id, export.state, state))
        self.write(dict(values, state=state))

    def _set_running(self, provider_data):
        self._set_state('running', provider_data=json.dumps(provider_data, sort_keys=True),
                        date_started=fields.Datetime.now())

    def _set_done(self, manifest):
        main = runner.main_file(manifest) or {}
        check = manifest.get('verification') or {}
        self._set_state('done', date_done=fields.Datetime.now(), size=manifest.get('size') or 0,
                        main_file=main.get('path'), sha256=main.get('sha256'),
                        verification='%s/%s tokens equal' % (check.get('same_tokens'), check.get('compared_tokens')))

    def _set_failed(self, error):
        self._add_event('error', error)
        self._set_state('failed', error=error, date_done=fields.Datetime.now())

    def _add_event(self, level, message):
        for export in self:
            line = '%s %s %s' % (fields.Datetime.now(), level.upper(), message)
            export.log = ((export.log + '\n') if export.log else '') + line

    # -- running ---------------------------------------------------------------------------------
    @api.model
    def _export_root_default(self):
        """Where exports go on this host (a cluster provider puts them on its shared storage)."""
        return tools.config.get('llm_training_export_dir') or os.path.join(
            tools.config['data_dir'], 'llm_training', 'exports')

    def _card(self):
        """Model card facts only Odoo knows (names and counts, never content)."""
        model, job = self.model_id, self.model_id.job_id
        card = {'name': '%s v%d' % (model.name, model.version), 'base_name': model.base_model_id.name or None}
        if job:
            card['datasets'] = [{'name': d.name, 'examples': d.example_count} for d in job.dataset_ids]
            card['technique'] = job.technique
            if job.has_final_train_loss or job.has_final_valid_loss:
                card['losses'] = {k: v for k, v, has in (
                    ('train_loss', job.final_train_loss, job.has_final_train_loss),
                    ('valid_loss', job.final_valid_loss, job.has_final_valid_loss)) if has}
            # The system prompt the data was trained with (prompt/completion datasets put theirs
            # before each example): the Modelfile's SYSTEM, when all training datasets agree.
            prompts = set(job.dataset_ids.mapped(lambda d: (d.system_prompt or '').strip()))
            if len(prompts) == 1 and '' not in prompts:
                card['system_prompt'] = prompts.pop()
        return card

    def _spec(self):
        model, job = self.model_id, self.model_id.job_id
        return ExportSpec(key='llm-export-%s-%d' % (self.env.cr.dbname, self.id), folder=self.folder,
                          model=model.model_ref, format=self.format,
                          job_dir=job.work_dir if job and job.work_dir and os.path.isdir(job.work_dir) else None,
                          card=self._card(), convert_dir=tools.config.get('llm_training_llama_convert_dir'),
                          offset=self.events_offset, provider_data=json.loads(self.provider_data or '{}'))

    def _start(self):
        """Ask the model's provider to run the export where it trained the model (capability
        `exports`); a provider that cannot says so and the export fails."""
        self.ensure_one()
        model = self.model_id
        if model.kind != 'fine_tuned' or not model.provider_id.exports:
            return self._set_failed(_('Only fine-tuned models of a provider that runs the trainer (local, Ray) can be '
                                      'exported (model "%s" is on %s).') % (model.name, model.provider_id.name))
        adapter = model.provider_id._adapter()
        try:
            folder = os.path.join(adapter.export_root(self._export_root_default()), self.env.cr.dbname,
                                  'export-%d' % self.id)
            self.write({'folder': folder, 'path': runner.out_dir(folder)})
            spec = self._spec()
            where = adapter.start_export(spec)
        except TrainingRetryableError as e:
            _logger.info('Export %s: %s; next pass', self.id, e)
            return  # still pending: the next pass starts it (the same key: never twice)
        except TrainingFailedError as e:
            return self._set_failed(str(e))
        self._add_event('info', 'Export started: %s' % where)
        self._set_running(spec.provider_data)

    def _check(self):
        self.ensure_one()
        try:
            report = self.model_id.provider_id._adapter().check_export(self._spec())
        except TrainingRetryableError as e:
            _logger.info('Export %s: %s; next pass', self.id, e)
            return
        except TrainingFailedError as e:
            return self._set_failed(str(e))
        for event in report['events']:
            self._add_event(event.get('level') or 'info', event.get('message') or '')
        self.events_offset = report['offset']
        if report['state'] == 'done':
            self._set_done(report['manifest'])
        elif report['state'] == 'failed':
            if not any(event.get('level') == 'error' for event in report['events']):
                self._add_event('error', report['error'])  # the trainer said nothing: why it ended is the event
            self._set_state('failed', error=report['error'], date_done=fields.Datetime.now())

    @api.model
    def _cron_run_exports(self, limit=10):
        """Start pending exports and follow running ones (each in its own transaction outside tests)."""
        testing = getattr(threading.currentThread(), 'testing', False)
        for export_id in self.search([('state', 'in', ('pending', 'running'))], limit=limit, order='id').ids:
            export = self.browse(export_id)
            if not export._claim():
                continue  # another worker is on it (a cron, Check Status): it does this step
            try:
                export._step()
            except Exception as e:  # one broken export must not stop the others
                _logger.exception('Export %s failed', export_id)
                if not testing:
                    self.env.cr.rollback()
                export._set_failed('%s: %s' % (type(e).__name__, e))
            if not testing:
                self.env.cr.commit()
        return True

    def _claim(self):
        """Lock this export's row for the transaction, or False when another transaction holds it:
        two workers stepping one export at once would start two export processes."""
        self.env.cr.execute('SELECT id FROM llm_model_export WHERE id = %s FOR UPDATE SKIP LOCKED', (self.id,))
        claimed = bool(self.env.cr.fetchone())
        self.invalidate_cache(ids=self.ids)  # the state as the lock holder left it
        return claimed

    def _step(self):
        if self.state == 'pending':
            self._start()
        elif self.state == 'running':
            self._check()

    # -- actions ---------------------------------------------------------------------------------
    @api.multi
    def action_check(self):
        """The cron's step for these exports, at once."""
        for export in self:
            if not export._claim():
                raise UserError(_('Export %d is being updated by another process; try again in a moment.') % export.id)
            export._step()
        return True

    @api.multi
    def action_download(self):
        self.ensure_one()
        if self.state != 'done':
            raise UserError(_('The export is not done yet.'))
        return {'type': 'ir.actions.act_url', 'url': '/llm_training/export/%d/download' % self.id, 'target': 'self'}

    @api.multi
    def unlink(self):
        """Delete removes the export's files too; a running export is left to finish first."""
        if any(export.state == 'running' for export in self):
            raise UserError(_('An export is running; delete it once it has finished.'))
        folders = [export.folder for export in self if export.folder]
        result = super(LlmModelExport, self).unlink()
        for folder in folders:
            runner.delete(folder)
        return result

