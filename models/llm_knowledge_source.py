# -*- coding: utf-8 -*-
import logging

from odoo import _, api, fields, models
from odoo.exceptions import UserError, ValidationError
from odoo.tools import html2plaintext
from odoo.tools.safe_eval import safe_eval

from ..lib.knowledge import chunking, documents

_logger = logging.getLogger(__name__)

SOURCE_STATES = [('pending', 'Pending'), ('indexing', 'Indexing'), ('done', 'Indexed'), ('error', 'Error')]
TEXT_TYPES = ('char', 'text', 'html', 'selection', 'many2one', 'integer', 'float', 'monetary', 'date', 'datetime')


class LlmKnowledgeSource(models.Model):
    """What a collection is made of: an uploaded file (text, Markdown, HTML, PDF, DOCX), or the
    records of any model chosen by a domain and fields, kept in sync by the cron. Each chunk keeps
    its source record: a file's chunks point to this source, a record's chunks to the record."""
    _name = 'llm.knowledge.source'
    _description = 'Knowledge Source'
    _order = 'collection_id, id'

    name = fields.Char(required=True)
    collection_id = fields.Many2one('llm.knowledge.collection', required=True, ondelete='cascade', index=True)
    company_id = fields.Many2one(related='collection_id.company_id', store=True, readonly=True)
    kind = fields.Selection([('file', 'Uploaded file'), ('records', 'Records'), ('dataset', "Dataset's answers")],
                            required=True, default='file')
    dataset_id = fields.Many2one('llm.training.dataset', string='Dataset', ondelete='cascade',
                                 help="Each assistant answer of a chat dataset (JSONL), with the question before it.")
    datas = fields.Binary(string='File', attachment=True)
    datas_fname = fields.Char(string='File Name')
    model_id = fields.Many2one('ir.model', string='Model', ondelete='cascade',
                               help='Records of this model are indexed (e.g. Products, Contacts, Messages).')
    domain = fields.Char(default='[]', help='Which records, as a domain (e.g. [("sale_ok", "=", True)]).')
    field_ids = fields.Many2many('ir.model.fields', string='Fields',
                                 help='The fields whose text is indexed (none: the record\'s name).')
    state = fields.Selection(SOURCE_STATES, default='pending', required=True, readonly=True, index=True, copy=False)
    error = fields.Text(readonly=True, copy=False)
    warning = fields.Text(readonly=True, copy=False)
    sync_cursor = fields.Integer(readonly=True, copy=False,
                                 help='The last record id of the sync pass under way: a cut-off cron resumes here.')
    last_sync = fields.Datetime(readonly=True, copy=False)
    chunk_count = fields.Integer(compute='_compute_chunk_count')
    # the OpenAI-compatible API (/v1/vector_stores): the uploaded file and file batch it came from
    api_file_id = fields.Char(readonly=True, copy=False, index=True)
    api_batch_id = fields.Char(readonly=True, copy=False, index=True)
    file_size = fields.Integer(readonly=True, copy=False)

    @api.multi
    def _compute_chunk_count(self):
        for source in self.filtered('id'):
            self.env.cr.execute('SELECT count(*) FROM llm_knowledge_chunk WHERE source_id = %s', (source.id,))
            source.chunk_count = self.env.cr.fetchone()[0]

    @api.constrains('kind', 'model_id', 'domain')
    def _check_kind(self):
        for source in self:
            if source.kind == 'records':
                if not source.model_id:
                    raise ValidationError(_('Source "%s": choose the model whose records are indexed.') % source.name)
                try:
                    domain = safe_eval(source.domain or '[]')
                    self.env[source.model_id.model].sudo().search(domain, limit=1)
                except Exception as e:
                    raise ValidationError(_('Source "%s": the domain is not valid: %s') % (source.name, e))

    @api.multi
    def write(self, values):
        if {'datas', 'domain', 'field_ids', 'model_id', 'dataset_id'} & set(values):
            values = dict(values, state='pending', sync_cursor=0, error=False)
        return super(LlmKnowledgeSource, self).write(values)

    @api.multi
    def unlink(self):
        collections = self.mapped('collection_id')
        for source in self:
            source._drop_chunks()
        result = super(LlmKnowledgeSource, self).unlink()
        for collection in collections.exists():
            collection._bump_version()  # every worker's index drops the chunks too
        return result

    @api.model
    def create_from_file(self, collection, attachment, api_file_id=False):
        """A file source of `collection` holding a copy of an uploaded attachment (indexed by the
        cron); `api_file_id`: the /v1 file id it was attached by."""
        filename = attachment.datas_fname or attachment.name
        return self.create({'collection_id': collection.id, 'kind': 'file', 'name': filename,
                            'datas_fname': filename, 'datas': attachment.datas, 'api_file_id': api_file_id,
                            'file_size': attachment.file_size or 0})

    # -- the sync ---------------------------------------------------------------------------------
    def _drop_chunks(self, res_ids=None):
        query, args = 'SELECT id FROM llm_knowledge_chunk WHERE source_id = %s', [self.id]
        if res_ids is not None:
            query, args = query + ' AND res_id = ANY(%s)', args + [list(res_ids)]
        self.env.cr.execute(query, args)
        ids = [row[0] for row in self.env.cr.fetchall()]
        self.collection_id._delete_chunks(ids)
        return ids

    def _sync_batch(self, batch_size):
        """One batch of work on this source; whether more is left. A failure is written on the
        source (its error, for the user to fix) and stops this source only."""
        self.ensure_one()
        if self.kind in ('file', 'dataset') and self.state != 'pending':
            return False
        try:
            with self.env.cr.savepoint():
                if self.kind == 'dataset':
                    return self._index_dataset()
                return self._index_file() if self.kind == 'file' else self._sync_records(batch_size)
        except (documents.DocumentError, UserError, ValidationError) as e:
            self._set_error(getattr(e, 'name', None) or str(e))
        except Exception as e:  # one broken source must not stop the others
            _logger.exception('Knowledge source %s failed', self.id)
            self._set_error('%s: %s' % (type(e).__name__, e))
        return False

    def _set_error(self, message):
        self.write({'state': 'error', 'error': message, 'sync_cursor': 0})

    def _attachment(self):
        return self.env['ir.attachment'].sudo().search([('res_model', '=', self._name), ('res_field', '=', 'datas'),
                                                        ('res_id', '=', self.id)], limit=1)

    def _index_file(self):
        collection = self.collection_id
        attachment = self._attachment()
        filename = self.datas_fname or self.name
        if not attachment or not attachment.store_fname:
            raise documents.DocumentError(_('%s: the file is empty') % filename)
        text = documents.extract_text(collection._trainer_python(), _trainer_env(), attachment._full_path(attachment.store_fname),
                                      filename, int(collection.max_file_mb * 1024 * 1024))
        chunks = collection._chunker()(text, collection.chunk_size, collection.chunk_overlap)
        if documents.kind_of(filename) == 'markdown':
            chunks = chunking.with_headings(text, chunks)
        self._drop_chunks()
        content_hash = chunking.text_hash(text)
        collection._add_chunks(self, [(self._name, self.id, filename, content_hash, c) for c in chunks])
        self.write({'state': 'done', 'error': False, 'last_sync': fields.Datetime.now()})
        collection._bump_version()
        return False

    def _index_dataset(self):
        """A dataset's answers, one unit each; the chunks point to the dataset, so its rights
        (owner-only for a restricted dataset) decide who gets them."""
        collection, dataset = self.collection_id, self.dataset_id
        if not dataset:
            raise UserError(_('Source "%s": choose a dataset.') % self.name)
        answers = []
        for filename, stream in dataset.sudo()._data_streams():
            if not filename.lower().endswith('.jsonl'):
                raise documents.DocumentError(_('%s: only chat datasets in JSONL give answers') % filename)
            answers.extend(chunking.dataset_answers(stream))
        if not answers:
            raise documents.DocumentError(_('dataset %s has no assistant answer') % dataset.name)
        chunker, items = collection._chunker(), []
        for number, text in answers:
            title = '%s, example %d' % (dataset.name, number)
            items.extend(('llm.training.dataset', dataset.id, title, chunking.text_hash(text), chunk)
                         for chunk in chunker(text, collection.chunk_size, collection.chunk_overlap))
        self._drop_chunks()
        collection._add_chunks(self, items)
        self.write({'state': 'done', 'error': False, 'last_sync': fields.Datetime.now()})
        collection._bump_version()
        return False

    def _indexed_fields(self):
        """The fields to read, and a warning naming those left out: a field restricted to groups
        is indexed only if every reader group of the collection is within them (else a reader
        could read through the assistant what the field hides)."""
        Model = self.env[self.model_id.model]
        readers = self.collection_id.reader_group_ids or self.env.ref('base.group_user')
        names, skipped = [], []
        for field in self.field_ids or self.env['ir.model.fields'].search(
                [('model', '=', Model._name), ('name', '=', Model._rec_name or 'display_name')]):
            definition = Model._fields.get(field.name)
            if definition is None or definition.type not in TEXT_TYPES + ('many2many', 'one2many'):
                skipped.append('%s (not text)' % field.name)
                continue
            if definition.groups:
                allowed = set()
                for xmlid in definition.groups.split(','):
                    group = self.env.ref(xmlid.strip(), raise_if_not_found=False)
                    if group:
                        allowed.add(group.id)
                if not all(set((group | group.trans_implied_ids).ids) & allowed for group in readers):
                    skipped.append('%s (restricted to %s)' % (field.name, definition.groups))
                    continue
            names.append(field.name)
        warning = _('Not indexed: %s.') % ', '.join(skipped) if skipped else False
        return names, warning

    @staticmethod
    def _record_text(record, names):
        lines = []
        for name in names:
            field, value = record._fields[name], record[name]
            if field.type in ('many2one', 'many2many', 'one2many'):
                value = ', '.join(value.mapped('display_name'))
            elif field.type == 'html':
                value = html2plaintext(value or '')
            elif field.type == 'selection':
                value = dict(field._description_selection(record.env)).get(value, value) if value else ''
            elif value is False or value is None:
                value = ''
            value = ('%s' % value).strip()
            if value:
                lines.append('%s: %s' % (field.string, value) if len(names) > 1 else value)
        return '\n'.join(lines)

    def _sync_records(self, batch_size):
        """One batch of a sync pass over the records in id order from the cursor: a record whose text
        changed (or is new) is embedded again, an unchanged one is left alone; at the end of the
        pass, chunks of records gone from the domain (deleted, archived, changed) are dropped."""
        collection = self.collection_id
        Model = self.env[self.model_id.model].sudo()  # everything is indexed; rights apply when answering
        domain = safe_eval(self.domain or '[]')
        records = Model.search(domain + [('id', '>', self.sync_cursor)], order='id', limit=batch_size)
        if not records:
            present = set(Model.search(domain).ids)
            self.env.cr.execute('SELECT DISTINCT res_id FROM llm_knowledge_chunk WHERE source_id = %s', (self.id,))
            gone = [row[0] for row in self.env.cr.fetchall() if row[0] not in present]
            if gone:
                self._drop_chunks(gone)
                collection._bump_version()
            self.write({'state': 'done', 'sync_cursor': 0, 'last_sync': fields.Datetime.now(), 'error': False})
            return False
        names, warning = self._indexed_fields()
        self.env.cr.execute('SELECT res_id, content_hash FROM llm_knowledge_chunk WHERE source_id = %s AND res_id = ANY(%s)',
                            (self.id, records.ids))
        known = dict(self.env.cr.fetchall())
        chunker, items, changed = collection._chunker(), [], []
        for record in records:
            text, title = self._record_text(record, names), record.display_name
            content_hash = chunking.text_hash('%s\n%s' % (title, text))  # the title is in its chunks too
            if known.get(record.id) == content_hash:
                continue
            changed.append(record.id)
            items.extend((Model._name, record.id, title, content_hash, chunk)
                         for chunk in chunking.with_title(title, chunker(text, collection.chunk_size,
                                                                        collection.chunk_overlap)))
        if changed:
            self._drop_chunks(changed)
            collection._add_chunks(self, items)
            collection._bump_version()
        self.write({'state': 'indexing', 'sync_cursor': records[-1].id, 'warning': warning})
        return True

    @api.multi
    def action_retry(self):
        self.write({'state': 'pending', 'sync_cursor': 0, 'error': False})
        return True


def _trainer_env():
    from ..lib.providers.local import trainer_env
    return trainer_env()
