"""Every loss against its formula and against central finite differences (float64)."""

import numpy as np
import pytest
from gradcheck import numeric_grad, rel_error

from downpour.common.errors import ConfigError
from downpour.common.nn.losses import LOSSES, make_loss


def targets(name, rng, B, K, labels):
    if labels:
        return rng.integers(0, K, B) if K > 1 else rng.integers(0, 2, B)
    if name == "softmax_ce":
        t = rng.uniform(size=(B, K))
        return t / t.sum(axis=1, keepdims=True)             # a distribution per row
    if name == "sigmoid_bce":
        return rng.uniform(size=(B, K))
    return rng.standard_normal((B, K))


@pytest.mark.parametrize("labels", [True, False])
@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("seed", range(3))
def test_gradient(name, labels, seed):
    rng = np.random.default_rng(seed)
    B, K = int(rng.integers(1, 6)), int(rng.integers(2, 6))
    if name == "sigmoid_bce" and seed == 0:
        K = 1                                               # the binary case: one logit
    z = rng.standard_normal((B, K)) * 3
    t = targets(name, rng, B, K, labels)
    loss = make_loss(name)
    loss.forward(z, t)
    analytic = loss.backward().copy()
    numeric = numeric_grad(lambda: loss.forward(z, t), z)
    assert rel_error(analytic, numeric) < 1e-6


def test_values_against_formulas():
    z = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    y = np.array([1, 2])
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    assert np.isclose(make_loss("softmax_ce").forward(z, y), -np.mean(np.log(p[[0, 1], y])))
    t = np.eye(3)[y]
    assert np.isclose(make_loss("mse").forward(z, y), np.mean((z - t) ** 2))
    s = 1 / (1 + np.exp(-z))
    assert np.isclose(make_loss("sigmoid_bce").forward(z, t),
                      -np.mean(t * np.log(s) + (1 - t) * np.log(1 - s)))


def test_large_logits_are_stable():
    z = np.array([[1000.0, -1000.0], [-1000.0, 1000.0]], dtype=np.float32)
    y = np.array([0, 0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        ce = make_loss("softmax_ce")
        assert np.isclose(ce.forward(z, y), 1000.0)          # (0 + 2000) / 2
        assert np.allclose(ce.backward(), [[0, 0], [-0.5, 0.5]])
        bce = make_loss("sigmoid_bce")
        assert np.isfinite(bce.forward(z, np.eye(2)[y])) and np.all(np.isfinite(bce.backward()))


def test_target_shape_is_checked():
    with pytest.raises(ValueError, match="target has shape"):
        make_loss("mse").forward(np.zeros((3, 2)), np.zeros((3, 3)))


def test_unknown_loss():
    with pytest.raises(ConfigError, match="unknown loss 'hinge'"):
        make_loss("hinge")
