"""`downpour bench comm`: push_pull, and sparse pull and push, through real servers against raw
pyzmq, in one run.

For each vector (the MLP 784-1024-1024-10, 1,863,690 float32; and a 16M-parameter
vector), each number of servers S (1, 2, 4) and each transport (ipc, tcp), five
contenders carry the whole vector out and back through S server processes each:

  downpour    ShardClient.push_pull through S real shard servers (ps.server.standalone):
              encode, zero-copy send of each piece, validation, the SGD update, the
              reply, and the copy of the new weights into place
  curve       the same with CurveZMQ: the cluster's keys (security.write_keys, in a
              temporary folder removed afterwards), a ZAP handler in every server,
              every frame encrypted and authenticated both ways
  work        raw pyzmq doing a server's work, with nothing of downpour's protocol:
              the same pieces on one DEALER per server; each server checks each
              gradient piece is finite (np.dot(g, g), one pass, as ps/piece.py does),
              applies SGD to its piece in place (float32, p -= lr * g), and replies
              with the updated piece zero-copy
  work+curve  `work` over CurveZMQ, with the same keys and ZAP handler as `curve`
  bare        S raw echo servers: the client sends each server its slice zero-copy,
              each answers with a slice of its own without reading the gradient, and
              the client copies the answers into place: the least any parameter
              server must do. One message per server, not per piece: with large
              slices nothing overlaps, and bare can be slower than downpour (ratio > 1)

The contenders are timed in alternating rounds (bench.timing.interleaved), so load
on a shared machine hits all of them; a figure is the median round trip, in ms.
GB/s per direction is the vector's bytes over the round-trip time (each direction
carries that many bytes once per round trip). Every ratio is a throughput kept,
time of the reference / time of the contender (1 = as fast, 0.5 = half as fast):

  field (table header)     throughput of / of   what it measures
  ratio (ratio)            downpour / bare      what the protocol and the work cost
  work_ratio (work)        downpour / work      downpour over raw pyzmq doing the same work
  curve_ratio (curve)      curve / downpour     what encryption costs downpour
  raw_curve_ratio (raw c)  work+curve / work    what encryption costs raw pyzmq
  curve_work_ratio (c/w)   curve / work+curve   downpour over raw pyzmq, both encrypted

The table gives, per row (vector, S, transport `tr`, pieces of the vector), each
contender's milliseconds, downpour's GB/s and the five ratios. JSON rows carry every
field: vector, shards, transport, pieces, `<contender>_ms` and `<contender>_gb_s` for
downpour, curve, work, work_curve and bare, and the five ratios.

Sparse rows (app/bench/sparse.py): pulls and pushes of a batch of keys through the
servers' tables, against raw pyzmq doing the same lookups.

Flags (app/cli.py): --vectors picks rows among mlp, 16M and sparse (default all);
--shards and --transports apply to every row;
--sparse-keys sets K; --repeats is the timed calls per contender (the sparse rows make
SPARSE_CALLS times as many of each operation).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import socket
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import zmq

from downpour.bench.timing import interleaved
from downpour.common.config import Config, parse_list
from downpour.common.errors import ConfigError
from downpour.common.nn.layout import Piece
from downpour.common.nn.model import ModelSpec, model_layout
from downpour.common.wire.client import ShardClient
from downpour.common.wire.protocol import MAX_KEYS
from downpour.common.wire.security import Keys, guard, write_keys
from downpour.common.wire.sockets import make_socket
from downpour.ps.server import standalone

VECTORS = {  # name -> a model whose parameter vector has that size
    "mlp 784-1024-1024-10": ModelSpec(n_inputs=784, n_outputs=10, hidden=(1024, 1024)),
    "16M vector": ModelSpec(n_inputs=4095, n_outputs=1, hidden=(4096,)),
}
TRANSPORTS = ("ipc", "tcp")
CONTENDERS = ("downpour", "curve", "work", "work_curve", "bare")    # in the order they are timed
LR = 1e-9                 # SGD step: weights stay finite over any number of round trips
TIMEOUT_S = 60.0          # a round trip slower than this means a server is gone
JOIN_S = 10.0             # seconds the server processes of a row get to exit before they are killed
STOP = b""                # the index frame that stops a raw server, and its confirmation
POLL_MS = 1000            # a raw server checks this often that its parent still runs

def requests(sock: zmq.Socket) -> Iterator[tuple[bytes, list]]:
    """A raw server's messages on its ROUTER `sock`, (the peer's identity, the frames after
    it), until one whose first frame is STOP (confirmed: the client may go) or until the
    parent process is gone (orphaned: nobody will stop it)."""
    parent = multiprocessing.parent_process()
    while True:
        if not sock.poll(POLL_MS):
            if parent is not None and not parent.is_alive():
                return
            continue
        ident, *frames = sock.recv_multipart(copy=False)
        if frames and frames[0].bytes == STOP:
            sock.send_multipart([ident.bytes, STOP])
            return
        yield ident.bytes, frames


def _raw_server(address: str, sizes: dict[int, int], work: bool, keys_dir: str) -> None:
    """A raw pyzmq server of messages [index, float32 payload], until a STOP index (which it
    confirms) or until its parent process is gone.

    `sizes` maps the index of each piece (or whole slice) it holds to its float32 count.
    With `work`, it does a shard server's work on each (`_sgd`); without, it echoes a
    buffer of its own, never reading the payload. A message it cannot take (an unknown
    index; with `work`, a gradient `_sgd` refuses) gets a reply with no payload. With
    `keys_dir`, a CURVE server: a ZAP handler admits the cluster's keys.
    """
    keys = Keys.load(keys_dir, "server") if keys_dir else None
    ctx = zmq.Context()
    try:
        with guard(ctx, keys):                          # before the bind
            sock = make_socket(ctx, zmq.ROUTER, address, bind=True, max_frame=4 * max(sizes.values()),
                               keys=keys)
            try:
                _answer(sock, sizes, work)
            finally:
                sock.close()
    finally:
        ctx.term()


def _answer(sock: zmq.Socket, sizes: dict[int, int], work: bool) -> None:
    """`_raw_server`'s loop: answer each message on `sock` until STOP or an orphaning."""
    params = {i: np.ones(n, np.float32) for i, n in sizes.items()}   # np.zeros: the zero page
    scratch = np.empty(max(sizes.values()), np.float32)
    sent: dict[int, zmq.MessageTracker] = {}             # index -> its last reply, while zero-copy
    for ident, (index_frame, *payload) in requests(sock):
        index = index_frame.bytes
        p = params.get(i := int.from_bytes(index, "little"))
        if p is None or (work and not _sgd(p, payload, scratch, sent.get(i))):
            sock.send_multipart([ident, index])             # no payload: refused
            continue
        sent[i] = sock.send_multipart([ident, index, memoryview(p)], copy=False, track=work)


def _sgd(p: np.ndarray, payload: list[zmq.Frame], scratch: np.ndarray,
         in_flight: zmq.MessageTracker | None) -> bool:
    """A shard server's work on piece `p` (n,): check the gradient in `payload` is one frame
    of n float32, all finite, then p <- p - LR * g in place. False, and `p` unchanged, if
    the check fails. `in_flight`: the reply that may still be sending `p` zero-copy."""
    if len(payload) != 1 or len(payload[0]) != p.nbytes:
        return False
    g = np.frombuffer(payload[0].buffer, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        if not math.isfinite(float(np.dot(g, g))):       # one pass; inf or nan if any element is
            return False
    if in_flight is not None:
        in_flight.wait(TIMEOUT_S)
    s = scratch[:len(p)]
    np.multiply(g, np.float32(LR), out=s)                # two passes, as optim.SGD
    np.subtract(p, s, out=p)
    return True


class RawSockets:
    """One DEALER per distinct address, polled together, to raw servers that stop on STOP."""

    def __init__(self, ctx: zmq.Context, addresses: Sequence[str], max_frame: int,
                 keys: Keys | None = None):
        self.socks: dict[str, zmq.Socket] = {}
        try:
            for a in dict.fromkeys(addresses):
                self.socks[a] = make_socket(ctx, zmq.DEALER, a, max_frame=max_frame, keys=keys,
                                            peer="server")
        except BaseException:
            self.close()                        # the sockets made before the one that failed
            raise
        self.poller = zmq.Poller()
        for sock in self.socks.values():
            self.poller.register(sock, zmq.POLLIN)

    def replies(self, count: int, what: str) -> Iterator[tuple[zmq.Socket, list]]:
        """The next `count` replies, (socket, frames), as they come; TimeoutError when a
        raw `what` leaves TIMEOUT_S without one."""
        while count:
            events = self.poller.poll(1000 * TIMEOUT_S)
            if not events:
                raise TimeoutError(f"a raw {what} did not answer in {TIMEOUT_S:g} s")
            for sock, _ in events:
                count -= 1
                yield sock, sock.recv_multipart(copy=False)

    def stop(self) -> None:
        """Stop the servers; each confirms. TimeoutError if one does not within TIMEOUT_S."""
        for sock in self.socks.values():
            sock.send_multipart([STOP])
        deadline = time.monotonic() + TIMEOUT_S
        for address, sock in self.socks.items():
            while True:                         # replies of an unfinished round trip come first
                if not sock.poll(1000 * max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"the raw server at {address} did not confirm its stop "
                                       f"in {TIMEOUT_S:g} s")
                if sock.recv_multipart()[0] == STOP:
                    break

    def close(self) -> None:
        """Close the sockets; safe to call twice."""
        for sock in self.socks.values():
            sock.close()


class _RawClient(RawSockets):
    """The client of raw servers: message i carries [lo, hi) of the vector to `addresses[i]`
    (one DEALER per address, messages to one server in order on it)."""

    def __init__(self, ctx: zmq.Context, addresses: Sequence[str], ranges: Sequence[tuple[int, int]],
                 keys: Keys | None = None):
        super().__init__(ctx, addresses, 4 * max(hi - lo for lo, hi in ranges), keys)
        self.messages = [(self.socks[a], i.to_bytes(4, "little"), lo, hi)
                         for i, (a, (lo, hi)) in enumerate(zip(addresses, ranges))]

    def round_trip(self, grad: np.ndarray, out: np.ndarray) -> None:
        for sock, index, lo, hi in self.messages:
            sock.send_multipart([index, memoryview(grad[lo:hi])], copy=False)
        for _, (index, *payload) in self.replies(len(self.messages), "server"):
            if not payload:
                raise ValueError("a raw server refused a message (unknown index, wrong length "
                                 "or values not finite)")
            _, _, lo, hi = self.messages[int.from_bytes(index.bytes, "little")]
            out[lo:hi] = np.frombuffer(payload[0].buffer, np.float32)


class Addresses:
    """Distinct addresses for one row's servers: ipc files in `run_dir`, or free tcp ports."""

    def __init__(self, transport: str, run_dir: Path, count: int):
        self.transport, self.run_dir = transport, run_dir
        self.ports = iter(_free_ports(count) if transport == "tcp" else [])

    def __call__(self, name: str) -> str:
        if self.transport == "ipc":
            return f"ipc://{self.run_dir}/{name}"
        return f"tcp://127.0.0.1:{next(self.ports)}"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def measure(spec: ModelSpec, shards: int, transport: str, repeats: int, piece_kib: int) -> dict:
    """One row: the five contenders' round trips of `spec`'s vector through `shards` servers each."""
    layout = model_layout(spec)
    cfg = Config(mode="async", workers=1, shards=shards, optimizer="sgd", lr=LR, seed=0,
                 piece_kib=piece_kib)
    pieces = layout.pieces(shards, cfg.piece_elements)
    with tempfile.TemporaryDirectory(prefix="downpour-bench-") as tmp:
        keys_dir = str(Path(tmp) / "keys")
        write_keys(keys_dir)
        address = Addresses(transport, Path(tmp), len(CONTENDERS) * shards)
        names = {c: [address(f"{c}-{i}") for i in range(shards)] for c in CONTENDERS}
        procs = _start_servers(cfg, spec, names, pieces, layout.shard_ranges(shards), keys_dir)
        ctx = zmq.Context()
        clients = None
        try:
            clients = _Clients(ctx, names, pieces, layout.shard_ranges(shards), keys_dir)
            grad = np.random.default_rng(0).standard_normal(layout.size, dtype=np.float32)
            out = np.empty(layout.size, np.float32)
            t = interleaved({c: clients.round_trip(c, grad, out) for c in CONTENDERS}, repeats)
            clients.shutdown()
        finally:
            if clients is not None:
                clients.close()
            end_processes(procs)
            ctx.term()
    return _row(layout.size, shards, transport, len(pieces), t)


def _start_servers(cfg: Config, spec: ModelSpec, names: dict[str, list[str]], pieces: list[Piece],
                   slices: list[tuple[int, int]], keys_dir: str) -> list[multiprocessing.Process]:
    """Start S server processes per contender, server i of contender c at names[c][i]."""
    secure = replace(cfg, keys=keys_dir)
    sizes = [{k: p.hi - p.lo for k, p in enumerate(pieces) if p.server == i} for i in range(len(slices))]
    targets = []
    for i, (lo, hi) in enumerate(slices):
        targets += [(standalone, (cfg, spec, i, names["downpour"][i])),
                    (standalone, (secure, spec, i, names["curve"][i])),
                    (_raw_server, (names["work"][i], sizes[i], True, "")),
                    (_raw_server, (names["work_curve"][i], sizes[i], True, keys_dir)),
                    (_raw_server, (names["bare"][i], {i: hi - lo}, False, ""))]
    return start_processes(targets)


def start_processes(targets: list[tuple[Callable, tuple]]) -> list[multiprocessing.Process]:
    """A started process for each (function, arguments); `_end` ends them."""
    mp = multiprocessing.get_context("spawn")
    procs = [mp.Process(target=f, args=a, daemon=True) for f, a in targets]
    for p in procs:
        p.start()
    return procs


def end_processes(procs: list[multiprocessing.Process]) -> None:
    """Wait for the server processes to exit, JOIN_S seconds in all; kill those still running."""
    deadline = time.monotonic() + JOIN_S
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


class _Clients:
    """One client per contender, all on `ctx`; CURVE clients hold the worker's keys."""

    def __init__(self, ctx: zmq.Context, names: dict[str, list[str]], pieces: list[Piece],
                 slices: list[tuple[int, int]], keys_dir: str):
        ranges = [(p.lo, p.hi) for p in pieces]
        self.keys_dir = keys_dir
        worker = Keys.load(keys_dir, "worker")
        self.shard: dict[str, ShardClient] = {}
        self.raw: dict[str, _RawClient] = {}
        try:                                    # built one by one: a failure closes those made
            for c, keys in (("downpour", None), ("curve", worker)):
                self.shard[c] = ShardClient([names[c][p.server] for p in pieces], ranges, "bench",
                                            timeout=TIMEOUT_S, retries=0, ctx=ctx, keys=keys)
            for c, keys in (("work", None), ("work_curve", worker)):
                self.raw[c] = _RawClient(ctx, [names[c][p.server] for p in pieces], ranges, keys)
            self.raw["bare"] = _RawClient(ctx, names["bare"], slices)
        except BaseException:
            self.close()
            raise

    def round_trip(self, contender: str, grad: np.ndarray, out: np.ndarray) -> Callable[[], object]:
        """A function that sends `grad` out through `contender` and its answer into `out`."""
        if contender in self.shard:
            return partial(self.shard[contender].push_pull, grad, 0, out)
        return partial(self.raw[contender].round_trip, grad, out)

    def shutdown(self) -> None:
        """Stop every server; with CURVE, a shard server's shutdown is the scheduler's to send."""
        for raw in self.raw.values():
            raw.stop()
        self.shard["downpour"].call_all("shutdown")
        curve = self.shard["curve"]
        with ShardClient(curve.addresses, curve.ranges, "bench", timeout=TIMEOUT_S, retries=0,
                         ctx=curve.ctx, keys=Keys.load(self.keys_dir, "scheduler")) as scheduler:
            scheduler.call_all("shutdown")

    def close(self) -> None:
        """Close every client's sockets; safe to call twice."""
        for client in [*self.shard.values(), *self.raw.values()]:
            client.close()


def _row(size: int, shards: int, transport: str, pieces: int, t: dict[str, float]) -> dict:
    """The JSON row of one measurement; `t` is seconds per round trip by contender."""
    nbytes = 4 * size
    return {"vector": size, "shards": shards, "transport": transport, "pieces": pieces,
            **{f"{c}_ms": 1e3 * t[c] for c in CONTENDERS},
            **{f"{c}_gb_s": nbytes / t[c] / 1e9 for c in CONTENDERS},
            "ratio": t["bare"] / t["downpour"], "work_ratio": t["work"] / t["downpour"],
            "curve_ratio": t["downpour"] / t["curve"], "raw_curve_ratio": t["work"] / t["work_curve"],
            "curve_work_ratio": t["work_curve"] / t["curve"]}


# -- output ----------------------------------------------------------------------------------

GROUPS = [  # (a heading over columns, [(column header, width, the row's field, format)])
    ("", [("vector", 11, "vector", ","), ("S", 3, "shards", ""), ("tr", 4, "transport", ""),
          ("pieces", 7, "pieces", "")]),
    ("median round trip, ms", [("downpour", 9, "downpour_ms", ".2f"), ("curve", 8, "curve_ms", ".2f"),
                               ("work", 8, "work_ms", ".2f"), ("work+c", 8, "work_curve_ms", ".2f"),
                               ("bare", 8, "bare_ms", ".2f")]),
    ("", [("GB/s", 7, "downpour_gb_s", ".2f")]),
    ("throughput kept", [("ratio", 7, "ratio", ".2f"), ("work", 6, "work_ratio", ".2f"),
                         ("curve", 7, "curve_ratio", ".2f"), ("raw c", 7, "raw_curve_ratio", ".2f"),
                         ("c/w", 6, "curve_work_ratio", ".2f")]),
]
LEGEND = """\
downpour: push_pull; curve: push_pull over CurveZMQ; work: raw pyzmq, the same pieces, each checked
finite, SGD-updated and sent back; work+c: work over CurveZMQ; bare: a raw echo of each server's slice.
GB/s: downpour's, per direction (vector bytes / round trip). Ratios are time of the reference / time
of the contender (1 = as fast): ratio = bare / downpour, work = work / downpour (work_ratio),
curve = downpour / curve (curve_ratio), raw c = work / work+c (raw_curve_ratio),
c/w = work+c / curve (curve_work_ratio)."""


def format_table(title: str, groups: list, rows: list[dict], legend: str) -> str:
    """A table of `rows`: the title, the groups' headings over their columns, a line per row."""
    columns = [c for _, cols in groups for c in cols]
    lines = [title, "", "".join(f"{head:^{sum(w for _, w, _, _ in cols)}}" for head, cols in groups).rstrip(),
             "".join(f"{h:>{w}}" for h, w, _, _ in columns)]
    lines += ["".join(f"{r[f]:>{w}{fmt}}" for _, w, f, fmt in columns) for r in rows]
    return "\n".join([*lines, "", legend])


def table(rows: list[dict]) -> str:
    return format_table("downpour bench comm: push_pull through S shard servers against raw pyzmq (the same "
                   "work; a bare echo), with and without CurveZMQ", GROUPS, rows, LEGEND)


def main(args) -> int:
    from downpour.bench.sparse import measure_sparse, sparse_table  # it builds on this module
    shard_counts = parse_list(args.shards, "shards")
    transports = parse_list(args.transports, "transports", str, TRANSPORTS)
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be positive, got {args.repeats}")
    if not 1 <= args.sparse_keys <= MAX_KEYS:
        raise ConfigError(f"--sparse-keys must be in [1, {MAX_KEYS}] (the keys one request may "
                          f"carry), got {args.sparse_keys}")
    chosen = args.vectors or [*(v.split()[0] for v in VECTORS), "sparse"]
    vectors = [VECTORS[v] for v in VECTORS if v.split()[0] in chosen]
    sparse_shards = shard_counts if "sparse" in chosen else []
    rows = [measure(spec, s, transport, args.repeats, args.piece_kib)
            for spec in vectors for s in shard_counts for transport in transports]
    sparse_rows = [measure_sparse(s, transport, args.repeats, args.sparse_keys)
                   for s in sparse_shards for transport in transports]
    if args.json:
        print(json.dumps(rows + sparse_rows))
    else:
        print("\n\n".join([*([table(rows)] if rows else []),
                            *([sparse_table(sparse_rows)] if sparse_rows else [])]))
    return 0
