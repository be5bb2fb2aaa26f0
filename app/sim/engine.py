"""The discrete-event model of a run of `downpour train` (async, sync, ssp).

Simulated time advances from event to event (a heap of timed callbacks); each worker is
a coroutine that mirrors worker/replica.py step for step, and the server and the links
are the resources it waits on. Nothing is a closed formula: throughput, waiting and
staleness come out of the order in which the events fall.

    worker w     its initial pull; then per step its gradient (the profile's CPU s per
                 batch x --compute-scale x the --slow-worker factor, with the measured
                 step-to-step variation), then the push and pull the n_push / n_fetch
                 cycle calls for (sync and ssp: a push_pull every step); --overlap
                 starts the push_pull and computes the next gradient while it flies.
                 Per message it spends the profile's client time, the codec's encode
                 and decode, and the copy of each reply into place.
    chunks       async and ssp: the scheduler's own ledger (ps/ledger.py) deals the
                 chunks, one ahead, nothing ahead in the end game, as ChunkFeed asks;
                 sync: version after version, a worker too late for one (backup
                 workers) skipping to the next, as replica.py does.
    links        every node has a full-duplex link (--link, --server-link; without
                 --link the profile's ipc rate): an upload and a download, each shared
                 by the flows crossing it (Shared). Messages on one connection (a worker
                 and a server) go in order. TCP/IP headers take 66 of every 1514 bytes
                 on the wire (MTU 1500); where the emulated link's tbf drops packets,
                 the link probe's measured share of the rate (sim/linkprobe.py).
    server       one thread: messages in arrival order, one at a time; a push costs
                 the profile's message time, its decode, the finiteness check and the
                 optimizer's apply per element; sync holds the pushes of a version
                 until all live workers but `backup` have pushed (copying each, then
                 summing); ssp holds a worker's reply while its clock runs more than
                 `staleness` ahead of the slowest; pulls cost message time and the
                 pull codec's encode.

Aggregated: the S servers. The shard is cut into equal ranges and every request goes
to every server at once, so every server sees the same messages at the same moments:
one server is simulated (its pieces, its queue, its versions) and stands for all S.
A worker's link carries S such flows at once, so in the model each flow gets 1/S of
it, and the worker spends S times each per-message cost. This is exact up to the
+-1 element by which shards differ and the order in which a worker encodes its S
messages (the model sends them together). Not modelled: CPU contention between
processes on one host (the validation counts only runs whose host_bound is false),
TCP's losses and retransmissions themselves (only their share of the rate, measured),
heartbeats and chunk requests (tens of bytes), evaluations, and latency beyond the
per-message costs (this kernel has no netem).
"""

from __future__ import annotations

import math
from collections import Counter, deque
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from downpour.common.config import Config
from downpour.common.order import (
    chunk_samples,
    epoch_samples,
    sync_versions,
    total_chunks,
)
from downpour.common.step import emulated_scale
from downpour.common.wire import codec
from downpour.ps.ledger import Ledger
from downpour.ps.scheduler import percentile
from downpour.sim.network import WIRE_EFFICIENCY, Bucket, Clock, Connection, Shared, Signal, spawn

HEADER_BYTES = 120               # a request's or reply's msgpack header, about
JITTER_CLIP = 3.0                # step times vary by at most this many standard deviations


class Costs(NamedTuple):
    """Every cost the model uses, in seconds, bytes and elements (see profile.explain)."""
    compute_s: float          # CPU s of one batch's gradient (forward, backward, gather)
    compute_cv: float         # its coefficient of variation from step to step
    client_msg_s: float       # worker CPU per message and its reply (header, send, receive)
    server_msg_s: float       # server CPU per message (decode, validate, reply)
    copy_s_per_byte: float    # a memcpy-like pass (a reply copied into place, a sync copy)
    check_s_per_elem: float   # the server's finiteness check (one dot product)
    add_s_per_elem: float     # one in-place add (sync's sum, n_push > 1's accumulator)
    apply_s_per_elem: float   # the optimizer's update
    encode_s_per_elem: dict   # codec name -> encode s per element (with error feedback)
    decode_s_per_elem: dict   # codec name -> decode s per element
    server_s: dict            # "push_pull", "push", "pull" (+ " codec" past the codecs'
    #                           warm-up) -> s of the server's answer to one message for a
    #                           piece of the run's size, as PieceState takes it (async, ssp)
    server_elem_s: float      # s per element received beyond that (ZeroMQ's buffers)
    worker_rate: float        # bytes/s of payload a worker's link carries each way
    server_rate: float        # ... a server's
    worker_burst: float       # bytes a worker's link passes at once when idle (tbf's bucket)
    server_burst: float       # ... a server's
    crypto_s_per_byte: float  # CurveZMQ, per byte, each end (0 without keys)
    sndbuf: float = 0.0       # bytes of a reply the kernel takes before the link sends them


def payload_bytes(name: str, n: int) -> int:
    """Bytes of a piece of n float32 sent with codec `name` (common/wire/codec.py's table)."""
    c = codec.parse(name)
    if c.name == "none":
        return 4 * n
    if c.name == "fp16":
        return 2 * n
    if c.name == "onebit":
        return -(-n // 8) + 4
    return 8 * c.count(n)


class Message(NamedTuple):
    worker: int
    op: str                 # pull, push, push_pull
    piece: int
    computed_on: int        # the version of this piece the gradient was computed on
    compressed: bool        # past the codecs' warm-up
    last: bool
    request: "Request"


class Request:
    """One verb of a worker to every piece: done when every piece's reply is in."""

    def __init__(self, clock: Clock, pieces: int):
        self.left, self.done, self.arrived = pieces, Signal(clock), []

    def reply(self, t: float, piece: int, version: int, cost: float) -> None:
        self.arrived.append((t, piece, version, cost))
        self.left -= 1
        if self.left == 0:
            self.done.fire(self.arrived)


# ------------------------------------------------------------------------------- the run


class Run:
    """One simulated run of `cfg` on n training samples, with pieces `piece_sizes` per
    server (elements) and the profile's `costs`. `simulate()` returns the figures."""

    def __init__(self, cfg: Config, n: int, piece_sizes: list[int], costs: Costs, seed: int = 0):
        self.cfg, self.n, self.costs, self.sizes = cfg, n, costs, piece_sizes
        self.W, self.S, self.P = cfg.workers, cfg.shards, len(piece_sizes)
        self.clock = Clock()
        self.rng = np.random.default_rng([cfg.seed, seed, 0x51])
        S, c = self.S, costs
        # the server's link each way, shared by every worker's flow, each capped by its share
        # of the worker's link (a worker's link carries S flows at once)
        self.server_down = Shared(self.clock, Bucket(c.server_rate, c.server_burst))
        self.server_up = Shared(self.clock, Bucket(c.server_rate, c.server_burst), c.sndbuf)
        self.to_server = [Connection(self.server_down, Bucket(c.worker_rate / S, c.worker_burst / S))
                          for _ in range(self.W)]
        self.to_worker = [Connection(self.server_up, Bucket(c.worker_rate / S, c.worker_burst / S))
                          for _ in range(self.W)]
        self.push_codec = codec.parse(cfg.push_codec).text
        self.pull_codec = codec.parse(cfg.pull_codec).text
        self.version = [0] * self.P                   # per piece
        self.staleness: Counter = Counter()
        self.gaps: Counter = Counter()
        self.busy_s = 0.0
        self._queue: deque = deque()
        self._serving = False
        self._unsent: list[list[Signal]] = [[] for _ in range(self.P)]   # replies ZeroMQ holds
        self.blocked_s = 0.0
        self.bytes_in = self.bytes_out = self.raw_in = self.raw_out = self.payload_out = 0.0
        self.dropped = 0
        # sync
        self.live = set(range(self.W))
        self.finished: set[int] = set()
        self._waiting: list[dict[int, Message]] = [{} for _ in range(self.P)]
        # ssp
        self.clocks = [Counter() for _ in range(self.P)]
        self._blocked: list[dict[int, Message]] = [{} for _ in range(self.P)]
        self._sent_at: list[dict[int, int]] = [{} for _ in range(self.P)]
        self._copies: list[set[int]] = [set() for _ in range(self.P)]    # topk pulls: copies held
        # workers
        self.samples = [0] * self.W
        self.steps = [0] * self.W
        self.t_end = [0.0] * self.W
        self.waiting_s = [0.0] * self.W
        self.ledger = (Ledger(total_chunks(n, cfg), lambda ch: chunk_samples(n, cfg, ch))
                       if cfg.mode in ("async", "ssp") else None)
        self._warmup = cfg.codec_warmup_epochs * epoch_samples(n, cfg)

    # -- the worker ------------------------------------------------------------------------
    def _compute_s(self, rank: int) -> float:
        c = self.costs
        jitter = 1.0
        if c.compute_cv > 0:
            jitter = 1.0 + c.compute_cv * float(np.clip(self.rng.standard_normal(), -JITTER_CLIP,
                                                        JITTER_CLIP))
        return max(0.0, c.compute_s * jitter) * max(1.0, emulated_scale(self.cfg, rank))

    def _worker(self, w: int) -> Iterator:
        cfg, c = self.cfg, self.costs
        sync, overlap = cfg.mode == "sync", cfg.overlap and cfg.mode != "sync"
        versions = yield from self._call(w, "pull", [0] * self.P, False)
        in_flight: Request | None = None
        step = 0
        for last in self._batches(w, lambda: versions):
            yield self._compute_s(w)
            compress = (self.samples[w] + cfg.batch_size) * self.W >= self._warmup
            push = sync or last or (step + 1) % cfg.n_push == 0
            fetch = sync or (step + 1) % cfg.n_fetch == 0
            if cfg.n_push > 1 and not sync:                  # the sum of gradients to push
                yield self._model_elems() * c.add_s_per_elem
            computed_on = [min(versions)] * self.P if sync else list(versions)
            if in_flight is not None:
                versions = yield from self._finish(w, in_flight, versions)
                in_flight = None
            if push and fetch and overlap:
                yield self._model_elems() * 4 * c.copy_s_per_byte      # the gradient kept to send
                in_flight = yield from self._start(w, "push_pull", computed_on, compress, last)
            elif push or fetch:
                op = "push_pull" if push and fetch else ("push" if push else "pull")
                versions = yield from self._call(w, op, computed_on, compress, last, keep=versions)
            self.samples[w] += cfg.batch_size
            self.steps[w] += 1
            step += 1
        if in_flight is not None:
            versions = yield from self._finish(w, in_flight, versions)
        self.t_end[w] = self.clock.now
        self._gone(w)

    def _model_elems(self) -> int:
        return sum(self.sizes) * self.S

    def _batches(self, w: int, versions: Callable[[], list[int]]) -> Iterator[bool]:
        """Whether each step of worker w is its last, as replica.Replica._batches deals them."""
        cfg = self.cfg
        if self.ledger is None:                       # sync: version after version
            total = sync_versions(self.n, cfg)
            while min(versions()) < total:
                yield min(versions()) == total - 1
            return
        feed = _Feed(self.ledger, w, self.W)
        while (chunk := feed.take()) is not None:
            k = chunk_samples(self.n, cfg, chunk) // cfg.batch_size
            for i in range(k):
                yield i == k - 1 and not feed.more()

    def _start(self, w: int, op: str, computed_on: list[int], compress: bool, last: bool
               ) -> Iterator:
        """Send `op` to every piece (the worker encodes and posts S messages per piece of the
        modelled server); the Request whose replies are coming."""
        c, S = self.costs, self.S
        request = Request(self.clock, self.P)
        pushing = op != "pull"
        for p, n in enumerate(self.sizes):
            cost = c.client_msg_s / 2
            nbytes = HEADER_BYTES
            if pushing:
                name = self.push_codec if compress else "none"
                cost += n * c.encode_s_per_elem[name] if name != "none" else 0.0
                nbytes += payload_bytes(name, n)
                self.raw_in += 4 * n
            cost += nbytes * c.crypto_s_per_byte
            yield S * cost
            msg = Message(w, op, p, computed_on[p], compress, last, request)
            if pushing:
                self.bytes_in += (nbytes - HEADER_BYTES)
            self.to_server[w].send(nbytes, lambda m=msg: self._arrive(m))
        return request

    def _finish(self, w: int, request: Request, versions: list[int]) -> Iterator:
        """Wait for every reply of `request`, copying each into place as it comes; the
        pieces' versions then."""
        t0 = self.clock.now
        arrived = yield request.done
        new = list(versions)
        t = t0
        for when, piece, version, cost in sorted(arrived):
            t = max(t, when) + self.S * cost
            if version is not None:
                new[piece] = version
        if t > self.clock.now:
            yield t - self.clock.now
        self.waiting_s[w] += self.clock.now - t0
        return new

    def _call(self, w: int, op: str, computed_on: list[int], compress: bool, last: bool = False,
              keep: list[int] | None = None) -> Iterator:
        request = yield from self._start(w, op, computed_on, compress, last)
        return (yield from self._finish(w, request, keep if keep is not None else computed_on))

    # -- the server ------------------------------------------------------------------------
    def _arrive(self, msg: Message) -> None:
        self._queue.append(msg)
        if not self._serving:
            self._serve()

    def _serve(self) -> None:
        if not self._queue:
            self._serving = False
            return
        self._serving = True
        msg = self._queue[0]
        unsent = [sig for sig in self._unsent[msg.piece] if not sig.fired]
        self._unsent[msg.piece] = unsent
        if msg.op != "pull" and unsent:       # PieceState._apply: wait_sent() first
            t0 = self.clock.now
            unsent[0].wait(lambda _: self._waited(t0))
            return
        self._queue.popleft()
        cost = self._server_cost(msg)
        self.busy_s += cost
        self.clock.at(self.clock.now + cost, self._served, msg)

    def _waited(self, since: float) -> None:
        self.blocked_s += self.clock.now - since
        self._serve()

    def _server_cost(self, msg: Message) -> float:
        c, n, cfg = self.costs, self.sizes[msg.piece], self.cfg
        received = n * c.server_elem_s if msg.op != "pull" else 0.0
        if cfg.mode != "sync":
            codecs = msg.compressed and (self.push_codec != "none" or self.pull_codec != "none")
            return c.server_s[msg.op + (" codec" if codecs else "")] + received
        # sync: each push is checked and kept until the version is full; the last one
        # sums them and applies the mean
        cost = c.server_msg_s + received + n * (c.check_s_per_elem + 4 * c.copy_s_per_byte)
        if msg.compressed and self.push_codec != "none":
            cost += n * c.decode_s_per_elem[self.push_codec]
        if self._completes(msg):
            k = len(self._waiting[msg.piece]) + 1
            cost += (k - 1) * n * c.add_s_per_elem + n * c.apply_s_per_elem
        if msg.compressed and self.pull_codec != "none":
            cost += len(self._waiting[msg.piece]) * n * c.encode_s_per_elem[self.pull_codec]
        return cost

    def _completes(self, msg: Message) -> bool:
        """sync: whether `msg` is the push that completes its piece's version."""
        p = msg.piece
        if msg.computed_on < self.version[p]:
            return False
        waiting = set(self._waiting[p]) | {msg.worker}
        finished = self.finished | ({msg.worker} if msg.last else set())
        expected = {r for r in self.live if r not in finished or r in waiting}
        return len(expected & waiting) >= max(1, len(expected) - self.cfg.backup)

    def _served(self, msg: Message) -> None:
        mode, p = self.cfg.mode, msg.piece
        if msg.op == "pull":
            self._sent_at[p][msg.worker] = min(self._slowest(p), self.clocks[p][msg.worker])
            self._reply(msg)
        elif mode == "sync":
            if msg.last:
                self.finished.add(msg.worker)
            if msg.computed_on < self.version[p]:
                self.dropped += 1
                self._reply(msg)
            else:
                self._waiting[p][msg.worker] = msg
                self._complete(p)
        else:
            self.staleness[self.version[p] - msg.computed_on] += 1
            self.version[p] += 1
            if mode != "ssp":
                self._reply(msg)
            else:
                clocks = self.clocks[p]
                self.gaps[clocks[msg.worker] - self._sent_at[p].get(msg.worker, 0)] += 1
                clocks[msg.worker] += 1
                if msg.last:
                    self.finished.add(msg.worker)
                self._blocked[p][msg.worker] = msg
                self._release(p)
        self._serve()

    def _complete(self, p: int) -> None:
        """sync: apply piece p's version if enough live workers have pushed for it
        (PieceState._complete), and answer them all."""
        waiting = self._waiting[p]
        expected = {r for r in self.live if r not in self.finished or r in waiting}
        if not waiting or len(expected & set(waiting)) < max(1, len(expected) - self.cfg.backup):
            return
        self._waiting[p] = {}
        self.staleness[0] += len(waiting)
        self.version[p] += 1
        for r in sorted(waiting):
            self._reply(waiting[r])

    def _gone(self, w: int) -> None:
        """Worker w is done: its last beat takes it out of the live set the servers wait
        for (the scheduler's control message), which may release a version or a reply."""
        self.live.discard(w)
        for p in range(self.P):
            if self.cfg.mode == "sync":
                self._complete(p)
            elif self.cfg.mode == "ssp":
                self._release(p)

    def _slowest(self, p: int) -> float:
        return min((self.clocks[p][r] for r in self.live - self.finished), default=math.inf)

    def _release(self, p: int) -> None:
        slowest = self._slowest(p)
        for r in sorted(self._blocked[p]):
            if (self.clocks[p][r] - slowest <= self.cfg.staleness or r in self.finished
                    or r not in self.live):
                msg = self._blocked[p].pop(r)
                self._sent_at[p][r] = min(slowest, self.clocks[p][r])
                self._reply(msg)

    def _reply(self, msg: Message) -> None:
        """The reply to `msg` on its way back: parameters for a pull or push_pull (whole, or
        in the pull codec past the warm-up; a topk pull's first reply whole)."""
        c, n, p = self.costs, self.sizes[msg.piece], msg.piece
        nbytes, version, cost = HEADER_BYTES, None, c.client_msg_s / 2
        if msg.op != "push":
            name = self.pull_codec if msg.compressed else "none"
            if name.startswith("topk") and msg.worker not in self._copies[p]:
                name = "none"                      # its first compressed pull: the whole piece
                self._copies[p].add(msg.worker)
            payload = payload_bytes(name, n)
            nbytes += payload
            self.raw_out += 4 * n
            self.payload_out += payload
            self.bytes_out += payload
            version = self.version[p]
            cost += (4 * n * c.copy_s_per_byte if name == "none"
                     else n * c.decode_s_per_elem[name])
        cost += nbytes * c.crypto_s_per_byte
        request, sent = msg.request, Signal(self.clock)
        self._unsent[p].append(sent)
        self.to_worker[msg.worker].send(
            nbytes, lambda: request.reply(self.clock.now, p, version, cost), sent)

    # -- the whole run ----------------------------------------------------------------------
    def simulate(self) -> dict[str, Any]:
        for w in range(self.W):
            spawn(self.clock, self._worker(w))
        self.clock.run()
        return self._figures()

    def _figures(self) -> dict[str, Any]:
        cfg, S = self.cfg, self.S
        time = max(self.t_end) or 1e-9
        samples = sum(self.samples)
        stale = dict(self.staleness)
        moved = S * (self.bytes_in + self.bytes_out)
        # utilization as the end record counts it: bytes sent over the nominal rate (a
        # worker's link carries its S connections)
        nominal = WIRE_EFFICIENCY if cfg.link else 1.0
        links = {"server-0 download": self.server_down.bytes / self.costs.server_rate,
                 "server-0 upload": self.server_up.bytes / self.costs.server_rate}
        for w in range(self.W):
            links[f"worker-{w} upload"] = S * self.to_server[w].bytes / self.costs.worker_rate
            links[f"worker-{w} download"] = S * self.to_worker[w].bytes / self.costs.worker_rate
        busiest = max(links, key=lambda k: (links[k], k.startswith("server")))
        utilization = links[busiest] * nominal / time
        pushed, pulled = S * self.bytes_in, S * self.bytes_out
        return {
            "mode": cfg.mode, "workers": self.W, "shards": S, "batch_size": cfg.batch_size,
            "train_time_s": round(time, 3), "samples": samples,
            "updates": self.version[0], "samples_per_s": samples / time,
            "updates_per_s": self.version[0] / time,
            "bytes_per_s": moved / time, "bytes": int(moved),
            "staleness_p50": percentile(stale, 0.5), "staleness_p99": percentile(stale, 0.99),
            "staleness_max": float(max(stale)) if stale else 0.0,
            "staleness_hist": {str(k): v * S for k, v in sorted(stale.items())},
            "clock_gap_max": max(self.gaps) if self.gaps else 0,
            "dropped": self.dropped * S,
            "bytes_per_sample": moved / max(1, samples),
            "bytes_pushed_per_sample": pushed / max(1, samples),
            "bytes_pulled_per_sample": pulled / max(1, samples),
            "push_compression": S * self.raw_in / max(1.0, pushed),
            "pull_compression": self.raw_out / max(1.0, self.payload_out),
            "link_utilization": round(utilization, 4) if cfg.link else None,
            "busiest_link": busiest if cfg.link else None,
            "server_utilization": round(self.busy_s / time, 4),
            "server_blocked_share": round(self.blocked_s / time, 4),
            "worker_waiting_share": round(sum(self.waiting_s) / (self.W * time), 4),
            "worker_steps": {str(w): s for w, s in enumerate(self.steps)},
            "events": self.clock.events,
        }


class _Feed:
    """ChunkFeed (common/wire/node.py) with one chunk ahead, its requests answered at once."""

    def __init__(self, ledger: Ledger, rank: int, live: int):
        self.ledger, self.rank, self.live = ledger, rank, live
        self.hand: deque[int] = deque()
        self.current: int | None = None
        self.ended = False
        self.done: list[int] = []
        self.seq = 0

    def _ask(self, want: int) -> None:
        self.seq += 1
        reply = self.ledger.request(self.rank, self.seq, self.done, want, live=self.live)
        self.done = []
        self.hand.extend(reply["chunks"])
        self.ended = reply["end"]

    def take(self) -> int | None:
        if self.current is not None:
            self.done.append(self.current)
            self.current = None
        if not self.hand and not self.ended:
            self._ask(2)
        if self.hand:
            self.current = self.hand.popleft()
        if self.done or (not self.ended and len(self.hand) < 1):
            self._ask(0 if self.ended else 1 - len(self.hand))
        return self.current

    def more(self) -> bool:
        return bool(self.hand) or not self.ended
