"""The measurements behind a profile (`downpour simulate --calibrate`): what profile.py's
table lists, each timed on this machine as the medians of a few timings.

Each function measures one kind of cost and returns it per unit of work (s per element,
per byte, per message, per batch); `calibrate` runs them all into a new profile. The
model's compute, a server's answers at a piece size, and the codecs are also measured
on their own when a simulation first needs them (profile.costs).
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from downpour.common.config import Config
from downpour.common.data import synthetic_dataset
from downpour.common.nn.model import Model, ModelSpec, model_layout
from downpour.common.nn.optim import OPTIMIZERS, make_optimizer
from downpour.common.step import GradientStep
from downpour.common.training import model_spec
from downpour.common.wire import codec

VERSION = 2                   # of the profile's layout
CODECS = ("fp16", "topk:0.01", "topk:0.1", "onebit")     # calibrated; others measured when used
MEMORY_N = 1 << 22            # elements of the memory-pass and optimizer timings
CODEC_N = 1 << 20             # elements of the codec timings
COMPUTE_S = 1.5               # s of gradient steps timed per model ...
MIN_STEPS = 20                # ... and at least this many
ROUND_TRIPS = 300             # tiny round trips timed
START_S = 10.0                # for a server process to answer
SHAPE_SAMPLES = 256           # synthetic samples the compute timing draws batches from


def _typical(fn, repeats: int = 9) -> float:
    """The median of `repeats` timings of fn() (s), after one untimed call. The median,
    not the least: a run pays a cost as this machine typically has it, and the least of
    a few timings made every prediction of the validation optimistic."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_costs() -> dict[str, Any]:
    """copy, check, add and every optimizer's step, per byte or element."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal(MEMORY_N, dtype=np.float32)
    b = rng.standard_normal(MEMORY_N, dtype=np.float32) * np.float32(1e-3)
    c = np.empty_like(a)
    apply = {}
    for name in OPTIMIZERS:
        opt, p = make_optimizer(name), a.copy()
        apply[name] = _typical(lambda: opt.step(p, b, 1e-3)) / MEMORY_N
    return {"copy_s_per_byte": _typical(lambda: np.copyto(c, a)) / (4 * MEMORY_N),
            "check_s_per_elem": _typical(lambda: np.dot(b, b)) / MEMORY_N,
            "add_s_per_elem": _typical(lambda: np.add(c, b, out=c)) / MEMORY_N,
            "apply_s_per_elem": apply}


def codec_costs(names=CODECS, n: int = CODEC_N) -> tuple[dict[str, float], dict[str, float]]:
    """(encode, decode) s per element of each codec, error feedback included in encode."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(n, dtype=np.float32)
    residual, out = np.zeros(n, np.float32), np.empty(n, np.float32)
    enc, dec = {}, {}
    for name in names:
        c = codec.parse(name)
        fields, frames = c.encode(x, residual)
        header = {**fields, "n": n}
        enc[c.text] = _typical(lambda: c.encode(np.add(x, residual, out=out), residual)) / n
        dec[c.text] = _typical(lambda: codec.dense(header, frames, out)) / n
    return enc, dec


def handle_s(cfg: Config, n: int, op: str, compressed: bool = False, repeats: int = 0) -> float:
    """Seconds PieceState (ps/piece.py) takes to answer one `op` for a piece of n elements
    in this process, with the run's optimizer and, if `compressed`, its codecs (a topk
    pull after the worker's first, whole one). The median of a few timings."""
    from downpour.common.wire import protocol
    from downpour.ps.piece import PieceState
    piece = PieceState(cfg, ModelSpec(n_inputs=1, n_outputs=1), 0, 0, n,
                       initial=np.zeros(n, np.float32))
    rng = np.random.default_rng(2)
    grad = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    residual = np.zeros(n, np.float32)
    push = codec.parse(cfg.push_codec) if compressed and cfg.push_codec != "none" else None
    pull = cfg.pull_codec if compressed and cfg.pull_codec != "none" else None
    seq = [0]

    def one(which: str = op) -> None:
        seq[0] += 1
        header = {"op": which, "node": "worker-0", "seq": seq[0], "piece": 0, "clock": piece.version,
                  **({"meta": {"codec": pull}} if pull and which != "push" else {})}
        if which == "pull" or push is None:
            frames = protocol.encode(header, None if which == "pull" else grad)
        else:
            fields, parts = push.encode(grad + residual, residual)
            frames = [*protocol.encode({**header, **fields, "n": n}), *parts]
        piece.handle(b"w", frames)
    one("pull")                                          # a topk pull's whole first answer
    repeats = repeats or max(5, min(200, int(2e7 // max(n, 1))))
    return _typical(lambda: [one() for _ in range(repeats)], 5) / repeats


def server_costs(cfg: Config, n: int) -> dict[str, float]:
    """handle_s of every message an async or ssp run sends a piece of n elements: push_pull,
    push and pull, and with codecs each again past the warm-up (" codec")."""
    out = {op: handle_s(cfg, n, op) for op in ("push_pull", "push", "pull")}
    if cfg.push_codec != "none" or cfg.pull_codec != "none":
        out.update({f"{op} codec": handle_s(cfg, n, op, True) for op in ("push_pull", "push", "pull")})
    return out


def transport_costs() -> dict[str, float]:
    """server_msg_s, client_msg_s, server_elem_s, ipc_bytes_per_s and crypto_s_per_byte,
    from real round trips over ipc to server processes (shard servers of a tiny and a 1M
    vector, raw echo servers with and without CurveZMQ) and PieceState in this process.

    server_elem_s: what a shard server spends per element received beyond what PieceState
    takes in this process: a real push_pull of 1M elements less a raw echo of them, less
    the SGD answer in this process (each less its 16-element counterpart)."""
    from downpour.bench.comm import _raw_server, _RawClient
    from downpour.common.wire.client import ShardClient
    from downpour.common.wire.security import Keys, write_keys
    from downpour.ps.server import standalone
    mp = multiprocessing.get_context("spawn")
    spec, big = ModelSpec(n_inputs=3, n_outputs=2, hidden=(2,)), ModelSpec(n_inputs=1023, n_outputs=1,
                                                                            hidden=(1024,))
    n_tiny, n_big = model_layout(spec).size, model_layout(big).size
    cfg = Config(mode="async", workers=1, shards=1, optimizer="sgd", lr=1e-3, piece_kib=0)
    with tempfile.TemporaryDirectory(prefix="downpour-calibrate-") as tmp:
        keys_dir = str(Path(tmp) / "keys")
        write_keys(keys_dir)
        names = {k: f"ipc://{tmp}/{k}" for k in ("shard", "big", "raw", "tiny", "curve")}
        procs = [mp.Process(target=standalone, args=(cfg, spec, 0, names["shard"]), daemon=True),
                 mp.Process(target=standalone, args=(cfg, big, 0, names["big"]), daemon=True),
                 mp.Process(target=_raw_server, args=(names["raw"], {0: n_big}, False, ""), daemon=True),
                 mp.Process(target=_raw_server, args=(names["tiny"], {0: n_tiny}, False, ""), daemon=True),
                 mp.Process(target=_raw_server, args=(names["curve"], {0: n_big}, False, keys_dir),
                            daemon=True)]
        for p in procs:
            p.start()
        ctx = zmq.Context()
        try:
            grad, out = np.full(n_big, 1e-3, np.float32), np.empty(n_big, np.float32)
            with ShardClient([names["shard"]], [(0, n_tiny)], "calibrate", START_S, 0, ctx) as shard:
                rtt_shard = _typical(lambda: [shard.push_pull(grad[:n_tiny], shard.versions[0],
                                                           out[:n_tiny]) for _ in range(ROUND_TRIPS)]
                                  ) / ROUND_TRIPS
                shard.call_all("shutdown")
            with ShardClient([names["big"]], [(0, n_big)], "calibrate", START_S, 0, ctx) as shard:
                rtt_shard_big = _typical(lambda: shard.push_pull(grad[:n_big], shard.versions[0],
                                                              out[:n_big]), 10)
                shard.call_all("shutdown")
            raw = _RawClient(ctx, [names["raw"]], [(0, n_big)])
            tiny = _RawClient(ctx, [names["tiny"]], [(0, n_tiny)])
            curve = _RawClient(ctx, [names["curve"]], [(0, n_big)], keys=Keys.load(keys_dir, "worker"))
            try:
                rtt_tiny = _typical(lambda: [tiny.round_trip(grad, out) for _ in range(ROUND_TRIPS)]) \
                    / ROUND_TRIPS
                rtt_big = _typical(lambda: raw.round_trip(grad, out))
                rtt_curve = _typical(lambda: curve.round_trip(grad, out))
                for c in (raw, tiny, curve):
                    c.stop()
            finally:
                for c in (raw, tiny, curve):
                    c.close()
        finally:
            ctx.term()
            for p in procs:
                p.join(timeout=START_S)
                if p.is_alive():
                    p.kill()
                    p.join()
    copy = _typical(lambda: np.copyto(out, grad)) / (4 * n_big)
    moved = rtt_big - rtt_tiny - 4 * n_big * copy          # both ways' transport
    server_tiny, server_big = handle_s(cfg, n_tiny, "push_pull"), handle_s(cfg, n_big, "push_pull")
    beyond = (rtt_shard_big - rtt_shard) - (rtt_big - rtt_tiny) - (server_big - server_tiny)
    return {"server_msg_s": server_tiny, "client_msg_s": max(0.0, rtt_shard - server_tiny),
            "server_elem_s": max(0.0, beyond / n_big),
            "ipc_bytes_per_s": 8 * n_big / max(moved, 1e-9),
            "crypto_s_per_byte": max(0.0, rtt_curve - rtt_big) / (16 * n_big)}


def tcp_sndbuf() -> int:
    """The kernel's default TCP send buffer (net.ipv4.tcp_wmem's middle value; 16384 where
    it cannot be read): what ZeroMQ hands the kernel of a message before the link sends it."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 16384


def flops_per_sample(spec: ModelSpec) -> float:
    """Multiply-adds x 2 x 3 (forward, and backward's two products) of every layer with
    weights: a dense layer's in x out, a convolution's per output position."""
    from downpour.common.nn.conv import Conv2D
    total = 0.0
    for layer in Model(spec, seed=0).layers:
        for w, _ in layer.weights():
            if w.ndim < 2:
                continue
            positions = 1
            if isinstance(layer, Conv2D):
                positions = layer.out_shape[0] * layer.out_shape[1]
            elif getattr(layer, "T", None):              # recurrent: per time step
                positions = layer.T
            total += 6.0 * positions * w.shape[0] * w.shape[1]
    return total


def model_key(cfg: Config) -> str:
    from downpour.experiment import model_name
    return f"{model_name(cfg)} b{cfg.batch_size} x{cfg.compute_scale:g}"


def spec_of(cfg: Config) -> tuple[ModelSpec, Any]:
    data, _ = synthetic_dataset(max(SHAPE_SAMPLES, 2 * cfg.batch_size), 0, seed=cfg.seed)
    return model_spec(cfg, data), data


def compute_costs(cfg: Config, seconds: float = COMPUTE_S) -> dict[str, float]:
    """CPU s per batch of the model and batch size of `cfg`, as a worker's GradientStep
    takes it (gather, forward, backward, clipping), one BLAS thread, padded as
    --compute-scale F pads it: each step followed by a sleep of F - 1 times its CPU time
    (a step after a sleep finds its caches cold: at F = 16 the MLP 256-128's steps were
    measured 28% longer than back to back); its variation; its FLOPs."""
    spec, data = spec_of(cfg)
    model = Model(spec, seed=cfg.seed)
    step = GradientStep(replace(cfg, slow_worker=""), model, data, "calibrate")
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, len(data), cfg.batch_size) for _ in range(8)]
    for idx in batches[:3]:
        step.step(idx)
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < MIN_STEPS:
        c0 = step.times.cpu_s
        step.step(batches[len(times) % len(batches)])          # padded, as a worker's
        times.append(step.times.cpu_s - c0)
    mean = statistics.fmean(times)
    return {"compute_s": mean, "compute_cv": statistics.pstdev(times) / mean,
            "flops": flops_per_sample(spec) * cfg.batch_size}


def calibrate(cfg: Config, say=print) -> dict[str, Any]:
    """A new profile of this machine, with the model of `cfg`."""
    t0 = time.perf_counter()
    say = (lambda say: lambda text: say(f"{text} ({time.perf_counter() - t0:.1f} s)"))(say)
    say("calibrate: memory passes and optimizers ...")
    profile: dict[str, Any] = {"version": VERSION, "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "machine": {"cpus": os.cpu_count(), "numpy": np.__version__},
                               **memory_costs()}
    say("calibrate: codecs ...")
    profile["encode_s_per_elem"], profile["decode_s_per_elem"] = codec_costs()
    say("calibrate: messages and transport ...")
    profile.update(transport_costs())
    profile["tcp_sndbuf_bytes"] = tcp_sndbuf()
    say(f"calibrate: the model ({model_key(cfg)}) ...")
    profile["models"] = {model_key(cfg): compute_costs(cfg)}
    profile["calibrate_s"] = round(time.perf_counter() - t0, 1)
    return profile
