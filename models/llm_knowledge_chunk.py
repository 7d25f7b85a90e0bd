# -*- coding: utf-8 -*-
from odoo import api, fields, models


class LlmKnowledgeChunk(models.Model):
    """A piece of a source's text with its embedding vector. Written in bulk by the sync
    (llm.knowledge.collection._add_chunks, plain SQL); the vector is a float32 bytea column the
    ORM does not load (reading thousands of vectors through fields would cost more than the
    search). Only LLM managers read chunks directly: everyone else gets them through retrieval,
    which checks the source record's rights first."""
    _name = 'llm.knowledge.chunk'
    _description = 'Knowledge Chunk'
    _order = 'source_id, res_id, position'

    collection_id = fields.Many2one('llm.knowledge.collection', required=True, ondelete='cascade', index=True,
                                    readonly=True)
    source_id = fields.Many2one('llm.knowledge.source', required=True, ondelete='cascade', index=True, readonly=True)
    res_model = fields.Char(string='Record Model', required=True, readonly=True)
    res_id = fields.Integer(string='Record ID', required=True, readonly=True, index=True)
    name = fields.Char(string='Title', readonly=True)
    position = fields.Integer(readonly=True, help='Order of the chunk in its record\'s or file\'s text.')
    text = fields.Text(readonly=True)
    token_count = fields.Integer(readonly=True)
    content_hash = fields.Char(readonly=True, help='Of the whole text of the source record: the sync embeds again '
                                                   'only records whose text changed.')

    @api.model_cr
    def init(self):
        self.env.cr.execute('ALTER TABLE llm_knowledge_chunk ADD COLUMN IF NOT EXISTS vector bytea')
        self.env.cr.execute('CREATE INDEX IF NOT EXISTS llm_knowledge_chunk_source_res_idx '
                            'ON llm_knowledge_chunk (source_id, res_id)')

    @api.multi
    def action_open_record(self):
        """The chunk's source record (a file's chunks: their source)."""
        self.ensure_one()
        return {'type': 'ir.actions.act_window', 'res_model': self.res_model, 'res_id': self.res_id,
                'view_mode': 'form', 'target': 'current'}
