"""The scheduler: the cluster's well-known address, and its conductor.

1. Assemble. Servers and workers register, in any order. Server i gets rank i and
   its shard range at once; workers get their rank and the server addresses once
   all S servers are in. The cluster spec a node receives (`_spec`) holds the run's
   settings, the model, the shard ranges and the server addresses. Whoever is still
   missing after start_timeout_s is named in a ClusterError.
2. Train. Heartbeats carry each worker's progress. A node silent for dead_after_s
   is dead: in sync mode the servers are told the live workers, so a version
   completes without the dead one; in async mode the run goes on regardless. A
   server that dies may be replaced: the next server to register takes its rank
   (and, with --resume, its checkpoint), and workers follow the new address.
   Every eval_every epochs' worth of samples, the scheduler pulls the whole model,
   evaluates it on the held-out split, writes an `eval` metrics line, feeds
   reduce-on-plateau (telling the servers the new lr scale) and early stopping
   (telling the workers to stop), and orders checkpoints every checkpoint_every_s.
3. Finish. When every live worker is done: a final evaluation, the `end` line,
   the saved model, and a shutdown for every server.

Batch-norm running statistics are not communicated: before evaluating, the
scheduler recomputes them from training batches with the pulled weights
(Model.calibrate_batchnorm), so they always match the weights they serve.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from downpour.common import config, protocol
from downpour.common.client import ShardClient
from downpour.common.config import Config
from downpour.common.errors import ClusterError, ProtocolError
from downpour.common.fileio import atomic_write
from downpour.common.metrics import MetricsLog, Progress
from downpour.common.model import Model
from downpour.common.schedules import parse_schedule
from downpour.common.training import (
    EarlyStopping,
    check_cluster,
    finish,
    model_spec,
    open_datasets,
    worker_steps,
)
from downpour.ps.server import bind_router


@dataclass
class NodeState:
    role: str
    rank: int
    addr: str = ""
    last_seen: float = field(default_factory=time.monotonic)
    progress: dict[str, Any] = field(default_factory=dict)
    dead: bool = False


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


class Scheduler:
    def __init__(self, cfg: Config, sock: zmq.Socket, ctx: zmq.Context):
        check_cluster(cfg)
        self.cfg, self.sock, self.ctx = cfg, sock, ctx
        self.train, self.test, self.about = open_datasets(cfg)
        self.spec = model_spec(cfg, self.train)
        self.model = Model(self.spec, seed=cfg.seed)
        self.pieces = self.model.layout.pieces(cfg.shards, cfg.piece_elements)  # [(server, lo, hi)]
        self.servers: dict[int, NodeState] = {}
        self.workers: dict[int, NodeState] = {}
        self._held: list[tuple[bytes, dict, int]] = []     # workers waiting for the servers
        self._spares: list[tuple[bytes, dict, str]] = []   # servers waiting for a rank
        self.client: ShardClient | None = None
        self.metrics = MetricsLog(cfg.metrics)
        self.total = sum(worker_steps(len(self.train), cfg, r) for r in range(cfg.workers)) \
            * cfg.batch_size
        self.progress = Progress(self.total, cfg.progress)
        self.schedule = parse_schedule(cfg.lr_schedule, cfg.lr)
        self.stopper = EarlyStopping(cfg.patience)
        self.stopping = False
        self.interrupted = False
        self._live_changed = False

    # -- the three phases ------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._interrupt)
        self.progress.line(f"{self.about}; {self.cfg.mode} mode, {self.cfg.workers} worker(s), "
                           f"{self.cfg.shards} shard(s), model {self.model.layout.size:,} parameters")
        self._assemble()
        self.client = ShardClient([self.servers[s].addr for s, _, _ in self.pieces],
                                  [(lo, hi) for _, lo, hi in self.pieces], "scheduler",
                                  self.cfg.timeout_s, self.cfg.retries, self.ctx,
                                  while_waiting=self._tend)
        try:
            end = self._train()
            self.client.call_all("shutdown")
        finally:
            self.client.close()
            self.metrics.close()
            self.progress.close()
        return end

    def _assemble(self) -> None:
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while len(self.servers) < self.cfg.shards or len(self.workers) < self.cfg.workers:
            if self.interrupted:
                raise KeyboardInterrupt
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"the cluster did not assemble in {self.cfg.start_timeout_s:g} s: "
                    f"{len(self.servers)} of {self.cfg.shards} server(s) and {len(self.workers)} of "
                    f"{self.cfg.workers} worker(s) registered; start the missing nodes with "
                    f"--scheduler pointing here")
            self._serve_once(100)
        self.progress.line("cluster assembled: " + ", ".join(
            [f"server-{r} at {s.addr}" for r, s in sorted(self.servers.items())]))

    def _train(self) -> dict[str, Any]:
        cfg, n = self.cfg, len(self.train)
        eval_every = cfg.eval_every * n if cfg.eval_every > 0 else float("inf")
        next_eval, last_checkpoint = eval_every, time.monotonic()
        self.start = time.monotonic()
        self._last_losses = (0.0, 0)
        while True:
            if self.interrupted:
                raise KeyboardInterrupt
            self._tend(100)
            if self._live_changed:
                self._live_changed = False
                if self.cfg.mode in ("sync", "ssp"):
                    self.client.call_all("control", {"live": sorted(
                        r for r, w in self.workers.items()
                        if not w.dead and not w.progress.get("done"))})
            samples = self._samples()
            self.progress.update(samples, f"{samples:,} samples")
            live = [w for w in self.workers.values() if not w.dead]
            if all(w.progress.get("done") for w in live):
                break
            if samples >= next_eval:
                next_eval += eval_every
                if self._evaluate()["stop"]:
                    self.stopping = True
            if cfg.checkpoint_every_s and time.monotonic() - last_checkpoint >= cfg.checkpoint_every_s:
                self._checkpoint()
                last_checkpoint = time.monotonic()
        # training time: from the first worker's first step to the last worker's last
        ran = [w.progress for w in self.workers.values() if w.progress.get("t_start")]
        train_time = (max(p.get("t_end") or time.time() for p in ran) - min(p["t_start"] for p in ran)
                      if ran else time.monotonic() - self.start)
        last = self._evaluate()
        stats = self._stats
        samples = self._samples()
        return finish(
            cfg, self.model, self.metrics, self.progress, mode=cfg.mode, workers=cfg.workers,
            shards=cfg.shards, elapsed_s=round(time.monotonic() - self.start, 3),
            train_time_s=round(train_time, 3), epoch=round(samples / n, 4), samples=samples,
            updates=last["updates"], samples_per_s=samples / train_time,
            train_loss=last["train_loss"], test_loss=last["test_loss"],
            test_accuracy=last["test_accuracy"], stopped_early=self.stopping,
            dead_workers=sorted(r for r, w in self.workers.items() if w.dead),
            parameters=self.model.layout.size, data=self.about, **self._figures(stats, train_time))

    # -- evaluation ------------------------------------------------------------------------
    def _evaluate(self) -> dict[str, Any]:
        """Pull the model, evaluate it, write an `eval` line; "stop" says early stopping fired."""
        m = self.model
        version = self.client.pull(m.params)
        if self.spec.batchnorm:
            m.calibrate_batchnorm(self.train.x, self.cfg.batch_size)
        test_loss, test_acc = m.evaluate(self.test.x, self.test.y)
        stats = self._stats = self.client.call_all("stats")
        elapsed = time.monotonic() - self.start
        loss_sum = sum(w.progress.get("loss_sum", 0.0) for w in self.workers.values())
        loss_count = sum(w.progress.get("loss_count", 0) for w in self.workers.values())
        s0, c0 = self._last_losses
        self._last_losses = (loss_sum, loss_count)
        samples = self._samples()
        record = self.metrics.write(
            "eval", elapsed_s=round(elapsed, 3), epoch=round(samples / len(self.train), 4),
            samples=samples, updates=version,
            train_loss=(loss_sum - s0) / (loss_count - c0) if loss_count > c0 else None,
            test_loss=test_loss, test_accuracy=test_acc, lr=stats[0]["meta"]["lr"],
            **self._figures(stats, elapsed))
        self.progress.line(f"epoch {record['epoch']:6.2f}  updates {version:6d}  test loss "
                           f"{test_loss:.4f}  test accuracy {100 * test_acc:.2f}%  staleness p99 "
                           f"{record['staleness_p99']:g}")
        stop = False
        if not self.stopping:                # once stopping, the rest is winding down
            if self.schedule.observe(test_loss):
                self.client.call_all("control", {"lr_scale": self.schedule.scale})
                self.progress.line(f"reduce-on-plateau: learning rate x{self.schedule.scale:g}")
            stop = self.stopper.observe(test_loss)
            if stop:
                self.progress.line(f"early stop: no lower held-out loss in {self.cfg.patience} "
                                   "evaluations; telling the workers")
        return {**record, "stop": stop}

    def _checkpoint(self) -> None:
        """Order every server to checkpoint (servers without a checkpoint dir decline)."""
        for shard in range(len(self.pieces)):
            try:
                self.client.call(shard, "checkpoint")
            except protocol.RemoteError as e:
                if e.code != protocol.E_STATE:
                    raise

    def _figures(self, stats: list[dict], elapsed: float) -> dict[str, Any]:
        """Throughput, bytes and the staleness (and ssp clock-gap) distributions so far.

        Every piece sees every push, so the histograms count each push once per piece.
        """
        hists: dict[str, dict[int, int]] = {"staleness": {}, "clock_gap": {}}
        for s in stats:
            for name, hist in hists.items():
                for k, v in s["meta"].get(name, {}).items():
                    hist[int(k)] = hist.get(int(k), 0) + v
        moved = sum(s["meta"]["bytes_in"] + s["meta"]["bytes_out"] for s in stats)
        stale, gaps = hists["staleness"], hists["clock_gap"]
        return {"updates_per_s": stats[0]["meta"]["version"] / max(elapsed, 1e-9),
                "bytes_per_s": moved / max(elapsed, 1e-9), "bytes": moved,
                "staleness_p50": percentile(stale, 0.5), "staleness_p99": percentile(stale, 0.99),
                "staleness_max": float(max(stale)) if stale else 0.0,
                "staleness_hist": {str(k): v for k, v in sorted(stale.items())},
                "clock_gap_max": max(gaps) if gaps else 0,
                "clock_gap_hist": {str(k): v for k, v in sorted(gaps.items())},
                "dropped": sum(s["meta"]["dropped"] for s in stats)}

    def _samples(self) -> int:
        return sum(w.progress.get("samples", 0) for w in self.workers.values())

    # -- messages --------------------------------------------------------------------------
    def _serve_once(self, timeout_ms: int) -> None:
        """Answer every message that arrives within `timeout_ms`."""
        if not self.sock.poll(timeout_ms):
            return
        while self.sock.poll(0):
            ident, *frames = self.sock.recv_multipart()
            header = None
            try:
                header, _ = protocol.decode(frames)
                if header["op"] == "register":
                    self._register(ident, header)
                elif header["op"] == "heartbeat":
                    self._reply(ident, header, self._heartbeat(header))
                else:
                    raise protocol.error(protocol.E_UNKNOWN_OP, f"the scheduler offers "
                                         f"{', '.join(protocol.SCHEDULER_OPS)}, not {header['op']!r}")
            except ProtocolError as e:
                self.sock.send_multipart([ident, *protocol.error_reply(e.code, str(e), header,
                                                                        "scheduler")])

    def _reply(self, ident: bytes, request: dict, meta: dict[str, Any]) -> None:
        self.sock.send_multipart([ident, *protocol.encode(
            {"op": "ok", "node": "scheduler", "seq": request["seq"], "meta": meta})])

    def _register(self, ident: bytes, header: dict) -> None:
        meta = header.get("meta", {})
        role = meta.get("role")
        if role == "server":
            addr = meta.get("addr")
            if not isinstance(addr, str) or not addr:
                raise protocol.error(protocol.E_MALFORMED, "a server registers with its addr")
            self._spares.append((ident, header, addr))
            self._seat_servers()
        elif role == "worker":
            if len(self.workers) >= self.cfg.workers:
                raise protocol.error(protocol.E_STATE, f"the run already has its {self.cfg.workers} "
                                     "worker(s); raise --workers to add more")
            rank = len(self.workers)
            self.workers[rank] = NodeState("worker", rank)
            if len(self.servers) == self.cfg.shards:
                self._reply(ident, header, self._spec(rank))
            else:
                self._held.append((ident, header, rank))
        else:
            raise protocol.error(protocol.E_MALFORMED, f"role must be server or worker, not {role!r}")

    def _seat_servers(self) -> None:
        """Give waiting servers a rank: a free one while assembling, later a dead one's.

        A server that registers when every rank is taken waits here until a server
        dies (it then takes over that rank, and with --resume its checkpoint), or
        until its own registration times out.
        """
        while self._spares:
            free = [r for r in range(self.cfg.shards) if r not in self.servers] or \
                   [r for r, s in sorted(self.servers.items()) if s.dead]
            if not free:
                return
            (ident, header, addr), rank = self._spares.pop(0), free[0]
            replacing = rank in self.servers
            self.servers[rank] = NodeState("server", rank, addr)
            self._reply(ident, header, self._spec(rank))
            if replacing and self.client is not None:
                for piece, (server, _, _) in enumerate(self.pieces):
                    if server == rank:
                        self.client.reconnect(piece, addr)
                self.progress.line(f"server-{rank} replaced, now at {addr}")
            if len(self.servers) == self.cfg.shards:
                for ident_, header_, rank_ in self._held:
                    self._reply(ident_, header_, self._spec(rank_))
                self._held.clear()

    def _spec(self, rank: int) -> dict[str, Any]:
        """What a node needs to take part: the run's settings, model, ranges and servers."""
        spec = {"rank": rank, "config": config.to_dict(self.cfg), "model": self.spec.to_dict(),
                "pieces": [list(p) for p in self.pieces], "n_train": len(self.train)}
        if len(self.servers) == self.cfg.shards:
            spec["servers"] = [s.addr for _, s in sorted(self.servers.items())]
        return spec

    def _heartbeat(self, header: dict) -> dict[str, Any]:
        meta = header.get("meta", {})
        role, rank = meta.get("role"), meta.get("rank")
        nodes = {"server": self.servers, "worker": self.workers}.get(role, {})
        if rank not in nodes:
            raise protocol.error(protocol.E_STATE, f"{header['node']} is not registered")
        node = nodes[rank]
        node.last_seen = time.monotonic()
        if node.dead or (meta.get("done") and not node.progress.get("done")):
            node.dead = False
            self._membership_changed()          # back, or done: servers stop waiting for it
        node.progress = meta
        return {"stop": self.stopping,
                "servers": [s.addr for _, s in sorted(self.servers.items())]}

    def _check_liveness(self) -> None:
        now = time.monotonic()
        for node in [*self.servers.values(), *self.workers.values()]:
            if node.dead or now - node.last_seen < self.cfg.dead_after_s:
                continue
            if node.role == "worker" and node.progress.get("done"):
                continue                                  # finished, and gone: not a death
            node.dead = True
            self.progress.line(f"{node.role}-{node.rank} stopped answering for "
                               f"{self.cfg.dead_after_s:g} s: marked dead")
            if node.role == "worker":
                self._membership_changed()
            else:
                self._seat_servers()
        if all(w.dead for w in self.workers.values()):
            raise ClusterError("every worker has died; the run cannot go on")
        gone = [s for s in self.servers.values() if s.dead
                and now - s.last_seen > self.cfg.dead_after_s + self.cfg.start_timeout_s]
        if gone:
            raise ClusterError(f"server-{gone[0].rank} at {gone[0].addr} died and no server "
                               f"replaced it within {self.cfg.start_timeout_s:g} s")

    def _membership_changed(self) -> None:
        self._live_changed = True             # the main loop tells the servers (sync, ssp)

    def _tend(self, timeout_ms: int = 0) -> None:
        """Answer registrations and heartbeats, and notice deaths. Also runs while the
        scheduler waits for a server's reply, so that nodes go on hearing from it (they
        give up after dead_after_s of silence) and a replacement server can register."""
        self._serve_once(timeout_ms)
        self._check_liveness()

    def _interrupt(self, *_) -> None:
        self.interrupted = True


def main(cfg: Config) -> int:
    """`downpour scheduler`: bind, conduct the run, shut the cluster down."""
    ctx = zmq.Context()
    sock, endpoint = bind_router(ctx, cfg.bind or "tcp://*:5555")
    try:
        if cfg.endpoint_file:
            atomic_write(cfg.endpoint_file, lambda f: f.write(endpoint.encode()))
        Scheduler(cfg, sock, ctx).run()
    finally:
        sock.close()
        ctx.term()
    return 0
