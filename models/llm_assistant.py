# -*- coding: utf-8 -*-
from odoo import _, api, fields, models
from odoo.exceptions import UserError, ValidationError
from odoo.tools import html_escape

DEFAULT_PROMPT = (
    "Answer the question using only the numbered sources below. Cite the sources you use by their "
    "number in brackets, like [1]. If the sources do not contain the answer, say that you do not know.\n\n"
    "Sources:\n{context}"
)
NO_SOURCE_ANSWER = 'No source in the knowledge collections answers this question.'


class LlmAssistant(models.Model):
    """A RAG assistant: a chat model (base or fine-tuned, local or OpenAI) answering from
    knowledge collections, with numbered sources, within the asking user's rights. Deployed for a
    purpose like models, so other addons ask for "the support assistant"."""
    _name = 'llm.assistant'
    _description = 'LLM Assistant'
    _order = 'name'

    name = fields.Char(required=True)
    active = fields.Boolean(default=True)
    company_id = fields.Many2one('res.company', default=lambda self: self.env.user.company_id, index=True)
    model_id = fields.Many2one('llm.model', string='Chat Model', required=True, ondelete='restrict',
                               help='The model that writes the answer (base or fine-tuned, local or OpenAI).')
    collection_ids = fields.Many2many('llm.knowledge.collection', string='Collections', required=True)
    top_k = fields.Integer(string='Top K', default=4, required=True, help='Sources given to the model at most.')
    score_threshold = fields.Float(string='Similarity Threshold', default=0.25, digits=(16, 3),
                                   help='Chunks less similar to the question than this (cosine, -1 to 1) are not used.')
    max_context_tokens = fields.Integer(default=1200, required=True,
                                        help='The sources\' text given to the model, in tokens at most.')
    max_answer_tokens = fields.Integer(default=256, required=True)
    prompt_template = fields.Text(default=DEFAULT_PROMPT, required=True,
                                  help='The system message; {context} is replaced by the numbered sources.')
    purpose = fields.Char(index=True, help='What the assistant is for (e.g. "support"); other addons ask for the '
                                           'deployed assistant of a purpose.')
    state = fields.Selection([('draft', 'Draft'), ('deployed', 'Deployed')], default='draft', required=True,
                             readonly=True, copy=False, index=True)

    @api.constrains('top_k', 'max_context_tokens', 'max_answer_tokens', 'score_threshold', 'prompt_template')
    def _check_settings(self):
        for assistant in self:
            if assistant.top_k < 1 or assistant.max_context_tokens < 1 or assistant.max_answer_tokens < 1:
                raise ValidationError(_('Top K, max context tokens and max answer tokens must be positive.'))
            if not -1 <= assistant.score_threshold <= 1:
                raise ValidationError(_('The similarity threshold is a cosine: from -1 to 1.'))
            if '{context}' not in (assistant.prompt_template or ''):
                raise ValidationError(_('The prompt template must contain {context}, where the sources go.'))

    # -- actions ----------------------------------------------------------------------------------
    @api.multi
    def action_open_ask(self):
        self.ensure_one()
        return {'type': 'ir.actions.act_window', 'res_model': 'llm.assistant.ask.wizard', 'view_mode': 'form',
                'target': 'new', 'context': {'default_assistant_id': self.id}}

    @api.multi
    def action_deploy(self):
        """Make each assistant the company's deployed one for its purpose (the one before goes back
        to draft)."""
        self.check_access_rights('write')
        self.check_access_rule('write')
        for assistant in self:
            if not (assistant.purpose or '').strip():
                raise UserError(_('Assistant "%s" has no purpose: set one (e.g. "support") before deploying it.')
                                % assistant.name)
            self.search([('state', '=', 'deployed'), ('purpose', '=', assistant.purpose),
                         ('company_id', '=', assistant.company_id.id), ('id', '!=', assistant.id)]).write({'state': 'draft'})
            assistant.write({'state': 'deployed'})
        return True

    @api.multi
    def action_undeploy(self):
        self.check_access_rights('write')
        self.check_access_rule('write')
        self.write({'state': 'draft'})
        return True

    @api.model
    @api.returns('self', lambda value: value.id or False)
    def get_deployed(self, purpose):
        """The assistant deployed for `purpose` in the user's company (one of no company serves
        every company without its own), or an empty recordset; over XML-RPC its id or False."""
        company = self.env.user.company_id
        found = self.search([('state', '=', 'deployed'), ('purpose', '=', purpose),
                             '|', ('company_id', '=', company.id), ('company_id', '=', False)])
        return found.filtered(lambda a: a.company_id == company)[:1] or found[:1]

    # -- answering --------------------------------------------------------------------------------
    @api.multi
    def retrieve(self, question):
        """The sources for `question` the current user may read (see llm.knowledge.collection.search_chunks)."""
        self.ensure_one()
        collections = self.env['llm.knowledge.collection'].search([('id', 'in', self.collection_ids.ids)])
        return collections.search_chunks(question, top_k=self.top_k, threshold=self.score_threshold)

    @api.multi
    def answer(self, question):
        """Answer `question` from the collections, as the current user: {'text', 'sources':
        [{'number', 'title', 'url', 'res_model', 'res_id', 'score', 'excerpt'}], 'prompt_tokens',
        'completion_tokens'}. Sources the user cannot read are never retrieved.

        XML-RPC: ``execute_kw(db, uid, pw, 'llm.assistant', 'answer', [[assistant_id], 'How do I ...?'])``."""
        self.ensure_one()
        question = (question or '').strip()
        if not question:
            raise UserError(_('Ask a question.'))
        hits = self.retrieve(question)
        context, sources, used = [], [], 0
        for hit in hits:
            if used and used + hit['token_count'] > self.max_context_tokens:
                break
            used += hit['token_count']
            number = len(sources) + 1
            context.append('[%d] %s\n%s' % (number, hit['title'], hit['text']))
            sources.append({'number': number, 'title': hit['title'], 'url': hit['url'], 'res_model': hit['res_model'],
                            'res_id': hit['res_id'], 'score': hit['score'], 'excerpt': hit['text'][:300]})
        if not sources:
            return {'text': NO_SOURCE_ANSWER, 'sources': [], 'prompt_tokens': 0, 'completion_tokens': 0}
        messages = [{'role': 'system', 'content': self.prompt_template.replace('{context}', '\n\n'.join(context))},
                    {'role': 'user', 'content': question}]
        reply = self.model_id.chat(messages, {'max_tokens': self.max_answer_tokens})
        return {'text': (reply.get('text') or '').strip(), 'sources': sources,
                'prompt_tokens': reply.get('prompt_tokens') or 0, 'completion_tokens': reply.get('completion_tokens') or 0}

    @api.model
    def sources_html(self, sources):
        """Numbered links to the sources, for the ask form."""
        items = ['<li><a href="%s">[%d] %s</a> <small>(%.2f)</small><br/><small>%s</small></li>'
                 % (html_escape(s['url']), s['number'], html_escape(s['title']), s['score'], html_escape(s['excerpt']))
                 for s in sources]
        return '<ol style="list-style: none; padding-left: 0">%s</ol>' % ''.join(items) if items else ''
