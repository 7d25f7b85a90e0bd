# -*- coding: utf-8 -*-
from odoo import SUPERUSER_ID, _, api, models
from odoo.exceptions import AccessError, ValidationError

# x2many commands that link existing records: (4, id) and (6, 0, ids). (0, 0, vals) creates a
# record with the caller's own rights, (1, id, vals) writes it with them: the ORM checks those.
LINK_COMMANDS = (4, 6)


def linked_ids(field_type, value):
    """The ids of existing records a create/write value links: a many2one id, or the ids of the
    (4, id) / (6, 0, ids) commands (and a plain id list) of an x2many value."""
    if not value:
        return []
    if field_type == 'many2one':
        return [value] if isinstance(value, int) else []
    ids = []
    for command in value:
        if isinstance(command, int):
            ids.append(command)
        elif isinstance(command, (list, tuple)) and command and command[0] == 4:
            ids.append(command[1])
        elif isinstance(command, (list, tuple)) and command and command[0] == 6:
            ids.extend(command[2] or [])
    return ids


class LlmAccessMixin(models.AbstractModel):
    """Checks the records a create or write links. Odoo 11 checks no read access on a many2one
    value or on (4, id) / (6, 0, ids): without this, a manager of one company could name another
    company's dataset or file and have the engine (which runs as superuser) read it for them.
    Models list the fields to check in `_link_fields`; the superuser (the cron, sudo()) skips it."""
    _name = 'llm.access.mixin'
    _description = 'LLM link checks'

    _link_fields = ()

    def _check_links(self, vals):
        """The caller must be able to read every record named in `vals` for `_link_fields`, and a
        company set there must be one of the caller's."""
        if self.env.uid == SUPERUSER_ID:
            return
        user = self.env.user
        for name in self._link_fields:
            if name not in vals:
                continue
            field = self._fields[name]
            ids = [i for i in linked_ids(field.type, vals[name]) if i]
            if not ids:
                continue
            records = self.env[field.comodel_name].browse(ids).exists()
            if field.comodel_name == 'res.company':
                if records - user.company_ids:
                    raise AccessError(_('%s: you may only use your own companies.') % self._description)
                continue
            if field.comodel_name == 'ir.attachment':
                records.check('read')  # attachments follow the access of the record they belong to
                continue
            records.check_access_rights('read')
            records.check_access_rule('read')

    def _check_same_company(self, field_names):
        """Each record in `field_names` belongs to this record's company (or to no company)."""
        for record in self.sudo():  # the company of a linked record, even one the caller cannot read
            for name in field_names:
                for linked in record[name]:
                    if 'company_id' in linked._fields and linked.company_id and \
                            linked.company_id != record.company_id:
                        raise ValidationError(_('%s "%s": %s "%s" belongs to company %s, not to %s.') % (
                            record._description, record.display_name, record._fields[name].string,
                            linked.display_name, linked.company_id.name,
                            record.company_id.name or _('no company')))

    @api.model
    def _user_may_run_as(self, user):
        """Only a system administrator chooses a user other than themselves (whose rights a key or
        schedule will use); the superuser, which bypasses every record rule, needs one too."""
        if self.env.uid == SUPERUSER_ID:
            return True
        if self.env.user.has_group('base.group_system'):
            return True
        return user == self.env.user and user.id != SUPERUSER_ID
