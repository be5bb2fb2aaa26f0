"""The client side of the shard servers: pull, push and push_pull over one DEALER per server.

A request to the whole model goes out to every piece before any reply is awaited;
replies are then collected as they come. Each piece's request has a timeout and a
bounded number of retries with the same sequence number, so a server applies a
retried push at most once; a reply to an earlier attempt is recognised by its seq
and discarded. After the last retry a ClusterError names the piece and address.

A server may hold several pieces of the vector (downpour.common.nn.layout.Layout.pieces). The
client keeps one DEALER per server, not per piece: the requests for one server's
pieces travel in order on one connection, so the server applies piece k while
piece k+1 is still arriving, and the client copies reply k while the server
works on k+1. (A socket per piece was measured slower: the server's ROUTER
interleaves the connections, so every piece arrives at the end.) Replies are
matched to pieces by their sequence number.

Payload frames are sent zero-copy from the caller's array: `start` returns once
the frames are queued, and the array must stay unchanged until `finish` returns
(or `wait_sent` does). Parameters in a reply are copied straight into the
caller's output array, each piece into its range.

Every piece has its own version (each server applies pushes to its pieces on its
own), so the client keeps one per piece: `versions[i]` is the version of the
parameters piece i last sent. A push says, per piece, the version its gradient was
computed on. One number for all pieces (the lowest) was measured wrong: after a
server was restored from an older checkpoint, the healthy pieces counted every
later push as stale by the checkpoint's age (the README's "Measured" section has
the figures).

Used by workers (all three verbs), by the scheduler (pull for evaluation, and the
control operations through `call`) and by the benchmarks. Its sockets come from
downpour.common.wire.sockets, as every role's do.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np
import zmq

from downpour.common.errors import ClusterError, DownpourError
from downpour.common.nn.layout import owners
from downpour.common.wire import codec, protocol
from downpour.common.wire.security import Keys
from downpour.common.wire.sockets import frame_limit, make_socket, send

WAIT_TICK = 0.1    # seconds without a reply before ShardClient.while_waiting runs

Versions = int | Sequence[int]   # what a push was computed on: one version per piece, or one for all


class Pending(NamedTuple):
    """A request in flight to one piece; a retry resends `frames` as they are, with the same `seq`."""

    seq: int
    frames: list        # the encoded request (header, then payload frames)
    op: str


class ShardClient:
    """Requests to the pieces of the vector: piece i is `ranges[i]` = (lo, hi), held by the
    server at `addresses[i]` (one address may hold several pieces)."""

    def __init__(self, addresses: list[str], ranges: list[tuple[int, int]], node: str,
                 timeout: float = 30.0, retries: int = 3, ctx: zmq.Context | None = None,
                 while_waiting: Callable[[], None] | None = None, first_seq: int = 0,
                 keys: Keys | None = None, token: bytes | None = None,
                 push_codec: str = "none", pull_codec: str = "none"):
        """`while_waiting` runs whenever WAIT_TICK seconds pass without a reply: the
        caller's chance to answer its own peers (the scheduler's heartbeats) and to
        `reconnect` to a server that has been replaced. A piece whose socket it
        replaces is sent again at once. Sequence numbers start after `first_seq`: a
        worker that takes over a rank starts past its predecessor's, which servers
        remember per rank. `keys`: the cluster's, as this node's role; `token`: the
        one a worker's registration gave, sent with every request. `push_codec`
        compresses the gradients pushed (common/wire/codec.py), keeping what a lossy
        codec did not send as a residual added to the next push (error feedback);
        `pull_codec` is the codec a pull asks its reply in."""
        if len(addresses) != len(ranges):
            raise ValueError(f"{len(addresses)} addresses for {len(ranges)} pieces")
        self.ctx = ctx or zmq.Context.instance()
        self.node, self.timeout, self.retries = node, timeout, retries
        self.keys, self.token = keys, token
        self.ranges = [tuple(r) for r in ranges]
        self.addresses = list(addresses)
        self._socks: dict[str, zmq.Socket] = {}   # server address -> its DEALER
        self._poller = zmq.Poller()                # polls every socket of _socks
        self._connect()
        self.while_waiting = while_waiting
        self.seq = first_seq
        self._pending: dict[int, Pending] | None = None    # piece -> its request in flight
        self._trackers: list[zmq.MessageTracker] = []
        # per piece: the version of the parameters it last sent (pull, push_pull)
        self.versions = [0] * len(self.ranges)
        self.bytes_sent = self.bytes_received = 0    # every frame, retries in
        self.push_codec = None if push_codec == "none" else codec.parse(push_codec)
        self.pull_codec = pull_codec
        self.compress = True            # False: send and ask uncompressed (a codec warm-up)
        self._residual: np.ndarray | None = None     # error feedback: what pushes left unsent
        self._with_residual: np.ndarray | None = None    # a push's gradient + the residual

    # -- the verbs -------------------------------------------------------------------------
    def pull(self, out: np.ndarray) -> int:
        """Fill `out` (the whole vector) with the servers' parameters; return the lowest version."""
        self.start("pull")
        return self.finish(out)

    def push(self, grad: np.ndarray, computed_on: Versions, last: bool = False,
             covered: tuple[int, float] = (0, 0.0)) -> int:
        """Send `grad` (the whole vector), computed on the version(s) `computed_on` (one per
        piece, or one for all; the header's clock); return the lowest new version.

        `last` tells the servers it is this worker's final push; `covered` what the
        gradient covers: (samples, the sum of their losses), which servers count for
        evaluation points."""
        self.start("push", grad, computed_on, last, covered)
        return self.finish()

    def push_pull(self, grad: np.ndarray, computed_on: Versions, out: np.ndarray, last: bool = False,
                  covered: tuple[int, float] = (0, 0.0)) -> int:
        """push, and fill `out` with the parameters after it, in one round trip per piece."""
        self.start("push_pull", grad, computed_on, last, covered)
        return self.finish(out)

    def pull_replies(self, out: np.ndarray, snapshot: int | None = None) -> list[dict[str, Any]]:
        """`pull`, returning the reply headers in piece order (clock: the version; meta
        samples and loss_sum: the samples applied to those weights and the sum of their
        training losses). With `snapshot` = k, the weights
        every piece kept of evaluation point k (meta time: when), and RemoteError E_STATE
        if a piece holds no such snapshot."""
        meta = {"snapshot": snapshot} if snapshot is not None else None
        self._pending = {s: self._send(s, "pull", meta=meta) for s in range(len(self.ranges))}
        replies = self._collect(out)
        return [replies[s] for s in range(len(self.ranges))]

    def call(self, piece: int, op: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """A control operation (stats, control, checkpoint, shutdown) to one piece; its reply header."""
        self._pending = {piece: self._send(piece, op, meta=meta)}
        return self._collect(None)[piece]

    def call_all(self, op: str, meta: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """`call` on every piece at once; the reply headers in piece order."""
        self._pending = {s: self._send(s, op, meta=meta) for s in range(len(self.ranges))}
        replies = self._collect(None)
        return [replies[s] for s in range(len(self.ranges))]

    # -- split in two, so that work can overlap a request in flight ------------------------------
    def start(self, op: str, grad: np.ndarray | None = None, computed_on: Versions = 0,
              last: bool = False, covered: tuple[int, float] = (0, 0.0)) -> None:
        """Send `op` to every piece (with its slice of `grad`, and the version its slice was
        computed on), without waiting for replies."""
        if self._pending is not None:
            raise RuntimeError("a request is already in flight; call finish() first")
        versions = [computed_on] * len(self.ranges) if isinstance(computed_on, int) else list(computed_on)
        if len(versions) != len(self.ranges):
            raise ValueError(f"{len(versions)} versions for {len(self.ranges)} pieces")
        samples, loss_sum = covered
        meta = {**({"last": True} if last else {}),
                **({"samples": samples, "loss_sum": loss_sum} if samples else {})}
        self._pending = {s: self._send(s, op, grad, versions[s], meta) for s in range(len(self.ranges))}

    def finish(self, out: np.ndarray | None = None) -> int:
        """Wait for the replies of `start`; copy parameters into `out`; return the lowest version."""
        replies = self._collect(out)
        return min(h.get("clock", 0) for h in replies.values())

    def wait_sent(self) -> None:
        """Block until ZeroMQ no longer needs the arrays of sent requests."""
        for t in self._trackers:
            t.wait(self.timeout)
        self._trackers.clear()

    # -- internals --------------------------------------------------------------------------
    def _send(self, piece: int, op: str, grad: np.ndarray | None = None, computed_on: int = 0,
              meta: dict[str, Any] | None = None) -> Pending:
        self.seq += 1
        lo, hi = self.ranges[piece]
        header: dict[str, Any] = {"op": op, "node": self.node, "seq": self.seq, "piece": piece,
                                  "clock": computed_on}
        if self.token is not None:
            header["token"] = self.token
        if op in ("pull", "push_pull") and self.compress and self.pull_codec != "none":
            meta = {**(meta or {}), "codec": self.pull_codec}   # (the scheduler's: none)
        if meta:
            header["meta"] = meta
        if grad is None or self.push_codec is None or not self.compress:
            frames = protocol.encode(header, None if grad is None else grad[lo:hi])
        else:
            fields, parts = self.push_codec.encode(*self._feedback(grad, lo, hi))
            frames = [*protocol.encode({**header, **fields, "n": hi - lo}), *parts]
        self._post(piece, frames)
        return Pending(self.seq, frames, op)

    def _feedback(self, grad: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(grad[lo:hi] + the residual of earlier pushes there, the residual's slice, which
        the codec overwrites with what it leaves unsent)."""
        if self._residual is None or len(self._residual) != len(grad):
            self._residual = np.zeros_like(grad)
            self._with_residual = np.empty_like(grad)
        x = np.add(grad[lo:hi], self._residual[lo:hi], out=self._with_residual[lo:hi])
        return x, self._residual[lo:hi]

    def _post(self, piece: int, frames: list) -> None:
        self.bytes_sent += sum(len(f) for f in frames)
        tracker = send(self._socks[self.addresses[piece]], frames, track=True)
        if tracker:
            self._trackers.append(tracker)

    def _collect(self, out: np.ndarray | None) -> dict[int, dict[str, Any]]:
        """Replies of the pending requests by piece, retrying pieces whose server stays silent."""
        pending, self._pending = self._pending or {}, None
        piece_of = {p.seq: s for s, p in pending.items()}
        replies: dict[int, dict[str, Any]] = {}
        attempts = dict.fromkeys(pending, 0)
        deadline = dict.fromkeys(pending, time.monotonic() + self.timeout)
        sent_on = {s: self._socks[self.addresses[s]] for s in pending}
        while len(replies) < len(pending):
            now = time.monotonic()
            for s in pending:
                if s in replies:
                    continue
                if self._socks[self.addresses[s]] is not sent_on[s]:    # reconnected meanwhile:
                    sent_on[s], deadline[s] = self._socks[self.addresses[s]], now + self.timeout
                    self._post(s, pending[s].frames)              # to the new server, at once
                    continue
                if now < deadline[s]:
                    continue
                if attempts[s] >= self.retries:
                    raise ClusterError(
                        f"piece {s} at {self.addresses[s]} did not answer {pending[s].op!r} in "
                        f"{self.retries + 1} attempts of {self.timeout:g} s; is the server running"
                        + (", and are these the cluster's keys?" if self.keys else "?"))
                attempts[s] += 1
                deadline[s] = now + self.timeout
                self._post(s, pending[s].frames)                  # the same seq: idempotent
            wait = max(0.0, min(deadline[s] for s in pending if s not in replies) - now)
            if self.while_waiting is not None:
                wait = min(wait, WAIT_TICK)
            events = self._poller.poll(1000 * wait)
            if not events and self.while_waiting is not None:
                self.while_waiting()                              # may reconnect pieces
            for sock, _ in events:
                frames = sock.recv_multipart(copy=False)
                self.bytes_received += sum(len(f) for f in frames)
                header, payload = protocol.decode(frames)
                s = piece_of.get(header.get("seq"))
                if s is None or s in replies:
                    continue                                      # a reply to an earlier attempt
                protocol.raise_for_error(header)
                self._take(s, header, payload, out)
                replies[s] = header
        self._trackers = [t for t in self._trackers if not t.done]
        return replies

    def _take(self, s: int, header: dict[str, Any], payload: list, out: np.ndarray | None) -> None:
        """A reply's parameters into `out` (piece s's range), and the piece's version."""
        if out is not None and payload:
            lo, hi = self.ranges[s]
            if "codec" in header:
                codec.apply(header, payload, out[lo:hi])   # a pull's codec
            else:
                protocol.copy_payload(protocol.payload(header, payload, hi - lo), out[lo:hi])
            self.versions[s] = header.get("clock", 0)

    def _max_frame(self) -> int:
        """The largest frame a reply may have (the sockets' limit)."""
        return frame_limit(self.ranges)

    def _connect(self) -> None:
        """One DEALER per server address in use; sockets of addresses no longer used are closed."""
        for address in set(self._socks) - set(self.addresses):
            self._socks.pop(address).close()
        for address in self.addresses:
            if address not in self._socks:
                try:
                    self._socks[address] = make_socket(self.ctx, zmq.DEALER, address, keys=self.keys,
                                                       peer="server", max_frame=self._max_frame())
                except DownpourError:
                    self.close()                  # no socket outlives a client that failed
                    raise
        self._poller = zmq.Poller()
        for sock in self._socks.values():
            self._poller.register(sock, zmq.POLLIN)

    def follow(self, reply: dict[str, Any], servers_of: Sequence[int],
               known: Sequence[int] | None) -> None:
        """Reconnect every piece whose server was replaced, from the scheduler's heartbeat
        `reply` (servers: their addresses; incarnations): moved, or restarted at the same
        address (an incarnation other than `known`, the one last heard), whose new process
        never got what was sent to the old one. Piece i is held by server servers_of[i]."""
        servers, incarnations = reply.get("servers"), reply.get("incarnations")
        if not servers:
            return
        for piece, server in enumerate(servers_of):
            restarted = known is not None and incarnations is not None and \
                known[server] != incarnations[server]
            if restarted or servers[server] != self.addresses[piece]:
                self.reconnect(piece, servers[server])

    def reconnect(self, piece: int, address: str) -> None:
        """Point piece `piece` at a new address (its server was replaced); a new
        socket even if the address is the same, so nothing queued for the old server is sent."""
        if self.addresses[piece] == address and address in self._socks:
            self._socks.pop(address).close()
        self.addresses[piece] = address
        self._connect()

    def close(self) -> None:
        """Close every socket; safe to call twice."""
        for sock in self._socks.values():
            sock.close()
        self._socks = {}

    def __enter__(self) -> "ShardClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TableClient(ShardClient):
    """sparse_pull and sparse_push to the tables of the servers at `addresses` (server i's
    rows are the keys downpour.common.nn.layout.owners places on i), rows of `dim` floats.

    A request goes to every server that owns some of its keys, before any reply is
    awaited, with the same timeouts, retries and sequence numbers as ShardClient's (a
    retried push is applied once). `start_*` returns once the frames are queued; the
    key and gradient arrays it was given must not change until `finish` returns."""

    def __init__(self, addresses: list[str], node: str, dim: int, timeout: float = 30.0,
                 retries: int = 3, ctx: zmq.Context | None = None, first_seq: int = 0,
                 keys: Keys | None = None, token: bytes | None = None,
                 while_waiting: Callable[[], None] | None = None):
        super().__init__(addresses, [(0, 0)] * len(addresses), node, timeout, retries, ctx,
                         while_waiting, first_seq, keys, token)
        self.dim = dim
        self._rows: np.ndarray | None = None          # a pull's rows, filled as replies come
        self._parts: dict[int, np.ndarray] = {}       # server -> positions of its keys
        self._held: list[np.ndarray] = []             # arrays ZeroMQ may still be sending

    def pull(self, table: int, keys: np.ndarray, train: bool = True) -> np.ndarray:
        """The rows (len(keys), dim) float32 of sorted unique `keys`; `train` false: an
        evaluation pull, which creates and counts nothing (keys without rows read 0)."""
        self.start_pull(table, keys, train)
        return self.finish_sparse()

    def push(self, table: int, keys: np.ndarray, grads: np.ndarray) -> None:
        """Push one gradient row per key of sorted unique `keys` (grads (len(keys), dim))."""
        self.start_push(table, keys, grads)
        self.finish_sparse()

    def start_pull(self, table: int, keys: np.ndarray, train: bool = True) -> None:
        self._rows = np.empty((len(keys), self.dim), np.float32)
        self._start("sparse_pull", table, keys, None, {"train": train})

    def start_push(self, table: int, keys: np.ndarray, grads: np.ndarray) -> None:
        if grads.shape != (len(keys), self.dim):
            raise ValueError(f"grads of shape {grads.shape} for {len(keys)} keys of dim {self.dim}")
        self._rows = None
        self._start("sparse_push", table, keys, grads, None)

    def finish_sparse(self) -> np.ndarray | None:
        """Wait for the replies of `start_pull` (its rows) or `start_push` (None)."""
        self._collect(None)
        self._held.clear()
        rows, self._rows = self._rows, None
        return rows

    def _start(self, op: str, table: int, keys: np.ndarray, grads: np.ndarray | None,
               meta: dict[str, Any] | None) -> None:
        if self._pending is not None:
            raise RuntimeError("a request is already in flight; call finish_sparse() first")
        where = owners(keys, len(self.addresses))
        self._parts = {s: idx for s in range(len(self.addresses))
                       if len(idx := np.flatnonzero(where == s))}
        self._pending = {}
        for s, idx in self._parts.items():
            part = np.ascontiguousarray(keys[idx], dtype=protocol.KEY_DTYPE)
            rows = None if grads is None else np.ascontiguousarray(grads[idx], dtype=np.float32)
            self._held += [part] + ([rows] if rows is not None else [])
            self.seq += 1
            header: dict[str, Any] = {"op": op, "node": self.node, "seq": self.seq, "table": table}
            if self.token is not None:
                header["token"] = self.token
            if meta:
                header["meta"] = meta
            frames = protocol.encode_sparse(header, part, rows)
            self._post(s, frames)
            self._pending[s] = Pending(self.seq, frames, op)

    def _take(self, s: int, header: dict[str, Any], payload: list, out: np.ndarray | None) -> None:
        if self._rows is None:
            return
        idx = self._parts[s]
        views = protocol.payload(header, payload, len(idx) * self.dim)
        flat = views[0] if len(views) == 1 else np.concatenate(views)
        self._rows[idx] = flat.reshape(len(idx), self.dim)

    def _max_frame(self) -> int:
        return protocol.MAX_FRAME

    def stats(self, table: int = 0) -> list[dict[str, Any]]:
        """Every server's stats of `table` (the reply headers' meta), in server order."""
        return self.call(range(len(self.addresses)), "stats", table)

    def shutdown(self, table: int = 0) -> None:
        """Tell every server's tables the run is over (the scheduler's)."""
        self.call(range(len(self.addresses)), "shutdown", table)

    def call(self, servers: Iterable[int], op: str, table: int = 0) -> list[dict[str, Any]]:
        """`op` (stats, checkpoint, shutdown) to the tables of `servers`; the replies' meta
        in that order. RemoteError for the first error reply."""
        servers = list(servers)
        self._rows = None
        self._pending = {}
        for s in servers:
            self.seq += 1
            frames = protocol.encode({"op": op, "node": self.node, "seq": self.seq, "table": table})
            self._post(s, frames)
            self._pending[s] = Pending(self.seq, frames, op)
        replies = self._collect(None)
        return [replies[s].get("meta", {}) for s in servers]
