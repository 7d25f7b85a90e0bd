"""A provider's monthly budget as a guard (plain functions, tested alone in tests/test_budget.py).

A job counts in the calendar month (UTC, as OpenAI bills) it was submitted in: what it cost once
it ended (completed, failed or cancelled: its trained tokens x the price, so a run stopped halfway
costs what it trained), its estimate while it is active. Submit is refused when the month's cost
so far plus this job's estimate would go over the budget."""
from .job_status import FINAL_STATES


def month_bounds(moment):
    """(first instant of `moment`'s month, first instant of the next), naive datetimes."""
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if start.month == 12:
        return start, start.replace(year=start.year + 1, month=1)
    return start, start.replace(month=start.month + 1)


def job_cost(state, final_cost, estimated_cost):
    """What a submitted job counts against its month."""
    return (final_cost or 0.0) if state in FINAL_STATES else (estimated_cost or 0.0)


def over_budget(month_cost, estimate, budget):
    """True when a job estimated at `estimate` would take the month over `budget` (0: no budget)."""
    return bool(budget) and round(month_cost + estimate, 6) > round(budget, 6)


def refusal_text(provider, month_cost, estimate, budget):
    return ('Provider "%s" would go over its monthly budget: this month\'s jobs cost %.2f USD so far, this job '
            'is estimated at %.2f USD, the budget is %.2f USD.' % (provider, month_cost, estimate, budget))
