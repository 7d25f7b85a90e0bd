"""One controller for what the trainer tunes on CPU: precision (bf16/fp32) and thread count.

Chosen from real training steps, never assumed: CPUs differ (with bf16 units a bf16 step runs
about 2-4x fp32, without them 5x to 60x slower) and so does the load beside the trainer (on 2 cores
with one other busy process, 2 spinning OpenMP threads reached 0.31x their quiet speed, 1 thread
about half). So the trainer times forward + backward on the real model, with the job's technique, on
real batches of the job (its own batch shape), once per candidate (precision x threads), the
candidates interleaved round after round (a moment of load weighs on all of them alike), and keeps
each candidate's best time.

One process measures on its training steps themselves (start/measured): each of the first steps
runs in the next candidate's setting and is kept, so measuring costs only the slower candidates'
extra time and the screening; the batches differ, so they compare by seconds per token (their padded
tokens: what the step computes). Several processes must compute alike from the first step, so rank 0
measures on discarded steps of the first batch (tune): their gradients and the random state are put
back as they were, and training is the same as without them.

Cheap either way: every candidate is first screened on a few tokens of the batch (discarded), so a
pathologically slow bf16 (60x on some CPUs) or threads spinning against another process cost a tiny
step, not a full one; after the first full-size round, candidates far behind the fastest are dropped,
and a lone survivor is not timed again: about 4 to 8 full-size steps on 2 cores. Ties (within TIE) go
to the cheaper candidate: fp32 (no bf16 copy, exact arithmetic), then fewer threads (less spinning,
more left to others).

Revised while training: every step's time per token goes into a running window; the median of the
first WINDOW steps after a measurement is the reference, and when the running median drifts more than
DRIFT times from it (another process started or stopped), the candidates are measured again (one
process: on the next steps). Since one thread under load can look exactly like one thread alone, a re-measurement
also happens after every RECHECK times the cost of the last measurement in training time (so
measuring stays a few per cent of the run at most).

The waiting policy of the threads (OMP_WAIT_POLICY) is read by the OpenMP runtime once, at start: it
is chosen at start (the runtime's default, active spinning: PASSIVE cost 20% of the quiet speed on
the benchmark machine) and not revised in-process; fewer threads is what removes the spinning against
another process. Threads and precision change in-process (torch.set_num_threads, the bf16 switch).

Plain module: the step timer is injected (tests give a fake one); nothing here imports torch.
"""
import statistics
import time

PRECISIONS = ('fp32', 'bf16')
ROUNDS = 3             # interleaved rounds; the best of them per candidate
PRUNE = 1.5            # after the first round, a candidate this many times the fastest is dropped
PATHOLOGICAL = 4.0     # screened precision this many times slower than fp32: not measured at full size
TIE = 0.03             # within 3% of the fastest: the cheaper candidate wins
WINDOW = 8             # steps in the running median
DRIFT = 1.8            # running median this many times off the reference: measure again
RECHECK = 50           # measure again after this many times the last measurement's cost in training


def thread_options(cores):
    """Thread counts worth measuring: all the cores, and one less (one core left to whoever else
    runs here: the common case of one other busy process)."""
    cores = max(1, int(cores))
    return [cores] if cores == 1 else [cores, cores - 1]


def cheaper(candidate):
    """Sort key, cheaper first: fp32 before bf16, then fewer threads."""
    precision, threads = candidate
    return (PRECISIONS.index(precision), threads)


def screen(candidates, screen_timer, tries=2):
    """Candidates worth a full-size measurement: those within PATHOLOGICAL of the fastest on a tiny
    step (`screen_timer(candidate) -> seconds`), interleaved, best of `tries`. A bf16 60x slower, or
    threads that spin against another process (17x slower seen on a loaded 2-core machine), cost a
    tiny step each, not full ones. One untimed tiny step first warms the kernels (with the fewest
    threads: the one that cannot collapse); a candidate already PATHOLOGICAL on its first try is not
    tried again. Returns (kept candidates, {candidate: best seconds})."""
    if len(candidates) < 2 or screen_timer is None:
        return list(candidates), {}
    screen_timer(min(candidates, key=cheaper))  # warm-up
    best = {}
    for attempt in range(tries):
        for candidate in (candidates if attempt % 2 == 0 else list(reversed(candidates))):
            if best and best.get(candidate, 0) > PATHOLOGICAL * min(best.values()):
                continue
            seconds = screen_timer(candidate)
            best[candidate] = min(seconds, best.get(candidate, seconds))
    fastest = min(best.values())
    return [c for c in candidates if best[c] <= PATHOLOGICAL * fastest], best


def measure_steps(candidates, rounds=ROUNDS):
    """The interleaved measurement as a generator: it yields the candidate for the next step and is
    sent that step's cost (seconds, or seconds per token when the steps' batches differ); it returns
    {candidate: best cost}. The order alternates between rounds so no candidate always runs first
    (after another's warm-up) or last. After the first round (the kernels were warmed by the
    screening), candidates slower than PRUNE x the fastest are not run again, and once one candidate
    is left it is not timed again."""
    best, remaining = {}, list(candidates)
    for round_ in range(rounds):
        for candidate in (remaining if round_ % 2 == 0 else list(reversed(remaining))):
            cost = yield candidate
            best[candidate] = min(cost, best.get(candidate, cost))
        if round_ == 0:
            fastest = min(best[c] for c in remaining)
            remaining = [c for c in remaining if best[c] <= PRUNE * fastest]
        if len(remaining) < 2:
            break
    return best


def measure(candidates, step_timer, rounds=ROUNDS):
    """{candidate: best seconds} of `step_timer(candidate)` over the rounds of measure_steps."""
    plan = measure_steps(candidates, rounds)
    try:
        candidate = next(plan)
        while True:
            candidate = plan.send(step_timer(candidate))
    except StopIteration as done:
        return done.value


def pick(best):
    """The fastest candidate; within TIE of it, the cheapest."""
    fastest = min(best.values())
    return min((c for c in best if best[c] <= fastest * (1 + TIE)), key=cheaper)


class Controller(object):
    """Chooses, applies and revises (precision, threads).

    `step_timer((precision, threads)) -> seconds`: one measured step in that setting (it sets it);
    `screen_timer((precision, threads)) -> seconds`: a tiny step, to screen candidates (optional);
    `apply((precision, threads))`: puts the chosen setting in force for training;
    `precisions`: those allowed (a forced one alone); `threads`: the thread counts allowed."""

    def __init__(self, step_timer, apply, precisions=PRECISIONS, threads=(1,), screen_timer=None,
                 clock=time.perf_counter, rounds=ROUNDS):
        self.step_timer, self.apply, self.screen_timer, self.clock = step_timer, apply, screen_timer, clock
        self.precisions, self.threads, self.rounds = list(precisions), list(threads), rounds
        self.choice = None
        self.measurements = 0
        self._window = []
        self._reference = None
        self._trained_since = 0.0   # seconds of training steps since the last measurement
        self._cost = 0.0            # seconds the last measurement cost
        self._plan = None           # the measurement under way on training steps (start/measured)

    def tune(self, reason='start'):
        """Measure, choose, apply; returns the record of this choice (for the precision event)."""
        started = self.clock()
        kept, screened = screen([(p, t) for p in self.precisions for t in self.threads], self.screen_timer)
        best = measure(kept, self.step_timer, self.rounds)
        self.choice = pick(best)
        self.apply(self.choice)
        self._cost = self.clock() - started
        self.measurements += 1
        self._window, self._reference, self._trained_since = [], None, 0.0
        return self.record(best, screened, reason)

    def record(self, best, screened, reason):
        precision, threads = self.choice
        # each precision's best step, over the thread counts: the two step times of the event
        step_seconds = {}
        for (p, _t), seconds in best.items():
            step_seconds[p] = min(seconds, step_seconds.get(p, seconds))
        for p in self.precisions:  # screened out at every thread count: no full-size time
            if p not in step_seconds:
                step_seconds[p] = None
        return {'precision': precision, 'threads': threads, 'reason': reason,
                'step_seconds': {p: (round(s, 4) if s is not None else None) for p, s in step_seconds.items()},
                'screened_out': ['%s x %d' % c for c in sorted(screened, key=cheaper) if c not in best],
                'candidates': [{'precision': p, 'threads': t, 'seconds': round(s, 4)}
                               for (p, t), s in sorted(best.items(), key=lambda item: cheaper(item[0]))],
                'measure_seconds': round(self._cost, 3), 'measurement': self.measurements}

    # The measurement on training steps (one process): the steps measured are the training's own
    # (kept, not discarded), so it costs only the screening and the extra time of the slower
    # candidates' steps. Steps' batches differ, so they compare by seconds per token.

    @property
    def measuring(self):
        return self._plan is not None

    def start(self, reason='start'):
        """Screens now (tiny steps), then measures on the coming training steps: each step is run in
        the setting applied here or by measured(), and reported to measured()."""
        self._started = self.clock()
        candidates = [(p, t) for p in self.precisions for t in self.threads]
        kept, self._screened = screen(candidates, self.screen_timer)
        self._screen_seconds = self.clock() - self._started
        self._reason, self._steps, self._warm = reason, [], len(kept) < 2
        self._plan = measure_steps(kept, self.rounds)
        self._candidate = next(self._plan)
        self.apply(self._candidate)

    def measured(self, seconds, tokens):
        """A training step run in the applied candidate took `seconds` for `tokens`; returns the
        record of the choice once the measurement ends, else None. The first step only warms the
        kernels at the training's own shapes (the screening used tiny ones): it is not counted."""
        if not self._warm:
            self._warm = True
            return None
        tokens = max(int(tokens), 1)
        self._steps.append((self._candidate, seconds, tokens))
        try:
            self._candidate = self._plan.send(seconds / tokens)
            self.apply(self._candidate)
            return None
        except StopIteration as done:
            best = done.value
        self._plan = None
        self.choice = pick(best)
        self.apply(self.choice)
        # the cost: the discarded screening, and what the steps took beyond the chosen setting's pace
        extra = sum(s - best[self.choice] * n for _c, s, n in self._steps)
        self._cost = self._screen_seconds + max(extra, 0.0)
        self.measurements += 1
        self._window, self._reference, self._trained_since = [], None, 0.0
        mean_tokens = statistics.mean(n for _c, _s, n in self._steps)
        record = self.record({c: cost * mean_tokens for c, cost in best.items()}, self._screened, self._reason)
        record.update(measured_steps=len(self._steps), step_tokens=int(mean_tokens),
                      elapsed_seconds=round(self.clock() - self._started, 3))
        return record

    def observe(self, seconds, tokens):
        """One training step took `seconds` for `tokens`; returns the reason to measure again, or
        None. The reference is the median of the first WINDOW steps after a measurement."""
        self._trained_since += seconds
        if len(self.precisions) * len(self.threads) < 2:
            return None  # nothing to choose between
        self._window = (self._window + [seconds / max(int(tokens), 1)])[-WINDOW:]
        if len(self._window) < WINDOW:
            return None
        median = statistics.median(self._window)
        if self._reference is None:
            self._reference = median
            return None
        if median > DRIFT * self._reference:
            return 'steps %.1fx slower than when measured' % (median / self._reference)
        if median * DRIFT < self._reference:
            return 'steps %.1fx faster than when measured' % (self._reference / median)
        if self._trained_since > RECHECK * max(self._cost, 1e-3):
            return 'periodic check'
        return None


def describe(record, source):
    """The job event: 'precision: fp32, 1 thread (steps: fp32 0.412 s, bf16 1.630 s; measured on
    training steps at start)'."""
    times = ', '.join('%s %s' % (p, '%.3f s' % s if s is not None else 'screened out (pathologically slow)')
                      for p, s in sorted(record['step_seconds'].items(), key=lambda item: PRECISIONS.index(item[0])))
    return 'precision: %s, %d thread%s (steps: %s; %s)' % (
        record['precision'], record['threads'], '' if record['threads'] == 1 else 's', times, source)
