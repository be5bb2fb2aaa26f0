"""Tests for common/step.py: the gradient step every trainer takes, and batch_gradient."""

import itertools

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


def test_only_the_straggler_pads_its_step_to_factor_times_the_compute(monkeypatch):
    """--slow-worker 1:3: worker 1 sleeps 2 x the time its step took (a fake clock that
    moves 0.5 s a reading)."""
    clock, slept = itertools.count(0.0, 0.5), []
    monkeypatch.setattr(step_module.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(step_module.time, "sleep", slept.append)
    cfg, data = Config(mode="async", workers=2, batch_size=8, slow_worker="1:3"), dataset()
    for rank in (0, 1):
        GradientStep(cfg, Model(SPEC, seed=0), data, f"worker-{rank}", rank).step(np.arange(8))
    assert slept == [2 * 0.5]


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
