"""The tuning controller driven by fake step timers: nothing here depends on this machine's speed."""
from trainer import tuning


class FakeMachine(object):
    """Step times per (precision, threads) that the test changes (load arriving); logs every call."""

    def __init__(self, times, screen=None):
        self.times, self.screen_times, self.calls, self.applied = dict(times), dict(screen or {}), [], []

    def step(self, candidate):
        self.calls.append(candidate)
        return self.times[candidate]

    def screen(self, candidate):
        self.calls.append(('screen', candidate))
        return self.screen_times.get(candidate, self.screen_times.get(candidate[0]))

    def apply(self, candidate):
        self.applied.append(candidate)


QUIET = {('fp32', 2): 1.0, ('fp32', 1): 1.8, ('bf16', 2): 0.5, ('bf16', 1): 0.9}
# one other busy process on one of the 2 cores: 2 spinning threads collapse, 1 thread keeps its core
CONTENDED = {('fp32', 2): 3.2, ('fp32', 1): 1.9, ('bf16', 2): 1.6, ('bf16', 1): 0.95}


def fake_clock(seconds_per_measurement=10):
    ticks = iter(range(0, 10 ** 6, seconds_per_measurement))
    return lambda: next(ticks)


def controller(machine, **kwargs):
    kwargs.setdefault('threads', [2, 1])
    kwargs.setdefault('clock', fake_clock())
    kwargs.setdefault('screen_timer', machine.screen)
    return tuning.Controller(machine.step, machine.apply, **kwargs)


def test_a_choice_is_revisited_when_the_step_time_drifts():
    machine = FakeMachine(QUIET, screen={'fp32': 0.01, 'bf16': 0.005})
    control = controller(machine)
    first = control.tune()
    assert (first['precision'], first['threads']) == ('bf16', 2) and machine.applied == [('bf16', 2)]
    tokens = 1000
    # quiet training: the reference is set, nothing to revise
    for _ in range(2 * tuning.WINDOW):
        assert control.observe(QUIET[control.choice], tokens) is None
    # another process starts: the running median drifts past DRIFT, the controller asks to measure
    machine.times = CONTENDED
    reasons = [control.observe(CONTENDED[control.choice], tokens) for _ in range(tuning.WINDOW)]
    reason = [r for r in reasons if r]
    assert reason and 'slower' in reason[0]
    assert reasons.index(reason[0]) >= tuning.WINDOW // 2 - 1, 'a slow step or two is not a drift: it takes the median'
    second = control.tune(reason[0])
    assert (second['precision'], second['threads']) == ('bf16', 1)
    assert machine.applied[-1] == ('bf16', 1) and second['measurement'] == 2
    assert second['reason'].startswith('steps ') and second['step_seconds'] == {'fp32': 1.9, 'bf16': 0.95}
    # the new reference is the contended one: contended steps no longer look like a drift
    for _ in range(2 * tuning.WINDOW):
        assert control.observe(CONTENDED[control.choice], tokens) is None


def test_faster_steps_are_a_drift_too():
    machine = FakeMachine(CONTENDED)
    control = controller(machine, screen_timer=None)
    control.tune()
    for _ in range(tuning.WINDOW):
        control.observe(3.0, 1000)
    reasons = [control.observe(1.0, 1000) for _ in range(tuning.WINDOW)]
    assert any(r and 'faster' in r for r in reasons)


def test_a_periodic_check_when_nothing_drifts():
    """One thread under load and one thread alone look the same: only a new measurement can tell."""
    machine = FakeMachine(QUIET)
    control = controller(machine, screen_timer=None, clock=fake_clock(2))  # a measurement: 2 s
    control.tune()
    steps = 0
    while control.observe(1.0, 1000) is None:
        steps += 1
        assert steps < 10000
    assert steps + 1 >= tuning.RECHECK * 2, 'measuring stays a small share of training time'


def test_candidates_are_interleaved_and_best_of_rounds():
    times = {('fp32', 2): [1.4, 1.0, 1.1], ('fp32', 1): [1.3, 1.6, 1.3]}  # fp32 x 2 first pays the warm-up
    calls = []

    def step(candidate):
        calls.append(candidate)
        return times[candidate][sum(1 for c in calls if c == candidate) - 1]
    best = tuning.measure([('fp32', 2), ('fp32', 1)], step, rounds=3)
    assert best == {('fp32', 2): 1.0, ('fp32', 1): 1.3}
    # round after round, alternating order: never two measurements of one candidate in a row
    assert calls == [('fp32', 2), ('fp32', 1), ('fp32', 1), ('fp32', 2), ('fp32', 2), ('fp32', 1)]
    assert tuning.pick(best) == ('fp32', 2)


def test_far_slower_candidates_are_dropped_after_the_first_round():
    machine = FakeMachine({('fp32', 2): 1.0, ('fp32', 1): 1.2, ('bf16', 2): 3.0})
    best = tuning.measure([('fp32', 2), ('fp32', 1), ('bf16', 2)], machine.step, rounds=3)
    assert machine.calls.count(('bf16', 2)) == 1 and machine.calls.count(('fp32', 2)) == 3
    assert tuning.pick(best) == ('fp32', 2)


def test_a_lone_survivor_is_not_timed_again():
    machine = FakeMachine({('fp32', 2): 1.0, ('bf16', 2): 3.0})
    best = tuning.measure([('fp32', 2), ('bf16', 2)], machine.step, rounds=3)
    assert machine.calls == [('fp32', 2), ('bf16', 2)]
    assert tuning.pick(best) == ('fp32', 2)


def test_pathological_bf16_is_screened_out_on_a_tiny_step():
    machine = FakeMachine({('fp32', 2): 1.0, ('fp32', 1): 1.6, ('bf16', 2): 60.0, ('bf16', 1): 60.0},
                          screen={'fp32': 0.01, 'bf16': 0.6})
    record = controller(machine).tune()
    assert record['precision'] == 'fp32'
    assert not any(c[0] == 'bf16' for c in machine.calls), 'no full-size bf16 step'
    assert record['step_seconds'] == {'fp32': 1.0, 'bf16': None}
    assert record['screened_out'] == ['bf16 x 1', 'bf16 x 2']
    assert 'bf16 screened out' in tuning.describe(record, 'measured')


def test_threads_spinning_against_another_process_are_screened_out():
    machine = FakeMachine({('fp32', 2): 77.0, ('fp32', 1): 4.5},
                          screen={('fp32', 2): 2.0, ('fp32', 1): 0.1})
    record = controller(machine, precisions=['fp32']).tune()
    assert (record['precision'], record['threads']) == ('fp32', 1)
    assert ('fp32', 2) not in machine.calls, 'never a full step with the collapsing thread count'
    assert machine.calls.count(('screen', ('fp32', 2))) == 1, 'nor a second tiny one'


def test_a_tie_goes_to_fp32_then_to_fewer_threads():
    assert tuning.pick({('fp32', 2): 1.0, ('bf16', 2): 0.99}) == ('fp32', 2)
    assert tuning.pick({('fp32', 2): 1.0, ('fp32', 1): 1.02}) == ('fp32', 1)
    assert tuning.pick({('fp32', 2): 1.0, ('bf16', 2): 0.8, ('bf16', 1): 0.81}) == ('bf16', 1)
    assert tuning.pick({('fp32', 2): 1.0, ('bf16', 2): 0.9}) == ('bf16', 2), 'a real gain wins'


def test_a_forced_precision_still_tunes_threads_and_never_measures_the_other():
    machine = FakeMachine(CONTENDED, screen={'fp32': 1, 'bf16': 1})
    record = controller(machine, precisions=['fp32']).tune()
    assert (record['precision'], record['threads']) == ('fp32', 1)
    assert all((c[1] if c[0] == 'screen' else c)[0] == 'fp32' for c in machine.calls)


def test_one_candidate_is_never_revised():
    machine = FakeMachine({('fp32', 1): 1.0})
    control = controller(machine, precisions=['fp32'], threads=[1])
    control.tune()
    assert all(control.observe(s, 100) is None for s in [1.0] * 10 + [9.0] * 10 + [1.0] * 10000)


def test_thread_options():
    assert tuning.thread_options(1) == [1]
    assert tuning.thread_options(2) == [2, 1]
    assert tuning.thread_options(16) == [16, 15]


def test_event_names_the_choice_and_both_step_times():
    record = {'precision': 'fp32', 'threads': 1, 'step_seconds': {'bf16': 1.63, 'fp32': 0.412}}
    assert tuning.describe(record, 'measured at start') == \
        'precision: fp32, 1 thread (steps: fp32 0.412 s, bf16 1.630 s; measured at start)'


def test_measured_steps_are_discarded():
    """The trainer's measured steps leave gradients and random states as they found them."""
    import numpy
    import torch

    from trainer.fast_dropout import FastDropout
    from trainer.train import DiscardedSteps
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), FastDropout(0.5, numpy.random.default_rng(0)))
    model.eval()
    model[0].weight.grad = torch.ones(4, 4)
    model[0].bias.requires_grad_(False)
    torch.manual_seed(3)
    expected_torch = torch.rand(1)
    expected_numpy = numpy.random.default_rng(0).bytes(8)
    torch.manual_seed(3)
    with DiscardedSteps(model):
        assert model.training, 'measured in training mode: dropout is part of the step'
        model(torch.randn(2, 4)).sum().backward()
        assert not torch.equal(model[0].weight.grad, torch.ones(4, 4))
    assert torch.equal(model[0].weight.grad, torch.ones(4, 4)) and not model.training
    assert torch.equal(torch.rand(1), expected_torch)
    assert model[1].rng.bytes(8) == expected_numpy


def run_online(control, machine, steps, tokens=lambda i: 100 + 10 * (i % 3)):
    """Drives a measurement on training steps as the trainer does: each step runs in the setting
    last applied; its batch size varies. Returns (record, steps taken)."""
    for i in range(steps):
        n = tokens(i)
        record = control.measured(machine.times[machine.applied[-1]] * n / 100.0, n)
        if record:
            return record, i + 1
    raise AssertionError('the measurement did not end in %d steps' % steps)


def test_measuring_on_training_steps_picks_the_fastest_per_token():
    """One process: the candidates are measured on the training's own steps (kept), whose batches
    differ in size, so they compare by seconds per token; the first step only warms up."""
    machine = FakeMachine(QUIET, screen={'fp32': 1, 'bf16': 1})
    control = controller(machine)
    control.start()
    assert control.measuring and machine.applied, 'the first candidate is in force before the first step'
    record, steps = run_online(control, machine, 50)
    assert (record['precision'], record['threads']) == ('bf16', 2) and control.choice == ('bf16', 2)
    assert machine.applied[-1] == ('bf16', 2) and not control.measuring
    assert record['measured_steps'] == steps - 1, 'the warm-up step is not counted'
    assert 4 <= record['measured_steps'] <= 4 + 2 * (tuning.ROUNDS - 1)
    assert not [c for c in machine.calls if c[0] != 'screen'], 'no discarded full-size step'
    # its cost is the extra time of the slower candidates' steps (plus the screening), not the steps
    assert record['measure_seconds'] < sum(QUIET.values()) * 1.3 + 10


def test_measuring_on_training_steps_under_load_then_revisited():
    machine = FakeMachine(CONTENDED, screen={'fp32': 1, 'bf16': 1})
    control = controller(machine)
    control.start()
    record, _ = run_online(control, machine, 50)
    assert (record['precision'], record['threads']) == ('bf16', 1)
    machine.times = dict(QUIET)  # the other process ends: steps get faster
    for _ in range(tuning.WINDOW):
        assert control.observe(QUIET[control.choice], 100) is None
    reasons = [control.observe(QUIET[control.choice] / 2.0, 100) for _ in range(tuning.WINDOW)]
    reason = [r for r in reasons if r]
    assert reason and 'faster' in reason[0], reasons
    control.start(reason[0])
    record, _ = run_online(control, machine, 50)
    assert (record['precision'], record['threads']) == ('bf16', 2) and record['reason'] == reason[0]
    assert control.measurements == 2
