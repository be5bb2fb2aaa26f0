"""The order of a run: which samples every step of every mode takes, and how many there are.

Everything here is a pure function of the training set's size n and the settings, so
every process that asks gets the same answer and the sample order never travels over
the wire. Epoch e's order is `epoch_permutation(n, seed, e)`; it is cut into full
batches of b (the incomplete rest is dropped, so every step has the same batch size):

    single       the batches of each epoch's order, in order
    async, ssp   the same batches, cut into chunks of k = chunk_batches, numbered across
                 epochs, that the scheduler deals to whoever asks (ps/ledger.py keeps the
                 account); one worker taking every chunk takes exactly the single steps
    hogwild      worker i walks its contiguous `partition` of range(n), in the order the
                 epoch's permutation lists those samples
    sync         version v is global batch v of W b rows; worker i takes rows
                 [i b, (i + 1) b), so the mean of the W gradients is the single
                 process's gradient of the W b batch

and the counts that follow from it: updates and samples of an epoch (`epoch_steps`,
`epoch_samples`, which every record's `epoch` divides by), the samples between
evaluation points (`eval_interval`), the samples a run is asked to train
(`asked_samples`), the steps of one worker (`worker_steps`), the chunks of a run
(`total_chunks`, `chunk_samples`).

Data streamed from a file (click logs, common/ctr.py) is never shuffled as a whole: the
file is cut into file chunks of k b lines (the last one shorter), and chunk j of epoch
e is file chunk `epoch_permutation(C - 1, seed, e)[j]` of the C, the short last one
kept last, its lines in a permutation of their own (`file_chunk_batches`). So the
chunks have the sizes `chunk_samples` gives, and the scheduler deals them as any
other's.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from downpour.common.config import Config
from downpour.common.errors import ConfigError, DataError

# ---------------------------------------------------------------------------- epochs and batches


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one epoch: int64 (n,), a permutation of range(n).

    Drawn from `np.random.default_rng([seed, epoch])`, so every process that asks
    with the same (n, seed, epoch) gets the same order, and each epoch differs.
    """
    for name, value in (("n", n), ("seed", seed), ("epoch", epoch)):
        if int(value) != value or value < 0:
            raise ConfigError(f"epoch_permutation: {name}={value!r}, expected an integer >= 0")
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64, copy=False)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches of `batch_size` in `n` samples (the incomplete rest is dropped)."""
    _check_batch_size(batch_size)
    return n // batch_size


def batch_indices(order: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive full batches of `order`, each an int64 (batch_size,) view.

    The last incomplete batch is dropped: every step then has the same batch size,
    which keeps synchronous data-parallel training with W workers exactly
    equivalent to single-process training with batch W * batch_size.
    """
    _check_batch_size(batch_size)
    for step in range(len(order) // batch_size):
        yield order[step * batch_size:(step + 1) * batch_size]


def _check_batch_size(batch_size: int) -> None:
    if int(batch_size) != batch_size or batch_size < 1:
        raise ConfigError(f"batch size {batch_size!r} is invalid, expected an integer >= 1")


def partition(n: int, n_parts: int, part: int) -> range:
    """The contiguous share of range(n) owned by part `part` of `n_parts`.

    The parts tile range(n) in order; the first n % n_parts parts get one extra
    sample, so sizes differ by at most one (as `np.array_split`). Raises
    ConfigError for a bad n_parts or part, DataError if n < n_parts (a part
    would be empty).
    """
    if int(n_parts) != n_parts or n_parts < 1:
        raise ConfigError(f"partition: n_parts={n_parts!r}, expected an integer >= 1")
    if int(part) != part or not 0 <= part < n_parts:
        raise ConfigError(f"partition: part={part!r}, expected an integer in 0..{n_parts - 1}")
    if n < n_parts:
        raise DataError(f"cannot split {n} samples into {n_parts} non-empty parts; "
                        f"use at most {n} workers or a larger dataset")
    size, extra = divmod(n, n_parts)
    lo = part * size + min(part, extra)
    return range(lo, lo + size + (part < extra))


@functools.lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """epoch_permutation, kept (read-only) while chunks or sync steps take batches from it:
    one shuffle per epoch, not one per chunk or version."""
    order = epoch_permutation(n, seed, epoch)
    order.flags.writeable = False
    return order


# ---------------------------------------------------------------------------- who takes what


def replicas(cfg: Config) -> int:
    """Workers in the run: one in single mode."""
    return 1 if cfg.mode == "single" else cfg.workers


def deals_chunks(cfg: Config) -> bool:
    """Whether the run's workers draw chunks from the scheduler (async, ssp) rather than
    walk a partition (single, Hogwild!) or the versions' global batches (sync)."""
    return cfg.mode in ("async", "ssp", "hybrid")


def worker_batches(n: int, cfg: Config, rank: int) -> Iterator[tuple[int, np.ndarray]]:
    """(epoch, sample indices) of every step worker `rank` takes, in order, in the modes
    that walk their data (the others draw chunks: `chunk_batches`).

    single, hogwild  the worker's `partition` of range(n) (all of it in single mode), in
                     the order the epoch's permutation lists its samples, in batches of b
    sync             `sync_batch` for versions 0, 1, ... (with backup workers a worker
                     skips the versions it was too late for: worker/replica.py)
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


def worker_steps(n: int, cfg: Config, rank: int) -> int:
    """How many steps worker `rank` takes in the whole run (the length of `worker_batches`)."""
    if cfg.mode == "sync":
        return sync_versions(n, cfg)
    return cfg.epochs * steps_per_epoch(len(partition(n, replicas(cfg), rank)), cfg.batch_size)


# ---------------------------------------------------------------------------- chunks (async, ssp)


def chunks_per_epoch(n: int, cfg: Config) -> int:
    """Chunks an epoch is cut into: its steps_per_epoch batches, chunk_batches at a time."""
    return -(-steps_per_epoch(n, cfg.batch_size) // cfg.chunk_batches)


def total_chunks(n: int, cfg: Config) -> int:
    """Chunks of the whole run, numbered 0 .. total-1 across epochs."""
    return cfg.epochs * chunks_per_epoch(n, cfg)


def _chunk_steps(n: int, cfg: Config, chunk: int) -> tuple[int, range]:
    """(epoch, its batch numbers) of chunk `chunk`: batches [j k, (j + 1) k) of epoch e for
    chunk j of epoch e (k = chunk_batches; the epoch's last chunk may be shorter)."""
    epoch, j = divmod(chunk, chunks_per_epoch(n, cfg))
    k = cfg.chunk_batches
    return epoch, range(j * k, min((j + 1) * k, steps_per_epoch(n, cfg.batch_size)))


def chunk_batches(n: int, cfg: Config, chunk: int) -> list[np.ndarray]:
    """The batches of chunk `chunk` (numbered across epochs): each (batch_size,) sample indices.

    They are the very batches the single-process trainer takes at those steps, so one
    worker drawing every chunk in order takes exactly its steps.
    """
    epoch, steps = _chunk_steps(n, cfg, chunk)
    order, b = _epoch_order(n, cfg.seed, epoch), cfg.batch_size
    return [order[s * b:(s + 1) * b] for s in steps]


def chunk_samples(n: int, cfg: Config, chunk: int) -> int:
    """The samples of chunk `chunk`: len(chunk_batches(n, cfg, chunk)) x batch_size, without
    drawing the order."""
    return len(_chunk_steps(n, cfg, chunk)[1]) * cfg.batch_size


def file_chunk(n: int, cfg: Config, chunk: int) -> tuple[int, int]:
    """(epoch, the file chunk it reads) of chunk `chunk` of a streamed file of n lines."""
    epoch, j = divmod(chunk, chunks_per_epoch(n, cfg))
    last = chunks_per_epoch(n, cfg) - 1
    return epoch, j if j == last else int(_epoch_order(last, cfg.seed, epoch)[j])


def file_chunk_batches(n: int, cfg: Config, chunk: int, lines: int) -> list[np.ndarray]:
    """The batches of chunk `chunk` of a streamed file: (batch_size,) line numbers within
    its file chunk of `lines` lines, in a permutation drawn from the seed, the epoch and
    the file chunk; as many batches as `chunk_samples` counts."""
    epoch, fc = file_chunk(n, cfg, chunk)
    b, k = cfg.batch_size, len(_chunk_steps(n, cfg, chunk)[1])
    if lines < k * b:
        raise DataError(f"file chunk {fc} has {lines} lines, fewer than the {k * b} of its "
                        f"{k} batches: the file changed since it was indexed")
    order = np.random.default_rng([cfg.seed, epoch, fc, 0x0F11E]).permutation(lines)
    return [order[i * b:(i + 1) * b] for i in range(k)]


# ---------------------------------------------------------------------------- versions (sync)


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


# ---------------------------------------------------------------------------- counts of a run


def epoch_steps(n: int, cfg: Config) -> tuple[int, int]:
    """(updates per epoch, samples per update) of the run as the single-process trainer
    counts them: sync makes one update of W*b samples per global batch, Hogwild! one step
    of b per batch of each worker's partition, the other modes (and single, with W = 1)
    one step of b samples per batch of the epoch."""
    if cfg.mode == "sync":
        return steps_per_epoch(n, cfg.workers * cfg.batch_size), cfg.workers * cfg.batch_size
    if cfg.mode == "hogwild":
        return sum(steps_per_epoch(len(partition(n, cfg.workers, r)), cfg.batch_size)
                   for r in range(cfg.workers)), cfg.batch_size
    return steps_per_epoch(n, cfg.batch_size), cfg.batch_size


def epoch_samples(n: int, cfg: Config) -> int:
    """The samples of one epoch: every whole batch of it (the product of `epoch_steps`).
    The `epoch` of every metrics record is samples / this, so 1.0 is one whole pass of
    the batches asked."""
    steps, per_step = epoch_steps(n, cfg)
    return steps * per_step


def eval_interval(n: int, cfg: Config) -> int:
    """Samples between evaluations (0: none but the final one): eval_every epochs,
    rounded to whole updates as the single-process trainer rounds them, at least one."""
    if cfg.eval_every <= 0:
        return 0
    steps, per_step = epoch_steps(n, cfg)
    return max(1, round(cfg.eval_every * steps)) * per_step


def asked_samples(n: int, cfg: Config) -> int:
    """The samples a run is asked to train: every full batch of every epoch."""
    if cfg.mode == "sync":
        return sync_versions(n, cfg) * cfg.workers * cfg.batch_size
    return cfg.epochs * steps_per_epoch(n, cfg.batch_size) * cfg.batch_size
