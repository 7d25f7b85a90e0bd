# -*- coding: utf-8 -*-
import base64
import json
import re

from odoo import _, api, fields, models
from odoo.exceptions import UserError, ValidationError
from odoo.tools import html2plaintext

from ..lib.datasets import conversations as conv

# The settings of an import, fields of the same names on the import wizard and the schedule; with
# date_from and date_to (the period read) they make the options dict every method here takes.
SETTINGS = ('source', 'res_model', 'system_prompt', 'gap_minutes', 'min_turns', 'max_examples', 'scrub_pii',
            'scrub_names', 'visibility')


class LlmConversationImport(models.AbstractModel):
    """The conversation import, one service for the import wizard and the training schedule: reads
    mail.message with the caller's own rights (so nobody gets messages they may not read), turns
    them into examples (the plain functions of lib/datasets/conversations.py) and writes the dataset."""
    _name = 'llm.conversation.import'
    _description = 'Conversation Import (service)'

    @api.model
    def options_of(self, record, date_from=False, date_to=False):
        """The options dict of a record with the import's settings (wizard, schedule). The chosen
        channels are read as configured (superuser, ids only): the import then reads, with the
        caller's rights, the readable ones and reports the others as left out."""
        options = {name: record[name] for name in SETTINGS}
        options.update(channel_ids=record.sudo().channel_ids.ids,
                       assistant_partner_ids=record.assistant_partner_ids.ids, date_from=date_from, date_to=date_to)
        return options

    @api.model
    def chatter_model(self, res_model):
        """The model named `res_model`, refused unless it exists and has a chatter."""
        name = (res_model or '').strip()
        if name not in self.env:
            raise ValidationError(_('Model "%s" does not exist; give a technical model name such as '
                                    'res.partner.') % name)
        model = self.env[name]
        if 'message_ids' not in model._fields or not hasattr(model, 'message_post'):
            raise ValidationError(_('Model "%s" has no chatter (it does not inherit mail.thread); choose a '
                                    'model whose records have messages, such as res.partner.') % name)
        return model

    @api.model
    def build(self, options):
        """Read the messages and turn them into examples (lib/datasets/conversations.py's Result)."""
        self._check_setup(options)
        messages, author_ids = self._read_messages(options)
        return conv.build_examples(self._conversations(options, messages), system_prompt=options['system_prompt'],
                                   min_turns=options['min_turns'], max_examples=options['max_examples'],
                                   scrub=options['scrub_pii'], names=self._names(options, author_ids))

    @api.model
    def summary(self, options, result):
        """The counts of an import, as text (shown in the preview, the dataset, the schedule)."""
        lines = [_('Conversations: %d') % result.conversations,
                 _('Examples: %d') % len(result.examples)]
        if result.truncated:
            lines.append(_('Left out by "max examples" (%d): %d') % (options['max_examples'], result.truncated))
        lines.append(_('Skipped conversations: %d') % sum(result.skipped.values()))
        for reason, label in conv.SKIP_REASONS.items():
            if reason != conv.SKIP_NO_USER or result.skipped[reason]:
                lines.append('  - %s: %d' % (label, result.skipped[reason]))
        unreadable = self._channels(options)[1] if options['source'] == 'channel' else 0
        if unreadable:
            lines.append(_('Channels left out because you cannot read them: %d') % unreadable)
        return '\n'.join(lines)

    @api.model
    def create_dataset(self, options, result, name):
        """A new dataset named `name` holding the examples as one JSONL file, validated."""
        if not result.examples:
            raise UserError(_('No conversation gave an example, so no dataset was created.\n%s\n'
                              'Check the assistant partners, the dates and the minimum turns.')
                            % self.summary(options, result))
        content = ''.join(json.dumps(e, ensure_ascii=False) + '\n' for e in result.examples).encode('utf-8')
        filename = (re.sub(r'[^\w.-]+', '_', name).strip('_') or 'conversations') + '.jsonl'
        attachment = self.env['ir.attachment'].create({'name': filename, 'datas_fname': filename,
                                                       'datas': base64.b64encode(content)})
        source = (_('channels %s') % ', '.join(self._channels(options)[0].mapped('name'))
                  if options['source'] == 'channel' else _('the chatter of %s') % options['res_model'])
        dataset = self.env['llm.training.dataset'].create({
            'name': name, 'attachment_ids': [(6, 0, attachment.ids)], 'visibility': options['visibility'],
            'description': _('Imported from %s.\n%s') % (source, self.summary(options, result)),
        })
        dataset.action_validate()
        return dataset

    # -- the reading -------------------------------------------------------------------------------
    def _channels(self, options):
        """(channels the caller may read, how many chosen ones they may not)."""
        chosen = options['channel_ids']
        readable = self.env['mail.channel'].search([('id', 'in', chosen)])
        return readable, len(chosen) - len(readable)

    def _check_setup(self, options):
        if options['source'] == 'channel' and not options['channel_ids']:
            raise UserError(_('Choose at least one channel to read.'))
        if options['source'] == 'chatter':
            if not (options['res_model'] or '').strip():
                raise UserError(_('Give the technical name of the model whose chatter to read, e.g. res.partner.'))
            self.chatter_model(options['res_model']).check_access_rights('read')
        if not options['assistant_partner_ids']:
            raise UserError(_("Choose whose messages are the assistant's (Assistant): without them no "
                              "conversation has an assistant reply."))
        if options['date_from'] and options['date_to'] and options['date_from'] >= options['date_to']:
            raise UserError(_('"From" (%s) must be before "Until" (%s).') % (options['date_from'], options['date_to']))

    def _message_domain(self, options):
        note = self.env.ref('mail.mt_note')
        # comments and e-mails only: not internal notes, not tracking or other notifications
        domain = [('message_type', 'in', ('comment', 'email')),
                  '|', ('subtype_id', '=', False), ('subtype_id', '!=', note.id)]
        if options['source'] == 'channel':
            domain += [('model', '=', 'mail.channel'), ('res_id', 'in', self._channels(options)[0].ids)]
        else:
            domain += [('model', '=', options['res_model'].strip()), ('res_id', '!=', 0)]
        if options['date_from']:
            domain.append(('date', '>=', options['date_from']))
        if options['date_to']:
            domain.append(('date', '<', options['date_to']))
        return domain

    def _read_messages(self, options):
        """The messages that count, in date order, as plain text: searched with the caller's own
        rights (mail.message hides what they may not read)."""
        assistants = set(options['assistant_partner_ids'])
        records = self.env['mail.message'].search_read(self._message_domain(options),
                                                       ['date', 'author_id', 'body', 'model', 'res_id'],
                                                       order='date asc, id asc')
        messages = [conv.Message(key=(r['model'], r['res_id']), date=fields.Datetime.from_string(r['date']),
                                 is_assistant=bool(r['author_id']) and r['author_id'][0] in assistants,
                                 text=html2plaintext(r['body']) if r['body'] else '')
                    for r in records]
        return messages, {r['author_id'][0] for r in records if r['author_id']}

    def _names(self, options, author_ids):
        """The pattern of the names to replace: the authors of the messages read and the members
        of the channels read (read as superuser: names only, of conversations the caller may read)."""
        if not (options['scrub_pii'] and options['scrub_names']):
            return None
        partners = self.env['res.partner'].sudo().browse(list(author_ids))
        if options['source'] == 'channel':
            partners |= self._channels(options)[0].sudo().mapped('channel_partner_ids')
        return conv.names_pattern(partners.mapped('name'))

    def _conversations(self, options, messages):
        if options['source'] == 'chatter':
            return conv.group_by_key(messages)  # one per record
        per_channel = conv.group_by_key(messages)
        conversations = [c for channel in per_channel for c in conv.split_by_gap(channel, options['gap_minutes'])]
        return sorted(conversations, key=lambda c: c[0].date)
