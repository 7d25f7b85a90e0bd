# -*- coding: utf-8 -*-
from odoo import _, api, fields, models
from odoo.exceptions import UserError


class LlmAssistantAskWizard(models.TransientModel):
    """Ask an assistant a question and read its answer with numbered sources (links to the
    records). A transient record per user: questions and answers are not shared."""
    _name = 'llm.assistant.ask.wizard'
    _description = 'Ask an Assistant'

    assistant_id = fields.Many2one('llm.assistant', required=True, ondelete='cascade')
    question = fields.Text(required=True)
    answer = fields.Text(readonly=True)
    sources_html = fields.Html(string='Sources', readonly=True, sanitize=False)  # built escaped by llm.assistant

    @api.multi
    def action_ask(self):
        self.ensure_one()
        if not (self.question or '').strip():
            raise UserError(_('Ask a question.'))
        result = self.assistant_id.answer(self.question)
        self.write({'answer': result['text'], 'sources_html': self.env['llm.assistant'].sources_html(result['sources'])})
        return {'type': 'ir.actions.act_window', 'res_model': self._name, 'res_id': self.id, 'view_mode': 'form',
                'target': 'new'}
