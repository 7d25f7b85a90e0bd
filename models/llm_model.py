# -*- coding: utf-8 -*-
from odoo import _, api, fields, models
from odoo.exceptions import UserError

from ..lib.evaluation import report as evaluation_report

MODEL_STATES = [('draft', 'Draft'), ('deployed', 'Deployed'), ('archived', 'Archived')]


class LlmModel(models.Model):
    """The model registry: base models a provider offers and the models fine-tuning produced.
    A model is deployed for a purpose (e.g. "support"): other addons ask `get_deployed(purpose)`
    for the one to use, so a new version goes live by deploying it, without touching them."""
    _name = 'llm.model'
    _description = 'LLM Model'
    _order = 'provider_id, name'

    name = fields.Char(required=True)
    active = fields.Boolean(default=True)
    provider_id = fields.Many2one('llm.provider', required=True, ondelete='restrict', index=True)
    company_id = fields.Many2one(related='provider_id.company_id', store=True, readonly=True)
    kind = fields.Selection([('base', 'Base model'), ('fine_tuned', 'Fine-tuned')], required=True,
                            default='base')
    model_ref = fields.Char(string='Technical ID', required=True,
                            help="The provider's id of the model (e.g. gpt-4o-mini-2024-07-18, "
                                 "ft:...) or, for local models, the folder holding its weights.")
    base_model_id = fields.Many2one('llm.model', string='Base Model', ondelete='set null',
                                    help='For fine-tuned models: the model they were trained from.')
    job_id = fields.Many2one('llm.training.job', string='Produced by', ondelete='set null', readonly=True)
    user_id = fields.Many2one('res.users', string='Owner', readonly=True, copy=False,
                              help='For a fine-tuned model: the owner of the job that produced it.')
    visibility = fields.Selection([('company', 'Company'), ('restricted', 'Restricted')], default='company',
                                  required=True, readonly=True,
                                  help='Restricted when trained on a restricted dataset: only its owner and LLM '
                                       'managers see it (its form, /v1/models, chat).')
    context_length = fields.Integer(default=8192, help='Longest example, in tokens, the model accepts.')
    training_price = fields.Float(digits=(16, 6), help='Training cost per 1M tokens, in USD.')
    description = fields.Text()
    bills_training = fields.Boolean(related='provider_id.bills_training', readonly=True)
    # -- how training ended (fine-tuned models; blank when the provider did not measure it) --------
    train_loss = fields.Float(readonly=True, copy=False, digits=(16, 4), string='Train Loss')
    valid_loss = fields.Float(readonly=True, copy=False, digits=(16, 4), string='Validation Loss')
    perplexity = fields.Float(readonly=True, copy=False, digits=(16, 2), help='exp(validation loss).')
    valid_token_accuracy = fields.Float(readonly=True, copy=False, digits=(16, 4), string='Token Accuracy',
                                        help='Share of validation tokens the model predicts exactly.')
    training_tokens_per_second = fields.Float(readonly=True, copy=False, digits=(16, 1), string='Tokens/s',
                                              help='Training tokens per second the run reached.')
    training_precision = fields.Char(readonly=True, copy=False, string='Precision',
                                     help='The precision the trainer chose on its machine (bf16, fp32).')
    # -- lifecycle (written by the buttons) ------------------------------------------------------
    state = fields.Selection(MODEL_STATES, default='draft', required=True, readonly=True, index=True, copy=False)
    purpose = fields.Char(index=True, help='What the model is for (e.g. "support"); other addons ask for the '
                                           'deployed model of a purpose.')
    version = fields.Integer(default=1, readonly=True, copy=False,
                             help='Fine-tunes of the same base model with the same suffix are numbered 1, 2, ...')
    suffix = fields.Char(readonly=True, copy=False, help='The producing job\'s suffix: with the base model, the '
                                                         'line of versions this model belongs to.')
    test_prompt = fields.Text(help='A message to send to the model from the Test button.')
    test_reply = fields.Text(readonly=True)
    test_base_reply = fields.Text(readonly=True, help='What the base model answers, to compare.')
    evaluation_ids = fields.One2many('llm.training.evaluation', 'model_id', string='Evaluations', readonly=True)
    # what answering costs (USD per 1M tokens; OpenAI's evaluation through the chat API is priced with these)
    chat_input_price = fields.Float(digits=(16, 6), help='Chat: prompt tokens, per 1M, in USD.')
    chat_output_price = fields.Float(digits=(16, 6), help='Chat: answer tokens, per 1M, in USD.')
    fine_tuned_chat_input_price = fields.Float(digits=(16, 6),
                                               help='Chat with a model fine-tuned from this one: prompt tokens, per 1M.')
    fine_tuned_chat_output_price = fields.Float(digits=(16, 6),
                                                help='Chat with a model fine-tuned from this one: answer tokens, per 1M.')
    evaluation_chart = fields.Html(compute='_compute_evaluation_chart', sanitize=False, string='Evaluation Chart',
                                   help='The last finished evaluation of this model, per metric against the model '
                                        'it was compared with.')
    deploy_check = fields.Text(readonly=True, copy=False, help='What the deploy guard found at the last Deploy.')
    deploy_override_reason = fields.Text(readonly=True, copy=False,
                                         help='Why a manager deployed the model although the guard warned.')
    export_ids = fields.One2many('llm.model.export', 'model_id', string='Exports', readonly=True)

    _sql_constraints = [
        ('provider_ref_unique', 'unique(provider_id, model_ref)',
         'A model with this technical id already exists for this provider.'),
    ]

    @api.depends('evaluation_ids.state', 'evaluation_ids.summary')
    def _compute_evaluation_chart(self):
        for model in self:
            done = model.evaluation_ids.filtered(lambda e: e.state == 'done')
            model.evaluation_chart = done.sorted('id', reverse=True)[:1].chart_html or False

    def _check_write_access(self):
        self.check_access_rights('write')
        self.check_access_rule('write')

    @api.multi
    def chat(self, messages, options=None, stream=False):
        """A chat completion of this model by its provider: OpenAI's messages and options
        (lib/providers/base.CHAT_OPTIONS); {'text', 'prompt_tokens', 'completion_tokens', ...} (with
        'choices' when n > 1), or with `stream` a generator of its pieces (Python callers only).
        The one way every caller chats: the /v1 API, assistants, the evaluation's judge. What the
        service refuses is a UserError kind (InvalidServiceRequest, ServiceBusy)."""
        self.ensure_one()
        return self.provider_id._call_adapter('chat_stream' if stream else 'chat', self.model_ref, messages,
                                              options or {})

    @api.multi
    def action_test_model(self):
        """Answer `test_prompt` with this model and, for a fine-tuned one, with its base model."""
        self.ensure_one()
        self._check_write_access()  # the answers are written on the model: check before generating
        if not (self.test_prompt or '').strip():
            raise UserError(_('Write a prompt to test the model with.'))
        values = {'test_reply': self.provider_id._call_adapter('generate', self.model_ref, self.test_prompt)}
        if self.kind == 'fine_tuned' and self.base_model_id:
            values['test_base_reply'] = self.base_model_id.provider_id._call_adapter(
                'generate', self.base_model_id.model_ref, self.test_prompt)
        self.write(values)
        return True

    @api.multi
    def action_deploy(self, guard_override_reason=None):
        """Make each model the company's deployed model for its purpose; the one deployed before for
        that purpose goes back to draft (one deployed model per purpose and company).

        The deploy guard first compares the model with the one deployed for that purpose on the
        model's evaluation examples (queued when that comparison is missing): worse on the main
        metric beyond the 95% bootstrap interval, or not compared yet, and Deploy returns the
        confirmation (llm.model.deploy.wizard) instead of deploying, unless
        `guard_override_reason` says why (kept on the model). With fewer than 20 examples it
        only informs (kept on the model too)."""
        if isinstance(guard_override_reason, dict):
            guard_override_reason = None  # a web client button passes the context first
        self._check_write_access()
        for model in self:
            if not (model.purpose or '').strip():
                raise UserError(_('Model "%s" has no purpose: set one (e.g. "support") before deploying it, so '
                                  'that other addons can ask for it.') % model.name)
            if model.state == 'archived':
                raise UserError(_('Model "%s" is archived; restore it before deploying it.') % model.name)
            previous = self.search([('state', '=', 'deployed'), ('purpose', '=', model.purpose),
                                    ('company_id', '=', model.company_id.id), ('id', '!=', model.id)])
            verdict, text = model._deploy_guard(previous[:1])
            values = {'state': 'deployed', 'deploy_check': text or False}
            if verdict in ('worse', 'pending', 'failed'):
                if not (guard_override_reason or '').strip():
                    return model._deploy_wizard_action(text)
                values['deploy_override_reason'] = _('%s, by %s: %s') % (
                    fields.Datetime.now(), self.env.user.name, guard_override_reason.strip())
            previous.write({'state': 'draft'})
            model.write(values)
        return True

    def _deploy_guard(self, previous):
        """(verdict, text): None when there is nothing to compare with, 'pending' while the
        comparison runs (queued here when missing), 'failed', else lib/evaluation/report.compare's
        'worse' / 'inform' / 'ok' with the figures."""
        self.ensure_one()
        job = self.sudo().job_id
        if not previous or not job:
            return None, None
        if previous.provider_id != self.provider_id or not self.provider_id.evaluates:
            return None, _('Not compared with the deployed model %s: its provider cannot evaluate both.') \
                % previous.display_name
        Evaluation = self.env['llm.training.evaluation'].sudo()
        evaluation = Evaluation.search([('model_id', '=', self.id), ('reference_model_id', '=', previous.id)],
                                       order='id desc', limit=1)
        if not evaluation:
            evaluation = job._queue_evaluation(model=self, reference=previous, kind='deploy_check')
            if not evaluation:
                return None, _('Not compared with the deployed model %s: the job kept no evaluation examples.') \
                    % previous.display_name
        if evaluation.state in ('pending', 'running'):
            return 'pending', _('Comparing with the deployed model %s on %d evaluation examples (%s, %d%%): Deploy '
                                'again when it is done, or deploy anyway with a reason.') % (
                previous.display_name, evaluation.example_count, evaluation.state, evaluation.progress)
        if evaluation.state == 'failed':
            return 'failed', _('The comparison with the deployed model %s failed (%s): Retry it from its Evaluation, '
                               'or deploy anyway with a reason.') % (previous.display_name, evaluation.error_message)
        result = evaluation_report.compare(evaluation._guard_rows(), evaluation.main_metric)
        labels = dict((key, label) for key, label, _percent in evaluation_report.METRICS)
        low, high = result['interval'] or (0.0, 0.0)
        figures = _('%s on %d examples: %s %s, %s %s; difference %+.3f (95%% interval %+.3f to %+.3f)') % (
            labels.get(result['metric'], result['metric']), result['n'], previous.display_name,
            evaluation_report.format_value(result['metric'], evaluation.reference_score), self.display_name,
            evaluation_report.format_value(result['metric'], evaluation.candidate_score),
            result['difference'] or 0.0, low, high)
        if result['verdict'] == 'worse':
            return 'worse', _('Worse than the deployed model beyond chance. %s') % figures
        if result['verdict'] == 'inform':
            return 'inform', _('Fewer than %d examples: for information only. %s') % (
                evaluation_report.MIN_GUARD_EXAMPLES, figures)
        return 'ok', figures

    def _deploy_wizard_action(self, text):
        wizard = self.env['llm.model.deploy.wizard'].create({'model_id': self.id, 'figures': text})
        return {'type': 'ir.actions.act_window', 'name': _('Deploy %s?') % self.display_name,
                'res_model': 'llm.model.deploy.wizard', 'res_id': wizard.id, 'view_mode': 'form',
                'views': [(False, 'form')], 'target': 'new'}

    @api.multi
    def action_archive_model(self):
        """Retire the model: archived, and no longer deployed nor offered in lists."""
        self._check_write_access()
        self.write({'state': 'archived', 'active': False})
        return True

    @api.multi
    def action_restore_model(self):
        self._check_write_access()
        self.write({'state': 'draft', 'active': True})
        return True

    @api.model
    @api.returns('self', lambda value: value.id or False)
    def get_deployed(self, purpose):
        """The model deployed for `purpose` in the user's company (one deployed for no company
        serves every company that has none of its own), or an empty recordset.

        ORM: ``env['llm.model'].get_deployed('support')``; over XML-RPC it returns the model's id,
        or False: ``execute_kw(db, uid, pw, 'llm.model', 'get_deployed', ['support'])``."""
        company = self.env.user.company_id
        models = self.search([('state', '=', 'deployed'), ('purpose', '=', purpose),
                              '|', ('company_id', '=', company.id), ('company_id', '=', False)])
        # the company's own first
        return models.filtered(lambda m: m.company_id == company)[:1] or models[:1]

    def _next_version(self, base_model, suffix, job):
        """The version of a model `job` produces: the one its earlier results of this line have
        (a checkpoint and the final model are one version), else one more than the line's last."""
        line = self.with_context(active_test=False).search([
            ('kind', '=', 'fine_tuned'), ('base_model_id', '=', base_model.id), ('suffix', '=', suffix or False)])
        same_job = line.filtered(lambda m: m.job_id == job)
        if same_job:
            return same_job[0].version
        return max(line.mapped('version') or [0]) + 1
