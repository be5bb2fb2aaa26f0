"""The gradient step every trainer takes: the single process, each Hogwild! process and
each worker replica. What follows it (an optimizer step, a push) is the trainer's own.

    idx (B,) sample indices
      -> gather        x (B, D) float32, y (B,) int64, into buffers made once
      -> gradient      batch_gradient: the mean loss; model.grads holds its gradient,
                       clipped as the settings say (per micro-batch)
      -> padding       an emulated slower device: with --compute-scale F (and, for the
                       worker --slow-worker RANK:K names, K on top) the step sleeps until
                       it has taken F x K x the CPU time of its compute
      -> finite check  a loss that is not finite is a DownpourError naming who and the step

Padding is measured against CPU time, not wall time, so an oversubscribed host (more
workers than cores) does not inflate its own padding: W workers padded to F x their
compute need W / F cores. When they do not have them, a step's compute alone takes
longer than its emulated time and the padding cannot be kept. Padding keeps time
over the steps, not only within each: a sleep that ended late (a busy host wakes a
sleeper milliseconds late) is made up by the next step's shorter sleep, and the time
still owed after a step (at most one step's) is carried on. A step whose compute and
the time owed before it exceed its emulated time by more than OVER_SLACK is counted
(`over`: it could not be padded and fell behind), and the run's end record says
`host_bound` when more than HOST_BOUND_SHARE of the steps were.
Every step adds to `times`: compute (wall s), padding (s slept) and CPU (s).

One process with k micro-batches of b computes, bit for bit, the gradient a sync
server averages from k workers at batch b (`batch_gradient`), which is what lets the
tests hold sync mode to the single-process trainer exactly.
"""

from __future__ import annotations

import math
import time

import numpy as np

from downpour.common.config import Config
from downpour.common.data import Dataset, gather
from downpour.common.errors import DownpourError
from downpour.common.nn.model import Model
from downpour.common.nn.optim import clip_by_global_norm, clip_by_value

OVER_SLACK = 0.05          # a step this fraction past its emulated time, unpadded, fell behind
HOST_BOUND_SHARE = 0.05    # more than this share of padded steps not kept: the host was the bound


class StepTimes:
    """What the steps took, summed: `compute_s` (wall s of the gradients), `padding_s` (s
    slept to emulate a slower device), `cpu_s` (CPU s of the gradients), and `over`
    (padded steps whose wall time exceeded their emulated time)."""

    def __init__(self):
        self.compute_s = self.padding_s = self.cpu_s = 0.0
        self.over = 0


def emulated_scale(cfg: Config, rank: int) -> float:
    """How many times its compute's CPU time a step of worker `rank` takes: --compute-scale,
    times --slow-worker's factor for the worker it names (1: no padding)."""
    slow_rank, slow = cfg.slowdown
    return cfg.compute_scale * (slow if rank == slow_rank else 1.0)


def host_bound(steps: float, over: float, padded: bool) -> bool | None:
    """Whether the padding of `steps` padded steps could not be kept (`over` of them were
    late); None when no padding was asked, so none could fail."""
    return None if not padded else over > HOST_BOUND_SHARE * steps


class GradientStep:
    """`step(idx)`: the loss of the batch `idx` of `data`; `model.grads` then holds its gradient.

    Nothing is allocated per step: the (B, D) and (B,) batch buffers and, with
    micro-batches, the scratch vector are made here. `who` names the trainer in errors
    ("worker-1"); `rank` is its worker rank, which --slow-worker may name. `taken` counts
    the steps computed so far, so an error names the step (0-based) it happened at.
    """

    def __init__(self, cfg: Config, model: Model, data: Dataset, who: str, rank: int = 0):
        self.cfg, self.model, self.data, self.who = cfg, model, data, who
        self.taken = 0                                                      # steps computed
        self._x = np.empty((cfg.batch_size, data.n_features), np.float32)  # (B, D)
        self._y = np.empty(cfg.batch_size, np.int64)                        # (B,)
        self._micro = np.empty_like(model.grads) if cfg.micro_batches > 1 else None
        self.scale = emulated_scale(cfg, rank)        # a step's wall s / its compute's CPU s
        # CPU time of this thread: exact with one BLAS thread; with more, the process's
        self._cpu = time.thread_time if cfg.threads == 1 else time.process_time
        self.times = StepTimes()
        self._late = 0.0        # s the padded steps so far ended past their emulated time

    def step(self, idx: np.ndarray) -> float:
        """The mean loss of batch `idx` ((B,) int64 rows of `data`); its gradient is left in
        model.grads. DownpourError if the loss is not finite."""
        t0, c0 = time.perf_counter(), self._cpu()
        gather(self.data.x, idx, out=self._x)
        gather(self.data.y, idx, out=self._y)
        loss = batch_gradient(self.model, self._x, self._y, self.cfg, self._micro)
        t1, cpu = time.perf_counter(), self._cpu() - c0
        times = self.times
        times.compute_s += t1 - t0
        times.cpu_s += cpu
        if self.scale > 1.0:                  # an emulated slower device
            emulated = self.scale * cpu
            if (owed := emulated - (t1 - t0) - self._late) > 0:
                time.sleep(owed)
            t2 = time.perf_counter()
            times.padding_s += t2 - t1
            self._late = min(emulated, max(0.0, t2 - t0 - emulated + self._late))
            times.over += owed < -OVER_SLACK * emulated
        if not math.isfinite(loss):
            raise DownpourError(f"{self.who}: the training loss became {loss} at step "
                                f"{self.taken}; lower --lr or add --clip-norm")
        self.taken += 1
        return loss


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
