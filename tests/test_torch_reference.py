"""The NumPy layers against PyTorch autograd: the same weights give the same outputs and
the same gradients. Skips where torch is not installed (`pip install -e ".[bench]"`).

Layouts differ and are mapped here, in one place: images are channels-last (NHWC) in
downpour and NCHW in torch; a convolution's weight is (K*K*C_in, C_out) rows in (kh, kw,
c_in) order; a dense layer after flatten reads features in (h, w, c) order; LSTM gates
are (i, f, o, g) where torch has (i, f, g, o), and torch's two biases are one here (for
the GRU, torch's b_hn stays apart as bn).
"""

import numpy as np
import pytest

from downpour.common.nn.conv import AvgPool2D, Conv2D, MaxPool2D
from downpour.common.nn.layers import BatchNorm
from downpour.common.nn.model import Model, ModelSpec
from downpour.common.nn.recurrent import GRU, LSTM, SimpleRNN

torch = pytest.importorskip("torch", reason="the PyTorch reference: pip install -e '.[bench]'")
nn = torch.nn
F64 = dict(rtol=1e-9, atol=1e-10)


def t2n(t):
    return t.detach().numpy()


def conv_weight(w):
    """torch (C_out, C_in, K, K) -> downpour (K*K*C_in, C_out)."""
    c_out, c_in, k, _ = w.shape
    return t2n(w).transpose(2, 3, 1, 0).reshape(k * k * c_in, c_out)


def lstm_gates(a, axis=0):
    """torch's gate blocks (i, f, g, o) along `axis` -> downpour's (i, f, o, g)."""
    i, f, g, o = np.split(a, 4, axis=axis)
    return np.concatenate([i, f, o, g], axis=axis)


def nchw(x):
    return torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)


def run_layer(layer, params, x, R):
    """Our forward and backward of `sum(y * R)`: (y, dx, {name: grad})."""
    grads = {n: np.zeros_like(p) for n, p in params.items()}
    buffers = {n: np.zeros(s) if "mean" in n else np.ones(s) for n, s, _ in layer.buffer_specs()}
    layer.bind(params, grads, buffers)
    y = layer.forward(x, train=True).copy()
    dx = layer.backward(R)
    return y, dx, grads


@pytest.mark.parametrize("k,stride,padding", [(3, 1, 0), (3, 2, 1), (4, 1, "same"), (5, 2, 2)])
def test_conv2d(k, stride, padding):
    rng = np.random.default_rng(k)
    ref = nn.Conv2d(3, 4, k, stride=stride, padding=padding).double()
    x = rng.standard_normal((2, 9, 8, 3))                              # NHWC
    xt = nchw(x)
    yt = ref(xt)
    R = rng.standard_normal(yt.shape)                                  # NCHW
    (yt * torch.tensor(R)).sum().backward()
    layer = Conv2D((9, 8, 3), 4, k, stride, padding)
    y, dx, g = run_layer(layer, {"W": conv_weight(ref.weight), "b": t2n(ref.bias).copy()}, x,
                         R.transpose(0, 2, 3, 1))
    assert np.allclose(y, t2n(yt).transpose(0, 2, 3, 1), **F64)
    assert np.allclose(dx, t2n(xt.grad).transpose(0, 2, 3, 1), **F64)
    assert np.allclose(g["W"], conv_weight(ref.weight.grad), **F64)
    assert np.allclose(g["b"], t2n(ref.bias.grad), **F64)


@pytest.mark.parametrize("cls,ref", [(MaxPool2D, nn.MaxPool2d), (AvgPool2D, nn.AvgPool2d)])
@pytest.mark.parametrize("H,W,k", [(6, 6, 2), (7, 5, 2), (8, 7, 3)])
def test_pooling(cls, ref, H, W, k):
    rng = np.random.default_rng(H + W + k)
    x = rng.standard_normal((2, H, W, 3))
    xt = nchw(x)
    yt = ref(k)(xt)
    R = rng.standard_normal(yt.shape)
    (yt * torch.tensor(R)).sum().backward()
    y, dx, _ = run_layer(cls((H, W, 3), k), {}, x, R.transpose(0, 2, 3, 1))
    assert np.allclose(y, t2n(yt).transpose(0, 2, 3, 1), **F64)
    assert np.allclose(dx, t2n(xt.grad).transpose(0, 2, 3, 1), **F64)


def test_batchnorm_after_a_convolution():
    rng = np.random.default_rng(0)
    ref = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    x = rng.standard_normal((4, 5, 6, 3)) * 2 + 1
    xt = nchw(x)
    yt = ref(xt)
    R = rng.standard_normal(yt.shape)
    (yt * torch.tensor(R)).sum().backward()
    layer = BatchNorm(3)
    y, dx, g = run_layer(layer, {"gamma": t2n(ref.weight).copy(), "beta": t2n(ref.bias).copy()}, x,
                         R.transpose(0, 2, 3, 1))
    assert np.allclose(y, t2n(yt).transpose(0, 2, 3, 1), **F64)
    assert np.allclose(dx, t2n(xt.grad).transpose(0, 2, 3, 1), **F64)
    assert np.allclose(g["gamma"], t2n(ref.weight.grad), **F64)
    assert np.allclose(g["beta"], t2n(ref.bias.grad), **F64)
    assert np.allclose(layer.running_mean, t2n(ref.running_mean), **F64)
    assert np.allclose(layer.running_var, t2n(ref.running_var), **F64)


def recurrent_params(kind, ref):
    """Our parameters from torch's RNN/LSTM/GRU module `ref` (one layer)."""
    w, u, bi, bh = (t2n(getattr(ref, n)) for n in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0",
                                                   "bias_hh_l0"))
    if kind == "lstm":
        return {"W": lstm_gates(w).T.copy(), "U": lstm_gates(u).T.copy(), "b": lstm_gates(bi + bh)}
    if kind == "gru":
        H = u.shape[1]
        return {"W": w.T.copy(), "U": u.T.copy(), "b": bi + np.r_[bh[:2 * H], np.zeros(H)],
                "bn": bh[2 * H:].copy()}
    return {"W": w.T.copy(), "U": u.T.copy(), "b": bi + bh}


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("sequence", [False, True])
def test_recurrent(kind, sequence):
    rng = np.random.default_rng(len(kind) + sequence)
    B, T, F, H = 3, 6, 4, 5
    ref = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[kind](F, H, batch_first=True).double()
    x = rng.standard_normal((B, T, F))
    xt = torch.tensor(x, requires_grad=True)
    out = ref(xt)[0]
    yt = out if sequence else out[:, -1]
    R = rng.standard_normal(yt.shape)
    (yt * torch.tensor(R)).sum().backward()
    layer = {"rnn": SimpleRNN, "lstm": LSTM, "gru": GRU}[kind]((T, F), H, sequence)
    y, dx, g = run_layer(layer, recurrent_params(kind, ref), x, R)
    assert np.allclose(y, t2n(yt), **F64)
    assert np.allclose(dx, t2n(xt.grad), **F64)
    dW, dU, dbi, dbh = (t2n(getattr(ref, n).grad) for n in ("weight_ih_l0", "weight_hh_l0",
                                                             "bias_ih_l0", "bias_hh_l0"))
    if kind == "lstm":
        dW, dU, dbi, dbh = lstm_gates(dW), lstm_gates(dU), lstm_gates(dbi), lstm_gates(dbh)
    assert np.allclose(g["W"], dW.T, **F64) and np.allclose(g["U"], dU.T, **F64)
    assert np.allclose(g["b"], dbi, **F64)                 # b_ih and b_hh get the same gradient
    if kind == "gru":
        assert np.allclose(g["b"][:2 * H], dbh[:2 * H], **F64)
        assert np.allclose(g["bn"], dbh[2 * H:], **F64)
    else:
        assert np.allclose(g["b"], dbh, **F64)


def test_whole_cnn_in_float32():
    """The benchmark's CNN, torch's initial weights copied in: loss and every gradient."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                        nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16 * 6 * 6, 32), nn.ReLU(),
                        nn.Linear(32, 10))
    spec = ModelSpec(n_inputs=784, n_outputs=10, input_shape=(1, 28, 28),
                     layers="conv:8:3,relu,maxpool:2,conv:16:3:1:1,relu,avgpool:2,flatten,dense:32,relu")
    model = Model(spec)

    def dense_after_flatten(w):                            # torch (out, c*h*w) -> ours (h*w*c, out)
        return t2n(w).reshape(-1, 16, 6, 6).transpose(2, 3, 1, 0).reshape(16 * 36, -1)

    maps = {"0.conv": conv_weight, "3.conv": conv_weight, "7.dense": dense_after_flatten,
            "9.dense": lambda w: t2n(w).T}
    mods = {"0.conv": ref[0], "3.conv": ref[3], "7.dense": ref[7], "9.dense": ref[9]}
    for name, mod in mods.items():
        model.layout.view(model.params, f"{name}.W")[:] = maps[name](mod.weight)
        model.layout.view(model.params, f"{name}.b")[:] = t2n(mod.bias)
    rng = np.random.default_rng(0)
    x, y = rng.random((16, 784), dtype=np.float32), rng.integers(0, 10, 16)
    loss_t = nn.functional.cross_entropy(ref(torch.from_numpy(x.reshape(16, 1, 28, 28))),
                                         torch.from_numpy(y))
    loss_t.backward()
    assert np.isclose(model.loss_and_grad(x, y), loss_t.item(), rtol=1e-5)
    for name, mod in mods.items():
        assert np.allclose(model.layout.view(model.grads, f"{name}.W"), maps[name](mod.weight.grad),
                           rtol=1e-3, atol=1e-5), name
        assert np.allclose(model.layout.view(model.grads, f"{name}.b"), t2n(mod.bias.grad),
                           rtol=1e-3, atol=1e-5), name


def test_whole_lstm_in_float32():
    torch.manual_seed(0)
    lstm, out = nn.LSTM(28, 32, batch_first=True), nn.Linear(32, 10)
    model = Model(ModelSpec(n_inputs=784, n_outputs=10, input_shape=(28, 28), layers="lstm:32"))
    for name, value in recurrent_params("lstm", lstm).items():
        model.layout.view(model.params, f"0.lstm.{name}")[:] = value
    model.layout.view(model.params, "1.dense.W")[:] = t2n(out.weight).T
    model.layout.view(model.params, "1.dense.b")[:] = t2n(out.bias)
    rng = np.random.default_rng(1)
    x, y = rng.random((16, 784), dtype=np.float32), rng.integers(0, 10, 16)
    logits = out(lstm(torch.from_numpy(x.reshape(16, 28, 28)))[0][:, -1])
    loss_t = nn.functional.cross_entropy(logits, torch.from_numpy(y))
    loss_t.backward()
    assert np.isclose(model.loss_and_grad(x, y), loss_t.item(), rtol=1e-5)
    g = model.layout.view(model.grads, "0.lstm.U")
    assert np.allclose(g, lstm_gates(t2n(lstm.weight_hh_l0.grad)).T, rtol=1e-3, atol=1e-6)
    assert np.allclose(model.layout.view(model.grads, "0.lstm.b"),
                       lstm_gates(t2n(lstm.bias_ih_l0.grad)), rtol=1e-3, atol=1e-6)
