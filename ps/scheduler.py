"""The scheduler: the cluster's well-known address, and its conductor.

Who is in the cluster (registration, heartbeats, liveness, replacements) is kept by
`Membership` (ps/membership.py); evaluation, plateau and early stopping by the
`Evaluator` every trainer shares (downpour.common.evaluation). This module runs the
three phases:

1. Assemble. Servers and workers register, in any order. Server i gets rank i and
   its shard range at once; workers get their rank and the server addresses once
   all S servers are in. The cluster spec a node receives (Membership._spec) holds
   the run's id, settings, the model, the pieces (each server's shard cut into
   pieces: Layout.pieces), the server addresses and eval_samples, the samples
   between evaluation points (order.eval_interval).
   The run id is random, made at start and said in the first line; checkpoints
   carry it, so a restarted server continues this run's and never an earlier
   run's. Whoever is still missing after start_timeout_s is named in a ClusterError.
2. Train. Heartbeats carry each worker's progress. A node silent for dead_after_s
   is dead: in sync and ssp modes the servers are told the live workers
   (`_tell_live_workers`), so a sync version completes without the dead one and
   no ssp worker waits for its clock; in async mode the run goes on regardless. A
   server that dies may be replaced: the next server to register takes its rank
   (and, with --resume, its checkpoint), and workers follow the new address.
   Every eval_every epochs' worth of samples the servers keep a copy of their
   weights (an evaluation point: ps/piece.py); once every server's heartbeat says it
   holds point k, the scheduler pulls those copies, evaluates them on the held-out
   split, writes an `eval` metrics line of that moment (common/metrics.py), feeds
   reduce-on-plateau (telling the servers the new lr scale) and early stopping
   (telling the workers to stop), and orders checkpoints every checkpoint_every_s.
3. Finish. When every live worker is done: the evaluation points not yet
   evaluated, a final evaluation (unless the last point is the final state), the
   `end` line, the saved model, and a shutdown for every server.

Batch-norm running statistics are not communicated: before evaluating, the
scheduler recomputes them from training batches with the pulled weights
(Model.calibrate_batchnorm), so they always match the weights they serve.
"""

from __future__ import annotations

import functools
import secrets
import signal
import time
from typing import Any

import numpy as np
import zmq

from downpour.common import config
from downpour.common.config import Config, parse_rate
from downpour.common.ctr import auc, logloss
from downpour.common.errors import TrainingError
from downpour.common.evaluation import Evaluator
from downpour.common.fileio import atomic_write
from downpour.common.metrics import TIME_DECIMALS, EndRecord, MetricsLog, Progress, end_record
from downpour.common.nn.model import Model
from downpour.common.nn.schedules import parse_schedule
from downpour.common.nn.sparse import CtrModel, bias_index, dedup
from downpour.common.order import (
    asked_samples,
    chunk_samples,
    deals_chunks,
    epoch_samples,
    eval_interval,
    total_chunks,
)
from downpour.common.step import emulated_scale, host_bound
from downpour.common.training import check_cluster, finish, model_spec, open_datasets
from downpour.common.wire import address, protocol
from downpour.common.wire.client import ShardClient, TableClient
from downpour.common.wire.security import Keys, guard
from downpour.common.wire.sockets import bind_router
from downpour.ps.ledger import Ledger
from downpour.ps.membership import Membership

DEFAULT_BIND = "tcp://*:5555"           # with keys: every interface (CurveZMQ admits the cluster)
LOOPBACK_BIND = "tcp://127.0.0.1:5555"  # without keys: this host only (protected mode)
TICK_MS = 100                 # the longest the conductor waits for a message between its checks
RUN_ID_BYTES = 8              # a run id is this many random bytes, in hex
EVAL_LINES = 8192             # held-out lines a sparse model's evaluation scores at once
TABLE = 0                     # the table of lr and fm
WORKER_TIMES = ("compute_s", "padding_s", "waiting_s", "cpu_s")   # a worker's s, in the end record


def percentile(hist: dict[int, int], q: float) -> float:
    """The q-quantile (0..1) of a histogram {value: count}; 0 for an empty one."""
    total = sum(hist.values())
    if not total:
        return 0.0
    seen = 0
    for value in sorted(hist):
        seen += hist[value]
        if seen >= q * total:
            return float(value)
    return float(max(hist))


def merged(hists) -> dict[int, int]:
    """One histogram {value: count} of several, whose values may be strings (msgpack's)."""
    out: dict[int, int] = {}
    for hist in hists:
        for k, v in hist.items():
            out[int(k)] = out.get(int(k), 0) + v
    return out


class Scheduler:
    def __init__(self, cfg: Config, sock: zmq.Socket, ctx: zmq.Context, keys: Keys | None = None):
        self.cfg, self.ctx, self.keys = cfg, ctx, keys
        self.run_id = secrets.token_hex(RUN_ID_BYTES)
        self.train, self.test, self.about = open_datasets(cfg)
        check_cluster(cfg, len(self.train))
        self.spec = model_spec(cfg, self.train)
        self.model = Model(self.spec, seed=cfg.seed)
        self.pieces = self.model.layout.pieces(cfg.shards, cfg.piece_elements, spare=bool(cfg.model))
        self.metrics = MetricsLog(cfg.metrics)
        n = len(self.train)
        self.asked = asked_samples(n, cfg)
        self.progress = Progress(self.asked, cfg.progress)
        self.schedule = parse_schedule(cfg.lr_schedule, cfg.lr)
        self.evaluator = Evaluator(cfg, self.model, self.train, self.test, self.metrics,
                                   self.progress, self.schedule, recalibrate=True,
                                   on_lr_scale=self._tell_lr_scale,
                                   judge=self._judge_sparse if cfg.model else None)
        self.nodes = Membership(cfg, sock, {
            "run_id": self.run_id, "config": config.to_dict(cfg), "model": self.spec.to_dict(),
            "pieces": [list(p) for p in self.pieces], "n_train": len(self.train),
            # tables keep no snapshots: a sparse model is judged once, at the end
            "eval_samples": 0 if cfg.model else eval_interval(n, cfg)},
            log=self.progress.line)
        # async, ssp: the chunks of every epoch, dealt to workers as they ask
        self.ledger = Ledger(total_chunks(n, cfg), functools.partial(chunk_samples, n, cfg)) \
            if deals_chunks(cfg) else None
        if self.ledger is not None:
            self.nodes.on_next_chunk = self._deal
            self.nodes.on_worker_dead = self._worker_died
        self.client: ShardClient | None = None
        self.tables: TableClient | None = None      # a sparse model's: evaluation, stats
        self.interrupted = False
        self.start = time.monotonic()               # reset when training starts
        self.start_wall = time.time()               # the same moment in Unix seconds
        self.epoch_samples = epoch_samples(n, cfg)  # `epoch` = samples / it
        self._point = 0                             # the last evaluation point evaluated
        self._stats: list[dict] = []                # the servers' last `stats` replies
        self._table_stats: list[dict] = []          # a sparse model's: each server's table

    # -- the three phases ------------------------------------------------------------------
    def run(self, listening: str = "") -> dict[str, Any]:
        """Assemble, train, finish; the `end` record. `listening`: where the scheduler
        listens, in words, said first (`main`)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._interrupt)
        self.progress.line(f"run {self.run_id}: " + (f"{listening}; " if listening else "")
                           + f"{self.about}; {self.cfg.mode} mode, "
                           f"{self.cfg.workers} worker(s), {self.cfg.shards} shard(s), "
                           f"model {self.model.layout.size:,} parameters; "
                           + ("CurveZMQ, the cluster's keys only" if self.keys else "no keys: plain sockets"))
        self.nodes.assemble(lambda: self.interrupted, self.cfg.start_timeout_s, TICK_MS)
        servers = self.nodes.addresses()
        self.client = ShardClient([servers[p.server] for p in self.pieces],
                                  [(p.lo, p.hi) for p in self.pieces], "scheduler",
                                  self.cfg.timeout_s, self.cfg.retries, self.ctx,
                                  while_waiting=self.nodes.tend, keys=self.keys)
        self.nodes.on_server_moved = self._follow_server
        if self.cfg.model:
            self.tables = TableClient(servers, "scheduler", CtrModel(self.cfg.model,
                                      self.cfg.embed_dim).dim, self.cfg.timeout_s,
                                      self.cfg.retries, self.ctx, keys=self.keys,
                                      while_waiting=self.nodes.tend)
        try:
            try:
                end = self._train()
            except TrainingError:                   # the servers answer: end them too
                self._shut_down()
                raise
            self._shut_down()
        finally:
            self.client.close()
            if self.tables is not None:
                self.tables.close()
            self.metrics.close()
            self.progress.close()
        return end

    def _train(self) -> dict[str, Any]:
        cfg = self.cfg
        last_checkpoint = time.monotonic()
        self.start, self.start_wall = time.monotonic(), time.time()
        while True:
            if self.interrupted:
                raise KeyboardInterrupt
            self.nodes.tend(TICK_MS)
            self._tell_live_workers()
            samples = int(self.nodes.total("samples"))
            self.progress.update(samples, f"{samples:,} samples")
            if self.nodes.all_done():
                break
            self._evaluate_points(self.nodes.snapshots(), at_most=1)
            if cfg.checkpoint_every_s and time.monotonic() - last_checkpoint >= cfg.checkpoint_every_s:
                self._checkpoint()
                last_checkpoint = time.monotonic()
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        """The evaluation points not yet evaluated, the final evaluation (unless the last
        point is the final state), and the `end` record."""
        train_time = self._train_time()
        self._stats = stats = self.client.call_all("stats")   # every point passed, heartbeats or not
        if self.tables is not None:
            self._table_stats = self.tables.stats(TABLE)
        self._evaluate_points(set.intersection(*(set(s["meta"]["snapshots"]) for s in stats)))
        final = {"samples": min(s["meta"]["samples"] for s in stats),
                 "updates": min(s["meta"]["version"] for s in stats)}
        last = self.evaluator.last
        if {k: last.get(k) for k in final} != final:
            last = self._evaluate()
        return finish(self.cfg, self.model, self.metrics, self.progress,
                      self._end_record(last, train_time))

    def _end_record(self, last: dict[str, Any], train_time: float) -> EndRecord:
        """The `end` record: the workers' samples, the final weights' updates and figures
        (`last`, their eval record), the servers' traffic and staleness, and in async and
        ssp the account of the chunks."""
        cfg, figures = self.cfg, self._figures(self._stats, train_time)
        return end_record(
            mode=cfg.mode, workers=cfg.workers, shards=cfg.shards,
            parameters=self.model.layout.size, data=self.about,
            samples=int(self.nodes.total("samples")), updates=last["updates"],
            epoch_samples=self.epoch_samples, elapsed_s=time.monotonic() - self.start,
            train_time_s=train_time, last_eval=last, stopped_early=self.evaluator.stopping,
            run_id=self.run_id, batch_size=cfg.batch_size, dead_workers=self.nodes.dead_workers(),
            samples_asked=self.asked, worker_samples=self.nodes.worker_samples(),
            **self._dealing(), **figures, **self._traffic(figures["bytes"], train_time))

    def _traffic(self, moved: int, train_time: float) -> dict[str, Any]:
        """The end record's account of each node (EndRecord.nodes), the bytes per sample,
        the busiest link (with --link) and whether the host kept the workers' padding."""
        cfg, counters = self.cfg, self.nodes.worker_counters()
        nodes: dict[str, dict[str, Any]] = {"scheduler": {
            "bytes_sent": self.client.bytes_sent, "bytes_received": self.client.bytes_received}}
        for piece, s in zip(self.pieces, self._stats):
            server = nodes.setdefault(f"server-{piece.server}",
                                      {"bytes_sent": 0, "bytes_received": 0, "busy_s": 0.0})
            server["bytes_sent"] += s["meta"]["bytes_out"]
            server["bytes_received"] += s["meta"]["bytes_in"]
            server["busy_s"] = round(server["busy_s"] + s["meta"].get("busy_s", 0.0), TIME_DECIMALS)
        for rank, t in enumerate(self._table_stats):                   # sparse models' rows
            server = nodes.setdefault(f"server-{rank}",
                                      {"bytes_sent": 0, "bytes_received": 0, "busy_s": 0.0})
            server["bytes_sent"] += t["bytes_out"]
            server["bytes_received"] += t["bytes_in"]
            server["busy_s"] = round(server["busy_s"] + t["busy_s"], TIME_DECIMALS)
        for rank, c in counters.items():
            nodes[f"worker-{rank}"] = {
                **{k: int(c[k]) for k in ("bytes_sent", "bytes_received", "steps", "steps_over")},
                **{k: round(c[k], TIME_DECIMALS) for k in WORKER_TIMES}}
        padded = [r for r in counters if emulated_scale(cfg, r) > 1.0]
        utilization, busiest = busiest_link(cfg, nodes, train_time)
        samples = max(1, self.nodes.total("samples"))
        total = {k: sum(st["meta"].get(k, 0) for st in self._stats)
                 for k in ("bytes_in", "bytes_out", "raw_in", "raw_out", "payload_out")}
        rows_in, rows_out = (sum(t[k] for t in self._table_stats) for k in ("bytes_in", "bytes_out"))
        for k, v in (("bytes_in", rows_in), ("raw_in", rows_in), ("bytes_out", rows_out),
                     ("raw_out", rows_out), ("payload_out", rows_out)):
            total[k] += v                                   # rows travel uncompressed
        return {"nodes": nodes, "bytes_per_sample": moved / samples,
                "bytes_pushed_per_sample": total["bytes_in"] / samples,
                "bytes_pulled_per_sample": total["bytes_out"] / samples,
                "push_compression": total["raw_in"] / max(1, total["bytes_in"]),
                "pull_compression": total["raw_out"] / max(1, total["payload_out"]),
                "link_utilization": utilization, "busiest_link": busiest,
                "host_bound": host_bound(sum(counters[r]["steps"] for r in padded),
                                         sum(counters[r]["steps_over"] for r in padded),
                                         bool(padded))}

    def _shut_down(self) -> None:
        """Tell every server the run is over, and every node still waiting for a place."""
        self.client.call_all("shutdown")
        if self.tables is not None:                 # a server may hold tables only
            self.tables.shutdown(TABLE)
        self.nodes.dismiss_waiting()

    # -- dealing (async, ssp) ---------------------------------------------------------------
    def _deal(self, rank: int, header: dict) -> dict[str, Any]:
        meta = header.get("meta", {})
        return self.ledger.request(rank, header["seq"], meta.get("done"), meta.get("want"),
                                   live=len(self.nodes.live_workers()))

    def _worker_died(self, rank: int) -> None:
        lost = self.ledger.drop(rank)
        if lost:
            self.progress.line(f"worker-{rank} died training chunk {lost[0]}: "
                               f"{self.ledger.samples_of(lost[0])} samples lost; its other "
                               "chunks go back on the table")

    def _dealing(self) -> dict[str, Any]:
        """The end record's account of the chunks (EndRecord's chunk fields): their size,
        how many were lost or left; none outside async and ssp."""
        if self.ledger is None:
            return {}
        left = self.ledger.left()
        return {"chunk_batches": self.cfg.chunk_batches, "chunks": self.ledger.total,
                "chunks_lost": len(self.ledger.lost), "samples_lost": self.ledger.samples_lost(),
                "chunks_left": len(left),
                "samples_left": sum(self.ledger.samples_of(c) for c in left)}

    def _train_time(self) -> float:
        """Training time: from the first worker's first step to the last worker's last."""
        ran = [p for p in self.nodes.worker_progress() if p.get("t_start")]
        if not ran:
            return time.monotonic() - self.start
        return max(p.get("t_end") or time.time() for p in ran) - min(p["t_start"] for p in ran)

    # -- what the servers are told ------------------------------------------------------------
    def _tell_live_workers(self) -> None:
        """Sync and ssp servers wait for the live workers only: tell them when that changes."""
        if not self.nodes.live_changed:
            return
        self.nodes.live_changed = False
        if self.cfg.mode in ("sync", "ssp", "hybrid"):
            self.client.call_all("control", {"live": self.nodes.live_workers()})

    def _tell_lr_scale(self, scale: float) -> None:
        self.client.call_all("control", {"lr_scale": scale})

    def _follow_server(self, rank: int, addr: str) -> None:
        """A replacement took server `rank`'s place: its pieces and tables are now at `addr`."""
        for i, piece in enumerate(self.pieces):
            if piece.server == rank:
                self.client.reconnect(i, addr)
        if self.tables is not None:
            self.tables.reconnect(rank, addr)

    def _checkpoint(self) -> None:
        """Order every server to checkpoint its pieces and its tables (servers without a
        checkpoint dir decline)."""
        calls = [functools.partial(self.client.call, i, "checkpoint") for i in range(len(self.pieces))]
        if self.tables is not None:
            calls += [functools.partial(self.tables.call, [s], "checkpoint", TABLE)
                      for s in range(self.cfg.shards)]
        for call in calls:
            try:
                call()
            except protocol.RemoteError as e:
                if e.code != protocol.E_STATE:
                    raise

    # -- evaluation ------------------------------------------------------------------------
    def _evaluate_points(self, held: set[int], at_most: int | None = None) -> None:
        """Evaluate, in order, the evaluation points after the last one evaluated that every
        server holds a snapshot of (`held`); at most `at_most` of them. A point a server no
        longer holds (it was replaced, or evaluations fell SNAPSHOTS_KEPT behind) is
        skipped and said, never evaluated on other weights."""
        for point in sorted(k for k in held if k > self._point)[:at_most]:
            self._point = point
            try:
                self._evaluate(point)
            except protocol.RemoteError as e:
                if e.code != protocol.E_STATE:
                    raise
                self.progress.line(f"evaluation point {point} skipped: {e}")

    def _evaluate(self, point: int | None = None) -> dict[str, Any]:
        """Evaluate the weights of evaluation point `point` (the servers' snapshots of it)
        or, without one, the weights as they are now; early stopping tells the workers to
        stop. The record's epoch, samples, updates and elapsed_s are those of the weights
        evaluated, and train_loss the mean training loss of the samples applied since the
        previous record; all of one piece, the one furthest behind (in sync mode the
        pieces agree)."""
        replies = self.client.pull_replies(self.model.params, point)
        self._stats = self.client.call_all("stats")
        figures = self._figures(self._stats, time.monotonic() - self.start)
        # one piece's account: the piece furthest behind (in sync mode they all agree)
        first = min(replies, key=lambda r: r.get("meta", {}).get("samples", 0))
        meta, updates = first.get("meta", {}), first.get("clock", 0)
        samples, loss_sum = meta.get("samples", 0), meta.get("loss_sum", 0.0)
        taken = meta["time"] if point is not None else time.time()
        record = self.evaluator.evaluate(
            epoch=samples / self.epoch_samples, samples=samples, updates=updates,
            loss_sum=loss_sum, loss_count=samples,       # train_loss: the mean per sample
            lr=self._stats[0]["meta"]["lr"], elapsed_s=max(0.0, taken - self.start_wall),
            note=f"  staleness p99 {figures['staleness_p99']:g}", **figures)
        self.nodes.stopping = self.evaluator.stopping
        return record

    def _judge_sparse(self) -> tuple[float, float, dict[str, Any]]:
        """A sparse model's held-out figures: every line of the test split scored with the
        weights as they are (evaluation pulls: no row is created or counted), and the
        tables' size. (logloss, accuracy at 0.5, {test_logloss, test_auc, table_rows,
        table_bytes})."""
        ctr, bias = CtrModel(self.cfg.model, self.cfg.embed_dim), \
            float(self.model.params[bias_index(self.model)])
        p, y = [], []
        for chunk in range(self.test.chunks):
            batch = self.test.read(chunk)
            for lo in range(0, len(batch.labels), EVAL_LINES):
                bags = dedup(batch.keys[lo:lo + EVAL_LINES])
                rows = self.tables.pull(TABLE, bags.uniq, train=False)
                p.append(ctr.predict(rows, bags, bias))
            y.append(batch.labels)
        probs, labels = np.concatenate(p), np.concatenate(y)
        loss = logloss(labels, probs)
        stats = self._table_stats = self.tables.stats(TABLE)
        stale = merged(s.get("row_staleness", {}) for s in stats)
        return loss, float(np.mean((probs > 0.5) == (labels > 0.5))), {
            "test_logloss": loss, "test_auc": auc(labels, probs),
            "table_rows": sum(s["rows"] for s in stats), "table_bytes": sum(s["bytes"] for s in stats),
            "row_staleness_p50": percentile(stale, 0.5), "row_staleness_p99": percentile(stale, 0.99),
            "row_staleness_max": float(max(stale)) if stale else 0.0}

    def _figures(self, stats: list[dict], elapsed: float) -> dict[str, Any]:
        """Throughput, bytes and the staleness (and ssp clock-gap) distributions so far.

        Every piece sees every push, so the histograms count each push once per piece.
        """
        hists = {name: merged(s["meta"].get(name, {}) for s in stats)
                 for name in ("staleness", "clock_gap")}
        moved = sum(s["meta"]["bytes_in"] + s["meta"]["bytes_out"] for s in stats) + \
            sum(t["bytes_in"] + t["bytes_out"] for t in self._table_stats)
        stale, gaps = hists["staleness"], hists["clock_gap"]
        return {"updates_per_s": stats[0]["meta"]["version"] / max(elapsed, 1e-9),
                "bytes_per_s": moved / max(elapsed, 1e-9), "bytes": moved,
                "staleness_p50": percentile(stale, 0.5), "staleness_p99": percentile(stale, 0.99),
                "staleness_max": float(max(stale)) if stale else 0.0,
                "staleness_hist": {str(k): v for k, v in sorted(stale.items())},
                "clock_gap_max": max(gaps) if gaps else 0,
                "clock_gap_hist": {str(k): v for k, v in sorted(gaps.items())},
                "dropped": sum(s["meta"]["dropped"] for s in stats)}

    def _interrupt(self, *_) -> None:
        self.interrupted = True


def busiest_link(cfg: Config, nodes: dict[str, dict[str, Any]], seconds: float
                 ) -> tuple[float | None, str | None]:
    """(the highest utilization of any node's link in either direction over `seconds`:
    bits moved / (seconds x the link's rate), and which link, e.g. "server-0 download");
    (None, None) without --link. Workers are behind --link, the servers and the scheduler
    behind --server-link (default: the same)."""
    if not cfg.link:
        return None, None
    rates = {"worker": parse_rate(cfg.link, "link"),
             "other": parse_rate(cfg.server_link or cfg.link, "server_link")}
    links = {(name, direction): 8 * node[key] / max(seconds, 1e-9) /
             rates["worker" if name.startswith("worker") else "other"]
             for name, node in nodes.items()
             for direction, key in (("upload", "bytes_sent"), ("download", "bytes_received"))}
    (name, direction), utilization = max(links.items(), key=lambda item: item[1])
    return round(utilization, 4), f"{name} {direction}"


def main(cfg: Config) -> int:
    """`downpour scheduler`: bind, conduct the run, shut the cluster down.

    The command line has checked --bind (downpour.common.wire.address); a bind that fails
    anyway (the port taken, not this host's address) is a ConfigError, its socket closed.
    """
    keys = Keys.load(cfg.keys, "scheduler") if cfg.keys else None
    ctx = zmq.Context()
    try:
        with guard(ctx, keys):                      # before the bind: no handshake goes unchecked
            sock, endpoint = bind_router(ctx, cfg.bind or (DEFAULT_BIND if keys else LOOPBACK_BIND),
                                         keys=keys)
            try:
                if cfg.endpoint_file:
                    atomic_write(cfg.endpoint_file, lambda f: f.write(endpoint.encode()))
                # the first line: every address it listens on (a wildcard resolved); without
                # keys beyond this host (--insecure), that anyone there can control the run
                exposed = keys is None and address.reachable(endpoint)
                listening = address.insecure_warning(endpoint) if exposed else \
                    f"listening on {', '.join(address.endpoints(endpoint))}"
                Scheduler(cfg, sock, ctx, keys).run(listening)
            finally:
                sock.close()
    finally:
        ctx.term()
    return 0
