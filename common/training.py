"""Pieces every trainer shares: which data a run uses, the model it builds, how it ends.

The single-process trainer (worker/single.py) and, in a cluster, the scheduler and
workers call these, so a setting means the same thing in every mode.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import numpy as np

from downpour.common.checkpoint import save_model
from downpour.common.config import Config
from downpour.common.data import (
    SHIPPED_DATA_DIR,
    Dataset,
    batch_indices,
    epoch_permutation,
    find_mnist,
    load_mnist,
    partition,
    steps_per_epoch,
    synthetic_dataset,
)
from downpour.common.errors import ConfigError, TrainingError
from downpour.common.fileio import prepare_output
from downpour.common.metrics import MetricsLog, Progress
from downpour.common.nn.layerspec import parse as parse_layers
from downpour.common.nn.model import Model, ModelSpec
from downpour.common.nn.optim import clip_by_global_norm, clip_by_value


def open_datasets(cfg: Config) -> tuple[Dataset, Dataset, str]:
    """(train, test, a sentence saying what they are).

    `--synthetic N` asks for synthetic data. Otherwise MNIST splits `train_split` and
    `test_split` are read from the directory `downpour.common.data.find_mnist` picks:
    `--data-dir` (or $DOWNPOUR_DATA_DIR), which must hold both; else data/mnist if it
    holds both; else the digits shipped with downpour. DataError if none will do.
    """
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


def model_spec(cfg: Config, data: Dataset) -> ModelSpec:
    """The model the settings describe, sized for `data`."""
    return ModelSpec(n_inputs=data.n_features, n_outputs=data.n_classes, hidden=cfg.hidden,
                     activation=cfg.activation, init=cfg.init, dropout=cfg.dropout,
                     batchnorm=cfg.batchnorm, loss=cfg.loss, l1=cfg.l1, l2=cfg.l2,
                     layers=parse_layers(cfg.layers) if cfg.layers else (),
                     input_shape=cfg.input_shape)


def check_cluster(cfg: Config, n: int | None = None) -> None:
    """ConfigError for settings that contradict each other in a multi-worker run; with
    `n`, the training set's size, also for a batch that cannot be drawn (`check_batches`)."""
    if cfg.mode in ("sync", "ssp", "hogwild") and (cfg.n_fetch > 1 or cfg.n_push > 1 or cfg.overlap):
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
    sync           `sync_batch` for versions 0, 1, ... (with backup workers a worker
                   skips the versions it was too late for)
    """
    if cfg.mode == "sync":
        for version in range(sync_versions(n, cfg)):
            yield sync_batch(n, cfg, rank, version)
        return
    W, b = replicas(cfg), cfg.batch_size
    part = partition(n, W, rank)
    for epoch in range(cfg.epochs):
        order = epoch_permutation(n, cfg.seed, epoch)
        mine = order[(order >= part.start) & (order < part.stop)] if W > 1 else order
        for batch in batch_indices(mine, b):
            yield epoch, batch


def dealt(cfg: Config) -> bool:
    """Whether the run's workers draw chunks from the scheduler (async, ssp) rather than
    walk a partition (single, Hogwild!) or the versions' global batches (sync)."""
    return cfg.mode in ("async", "ssp")


def chunks_per_epoch(n: int, cfg: Config) -> int:
    """Chunks an epoch is cut into: its steps_per_epoch batches, chunk_batches at a time."""
    return -(-steps_per_epoch(n, cfg.batch_size) // cfg.chunk_batches)


def total_chunks(n: int, cfg: Config) -> int:
    return cfg.epochs * chunks_per_epoch(n, cfg)


def chunk_batches(n: int, cfg: Config, chunk: int) -> list[np.ndarray]:
    """The batches of chunk `chunk` (numbered across epochs): each (batch_size,) sample indices.

    Chunk j of epoch e is batches [j k, (j + 1) k) of epoch e's permutation (k =
    chunk_batches; the epoch's last chunk may be shorter), the very batches the
    single-process trainer takes, so one worker drawing every chunk in order takes
    exactly its steps.
    """
    per_epoch, b, k = chunks_per_epoch(n, cfg), cfg.batch_size, cfg.chunk_batches
    epoch, j = divmod(chunk, per_epoch)
    order = _epoch_order(n, cfg.seed, epoch)
    steps = range(j * k, min((j + 1) * k, steps_per_epoch(n, b)))
    return [order[s * b:(s + 1) * b] for s in steps]


def asked_samples(n: int, cfg: Config) -> int:
    """The samples a run is asked to train: every full batch of every epoch."""
    if cfg.mode == "sync":
        return sync_versions(n, cfg) * cfg.workers * cfg.batch_size
    return cfg.epochs * steps_per_epoch(n, cfg.batch_size) * cfg.batch_size


def epoch_steps(n: int, cfg: Config) -> tuple[int, int]:
    """(updates per epoch, samples per update) of the run as the single-process trainer
    counts them: sync makes one update of W*b samples per global batch, Hogwild! one step
    of b per batch of each worker's partition, the other modes (and single, with W = 1)
    one step of b samples per batch of the epoch. The `epoch` of every record is samples
    / (their product), so 1.0 is one whole pass of the batches asked."""
    if cfg.mode == "sync":
        return steps_per_epoch(n, cfg.workers * cfg.batch_size), cfg.workers * cfg.batch_size
    if cfg.mode == "hogwild":
        return sum(steps_per_epoch(len(partition(n, cfg.workers, r)), cfg.batch_size)
                   for r in range(cfg.workers)), cfg.batch_size
    return steps_per_epoch(n, cfg.batch_size), cfg.batch_size


def eval_interval(n: int, cfg: Config) -> int:
    """Samples between evaluations (0: none but the final one): eval_every epochs,
    rounded to whole updates as the single-process trainer rounds them, at least one."""
    if cfg.eval_every <= 0:
        return 0
    steps, per_step = epoch_steps(n, cfg)
    return max(1, round(cfg.eval_every * steps)) * per_step


def sync_versions(n: int, cfg: Config) -> int:
    """The versions a sync run makes: one per global batch of W*b, every epoch."""
    return cfg.epochs * steps_per_epoch(n, cfg.workers * cfg.batch_size)


def sync_batch(n: int, cfg: Config, rank: int, version: int) -> tuple[int, np.ndarray]:
    """(epoch, indices) worker `rank` computes for `version` in sync mode.

    Global batch `version` (W*b rows of its epoch's permutation) is split: worker i
    takes rows [i*b, (i+1)*b), so the mean of the W gradients is the gradient of
    the single-process batch of W*b.
    """
    W, b = cfg.workers, cfg.batch_size
    per_epoch = steps_per_epoch(n, W * b)
    epoch, j = divmod(version, per_epoch)
    lo = j * W * b + rank * b
    return epoch, _epoch_order(n, cfg.seed, epoch)[lo:lo + b]


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """epoch_permutation, kept (read-only) while sync steps take batches from it: one
    shuffle per epoch, not one per version."""
    order = epoch_permutation(n, seed, epoch)
    order.flags.writeable = False
    return order


def worker_steps(n: int, cfg: Config, rank: int) -> int:
    """How many steps worker `rank` takes in the whole run (the length of `worker_batches`)."""
    if cfg.mode == "sync":
        return sync_versions(n, cfg)
    return cfg.epochs * steps_per_epoch(len(partition(n, replicas(cfg), rank)), cfg.batch_size)


def batch_gradient(model: Model, x: np.ndarray, y: np.ndarray, cfg: Config,
                   acc: np.ndarray | None = None) -> float:
    """The mean loss of batch (x, y); `model.grads` then holds its gradient, clipped as `cfg` says.

    With cfg.micro_batches = k > 1 the batch is k equal micro-batches in row order,
    each a gradient of its own (clipped, as a worker clips before it pushes) summed
    in order into `acc` (a scratch vector like model.grads) and scaled by 1/k in the
    parameters' dtype: the very operations of a sync server averaging k workers'
    pushes (ps/piece.py PieceState._complete). So one process with k micro-batches of b
    makes, bit for bit, the updates of a sync run with k workers at batch b, which
    a plain batch of k*b does only up to rounding: the rows of a matrix product come
    out differently rounded in blocks of b than in one block of k*b, and Adam's first
    step (slope up to lr/eps where a gradient is near 0) or a ReLU whose input is
    near 0 can grow a last-bit difference to 1e-5 and beyond.
    """
    k = cfg.micro_batches
    if k == 1:
        loss = model.loss_and_grad(x, y)
        _clip(model.grads, cfg)
        return loss
    b, loss = len(x) // k, 0.0
    for i in range(k):
        loss += model.loss_and_grad(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b])
        _clip(model.grads, cfg)
        if i == 0:
            np.copyto(acc, model.grads)
        else:
            acc += model.grads
    acc *= acc.dtype.type(1.0 / k)
    np.copyto(model.grads, acc)
    return loss / k


def _clip(grads: np.ndarray, cfg: Config) -> None:
    if cfg.clip_value:
        clip_by_value(grads, cfg.clip_value)
    if cfg.clip_norm:
        clip_by_global_norm(grads, cfg.clip_norm)


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
           **end_fields: Any) -> dict[str, Any]:
    """The end of every run: the `end` metrics line, the saved model, the summary line.

    A run that trained no sample raises TrainingError instead, having written no `end`
    line and saved nothing (the metrics file is closed): it did not succeed. The checks
    before a run refuse every setting known to lead there; this is the last guard.
    """
    if end_fields.get("samples", 0) <= 0:
        metrics.close()
        raise TrainingError(_nothing_trained(end_fields))
    end = metrics.write("end", **end_fields)
    metrics.close()
    if cfg.save:
        save_model(cfg.save, model.params, model.layout, model.buffers, model.buffer_layout,
                   spec=model.spec.to_dict(), seed=cfg.seed, updates=end["updates"])
    staleness = (f", staleness p50/p99/max {end['staleness_p50']:g}/{end['staleness_p99']:g}/"
                 f"{end['staleness_max']:g}" if end.get("staleness_max") is not None else "")
    progress.line(f"done: {end['samples']:,} samples in {end['train_time_s']:.1f} s of training "
                  f"({end['samples_per_s']:,.0f} samples/s, {end['updates_per_s']:,.1f} updates/s), "
                  f"test accuracy {100 * end['test_accuracy']:.2f}%{staleness}"
                  + (f"; saved {cfg.save}" if cfg.save else ""))
    return end


def _nothing_trained(end_fields: dict[str, Any]) -> str:
    """Why a run that trained 0 samples is refused, with what is known of the reason."""
    mode, asked = end_fields.get("mode"), end_fields.get("samples_asked")
    dead = end_fields.get("dead_workers") or []
    known = (f" (asked for {asked:,})" if asked else "") + (
        f"; worker(s) {', '.join(map(str, dead))} were declared dead" if dead else "")
    run = f"the {mode} run" if mode else "the run"
    return (f"{run} ended having trained 0 samples{known}; no model saved and no end "
            "line written. Check --batch-size against the training set and --dead-after-s "
            "against --heartbeat-s; if both are sound, please report this with the command")
