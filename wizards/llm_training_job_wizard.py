# -*- coding: utf-8 -*-
"""New Fine-tuning Job in three steps: data, settings, review (estimate and warnings), then a
job created and submitted with the user's own rights. Other addons drive it over XML-RPC too:
create it with values, `action_next` / `action_back`, `action_submit`."""
from odoo import _, api, fields, models
from odoo.exceptions import UserError, ValidationError

from ..lib.jobs import job_estimate
from ..lib.jobs.hyperparameters import DEFAULTS

STEPS = [('data', 'Data'), ('settings', 'Settings'), ('review', 'Review')]
# The job fields the wizard fills, by the job's own names.
JOB_FIELDS = ('name', 'dataset_ids', 'validation_dataset_ids', 'validation_split', 'provider_id', 'base_model_id',
              'technique', 'epochs', 'batch_size', 'learning_rate', 'learning_rate_multiplier', 'lora_r', 'lora_alpha',
              'lora_dropout', 'max_seq_length', 'seed', 'suffix', 'hyperparameters')


def _technique_selection(wizard):
    return wizard.env['llm.training.job']._fields['technique'].selection


class LlmTrainingJobWizard(models.TransientModel):
    _name = 'llm.training.job.wizard'
    _description = 'New Fine-tuning Job'
    _inherit = ['llm.access.mixin']
    # the estimate reads these: a foreign dataset's statistics are refused here, not only at Submit
    _link_fields = ('provider_id', 'base_model_id', 'dataset_ids', 'validation_dataset_ids')

    def _default_provider(self):
        return self.env['llm.provider'].search([], limit=1)

    step = fields.Selection(STEPS, default='data', required=True, readonly=True)
    # -- step 1: data -----------------------------------------------------------------------------
    name = fields.Char(string='Job name')
    dataset_ids = fields.Many2many('llm.training.dataset', 'llm_training_job_wizard_dataset_rel', 'wizard_id',
                                   'dataset_id', string='Training Datasets')
    validation_dataset_ids = fields.Many2many('llm.training.dataset', 'llm_training_job_wizard_valdataset_rel',
                                              'wizard_id', 'dataset_id', string='Validation Datasets')
    validation_split = fields.Float(default=0.0, help='Fraction of the training examples held out for evaluation '
                                                      '(0 to 0.5); or name validation datasets, not both.')
    # -- step 2: settings -------------------------------------------------------------------------
    provider_id = fields.Many2one('llm.provider', default=_default_provider)
    base_model_id = fields.Many2one('llm.model', string='Base Model',
                                    domain="[('provider_id', '=', provider_id), ('kind', '=', 'base')]")
    technique = fields.Selection(_technique_selection, default='lora', required=True)
    preset = fields.Selection(job_estimate.PRESET_SELECTION, default='balanced',
                              help='Fills epochs, learning rate and LoRA rank/alpha; change them after if you wish.')
    epochs = fields.Integer(default=DEFAULTS['epochs'], help='0 lets the provider choose (OpenAI "auto").')
    batch_size = fields.Integer(default=DEFAULTS['batch_size'], help='0 lets the provider choose (OpenAI "auto").')
    learning_rate = fields.Float(default=DEFAULTS['learning_rate'], digits=(16, 8))
    learning_rate_multiplier = fields.Float(default=0.0, help='0 means "auto" (OpenAI).')
    lora_r = fields.Integer(string='LoRA rank', default=DEFAULTS['lora_r'])
    lora_alpha = fields.Integer(string='LoRA alpha', default=DEFAULTS['lora_alpha'])
    lora_dropout = fields.Float(string='LoRA dropout', default=DEFAULTS['lora_dropout'])
    max_seq_length = fields.Integer(string='Max sequence length', default=DEFAULTS['max_seq_length'])
    seed = fields.Integer(default=DEFAULTS['seed'])
    suffix = fields.Char(size=64, help='Added to the fine-tuned model name; with the base model it names the '
                                       'line of versions the result belongs to.')
    hyperparameters = fields.Text(default='{}', help='Other settings as a JSON object, e.g. {"warmup_ratio": 0.1}.')
    # -- step 3: review ---------------------------------------------------------------------------
    estimate = fields.Text(compute='_compute_review', readonly=True)
    warnings = fields.Text(compute='_compute_review', readonly=True)
    job_id = fields.Many2one('llm.training.job', string='Job', readonly=True)

    @api.depends(*JOB_FIELDS)
    def _compute_review(self):
        for wizard in self:
            if not (wizard.dataset_ids and wizard.provider_id and wizard.base_model_id):
                wizard.estimate = _('Choose datasets, a provider and a base model to see the estimate.')
                wizard.warnings = False
                continue
            try:
                Job = self.env['llm.training.job']
                # new() applies no defaults: the job's own (evaluation settings) come first
                job = Job.new(dict(Job.default_get(['evaluate_after_training', 'evaluation_holdout']),
                                   **Job._split_hyperparameters(wizard._job_values())))
            except ValidationError as e:
                wizard.estimate, wizard.warnings = False, e.name
                continue
            datasets = wizard.dataset_ids
            # a validated dataset, valid or not, has its figures; a draft one has none yet
            validated = datasets.filtered(lambda d: d.state != 'draft')
            examples, tokens = job_estimate.training_share(
                sum(validated.mapped('example_count')), sum(validated.mapped('token_total')), wizard.validation_split)
            speed = self.env['llm.provider.throughput']._lookup(wizard.provider_id, wizard.base_model_id,
                                                                 wizard.technique)
            wizard.estimate = job_estimate.estimate_text(
                examples, tokens, job.estimated_epochs, price=wizard.base_model_id.training_price,
                tokens_per_second=speed.tokens_per_second or None, complete=validated == datasets)
            if wizard.provider_id.evaluates:  # what the model will be evaluated on, before Submit
                wizard.estimate += '\n' + _('Evaluation after training: %s') % job.evaluation_plan
                chat_cost = job._evaluation_chat_cost()
                if chat_cost:
                    wizard.estimate += '\n' + _('Evaluation through the chat API: %d examples, both models, at most '
                                                '$%.4f (the judge, if any, is billed by its own provider)') % chat_cost
            wizard.warnings = job_estimate.warnings_text(
                examples if validated == datasets else None,
                [{'name': d.name, 'state': d.state, 'token_max': d.token_max}
                 for d in datasets | wizard.validation_dataset_ids],
                context_length=wizard.base_model_id.context_length, cost=job.estimated_cost,
                month_cost=wizard.provider_id.month_cost, monthly_budget=wizard.provider_id.monthly_budget) or False

    @api.onchange('preset')
    def _onchange_preset(self):
        for name, value in job_estimate.preset_values(self.preset).items():
            self[name] = value

    @api.onchange('provider_id')
    def _onchange_provider_id(self):
        if self.base_model_id.provider_id != self.provider_id:
            self.base_model_id = self.env['llm.model'].search(
                [('provider_id', '=', self.provider_id.id), ('kind', '=', 'base')], limit=1)

    @api.model
    def create(self, vals):
        # over XML-RPC no onchange runs: a preset fills what the caller did not give
        if vals.get('preset'):
            vals = dict(job_estimate.preset_values(vals['preset'], vals), **vals)
        self._check_links(vals)
        return super(LlmTrainingJobWizard, self).create(vals)

    @api.multi
    def write(self, vals):
        if vals.get('preset'):
            vals = dict(job_estimate.preset_values(vals['preset'], vals), **vals)
        self._check_links(vals)
        return super(LlmTrainingJobWizard, self).write(vals)

    # -- buttons ----------------------------------------------------------------------------------
    def _check_access(self):
        """Check, then act: the wizard only makes sense for who may create jobs (and acts on the
        user's own wizard only)."""
        self.env['llm.training.job'].check_access_rights('create')
        self.check_access_rule('write')

    @api.multi
    def action_next(self):
        self.ensure_one()
        self._check_access()
        self._check_step(self.step)
        steps = [key for key, _label in STEPS]
        self.step = steps[min(steps.index(self.step) + 1, len(steps) - 1)]
        return self._reopen()

    @api.multi
    def action_back(self):
        self.ensure_one()
        self._check_access()
        steps = [key for key, _label in STEPS]
        self.step = steps[max(steps.index(self.step) - 1, 0)]
        return self._reopen()

    @api.multi
    def action_submit(self):
        """Create the job with the user's rights, submit it through the job form's own Submit,
        and open it; over the provider's monthly budget, the job is kept as a draft and the form's
        confirmation asks for the reason to go over."""
        self.ensure_one()
        self._check_access()
        if self.job_id:
            raise UserError(_('This wizard already submitted job "%s"; open it from Training > Jobs.')
                            % self.job_id.name)
        self._check_step('data')
        self._check_step('settings')
        job = self.env['llm.training.job'].create(self._job_values())
        submitted = job.action_submit_from_form()
        self.write({'job_id': job.id, 'step': 'review'})
        if isinstance(submitted, dict):  # the budget's confirmation
            return submitted
        return {'type': 'ir.actions.act_window', 'name': job.name, 'res_model': 'llm.training.job',
                'res_id': job.id, 'view_mode': 'form', 'views': [(False, 'form')], 'target': 'current'}

    # -- helpers ----------------------------------------------------------------------------------
    def _check_step(self, step):
        """What a step needs before the next one, said plainly."""
        if step == 'data':
            if not (self.name or '').strip():
                raise UserError(_('Name the job (step Data).'))
            if not self.dataset_ids:
                raise UserError(_('Choose at least one training dataset (step Data).'))
            if self.validation_dataset_ids and self.validation_split:
                raise UserError(_('Use either validation datasets or a validation split, not both (step Data).'))
        elif step == 'settings':
            if not self.provider_id or not self.base_model_id:
                raise UserError(_('Choose a provider and one of its base models (step Settings).'))
            if self.base_model_id.provider_id != self.provider_id:
                raise UserError(_('Base model "%s" belongs to provider "%s"; choose one of "%s".')
                                % (self.base_model_id.name, self.base_model_id.provider_id.name,
                                   self.provider_id.name))
            Job = self.env['llm.training.job']
            try:
                Job.new(Job._split_hyperparameters(self._job_values()))._get_hyperparameters()
            except ValidationError as e:
                raise UserError(_('Settings: %s') % e.name)
            except ValueError as e:
                raise UserError(_('Settings: %s') % e)

    def _job_values(self):
        values = {}
        for name in JOB_FIELDS:
            field = self._fields[name]
            if field.type == 'many2many':
                values[name] = [(6, 0, self[name].ids)]
            elif field.type == 'many2one':
                values[name] = self[name].id
            else:
                values[name] = self[name]
        return values

    def _reopen(self):
        return {'type': 'ir.actions.act_window', 'name': _('New Fine-tuning Job'), 'res_model': self._name,
                'res_id': self.id, 'view_mode': 'form', 'views': [(False, 'form')], 'target': 'new'}
