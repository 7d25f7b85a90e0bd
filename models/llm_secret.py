# -*- coding: utf-8 -*-
from odoo import api, fields, models


class LlmSecret(models.Model):
    """A credential of an LLM record (an API key, a cluster's auth header), kept apart from it.

    In Odoo 11 a field's `groups=` hides it from `read` but not from `read_group`, search domains
    or `order`, so a secret in a provider column can be guessed by any user who can read
    providers. Here the ACL grants this model to nobody (the managers' row grants nothing), which
    closes every ORM path (read, search, read_group, order, export) to every person, LLM managers
    included: secrets are write-only for people. The owning record's write access is checked,
    then the code below reads or writes the secret as superuser, for that record only; the
    owning record shows only the last four characters. Values are never logged."""
    _name = 'llm.secret'
    _description = 'LLM Secret'
    _rec_name = 'field_name'

    res_model = fields.Char(required=True, index=True, readonly=True)
    res_id = fields.Integer(required=True, index=True, readonly=True)
    field_name = fields.Char(required=True, readonly=True, help='Which secret of the record, e.g. api_key.')
    value = fields.Char(required=True)
    company_id = fields.Many2one('res.company', readonly=True)

    _sql_constraints = [
        ('record_field_unique', 'unique(res_model, res_id, field_name)', 'A record keeps one value per secret.'),
    ]

    @api.model
    def _find(self, record, field_name):
        return self.search([('res_model', '=', record._name), ('res_id', '=', record.id),
                            ('field_name', '=', field_name)], limit=1)

    @api.model
    def _read_value(self, record, field_name):
        """The secret's value for code that talks to the service (adapters), after the caller's
        access to `record` was checked. Runs as superuser: the cron and managers' actions need it,
        and nothing returns it to a browser."""
        secret = self.sudo()._find(record, field_name)
        return secret.value if secret else ''

    @api.model
    def _write_value(self, record, field_name, value):
        """Set or replace (value) or remove (empty value) a secret of `record`, for whoever may write
        that record (managers of its company): the secret belongs to it and to its company."""
        record.check_access_rights('write')
        record.check_access_rule('write')
        Secret = self.sudo()
        secret = Secret._find(record, field_name)
        if not value:
            secret.unlink()
        elif secret:
            secret.value = value
        else:
            Secret.create({'res_model': record._name, 'res_id': record.id, 'field_name': field_name, 'value': value,
                          'company_id': record.company_id.id if 'company_id' in record._fields else False})

    @api.model
    def _hint(self, record, field_name):
        """What a form may show of a secret: its last four characters."""
        value = self._read_value(record, field_name)
        return (u'\u2022\u2022\u2022\u2022' + value[-4:]) if value else ''

    @api.model
    def _unlink_for(self, records):
        self.sudo().search([('res_model', '=', records._name), ('res_id', 'in', records.ids)]).unlink()
