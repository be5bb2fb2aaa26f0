"""Tests of common/nn/schedules.py: every kind against its formula, the plateau logic
observation by observation, state round trips and the spec parser's errors."""

import math

import numpy as np
import pytest

from downpour.common.errors import ConfigError
from downpour.common.nn.schedules import SCHEDULES, Plateau, Schedule, StepDecay, parse_schedule

TS = [0, 1, 2, 7, 99, 100, 101, 999, 1000, 1001, 12345]


@pytest.mark.parametrize("spec, formula", [
    ("constant", lambda t: 0.1),
    ("inverse:k=0.001", lambda t: 0.1 / (1 + 0.001 * t)),
    ("inverse:k=0", lambda t: 0.1),
    ("exp:gamma=0.999", lambda t: 0.1 * 0.999 ** t),
    ("exp:gamma=0.5,every=100", lambda t: 0.1 * 0.5 ** (t / 100)),
    ("step:every=1000,gamma=0.5", lambda t: 0.1 * 0.5 ** (t // 1000)),
    ("step:every=100", lambda t: 0.1 * 0.1 ** (t // 100)),       # torch's default gamma
    ("plateau", lambda t: 0.1),
])
def test_every_kind_follows_its_formula(spec, formula):
    sched = parse_schedule(spec, 0.1)
    for t in TS:
        assert sched(t) == pytest.approx(formula(t), rel=1e-15, abs=0), t
        assert isinstance(sched(t), float)


def test_step_boundaries_are_exact():
    sched = parse_schedule("step:every=1000,gamma=0.5", 0.1)
    assert [sched(t) for t in (0, 999, 1000, 1999, 2000)] == [0.1, 0.1, 0.05, 0.05, 0.025]


def test_every_kind_can_be_parsed():
    examples = {"constant": "constant", "inverse": "inverse:k=0.001", "exp": "exp:gamma=0.999",
                "step": "step:every=1000,gamma=0.5", "plateau": "plateau:factor=0.5,patience=2"}
    assert set(examples) == set(SCHEDULES)
    for kind, spec in examples.items():
        assert parse_schedule(spec, 0.1).kind == kind


@pytest.mark.parametrize("spec", ["constant", "inverse:k=0.01", "exp:gamma=0.99", "step:every=3", "plateau"])
def test_scale_multiplies_every_kind(spec):
    sched = parse_schedule(spec, 0.2)
    base = [sched(t) for t in TS]
    sched.scale = 0.25                            # as the scheduler process sets it
    assert [sched(t) for t in TS] == [b * 0.25 for b in base]


def test_only_plateau_observes():
    for spec in ("constant", "inverse:k=1", "exp:gamma=0.9", "step:every=2"):
        sched = parse_schedule(spec, 0.1)
        assert [sched.observe(m) for m in (5.0, 6.0, 7.0, 8.0)] == [False] * 4
        assert sched.scale == 1.0


def test_plateau_step_by_step():
    sched = parse_schedule("plateau:factor=0.5,patience=2", 1.0)
    # metric, scale changed?, scale after, best after, bad count after
    expected = [
        (10.0, False, 1.0, 10.0, 0),    # first observation always improves on inf
        (9.0, False, 1.0, 9.0, 0),      # improves
        (9.5, False, 1.0, 9.0, 1),      # worse: 1 bad
        (8.0, False, 1.0, 8.0, 0),      # improves: bad count resets
        (8.5, False, 1.0, 8.0, 1),
        (8.0, True, 0.5, 8.0, 0),       # equal is not better: 2nd bad in a row -> cut
        (8.1, False, 0.5, 8.0, 1),
        (9.0, True, 0.25, 8.0, 0),
        (7.0, False, 0.25, 7.0, 0),
    ]
    for metric, changed, scale, best, bad in expected:
        assert sched.observe(metric) is changed, metric
        assert (sched.scale, sched.best, sched.bad) == (scale, best, bad), metric
        assert sched(123) == scale


def test_plateau_relative_threshold():
    sched = Plateau(1.0, factor=0.5, patience=1, threshold=0.01)
    sched.observe(100.0)
    assert sched.observe(99.5) is True            # not 1% better than 100: bad
    assert sched.best == 100.0
    assert sched.observe(98.9) is False           # more than 1% better
    assert sched.best == 98.9 and sched.scale == 0.5


def test_plateau_min_lr_floors_the_scale():
    sched = parse_schedule("plateau:factor=0.1,patience=1,min_lr=0.002", 0.1)
    assert sched.min_scale == pytest.approx(0.02)
    sched.observe(1.0)
    assert sched.observe(2.0) is True and sched.scale == pytest.approx(0.1)
    assert sched.observe(2.0) is True and sched.scale == pytest.approx(0.02)
    assert sched.observe(2.0) is False and sched.scale == pytest.approx(0.02)
    assert sched(0) == pytest.approx(0.002)


def test_plateau_nan_and_inf_never_improve():
    sched = Plateau(1.0, patience=2)
    sched.observe(1.0)
    assert sched.observe(float("nan")) is False and sched.bad == 1
    assert sched.observe(float("inf")) is True and sched.scale == 0.5
    with pytest.raises(ConfigError, match="metric must be a number"):
        sched.observe("0.5")


def test_plateau_state_dict_resumes():
    metrics = [5.0, 4.0, 4.5, 4.4, 4.3, 3.0, 3.5, 3.6, 3.7, 3.8]
    straight = Plateau(0.1, patience=2)
    out_straight = [straight.observe(m) for m in metrics]
    first = Plateau(0.1, patience=2)
    out = [first.observe(m) for m in metrics[:4]]
    saved = first.state_dict()
    assert saved == {"kind": "plateau", "scale": 0.5, "best": 4.0, "bad": 0}
    resumed = Plateau(0.1, patience=2)
    resumed.load_state_dict(saved)
    out += [resumed.observe(m) for m in metrics[4:]]
    assert out == out_straight
    assert resumed.state_dict() == straight.state_dict()


def test_fresh_plateau_state_has_infinite_best_and_loads_back():
    sched = Plateau(0.1)
    d = sched.state_dict()
    assert d["best"] == math.inf and d["bad"] == 0 and d["scale"] == 1.0
    other = Plateau(0.1)
    other.load_state_dict(d)
    assert other.state_dict() == d


def test_load_state_dict_rejects_what_does_not_fit():
    with pytest.raises(ConfigError, match="'exp'"):
        parse_schedule("exp:gamma=0.9", 0.1).load_state_dict(Plateau(0.1).state_dict())
    with pytest.raises(ConfigError, match="scale"):
        Schedule(0.1).load_state_dict({"kind": "constant", "scale": -1.0})
    with pytest.raises(ConfigError, match="bad"):
        Plateau(0.1).load_state_dict({"kind": "plateau", "scale": 1.0, "best": 1.0, "bad": -1})
    with pytest.raises(ConfigError, match="best"):
        Plateau(0.1).load_state_dict({"kind": "plateau", "scale": 1.0, "best": float("nan"), "bad": 0})


def test_defaults_and_python_api():
    sched = parse_schedule("plateau", 0.1)
    assert (sched.factor, sched.patience, sched.threshold, sched.min_lr) == (0.5, 2, 1e-4, 0.0)
    assert parse_schedule("exp:gamma=0.9", 0.1).every == 1
    step = StepDecay(0.1, every=np.int64(10), gamma=0.5)   # integral numpy values are fine
    assert step.every == 10 and isinstance(step.every, int)
    assert parse_schedule(" step : every = 1e3 , gamma = 0.5 ", 0.1).every == 1000


@pytest.mark.parametrize("t", [-1, 1.5, "3", True, None])
def test_bad_t(t):
    with pytest.raises(ValueError, match="t must be an integer >= 0"):
        Schedule(0.1)(t)


@pytest.mark.parametrize("spec, key, example", [
    ("expo", "'expo'", "step:every=1000,gamma=0.5"),                # unknown kind
    ("", "''", "step:every=1000,gamma=0.5"),
    ("exp:gama=0.9", "'gama'", "exp:gamma=0.999"),                   # unknown key
    ("constant:k=1", "'k'", "'constant'"),
    ("exp:gamma=fast", "gamma='fast'", "exp:gamma=0.999"),           # unparsable value
    ("exp:gamma", "'gamma' is not key=value", "exp:gamma=0.999"),
    ("exp:gamma=0.9,", "'' is not key=value", "exp:gamma=0.999"),
    ("exp:gamma=1.5", "gamma must be a finite number in (0, 1]", "exp:gamma=0.999"),  # out of range
    ("exp:gamma=nan", "gamma must be", "exp:gamma=0.999"),
    ("exp:gamma=0.9,every=0", "every must be an integer >= 1", "exp:gamma=0.999"),
    ("step:every=10.5", "every must be an integer >= 1", "step:every=1000,gamma=0.5"),
    ("step:gamma=0.5", "'every'", "step:every=1000,gamma=0.5"),       # required key missing
    ("inverse", "'k'", "inverse:k=0.001"),
    ("inverse:k=-0.1", "k must be a finite number >= 0", "inverse:k=0.001"),
    ("inverse:k=1,k=2", "'k' is given twice", "inverse:k=0.001"),
    ("plateau:factor=1", "factor must be a finite number in (0, 1)", "plateau:factor=0.5,patience=2"),
    ("plateau:patience=0", "patience must be an integer >= 1", "plateau:factor=0.5,patience=2"),
    ("plateau:min_lr=0.5", "min_lr must be <= lr", "plateau:factor=0.5,patience=2"),
])
def test_parse_errors_quote_spec_name_key_and_show_an_example(spec, key, example):
    with pytest.raises(ConfigError) as info:
        parse_schedule(spec, 0.1)
    message = str(info.value)
    assert repr(spec) in message and key in message and example in message, message


def test_parse_rejects_bad_lr_and_non_strings():
    with pytest.raises(ConfigError, match="lr must be a finite number >= 0, got -0.1"):
        parse_schedule("constant", -0.1)
    with pytest.raises(ConfigError, match="must be a string"):
        parse_schedule(None, 0.1)
