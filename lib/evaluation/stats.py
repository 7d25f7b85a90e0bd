"""A bootstrap 95% interval of a mean difference, for the deploy guard (no numpy)."""
import random


def mean(values):
    values = [v for v in values if v is not None]
    return float(sum(values)) / len(values) if values else None


def bootstrap_interval(differences, samples=2000, confidence=0.95, seed=0):
    """(low, high) of the mean of `differences` (paired, one per example): the percentile
    bootstrap, `samples` resamples with replacement from a seeded generator, so the same data
    always gives the same interval. None for no data."""
    values = [float(v) for v in differences if v is not None]
    if not values:
        return None
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    tail = (1.0 - confidence) / 2.0
    low = means[int(tail * samples)]
    high = means[min(samples - 1, int((1.0 - tail) * samples))]
    return low, high
