"""`downpour bench comm`: push_pull through the shard servers against bare pyzmq, in one run.

For each vector (the MLP 784-1024-1024-10, 1,863,690 float32; and a 16M-parameter
vector) and each number of servers S (1, 2, 4), on the same transport:

  downpour  ShardClient.push_pull of the whole vector through S real shard
            servers (separate processes): encode, zero-copy send of each piece,
            validation, the optimizer update (SGD), the reply, and the copy of
            the new weights into place
  bare      the same byte counts through S pyzmq echo processes: the client sends
            each server its slice zero-copy, each answers with a slice of its
            own, and the client copies the answers into place, the least any
            parameter server must do

Both are timed in alternating rounds; a figure is the median round trip. GB/s
per direction is the vector's bytes over the round-trip time (each direction
carries that many bytes once per round trip); ratio = downpour / bare throughput.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import tempfile
from pathlib import Path

import numpy as np
import zmq

from downpour.bench.timing import interleaved
from downpour.common.client import ShardClient, make_socket
from downpour.common.config import Config, parse_list
from downpour.common.errors import ConfigError
from downpour.common.model import ModelSpec, model_layout
from downpour.ps.server import standalone

VECTORS = {  # name -> a model whose parameter vector has that size
    "mlp 784-1024-1024-10": ModelSpec(n_inputs=784, n_outputs=10, hidden=(1024, 1024)),
    "16M vector": ModelSpec(n_inputs=4095, n_outputs=1, hidden=(4096,)),
}


def _echo(address: str, size: int) -> None:
    """A bare pyzmq server: answer every message with `size` float32, until an empty frame."""
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.ROUTER, address, bind=True)
    reply = np.ones(size, np.float32)        # written pages: np.zeros would be the zero page
    try:
        while True:
            ident, head, *payload = sock.recv_multipart(copy=False)
            if not head.bytes:
                break
            sock.send_multipart([ident.bytes, b"ok", memoryview(reply)], copy=False)
    finally:
        sock.close()
        ctx.term()


class _Bare:
    """The client side of the bare round trip."""

    def __init__(self, addresses: list[str], ranges: list[tuple[int, int]], ctx: zmq.Context):
        self.socks = [make_socket(ctx, zmq.DEALER, a) for a in addresses]
        self.ranges = ranges

    def round_trip(self, grad: np.ndarray, out: np.ndarray) -> None:
        for sock, (lo, hi) in zip(self.socks, self.ranges):
            sock.send_multipart([b"x", memoryview(grad[lo:hi])], copy=False)
        for sock, (lo, hi) in zip(self.socks, self.ranges):
            if not sock.poll(30_000):
                raise TimeoutError("a bare echo server did not answer in 30 s")
            _, payload = sock.recv_multipart(copy=False)
            out[lo:hi] = np.frombuffer(payload.buffer, np.float32)

    def close(self) -> None:
        for sock in self.socks:
            sock.send_multipart([b""])
            sock.close()


def _address(transport: str, run_dir: Path, name: str, port: int) -> str:
    return f"ipc://{run_dir}/{name}" if transport == "ipc" else f"tcp://127.0.0.1:{port}"


def measure(spec: ModelSpec, shards: int, transport: str, repeats: int, piece_kib: int) -> dict:
    """One row: downpour and bare round trips of `spec`'s vector through `shards` servers."""
    layout = model_layout(spec)
    ranges = layout.shard_ranges(shards)
    cfg = Config(mode="async", workers=1, shards=shards, optimizer="sgd", lr=1e-9, seed=0,
                 piece_kib=piece_kib)
    pieces = layout.pieces(shards, cfg.piece_elements)
    mp = multiprocessing.get_context("spawn")
    ctx = zmq.Context()
    with tempfile.TemporaryDirectory(prefix="downpour-bench-") as tmp:
        run_dir = Path(tmp)
        ports = _free_ports(2 * shards) if transport == "tcp" else [0] * (2 * shards)
        ours = [_address(transport, run_dir, f"server-{i}", ports[i]) for i in range(shards)]
        bare = [_address(transport, run_dir, f"echo-{i}", ports[shards + i]) for i in range(shards)]
        procs = [mp.Process(target=standalone, args=(cfg, spec, i, ours[i]), daemon=True)
                 for i in range(shards)]
        procs += [mp.Process(target=_echo, args=(bare[i], hi - lo), daemon=True)
                  for i, (lo, hi) in enumerate(ranges)]
        for p in procs:
            p.start()
        client = ShardClient([ours[piece.server] for piece in pieces],
                             [(piece.lo, piece.hi) for piece in pieces],
                             "bench", timeout=60.0, retries=0, ctx=ctx)
        echo = _Bare(bare, ranges, ctx)
        try:
            rng = np.random.default_rng(0)
            grad = rng.standard_normal(layout.size, dtype=np.float32)
            out = np.empty(layout.size, np.float32)
            t = interleaved({"downpour": lambda: client.push_pull(grad, 0, out),
                              "bare": lambda: echo.round_trip(grad, out)}, repeats)
            client.call_all("shutdown")
        finally:
            client.close()
            echo.close()
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
            ctx.term()
    nbytes = 4 * layout.size
    return {"vector": layout.size, "shards": shards, "transport": transport, "pieces": len(pieces),
            "downpour_ms": 1e3 * t["downpour"], "bare_ms": 1e3 * t["bare"],
            "downpour_gb_s": nbytes / t["downpour"] / 1e9, "bare_gb_s": nbytes / t["bare"] / 1e9,
            "ratio": t["bare"] / t["downpour"]}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def table(rows: list[dict]) -> str:
    lines = ["downpour bench comm: push_pull through S shard servers (SGD update included) "
             "against a bare pyzmq round trip of the same bytes",
             "", f"{'vector':>12}{'S':>3}{'transport':>10}{'downpour ms':>13}{'bare ms':>9}"
             f"{'downpour GB/s':>15}{'bare GB/s':>11}{'ratio':>7}"]
    for r in rows:
        lines.append(f"{r['vector']:>12,}{r['shards']:>3}{r['transport']:>10}{r['downpour_ms']:13.2f}"
                     f"{r['bare_ms']:9.2f}{r['downpour_gb_s']:15.2f}{r['bare_gb_s']:11.2f}"
                     f"{r['ratio']:7.2f}")
    lines.append("GB/s per direction = vector bytes / round-trip time; ratio = downpour / bare")
    return "\n".join(lines)


def main(args) -> int:
    shard_counts = parse_list(args.shards, "shards")
    if args.repeats < 1:
        raise ConfigError("--repeats must be positive")
    vectors = [VECTORS[v] for v in VECTORS if not args.vectors or v.split()[0] in args.vectors]
    rows = [measure(spec, s, args.transport, args.repeats, args.piece_kib)
            for spec in vectors for s in shard_counts]
    print(json.dumps(rows) if args.json else table(rows))
    return 0
