"""The layer spec: parsing, shapes, the --hidden shorthand, whole models against finite
differences, and the spec travelling through settings, saved models and a cluster."""

import json

import numpy as np
import pytest
from gradcheck import check_model

from downpour.common.checkpoint import load_model
from downpour.common.config import resolve
from downpour.common.errors import ConfigError
from downpour.common.nn.layerspec import parse
from downpour.common.nn.model import Model, ModelSpec

CNN = "conv:32:3,relu,maxpool:2,conv:64:3,relu,maxpool:2,flatten,dense:128,relu"


def test_parse_accepts_every_kind():
    text = ("conv:8:3, conv:8:3:2, conv:8:3:1:same, conv:8:5:2:1, maxpool:2, avgpool:3, flatten, "
            "dense:10, dropout:0.5, batchnorm, rnn:4, lstm:4:seq, gru:4, relu, leaky_relu, "
            "leaky_relu:0.2, sigmoid, tanh, softmax")
    assert parse(text) == tuple(t.strip() for t in text.split(","))
    assert parse(["dense:3", "relu"]) == ("dense:3", "relu")


@pytest.mark.parametrize("spec, message", [
    ("conv:32", r"layer 1 'conv:32': expected conv:C:K\[:S\[:P\]\]"),
    ("conv:32:3:0", "layer 1 'conv:32:3:0': expected conv:C:K"),
    ("conv:32:3:1:valid", "'conv:32:3:1:valid': expected conv:C:K"),
    ("conv:32:3:2:same", "'same' padding needs stride 1"),
    ("relu,maxpool:x", "layer 2 'maxpool:x': expected maxpool:K"),
    ("dense:128,dropout:1.5", r"layer 2 'dropout:1.5': expected dropout:P with 0 <= P < 1"),
    ("lstm:128:all", r"'lstm:128:all': expected lstm:H\[:seq\]"),
    ("relu:2", "'relu:2': expected relu"),
    ("dense:64,,relu", "an empty token"),
    ("conv:32:3,pool:2", "layer 2 'pool:2': unknown layer 'pool'; expected one of conv, maxpool"),
])
def test_parse_errors_name_the_token_and_what_is_expected(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse(spec)


@pytest.mark.parametrize("layers, shape, message", [
    ("conv:8:3", (784,), "conv:8:3 needs images"),
    ("dense:10", (1, 28, 28), r"layer 1 'dense:10' needs vectors, but its input is images "
                              r"1,28,28 \(C,H,W\): put flatten before it"),
    ("conv:8:3", (1, 28, 28), "the layers end in images 8,26,26"),
    ("lstm:8:seq", (28, 28), "the layers end in sequences 28,8"),
    ("lstm:8", (1, 28, 28), "lstm:8 needs sequences"),
    ("conv:4:3,maxpool:2,conv:4:7,flatten", (16, 7, 7), "7x7 kernel does not fit images 4,2,2"),
    ("flatten", (2, 28, 28), "input_shape 2,28,28 does not fit samples of 784 features"),
])
def test_shape_errors(layers, shape, message):
    with pytest.raises(ConfigError, match=message):
        ModelSpec(n_inputs=784, n_outputs=10, layers=layers, input_shape=shape)


def test_hidden_is_shorthand_for_dense_tokens():
    short = ModelSpec(n_inputs=6, n_outputs=3, hidden=(5, 4), activation="tanh", batchnorm=True,
                      dropout=0.25)
    assert short.tokens == ("dense:5", "batchnorm", "tanh", "dropout:0.25",
                            "dense:4", "batchnorm", "tanh", "dropout:0.25")
    long = ModelSpec(n_inputs=6, n_outputs=3, layers=short.tokens)
    a, b = Model(short, seed=4), Model(long, seed=4)
    assert a.layout == b.layout and np.array_equal(a.params, b.params)
    x, y = np.random.default_rng(0).standard_normal((8, 6)), np.arange(8) % 3
    assert a.loss_and_grad(x, y) == b.loss_and_grad(x, y) and np.array_equal(a.grads, b.grads)


def test_layer_names_and_initialisers():
    model = Model(ModelSpec(n_inputs=784, n_outputs=10, layers=CNN, input_shape=(1, 28, 28)))
    assert [(t.name, t.shape) for t in model.layout.tensors] == [
        ("0.conv.W", (9, 32)), ("0.conv.b", (32,)), ("3.conv.W", (288, 64)), ("3.conv.b", (64,)),
        ("7.dense.W", (1600, 128)), ("7.dense.b", (128,)), ("9.dense.W", (128, 10)),
        ("9.dense.b", (10,))]
    assert abs(model.layers[3].W.std() / np.sqrt(2 / 288) - 1) < 0.05       # He before ReLU
    assert model.layers[0].need_dx is False and model.eval_batch < 1000


def model_gradient_check(spec, x, y):
    check_model(Model(spec, seed=1, dtype=np.float64), x, y)


def test_cnn_model_gradient():
    spec = ModelSpec(n_inputs=2 * 7 * 6, n_outputs=3, input_shape=(2, 7, 6), l1=0.01, l2=0.02,
                     layers="conv:3:3:1:same,batchnorm,relu,maxpool:2,conv:4:2:2:1,leaky_relu,"
                            "avgpool:2,dropout:0.3,flatten,dense:5,tanh")
    rng = np.random.default_rng(0)
    model_gradient_check(spec, rng.standard_normal((4, 84)), rng.integers(0, 3, 4))


def test_recurrent_model_gradient():
    spec = ModelSpec(n_inputs=5 * 3, n_outputs=3, input_shape=(5, 3), l2=0.01,
                     layers="rnn:4:seq,batchnorm,lstm:3:seq,dropout:0.2,gru:4,dense:4,sigmoid")
    rng = np.random.default_rng(1)
    model_gradient_check(spec, rng.standard_normal((4, 15)), rng.integers(0, 3, 4))


def test_several_channels_are_read_as_c_h_w():
    spec = ModelSpec(n_inputs=2 * 3 * 3, n_outputs=2, layers="flatten", input_shape=(2, 3, 3))
    model = Model(spec)
    x = np.arange(18, dtype=np.float32).reshape(1, 18)        # channel 0: 0..8, channel 1: 9..17
    model.forward(x)
    assert model.layers[0].forward(model._shaped(x))[0, :4].tolist() == [0, 9, 1, 10]


def test_settings_from_flags_toml_and_environment(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('layers = ["lstm:16", "dense:8", "relu"]\ninput_shape = [28, 28]\n')
    cfg = resolve({"config": str(toml)}, environ={})
    assert cfg.layers == "lstm:16,dense:8,relu" and cfg.input_shape == (28, 28)
    cfg = resolve({}, environ={"DOWNPOUR_LAYERS": CNN, "DOWNPOUR_INPUT_SHAPE": "1,28,28"})
    assert cfg.layers == CNN and cfg.input_shape == (1, 28, 28)
    with pytest.raises(ConfigError, match="layer 3 'maxpool:0': expected maxpool:K"):
        resolve({"layers": "conv:8:3,relu,maxpool:0"}, environ={})
    with pytest.raises(ConfigError, match="hidden describes the layers of --hidden, but layers"):
        resolve({"layers": "dense:8", "hidden": "64"}, environ={})
    with pytest.raises(ConfigError, match="input_shape='1,x': expected comma-separated positive"):
        resolve({"input_shape": "1,x"}, environ={})


SMALL_CNN = ["--synthetic", 600, "--epochs", 1, "--batch-size", 32, "--progress", "none",
             "--layers", "conv:4:3:1:same,batchnorm,relu,maxpool:2,conv:6:3:2,relu,avgpool:2,"
             "flatten,dense:16,relu", "--input-shape", "1,28,28"]


def test_a_cnn_trained_in_a_cluster_is_exactly_the_single_process_one(downpour, tmp_path):
    """Async with one worker and n_fetch = n_push = 1 is single-process SGD (invariant 3,
    docs/invariants.md): the layer spec reaches every role through the cluster spec, and
    the saved model round-trips to the figures the run reported."""
    r = downpour("train", "--mode", "single", *SMALL_CNN, "--save", "single.npz")
    assert r.returncode == 0, r.stderr
    r = downpour("train", "--mode", "async", "--workers", 1, "--shards", 2, *SMALL_CNN,
                 "--save", "async.npz", "--metrics", "m.jsonl")
    assert r.returncode == 0, r.stderr
    single, clustered = load_model(tmp_path / "single.npz"), load_model(tmp_path / "async.npz")
    assert np.array_equal(single["params"], clustered["params"])
    spec = ModelSpec.from_dict(clustered["spec"])
    assert spec.layers[0] == "conv:4:3:1:same" and spec.input_shape == (1, 28, 28)
    model = Model(spec)
    model.params[:] = clustered["params"]
    assert model.layout == clustered["layout"]


@pytest.mark.parametrize("mode", ["sync", "ssp", "hogwild"])
def test_a_recurrent_model_trains_in_every_replicated_mode(downpour, tmp_path, mode):
    shards = [] if mode == "hogwild" else ["--shards", 2]
    r = downpour("train", "--mode", mode, "--workers", 2, *shards, "--synthetic", 600,
                 "--epochs", 1, "--batch-size", 16, "--progress", "none", "--layers",
                 "gru:8:seq,lstm:8", "--input-shape", "28,28", "--save", "m.npz",
                 "--metrics", "m.jsonl")
    assert r.returncode == 0, r.stderr
    saved = load_model(tmp_path / "m.npz")
    end = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["updates"] > 0
    model = Model(ModelSpec.from_dict(saved["spec"]))
    model.params[:] = saved["params"]
    assert np.all(np.isfinite(model.params)) and model.layout.size == end["parameters"]
