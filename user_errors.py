# -*- coding: utf-8 -*-
"""The errors a person or a client is shown (Odoo UserError kinds), raised by the models and
mapped by the /v1 API to its statuses. Here, not in a model file, so that the controllers import
no model module (lib/exceptions.py holds what a provider call ends in, without Odoo)."""
from odoo.exceptions import UserError


class InvalidServiceRequest(UserError):
    """The service refused the request itself (lib's InvalidRequestError): a button shows it like
    any UserError; the /v1 API answers it with a 400 instead of a server failure."""


class UnknownModel(InvalidServiceRequest):
    """No provider serves the model asked for (lib's ModelNotFoundError): the /v1 API answers 404
    model_not_found."""


class ServiceBusy(UserError):
    """The service is busy right now (lib's TrainingRetryableError, e.g. the model server's waiting
    line is full): a button shows it like any UserError; the /v1 API answers 429 with Retry-After
    (`seconds`)."""

    def __init__(self, message, seconds=None):
        super(ServiceBusy, self).__init__(message)
        self.seconds = seconds


class BudgetExceeded(UserError):
    """Submit would take the provider over its monthly budget. Carries the figures; the /v1 API
    answers it as OpenAI does an exhausted quota (429 insufficient_quota)."""

    def __init__(self, message, month_cost, estimate, budget):
        super(BudgetExceeded, self).__init__(message)
        self.month_cost, self.estimate, self.budget = month_cost, estimate, budget


class DatasetBusyError(UserError):
    """Another request is validating this dataset right now: try again in a moment."""


class JobRefused(UserError):
    """Submit refused by a rule of the job (one rule for buttons, XML-RPC and /v1).

    `field`: the job's field at fault (`dataset_ids`, `technique`, `company_id`); `kind`:
    'unsupported' (its provider cannot train that), 'format' (its datasets mix formats), 'limit'
    (the company has as many active jobs as it may)."""

    def __init__(self, message, field, kind):
        super(JobRefused, self).__init__(message)
        self.field, self.kind = field, kind
