"""`downpour bench comm`, sparse rows: pulls and pushes of keys through servers' tables.

For each S and each transport: a batch of K sorted unique random int64 keys is pulled,
and pushed with one float32 gradient row per key, through the tables of an fm model
(rows of 1 + EMBED_DIM float32, adagrad).
The timed calls take KEY_SETS batches in turn, each pulled once for training before,
so that every call reads rows that exist. Two contenders, S server processes each:

  downpour    TableClient.pull and .push through S real servers (ps.server.standalone of a
              --model fm run): the keys split by owner (common.nn.layout.owners), encode_sparse,
              the server's checks (sorted, unique, owned, finite), Table.pull or Table.push,
              the reply, and the rows copied into place
  raw         raw pyzmq with the same tables (ps.sparse.make_tables) and nothing of downpour's
              protocol: the client splits the keys by the same owners() and sends each server
              its part on one DEALER, a server answers a pull with Table.pull's rows zero-copy
              and a push after Table.push, and the client copies the rows into place

After the timing both contenders pull every batch again and must read the same rows
(they had the same pushes); if not, the run fails. Pull and push are timed apart, in the
same alternating rounds; a figure is the median, in ms. keys/s is K over that time.
MB/s counts what a call carries both ways, K keys of 8 B and K rows of 4 x dim B (a pull
sends the keys and gets the rows back, a push sends both), headers left out. pull_ratio
and push_ratio are throughput kept, raw's time / downpour's. The sparse rows have a
table of their own under the dense one; their JSON rows follow the dense rows in the
same list: keys, dim, shards, transport, `<contender>_<op>_ms`, `_keys_s` and `_mb_s`
for downpour and raw, pull and push, pull_ratio and push_ratio.

The contenders' processes, addresses and raw sockets are comm.py's (app/bench/comm.py).
"""

from __future__ import annotations

import itertools
import tempfile
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import zmq

from downpour.bench.comm import (
    TIMEOUT_S,
    Addresses,
    RawSockets,
    end_processes,
    format_table,
    requests,
    start_processes,
)
from downpour.bench.timing import interleaved
from downpour.common.config import Config
from downpour.common.nn.layout import owners
from downpour.common.nn.model import model_layout
from downpour.common.nn.sparse import CtrModel
from downpour.common.training import model_spec
from downpour.common.wire.client import ShardClient, TableClient
from downpour.common.wire.protocol import MAX_KEYS
from downpour.common.wire.sockets import make_socket
from downpour.ps.server import standalone
from downpour.ps.sparse import make_tables
from downpour.ps.table import Table

SPARSE_CONTENDERS = ("downpour", "raw")
SPARSE_OPS = ("pull", "push")
EMBED_DIM = 16            # the fm model's factors: table rows of 1 + EMBED_DIM float32
KEY_SETS = 4              # batches the timed calls take in turn: no call finds only the last one's rows
SPARSE_CALLS = 10         # timed sparse calls per repeat: they are short, and their medians noisy
TABLE = 0                 # the table a sparse model's rows are in
KEY_BYTES = 8             # an int64 key on the wire
PULL, PUSH, REFUSED = b"pull", b"push", b"refused"   # a raw table server's operations, its refusal



def sparse_config(shards: int) -> Config:
    """The settings of a sparse run on `shards` servers, as the sparse rows' servers take them
    (a server reads no data: any criteo path does)."""
    return Config(mode="async", workers=1, shards=shards, model="fm", data="criteo:unread",
                  embed_dim=EMBED_DIM, optimizer="adagrad", seed=0)


def _raw_table_server(address: str, cfg: Config, rank: int) -> None:
    """A raw pyzmq server of table rows, of messages [PULL, keys] and [PUSH, keys, rows], until
    STOP (which it confirms) or until its parent process is gone.

    Its table is the one server `rank` of the run `cfg` holds (ps.sparse.make_tables). A
    pull is answered [PULL, rows], a push [PUSH] once applied; a message the table refuses
    (ValueError: keys not sorted and unique, rows of another length or not finite) or
    that lacks a frame gets [REFUSED], and changes nothing.
    """
    table = make_tables(cfg, rank).tables[TABLE]
    ctx = zmq.Context()
    try:
        sock = make_socket(ctx, zmq.ROUTER, address, bind=True, max_frame=_rows_frame(table.dim))
        try:
            _look_up(sock, table)
        finally:
            sock.close()
    finally:
        ctx.term()


def _look_up(sock: zmq.Socket, table: Table) -> None:
    """`_raw_table_server`'s loop: answer each message on `sock` until STOP or an orphaning."""
    for ident, (op, *frames) in requests(sock):
        try:
            keys = np.frombuffer(frames[0].buffer, np.int64)                  # (n,)
            if op.bytes == PULL:
                reply = [PULL, table.pull(keys)]       # (n, dim), a new array: safe to send zero-copy
            elif op.bytes == PUSH:
                table.push(keys, np.frombuffer(frames[1].buffer, np.float32).reshape(len(keys), -1))
                reply = [PUSH]
            else:
                reply = [REFUSED]
        except (IndexError, ValueError):
            reply = [REFUSED]
        sock.send_multipart([ident, *reply], copy=False)


def _rows_frame(dim: int) -> int:
    """The largest frame of a raw table message, bytes: MAX_KEYS rows of `dim` float32."""
    return 4 * dim * MAX_KEYS


class _RawTables(RawSockets):
    """The client of raw table servers, rows of `dim` float32: the keys split by owners()
    as TableClient splits them, server i's part sent on the DEALER to `addresses[i]`."""

    def __init__(self, ctx: zmq.Context, addresses: Sequence[str], dim: int):
        super().__init__(ctx, addresses, _rows_frame(dim))
        self.dim = dim
        self.servers = [self.socks[a] for a in addresses]

    def pull(self, keys: np.ndarray) -> np.ndarray:
        """The rows (len(keys), dim) float32 of sorted unique int64 `keys`."""
        rows = np.empty((len(keys), self.dim), np.float32)
        self._collect(self._send(PULL, keys), rows)
        return rows

    def push(self, keys: np.ndarray, grads: np.ndarray) -> None:
        """Apply one gradient row per key: grads (len(keys), dim) float32."""
        self._collect(self._send(PUSH, keys, grads), None)

    def _send(self, op: bytes, keys: np.ndarray, grads: np.ndarray | None = None) -> dict:
        """Send each server its keys (and their rows) zero-copy; the positions of each
        server's keys in `keys`, by its socket."""
        where = owners(keys, len(self.servers))
        parts: dict[zmq.Socket, np.ndarray] = {}
        for s, sock in enumerate(self.servers):
            idx = np.flatnonzero(where == s)
            if len(idx):                                # keys[idx], grads[idx]: new arrays
                sock.send_multipart([op, keys[idx], *([] if grads is None else [grads[idx]])],
                                    copy=False)
                parts[sock] = idx
        return parts

    def _collect(self, parts: dict, rows: np.ndarray | None) -> None:
        """Wait for every server's reply to `_send`; a pull's rows into `rows`, in place."""
        for sock, (op, *payload) in self.replies(len(parts), "table server"):
            if op.bytes == REFUSED:
                raise ValueError("a raw table server refused a message (keys not sorted and "
                                 "unique, rows of the wrong length or not finite)")
            idx = parts.pop(sock)
            if rows is not None:
                rows[idx] = np.frombuffer(payload[0].buffer, np.float32).reshape(len(idx), self.dim)


class Lookups(NamedTuple):
    """A sparse contender's two calls."""

    pull: Callable[[np.ndarray], np.ndarray]             # keys (n,) -> rows (n, dim) float32
    push: Callable[[np.ndarray, np.ndarray], object]     # keys (n,), grads (n, dim) float32


@contextmanager
def sparse_contenders(cfg: Config, transport: str) -> Iterator[dict[str, Lookups]]:
    """The sparse contenders of the run `cfg` (a --model, cfg.shards servers each) over
    `transport`, by name. Their server processes run while the block does; they are
    stopped when it ends, or killed after JOIN_S if it raised."""
    spec = model_spec(cfg, None)
    dim = CtrModel(cfg.model, cfg.embed_dim).dim
    with tempfile.TemporaryDirectory(prefix="downpour-bench-") as tmp:
        address = Addresses(transport, Path(tmp), len(SPARSE_CONTENDERS) * cfg.shards)
        names = {c: [address(f"{c}-{i}") for i in range(cfg.shards)] for c in SPARSE_CONTENDERS}
        procs = start_processes(
            [(standalone, (cfg, spec, i, names["downpour"][i])) for i in range(cfg.shards)]
            + [(_raw_table_server, (names["raw"][i], cfg, i)) for i in range(cfg.shards)])
        ctx = zmq.Context()
        clients: list[TableClient | _RawTables] = []
        try:                                    # built one by one: a failure closes those made
            clients.append(tables := TableClient(names["downpour"], "bench", dim, timeout=TIMEOUT_S,
                                                 retries=0, ctx=ctx))
            clients.append(raw := _RawTables(ctx, names["raw"], dim))
            yield {"downpour": Lookups(partial(tables.pull, TABLE), partial(tables.push, TABLE)),
                   "raw": Lookups(raw.pull, raw.push)}
            raw.stop()
            tables.shutdown(TABLE)              # the servers holding only tables exit now
            pieces = model_layout(spec).pieces(cfg.shards, cfg.piece_elements, spare=True)  # the bias's
            with ShardClient([names["downpour"][p.server] for p in pieces], [(p.lo, p.hi) for p in pieces],
                             "bench", timeout=TIMEOUT_S, retries=0, ctx=ctx) as control:
                control.call_all("shutdown")
        finally:
            for client in clients:
                client.close()
            end_processes(procs)
            ctx.term()


def measure_sparse(shards: int, transport: str, repeats: int, n_keys: int) -> dict:
    """One sparse row: pulls and pushes of `n_keys` keys through `shards` servers' tables,
    downpour's and raw pyzmq's. RuntimeError if the two then read different rows."""
    cfg = sparse_config(shards)
    dim = CtrModel(cfg.model, cfg.embed_dim).dim
    rng = np.random.default_rng(0)
    batches = [random_keys(rng, n_keys) for _ in range(KEY_SETS)]
    grads = rng.standard_normal((n_keys, dim), dtype=np.float32)
    with sparse_contenders(cfg, transport) as contenders:
        for lookups in contenders.values():
            for keys in batches:
                lookups.pull(keys)              # a training pull: every key gets its row
        timed = {}
        for c, lookups in contenders.items():
            timed[f"{c}_pull"] = _in_turn(lookups.pull, batches)
            timed[f"{c}_push"] = _in_turn(lookups.push, batches, grads)
        t = interleaved(timed, SPARSE_CALLS * repeats)
        for keys in batches:                    # the same pushes: the same rows
            rows = [lookups.pull(keys) for lookups in contenders.values()]
            if not np.array_equal(*rows):
                raise RuntimeError(f"downpour and raw pyzmq read different rows for the same keys "
                                   f"after the same pushes ({shards} servers, {transport}): the "
                                   "contenders did not do the same work")
    return _sparse_row(n_keys, dim, shards, transport, t)


def random_keys(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n,) int64: sorted unique random keys in [0, 2^63)."""
    keys = np.empty(0, np.int64)
    while len(keys) < n:                        # a repeat among 2^63 values: draw what it took
        keys = np.union1d(keys, rng.integers(0, 2**63, n - len(keys), dtype=np.int64))
    return keys


def _in_turn(fn: Callable, batches: list[np.ndarray], *args) -> Callable[[], object]:
    """A function that calls fn(keys, *args) with each of `batches` in turn."""
    turn = itertools.cycle(batches)
    return lambda: fn(next(turn), *args)


def _sparse_row(n_keys: int, dim: int, shards: int, transport: str, t: dict[str, float]) -> dict:
    """The JSON row of one sparse measurement; `t` is seconds per call by `<contender>_<op>`."""
    nbytes = n_keys * (KEY_BYTES + 4 * dim)     # a call's keys and rows, both ways together
    row: dict = {"keys": n_keys, "dim": dim, "shards": shards, "transport": transport}
    for op in SPARSE_OPS:
        for c in SPARSE_CONTENDERS:
            s = t[f"{c}_{op}"]
            row.update({f"{c}_{op}_ms": 1e3 * s, f"{c}_{op}_keys_s": n_keys / s,
                        f"{c}_{op}_mb_s": nbytes / s / 1e6})
        row[f"{op}_ratio"] = t[f"raw_{op}"] / t[f"downpour_{op}"]
    return row



# -- output ----------------------------------------------------------------------------------

SPARSE_GROUPS = [
    ("", [("keys", 8, "keys", ","), ("S", 3, "shards", ""), ("tr", 4, "transport", "")]),
    *((f"{op}: median ms, downpour's rates, kept",
       [("downpour", 9, f"downpour_{op}_ms", ".2f"), ("raw", 8, f"raw_{op}_ms", ".2f"),
        ("keys/s", 12, f"downpour_{op}_keys_s", ",.0f"), ("MB/s", 7, f"downpour_{op}_mb_s", ".0f"),
        ("kept", 6, f"{op}_ratio", ".2f")]) for op in SPARSE_OPS),
]
SPARSE_LEGEND = f"""\
downpour: TableClient.pull and .push through S servers' tables (an fm model: rows of 1 + {EMBED_DIM} float32,
adagrad); raw: raw pyzmq, the keys split by the same owners(), the same Table.pull and Table.push.
keys/s and MB/s: downpour's; MB/s counts the keys (8 B each) and rows (4 x dim B each) both ways
together. kept: throughput kept, raw ms / downpour ms (pull_ratio, push_ratio; 1 = as fast)."""


def sparse_table(rows: list[dict]) -> str:
    return format_table("downpour bench comm, sparse: pull and push of a batch of keys through the tables of "
                   "S servers against raw pyzmq doing the same lookups", SPARSE_GROUPS, rows, SPARSE_LEGEND)
