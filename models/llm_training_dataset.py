# -*- coding: utf-8 -*-
import base64
import io
import json
import logging
import os
import threading
import time

import psycopg2

from odoo import _, api, fields, models, tools
from odoo.exceptions import AccessError, UserError

from ..lib.datasets.dataset_formats import DEFAULT_COLUMNS, EXTENSIONS
from ..lib.host import limits
from ..lib.datasets.dataset_validator import DatasetValidator, preview_examples, render_preview
from ..lib.datasets.server_files import ServerPathError, open_server_path, resolve_server_path
from ..lib.datasets.token_count import CounterUnavailable
from ..user_errors import DatasetBusyError

_logger = logging.getLogger(__name__)

# Fields that change what the files mean: a change sends the dataset back to "Not validated".
READING_FIELDS = ('attachment_ids', 'server_path', 'data_format', 'file_type', 'prompt_column', 'completion_column',
                  'text_column', 'system_prompt')
VISIBILITIES = [('company', 'Company'), ('restricted', 'Restricted')]
# What each format trains as: prompt/completion rows become chat examples.
TRAINING_FORMATS = {'chat': 'chat', 'prompt_completion': 'chat', 'preference': 'preference', 'text': 'text'}


def data_root():
    """The folder under which datasets may name files on the server (odoo.conf), or None."""
    return tools.config.get('llm_training_data_root') or None


class LlmTrainingDataset(models.Model):
    """One or more files (JSONL, CSV, Parquet; uploaded, or one on the training storage), validated
    and converted to training examples before any job uses them."""
    _name = 'llm.training.dataset'
    _description = 'LLM Training Dataset'
    _inherit = ['mail.thread', 'llm.access.mixin']
    _order = 'id desc'
    _link_fields = ('company_id', 'attachment_ids')

    name = fields.Char(required=True, track_visibility='onchange')
    description = fields.Text()
    company_id = fields.Many2one('res.company', default=lambda self: self.env.user.company_id)
    user_id = fields.Many2one('res.users', string='Owner', default=lambda self: self.env.user, index=True,
                              track_visibility='onchange', help='Reads a restricted dataset, with LLM managers.')
    visibility = fields.Selection(VISIBILITIES, default='company', required=True, track_visibility='onchange',
                                  help='Company: every internal user of the company reads it (its files, preview '
                                       'and the models trained on it). Restricted: only its owner and LLM '
                                       'managers; imports from conversations start restricted.')
    attachment_ids = fields.Many2many('ir.attachment', 'llm_training_dataset_attachment_rel', 'dataset_id',
                                      'attachment_id', string='Files',
                                      help='JSONL, CSV or Parquet files (see File Type), one example per row.')
    server_path = fields.Char(
        track_visibility='onchange',
        help='A file already on the training storage, read in place (nothing is copied into the database): '
             'a path under llm_training_data_root of the Odoo configuration, absolute or relative to it. '
             'Managers only.')
    state = fields.Selection([('draft', 'Not validated'), ('valid', 'Valid'), ('invalid', 'Invalid')],
                             default='draft', required=True, readonly=True, copy=False,
                             track_visibility='onchange')
    data_format = fields.Selection([('chat', 'Chat (supervised)'), ('prompt_completion', 'Prompt / completion'),
                                    ('preference', 'Preference pairs (DPO)'),
                                    ('text', 'Plain text (continued pre-training)')],
                                   string='Format', default='chat', required=True, track_visibility='onchange',
                                   help='Chat: {"messages": [...]} per line (CSV/Parquet: a "messages" column '
                                        'holding them as JSON). Prompt / completion: a prompt and a completion '
                                        'column, trained as a user and an assistant message. Preference (JSONL '
                                        'only): {"input": {"messages": [...]}, "preferred_output": [...], '
                                        '"non_preferred_output": [...]} per line. Plain text: a text column, '
                                        'trained on all its tokens with no chat template.')
    file_type = fields.Selection([('jsonl', 'JSONL'), ('csv', 'CSV'), ('parquet', 'Parquet')], default='jsonl',
                                 required=True, track_visibility='onchange',
                                 help='JSONL: one JSON object per line. CSV: a header row naming the columns. '
                                      'Parquet: read a batch of rows at a time.')
    prompt_column = fields.Char(default=DEFAULT_COLUMNS['prompt_column'],
                                help='The column (JSONL: key) holding the prompt.')
    completion_column = fields.Char(default=DEFAULT_COLUMNS['completion_column'],
                                    help='The column (JSONL: key) holding the completion the model learns.')
    text_column = fields.Char(default=DEFAULT_COLUMNS['text_column'],
                              help='The column (JSONL: key) holding the text.')
    system_prompt = fields.Text(help='Prompt / completion data: put before each example as a system message.')
    preview = fields.Html(compute='_compute_preview', sanitize=False,
                          help='The first examples as the trainer will see them, after conversion.')
    base_model_id = fields.Many2one(
        'llm.model', string='Count Tokens For', domain=[('kind', '=', 'base')], default=lambda self: self._default_base_model(),
        help="Validate counts tokens with this model's own tokenizer and chat template, as its jobs will "
             "(a job validates again with its own base model). Empty, or a model without a tokenizer: "
             "the counts are an estimate.")
    token_counting = fields.Selection([('exact', 'Exact'), ('estimate', 'Estimate')], string='Token Counts',
                                      readonly=True, copy=False,
                                      help="Exact: counted with the base model's tokenizer and chat template. "
                                           "Estimate: about 4 characters a token, no tokenizer was at hand.")
    validated_at = fields.Datetime(readonly=True, copy=False)
    example_count = fields.Integer(readonly=True, copy=False)
    message_count = fields.Integer(readonly=True, copy=False)
    token_total = fields.Integer(readonly=True, copy=False)
    token_min = fields.Integer(readonly=True, copy=False)
    token_mean = fields.Float(readonly=True, copy=False, digits=(16, 1))
    token_max = fields.Integer(readonly=True, copy=False)
    duplicate_count = fields.Integer(readonly=True, copy=False)
    error_count = fields.Integer(readonly=True, copy=False)
    warning_count = fields.Integer(readonly=True, copy=False)
    validation_report = fields.Text(readonly=True, copy=False,
                                    help='Each problem with its file, line and field.')
    validation_problems = fields.Text(readonly=True, copy=False,
                                      help='The same problems as JSON, for other programs.')
    job_ids = fields.Many2many('llm.training.job', 'llm_training_job_dataset_rel', 'dataset_id', 'job_id',
                               string='Jobs', readonly=True)
    api_uploaded = fields.Boolean(readonly=True, copy=False, index=True,
                                  help='Uploaded through the OpenAI-compatible API (/v1/files): validated by a cron '
                                       'after the upload answers.')

    @api.depends(*READING_FIELDS)
    def _compute_preview(self):
        for dataset in self:
            if not dataset.attachment_ids and not dataset.server_path:
                dataset.preview = False
                continue
            if dataset.server_path and not dataset.id and \
                    not self.env.user.has_group('llm_training.group_llm_manager'):
                # an unsaved form (onchange) must not become a way to read files the saved check refuses
                dataset.preview = False
                continue
            try:
                examples, problems = preview_examples(dataset._data_streams(), **dataset._reader_options())
                dataset.preview = render_preview(examples, problems)
            except (UserError, ValueError, OSError) as e:  # the form still opens, saying why
                dataset.preview = '<p><i>%s</i></p>' % tools.html_escape(tools.ustr(e))

    @api.onchange('attachment_ids', 'server_path')
    def _onchange_file_type(self):
        """Take the File Type from the first file's extension (validation still checks each)."""
        names = [a.datas_fname or a.name or '' for a in self.attachment_ids] + [self.server_path or '']
        for name in names:
            extension = os.path.splitext(name.lower())[1]
            if extension in EXTENSIONS:
                self.file_type = EXTENSIONS[extension]
                return

    @api.model
    def create(self, vals):
        self._check_links(vals)
        if vals.get('server_path'):
            self._check_server_path(vals['server_path'])
        dataset = super(LlmTrainingDataset, self).create(vals)
        dataset._own_attachments()
        return dataset

    @api.multi
    def write(self, vals):
        self._check_links(vals)
        if 'server_path' in vals:
            self._check_server_path(vals['server_path'])
        if any(name in vals for name in READING_FIELDS):
            vals = dict(vals, state='draft')  # new files or a new reading: the old verdict no longer holds
        result = super(LlmTrainingDataset, self).write(vals)
        if 'attachment_ids' in vals:
            self._own_attachments()
        return result

    def _own_attachments(self):
        """Make each file belong to exactly one dataset (res_model/res_id), so Odoo's attachment
        access follows the dataset's rules (company and visibility included). A file uploaded before
        its dataset was saved has res_id 0; a file that belongs to another record is copied, never
        shared. The caller's read access to each file was checked first (_check_links), so the sudo
        here copies nothing the caller could not read."""
        for dataset in self:
            for attachment in dataset.attachment_ids.sudo():
                if attachment.res_model == self._name and attachment.res_id == dataset.id:
                    continue
                if not attachment.res_id or (not attachment.res_model and not attachment.res_field):
                    attachment.write({'res_model': self._name, 'res_id': dataset.id})
                else:
                    copy = attachment.copy({'res_model': self._name, 'res_id': dataset.id})
                    super(LlmTrainingDataset, dataset).write({'attachment_ids': [(3, attachment.id), (4, copy.id)]})

    @api.multi
    def action_validate(self):
        self.check_access_rights('write')
        self.check_access_rule('write')
        for dataset in self:
            dataset._validate(dataset.base_model_id or None)
        return True

    @api.model
    def _cron_validate_uploaded(self, limit=20, budget=60):
        """Validate the files uploaded through /v1/files (their status goes from uploaded to
        processed or error); a file a job validated first is skipped. No new file is started past
        the pass's time budget (less under a cron worker's time limit): the next pass goes on."""
        testing = getattr(threading.currentThread(), 'testing', False)
        started, budget = time.time(), limits.cron_budget(tools.config, budget)
        for dataset in self.search([('api_uploaded', '=', True), ('state', '=', 'draft')], limit=limit, order='id'):
            if time.time() - started > budget:
                break
            try:
                with self.env.cr.savepoint():
                    dataset._validate()
            except DatasetBusyError:
                continue  # a job is validating it right now
            except (psycopg2.Error, MemoryError):
                raise
            except Exception as e:
                _logger.exception('Dataset %s: validation failed', dataset.id)
                dataset.write({'state': 'invalid', 'validation_report': str(e)})
            if not testing:
                self.env.cr.commit()  # one file's verdict is kept whatever the next one does
        return True

    def _lock_for_validation(self):
        """One validation per dataset at a time: a second one is refused at once, not run twice.
        NO KEY: creating a job on the dataset (a foreign-key check) is not blocked meanwhile."""
        try:
            with self.env.cr.savepoint():
                self.env.cr.execute('SELECT id FROM llm_training_dataset WHERE id = %s FOR NO KEY UPDATE NOWAIT', (self.id,))
        except psycopg2.OperationalError as e:
            if e.pgcode != '55P03':  # lock_not_available
                raise
            raise DatasetBusyError(_('Dataset "%s" is being validated by another request; try again in a '
                                     'moment.') % self.name)

    @api.model
    def _check_server_path(self, path):
        """Only managers name files on the server (here, not only in the view: RPC skips views),
        and only under the configured root."""
        if not self.env.user.has_group('llm_training.group_llm_manager'):
            raise AccessError(_('Only LLM Managers may set a server path on a dataset; upload the file instead.'))
        if path:
            try:
                resolve_server_path(path, data_root())
            except ServerPathError as e:
                raise UserError(tools.ustr(e))

    def _reader_options(self):
        """How lib/datasets/dataset_validator reads this dataset's files (format, file type, columns)."""
        self.ensure_one()
        return {'data_format': self.data_format, 'file_type': self.file_type, 'prompt_column': self.prompt_column,
                'completion_column': self.completion_column, 'text_column': self.text_column,
                'system_prompt': self.system_prompt}

    def _training_format(self):
        """What the trainer trains this dataset as: chat, preference or text."""
        self.ensure_one()
        return TRAINING_FORMATS[self.data_format]

    def _data_streams(self):
        """(file name, binary stream) per file, opened one at a time so memory stays flat: the
        uploaded files, then the server file, read in place (its path checked again on open:
        a link may have changed since it was saved)."""
        for item in self._attachment_streams():
            yield item
        if self.server_path:
            try:
                stream = open_server_path(self.server_path, data_root())
            except ServerPathError as e:
                raise UserError(tools.ustr(e))
            with stream:
                yield self.server_path, stream

    @api.multi
    def file_content(self):
        """The uploaded files' bytes, one after the other (the /v1 Files API's content)."""
        self.ensure_one()
        self.check_access_rule('read')
        return b''.join(stream.read() for _name, stream in self._attachment_streams())

    def _attachment_streams(self):
        """(file name, binary stream) per uploaded file."""
        for attachment in self.attachment_ids.sudo():
            if attachment.store_fname:
                stream = open(attachment._full_path(attachment.store_fname), 'rb')
            else:
                stream = io.BytesIO(base64.b64decode(attachment.db_datas or b''))
            with stream:
                yield attachment.datas_fname or attachment.name, stream

    @api.model
    def _default_base_model(self):
        """The company's first local base model: the tokenizer most datasets here are trained with."""
        return self.env['llm.model'].search([
            ('kind', '=', 'base'), ('provider_id.service', '=', 'local'),
            ('company_id', 'in', (self.env.user.company_id.id, False))], order='id', limit=1)

    def _validate(self, base_model=None):
        """Validate all files as one dataset, store the verdict and statistics, return the report."""
        self.ensure_one()
        if not self.attachment_ids and not self.server_path:
            raise UserError(_('Dataset "%s" has no file; upload at least one file or set a server path.') % self.name)
        self._lock_for_validation()
        max_line, max_file = limits.dataset_size_limits(tools.config)
        options = dict(self._reader_options(), long_tokens=4096, max_line_bytes=max_line, max_file_bytes=max_file)
        if base_model:
            options['max_tokens'] = base_model.context_length or None
            # the provider's own tokenizer when it has one, else the estimate
            counter = base_model.provider_id._adapter().token_counter(base_model.model_ref)
            if counter:
                options['count_tokens'] = counter
        try:
            try:
                validator = DatasetValidator(**options)
            except ValueError as e:  # a format the file type cannot hold (preference in CSV)
                raise UserError(_('Dataset "%s": %s') % (self.name, e))
            for filename, stream in self._data_streams():
                validator.validate_file(stream, filename)
        except CounterUnavailable as e:
            raise UserError(_('The token counter of the trainer environment did not answer (%s); check '
                              'llm_training_trainer_python in the Odoo configuration or run scripts/setup.sh.') % e)
        finally:
            if hasattr(options.get('count_tokens'), 'close'):
                options['count_tokens'].close()  # a counter process (OpenAI's tiktoken)
        report = validator.finish()
        values = {
            'token_counting': 'exact' if options.get('count_tokens') else 'estimate',
            'state': 'valid' if report.valid else 'invalid',
            'example_count': report.examples, 'message_count': report.messages,
            'token_total': report.tokens_total, 'token_min': report.tokens_min,
            'token_mean': report.tokens_mean, 'token_max': report.tokens_max,
            'duplicate_count': report.duplicates, 'error_count': report.error_count,
            'warning_count': report.warning_count, 'validation_report': report.as_text(),
            'validation_problems': json.dumps({'errors': [p.as_dict() for p in report.errors],
                                               'warnings': [p.as_dict() for p in report.warnings]}),
        }
        changed = {k: v for k, v in values.items() if self[k] != v}
        if changed or not self.validated_at:
            # Unchanged verdicts are not rewritten: jobs sharing a dataset do not contend for its row.
            self.write(dict(changed, validated_at=fields.Datetime.now()))
        return report
