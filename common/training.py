"""Pieces every trainer shares: which data a run uses, the model it builds, when it stops.

The single-process trainer (worker/single.py) and, in a cluster, the scheduler and
workers call these, so a setting means the same thing in every mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.config import Config
from typing import Iterator

import numpy as np

from common.data import (Dataset, batch_indices, default_data_dir, epoch_permutation, has_mnist,
                         load_mnist, partition, steps_per_epoch, synthetic_dataset)
from common.errors import ConfigError, DataError
from common.model import ModelSpec

SYNTHETIC_DEFAULT = 10_000       # training samples when no MNIST is found


def open_datasets(cfg: Config) -> tuple[Dataset, Dataset, str]:
    """(train, test, a sentence saying what they are).

    `--synthetic N` asks for synthetic data. An explicit `--data-dir` must hold the
    two splits (DataError otherwise). With neither, MNIST is read from the default
    data directory if it is there, else a synthetic dataset is used, and the
    sentence says so.
    """
    if cfg.synthetic:
        train, test = synthetic_dataset(cfg.synthetic, max(1, cfg.synthetic // 5), seed=cfg.seed)
        return train, test, f"synthetic data: {len(train)} training and {len(test)} held-out samples"
    data_dir = cfg.data_dir or str(default_data_dir())
    found = has_mnist(data_dir, cfg.train_split) and has_mnist(data_dir, cfg.test_split)
    if cfg.data_dir or found:
        if not found:
            missing = [s for s in (cfg.train_split, cfg.test_split) if not has_mnist(data_dir, s)]
            raise DataError(f"{data_dir!r} has no MNIST split {missing[0]!r} (expected "
                            f"{missing[0]}-images-idx3-ubyte.gz and {missing[0]}-labels-idx1-ubyte.gz); "
                            "point --data-dir at a directory holding them, set --train-split/"
                            "--test-split, or run `downpour download mnist --dir DIR`")
        train, test = load_mnist(data_dir, cfg.train_split, cfg.test_split)
        return train, test, (f"MNIST from {data_dir}: train on {cfg.train_split!r} ({len(train)}), "
                             f"hold out {cfg.test_split!r} ({len(test)})")
    train, test = synthetic_dataset(SYNTHETIC_DEFAULT, SYNTHETIC_DEFAULT // 5, seed=cfg.seed)
    return train, test, (f"no MNIST in {data_dir} (set --data-dir or run `downpour download "
                         f"mnist`): using synthetic data, {len(train)} training and "
                         f"{len(test)} held-out samples")


def model_spec(cfg: Config, data: Dataset) -> ModelSpec:
    """The model the settings describe, sized for `data`."""
    return ModelSpec(n_inputs=data.n_features, n_outputs=data.n_classes, hidden=cfg.hidden,
                     activation=cfg.activation, init=cfg.init, dropout=cfg.dropout,
                     batchnorm=cfg.batchnorm, loss=cfg.loss, l1=cfg.l1, l2=cfg.l2)


def check_cluster(cfg: Config) -> None:
    """ConfigError for settings that contradict each other in a cluster run."""
    if cfg.mode == "sync" and (cfg.n_fetch > 1 or cfg.n_push > 1 or cfg.overlap):
        raise ConfigError("sync mode pushes and pulls every step: n_fetch, n_push and overlap "
                          "are for async mode; drop them or use --mode async")
    if cfg.overlap and (cfg.n_fetch > 1 or cfg.n_push > 1):
        raise ConfigError("overlap works with n_fetch = n_push = 1 (a push_pull every step)")


def replicas(cfg: Config) -> int:
    """Workers in the run: one in single mode."""
    return 1 if cfg.mode == "single" else cfg.workers


def worker_batches(n: int, cfg: Config, rank: int) -> Iterator[tuple[int, np.ndarray]]:
    """(epoch, sample indices) of every step worker `rank` takes, in order.

    Every epoch starts from the same global permutation (seed, epoch) that the
    single-process trainer uses, so the modes see the data in comparable orders:

    single, async  the worker owns a contiguous partition of [0, n) and visits it in
                   the order the permutation lists its samples, in batches of b
                   (with one worker this is exactly the single-process order)
    sync           each global batch of W*b rows of the permutation is split:
                   worker i takes rows [i*b, (i+1)*b), so the mean of the W
                   gradients is the gradient of the single-process batch of W*b
    """
    W, b = replicas(cfg), cfg.batch_size
    part = partition(n, W, rank)
    for epoch in range(cfg.epochs):
        order = epoch_permutation(n, cfg.seed, epoch)
        if cfg.mode == "sync":
            for batch in batch_indices(order, W * b):
                yield epoch, batch[rank * b:(rank + 1) * b]
        else:
            mine = order[(order >= part.start) & (order < part.stop)] if W > 1 else order
            for batch in batch_indices(mine, b):
                yield epoch, batch


def worker_steps(n: int, cfg: Config, rank: int) -> int:
    """How many steps worker `rank` takes in the whole run (the length of `worker_batches`)."""
    W, b = replicas(cfg), cfg.batch_size
    if cfg.mode == "sync":
        return cfg.epochs * steps_per_epoch(n, W * b)
    return cfg.epochs * steps_per_epoch(len(partition(n, W, rank)), b)


@dataclass
class EarlyStopping:
    """Stop after `patience` evaluations in a row without a held-out loss below the best.

    patience 0 never stops. `observe(loss)` returns True when it is time to stop.
    """

    patience: int
    best: float = math.inf
    bad: int = 0

    def observe(self, loss: float) -> bool:
        if loss < self.best:
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
        return self.patience > 0 and self.bad >= self.patience
