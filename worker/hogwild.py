"""Hogwild! (Recht et al. 2011): W local processes update one weight vector without locks.

No servers and no messages: the parameters, the optimizer's state and a table of
progress counters live in shared memory. Each worker process takes its partition
of the data (as an async worker does), computes a gradient on the weights as they
are at that moment, and applies its optimizer step to the shared vector in place,
racing with the others: an element may be read while another process writes it.
Each process counts its own optimizer steps (Adam's bias correction); the moment
estimates are shared. The parent process evaluates the shared weights every
`eval_every` epochs and writes the same metrics as the other modes; it is a
baseline for one machine, not a distributed mode.

Evaluation points: the worker whose step takes the run's samples to the next point
(order.eval_interval) copies the shared weights, with the progress totals and
the time, into a shared snapshot under a lock (taken only then, and by the parent
to read it); the parent evaluates that copy, so a record's epoch, samples and
updates are those of the weights it judged, up to the steps other processes had
half-applied during the copy (Hogwild! has no consistent moment). A point whose
snapshot the parent has not read when the next one is due gives way to it.
"""

from __future__ import annotations

import math
import multiprocessing
import signal
import time
from multiprocessing import shared_memory
from typing import Callable

import numpy as np

from downpour.common.config import Config
from downpour.common.data import Dataset
from downpour.common.errors import ClusterError
from downpour.common.evaluation import Evaluator
from downpour.common.metrics import EndRecord, MetricsLog, Progress, end_record
from downpour.common.nn.model import Model, ModelSpec
from downpour.common.nn.optim import make_optimizer
from downpour.common.nn.schedules import Schedule, parse_schedule
from downpour.common.order import epoch_samples, eval_interval, worker_batches, worker_steps
from downpour.common.step import GradientStep, emulated_scale, host_bound
from downpour.common.training import check_cluster, finish, model_spec, open_datasets

# the progress table: one float64 row per worker
SAMPLES, STEPS, LOSS_SUM, LOSS_COUNT, DONE, STOP, T_START, T_END, STEPS_OVER = range(9)
COLUMNS = 9
# the snapshot record: the next point (samples), whether a snapshot waits, and its totals
NEXT, READY, SNAP_SAMPLES, SNAP_STEPS, SNAP_LOSS_SUM, SNAP_LOSS_COUNT, SNAP_TIME = range(7)
RECORD = 7
POLL_S = 0.05                # how often the parent looks at the progress table
LOCK_TIMEOUT_S = 10.0        # for the snapshot lock: a copy of the weights takes milliseconds
JOIN_TIMEOUT_S = 10.0        # for a finished process to exit
TERMINATE_TIMEOUT_S = 5.0    # for a terminated process to go


class Shared:
    """Named shared-memory blocks holding float32 vectors or a float64 table."""

    def __init__(self, names: dict[str, str] | None = None, sizes: dict[str, tuple] | None = None):
        self.blocks: dict[str, shared_memory.SharedMemory] = {}
        self.arrays: dict[str, np.ndarray] = {}
        for key, (shape, dtype) in (sizes or {}).items():
            nbytes = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
            self.blocks[key] = shared_memory.SharedMemory(create=True, size=nbytes)
            self.arrays[key] = np.ndarray(shape, dtype, self.blocks[key].buf)
        for key, (name, shape, dtype) in (names or {}).items():
            self.blocks[key] = shared_memory.SharedMemory(name=name)
            self.arrays[key] = np.ndarray(shape, dtype, self.blocks[key].buf)

    def describe(self) -> dict[str, tuple]:
        """What another process needs to attach: {key: (name, shape, dtype)}."""
        return {k: (self.blocks[k].name, a.shape, a.dtype.str) for k, a in self.arrays.items()}

    def close(self, unlink: bool = False) -> None:
        self.arrays.clear()
        for block in self.blocks.values():
            block.close()
            if unlink:
                block.unlink()
        self.blocks.clear()


def _work(cfg: Config, spec: ModelSpec, rank: int, blocks: dict[str, tuple], lock) -> None:
    """One Hogwild! process: train on this rank's partition against the shared vector."""
    shared = Shared(names=blocks)
    try:
        train_set, _, _ = open_datasets(cfg)
        every = eval_interval(len(train_set), cfg)
        table = shared.arrays["progress"][rank]
        model = Model(spec, seed=cfg.seed, stream=rank, params=shared.arrays["params"])
        opt = make_optimizer(cfg.optimizer, **cfg.optimizer_kwargs())
        opt.adopt_state([shared.arrays[f"state{i}"] for i in range(len(opt.state_names))],
                        initialise=False)
        schedule = parse_schedule(cfg.lr_schedule, cfg.lr)
        gradient = GradientStep(cfg, model, train_set, f"hogwild worker {rank}", rank)
        table[T_START] = time.time()
        for _, idx in worker_batches(len(train_set), cfg, rank):
            if shared.arrays["progress"][:, STOP].any():
                break
            loss = gradient.step(idx)
            opt.step(model.params, model.grads, schedule(opt.t) * float(shared.arrays["scale"][0]))
            table[SAMPLES] += len(idx)
            table[STEPS] += 1
            table[LOSS_SUM] += loss
            table[LOSS_COUNT] += 1
            table[STEPS_OVER] = gradient.times.over
            if every and shared.arrays["progress"][:, SAMPLES].sum() >= shared.arrays["record"][NEXT]:
                _snapshot(shared, every, lock)
        table[T_END] = time.time()
    finally:
        shared.arrays["progress"][rank, DONE] = 1
        shared.close()


def _snapshot(shared: Shared, every: int, lock) -> None:
    """Copy the shared weights and totals as the evaluation point just reached (if no
    other process did first), and set the next point."""
    if not lock.acquire(timeout=LOCK_TIMEOUT_S):
        raise ClusterError(f"a hogwild worker waited {LOCK_TIMEOUT_S:g} s for the snapshot lock")
    try:
        record, totals = shared.arrays["record"], shared.arrays["progress"].sum(axis=0)
        if totals[SAMPLES] < record[NEXT]:
            return
        np.copyto(shared.arrays["snapshot"], shared.arrays["params"])
        record[SNAP_SAMPLES:SNAP_TIME] = totals[[SAMPLES, STEPS, LOSS_SUM, LOSS_COUNT]]
        record[SNAP_TIME], record[READY] = time.time(), 1
        record[NEXT] = (totals[SAMPLES] // every + 1) * every
    finally:
        lock.release()


def train(cfg: Config, progress: Progress | None = None, metrics: MetricsLog | None = None) -> dict:
    """Run Hogwild! with cfg.workers processes; return the `end` record."""
    train_set, test_set, about = open_datasets(cfg)
    check_cluster(cfg, len(train_set))
    spec = model_spec(cfg, train_set)
    W = cfg.workers
    probe = make_optimizer(cfg.optimizer, **cfg.optimizer_kwargs())    # validates early
    model = Model(spec, seed=cfg.seed)
    size = model.layout.size
    sizes = {"params": ((size,), np.float32), "progress": ((W, COLUMNS), np.float64),
             "scale": ((1,), np.float64),            # scale: reduce-on-plateau's factor
             "snapshot": ((size,), np.float32), "record": ((RECORD,), np.float64)}
    sizes.update({f"state{i}": ((size,), np.float32) for i in range(len(probe.state_names))})
    shared = Shared(sizes=sizes)
    try:
        shared.arrays["params"][:] = model.params
        shared.arrays["progress"][:] = 0
        shared.arrays["scale"][0] = 1.0
        shared.arrays["record"][:] = 0
        shared.arrays["record"][NEXT] = eval_interval(len(train_set), cfg) or math.inf
        probe.adopt_state([shared.arrays[f"state{i}"] for i in range(len(probe.state_names))],
                          initialise=True)
        return _run(cfg, spec, model, shared, train_set, test_set, about, progress, metrics)
    finally:
        shared.close(unlink=True)


def _run(cfg: Config, spec: ModelSpec, model: Model, shared: Shared, train_set: Dataset,
         test_set: Dataset, about: str, progress: Progress | None,
         metrics: MetricsLog | None) -> dict:
    """Start the W processes, watch and evaluate them until they are done, report."""
    W, n = cfg.workers, len(train_set)
    progress = progress or Progress(sum(worker_steps(n, cfg, r) for r in range(W)) * cfg.batch_size,
                                    cfg.progress)
    metrics = metrics or MetricsLog(cfg.metrics)
    table, record = shared.arrays["progress"], shared.arrays["record"]
    progress.line(f"{about}; hogwild mode, {W} process(es) on one shared vector, model "
                  f"{model.layout.size:,} parameters")
    ctx = multiprocessing.get_context("spawn")
    lock = ctx.Lock()                         # the snapshot's: see `_snapshot`
    procs = [ctx.Process(target=_work, args=(cfg, spec, r, shared.describe(), lock), daemon=True)
             for r in range(W)]
    points = _Points(model, shared, lock, epoch_samples(n, cfg), Evaluator(
        cfg, model, train_set, test_set, metrics, progress, parse_schedule(cfg.lr_schedule, cfg.lr),
        recalibrate=True, on_lr_scale=lambda s: shared.arrays["scale"].__setitem__(0, s)))
    _start(procs)
    try:
        _watch(procs, table, record, progress, points.evaluate)
        train_time = _train_time(table, points.start)
        _join(procs)
        points.finish()
    finally:
        _end(procs)
        progress.close()
    return finish(cfg, model, metrics, progress, _end_record(cfg, model, table, points, about,
                                                              train_time))


class _Points:
    """The parent's evaluations: the snapshots the workers leave at each evaluation point,
    and the final weights. `start`: the run's start (Unix seconds), made with it."""

    def __init__(self, model: Model, shared: Shared, lock, epoch_samples: int,
                 evaluator: Evaluator):
        self.model, self.shared, self.lock, self.evaluator = model, shared, lock, evaluator
        self.epoch_samples = epoch_samples            # `epoch` = samples / it
        self.schedule: Schedule = evaluator.schedule
        self.start = time.time()

    def evaluate(self, snapshot: bool) -> None:
        """Evaluate the snapshot waiting in the record or, without, the shared weights now;
        once early stopping fires, tell every process to stop."""
        arrays = self.shared.arrays
        table, record = arrays["progress"], arrays["record"]
        if snapshot:
            if not self.lock.acquire(timeout=LOCK_TIMEOUT_S):
                raise ClusterError(f"the snapshot lock was held for {LOCK_TIMEOUT_S:g} s")
            try:
                np.copyto(self.model.params, arrays["snapshot"])
                samples, steps, loss_sum, loss_count, at = record[SNAP_SAMPLES:SNAP_TIME + 1]
                record[READY] = 0
            finally:
                self.lock.release()
        else:
            np.copyto(self.model.params, arrays["params"])
            samples, steps, loss_sum, loss_count = table[:, [SAMPLES, STEPS, LOSS_SUM, LOSS_COUNT]].sum(0)
            at = time.time()
        self.evaluator.evaluate(epoch=samples / self.epoch_samples, samples=int(samples),
                                updates=int(steps), loss_sum=loss_sum, loss_count=loss_count,
                                lr=self.schedule(0) * arrays["scale"][0], elapsed_s=at - self.start)
        if self.evaluator.stopping:
            table[:, STOP] = 1

    def finish(self) -> None:
        """Evaluate the last snapshot left, then the final weights unless just judged."""
        table, record = self.shared.arrays["progress"], self.shared.arrays["record"]
        if record[READY]:
            self.evaluate(snapshot=True)
        if self.evaluator.last.get("samples") != int(table[:, SAMPLES].sum()):
            self.evaluate(snapshot=False)


def _end_record(cfg: Config, model: Model, table: np.ndarray, points: _Points, about: str,
                train_time: float) -> EndRecord:
    """The run's `end` record: no servers and no messages, so no bytes and no staleness."""
    return end_record(
        mode="hogwild", workers=cfg.workers, shards=0, parameters=model.layout.size, data=about,
        samples=int(table[:, SAMPLES].sum()), updates=int(table[:, STEPS].sum()),
        epoch_samples=points.epoch_samples, elapsed_s=time.time() - points.start,
        train_time_s=train_time, last_eval=points.evaluator.last,
        stopped_early=bool(table[:, STOP].any()), bytes=0, bytes_per_s=0.0,
        staleness_p50=None, staleness_p99=None, staleness_max=None,
        host_bound=host_bound(*_padded_steps(cfg, table)))


def _padded_steps(cfg: Config, table: np.ndarray) -> tuple[int, int, bool]:
    """(steps of the processes whose steps were padded, how many of them ran late, whether
    any were padded): for `host_bound`."""
    padded = [r for r in range(len(table)) if emulated_scale(cfg, r) > 1.0]
    return int(table[padded, STEPS].sum()), int(table[padded, STEPS_OVER].sum()), bool(padded)


def _train_time(table: np.ndarray, start: float) -> float:
    """s from the first process's first step to the last one's last (since `start`, Unix
    seconds, if none stepped)."""
    ran = table[table[:, T_START] > 0]
    return (ran[:, T_END].max() - ran[:, T_START].min()) if len(ran) else time.time() - start


def _start(procs: list) -> None:
    """Start the processes, ignoring SIGINT. Ctrl-C is this process's to handle: the
    children ignore SIGINT (inherited, and kept by the interpreters they start), and are
    ended by SIGTERM in _end."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for p in procs:
            p.start()
    finally:
        signal.signal(signal.SIGINT, previous)


def _join(procs: list) -> None:
    """Wait for the finished processes to exit; ClusterError for one that failed."""
    for p in procs:
        p.join(timeout=JOIN_TIMEOUT_S)
        if p.exitcode not in (0, None):
            raise ClusterError(f"a hogwild worker exited with status {p.exitcode}")


def _watch(procs: list, table: np.ndarray, record: np.ndarray, progress: Progress,
           evaluate: Callable[[bool], None]) -> None:
    """Until every process is done: fail on a dead one, move the bar, evaluate each
    snapshot a process leaves in `record`."""
    while not all(table[:, DONE]):
        for r, p in enumerate(procs):
            if not p.is_alive() and not table[r, DONE]:
                raise ClusterError(f"hogwild worker {r} died (exit {p.exitcode})")
        samples = int(table[:, SAMPLES].sum())
        progress.update(samples, f"{samples:,} samples")
        if record[READY]:
            evaluate(True)
        time.sleep(POLL_S)


def _end(procs: list) -> None:
    """Terminate whatever is still running."""
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=TERMINATE_TIMEOUT_S)
