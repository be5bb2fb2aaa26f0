"""The state of one piece of a server's shard, and its answer to every request.

A server process (ps/server.py) holds its shard as pieces; each piece is a
`PieceState`: its slice of the vector, that slice's optimizer state, its version,
and the consistency rule of the run:

    async  apply every push as it arrives (Downpour SGD)
    sync   hold each worker's push for version v until every live worker (but
           `backup` of them) has pushed; apply their mean once; answer them all with
           version v+1; a push for a version already applied is dropped and counted
    ssp    apply every push as it arrives, but hold a worker's new weights while its
           worker clock is more than `staleness` ahead of the slowest live worker's

A hybrid run (PERSIA: a sparse model's tables async, ps/sparse.py) holds its pieces,
the dense part, to the sync rule (`rule`).

Two words keep two concepts apart. A worker clock (ssp; `worker_clock`) is the
number of that worker's pushes this piece has applied. A version is this piece's
count of its own updates; a push's header field `clock` is a version, the one its
gradient was computed on (`computed_on` below). A worker's last push says so
(meta last), and a finished worker no longer holds others back.

Guarantees:
- A message is fully validated (header, "piece" field, dtype, length, finite values)
  before anything changes; a bad one gets an error reply and changes nothing.
- A push is applied at most once per (sender, seq): a retried push is answered
  with the current state, not applied again.
- With the run's `secret` (a server the scheduler registered), a push counts under
  the worker its token names, whatever its `node` says; a push with no valid token,
  or from an incarnation of its rank older than one already heard, is refused
  (E_DENIED). Without it (a standalone server) the sender is its `node` name, and
  at most MAX_SENDERS of them are remembered. Either way what a sender can make
  the piece remember is bounded.
- Staleness (this piece's version when a push is applied minus `computed_on`, the
  version of this piece's weights its gradient was computed on) is counted for
  every push; in ssp mode so is the clock gap (the pushing worker's clock minus the
  slowest worker clock when its weights were sent), which the rule keeps <= staleness.
- Parameters go out zero-copy; the piece waits until ZeroMQ has sent them before
  it changes them again.
- Compression (common/wire/codec.py): a compressed push is decoded whole and checked
  like any other before anything changes. A pull names the codec of its reply (meta
  codec: the run's --pull-codec; the scheduler's pulls ask none). For topk pulls the
  piece keeps, per worker, the copy of the piece it sent that worker's incarnation
  (W x the piece's floats): the first pull of an incarnation (a new or restarted
  worker, or any worker after this server replaced another) gets the whole piece,
  later ones the largest entries of (weights - copy), the copy moved by exactly what
  was sent; a retried pull gets the same reply again.
- Checkpoints (slice, optimizer state, version, samples, seen sequence numbers, the
  run id) are written atomically; `restore` continues from them bit-exactly, and only
  from a checkpoint of the same run.
- Evaluation snapshots: `samples` counts the samples whose gradients this piece has
  applied and `loss_sum` their training losses (each push says what its gradient
  covers). With `eval_samples` = E > 0,
  the apply that takes `samples` to k*E or past it copies the weights, with the
  version, samples, loss sum and time of that moment, as snapshot k (one copy for several
  points passed at once). The scheduler pulls snapshot k (`pull`, meta snapshot=k)
  whenever it gets to it, and every piece answers with its weights of that moment,
  so an evaluation judges exactly the weights its record describes. At most
  SNAPSHOTS_KEPT are kept; a pull of k releases k and every earlier one; past the
  cap the oldest goes (that evaluation is skipped, never shifted).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zmq

from downpour.common.checkpoint import check_not_replaced, load_arrays, load_meta, save_arrays
from downpour.common.config import Config
from downpour.common.errors import ConfigError, DataError, ProtocolError
from downpour.common.nn.model import ModelSpec, initial_params
from downpour.common.nn.optim import make_optimizer
from downpour.common.nn.schedules import parse_schedule
from downpour.common.wire import codec, protocol, security

MAX_SENDERS = 4096      # distinct senders a piece without tokens keeps sequence numbers for
SNAPSHOTS_KEPT = 4      # evaluation snapshots (copies of the piece) kept until the scheduler pulls them
MAX_PUSH_SAMPLES = 1 << 40   # the most samples one push may say it covers


class Reply(NamedTuple):
    """A message to send: `frames` addressed to the peer whose ROUTER identity is `ident`."""

    ident: bytes
    frames: list


class HeldRequest(NamedTuple):
    """A request answered later (sync: until its version completes; ssp: while its worker
    is too far ahead): the peer to answer and the request's header."""

    ident: bytes
    header: dict


class Covered(NamedTuple):
    """What a push's gradient covers: its samples, and the sum of their training losses."""

    samples: int = 0
    loss_sum: float = 0.0


def covered(header: dict) -> Covered:
    """A push's meta samples and loss_sum (0 when it does not say); E_MALFORMED if bad."""
    meta = header.get("meta", {})
    samples, loss_sum = meta.get("samples", 0), meta.get("loss_sum", 0.0)
    if type(samples) is not int or not 0 <= samples <= MAX_PUSH_SAMPLES:
        raise protocol.error(protocol.E_MALFORMED, f"meta samples must be an integer in "
                             f"[0, {MAX_PUSH_SAMPLES}], got {samples!r}")
    if type(loss_sum) not in (int, float) or not math.isfinite(loss_sum):
        raise protocol.error(protocol.E_MALFORMED, f"meta loss_sum must be a finite number, "
                             f"got {loss_sum!r}")
    return Covered(samples, float(loss_sum))


def worker_rank(node: str) -> int | None:
    """3 for "worker-3" (ranks below MAX_WORKERS); None for any other sender."""
    prefix, _, rank = node.partition("-")
    if prefix != "worker" or not (rank.isascii() and rank.isdigit()) or len(rank) > 6:
        return None
    return int(rank) if int(rank) < protocol.MAX_WORKERS else None


class Snapshot(NamedTuple):
    """The piece as it was when its applied samples reached an evaluation point."""

    version: int
    samples: int            # samples applied by then (>= the point)
    loss_sum: float         # the sum of their training losses
    time: float             # Unix seconds
    params: np.ndarray      # (hi - lo,) float32, a copy


class Sender(NamedTuple):
    """Who a request is from: `key` names it in last_seq; `rank` if it is a worker."""

    key: str
    rank: int | None


def identify(secret: bytes | None, incarnations: dict[int, int], header: dict,
             needs_token: bool) -> Sender:
    """Who sent `header`: with the run's `secret`, the worker its token names (E_DENIED for
    a bad token, for none where `needs_token`, or for an incarnation older than one
    already heard: `incarnations`, rank -> the latest, is updated); a request without a
    token where none is needed is nobody's. Without a secret, its `node` name."""
    if secret is None:
        return Sender(header["node"], worker_rank(header["node"]))
    if "token" not in header and not needs_token:
        return Sender(header["node"], None)
    rank, incarnation = security.read_token(secret, header.get("token"), "worker")
    latest = incarnations.get(rank, incarnation)
    if incarnation < latest:
        raise protocol.error(protocol.E_DENIED, f"worker-{rank} registered again since this "
                             "token was given; the old incarnation's requests are refused")
    incarnations[rank] = incarnation
    return Sender(f"worker-{rank}", rank)


@dataclass
class WorkerCopy:
    """topk pulls: what a worker's incarnation holds of this piece (every pull's reply
    applied), the seq of its last pull and that reply (for a retry)."""
    incarnation: int | None
    params: np.ndarray
    seq: int
    reply: tuple[dict, list]


class PieceState:
    """The state of one piece and its answer to every request."""

    def __init__(self, cfg: Config, spec: ModelSpec, rank: int, lo: int, hi: int,
                 initial: np.ndarray | None = None, node: str = "", run_id: str = "",
                 secret: bytes | None = None, eval_samples: int = 0):
        """Piece `rank` of the run `run_id` (the scheduler's), [lo, hi) of the vector;
        `initial` is the whole initial vector if the caller has it (else it is computed
        from the spec and seed); `secret` checks workers' tokens (None: no tokens);
        `eval_samples`: snapshot the weights every this many applied samples (0: never)."""
        self.cfg, self.rank, self.lo, self.hi, self.run_id = cfg, rank, lo, hi, run_id
        self.secret = secret
        self._incarnations: dict[int, int] = {}   # worker rank -> the latest incarnation heard
        self.incarnation = 0          # the registration of the server holding it (a fence)
        self.node = node or f"server-{rank}"
        if initial is None:
            initial = initial_params(spec, cfg.seed)
        self.params = initial[lo:hi].copy()                           # (hi - lo,) float32
        self.opt = make_optimizer(cfg.optimizer, **cfg.optimizer_kwargs())
        self.schedule = parse_schedule(cfg.lr_schedule, cfg.lr)
        self.version = 0
        self.samples = 0                          # samples whose gradients have been applied
        self.loss_sum = 0.0                       # ... and the sum of their training losses
        self.eval_samples = eval_samples
        self.snapshots: dict[int, Snapshot] = {}  # evaluation point k -> the piece at k*eval_samples
        self.live = set(range(cfg.workers))
        # ranks a push may come from: sync splits each global batch in W slices; an async
        # or ssp run takes new workers mid-run
        # the consistency rule of the pieces: hybrid runs hold the dense part to sync's
        self.rule = "sync" if cfg.mode == "hybrid" else cfg.mode
        self._ranks = cfg.workers if cfg.mode == "sync" else protocol.MAX_WORKERS
        self.finished: set[int] = set()           # workers whose last push has been taken
        self.worker_clock: Counter = Counter()    # ssp: worker rank -> its pushes applied
        self.last_seq: dict[str, int] = {}        # sender key -> seq of its last push taken
        self.staleness: Counter = Counter()
        self.gaps: Counter = Counter()            # ssp: clock gap of every push
        self._sent_at: dict[int, int] = {}        # ssp: rank -> slowest worker clock when its weights went
        self._blocked: dict[int, HeldRequest] = {}           # ssp: rank -> reply held back
        self.pushes = self.dropped = self.bytes_in = self.bytes_out = 0
        # what pushes and parameter replies would have been as float32 (raw_in, raw_out), and
        # the payload the parameter replies were (payload_out): the codecs' ratios
        self.raw_in = self.raw_out = self.payload_out = 0
        self.busy_s = 0.0                 # s spent answering requests (serve measures it)
        self.stopping = False
        self._waiting: dict[int, HeldRequest] = {}           # sync: rank -> its push
        self._grads: dict[int, np.ndarray] = {}              # sync: rank -> its gradient
        self._covers: dict[int, Covered] = {}             # sync: rank -> what its gradient covers
        self._recv = np.empty_like(self.params)              # a payload split over frames
        self._pulls: codec.Codec | None = None             # the run's pull codec, once asked
        self._copies: dict[int, WorkerCopy] = {}           # topk pulls: rank -> its copy
        self._sum = np.empty_like(self.params)
        self._trackers: list[zmq.MessageTracker] = []

    # -- requests ------------------------------------------------------------------------
    def handle(self, ident: bytes, frames: list) -> list[Reply]:
        """The replies `frames` (from peer `ident`) causes, possibly none yet (sync)."""
        try:
            header, payload = protocol.decode(frames)
        except ProtocolError as e:
            return [Reply(ident, protocol.error_reply(e.code, str(e), None, self.node))]
        return self.handle_request(ident, header, payload)

    def handle_request(self, ident: bytes, header: dict, payload: list) -> list[Reply]:
        """`handle` for a message whose header is already decoded."""
        self.bytes_in += sum(len(f) for f in payload)
        try:
            op = header["op"]
            if op not in protocol.SERVER_OPS:
                raise protocol.error(protocol.E_UNKNOWN_OP, f"operation {op!r} is not one of "
                                                    f"{', '.join(protocol.SERVER_OPS)}")
            if op in ("pull", "push", "push_pull") and header.get("piece") != self.rank:
                raise protocol.error(protocol.E_PIECE, f"this is piece {self.rank} ([{self.lo}, {self.hi})), "
                                               f"the request is for piece {header.get('piece')}")
            if op == "pull" and "snapshot" in header.get("meta", {}):
                return [Reply(ident, self._snapshot_reply(header))]
            if op in ("pull", "push_pull"):
                self._pull_codec(header)               # one the reply can be sent in
            if op == "pull":
                rank = self._sender(header, needs_token=False).rank
                if rank is not None:
                    self._sent_at[rank] = min(self._slowest(), self.worker_clock[rank])
                return [Reply(ident, self._reply(header))]
            if op in ("push", "push_pull"):
                return self._push(ident, header, payload)
            if op == "control":
                return [Reply(ident, self._control(header)), *self._released()]
            if op == "stats":
                return [Reply(ident, self._stats(header))]
            if op == "checkpoint":
                return [Reply(ident, self._checkpoint(header))]
            return [Reply(ident, self._shutdown(header))]
        except ProtocolError as e:
            return [Reply(ident, protocol.error_reply(e.code, str(e), header, self.node))]
        except (ConfigError, DataError, OSError) as e:
            return [Reply(ident, protocol.error_reply(protocol.E_STATE, str(e), header, self.node))]

    def _push(self, ident: bytes, header: dict, payload: list) -> list[Reply]:
        self.raw_in += 4 * (self.hi - self.lo)
        if "codec" in header:                      # compressed: decoded whole, then checked
            codec.dense(header, payload, self._recv)
            views = [self._recv]
        else:
            views = protocol.payload(header, payload, self.hi - self.lo)
        if len(views) == 1:
            grad = views[0]                        # zero-copy: the frame's own memory
        else:
            protocol.copy_payload(views, self._recv)
            grad = self._recv
        with np.errstate(over="ignore", invalid="ignore"):
            norm2 = float(np.dot(grad, grad))     # one pass; inf or nan if any element is
        if not math.isfinite(norm2):
            raise protocol.error(protocol.E_PAYLOAD, "the gradient holds NaN or infinite values (or values "
                                             "too large to square in float32); it was not applied")
        cover = covered(header)
        computed_on = header.get("clock", 0)
        if computed_on > self.version:
            raise protocol.error(protocol.E_STATE, f"clock {computed_on} is ahead of this piece's "
                                           f"version {self.version}; pull before pushing")
        sender = self._sender(header, needs_token=True)
        rank = sender.rank
        if header["seq"] <= self.last_seq.get(sender.key, -1):    # a retry of a push already taken
            return self._retry(ident, header, rank)
        if self.rule in ("sync", "ssp") and (rank is None or rank >= self._ranks):
            raise protocol.error(protocol.E_MALFORMED, f"{self.cfg.mode} pushes come from worker-<rank> "
                                 f"nodes with rank < {self._ranks}, not {header['node']!r}")
        if sender.key not in self.last_seq and len(self.last_seq) >= MAX_SENDERS:
            raise protocol.error(protocol.E_STATE, f"this piece already keeps {MAX_SENDERS} senders' "
                                 "sequence numbers; it takes pushes from no new one")
        if self.rule == "sync":
            return self._push_sync(ident, header, grad, sender, cover)
        self.last_seq[sender.key] = header["seq"]
        staleness = self.version - computed_on
        self._apply(grad, [staleness], cover,
                    lr_scale=1.0 / (1 + staleness) if self.cfg.staleness_lr else 1.0)
        if self.rule != "ssp":
            return [Reply(ident, self._reply(header))]
        self.gaps[self.worker_clock[rank] - self._sent_at.get(rank, 0)] += 1
        self.worker_clock[rank] += 1
        self._taken(rank, header)
        self._blocked[rank] = HeldRequest(ident, header)
        return self._released()

    def _retry(self, ident: bytes, header: dict, rank: int | None) -> list[Reply]:
        for held in (self._waiting, self._blocked):
            if rank in held and held[rank].header["seq"] == header["seq"]:
                held[rank] = HeldRequest(ident, header)      # still held: answer later
                return []
        return [Reply(ident, self._reply(header))]

    def _taken(self, rank: int, header: dict) -> None:
        """Note a worker's last push: it no longer holds anyone back."""
        if header.get("meta", {}).get("last") is True:
            self.finished.add(rank)

    def _push_sync(self, ident: bytes, header: dict, grad: np.ndarray, sender: Sender,
                   cover: Covered) -> list[Reply]:
        rank = sender.rank
        self.last_seq[sender.key] = header["seq"]
        self._taken(rank, header)
        if header.get("clock", 0) < self.version:             # a straggler's late gradient
            self.dropped += 1
            return [Reply(ident, self._reply(header, dropped=True))]
        replies = []
        if rank in self._waiting:                              # a second push for this version
            old = self._waiting[rank]
            replies.append(Reply(old.ident, protocol.error_reply(
                protocol.E_STATE, f"superseded by push seq {header['seq']} for the same version",
                old.header, self.node)))
        if rank not in self._grads:
            self._grads[rank] = np.empty_like(self.params)
        np.copyto(self._grads[rank], grad)
        self._covers[rank] = cover
        self._waiting[rank] = HeldRequest(ident, header)
        return replies + self._complete()

    def _complete(self) -> list[Reply]:
        """If enough live workers have pushed for this version: apply the mean of every
        gradient held for it (a worker declared dead after pushing still counts), answer all.

        Expected are the live workers that have not finished, and those whose last push
        is among the held ones; all but `backup` of them must have pushed.
        """
        expected = {r for r in self.live if r not in self.finished or r in self._waiting}
        need = max(1, len(expected) - self.cfg.backup)
        if not self._waiting or len(expected.intersection(self._waiting)) < need:
            return []
        ranks = sorted(self._waiting)                         # a fixed order: reproducible sums
        np.copyto(self._sum, self._grads[ranks[0]])
        for r in ranks[1:]:
            self._sum += self._grads[r]
        if len(ranks) > 1:
            self._sum *= np.float32(1.0 / len(ranks))
        covers = [self._covers[r] for r in ranks]
        self._apply(self._sum, [0] * len(ranks),
                    Covered(sum(c.samples for c in covers), sum(c.loss_sum for c in covers)))
        waiting, self._waiting = self._waiting, {}
        return [Reply(ident, self._reply(header)) for ident, header in (waiting[r] for r in ranks)]

    def _sender(self, header: dict, needs_token: bool) -> Sender:
        return identify(self.secret, self._incarnations, header, needs_token)

    def _slowest(self) -> float:
        """ssp: the lowest worker clock among live workers that have not finished."""
        return min((self.worker_clock[r] for r in self.live - self.finished), default=math.inf)

    def _released(self) -> list[Reply]:
        """Replies that may go now: sync, a version complete (a smaller live set can do
        that); ssp, weights for workers no longer too far ahead of the slowest."""
        if self.rule == "sync":
            return self._complete()
        if self.rule != "ssp":
            return []
        slowest, out = self._slowest(), []
        for rank in sorted(self._blocked):
            if (self.worker_clock[rank] - slowest <= self.cfg.staleness or rank not in self.live
                    or rank in self.finished):
                ident, header = self._blocked.pop(rank)
                self._sent_at[rank] = min(slowest, self.worker_clock[rank])
                out.append(Reply(ident, self._reply(header)))
        return out

    def _apply(self, grad: np.ndarray, staleness: list[int], cover: Covered,
               lr_scale: float = 1.0) -> None:
        """Apply `grad`, from len(staleness) pushes, the gradient of what `cover` says."""
        self.wait_sent()                           # params may still be going out zero-copy
        self.opt.step(self.params, grad, self.schedule(self.opt.t) * lr_scale)
        self.version += 1
        self.pushes += len(staleness)
        self.staleness.update(staleness)
        before, self.samples = self.samples, self.samples + cover.samples
        self.loss_sum += cover.loss_sum
        if self.eval_samples and self.samples // self.eval_samples > before // self.eval_samples:
            self._take_snapshot(self.samples // self.eval_samples)

    def _take_snapshot(self, point: int) -> None:
        """Keep the weights of evaluation point `point` (sends in flight are done: `_apply`
        waited), reusing the buffer of the oldest snapshot once SNAPSHOTS_KEPT are held."""
        buffer = None
        if len(self.snapshots) >= SNAPSHOTS_KEPT:
            buffer = self.snapshots.pop(min(self.snapshots)).params
        if buffer is None:
            buffer = np.empty_like(self.params)
        np.copyto(buffer, self.params)
        self.snapshots[point] = Snapshot(self.version, self.samples, self.loss_sum, time.time(),
                                         buffer)

    def _snapshot_reply(self, header: dict) -> list:
        """The answer to a pull of evaluation snapshot k: its weights, version (clock),
        samples and time; snapshots up to k are released once it has gone."""
        point = header["meta"]["snapshot"]
        if type(point) is not int:
            raise protocol.error(protocol.E_MALFORMED, f"snapshot must be an integer, got {point!r}")
        snap = self.snapshots.get(point)
        if snap is None:
            raise protocol.error(protocol.E_STATE, f"no snapshot of evaluation point {point} here "
                                 f"(held: {sorted(self.snapshots) or 'none'})")
        for k in [k for k in self.snapshots if k <= point]:
            del self.snapshots[k]           # the buffer lives on in the reply until it is sent
        return protocol.encode({"op": "ok", "node": self.node, "seq": header["seq"],
                                "clock": snap.version,
                                "meta": {"samples": snap.samples, "loss_sum": snap.loss_sum,
                                         "time": snap.time}}, snap.params)

    def _reply(self, header: dict, **meta: Any) -> list:
        """The answer to a pull, push or push_pull: the version, and the parameters if asked
        (a pull's with the samples applied to them)."""
        if header["op"] == "pull":
            meta.update(samples=self.samples, loss_sum=self.loss_sum)
        reply = {"op": "ok", "node": self.node, "seq": header["seq"], "clock": self.version,
                 **({"meta": meta} if meta else {})}
        if header["op"] not in ("pull", "push_pull"):
            return protocol.encode(reply)
        pulls, n = self._pull_codec(header), self.hi - self.lo
        fields, parts = {}, []
        if pulls is not None and pulls.name != "topk":
            fields, parts = pulls.encode(self.params)
        elif pulls is not None:
            fields, parts = self._delta(header, pulls)    # ({}, []) on its first pull
        frames = ([*protocol.encode({**reply, **fields, "n": n}), *parts] if fields
                  else protocol.encode(reply, self.params))
        self.raw_out += 4 * n
        self.payload_out += sum(len(f) for f in frames[1:])
        return frames

    def _delta(self, header: dict, topk: codec.Codec) -> tuple[dict, list]:
        """A topk pull's reply: the largest entries of (the weights - the copy this piece
        sent the worker so far), the copy then moved by exactly what is sent, so what is
        not sent now is sent later. ({}, []) when it has no copy of this worker's
        incarnation (new, restarted, or this server is new): the caller sends the whole
        piece, now the copy. A retry of the last pull (same seq) gets the same reply."""
        rank = self._sender(header, needs_token=False).rank
        incarnation = self._incarnations.get(rank)
        held = self._copies.get(rank)
        if held is None or held.incarnation != incarnation:
            self._copies[rank] = WorkerCopy(incarnation, self.params.copy(), -1, ({}, []))
            return {}, []
        if held.seq == header["seq"]:
            return held.reply
        delta = np.subtract(self.params, held.params, out=self._recv)
        fields, parts = topk.encode(delta)
        idx, values = topk.decode_sparse(fields, parts, len(delta))
        held.params[idx] += values
        held.seq, held.reply = header["seq"], (fields, parts)
        return fields, parts

    def _pull_codec(self, header: dict) -> codec.Codec | None:
        """The codec a pull or push_pull asks its reply in (meta codec): None for none (the
        scheduler's pulls), the run's --pull-codec; E_MALFORMED for any other."""
        asked = header.get("meta", {}).get("codec", "none")
        if asked == "none":
            return None
        if asked != self.cfg.pull_codec:
            raise protocol.error(protocol.E_MALFORMED, f"a pull asked for codec {asked!r}; this "
                                 f"run's pull codec is {self.cfg.pull_codec!r}")
        if self._pulls is None:
            self._pulls = codec.parse(asked)
        return self._pulls

    def _stats(self, header: dict) -> list:
        return self._ok(header, version=self.version, pushes=self.pushes, dropped=self.dropped,
                        staleness={str(k): v for k, v in sorted(self.staleness.items())},
                        clock_gap={str(k): v for k, v in sorted(self.gaps.items())},
                        bytes_in=self.bytes_in, bytes_out=self.bytes_out, busy_s=self.busy_s,
                        raw_in=self.raw_in, raw_out=self.raw_out, payload_out=self.payload_out,
                        lr=self.schedule(self.opt.t), live=sorted(self.live),
                        samples=self.samples, snapshots=sorted(self.snapshots))

    def _control(self, header: dict) -> list:
        meta = header.get("meta", {})
        if "lr_scale" in meta:
            scale = meta["lr_scale"]
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
                raise protocol.error(protocol.E_MALFORMED,
                                     f"lr_scale must be a finite number > 0, got {scale!r}")
        if "live" in meta:
            live = meta["live"]
            if not isinstance(live, list) or not all(
                    type(r) is int and 0 <= r < self._ranks for r in live):
                raise protocol.error(protocol.E_MALFORMED,
                                     f"live must be a list of worker ranks < {self._ranks}, "
                                     f"got {live!r}")
        if "lr_scale" in meta:                    # after every check: an error changes nothing
            self.schedule.scale = float(meta["lr_scale"])
        if "live" in meta:
            self._set_live(set(meta["live"]))
        return self._ok(header)

    def _set_live(self, live: set[int]) -> None:
        """ssp: a worker that (re)joins starts at the slowest live worker clock, as if it had kept
        pace: it holds nobody back for the pushes it missed, and runs no further ahead."""
        joining = live - self.live
        slowest = self._slowest()
        for rank in joining:
            self.finished.discard(rank)
            if slowest != math.inf:
                self.worker_clock[rank] = max(self.worker_clock[rank], int(slowest))
        self.live = live

    def _checkpoint(self, header: dict) -> list:
        if not self.cfg.checkpoint_dir:
            raise protocol.error(protocol.E_STATE, "this server has no --checkpoint-dir")
        return self._ok(header, path=str(self.checkpoint()))

    def _shutdown(self, header: dict) -> list:
        self.stopping = True
        return self._ok(header)

    def _ok(self, header: dict, **meta: Any) -> list:
        return protocol.encode({"op": "ok", "node": self.node, "seq": header["seq"],
                                "clock": self.version, "meta": meta})

    # -- sends in flight -------------------------------------------------------------------
    def sent(self, tracker: zmq.MessageTracker, nbytes: int) -> None:
        self._trackers.append(tracker)
        self.bytes_out += nbytes

    def wait_sent(self) -> None:
        """Make `params` safe to change: wait for zero-copy sends of it to finish.

        If one has not finished within timeout_s (a peer not reading), the piece
        moves on to a copy of its parameters, leaving the old buffer to ZeroMQ.
        """
        for t in self._trackers:
            try:
                t.wait(self.cfg.timeout_s)
            except zmq.NotDone:
                self.params = self.params.copy()
                break
        self._trackers.clear()

    # -- checkpoints -----------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        return Path(self.cfg.checkpoint_dir) / f"piece-{self.lo}-{self.hi}.npz"

    def checkpoint(self) -> Path:
        """Write this piece's state atomically; return the path."""
        state = self.opt.state_dict(textbook=False)
        arrays = {"params": self.params,
                  **{f"opt.{k}": v for k, v in state.items() if isinstance(v, np.ndarray)}}
        scalars = {k: (list(v) if isinstance(v, tuple) else v) for k, v in state.items()
                   if not isinstance(v, np.ndarray)}
        meta = {"run_id": self.run_id, "incarnation": self.incarnation, "rank": self.rank,
                "lo": self.lo, "hi": self.hi, "version": self.version, "samples": self.samples,
                "loss_sum": self.loss_sum,
                "optimizer": scalars,
                "schedule": self.schedule.state_dict(),
                "last_seq": self.last_seq, "pushes": self.pushes, "dropped": self.dropped,
                "staleness": {str(k): v for k, v in self.staleness.items()}}
        path = self.checkpoint_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        check_not_replaced(path, self.run_id, self.incarnation, "piece checkpoint")
        self.wait_sent()
        save_arrays(path, arrays, meta)
        return path

    def saved_run(self) -> str | None:
        """The run id of this piece's checkpoint: None if there is none, "" if it names no
        run (written before runs had ids). DataError if the file is not a checkpoint."""
        path = self.checkpoint_path()
        if not path.is_file():
            return None
        return str(load_meta(path, "piece checkpoint").get("run_id", ""))

    def restore(self) -> None:
        """Continue from this piece's checkpoint; DataError if it is missing, of another run,
        or does not fit."""
        path = self.checkpoint_path()
        if not path.is_file():
            there = sorted(p.name for p in path.parent.glob("piece-*.npz"))
            raise DataError(f"no checkpoint for piece [{self.lo}, {self.hi}) in {path.parent} "
                            f"(it holds {there or 'none'}); resume with the same model, number "
                            "of shards and piece size, or start without --resume")
        arrays, meta = load_arrays(path, "piece checkpoint")
        if meta.get("run_id", "") != self.run_id:
            raise DataError(f"{path} is a checkpoint of run {meta.get('run_id') or '(unnamed)'}, "
                            f"this piece belongs to run {self.run_id or '(unnamed)'}: a checkpoint "
                            "continues only the run that wrote it")
        if (meta.get("rank"), meta.get("lo"), meta.get("hi")) != (self.rank, self.lo, self.hi):
            raise DataError(f"{path} holds piece {meta.get('rank')} [{meta.get('lo')}, "
                            f"{meta.get('hi')}), this is piece {self.rank} [{self.lo}, "
                            f"{self.hi}): resume with the same model and number of shards")
        params = arrays.get("params")
        if params is None or params.shape != self.params.shape:
            raise DataError(f"{path}: parameters do not match piece [{self.lo}, {self.hi})")
        self.opt.load_state_dict({**meta["optimizer"],
                                  **{k[4:]: v for k, v in arrays.items() if k.startswith("opt.")}})
        self.schedule.load_state_dict(meta["schedule"])
        self.params[:] = params
        self.version, self.last_seq = int(meta["version"]), dict(meta["last_seq"])
        self.samples = int(meta.get("samples", 0))
        self.loss_sum = float(meta.get("loss_sum", 0.0))
        self.snapshots = {}           # the next point passed is the next snapshot
        self.pushes, self.dropped = int(meta["pushes"]), int(meta["dropped"])
        self.staleness = Counter({int(k): v for k, v in meta["staleness"].items()})
