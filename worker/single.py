"""The single-process trainer: the baseline every distributed mode is measured against.

One replica and one optimizer over the whole parameter vector. Per step:

    idx  = next batch of the epoch's permutation (downpour.common.order, seeded by (seed, epoch))
    loss = gradient.step(idx)                         # grads hold dL/dparams, clipped
    optimizer.step(params, grads, schedule(t))        # t = updates applied so far

Every `eval_every` epochs the evaluator (downpour.common.evaluation) judges the
weights on the held-out split, writes an `eval` line and feeds reduce-on-plateau
and early stopping; at the end `finish` writes an `end` line with the final figures. `samples_per_s`
counts training time only (evaluation excluded); `elapsed_s` is wall time.
"""

from __future__ import annotations

import time

from downpour.common.config import Config
from downpour.common.data import Dataset
from downpour.common.evaluation import Evaluator
from downpour.common.metrics import MetricsLog, Progress, end_record
from downpour.common.nn.model import Model
from downpour.common.nn.optim import Optimizer, make_optimizer
from downpour.common.nn.schedules import Schedule, parse_schedule
from downpour.common.order import epoch_samples, eval_interval, worker_batches, worker_steps
from downpour.common.step import GradientStep
from downpour.common.training import check_batches, finish, model_spec, open_datasets


def train(cfg: Config, progress: Progress | None = None, metrics: MetricsLog | None = None) -> dict:
    """Train as `cfg` says; return the `end` record (also written to `metrics`)."""
    optimizer = make_optimizer(cfg.optimizer, **cfg.optimizer_kwargs())
    schedule = parse_schedule(cfg.lr_schedule, cfg.lr)
    train_set, test_set, about = open_datasets(cfg)
    check_batches(cfg, len(train_set))
    spec = model_spec(cfg, train_set)
    model = Model(spec, seed=cfg.seed)
    progress = progress or Progress(worker_steps(len(train_set), cfg, rank=0), cfg.progress)
    metrics = metrics or MetricsLog(cfg.metrics)
    # the replica trains its own batch-norm statistics: nothing to recalibrate
    evaluator = Evaluator(cfg, model, train_set, test_set, metrics, progress, schedule,
                          recalibrate=False)
    progress.line(f"{about}; model {spec.describe()} ({model.layout.size:,} parameters), "
                  f"{cfg.optimizer} lr {cfg.lr}, batch {cfg.batch_size}, {cfg.epochs} epochs")

    start = time.perf_counter()
    updates = _steps(cfg, model, optimizer, schedule, train_set, evaluator, progress, start)
    elapsed = time.perf_counter() - start
    progress.close()
    return finish(cfg, model, metrics, progress, end_record(
        mode="single", workers=1, shards=0, parameters=model.layout.size, data=about,
        samples=updates * cfg.batch_size, updates=updates,
        epoch_samples=epoch_samples(len(train_set), cfg), elapsed_s=elapsed,
        train_time_s=elapsed - evaluator.seconds,           # evaluation excluded
        last_eval=evaluator.last, stopped_early=evaluator.stopping))


def _steps(cfg: Config, model: Model, optimizer: Optimizer, schedule: Schedule,
           train_set: Dataset, evaluator: Evaluator, progress: Progress, start: float) -> int:
    """Take every step of the run, evaluating every eval_every epochs and after the last
    step, until early stopping says stop; the updates made. `start`: perf_counter time
    of the first step."""
    n = len(train_set)
    total, per_epoch = worker_steps(n, cfg, rank=0), epoch_samples(n, cfg)
    every = eval_interval(n, cfg) // cfg.batch_size or total     # updates between evaluations
    gradient = GradientStep(cfg, model, train_set, "single process")
    loss_sum, step = 0.0, 0
    for epoch, idx in worker_batches(n, cfg, rank=0):
        loss = gradient.step(idx)
        optimizer.step(model.params, model.grads, schedule(optimizer.t))
        step += 1
        loss_sum += loss
        progress.update(step, f"epoch {epoch + 1}/{cfg.epochs} loss {loss:.4f}")
        if step % every == 0 or step == total:
            samples = step * cfg.batch_size
            evaluator.evaluate(epoch=samples / per_epoch, samples=samples, updates=step,
                               loss_sum=loss_sum, loss_count=step, lr=schedule(optimizer.t),
                               elapsed_s=time.perf_counter() - start)
            if evaluator.stopping:
                break
    return step
