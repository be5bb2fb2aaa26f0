"""Every layer's backward against central finite differences, in float64, on random shapes."""

import numpy as np
import pytest
from gradcheck import bind, check_layer

from downpour.common.errors import ConfigError
from downpour.common.nn.layers import BatchNorm, Dense, Dropout, LeakyReLU, ReLU, Sigmoid, Softmax, Tanh


def shapes(seed):
    rng = np.random.default_rng(seed)
    return rng, int(rng.integers(2, 7)), int(rng.integers(2, 7))


@pytest.mark.parametrize("seed", range(4))
def test_dense(seed):
    rng, B, D = shapes(seed)
    layer = Dense(D, int(rng.integers(1, 6)), "he_normal")
    check_layer(layer, rng.standard_normal((B, D)), True, rng)


def test_dense_skips_input_gradient_when_not_needed():
    rng = np.random.default_rng(0)
    layer = Dense(3, 2, "he_normal")
    layer.need_dx = False
    bind(layer, rng)
    layer.forward(rng.standard_normal((4, 3)))
    assert layer.backward(np.ones((4, 2))) is None


def away_from_zero(rng, shape, margin=1e-3):
    """Inputs whose magnitude exceeds `margin`, so no difference straddles a kink."""
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < margin, margin * 10, x)


@pytest.mark.parametrize("layer_cls", [ReLU, LeakyReLU, Sigmoid, Tanh, Softmax])
@pytest.mark.parametrize("seed", range(3))
def test_activation(layer_cls, seed):
    rng, B, D = shapes(seed)
    layer = LeakyReLU(0.1) if layer_cls is LeakyReLU else layer_cls()
    check_layer(layer, away_from_zero(rng, (B, D)) * 3, True, rng)


def test_activation_values():
    x = np.array([[-2.0, -0.5, 0.0, 0.5, 2.0]])
    assert np.allclose(ReLU().forward(x), [[0, 0, 0, 0.5, 2]])
    assert np.allclose(LeakyReLU(0.1).forward(x), [[-0.2, -0.05, 0, 0.5, 2]])
    assert np.allclose(Sigmoid().forward(x), 1 / (1 + np.exp(-x)))
    assert np.allclose(Tanh().forward(x), np.tanh(x))
    s = Softmax().forward(x)
    assert np.allclose(s, np.exp(x) / np.exp(x).sum()) and np.isclose(s.sum(), 1)


def test_sigmoid_and_softmax_do_not_overflow():
    x = np.array([[-1000.0, 0.0, 1000.0]], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        assert np.allclose(Sigmoid().forward(x), [[0, 0.5, 1]])
        assert np.allclose(Softmax().forward(x), [[0, 0, 1]])


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_dropout(train, seed):
    rng, B, D = shapes(seed)
    layer = Dropout(0.4, np.random.default_rng(seed))

    def same_mask():
        layer.rng = np.random.default_rng(seed)

    x = rng.standard_normal((B, D))
    check_layer(layer, x, train, rng, before_forward=same_mask)


def test_dropout_modes():
    x = np.ones((2000, 50))
    layer = Dropout(0.3, np.random.default_rng(0))
    assert layer.forward(x, train=False) is x                 # identity in evaluation
    y = layer.forward(x, train=True)
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.01                      # keep probability 1 - p
    assert np.allclose(y[kept], 1 / 0.7)                      # inverted scaling
    assert abs(y.mean() - 1.0) < 0.02                         # expectation preserved
    assert np.array_equal(layer.backward(np.ones_like(x)), y)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_batchnorm(train, seed):
    rng, B, D = shapes(seed)
    check_layer(BatchNorm(D), rng.standard_normal((B, D)) * 2 + 1, train, rng)


def test_batchnorm_statistics():
    rng = np.random.default_rng(0)
    layer = BatchNorm(3, momentum=0.1)
    layer.bind({"gamma": np.ones(3), "beta": np.zeros(3)}, {"gamma": np.zeros(3), "beta": np.zeros(3)},
               {"running_mean": np.zeros(3), "running_var": np.ones(3)})
    x = rng.standard_normal((64, 3)) * [1, 2, 3] + [5, -5, 0]
    y = layer.forward(x, train=True)
    assert np.allclose(y.mean(axis=0), 0, atol=1e-12)
    assert np.allclose(y.var(axis=0), 1, atol=1e-3)           # var / (var + eps)
    assert np.allclose(layer.running_mean, 0.1 * x.mean(axis=0))
    assert np.allclose(layer.running_var, 0.9 + 0.1 * x.var(axis=0, ddof=1))
    mean, var = layer.running_mean.copy(), layer.running_var.copy()
    y_eval = layer.forward(x, train=False)                    # running statistics, unchanged
    assert np.allclose(y_eval, (x - mean) / np.sqrt(var + 1e-5))
    assert np.array_equal(layer.running_mean, mean) and np.array_equal(layer.running_var, var)


def test_batchnorm_needs_two_rows_in_training():
    layer = BatchNorm(2)
    bind(layer, np.random.default_rng(0))
    with pytest.raises(ValueError, match="at least 2"):
        layer.forward(np.ones((1, 2)), train=True)


def test_bad_hyperparameters():
    with pytest.raises(ConfigError, match="dropout"):
        Dropout(1.0, np.random.default_rng())
    with pytest.raises(ConfigError, match="slope"):
        LeakyReLU(-0.1)
    with pytest.raises(ConfigError, match="momentum"):
        BatchNorm(3, momentum=0)


def test_buffers_are_reused_for_the_same_shape():
    layer = ReLU()
    x = np.ones((4, 3), np.float32)
    assert layer.forward(x) is layer.forward(x * 2)
