import base64
import json
import unittest
from datetime import timedelta

from odoo.exceptions import AccessError, UserError, ValidationError

from odoo.addons.llm_training.lib.datasets import conversations as conv

from .conversations_common import T0, ConversationCase


def msg(minutes, is_assistant, text, key='c'):
    return conv.Message(key, T0 + timedelta(minutes=minutes), is_assistant, text)


class TestConversationsLib(unittest.TestCase):
    """lib/datasets/conversations.py alone, without Odoo."""

    def test_consecutive_messages_of_one_side_merge_into_one_turn(self):
        example, reason = conv.build_example([msg(0, False, 'Hi'), msg(1, False, ' My order? '),
                                              msg(2, True, 'Shipped.'), msg(3, True, 'Today.')], scrub=False)
        self.assertIsNone(reason)
        self.assertEqual(example['messages'], [{'role': 'user', 'content': 'Hi\n\nMy order?'},
                                               {'role': 'assistant', 'content': 'Shipped.\n\nToday.'}])

    def test_system_prompt_first_and_trailing_user_turns_dropped(self):
        example, _reason = conv.build_example([msg(0, False, 'Q'), msg(1, True, 'A'), msg(2, False, 'Thanks')],
                                              system_prompt=' Be brief. ')
        self.assertEqual([m['role'] for m in example['messages']], ['system', 'user', 'assistant'])
        self.assertEqual(example['messages'][0]['content'], 'Be brief.')
        self.assertEqual(example['messages'][-1]['content'], 'A')

    def test_each_skip_reason(self):
        cases = {
            conv.SKIP_NO_ASSISTANT: [msg(0, False, 'Anyone?'), msg(1, False, 'Hello?')],
            conv.SKIP_EMPTY: [msg(0, False, '  \n '), msg(1, True, '')],
            conv.SKIP_NO_USER: [msg(0, True, 'Good morning all')],
            conv.SKIP_TOO_SHORT: [msg(0, False, 'Q'), msg(1, True, 'A')],
        }
        for reason, messages in cases.items():
            self.assertEqual(conv.build_example(messages, min_turns=4), (None, reason), reason)
        result = conv.build_examples(list(cases.values()), min_turns=4)
        self.assertEqual((result.examples, result.conversations), ([], 4))
        self.assertEqual(dict(result.skipped), {reason: 1 for reason in cases})

    def test_split_by_gap_cuts_at_longer_silences_only(self):
        messages = [msg(0, False, 'a'), msg(60, True, 'b'), msg(121, False, 'c'), msg(130, True, 'd')]
        parts = conv.split_by_gap(messages, gap_minutes=60)
        self.assertEqual([[m.text for m in part] for part in parts], [['a', 'b'], ['c', 'd']])

    def test_max_examples_keeps_the_first_and_counts_the_rest(self):
        pairs = [[msg(i, False, 'Q%d' % i, key=i), msg(i + 1, True, 'A%d' % i, key=i)] for i in range(5)]
        result = conv.build_examples(pairs, max_examples=2)
        self.assertEqual([e['messages'][0]['content'] for e in result.examples], ['Q0', 'Q1'])
        self.assertEqual(result.truncated, 3)

    def test_scrub_pii_replaces_email_phone_iban_card_and_keeps_dates(self):
        text = ('Mail jane.doe+x@example.co.uk, call +33 6 12 34 56 78 or (555) 123-4567, IBAN '
                'DE89 3704 0044 0532 0130 00, card 4111 1111 1111 1111, on 2020-03-02 at 10:30, 3 items.')
        self.assertEqual(conv.scrub_pii(text), 'Mail [EMAIL], call [PHONE] or [PHONE], IBAN [IBAN], card [CARD], '
                                               'on 2020-03-02 at 10:30, 3 items.')


class TestImportFromChannel(ConversationCase):

    @classmethod
    def setUpClass(cls):
        super(TestImportFromChannel, cls).setUpClass()
        post, ch, agent, alice, bob = cls.post, cls.channel, cls.agent, cls.alice, cls.bob
        # conversation 1: two users, merged turns, a note and a tracking message to ignore
        post(ch, 0, alice, '<p>Hello, my <b>order</b> is late.<br/>Mail me at jane.doe@example.com</p>')
        post(ch, 1, alice, '<p>Or call +33 6 12 34 56 78</p>')
        post(ch, 2, agent, '<p>Customer is upset, check the carrier</p>', subtype=cls.note)
        post(ch, 3, agent, '<p>Stage changed</p>', message_type='notification')
        post(ch, 4, agent, '<p>Sorry! It ships today.</p>')
        post(ch, 5, bob, '<p>Can I pay by IBAN DE89 3704 0044 0532 0130 00 or card 4111 1111 1111 1111?</p>')
        post(ch, 6, agent, '<div>Both work.</div>')
        post(ch, 7, alice, '<p>Thanks!</p>')  # trailing user turn: dropped
        # 3 hours of silence: conversation 2, with an e-mail from outside (no author)
        post(ch, 180, bob, '<p>How do I reset my password?</p>')
        post(ch, 181, None, '<p>Same question here.</p>', message_type='email')
        post(ch, 182, agent, '<p>Use the <i>Forgot password</i> link.</p>')
        # conversation 3: nobody from the assistant side answered
        post(ch, 400, alice, '<p>Anyone there?</p>')
        post(ch, 401, bob, '<p>Hello?</p>')
        # conversation 4: only an empty message each
        post(ch, 600, alice, '<p><br/></p>')
        post(ch, 601, agent, '<p> </p>')

    expected_first = [
        {'role': 'system', 'content': 'You are the support assistant.'},
        {'role': 'user', 'content': 'Hello, my *order* is late.\nMail me at [EMAIL]\n\nOr call [PHONE]'},
        {'role': 'assistant', 'content': 'Sorry! It ships today.'},
        {'role': 'user', 'content': 'Can I pay by IBAN [IBAN] or card [CARD]?'},
        {'role': 'assistant', 'content': 'Both work.'},
    ]
    expected_second = [
        {'role': 'system', 'content': 'You are the support assistant.'},
        {'role': 'user', 'content': 'How do I reset my password?\n\nSame question here.'},
        {'role': 'assistant', 'content': 'Use the Forgot password link.'},
    ]

    def test_preview_counts_skips_and_shows_examples_as_written(self):
        wizard = self.wizard(system_prompt='You are the support assistant.')
        action = wizard.action_preview()
        self.assertEqual((action['res_model'], action['res_id'], action['target']), (wizard._name, wizard.id, 'new'))
        preview = wizard.preview
        self.assertIn('Conversations: 4\nExamples: 2\nSkipped conversations: 2\n  - no assistant reply: 1\n'
                      '  - too short: 0\n  - empty after cleaning: 1', preview)
        lines = preview.split('as they will be written:\n')[1].splitlines()
        self.assertEqual([json.loads(line) for line in lines],
                         [{'messages': self.expected_first}, {'messages': self.expected_second}])
        self.assertFalse(self.env['llm.training.dataset'].search([('name', '=', 'Support import')]),
                         'a preview creates nothing')

    def test_notes_and_tracking_messages_are_ignored_and_html_stripped(self):
        wizard = self.wizard()
        wizard.action_preview()
        for text in (json.dumps(wizard._build().examples), wizard.preview):
            self.assertNotIn('Customer is upset', text)  # the internal note
            self.assertNotIn('Stage changed', text)  # the tracking message
            self.assertNotIn('<', text)
        self.assertIn('"content": "Both work."', wizard.preview)  # a <div> body, stripped

    def test_min_turns_skips_short_conversations(self):
        wizard = self.wizard(min_turns=4)
        wizard.action_preview()
        self.assertIn('Examples: 1\nSkipped conversations: 3\n  - no assistant reply: 1\n  - too short: 1\n'
                      '  - empty after cleaning: 1', wizard.preview)

    def test_without_scrubbing_personal_data_stays(self):
        first = self.wizard(scrub_pii=False)._build().examples[0]['messages']
        self.assertIn('jane.doe@example.com', first[0]['content'])
        self.assertIn('DE89 3704 0044 0532 0130 00', first[2]['content'])

    def test_gap_longer_than_the_silences_keeps_one_conversation(self):
        result = self.wizard(gap_minutes=24 * 60)._build()
        self.assertEqual((result.conversations, len(result.examples)), (1, 1))

    def test_user_who_cannot_read_the_channel_gets_none_of_its_messages(self):
        wizard = self.wizard(user=self.outsider)
        result = wizard._build()
        self.assertEqual((result.conversations, result.examples), (0, []))
        wizard.action_preview()
        self.assertIn('Conversations: 0\n', wizard.preview)
        self.assertIn('Channels left out because you cannot read them: 1', wizard.preview)
        with self.assertRaisesRegex(UserError, 'No conversation gave an example'):
            wizard.action_create()
        self.assertFalse(wizard.dataset_id)
        # not even when the channel's messages are searched directly with that user's rights
        domain = wizard._import()._message_domain(wizard._options())
        domain[domain.index(('res_id', 'in', []))] = ('res_id', 'in', self.channel.ids)
        self.assertFalse(self.env['mail.message'].sudo(self.outsider).search(domain))
        self.assertEqual(self.env['mail.message'].search_count(domain), 13)

    def test_direct_messages_count_when_chosen(self):
        chat = self.env['mail.channel'].create({'name': 'Alice, Agent', 'channel_type': 'chat', 'public': 'private',
                                                'channel_partner_ids': [(6, 0, (self.alice | self.agent | self.manager)
                                                                         .mapped('partner_id').ids)]})
        self.post(chat, 0, self.alice, '<p>Quick question: opening hours?</p>')
        self.post(chat, 1, self.agent, '<p>9 to 5.</p>')
        examples = self.wizard(channel_ids=[(6, 0, (self.channel | chat).ids)])._build().examples
        self.assertEqual(len(examples), 3)
        self.assertIn({'messages': [{'role': 'user', 'content': 'Quick question: opening hours?'},
                                    {'role': 'assistant', 'content': '9 to 5.'}]}, examples)

    def test_without_assistant_partners_the_error_says_what_to_choose(self):
        with self.assertRaisesRegex(UserError, "Choose whose messages are the assistant's"):
            self.wizard(assistant_partner_ids=[(5,)]).action_preview()

    def test_a_model_without_chatter_is_refused(self):
        with self.assertRaisesRegex(ValidationError, 'Model "res.country" has no chatter'):
            self.wizard(source='chatter', res_model='res.country')
        with self.assertRaisesRegex(ValidationError, 'Model "no.such.model" does not exist'):
            self.wizard(source='chatter', res_model='no.such.model')

    def test_a_user_without_dataset_rights_cannot_create(self):
        wizard = self.wizard(user=self.alice)  # an employee: may use the wizard, not create datasets
        with self.assertRaises(AccessError):
            wizard.action_create()
        self.assertFalse(self.env['llm.training.dataset'].search([('name', '=', 'Support import')]))


class TestImportFromChatter(ConversationCase):

    @classmethod
    def setUpClass(cls):
        super(TestImportFromChatter, cls).setUpClass()
        cls.partners = cls.env['res.partner']
        for i in range(12):
            cls.partners |= cls.env['res.partner'].create({'name': 'Import customer %d' % i})
        for i, partner in enumerate(cls.partners[:11]):
            start = 60 * i
            cls.post(partner, start + 1, cls.alice, '<p>Question %d from <b>me</b>: my card is '
                                                    '4111-1111-1111-1111</p>' % i)
            cls.post(partner, start + 2, cls.agent, '<p>Internal: VIP</p>', subtype=cls.note)
            cls.post(partner, start + 3, cls.agent, '<p>Answer %d.</p>' % i)
        cls.post(cls.partners[11], 900, cls.alice, '<p>No answer to this one</p>')

    def expected(self, i):
        return {'messages': [{'role': 'user', 'content': 'Question %d from *me*: my card is [CARD]' % i},
                             {'role': 'assistant', 'content': 'Answer %d.' % i}]}

    def test_one_conversation_per_record_in_date_order(self):
        result = self.wizard(source='chatter', res_model='res.partner', channel_ids=[(5,)])._build()
        self.assertEqual(result.conversations, 12)
        self.assertEqual(result.examples, [self.expected(i) for i in range(11)])
        self.assertEqual(dict(result.skipped), {conv.SKIP_NO_ASSISTANT: 1})

    def test_action_create_writes_a_valid_dataset_with_the_examples(self):
        wizard = self.wizard(source='chatter', res_model='res.partner', name='Partner chatter')
        action = wizard.action_create()
        dataset = wizard.dataset_id
        self.assertEqual((action['res_model'], action['res_id']), ('llm.training.dataset', dataset.id))
        self.assertEqual((dataset.name, dataset.state, dataset.example_count), ('Partner chatter', 'valid', 11))
        attachment = dataset.attachment_ids
        self.assertEqual((attachment.datas_fname, attachment.res_model, attachment.res_id),
                         ('Partner_chatter.jsonl', 'llm.training.dataset', dataset.id))
        lines = base64.b64decode(attachment.datas).decode('utf-8').splitlines()
        self.assertEqual([json.loads(line) for line in lines], [self.expected(i) for i in range(11)])

    def test_max_examples_and_dates_limit_what_is_read(self):
        result = self.wizard(source='chatter', res_model='res.partner', max_examples=3)._build()
        self.assertEqual(result.examples, [self.expected(i) for i in range(3)])
        # from the 5th conversation's start (T0 + 4h) to before the 7th's (T0 + 6h)
        result = self.wizard(source='chatter', res_model='res.partner', date_from='2020-03-02 13:00:00',
                             date_to='2020-03-02 15:00:00')._build()
        self.assertEqual(result.examples, [self.expected(4), self.expected(5)])
