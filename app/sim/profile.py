"""The costs `downpour simulate` uses: measured on this machine, or given for another.

A profile (JSON, `--profile FILE`, default ~/.cache/downpour/profile.json) holds what
`downpour simulate --calibrate` measured, each figure per unit of work:

    client_msg_s          s      a worker's CPU per message and its reply: a real
                                 ShardClient.push_pull of a 16-float vector through a
                                 real shard server over ipc, less the server's part
    server_msg_s          s      the server's CPU per message: PieceState answering a
                                 16-float push_pull in this process
    copy_s_per_byte       s/B    np.copyto of 16 MB (a reply copied into place)
    check_s_per_elem      s      np.dot(g, g) (the server's finiteness check)
    add_s_per_elem        s      an in-place add (sync's sum, the n_push accumulator)
    apply_s_per_elem      s      each optimizer's step (common/nn/optim.py), 4M elements
    encode_s_per_elem     s      each codec's encode with error feedback, per element of
    decode_s_per_elem     s      the piece (a topk:R's cost follows R), 1M elements
    ipc_bytes_per_s       B/s    a raw pyzmq echo of 4 MB each way over ipc (the rate of
                                 a run without --link)
    server_elem_s         s      per element a real shard server receives beyond what
                                 PieceState takes in this process (ZeroMQ's buffers)
    servers                      per optimizer, codecs and piece size: PieceState's answer
                                 to a push_pull, push and pull (s), measured in this process
    tcp_sndbuf_bytes      B      net.ipv4.tcp_wmem's default: what ZeroMQ hands the kernel
    links                        per --link, message size and workers (up to 16): the share
                                 of its rate an emulated link carried where its tbf dropped
                                 packets (linkprobe.py, measured when first used; 1 without
                                 drops)
    crypto_s_per_byte     s/B    CurveZMQ's extra time per byte per end (encrypt or
                                 decrypt): the same echo with keys, less without
    models                       per model and batch size: compute_s (CPU s per batch,
                                 GradientStep as workers take it, one BLAS thread),
                                 compute_cv (its variation), flops (per batch, counted)

For another machine, `--device-gflops G` makes a batch's compute its FLOPs (counted
from the layer spec: 2 per multiply-add, x3 for forward and backward) over G GFLOP/s,
and `--link` sets the links; the rest of the profile stays this machine's (or edit
the file). A model the profile lacks is measured on the spot (seconds) and kept.
`explain` lists every number a simulation uses, with its unit and its source.
"""

from __future__ import annotations

import json
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

from downpour import netem
from downpour.common.config import Config, parse_rate
from downpour.common.data import synthetic_dataset
from downpour.common.errors import ClusterError, ConfigError
from downpour.common.fileio import atomic_write
from downpour.common.nn.model import Model, ModelSpec, model_layout
from downpour.common.nn.optim import OPTIMIZERS, make_optimizer
from downpour.common.step import GradientStep
from downpour.common.training import model_spec
from downpour.common.wire import codec
from downpour.sim.engine import WIRE_EFFICIENCY, Costs

VERSION = 2
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
DEFAULT_PROFILE = CACHE / "downpour" / "profile.json"
CODECS = ("fp16", "topk:0.01", "topk:0.1", "onebit")     # calibrated; others measured when used
MEMORY_N = 1 << 22            # elements of the memory-pass and optimizer timings
CODEC_N = 1 << 20             # elements of the codec timings
IPC_BYTES = 4 << 20           # bytes each way of the transport timing
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


# ---------------------------------------------------------------------------- measuring


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


def _spec(cfg: Config) -> tuple[ModelSpec, Any]:
    data, _ = synthetic_dataset(max(SHAPE_SAMPLES, 2 * cfg.batch_size), 0, seed=cfg.seed)
    return model_spec(cfg, data), data


def compute_costs(cfg: Config, seconds: float = COMPUTE_S) -> dict[str, float]:
    """CPU s per batch of the model and batch size of `cfg`, as a worker's GradientStep
    takes it (gather, forward, backward, clipping), one BLAS thread, padded as
    --compute-scale F pads it: each step followed by a sleep of F - 1 times its CPU time
    (a step after a sleep finds its caches cold: at F = 16 the MLP 256-128's steps were
    measured 28% longer than back to back); its variation; its FLOPs."""
    spec, data = _spec(cfg)
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


def load(path: Path) -> dict[str, Any] | None:
    """The profile at `path`, or None if there is none. ConfigError if it is not one."""
    try:
        profile = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"profile {path}: cannot be read ({e}); run `downpour simulate "
                          "--calibrate --profile FILE` to write a new one") from None
    if not isinstance(profile, dict) or profile.get("version") != VERSION:
        raise ConfigError(f"profile {path} is not a version-{VERSION} profile; run `downpour "
                          "simulate --calibrate` to write a new one")
    return profile


def save(profile: dict[str, Any], path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(profile, indent=1, sort_keys=True).encode()))


# ---------------------------------------------------------------------------- using


def piece_sizes(cfg: Config) -> list[int]:
    """Elements of each piece of server 0 (every server's shard is cut alike)."""
    spec, _ = _spec(cfg)
    pieces = model_layout(spec).pieces(cfg.shards, cfg.piece_elements)
    return [p.hi - p.lo for p in pieces if p.server == 0]


def costs(cfg: Config, profile: dict[str, Any], path: Path, device_gflops: float = 0.0
          ) -> tuple[Costs, list[tuple[str, float, str, str]]]:
    """(the Costs of a run of `cfg`, and every number in them as (name, value, unit,
    source)). A model or codec the profile lacks is measured now and added to it."""
    src = f"measured {profile['measured']} ({path})"
    now = "measured now (kept in the profile)"
    rows: list[tuple[str, float, str, str]] = []
    key = model_key(cfg)
    model = profile["models"].get(key)
    model_src = src
    if model is None:
        model = profile["models"][key] = compute_costs(cfg)
        model_src = now
    compute = model["compute_s"]
    if device_gflops:
        compute, model_src = model["flops"] / (device_gflops * 1e9), \
            f"--device-gflops {device_gflops:g}: {model['flops']:.4g} FLOPs per batch / rate"
    used = [codec.parse(c).text for c in (cfg.push_codec, cfg.pull_codec)
            if codec.parse(c).name != "none"]
    missing = [c for c in used if c not in profile["encode_s_per_elem"]]
    if missing:
        enc, dec = codec_costs(missing)
        profile["encode_s_per_elem"].update(enc)
        profile["decode_s_per_elem"].update(dec)
    ipc = profile["ipc_bytes_per_s"]
    worker_burst = server_burst = 0.0
    efficiency, efficiency_src = 1.0, "no --link"
    if cfg.link:
        worker_rate = parse_rate(cfg.link, "link") / 8 * WIRE_EFFICIENCY
        server_rate = parse_rate(cfg.server_link or cfg.link, "server_link") / 8 * WIRE_EFFICIENCY
        worker_burst, server_burst = (netem.burst_bytes(r / WIRE_EFFICIENCY * 8) * WIRE_EFFICIENCY
                                      for r in (worker_rate, server_rate))
        efficiency, efficiency_src = link_efficiency(cfg, profile, 4 * max(piece_sizes(cfg)), src)
        worker_rate, server_rate = worker_rate * efficiency, server_rate * efficiency
        link_src = f"--link {cfg.link}" + (f", --server-link {cfg.server_link}" if cfg.server_link
                                           else "") + " x 1448/1514 (TCP/IP headers at MTU 1500)"
    else:
        worker_rate = server_rate = ipc
        link_src = f"ipc, {src}"
    crypto = profile["crypto_s_per_byte"] if cfg.keys else 0.0
    n = max(piece_sizes(cfg))
    server_key = f"{cfg.optimizer} push {codec.parse(cfg.push_codec).text} pull " \
                 f"{codec.parse(cfg.pull_codec).text} n{n}"
    servers = profile.setdefault("servers", {})
    server_src = src
    if server_key not in servers:
        servers[server_key], server_src = server_costs(cfg, n), now
    c = Costs(compute_s=compute, compute_cv=0.0 if device_gflops else model["compute_cv"],
              client_msg_s=profile["client_msg_s"], server_msg_s=profile["server_msg_s"],
              copy_s_per_byte=profile["copy_s_per_byte"],
              check_s_per_elem=profile["check_s_per_elem"], add_s_per_elem=profile["add_s_per_elem"],
              apply_s_per_elem=profile["apply_s_per_elem"][cfg.optimizer],
              encode_s_per_elem=dict(profile["encode_s_per_elem"]),
              decode_s_per_elem=dict(profile["decode_s_per_elem"]),
              server_s=dict(servers[server_key]), server_elem_s=profile["server_elem_s"],
              worker_rate=worker_rate, server_rate=server_rate, worker_burst=worker_burst,
              server_burst=server_burst, crypto_s_per_byte=crypto,
              sndbuf=profile["tcp_sndbuf_bytes"] if cfg.link else 0.0)
    rows += [("compute_s", compute, "s per batch of " + key, model_src),
             ("compute_cv", c.compute_cv, "std / mean of a batch's compute", model_src),
             ("compute_scale", cfg.compute_scale, "x compute (--compute-scale)", "the settings"),
             ("client_msg_s", c.client_msg_s, "s per message, worker", src),
             ("server_msg_s", c.server_msg_s, "s per message, server", src),
             ("copy_s_per_byte", c.copy_s_per_byte, "s per byte copied", src),
             ("check_s_per_elem", c.check_s_per_elem, "s per element (finiteness check)", src),
             ("add_s_per_elem", c.add_s_per_elem, "s per element added", src),
             ("apply_s_per_elem", c.apply_s_per_elem, f"s per element of {cfg.optimizer}'s step", src),
             ("server_elem_s", c.server_elem_s, "s per element a server receives (ZeroMQ's buffers)",
              src)]
    rows += [(f"server_s[{op}]", v, f"s per answer to a {op} of {n:,} elements ({server_key})",
              server_src) for op, v in c.server_s.items()]
    for name in used:
        s = src if name not in missing else now
        rows += [(f"encode_s_per_elem[{name}]", c.encode_s_per_elem[name], "s per element", s),
                 (f"decode_s_per_elem[{name}]", c.decode_s_per_elem[name], "s per element", s)]
    rows += [("worker_rate", worker_rate, "payload bytes/s each way", link_src),
             ("server_rate", server_rate, "payload bytes/s each way", link_src),
             ("link_efficiency", efficiency, "share of the link's rate TCP carried the run's "
              "messages at (the links above are net of it)", efficiency_src),
             ("worker_burst", worker_burst, "payload bytes a worker's idle link passes at once",
              "tbf's bucket (app/netem.py)" if cfg.link else "no --link: none"),
             ("server_burst", server_burst, "payload bytes a server's idle link passes at once",
              "tbf's bucket (app/netem.py)" if cfg.link else "no --link: none"),
             ("sndbuf", c.sndbuf, "bytes of a reply the kernel takes before the link sends them "
              "(a server applies the next push once its replies are handed over)",
              "net.ipv4.tcp_wmem's default, read at calibration" if cfg.link else "no --link: 0"),
             ("crypto_s_per_byte", crypto, "s per byte per end (CurveZMQ)",
              src if cfg.keys else "no --keys: 0")]
    if cfg.slow_worker:
        rows.append(("slow_worker", cfg.slowdown[1], f"x compute of worker {cfg.slowdown[0]}",
                     "the settings"))
    return c, rows


def link_efficiency(cfg: Config, profile: dict[str, Any], nbytes: int, src: str
                    ) -> tuple[float, str]:
    """(the share of its rate the emulated --link carried messages of nbytes from W workers
    at once, linkprobe.efficiency; where it was measured). Measured once per link, size
    and worker count (at most linkprobe.MAX_SENDERS) and kept in the profile; 1.0 where
    it cannot be measured (no namespaces here, or --server-link differs), which says why."""
    from downpour.sim import linkprobe
    if cfg.server_link and cfg.server_link != cfg.link:
        return 1.0, "not measured: --server-link differs from --link (the probe has one rate)"
    senders = min(cfg.workers, linkprobe.MAX_SENDERS)
    key = f"{cfg.link} {nbytes}B x{senders}"
    links = profile.setdefault("links", {})
    if key in links:
        return links[key], f"{src}, {key}"
    if why := netem.problem():
        return 1.0, f"not measured: {why}"
    try:
        links[key] = linkprobe.efficiency(cfg.link, nbytes, senders)
    except ClusterError as e:
        return 1.0, f"not measured: {e}"
    return links[key], f"measured now by the link probe, {key} (kept in the profile)"


def slowed(c: Costs, factor: float) -> Costs:
    """`c` on a host `factor` times slower than the profile's: every CPU cost (not the links'
    rates but ipc's, which is CPU too) times `factor`."""
    per = {k: v * factor for k, v in c._asdict().items()
           if isinstance(v, float) and k.endswith(("_s", "_s_per_byte", "_s_per_elem"))
           and k != "compute_s"}
    per.update({k: {n: v * factor for n, v in getattr(c, k).items()}
                for k in ("encode_s_per_elem", "decode_s_per_elem", "server_s")})
    if c.worker_burst == 0.0:                      # ipc: the kernel's copies
        per.update(worker_rate=c.worker_rate / factor, server_rate=c.server_rate / factor)
    return c._replace(**per)


def explain(rows: list[tuple[str, float, str, str]]) -> str:
    """The numbers a simulation uses, one per line: name, value, unit, source."""
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value:>12.4g}  {unit}  [{source}]"
                     for name, value, unit, source in rows)
