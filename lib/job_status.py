"""How a job's state follows from what its provider reports (reports: lib/providers/base.py).

`lost`: the provider no longer knows the run (a Ray head restarted without its job history); the
engine resubmits it from its last checkpoint as a new attempt, a bounded number of times.
"""


PROVIDER_STATUSES = ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'lost')
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
