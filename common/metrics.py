"""What a run reports: JSON-lines metrics for machines, a progress bar and lines for people.

Metrics file: one JSON object per line, flushed as it is written, so a crashed or
interrupted run leaves every complete line readable. Every line has `event` and
`time` (Unix seconds); the events and their fields are

    eval   elapsed_s, epoch, samples, updates, train_loss, test_loss, test_accuracy, lr
    end    the final figures: the eval fields plus samples_per_s, train_time_s, ...

What an `eval` record promises, in every mode:

- It describes the weights it evaluated: `samples` is the number of samples whose
  gradients those weights contain, `updates` the updates applied to them, `epoch`
  = samples / (the samples of one epoch: every whole batch of the training split,
  W x b per update in sync mode), `elapsed_s` the moment the weights had that state
  (seconds since training started), and `train_loss` the mean training loss of the
  samples added since the previous record. In a cluster the servers keep a copy of
  their weights at each evaluation point (ps/piece.py, snapshots) and the scheduler
  evaluates those copies, so training going on meanwhile changes nothing. The
  figures come from one piece: the one furthest behind (pieces apply asynchronous
  pushes in their own order; in sync mode they agree).
- Evaluations fall at the cadence asked: the k-th at k x eval_every epochs rounded
  to whole updates (training.eval_interval), or at the first update past it; so
  never more than one update late (W x b samples in sync mode, n_push x b in async).
  A point whose copy a server no longer holds (it was replaced, or evaluation fell
  SNAPSHOTS_KEPT points behind) is skipped with a line saying so, never evaluated
  on other weights. The last record is the final state of the run.
- In sync mode without backup workers, samples = updates x W x b in every record
  (a version is one global batch). Hogwild! is the exception by design: it
  evaluates shared weights that the other processes keep writing, lock-free, so its
  records count the samples as the evaluating process saw them, and its epoch is
  samples / n.
- The `end` record's `samples` are those the workers trained (with backup workers,
  late gradients are trained but dropped, so they may exceed the last eval's).
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

from downpour.common.errors import ConfigError


class MetricsLog:
    """Appends JSON lines to `path`; with an empty path it only records them in `events`."""

    def __init__(self, path: str = ""):
        self.events: list[dict[str, Any]] = []
        self._file: IO[str] | None = None
        if path:
            try:
                self._file = open(path, "w", encoding="utf-8")
            except OSError as e:
                raise ConfigError(f"cannot write metrics to {path!r}: {e.strerror}") from None

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        self.events.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(eval lines, end line or None) of a metrics file."""
    evals, end = [], None
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record["event"] == "eval":
                evals.append(record)
            elif record["event"] == "end":
                end = record
    return evals, end


class Progress:
    """A one-line bar redrawn in place on a terminal, or plain lines elsewhere.

    mode: "auto" (a bar when `stream` is a terminal, else lines), "bar", "lines"
    or "none". `update(done, text)` moves the bar (at most ~10 redraws a second);
    `line(text)` prints a line that stays, in every mode but "none".
    """

    WIDTH = 28

    def __init__(self, total: int, mode: str = "auto", stream: IO[str] | None = None):
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode, self.total = mode, max(1, total)
        self._last_draw = 0.0
        self._drawn = False

    def update(self, done: int, text: str = "") -> None:
        if self.mode != "bar":
            return
        now = time.monotonic()
        if now - self._last_draw < 0.1 and done < self.total:
            return
        self._last_draw = now
        frac = min(1.0, done / self.total)
        filled = int(frac * self.WIDTH)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.stream.write(f"\r[{bar}] {100 * frac:5.1f}% {text}\x1b[K")
        self.stream.flush()
        self._drawn = True

    def line(self, text: str) -> None:
        if self.mode == "none":
            return
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
