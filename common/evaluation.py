"""One evaluator for every trainer: the single process, Hogwild! and the scheduler.

Each of them hands the weights to judge to `Evaluator.evaluate` with its running
totals; the evaluator owns the rest of the bookkeeping, so an `eval` line means the
same thing in every mode:

    batch-norm   recomputed from training batches when the weights came from elsewhere
                 (`recalibrate`: pulled from servers, read from shared memory)
    train_loss   the mean training loss since the previous evaluation, from the
                 caller's cumulative (loss sum, loss count)
    eval line    one metrics record and one progress line
    plateau      the held-out loss feeds the learning-rate schedule; when its scale
                 changes, `on_lr_scale(scale)` tells whoever applies the updates
    early stop   `EarlyStopping` on the held-out loss; once it fires, `stopping` is
                 True and later evaluations only report (the run is winding down)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

from downpour.common.config import Config
from downpour.common.data import Dataset
from downpour.common.metrics import MetricsLog, Progress
from downpour.common.nn.model import Model
from downpour.common.nn.schedules import Schedule


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


class Evaluator:
    """Evaluations of `model` on the held-out split, and what follows from them."""

    def __init__(self, cfg: Config, model: Model, train: Dataset, test: Dataset,
                 metrics: MetricsLog, progress: Progress, schedule: Schedule, recalibrate: bool,
                 on_lr_scale: Callable[[float], None] | None = None,
                 judge: Callable[[], tuple[float, float, dict[str, Any]]] | None = None):
        """`judge`: how the held-out split is scored, (test loss, test accuracy, more
        fields for the record); default `model.evaluate` on test.x and test.y (a sparse
        model's scheduler judges with its tables: ps/scheduler.py)."""
        self.cfg, self.model, self.train, self.test = cfg, model, train, test
        self.metrics, self.progress, self.schedule = metrics, progress, schedule
        self.recalibrate = recalibrate and model.has_batchnorm
        self.on_lr_scale = on_lr_scale
        self.judge = judge or (lambda: (*self.model.evaluate(self.test.x, self.test.y), {}))
        self.stopper = EarlyStopping(cfg.patience)
        self.stopping = False                     # early stopping has fired
        self.last: dict[str, Any] = {}            # the latest eval record
        self.seconds = 0.0                        # wall time spent evaluating
        self._losses = (0.0, 0)                   # (loss sum, loss count) at the last evaluation

    def evaluate(self, *, epoch: float, samples: int, updates: int, loss_sum: float,
                 loss_count: int, lr: float, elapsed_s: float, note: str = "",
                 **extra: Any) -> dict[str, Any]:
        """Evaluate `model.params` as they are now; write and return the `eval` record.

        `loss_sum` and `loss_count` are the run's cumulative training-loss totals;
        `extra` fields join the record, `note` the progress line.
        """
        t0 = time.perf_counter()
        if self.recalibrate:
            self.model.calibrate_batchnorm(self.train.x, self.cfg.batch_size)
        test_loss, test_acc, more = self.judge()
        s0, c0 = self._losses
        self._losses = (loss_sum, loss_count)
        train_loss = (loss_sum - s0) / (loss_count - c0) if loss_count > c0 else None
        record = self.metrics.write(
            "eval", elapsed_s=round(elapsed_s, 3), epoch=round(epoch, 4), samples=samples,
            updates=updates, train_loss=train_loss, test_loss=test_loss,
            test_accuracy=test_acc, lr=lr, **more, **extra)
        shown = f"{train_loss:.4f}" if train_loss is not None else "-"
        self.progress.line(f"epoch {epoch:6.2f}  updates {updates:6d}  train loss {shown}  "
                           f"test loss {test_loss:.4f}  test accuracy {100 * test_acc:.2f}%{note}")
        if not self.stopping:
            self._observe(test_loss)
        self.last = record
        self.seconds += time.perf_counter() - t0
        return record

    def _observe(self, test_loss: float) -> None:
        if self.schedule.observe(test_loss):
            if self.on_lr_scale is not None:
                self.on_lr_scale(self.schedule.scale)
            self.progress.line(f"reduce-on-plateau: learning rate x{self.schedule.scale:g}")
        if self.stopper.observe(test_loss):
            self.stopping = True
            self.progress.line(f"early stop: no lower held-out loss in {self.cfg.patience} "
                               "evaluations")
