"""What a run reports: JSON-lines metrics for machines, a progress bar and lines for people.

Metrics file: one JSON object per line, flushed as it is written, so a crashed or
interrupted run leaves every complete line readable. Every line has `event` and
`time` (Unix seconds). There are two events:

    eval   one per evaluation point (common/evaluation.py writes it):
             elapsed_s      s since training started, at the moment the weights judged
                            had their state
             epoch          samples / the samples of one epoch (order.epoch_samples), to 1e-4
             samples        samples whose gradients the weights judged contain
             updates        updates applied to those weights
             train_loss     mean training loss of the samples added since the previous
                            record (null when none were)
             test_loss      mean loss on the held-out split
             test_accuracy  fraction of the held-out split classified right, 0..1
             lr             the learning rate then (after reduce-on-plateau's scale)
           and in async, sync and ssp the servers' figures so far: updates_per_s,
           bytes_per_s, bytes, staleness_p50, staleness_p99, staleness_max,
           staleness_hist, clock_gap_max, clock_gap_hist, dropped (as in `end`)
    end    the last line of a run that trained: `EndRecord` below, one comment per
           field with its unit. A field is written only by the modes its `modes` names
           (none named: every mode); a mode that does not have it leaves it out, except
           hogwild's staleness, written as null (it has no pushes to measure).

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
  to whole updates (order.eval_interval), or at the first update past it; so
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
from dataclasses import dataclass, field, fields
from typing import IO, Any

from downpour.common.config import CLUSTER, REPLICAS
from downpour.common.errors import ConfigError

DEALT = ("async", "ssp", "hybrid")                  # the modes whose workers draw chunks (order.deals_chunks)
TIME_DECIMALS = 3                         # the end record's times are written to the ms,
EPOCH_DECIMALS = 4                        # its epoch to 1e-4 (as the eval records' are)


def _only(modes: tuple[str, ...]) -> Any:
    """A field of the `end` record that only `modes` write (None until given)."""
    return field(default=None, metadata={"modes": modes})


SPARSE_FIGURES = ("test_logloss", "test_auc", "table_rows", "table_bytes", "row_staleness_p50",
                  "row_staleness_p99", "row_staleness_max")      # from the eval record


def _sparse():
    """A field of the `end` record that only runs of sparse models write."""
    return field(default=None, metadata={"sparse": True})


@dataclass(frozen=True, kw_only=True)
class EndRecord:
    """The `end` metrics line: a run's final figures. Built by `end_record`; `to_json` gives
    the fields its mode writes, in this order."""

    run_id: str | None = _only(CLUSTER)              # the run's id (hex), as said first
    mode: str                                        # single, async, sync, ssp or hogwild
    workers: int                                     # worker replicas (1 in single mode)
    shards: int                                      # server processes (0: single, hogwild)
    batch_size: int | None = _only(CLUSTER)          # samples per worker step (b)
    elapsed_s: float                                 # s, training's wall time, evaluations in
    train_time_s: float                              # s, first step of any worker to last step
    #                                                  of any (single: elapsed_s less evaluations)
    epoch: float                                     # samples / the samples of one epoch
    samples: int                                     # samples whose gradients workers computed
    updates: int                                     # updates applied to the final weights
    samples_per_s: float                             # samples / train_time_s
    train_loss: float | None                         # the last eval record's (its mean since
    test_loss: float | None                          # the one before), held-out loss and
    test_accuracy: float | None                      # accuracy (0..1): the final weights
    stopped_early: bool                              # early stopping ended the run
    dead_workers: list[int] | None = _only(CLUSTER)  # ranks declared dead during the run
    parameters: int                                  # elements of the flat parameter vector
    data: str                                        # the training and held-out data, in words
    samples_asked: int | None = _only(CLUSTER)       # every full batch of every epoch
    worker_samples: dict[str, int] | None = _only(CLUSTER)  # rank -> samples it trained
    #                                                  (earlier incarnations in); sum = samples
    chunk_batches: int | None = _only(DEALT)         # batches per chunk
    chunks: int | None = _only(DEALT)                # chunks the epochs were cut into
    chunks_lost: int | None = _only(DEALT)           # chunks whose worker died training them
    samples_lost: int | None = _only(DEALT)          # their samples (some steps may have applied)
    chunks_left: int | None = _only(DEALT)           # never finished (on the table, in a hand)
    samples_left: int | None = _only(DEALT)          # their samples
    updates_per_s: float                             # updates / train_time_s (a cluster: piece
    #                                                  0's version / train_time_s)
    bytes_per_s: float | None = _only(REPLICAS)      # bytes / train_time_s (hogwild: 0)
    bytes: int | None = _only(REPLICAS)              # bytes into and out of the servers
    staleness_p50: float | None = _only(REPLICAS)    # staleness in versions (a piece's version
    staleness_p99: float | None = _only(REPLICAS)    # at apply time minus the push's) over every
    staleness_max: float | None = _only(REPLICAS)    # push and piece; hogwild: null, no pushes
    staleness_hist: dict[str, int] | None = _only(CLUSTER)  # staleness -> pushes x pieces
    clock_gap_max: int | None = _only(CLUSTER)       # clocks: the widest ssp gap (0 elsewhere)
    clock_gap_hist: dict[str, int] | None = _only(CLUSTER)  # clock gap -> pushes x pieces
    dropped: int | None = _only(CLUSTER)             # sync pushes too late for their version
    bytes_per_sample: float | None = _only(CLUSTER)  # bytes / samples, the sum of:
    bytes_pushed_per_sample: float | None = _only(CLUSTER)  # what the servers received
    bytes_pulled_per_sample: float | None = _only(CLUSTER)  # what they sent (every reply)
    push_compression: float | None = _only(CLUSTER)  # pushes' float32 bytes / bytes sent
    pull_compression: float | None = _only(CLUSTER)  # parameter replies' float32 bytes /
    #                                                  their payload (1: no codec)
    link_utilization: float | None = _only(CLUSTER)  # the busiest link's bits/s over its rate,
    busiest_link: str | None = _only(CLUSTER)        # 0..1, and which ("server-0 download");
    #                                                  null without --link
    host_bound: bool | None = _only(REPLICAS)        # > 5% of padded steps (--compute-scale,
    #                                                  --slow-worker) outran their emulated
    #                                                  time; null: none padded (common/step.py)
    nodes: dict[str, dict[str, float]] | None = _only(CLUSTER)  # per node: bytes_sent,
    #                                                  bytes_received; workers: steps, steps_over
    #                                                  and s compute_s, padding_s, waiting_s,
    #                                                  cpu_s; servers: busy_s (s answering)
    test_logloss: float | None = _sparse()          # sparse models (--model): the final
    test_auc: float | None = _sparse()              # weights' held-out logloss and AUC,
    table_rows: int | None = _sparse()              # rows in all servers' tables, and their
    table_bytes: int | None = _sparse()             # bytes (rows, optimizer state, index)
    row_staleness_p50: float | None = _sparse()     # pushes of other workers that reached a
    row_staleness_p99: float | None = _sparse()     # row between a worker's pull of it and
    row_staleness_max: float | None = _sparse()     # its push, over every row pushed

    def to_json(self) -> dict[str, Any]:
        """The fields this record's mode writes, by name, in declaration order: every field
        that names no modes, and those that name this one."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if ("modes" not in f.metadata or self.mode in f.metadata["modes"])
                and not (f.metadata.get("sparse") and getattr(self, f.name) is None)}


def end_record(*, mode: str, workers: int, shards: int, parameters: int, data: str,
               samples: int, updates: int, epoch_samples: int, elapsed_s: float,
               train_time_s: float, last_eval: dict[str, Any], stopped_early: bool,
               updates_per_s: float | None = None, **only_some_modes: Any) -> EndRecord:
    """The `end` record of a run from its raw totals, the one place one is made.

    Times (s) are rounded to TIME_DECIMALS and the epoch (samples / `epoch_samples`) to
    EPOCH_DECIMALS; rates are per second of `train_time_s`, unrounded: samples_per_s =
    samples / train_time_s, and updates_per_s likewise unless given (a cluster gives the
    servers' count). The losses and accuracy are those of `last_eval`, the last eval
    record ({} if there was none). `only_some_modes`: the fields only some modes write
    (EndRecord); an unknown one is a TypeError.
    """
    return EndRecord(
        mode=mode, workers=workers, shards=shards, parameters=parameters, data=data,
        elapsed_s=round(elapsed_s, TIME_DECIMALS), train_time_s=round(train_time_s, TIME_DECIMALS),
        epoch=round(samples / epoch_samples, EPOCH_DECIMALS), samples=samples, updates=updates,
        samples_per_s=samples / train_time_s,
        updates_per_s=updates / train_time_s if updates_per_s is None else updates_per_s,
        train_loss=last_eval.get("train_loss"), test_loss=last_eval.get("test_loss"),
        test_accuracy=last_eval.get("test_accuracy"), stopped_early=stopped_early,
        **{k: last_eval[k] for k in SPARSE_FIGURES if k in last_eval},
        **only_some_modes)


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
