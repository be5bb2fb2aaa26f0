"""The whole model: gradient of the training loss, initialisation, layout, evaluation."""

import numpy as np
import pytest
from gradcheck import check_model

from downpour.common.errors import ConfigError
from downpour.common.nn.initializers import INITIALIZERS, draw
from downpour.common.nn.model import Model, ModelSpec, initial_params, model_layout

CASES = [  # (activation, batchnorm, dropout, loss, l1, l2)
    ("relu", False, 0.0, "softmax_ce", 0.0, 0.0),
    ("leaky_relu", True, 0.0, "softmax_ce", 0.01, 0.0),
    ("tanh", True, 0.3, "mse", 0.0, 0.05),
    ("sigmoid", False, 0.3, "sigmoid_bce", 0.02, 0.03),
    ("relu", True, 0.2, "softmax_ce", 0.01, 0.01),
]


@pytest.mark.parametrize("activation,batchnorm,dropout,loss,l1,l2", CASES)
def test_loss_gradient_matches_finite_differences(activation, batchnorm, dropout, loss, l1, l2):
    spec = ModelSpec(n_inputs=4, n_outputs=3, hidden=(5, 3), activation=activation,
                     batchnorm=batchnorm, dropout=dropout, loss=loss, l1=l1, l2=l2)
    rng = np.random.default_rng(2)
    check_model(Model(spec, seed=1, dtype=np.float64), rng.standard_normal((6, 4)),
                rng.integers(0, 3, 6))


def test_initial_weights_do_not_depend_on_sharding():
    spec = ModelSpec(n_inputs=30, n_outputs=4, hidden=(20, 10), batchnorm=True)
    full = initial_params(spec, seed=5)
    assert np.array_equal(Model(spec, seed=5).params, full)
    layout = model_layout(spec)
    for shards in (1, 2, 3, 7):
        pieces = [initial_params(spec, seed=5)[lo:hi] for lo, hi in layout.shard_ranges(shards)]
        assert np.array_equal(np.concatenate(pieces), full)
    assert not np.array_equal(initial_params(spec, seed=6), full)


def test_layout_names_and_views():
    model = Model(ModelSpec(n_inputs=784, n_outputs=10, hidden=(256, 128), batchnorm=True))
    names = [t.name for t in model.layout.tensors]
    assert names == ["0.dense.W", "0.dense.b", "1.batchnorm.gamma", "1.batchnorm.beta",
                     "3.dense.W", "3.dense.b", "4.batchnorm.gamma", "4.batchnorm.beta",
                     "6.dense.W", "6.dense.b"]
    assert model.layout.size == 784 * 256 + 256 + 2 * 256 + 256 * 128 + 128 + 2 * 128 + 128 * 10 + 10
    assert [t.name for t in model.buffer_layout.tensors] == [
        "1.batchnorm.running_mean", "1.batchnorm.running_var",
        "4.batchnorm.running_mean", "4.batchnorm.running_var"]
    assert model.params.dtype == np.float32 and model.params.flags.c_contiguous
    dense = model.layers[0]
    assert np.shares_memory(dense.W, model.params) and np.shares_memory(dense.dW, model.grads)
    assert np.all(model.layout.view(model.params, "1.batchnorm.gamma") == 1)


@pytest.mark.parametrize("name", [n for n in INITIALIZERS
                                  if n not in ("zeros", "ones", "orthogonal", "forget_one")])
def test_initialiser_statistics(name):
    fan_in, fan_out = 400, 600
    w = draw(name, (fan_in, fan_out), np.random.default_rng(0))
    expected_std = {"lecun": np.sqrt(1 / fan_in), "xavier": np.sqrt(2 / (fan_in + fan_out)),
                    "he": np.sqrt(2 / fan_in), "normal": 0.01, "uniform": 0.1 / np.sqrt(12)}
    family = name.rsplit("_", 1)[0]
    assert abs(w.mean()) < 0.01 * expected_std[family] * 10
    assert abs(w.std() / expected_std[family] - 1) < 0.01
    if name.endswith("uniform"):
        assert np.abs(w).max() <= np.sqrt(3) * expected_std[family]


def test_default_initialiser_follows_the_activation():
    assert ModelSpec(4, 2, activation="relu").hidden_init == "he_normal"
    assert ModelSpec(4, 2, activation="tanh").hidden_init == "xavier_uniform"
    assert ModelSpec(4, 2, activation="tanh", init="lecun_uniform").hidden_init == "lecun_uniform"


def test_evaluate_counts_correct_predictions():
    model = Model(ModelSpec(n_inputs=3, n_outputs=4, hidden=(5,)), seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2500, 3)).astype(np.float32)
    out = model.forward(x).copy()
    y = out.argmax(axis=1)
    y[:500] = (y[:500] + 1) % 4                               # make exactly 500 wrong
    loss, acc = model.evaluate(x, y, batch_size=700)
    assert acc == 2000 / 2500
    p = np.exp(out - out.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert np.isclose(loss, -np.mean(np.log(p[np.arange(2500), y])), rtol=1e-5)


def test_float32_model_agrees_with_float64():
    spec = ModelSpec(n_inputs=20, n_outputs=5, hidden=(16, 8), batchnorm=True)
    m32, m64 = Model(spec, seed=3), Model(spec, seed=3, dtype=np.float64)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 20)), rng.integers(0, 5, 32)
    assert np.isclose(m32.loss_and_grad(x, y), m64.loss_and_grad(x, y), rtol=1e-5)
    assert np.allclose(m32.grads, m64.grads, atol=1e-5)


@pytest.mark.parametrize("field,value,message", [
    ("activation", "swish", "unknown hidden activation 'swish'"),
    ("init", "glorot", "unknown initialiser init='glorot'"),
    ("loss", "hinge", "unknown loss 'hinge'"),
    ("dropout", 1.0, "dropout must be in"),
    ("l2", -1.0, "l2 must be >= 0"),
    ("hidden", (10, 0), "layer widths"),
])
def test_spec_validation(field, value, message):
    with pytest.raises(ConfigError, match=message):
        ModelSpec(n_inputs=4, n_outputs=2, **{field: value})


def test_spec_round_trip():
    spec = ModelSpec(n_inputs=4, n_outputs=2, hidden=(3, 2), dropout=0.1, batchnorm=True)
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="unknown model field"):
        ModelSpec.from_dict({**spec.to_dict(), "depth": 3})
