# -*- coding: utf-8 -*-
import secrets

from odoo import _, api, fields, models
from odoo.exceptions import UserError

from ..lib.serving import ray_serve

SERVE_ON = [('host', 'This host'), ('ray', 'Ray cluster (Ray Serve)')]


class LlmProvider(models.Model):
    """Where a provider's models answer (chat, Generate reply, Compare Models, /v1): this host's
    model server, or a Ray Serve deployment on the provider's Ray cluster, which Odoo creates,
    updates and deletes through the head's Serve REST API (lib/serving/ray_serve/, the Ray adapter's
    serve_* verbs). The choice itself is made in one place, lib/serving/model_server.chat_endpoint."""
    _inherit = 'llm.provider'

    serve_on = fields.Selection(SERVE_ON, string='Serve on', required=True, default='host',
                                help='This host: the model server beside Odoo. Ray cluster: replicas of the same '
                                     'server as a Ray Serve deployment, loading the models from the shared storage '
                                     '(Deploy Serving creates or updates it).')
    serves_on_cluster = fields.Boolean(compute='_compute_capabilities',
                                       help='Can serve its models on its cluster (Ray Serve).')
    serve_url = fields.Char(string='Serve URL', default=ray_serve.DEFAULT_SERVE_URL,
                            help="Where Odoo reaches Ray Serve's HTTP proxy; its port is the proxy's when this "
                                 "deployment starts Serve on the cluster.")
    serve_replicas = fields.Integer(string='Replicas', default=1,
                                    help='Replicas of the model server (the initial count when autoscaling).')
    serve_min_replicas = fields.Integer(string='Autoscale from', default=0,
                                        help='Fewest replicas when autoscaling (0: none while idle).')
    serve_max_replicas = fields.Integer(string='Autoscale to', default=0,
                                        help='Most replicas when autoscaling; 0: no autoscaling, a fixed count.')
    serve_cpus = fields.Float(string='CPUs per replica', default=1.0)
    serve_token = fields.Char(string='Serving Token', compute='_compute_serve_token', inverse='_inverse_serve_token',
                              groups='llm_training.group_llm_manager', copy=False,
                              help='The bearer token the deployment asks of every request (made at the first '
                                   'Deploy Serving when empty); paste one to replace it, then Deploy Serving. '
                                   'Never shown again.')
    serve_token_hint = fields.Char(string='Current Serving Token', compute='_compute_serve_token',
                                   groups='llm_training.group_llm_manager')
    serve_state = fields.Char(string='Serving State', readonly=True, copy=False,
                              help="Ray Serve's status of the deployment at the last Deploy / Refresh / Delete.")
    serve_status = fields.Char(string='Serving', readonly=True, copy=False)
    serve_checked_at = fields.Datetime(string='Serving Checked At', readonly=True, copy=False)

    @api.depends()
    def _compute_serve_token(self):
        manager = self.env.user.has_group('llm_training.group_llm_manager')
        for provider in self:
            provider.serve_token = False
            provider.serve_token_hint = self.env['llm.secret']._hint(provider, 'serve_token') \
                if provider.id and manager else False

    def _inverse_serve_token(self):
        self._store_secret('serve_token')

    @api.constrains('serve_on', 'service', 'serve_replicas', 'serve_min_replicas', 'serve_max_replicas', 'serve_cpus')
    def _check_serving(self):
        for provider in self:
            if provider.serve_on == 'ray' and not provider.serves_on_cluster:
                raise UserError(_('Provider "%s" has no cluster to serve on: only Ray providers serve on Ray Serve.')
                                % provider.name)
            try:
                ray_serve.replicas_settings(provider.serve_replicas, provider.serve_min_replicas,
                                            provider.serve_max_replicas)
            except ray_serve.ServeConfigError as e:
                raise UserError(str(e))
            if provider.serve_cpus < 0:
                raise UserError(_('CPUs per replica must be 0 or more.'))

    def _adapter_config(self):
        config = super(LlmProvider, self)._adapter_config()
        config.update(serve_on=self.serve_on, serve_url=self.serve_url, serve_replicas=self.serve_replicas,
                      serve_min_replicas=self.serve_min_replicas, serve_max_replicas=self.serve_max_replicas,
                      serve_cpus=self.serve_cpus,
                      serve_application=ray_serve.application_name(self.env.cr.dbname, self.id or 0))
        return config

    # -- buttons ---------------------------------------------------------------------------------
    @api.multi
    def action_serve_deploy(self):
        """Create the Serve deployment, or update it to serve the provider's models as they are now
        (a new fine-tune becomes reachable); the same click twice changes nothing on the cluster."""
        self._check_manager_action()
        for provider in self:
            provider._check_can_serve()
            token = provider._get_secret('serve_token')
            if not token:
                token = secrets.token_urlsafe(32)
                self.env['llm.secret']._write_value(provider, 'serve_token', token)
            provider._write_serve_state(provider._call_adapter('serve_deploy', provider._served_model_refs(), token))
        return True

    @api.multi
    def action_serve_refresh(self):
        """Read the deployment's state from the cluster; what goes wrong is shown in its place."""
        self._check_manager_action()
        for provider in self:
            provider._check_can_serve()
            try:
                state = provider._call_adapter('serve_status')
            except UserError as e:
                state = ('UNKNOWN', _('Failed: %s') % e.name)
            provider._write_serve_state(state)
        return True

    @api.multi
    def action_serve_delete(self):
        """Remove the deployment from the cluster (its replicas stop; other applications stay)."""
        self._check_manager_action()
        for provider in self:
            provider._check_can_serve()
            provider._write_serve_state(provider._call_adapter('serve_delete'))
        return True

    @api.multi
    def action_clear_serve_token(self):
        return self._clear_secret('serve_token')

    def _check_can_serve(self):
        if not self.serves_on_cluster:
            raise UserError(_('Provider "%s" has no cluster to serve on.') % self.name)

    def _write_serve_state(self, state):
        status, text = state
        self.write({'serve_state': status, 'serve_status': text, 'serve_checked_at': fields.Datetime.now()})

    def _served_model_refs(self):
        """The folders the deployment serves: the provider's models (archived ones left out) and
        the base models its fine-tunes load. Every model of the provider: Odoo checks who may use
        which before a request reaches the deployment."""
        models = self.env['llm.model'].sudo().search([('provider_id', '=', self.id)])
        refs = set(models.mapped('model_ref'))
        refs.update(models.filtered(lambda m: m.kind == 'fine_tuned').mapped('base_model_id.model_ref'))
        return sorted(ref for ref in refs if ref)
