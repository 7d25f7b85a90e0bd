"""The job's state machine: its states, the legal moves, and how a job's state follows from
what its provider reports (reports: lib/providers/base.py). The job's views, the engine (the only
code that moves a job, through the job's `_change_state`) and the API all read it from here.

`lost`: the provider no longer knows the run (a Ray head restarted without its job history); the
engine resubmits it from its last checkpoint as a new attempt, a bounded number of times.
"""

STATES = [
    ('draft', 'Draft'),
    ('validating', 'Validating'),
    ('preparing', 'Preparing'),
    ('queued', 'Queued'),
    ('training', 'Training'),
    ('completed', 'Completed'),
    ('failed', 'Failed'),
    ('cancelled', 'Cancelled'),
]
# Legal moves. failed/cancelled -> queued is a resume from the last checkpoint.
TRANSITIONS = {
    'draft': ('validating', 'cancelled'),
    'validating': ('preparing', 'failed', 'cancelled'),
    'preparing': ('queued', 'failed', 'cancelled'),
    'queued': ('training', 'failed', 'cancelled'),
    'training': ('completed', 'failed', 'cancelled', 'queued'),  # queued: lost at the provider, resubmitted
    'completed': (),
    'failed': ('draft', 'queued'),
    'cancelled': ('draft', 'queued'),
}
# Timestamps stamped when a job enters a state.
STATE_STAMPS = {'validating': 'submitted_at', 'training': 'started_at', 'completed': 'finished_at',
                'failed': 'finished_at', 'cancelled': 'finished_at'}

PROVIDER_STATUSES = ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'lost')
ACTIVE_STATES = ('validating', 'preparing', 'queued', 'training')
FINAL_STATES = ('completed', 'failed', 'cancelled')
RESUMABLE_STATES = ('failed', 'cancelled')  # Resume: a new attempt from the last checkpoint

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


def is_legal(state, new_state):
    """Whether a job in `state` may move to `new_state` (ValueError for an unknown state)."""
    if new_state not in TRANSITIONS:
        raise ValueError('unknown job state %r' % (new_state,))
    return new_state in TRANSITIONS[state]
