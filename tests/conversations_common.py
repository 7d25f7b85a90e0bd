from datetime import datetime, timedelta

from odoo import fields
from odoo.tests.common import SavepointCase

T0 = datetime(2020, 3, 2, 9, 0, 0)
WINDOW = {'date_from': '2020-03-01 00:00:00', 'date_to': '2020-04-01 00:00:00'}


class ConversationCase(SavepointCase):
    """Users, a private support channel and helpers to write real mail.message records."""

    @classmethod
    def setUpClass(cls):
        super(ConversationCase, cls).setUpClass()
        Users = cls.env['res.users'].with_context(no_reset_password=True, mail_create_nosubscribe=True)
        employee = cls.env.ref('base.group_user')
        manager_group = cls.env.ref('llm_training.group_llm_manager')

        def user(login, groups):
            return Users.create({'name': login.title(), 'login': login, 'email': '%s@example.org' % login,
                                 'groups_id': [(6, 0, groups.ids)]})
        cls.manager = user('llmt_imp_manager', manager_group)
        cls.outsider = user('llmt_imp_outsider', manager_group)  # may import, not a member of the channel
        cls.agent = user('llmt_imp_agent', employee)
        cls.alice = user('llmt_imp_alice', employee)
        cls.bob = user('llmt_imp_bob', employee)
        members = cls.manager | cls.agent | cls.alice | cls.bob
        cls.channel = cls.env['mail.channel'].create({
            'name': 'Support (import test)', 'public': 'private',
            'channel_partner_ids': [(6, 0, members.mapped('partner_id').ids)]})
        cls.note = cls.env.ref('mail.mt_note')
        cls.comment = cls.env.ref('mail.mt_comment')

    @classmethod
    def post(cls, record, minutes, author, body, message_type='comment', subtype=None, start=T0):
        return cls.env['mail.message'].create({
            'model': record._name, 'res_id': record.id, 'body': body, 'message_type': message_type,
            'subtype_id': (subtype or cls.comment).id, 'author_id': author.partner_id.id if author else False,
            'date': fields.Datetime.to_string(start + timedelta(minutes=minutes))})

    def wizard(self, user=None, **values):
        vals = dict(WINDOW, source='channel', channel_ids=[(6, 0, self.channel.ids)],
                    assistant_partner_ids=[(6, 0, self.agent.partner_id.ids)], name='Support import')
        vals.update(values)
        return self.env['llm.training.dataset.import.wizard'].sudo(user or self.manager).create(vals)
