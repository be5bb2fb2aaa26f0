"""Pieces every trainer shares: which data a run uses, the model it builds, the checks
before it starts, how it ends.

The single-process trainer (worker/single.py), Hogwild! and, in a cluster, the scheduler
and workers call these, so a setting means the same thing in every mode. The order of
the samples is downpour.common.order; the gradient step, downpour.common.step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from downpour.common.checkpoint import save_model
from downpour.common.config import SPARSE, Config
from downpour.common.ctr import CtrSplit
from downpour.common.data import (
    SHIPPED_DATA_DIR,
    Dataset,
    find_mnist,
    load_mnist,
    synthetic_dataset,
)
from downpour.common.errors import ConfigError, TrainingError
from downpour.common.fileio import prepare_output
from downpour.common.metrics import EndRecord, MetricsLog, Progress
from downpour.common.nn.layerspec import parse as parse_layers
from downpour.common.nn.model import Model, ModelSpec
from downpour.common.order import replicas


def open_datasets(cfg: Config) -> tuple[Dataset | CtrSplit, Dataset | CtrSplit, str]:
    """(train, test, a sentence saying what they are).

    `--data criteo:DIR` opens DIR/train.tsv and DIR/test.tsv as streamed splits, indexed
    into file chunks of chunk_batches x batch_size lines (common/ctr.py).

    `--synthetic N` asks for synthetic data. Otherwise MNIST splits `train_split` and
    `test_split` are read from the directory `downpour.common.data.find_mnist` picks:
    `--data-dir` (or $DOWNPOUR_DATA_DIR), which must hold both; else data/mnist if it
    holds both; else the digits shipped with downpour. DataError if none will do.
    """
    if cfg.data:
        folder = Path(cfg.data.removeprefix("criteo:"))
        lines = cfg.chunk_batches * cfg.batch_size
        train, test = (CtrSplit(folder / f"{split}.tsv", lines) for split in ("train", "test"))
        return train, test, (f"click logs in the Criteo layout from {folder}: train on "
                             f"train.tsv ({train.lines:,} lines), hold out test.tsv "
                             f"({test.lines:,})")
    if cfg.synthetic:
        train, test = synthetic_dataset(cfg.synthetic, max(1, cfg.synthetic // 5), seed=cfg.seed)
        return train, test, f"synthetic data: {len(train)} training and {len(test)} held-out samples"
    data_dir = find_mnist(cfg.data_dir, (cfg.train_split, cfg.test_split))
    train, test = load_mnist(data_dir, cfg.train_split, cfg.test_split)
    shipped = data_dir == SHIPPED_DATA_DIR
    source = "MNIST digits shipped with downpour" if shipped else f"MNIST from {data_dir}"
    return train, test, (f"{source}: train on {cfg.train_split!r} ({len(train)}), "
                         f"hold out {cfg.test_split!r} ({len(test)})")


def training_samples(cfg: Config) -> int:
    """n, the samples of the training split (for the checks before a run): --synthetic N
    is N, without making them; MNIST is opened (~0.1 s) and dropped."""
    return cfg.synthetic or len(open_datasets(cfg)[0])


def model_spec(cfg: Config, data: Dataset | CtrSplit) -> ModelSpec:
    """The model the settings describe, sized for `data`. A sparse model's (--model) is
    its dense part: the bias, the b of a 1 -> 1 output layer whose input is always 0 (its
    W never moves); the rows are in the servers' tables (common/nn/sparse.py)."""
    if cfg.model:
        return ModelSpec(n_inputs=1, n_outputs=1, hidden=(), loss="sigmoid_bce",
                         output_init="zeros")
    return ModelSpec(n_inputs=data.n_features, n_outputs=data.n_classes, hidden=cfg.hidden,
                     activation=cfg.activation, init=cfg.init, dropout=cfg.dropout,
                     batchnorm=cfg.batchnorm, loss=cfg.loss, l1=cfg.l1, l2=cfg.l2,
                     layers=parse_layers(cfg.layers) if cfg.layers else (),
                     input_shape=cfg.input_shape)


def check_cluster(cfg: Config, n: int | None = None) -> None:
    """ConfigError for settings that contradict each other in a multi-worker run; with
    `n`, the training set's size, also for a batch that cannot be drawn (`check_batches`)."""
    if cfg.mode in ("sync", "ssp", "hogwild", "hybrid") and (cfg.n_fetch > 1 or cfg.n_push > 1
                                                            or cfg.overlap):
        raise ConfigError(f"{cfg.mode} mode exchanges every step: n_fetch, n_push and overlap "
                          "are for async mode; drop them or use --mode async")
    if cfg.overlap and (cfg.n_fetch > 1 or cfg.n_push > 1):
        raise ConfigError("overlap works with n_fetch = n_push = 1 (a push_pull every step)")
    if cfg.backup and (cfg.mode != "sync" or cfg.backup >= cfg.workers):
        raise ConfigError(f"backup={cfg.backup}: backup workers are for --mode sync, and fewer "
                          f"than the {cfg.workers} worker(s)")
    if cfg.staleness and cfg.mode != "ssp":
        raise ConfigError(f"staleness={cfg.staleness} bounds --mode ssp; use --mode ssp or drop it")
    if cfg.staleness_lr and cfg.mode not in ("async", "ssp"):
        raise ConfigError("staleness_lr scales asynchronous pushes: use --mode async or ssp")
    if bool(cfg.model) != (cfg.mode in SPARSE) and (cfg.model or cfg.mode == "hybrid"):
        raise ConfigError(f"--model {cfg.model} runs in --mode async (Downpour) or hybrid "
                          f"(PERSIA); got --mode {cfg.mode}" if cfg.model else
                          "--mode hybrid is for sparse models: give --model lr or fm (and "
                          "--data criteo:DIR)")
    rank, _ = cfg.slowdown
    if rank >= replicas(cfg):
        raise ConfigError(f"slow_worker names worker {rank}, but the run has {replicas(cfg)}")
    if n is not None:
        check_batches(cfg, n)


def check_batches(cfg: Config, n: int) -> None:
    """ConfigError unless every step of the run can draw a full batch from `n` training samples.

    Batches are never padded (an epoch's incomplete rest is dropped), so with batch b and
    W workers a run trains anything only if

        single, async, ssp   b <= n       batches are cut from the whole epoch (async and ssp
                                          deal them to the workers in chunks)
        hogwild              b <= n // W  each process walks its own partition, the smallest
                                          of which holds n // W samples
        sync                 W b <= n     each version is one global batch of W b samples

    Called wherever the data is first opened, in every mode, before any work starts.
    """
    b, W = cfg.batch_size, replicas(cfg)
    if cfg.mode in ("hogwild", "sync"):
        largest = n // W
        if largest < 1:
            raise ConfigError(f"--workers {W} is more than the {n:,} training samples: "
                              f"{cfg.mode} mode gives every worker samples of its own; "
                              f"choose --workers {n} or fewer")
        if b <= largest:
            return
        why = (f"each of the {W} hogwild workers walks its own share of the {n:,} training "
               f"samples, the smallest {largest:,}" if cfg.mode == "hogwild" else
               f"a sync version is one global batch of {W} x {b:,} = {W * b:,} samples, "
               f"more than the {n:,} training samples")
        raise ConfigError(f"--batch-size {b} cannot be drawn: {why}; the largest batch that "
                          f"works with {W} workers is {largest}: choose --batch-size {largest} "
                          "or less, or fewer --workers")
    if b > n:
        raise ConfigError(f"--batch-size {b} is larger than the training set: {cfg.mode} mode "
                          f"cuts every batch from one epoch of {n:,} samples; the largest batch "
                          f"that works is {n}: choose --batch-size {n} or less")


def check_outputs(cfg: Config) -> None:
    """Make the run's output paths ready before any work, or fail at once (ConfigError):
    the metrics file, the saved model and the checkpoint folder."""
    if cfg.metrics:
        prepare_output(cfg.metrics, "--metrics")
    if cfg.save:
        prepare_output(cfg.save, "--save")
    if cfg.checkpoint_dir:
        prepare_output(cfg.checkpoint_dir, "--checkpoint-dir", directory=True)


def finish(cfg: Config, model: Model, metrics: MetricsLog, progress: Progress,
           record: EndRecord) -> dict[str, Any]:
    """The end of every run: the `end` metrics line (`record`), the saved model, the summary
    line; returns the line as written.

    A run that trained no sample raises TrainingError instead, having written no `end`
    line and saved nothing (the metrics file is closed): it did not succeed. The checks
    before a run refuse every setting known to lead there; this is the last guard.
    """
    if record.samples <= 0:
        metrics.close()
        raise TrainingError(_nothing_trained(record))
    end = metrics.write("end", **record.to_json())
    metrics.close()
    if cfg.save:
        save_model(cfg.save, model.params, model.layout, model.buffers, model.buffer_layout,
                   spec=model.spec.to_dict(), seed=cfg.seed, updates=record.updates)
    staleness = (f", staleness p50/p99/max {record.staleness_p50:g}/{record.staleness_p99:g}/"
                 f"{record.staleness_max:g}" if record.staleness_max is not None else "")
    progress.line(f"done: {record.samples:,} samples in {record.train_time_s:.1f} s of training "
                  f"({record.samples_per_s:,.0f} samples/s, {record.updates_per_s:,.1f} updates/s), "
                  f"test accuracy {100 * record.test_accuracy:.2f}%{staleness}"
                  + (f"; saved {cfg.save}" if cfg.save else ""))
    if record.busiest_link:
        progress.line(f"links: {record.bytes_per_sample:,.0f} bytes per sample; the busiest, "
                      f"{record.busiest_link}, at {100 * record.link_utilization:.0f}% of its rate")
    if record.host_bound:
        progress.line("host bound: more than 5% of the padded steps ran past their emulated "
                      "time, so these figures measure this host, not the emulated devices; "
                      "give a larger --compute-scale or fewer workers")
    return end


def _nothing_trained(record: EndRecord) -> str:
    """Why a run that trained 0 samples is refused, with what is known of the reason."""
    asked, dead = record.samples_asked, record.dead_workers or []
    known = (f" (asked for {asked:,})" if asked else "") + (
        f"; worker(s) {', '.join(map(str, dead))} were declared dead" if dead else "")
    return (f"the {record.mode} run ended having trained 0 samples{known}; no model saved and "
            "no end line written. Check --batch-size against the training set and --dead-after-s "
            "against --heartbeat-s; if both are sound, please report this with the command")
