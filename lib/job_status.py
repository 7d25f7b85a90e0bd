"""What a provider reports about a job, and how our state follows from it.

Every provider's `check_training_job_status` returns a dict with these keys (all optional but
`status`):
    status          one of PROVIDER_STATUSES
    progress        0-100
    step, total_steps, epoch, eta (unix seconds), trained_tokens
    error           text, when status is failed
    events          [{'id', 'created_at' (unix), 'level', 'message', 'data'}]  (ids make them idempotent)
    metrics         [{'step', 'epoch', 'train_loss', 'valid_loss', 'valid_token_accuracy',
                      'learning_rate', 'tokens_per_second'}]
    result          {'name', 'model_ref', ...} when succeeded: the model to register
    log             the tail of the provider's log
"""

PROVIDER_STATUSES = ('queued', 'running', 'succeeded', 'failed', 'cancelled')
ACTIVE_STATES = ('validating', 'preparing', 'queued', 'training')
FINAL_STATES = ('completed', 'failed', 'cancelled')

# (our state, their status) -> the states to go through, in order. Anything not listed: no change.
_PLAN = {
    ('queued', 'running'): ('training',),
    ('queued', 'succeeded'): ('training', 'completed'),
    ('queued', 'failed'): ('failed',),
    ('queued', 'cancelled'): ('cancelled',),
    ('training', 'succeeded'): ('completed',),
    ('training', 'failed'): ('failed',),
    ('training', 'cancelled'): ('cancelled',),
}


def plan_transitions(state, status):
    """The transitions that bring a job in `state` in line with a provider reporting `status`.

    Idempotent by construction: once applied, the same report plans nothing more."""
    if status not in PROVIDER_STATUSES:
        raise ValueError('unknown provider status %r' % (status,))
    return _PLAN.get((state, status), ())
