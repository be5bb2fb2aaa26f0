"""Runs that cannot train are refused before they start, and one that trained nothing fails.

Through the real command line on the shipped digits (10,000 training samples: the
`downpour` fixture gives the child no DOWNPOUR_DATA_DIR), so each refusal is what a
user sees: exit 2 and one line, long before a cluster could assemble.
"""

import time

import pytest

from downpour.common.config import Config
from downpour.common.errors import DownpourError, TrainingError
from downpour.common.metrics import MetricsLog, Progress, end_record
from downpour.common.nn.model import Model, ModelSpec
from downpour.common.training import finish

SHIPPED_TRAIN = 10_000       # samples in the shipped training split, t10k
REFUSED_WITHIN_S = 10.0      # a refusal comes before any process of a run starts


def refused(result, elapsed_s):
    """The one error line of a run that exited 2 in time."""
    assert result.returncode == 2, result.stderr
    assert elapsed_s < REFUSED_WITHIN_S
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("downpour: error: "), result.stderr
    assert "done:" not in result.stdout + result.stderr
    return lines[0]


@pytest.mark.parametrize("mode,workers,batch,largest", [
    ("async", 2, 100_000, SHIPPED_TRAIN),            # batches are dealt from the whole epoch
    ("ssp", 2, SHIPPED_TRAIN + 1, SHIPPED_TRAIN),
    ("hogwild", 2, 6000, SHIPPED_TRAIN // 2),        # each process walks its own half
    ("sync", 2, 6000, SHIPPED_TRAIN // 2),           # a version is one global batch of W x b
    ("single", 1, SHIPPED_TRAIN + 1, SHIPPED_TRAIN),
])
def test_a_batch_that_cannot_be_drawn_is_refused_naming_the_largest_that_works(
        downpour, mode, workers, batch, largest):
    args = ["--workers", workers] if mode != "single" else []
    start = time.monotonic()
    r = downpour("train", "--mode", mode, *args, "--batch-size", batch, "--epochs", 1,
                 "--progress", "lines", timeout=60)
    line = refused(r, time.monotonic() - start)
    per_worker = f" with {workers} workers" if mode in ("hogwild", "sync") else ""
    assert f"--batch-size {batch} " in line
    assert f"the largest batch that works{per_worker} is {largest}: choose --batch-size {largest} " \
           "or less" in line


def test_more_sync_workers_than_samples_is_refused_naming_workers(downpour):
    start = time.monotonic()
    r = downpour("train", "--mode", "sync", "--workers", 3, "--synthetic", 2, "--batch-size", 1)
    line = refused(r, time.monotonic() - start)
    assert "--workers 3 is more than the 2 training samples" in line and "--workers 2 or fewer" in line


def test_the_scheduler_alone_refuses_an_impossible_batch(downpour, socket_dir):
    """What a compose cluster runs: the scheduler checks once it has opened the data."""
    start = time.monotonic()
    r = downpour("scheduler", "--mode", "sync", "--workers", 2, "--batch-size", 6000,
                 "--bind", f"ipc://{socket_dir}/scheduler", "--start-timeout-s", 5, timeout=60)
    line = refused(r, time.monotonic() - start)
    assert "--batch-size 6000 cannot be drawn" in line and "choose --batch-size 5000 or less" in line


def test_a_dead_after_the_heartbeat_cannot_satisfy_is_refused(downpour):
    start = time.monotonic()
    r = downpour("train", "--mode", "async", "--dead-after-s", 0.1)
    line = refused(r, time.monotonic() - start)
    assert "dead_after_s=0.1 is too short for heartbeat_s=0.5" in line
    assert "give --dead-after-s 1.5 or more, or a shorter --heartbeat-s" in line


def test_a_toml_alias_is_suggested_by_the_command_line(downpour, tmp_path):
    (tmp_path / "run.toml").write_text("learning_rate = 0.1\n")
    r = downpour("train", "--config", "run.toml")
    assert r.returncode == 2
    assert r.stderr == ("downpour: error: unknown setting 'learning_rate' in config file "
                        "'run.toml'; did you mean 'lr'?\n")


def async_end(samples, dead):
    """The end record of an async run of 2 workers asked for 20,000 samples."""
    return end_record(mode="async", workers=2, shards=1, parameters=23, data="synthetic",
                      samples=samples, updates=0, epoch_samples=10_000, elapsed_s=1.0,
                      train_time_s=1.0, last_eval={"test_accuracy": 0.1}, stopped_early=False,
                      samples_asked=20_000, dead_workers=dead)


@pytest.mark.parametrize("dead", [[], [0, 1]])
def test_a_run_that_trained_nothing_fails_with_no_end_line_and_no_model(tmp_path, dead):
    cfg = Config(save=str(tmp_path / "model.npz"), metrics=str(tmp_path / "m.jsonl"))
    model = Model(ModelSpec(n_inputs=4, n_outputs=2, hidden=(3,)), seed=0)
    metrics = MetricsLog(cfg.metrics)
    metrics.write("eval", samples=0)
    with pytest.raises(TrainingError) as e:
        finish(cfg, model, metrics, Progress(0, "none"), async_end(0, dead))
    assert isinstance(e.value, DownpourError)             # the command line exits 2 with it
    assert str(e.value).startswith("the async run ended having trained 0 samples (asked for 20,000)")
    assert ("worker(s) 0, 1 were declared dead" in str(e.value)) == bool(dead)
    assert '"end"' not in (tmp_path / "m.jsonl").read_text()
    assert not (tmp_path / "model.npz").exists()

    metrics = MetricsLog(cfg.metrics)                     # one sample is a run: it ends as ever
    end = finish(cfg, model, metrics, Progress(0, "none"), async_end(1, dead))
    assert end["samples"] == 1 and (tmp_path / "model.npz").exists()
