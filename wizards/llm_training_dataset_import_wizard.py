# -*- coding: utf-8 -*-
import base64
import json
import re

from odoo import _, api, fields, models
from odoo.exceptions import UserError, ValidationError
from odoo.tools import html2plaintext

from ..lib import conversations as conv

PREVIEW_EXAMPLES = 3


class LlmTrainingDatasetImportWizard(models.TransientModel):
    """Build a chat dataset from Odoo conversations: Discuss channels or the chatter of records.
    Reads mail.message with the user's own rights, so nobody gets messages they may not read.
    The turn building is plain Python in lib/conversations.py; this model reads and writes."""
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
            wizard._chatter_model()

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
        result = self._build()
        dataset = self._create_dataset(result)
        return {'type': 'ir.actions.act_window', 'res_model': 'llm.training.dataset', 'res_id': dataset.id,
                'view_mode': 'form', 'target': 'current'}

    # -- the work --------------------------------------------------------------------------------
    def _chatter_model(self):
        """The model named in res_model, refused unless it exists and has a chatter."""
        name = (self.res_model or '').strip()
        if name not in self.env:
            raise ValidationError(_('Model "%s" does not exist; give a technical model name such as '
                                    'res.partner.') % name)
        model = self.env[name]
        if 'message_ids' not in model._fields or not hasattr(model, 'message_post'):
            raise ValidationError(_('Model "%s" has no chatter (it does not inherit mail.thread); choose a '
                                    'model whose records have messages, such as res.partner.') % name)
        return model

    def _channels(self):
        """(channels the user may read, how many chosen ones they may not). The relation itself is
        read as superuser only to count the unreadable ones; their messages stay out."""
        chosen = self.sudo().channel_ids.ids
        readable = self.env['mail.channel'].search([('id', 'in', chosen)])
        return readable, len(chosen) - len(readable)

    def _check_setup(self):
        if self.source == 'channel' and not self.sudo().channel_ids:
            raise UserError(_('Choose at least one channel to read.'))
        if self.source == 'chatter':
            if not (self.res_model or '').strip():
                raise UserError(_('Give the technical name of the model whose chatter to read, e.g. res.partner.'))
            self._chatter_model().check_access_rights('read')
        if not self.assistant_partner_ids:
            raise UserError(_("Choose whose messages are the assistant's (Assistant): without them no "
                              "conversation has an assistant reply."))
        if self.date_from and self.date_to and self.date_from >= self.date_to:
            raise UserError(_('"From" (%s) must be before "Until" (%s).') % (self.date_from, self.date_to))

    def _message_domain(self):
        note = self.env.ref('mail.mt_note')
        # comments and e-mails only: not internal notes, not tracking or other notifications
        domain = [('message_type', 'in', ('comment', 'email')),
                  '|', ('subtype_id', '=', False), ('subtype_id', '!=', note.id)]
        if self.source == 'channel':
            domain += [('model', '=', 'mail.channel'), ('res_id', 'in', self._channels()[0].ids)]
        else:
            domain += [('model', '=', self.res_model.strip()), ('res_id', '!=', 0)]
        if self.date_from:
            domain.append(('date', '>=', self.date_from))
        if self.date_to:
            domain.append(('date', '<', self.date_to))
        return domain

    def _read_messages(self):
        """The messages that count, in date order, as plain text: searched with the user's own
        rights (mail.message hides what the user may not read)."""
        assistants = set(self.assistant_partner_ids.ids)
        records = self.env['mail.message'].search_read(self._message_domain(), ['date', 'author_id', 'body',
                                                                                 'model', 'res_id'],
                                                       order='date asc, id asc')
        messages = [conv.Message(key=(r['model'], r['res_id']), date=fields.Datetime.from_string(r['date']),
                                 is_assistant=bool(r['author_id']) and r['author_id'][0] in assistants,
                                 text=html2plaintext(r['body']) if r['body'] else '')
                    for r in records]
        return messages, {r['author_id'][0] for r in records if r['author_id']}

    def _names(self, author_ids):
        """The pattern of the names to replace: the authors of the messages read and the members
        of the channels read (read as superuser: names only, of conversations the user may read)."""
        if not (self.scrub_pii and self.scrub_names):
            return None
        partners = self.env['res.partner'].sudo().browse(list(author_ids))
        if self.source == 'channel':
            partners |= self._channels()[0].sudo().mapped('channel_partner_ids')
        return conv.names_pattern(partners.mapped('name'))

    def _conversations(self, messages):
        if self.source == 'chatter':
            return conv.group_by_key(messages)  # one per record
        per_channel = conv.group_by_key(messages)
        conversations = [c for channel in per_channel for c in conv.split_by_gap(channel, self.gap_minutes)]
        return sorted(conversations, key=lambda c: c[0].date)

    def _build(self):
        """Read the messages and turn them into examples (lib/conversations.py's Result)."""
        self.ensure_one()
        self._check_setup()
        messages, author_ids = self._read_messages()
        return conv.build_examples(self._conversations(messages), system_prompt=self.system_prompt,
                                   min_turns=self.min_turns, max_examples=self.max_examples,
                                   scrub=self.scrub_pii, names=self._names(author_ids))

    def _summary(self, result):
        lines = [_('Conversations: %d') % result.conversations,
                 _('Examples: %d') % len(result.examples)]
        if result.truncated:
            lines.append(_('Left out by "max examples" (%d): %d') % (self.max_examples, result.truncated))
        lines.append(_('Skipped conversations: %d') % sum(result.skipped.values()))
        for reason, label in conv.SKIP_REASONS.items():
            if reason != conv.SKIP_NO_USER or result.skipped[reason]:
                lines.append('  - %s: %d' % (label, result.skipped[reason]))
        unreadable = self._channels()[1] if self.source == 'channel' else 0
        if unreadable:
            lines.append(_('Channels left out because you cannot read them: %d') % unreadable)
        return '\n'.join(lines)

    def _preview_text(self, result):
        text = self._summary(result)
        if result.examples:
            shown = result.examples[:PREVIEW_EXAMPLES]
            text += '\n\n' + _('First %d examples, as they will be written:') % len(shown) + '\n'
            text += '\n'.join(json.dumps(e, ensure_ascii=False) for e in shown)
        return text

    def _create_dataset(self, result):
        """A new dataset holding the examples as one JSONL file, validated; stored in dataset_id."""
        self.ensure_one()
        if not result.examples:
            raise UserError(_('No conversation gave an example, so no dataset was created.\n%s\n'
                              'Check the assistant partners, the dates and the minimum turns.') % self._summary(result))
        content = ''.join(json.dumps(e, ensure_ascii=False) + '\n' for e in result.examples).encode('utf-8')
        filename = (re.sub(r'[^\w.-]+', '_', self.name).strip('_') or 'conversations') + '.jsonl'
        attachment = self.env['ir.attachment'].create({'name': filename, 'datas_fname': filename,
                                                       'datas': base64.b64encode(content)})
        source = (_('channels %s') % ', '.join(self._channels()[0].mapped('name')) if self.source == 'channel'
                  else _('the chatter of %s') % self.res_model)
        dataset = self.env['llm.training.dataset'].create({
            'name': self.name, 'attachment_ids': [(6, 0, attachment.ids)], 'visibility': self.visibility,
            'description': _('Imported from %s.\n%s') % (source, self._summary(result)),
        })
        dataset.action_validate()
        self.dataset_id = dataset
        return dataset
