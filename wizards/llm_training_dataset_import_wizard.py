# -*- coding: utf-8 -*-
import json

from odoo import _, api, fields, models
from odoo.exceptions import ValidationError

from ..lib.datasets import conversations as conv

PREVIEW_EXAMPLES = 3


class LlmTrainingDatasetImportWizard(models.TransientModel):
    """Build a chat dataset from Odoo conversations: Discuss channels or the chatter of records.
    Reads mail.message with the user's own rights, so nobody gets messages they may not read.
    The import itself is a service shared with the training schedule (llm.conversation.import)."""
    _name = 'llm.training.dataset.import.wizard'
    _description = 'Import a Training Dataset from Conversations'

    def _default_name(self):
        return _('Conversations %s') % fields.Date.context_today(self)

    source = fields.Selection(conv.SOURCES, required=True, default='channel')
    channel_ids = fields.Many2many('mail.channel', 'llm_import_wizard_channel_rel', 'wizard_id', 'channel_id',
                                   string='Channels', help='Channels and direct conversations to read.')
    res_model = fields.Char(string='Model', help='Technical name of a model with a chatter, e.g. res.partner '
                                                  'or helpdesk.ticket: one conversation per record.')
    date_from = fields.Datetime(string='From', help='Messages from this moment on.')
    date_to = fields.Datetime(string='Until', help='Messages before this moment.')
    assistant_partner_ids = fields.Many2many('res.partner', 'llm_import_wizard_assistant_rel', 'wizard_id',
                                             'partner_id', string='Assistant',
                                             help="Whose messages are the assistant's (e.g. your support team); "
                                                  "everyone else's are the user's.")
    system_prompt = fields.Text(help='Put first in every example as the system message, when set.')
    gap_minutes = fields.Integer(string='Gap (minutes)', default=60,
                                 help='In a channel, this much silence starts a new conversation.')
    min_turns = fields.Integer(string='Minimum turns', default=2,
                               help='Conversations with fewer user and assistant turns are skipped.')
    max_examples = fields.Integer(help='At most this many examples, the oldest conversations first; 0: all.')
    scrub_pii = fields.Boolean(string='Scrub personal data', default=True,
                               help='Replace portal links and access tokens, e-mail addresses, phone numbers, '
                                    'IBANs and card numbers by [LINK], [TOKEN], [EMAIL], [PHONE], [IBAN], [CARD].')
    scrub_names = fields.Boolean(string='Replace names', default=True,
                                 help="With Scrub personal data: the names of the conversations' people (the "
                                      "messages' authors, the channels' members) become [NAME].")
    visibility = fields.Selection([('company', 'Company'), ('restricted', 'Restricted')], default='restricted',
                                  required=True, help='Of the new dataset. Restricted: only you and LLM managers '
                                                      'read it (conversations are private by nature).')
    name = fields.Char(string='Dataset name', required=True, default=_default_name)
    preview = fields.Text(readonly=True)
    dataset_id = fields.Many2one('llm.training.dataset', string='Dataset', readonly=True)

    @api.constrains('source', 'res_model')
    def _check_res_model(self):
        for wizard in self.filtered(lambda w: w.source == 'chatter' and w.res_model):
            self._import().chatter_model(wizard.res_model)

    @api.constrains('gap_minutes', 'min_turns', 'max_examples')
    def _check_numbers(self):
        for wizard in self:
            if wizard.gap_minutes <= 0:
                raise ValidationError(_('Gap (minutes) must be above 0, e.g. 60.'))
            if wizard.min_turns < 0 or wizard.max_examples < 0:
                raise ValidationError(_('Minimum turns and max examples cannot be negative (0 for max '
                                        'examples means all).'))

    # -- buttons ---------------------------------------------------------------------------------
    @api.multi
    def action_preview(self):
        """Show the counts and the first examples; creates nothing."""
        self.ensure_one()
        self.check_access_rights('write')
        self.check_access_rule('write')
        self.preview = self._preview_text(self._build())
        return {'type': 'ir.actions.act_window', 'res_model': self._name, 'res_id': self.id,
                'view_mode': 'form', 'target': 'new', 'name': _('Import from Conversations')}

    @api.multi
    def action_create(self):
        """Write the examples as a new dataset's JSONL file, validate it, open it."""
        self.ensure_one()
        self.check_access_rights('write')
        self.check_access_rule('write')
        self.env['llm.training.dataset'].check_access_rights('create')
        dataset = self._import().create_dataset(self._options(), self._build(), self.name)
        self.dataset_id = dataset
        return {'type': 'ir.actions.act_window', 'res_model': 'llm.training.dataset', 'res_id': dataset.id,
                'view_mode': 'form', 'target': 'current'}

    # -- the work: the conversation import service (models/llm_conversation_import.py) -----------
    def _import(self):
        return self.env['llm.conversation.import']

    def _options(self):
        return self._import().options_of(self, self.date_from, self.date_to)

    def _build(self):
        self.ensure_one()
        return self._import().build(self._options())

    def _preview_text(self, result):
        text = self._import().summary(self._options(), result)
        if result.examples:
            shown = result.examples[:PREVIEW_EXAMPLES]
            text += '\n\n' + _('First %d examples, as they will be written:') % len(shown) + '\n'
            text += '\n'.join(json.dumps(e, ensure_ascii=False) for e in shown)
        return text
