"""Recurrent layers: backpropagation through time against finite differences in float64,
and the forward pass against the equations written step by step."""

import numpy as np
import pytest
from gradcheck import bind, check_layer

from downpour.common.errors import ConfigError
from downpour.common.nn.initializers import draw
from downpour.common.nn.recurrent import GRU, LSTM, SimpleRNN


def sigmoid(a):
    return 1 / (1 + np.exp(-a))


def reference(layer, x):
    """Every h_t by the equations in recurrent.py's docstring, (B, T, H)."""
    B, T, _ = x.shape
    H = layer.H
    h, c, out = np.zeros((B, H)), np.zeros((B, H)), []
    for t in range(T):
        a = x[:, t] @ layer.W + layer.b
        if isinstance(layer, SimpleRNN):
            h = np.tanh(a + h @ layer.U)
        elif isinstance(layer, LSTM):
            a = a + h @ layer.U
            i, f, o, g = (sigmoid(a[:, :H]), sigmoid(a[:, H:2 * H]), sigmoid(a[:, 2 * H:3 * H]),
                          np.tanh(a[:, 3 * H:]))
            c = f * c + i * g
            h = o * np.tanh(c)
        else:
            hu = h @ layer.U
            r, z = sigmoid(a[:, :H] + hu[:, :H]), sigmoid(a[:, H:2 * H] + hu[:, H:2 * H])
            n = np.tanh(a[:, 2 * H:] + r * (hu[:, 2 * H:] + layer.bn))
            h = (1 - z) * n + z * h
        out.append(h)
    return np.stack(out, axis=1)


@pytest.mark.parametrize("cls", [SimpleRNN, LSTM, GRU])
@pytest.mark.parametrize("sequence", [False, True])
@pytest.mark.parametrize("seed", range(2))
def test_gradients_through_time(cls, sequence, seed):
    rng = np.random.default_rng(seed)
    B, T, F, H = 3, int(rng.integers(1, 6)), int(rng.integers(1, 4)), int(rng.integers(2, 5))
    layer = cls((T, F), H, sequence)
    x = rng.standard_normal((B, T, F))
    check_layer(layer, x, True, rng)
    expected = reference(layer, x)
    y = layer.forward(x)
    assert np.allclose(y, expected if sequence else expected[:, -1])
    assert y.shape[1:] == layer.out_shape


def test_first_layer_skips_input_gradient():
    layer = LSTM((4, 3), 5)
    layer.need_dx = False
    bind(layer, np.random.default_rng(0))
    layer.forward(np.ones((2, 4, 3)))
    assert layer.backward(np.ones((2, 5))) is None and np.any(layer.dW != 0)


def test_recurrent_initialisers():
    U = draw("orthogonal", (6, 24), np.random.default_rng(0))
    assert np.allclose(U @ U.T, np.eye(6))
    b = draw("forget_one", (24,), np.random.default_rng(0))
    assert b.tolist() == [0] * 6 + [1] * 6 + [0] * 12
    specs = {n: (s, i) for n, s, i in LSTM((28, 28), 128).param_specs()}
    assert specs == {"W": ((28, 512), "xavier_uniform"), "U": ((128, 512), "orthogonal"),
                     "b": ((512,), "forget_one")}
    assert [n for n, _, _ in GRU((5, 3), 4).param_specs()] == ["W", "U", "b", "bn"]


def test_recurrent_layers_need_sequences():
    with pytest.raises(ConfigError, match=r"lstm:8 needs sequences \(T,F\), but its input is images"):
        LSTM((28, 28, 1), 8)
