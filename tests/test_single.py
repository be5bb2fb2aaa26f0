"""The single-process trainer: metrics, saved model, determinism, early stopping, schedules."""

import json

import numpy as np
import pytest

from downpour.common.checkpoint import load_model
from downpour.common.config import Config
from downpour.common.errors import ConfigError
from downpour.common.evaluation import EarlyStopping
from downpour.common.nn.model import Model, ModelSpec
from downpour.common.training import open_datasets
from downpour.worker.single import train


def small(tmp_path, **overrides):
    base = dict(synthetic=2000, hidden=(32,), epochs=2, batch_size=50, lr=0.01, progress="none",
                metrics=str(tmp_path / "m.jsonl"), save=str(tmp_path / "model.npz"))
    return Config(**{**base, **overrides})


def read_metrics(path):
    return [json.loads(line) for line in open(path)]


def test_metrics_and_saved_model(tmp_path):
    cfg = small(tmp_path, eval_every=0.5)
    end = train(cfg)
    lines = read_metrics(cfg.metrics)
    evals = [m for m in lines if m["event"] == "eval"]
    assert [m["event"] for m in lines] == ["eval"] * 4 + ["end"] and lines[-1] == end
    assert [e["updates"] for e in evals] == [20, 40, 60, 80]          # 40 steps per epoch
    assert [e["samples"] for e in evals] == [1000, 2000, 3000, 4000]
    for e in evals:
        assert set(e) >= {"elapsed_s", "samples", "updates", "train_loss", "test_loss",
                          "test_accuracy", "lr", "epoch"}
    assert end["samples_per_s"] > 0 and end["updates"] == 80 and end["samples"] == 4000
    assert end["test_accuracy"] == evals[-1]["test_accuracy"] > 0.5   # chance is 0.1

    saved = load_model(cfg.save)                  # the saved weights give the reported figures
    spec = ModelSpec.from_dict(saved["spec"])
    model = Model(spec)
    model.params[:] = saved["params"]
    _, test, _ = open_datasets(cfg)
    loss, acc = model.evaluate(test.x, test.y)
    assert acc == end["test_accuracy"] and np.isclose(loss, end["test_loss"], rtol=1e-6)
    assert saved["layout"] == model.layout and saved["updates"] == 80


def test_same_seed_same_weights_and_other_seed_differs(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    train(small(a))
    train(small(b))
    train(small(c, seed=1))
    pa, pb, pc = (load_model(d / "model.npz")["params"] for d in (a, b, c))
    assert np.array_equal(pa, pb) and not np.array_equal(pa, pc)


def test_micro_batches_must_divide_the_batch():
    with pytest.raises(ConfigError, match="micro_batches=3 must divide batch_size=64"):
        Config(batch_size=64, micro_batches=3)


def test_early_stopping_stops_when_held_out_loss_stops_falling(tmp_path):
    cfg = small(tmp_path, lr=0.0, patience=2, eval_every=0.25, epochs=5)
    end = train(cfg)                     # lr 0: the loss never falls after the first evaluation
    evals = [m for m in read_metrics(cfg.metrics) if m["event"] == "eval"]
    assert end["stopped_early"] and len(evals) == 3 and end["updates"] == 30


def test_plateau_schedule_lowers_the_learning_rate(tmp_path):
    cfg = small(tmp_path, optimizer="sgd", lr=1e-9, lr_schedule="plateau:factor=0.5,patience=1",
                eval_every=0.25)
    train(cfg)
    lrs = [m["lr"] for m in read_metrics(cfg.metrics) if m["event"] == "eval"]
    assert lrs[0] == 1e-9 and lrs[-1] < lrs[0] and all(b <= a for a, b in zip(lrs, lrs[1:]))


def test_early_stopping_rule():
    stop = EarlyStopping(patience=2)
    assert [stop.observe(x) for x in (1.0, 0.9, 0.95, 0.9, 0.8, 0.85, 0.85)] == \
        [False, False, False, True, False, False, True]
    assert not any(EarlyStopping(patience=0).observe(x) for x in (1, 2, 3, 4))


@pytest.mark.slow
def test_mnist_baseline_reaches_the_accepted_accuracy(tmp_path, mnist_dir):
    """The issue's acceptance run on real MNIST (t10k, held-out train-5k), for 15 epochs."""
    cfg = Config(data_dir=str(mnist_dir), train_split="t10k", test_split="train-5k",
                 hidden=(256, 128), optimizer="adam", lr=0.001, batch_size=64, epochs=15,
                 seed=0, progress="none")
    end = train(cfg)
    assert end["test_accuracy"] >= 0.955


def test_a_batch_larger_than_the_training_set_is_refused_before_training(tmp_path):
    cfg = small(tmp_path, synthetic=100, batch_size=101)
    with pytest.raises(ConfigError, match="--batch-size 101 is larger than the training set: single "
                                          "mode cuts every batch from one epoch of 100 samples; the "
                                          "largest batch that works is 100"):
        train(cfg)
    assert not (tmp_path / "m.jsonl").exists() and not (tmp_path / "model.npz").exists()
