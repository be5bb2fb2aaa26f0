"""`downpour bench comm --fill ROWS`: a table far larger than a worker, filled by a stream
of new keys.

S real servers (ps.server.standalone of an fm run: rows of 1 + --embed-dim float32,
adagrad, so each row carries as many floats of optimizer state) take a uniform stream
of new keys from one client standing for a worker: each step a training pull of K keys
never seen (uniform in [0, 2^63): each makes a row and its state on its owner) and a
push of one gradient row per key, as a worker's step does. Every REPORT_ROWS rows and
at the end it prints the rows each server holds, their evictions, each server's
resident memory (VmRSS, MB), the client's, and the keys/s of the last stretch.

With --table-max-rows M each server keeps at most M rows (LRU eviction, ps/table.py):
past the cap the rows, and the servers' memory, must stay flat while the stream goes
on, which the end lines show against the figures at the moment the cap was reached.

The client is what a worker of such a model holds: one batch of keys and rows. Its
resident memory is the bound a worker stays under whatever the table's size.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from downpour.bench.comm import TIMEOUT_S, Addresses, end_processes, start_processes
from downpour.bench.sparse import random_keys
from downpour.common.config import Config
from downpour.common.errors import ConfigError
from downpour.common.nn.model import model_layout
from downpour.common.nn.sparse import CtrModel
from downpour.common.training import model_spec
from downpour.common.wire.client import ShardClient, TableClient
from downpour.ps.server import standalone

TABLE = 0
REPORT_ROWS = 2_000_000       # a line every this many rows made
MB = 1 << 20


def rss_mb(pid: int | None = None) -> float:
    """A process's resident memory now (VmRSS, MB); this process's without `pid`."""
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return kib / 1024


def fill_config(shards: int, embed_dim: int, max_rows: int) -> Config:
    """The run the servers hold tables of (a server reads no data: any criteo path does)."""
    return Config(mode="async", workers=1, shards=shards, model="fm", data="criteo:unread",
                  embed_dim=embed_dim, optimizer="adagrad", lr=0.05, embed_init=0.01, seed=0,
                  table_max_rows=max_rows)


def fill(rows: int, shards: int, embed_dim: int, max_rows: int, batch: int, transport: str,
         say=print) -> dict:
    """Stream `rows` new keys, `batch` a step, through `shards` servers; the figures."""
    cfg = fill_config(shards, embed_dim, max_rows)
    spec, dim = model_spec(cfg, None), CtrModel("fm", embed_dim).dim
    rng = np.random.default_rng(0)
    grads = rng.standard_normal((batch, dim), dtype=np.float32) * np.float32(0.01)
    with tempfile.TemporaryDirectory(prefix="downpour-fill-") as tmp:
        address = Addresses(transport, Path(tmp), shards)
        names = [address(f"server-{i}") for i in range(shards)]
        procs = start_processes([(standalone, (cfg, spec, i, names[i])) for i in range(shards)])
        ctx = zmq.Context()
        tables = None
        try:
            tables = TableClient(names, "bench-fill", dim, timeout=TIMEOUT_S, retries=0, ctx=ctx)
            made, lines, capped = 0, [], None
            t0 = last_t = time.perf_counter()
            last_made = 0
            while made < rows:
                keys = random_keys(rng, min(batch, rows - made))
                tables.pull(TABLE, keys)                      # a training pull: new rows
                tables.push(TABLE, keys, grads[:len(keys)])
                made += len(keys)
                if made // REPORT_ROWS != (made - len(keys)) // REPORT_ROWS or made >= rows:
                    now = time.perf_counter()
                    line = _figures(tables, procs, made, (made - last_made) / (now - last_t))
                    lines.append(line)
                    say(_show(line))
                    last_t, last_made = now, made
                    if max_rows and capped is None and max(line["server_rows"]) >= max_rows:
                        capped = line
            seconds = time.perf_counter() - t0
            tables.shutdown(TABLE)
            pieces = model_layout(spec).pieces(shards, cfg.piece_elements, spare=True)
            with ShardClient([names[p.server] for p in pieces], [(p.lo, p.hi) for p in pieces],
                             "bench-fill", timeout=TIMEOUT_S, retries=0, ctx=ctx) as control:
                control.call_all("shutdown")
        finally:
            if tables is not None:
                tables.close()
            end_processes(procs)
            ctx.term()
    end = lines[-1]
    return {"rows_streamed": rows, "shards": shards, "dim": dim, "batch": batch,
            "table_max_rows": max_rows, "seconds": seconds, "keys_per_s": rows / seconds,
            "client_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "at_cap": capped, "end": end, "lines": lines}


def _figures(tables: TableClient, procs: list, made: int, rate: float) -> dict:
    stats = tables.stats(TABLE)
    return {"keys_streamed": made, "server_rows": [s["rows"] for s in stats],
            "evictions": [s.get("evictions", 0) for s in stats],
            "table_mb": [s["bytes"] / MB for s in stats],
            "server_rss_mb": [rss_mb(p.pid) for p in procs], "client_rss_mb": rss_mb(),
            "keys_per_s": rate}


def _show(line: dict) -> str:
    rows = " + ".join(f"{r:,}" for r in line["server_rows"])
    rss = " + ".join(f"{m:,.0f}" for m in line["server_rss_mb"])
    evicted = sum(line["evictions"])
    return (f"{line['keys_streamed']:>12,} keys: rows {rows}" + (f" ({evicted:,} evicted)" if evicted else "")
            + f"; servers' RSS {rss} MB; client RSS {line['client_rss_mb']:.0f} MB; "
            f"{line['keys_per_s'] / 1e6:.2f} M keys/s")


def main(args) -> int:
    shards = [int(s) for s in str(args.shards).split(",")]
    transports = str(args.transports).split(",")
    if len(shards) != 1 or len(transports) != 1:
        raise ConfigError("--fill streams through one set of servers: give one --shards (e.g. 2) "
                          "and one --transports (e.g. ipc)")
    if args.fill < 1 or args.table_max_rows < 0 or args.sparse_keys < 1:
        raise ConfigError("--fill ROWS needs ROWS >= 1, --table-max-rows >= 0 and --sparse-keys >= 1")
    result = fill(args.fill, shards[0], args.embed_dim, args.table_max_rows, args.sparse_keys,
                  transports[0], say=(lambda _: None) if args.json else print)
    if args.json:
        print(json.dumps(result))
    else:
        capped = result["at_cap"]
        if capped:
            print(f"at the cap: servers' RSS {' + '.join(f'{m:,.0f}' for m in capped['server_rss_mb'])} MB;"
                  f" at the end: {' + '.join(f'{m:,.0f}' for m in result['end']['server_rss_mb'])} MB")
        print(f"{result['rows_streamed']:,} keys in {result['seconds']:.1f} s "
              f"({result['keys_per_s'] / 1e6:.2f} M keys/s); client peak RSS "
              f"{result['client_peak_rss_mb']:.0f} MB")
    return 0
