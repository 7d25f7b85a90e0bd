# -*- coding: utf-8 -*-
import base64
import io
import json

from odoo import _, api, fields, models
from odoo.exceptions import UserError

from ..lib.dataset_validator import DatasetValidator


class LlmTrainingDataset(models.Model):
    """One or more JSONL files in chat format, validated before any job uses them."""
    _name = 'llm.training.dataset'
    _description = 'LLM Training Dataset'
    _inherit = ['mail.thread']
    _order = 'id desc'

    name = fields.Char(required=True, track_visibility='onchange')
    description = fields.Text()
    company_id = fields.Many2one('res.company', default=lambda self: self.env.user.company_id)
    attachment_ids = fields.Many2many('ir.attachment', 'llm_training_dataset_attachment_rel', 'dataset_id',
                                      'attachment_id', string='JSONL Files',
                                      help='Chat-format JSONL: one {"messages": [...]} object per line.')
    state = fields.Selection([('draft', 'Not validated'), ('valid', 'Valid'), ('invalid', 'Invalid')],
                             default='draft', required=True, readonly=True, copy=False,
                             track_visibility='onchange')
    data_format = fields.Selection([('chat', 'Chat (supervised)'), ('preference', 'Preference pairs (DPO)')],
                                   string='Format', default='chat', required=True, track_visibility='onchange',
                                   help='Chat: {"messages": [...]} per line. Preference: {"input": {"messages": '
                                        '[...]}, "preferred_output": [...], "non_preferred_output": [...]} per line.')
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

    def write(self, vals):
        if 'attachment_ids' in vals or 'data_format' in vals:
            vals = dict(vals, state='draft')  # new files: the old verdict no longer holds
        return super(LlmTrainingDataset, self).write(vals)

    @api.multi
    def action_validate(self):
        for dataset in self:
            dataset._validate()
        return True

    def _attachment_streams(self):
        """(file name, binary stream) per file, opened one at a time so memory stays flat."""
        for attachment in self.attachment_ids.sudo():
            if attachment.store_fname:
                stream = open(attachment._full_path(attachment.store_fname), 'rb')
            else:
                stream = io.BytesIO(base64.b64decode(attachment.db_datas or b''))
            with stream:
                yield attachment.datas_fname or attachment.name, stream

    def _validate(self, base_model=None):
        """Validate all files as one dataset, store the verdict and statistics, return the report."""
        self.ensure_one()
        if not self.attachment_ids:
            raise UserError(_('Dataset "%s" has no file; upload at least one JSONL file.') % self.name)
        options = {'long_tokens': 4096, 'data_format': self.data_format}
        if base_model:
            options['max_tokens'] = base_model.context_length or None
            # the provider's own tokenizer when it has one, else the estimate
            counter = base_model.provider_id._dispatch_optional('token_counter', base_model)
            if counter:
                options['count_tokens'] = counter
        validator = DatasetValidator(**options)
        try:
            for filename, stream in self._attachment_streams():
                validator.validate_file(stream, filename)
        finally:
            if hasattr(options.get('count_tokens'), 'close'):
                options['count_tokens'].close()  # a counter process (OpenAI's tiktoken)
        report = validator.finish()
        values = {
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
