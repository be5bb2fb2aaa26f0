"""The single-process trainer: the baseline every distributed mode is measured against.

One replica and one optimizer over the whole parameter vector. Per step:

    idx  = next batch of the epoch's permutation (downpour.common.data, seeded by (seed, epoch))
    loss = batch_gradient(model, x[idx], y[idx])      # grads hold dL/dparams, clipped
    optimizer.step(params, grads, schedule(t))        # t = updates applied so far

Every `eval_every` epochs the evaluator (downpour.common.evaluation) judges the
weights on the held-out split, writes an `eval` line and feeds reduce-on-plateau
and early stopping; at the end `finish` writes an `end` line with the final figures. `samples_per_s`
counts training time only (evaluation excluded); `elapsed_s` is wall time.
"""

from __future__ import annotations

import math
import time

import numpy as np

from downpour.common.config import Config
from downpour.common.data import gather, steps_per_epoch
from downpour.common.errors import DownpourError
from downpour.common.evaluation import Evaluator
from downpour.common.metrics import MetricsLog, Progress
from downpour.common.nn.model import Model
from downpour.common.nn.optim import make_optimizer
from downpour.common.nn.schedules import parse_schedule
from downpour.common.training import (
    batch_gradient,
    check_batches,
    finish,
    model_spec,
    open_datasets,
    worker_batches,
)


def train(cfg: Config, progress: Progress | None = None, metrics: MetricsLog | None = None) -> dict:
    """Train as `cfg` says; return the `end` record (also written to `metrics`)."""
    optimizer = make_optimizer(cfg.optimizer, **cfg.optimizer_kwargs())
    schedule = parse_schedule(cfg.lr_schedule, cfg.lr)
    train_set, test_set, about = open_datasets(cfg)
    check_batches(cfg, len(train_set))
    spec = model_spec(cfg, train_set)
    model = Model(spec, seed=cfg.seed)
    steps = steps_per_epoch(len(train_set), cfg.batch_size)
    total = steps * cfg.epochs
    eval_steps = max(1, round(cfg.eval_every * steps)) if cfg.eval_every > 0 else total
    progress = progress or Progress(total, cfg.progress)
    metrics = metrics or MetricsLog(cfg.metrics)
    # the replica trains its own batch-norm statistics: nothing to recalibrate
    evaluator = Evaluator(cfg, model, train_set, test_set, metrics, progress, schedule,
                          recalibrate=False)
    progress.line(f"{about}; model {spec.describe()} ({model.layout.size:,} parameters), "
                  f"{cfg.optimizer} lr {cfg.lr}, batch {cfg.batch_size}, {cfg.epochs} epochs")

    xb = np.empty((cfg.batch_size, train_set.n_features), np.float32)   # (B, D)
    yb = np.empty(cfg.batch_size, np.int64)                              # (B,)
    acc = np.empty_like(model.grads) if cfg.micro_batches > 1 else None
    start = time.perf_counter()
    loss_sum, step = 0.0, 0
    for epoch, idx in worker_batches(len(train_set), cfg, rank=0):
        gather(train_set.x, idx, out=xb)
        gather(train_set.y, idx, out=yb)
        loss = batch_gradient(model, xb, yb, cfg, acc)
        if not math.isfinite(loss):
            raise DownpourError(f"the training loss became {loss} at update {step}; "
                                "lower --lr or add --clip-norm")
        optimizer.step(model.params, model.grads, schedule(optimizer.t))
        step += 1
        loss_sum += loss
        progress.update(step, f"epoch {epoch + 1}/{cfg.epochs} loss {loss:.4f}")
        if step % eval_steps == 0 or step == total:
            evaluator.evaluate(epoch=step / steps, samples=step * cfg.batch_size, updates=step,
                               loss_sum=loss_sum, loss_count=step, lr=schedule(optimizer.t),
                               elapsed_s=time.perf_counter() - start)
            if evaluator.stopping:
                break
    elapsed = time.perf_counter() - start
    train_time = elapsed - evaluator.seconds              # evaluation excluded
    progress.close()

    samples, last = step * cfg.batch_size, evaluator.last
    return finish(
        cfg, model, metrics, progress, mode="single", workers=1, shards=0,
        elapsed_s=round(elapsed, 3), train_time_s=round(train_time, 3),
        epoch=round(step / steps, 4), samples=samples, updates=step,
        samples_per_s=samples / train_time, updates_per_s=step / train_time,
        train_loss=last.get("train_loss"), test_loss=last.get("test_loss"),
        test_accuracy=last.get("test_accuracy"), stopped_early=evaluator.stopping,
        parameters=model.layout.size, data=about)
