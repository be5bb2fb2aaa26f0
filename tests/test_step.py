"""Tests for common/step.py: the gradient step every trainer takes, and batch_gradient."""

import numpy as np
import pytest

from downpour.common import step as step_module
from downpour.common.config import Config
from downpour.common.data import Dataset
from downpour.common.errors import DownpourError
from downpour.common.nn.model import Model, ModelSpec
from downpour.common.step import GradientStep, batch_gradient

SPEC = ModelSpec(n_inputs=6, n_outputs=3, hidden=(5,))


def dataset(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return Dataset(rng.standard_normal((n, 6), dtype=np.float32), rng.integers(0, 3, n), 3, "t")


@pytest.mark.parametrize("micro", [1, 2])
def test_a_step_is_batch_gradient_of_the_rows_it_names(micro):
    cfg, data = Config(batch_size=8, micro_batches=micro, clip_norm=0.1), dataset()
    model, ref = Model(SPEC, seed=0), Model(SPEC, seed=0)
    gradient = GradientStep(cfg, model, data, "single process")
    acc = np.empty_like(ref.grads)
    for idx in (np.arange(8), np.array([39, 0, 5, 5, 17, 3, 22, 8])):
        loss = gradient.step(idx)
        assert loss == batch_gradient(ref, data.x[idx], data.y[idx], cfg, acc)
        assert np.array_equal(model.grads, ref.grads)
    assert gradient.taken == 2


def test_a_loss_that_is_not_finite_names_who_and_the_step():
    data = dataset()
    data.x[20:] = np.nan
    gradient = GradientStep(Config(batch_size=8), Model(SPEC, seed=0), data, "worker-3", rank=3)
    gradient.step(np.arange(8))
    gradient.step(np.arange(8, 16))
    with pytest.raises(DownpourError, match=r"^worker-3: the training loss became nan at step 2; "
                                            r"lower --lr or add --clip-norm$"):
        gradient.step(np.arange(16, 24))


def fake_clocks(monkeypatch, wall, cpu):
    """Replace the step's clocks: perf_counter and thread_time return the readings of
    `wall` and `cpu` in turn; sleeps are recorded, not taken."""
    walls, cpus, slept = iter(wall), iter(cpu), []
    monkeypatch.setattr(step_module.time, "perf_counter", lambda: next(walls))
    monkeypatch.setattr(step_module.time, "thread_time", lambda: next(cpus))
    monkeypatch.setattr(step_module.time, "sleep", slept.append)
    return slept


@pytest.mark.parametrize("rank, scale", [(0, 4.0), (1, 12.0)])
def test_padding_makes_a_step_take_scale_times_its_cpu_time(monkeypatch, rank, scale):
    """--compute-scale 4, and --slow-worker 1:3 on top for rank 1: 0.1 CPU s of compute
    that took 0.2 s of wall time is padded to 0.4 s (rank 0) or 1.2 s (rank 1)."""
    emulated = scale * 0.1
    slept = fake_clocks(monkeypatch, [10.0, 10.2, 10.0 + emulated], [3.0, 3.1])
    cfg = Config(mode="async", workers=2, batch_size=8, compute_scale=4, slow_worker="1:3")
    gradient = GradientStep(cfg, Model(SPEC, seed=0), dataset(), f"worker-{rank}", rank)
    gradient.step(np.arange(8))
    assert slept == [pytest.approx(emulated - 0.2)]
    times = gradient.times
    assert (times.compute_s, times.cpu_s, times.over) == (pytest.approx(0.2), pytest.approx(0.1), 0)
    assert times.padding_s == pytest.approx(emulated - 0.2)


def test_a_step_whose_compute_outruns_its_emulated_time_is_counted_over(monkeypatch):
    """Compute of 0.1 CPU s that took 0.5 s of wall time (an oversubscribed host) cannot
    be padded to 0.4 s: no sleep, and the step counts as over."""
    slept = fake_clocks(monkeypatch, [0.0, 0.5, 0.5], [0.0, 0.1])
    gradient = GradientStep(Config(mode="async", batch_size=8, compute_scale=4),
                            Model(SPEC, seed=0), dataset(), "worker-0")
    gradient.step(np.arange(8))
    assert slept == [] and gradient.times.over == 1 and gradient.times.padding_s == 0


def test_a_late_wake_is_made_up_by_the_next_steps_sleep(monkeypatch):
    """Steps of 0.1 CPU s at scale 4 (0.4 s each). The first sleep ends 0.05 s late: the
    second sleeps 0.05 s less, and neither counts as over. The third step's compute takes
    0.45 s of wall time: it cannot be padded and falls behind by more than 5% (over)."""
    slept = fake_clocks(monkeypatch, [0.0, 0.1, 0.45, 0.45, 0.55, 0.8, 0.8, 1.25, 1.25],
                        [0.0, 0.1, 1.0, 1.1, 2.0, 2.1])
    gradient = GradientStep(Config(mode="async", batch_size=8, compute_scale=4),
                            Model(SPEC, seed=0), dataset(), "worker-0")
    for _ in range(3):
        gradient.step(np.arange(8))
    assert slept == [pytest.approx(0.3), pytest.approx(0.25)]
    assert gradient.times.over == 1


def test_no_padding_without_a_compute_scale_or_a_straggler(monkeypatch):
    slept = fake_clocks(monkeypatch, [0.0, 0.5], [0.0, 0.1])
    gradient = GradientStep(Config(mode="async", workers=2, batch_size=8, slow_worker="1:3"),
                            Model(SPEC, seed=0), dataset(), "worker-0", 0)
    gradient.step(np.arange(8))
    assert slept == [] and gradient.times.over == 0 and gradient.times.compute_s == 0.5


@pytest.mark.parametrize("steps, over, padded, bound", [
    (100, 5, True, False), (100, 6, True, True), (100, 0, False, None), (0, 0, True, False)])
def test_host_bound_past_five_percent_of_padded_steps(steps, over, padded, bound):
    assert step_module.host_bound(steps, over, padded) is bound


@pytest.mark.parametrize("clip", [{}, {"clip_norm": 0.05}, {"clip_value": 1e-3}])
def test_micro_batches_average_clipped_chunk_gradients_as_a_sync_server(clip):
    """k micro-batches: each chunk's gradient clipped, summed in order, times dtype(1/k);
    k = 1 is the plain gradient."""
    model = Model(ModelSpec(n_inputs=6, n_outputs=3, hidden=(5,)), seed=0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((12, 6), dtype=np.float32), rng.integers(0, 3, 12)
    loss1 = batch_gradient(model, x, y, Config(batch_size=12, **clip))
    plain = model.grads.copy()
    parts, losses = [], []
    for i in range(3):
        ref = Model(model.spec, seed=0)
        losses.append(batch_gradient(ref, x[4 * i:4 * i + 4], y[4 * i:4 * i + 4],
                                     Config(batch_size=4, **clip)))
        parts.append(ref.grads.copy())
    acc = np.empty_like(model.grads)
    loss3 = batch_gradient(model, x, y, Config(batch_size=12, micro_batches=3, **clip), acc)
    assert np.array_equal(model.grads, (parts[0] + parts[1] + parts[2]) * np.float32(1 / 3))
    assert loss3 == pytest.approx(np.mean(losses))
    if not clip:
        assert loss1 == pytest.approx(loss3) and np.allclose(plain, model.grads, atol=1e-6)
    if "clip_norm" in clip:
        assert max(np.linalg.norm(g) for g in parts) <= 0.05 * (1 + 1e-5)
