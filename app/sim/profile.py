"""The costs `downpour simulate` uses: measured on this machine, or given for another.

A profile (JSON, `--profile FILE`, default ~/.cache/downpour/profile.json) holds what
`downpour simulate --calibrate` measured (sim/calibrate.py), each figure per unit of work:

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
import os
from pathlib import Path
from typing import Any

from downpour import netem
from downpour.common.config import Config, parse_rate
from downpour.common.errors import ClusterError, ConfigError
from downpour.common.fileio import atomic_write
from downpour.common.nn.model import model_layout
from downpour.common.wire import codec
from downpour.sim.calibrate import VERSION, codec_costs, compute_costs, model_key, server_costs, spec_of
from downpour.sim.engine import Costs
from downpour.sim.network import WIRE_EFFICIENCY

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
DEFAULT_PROFILE = CACHE / "downpour" / "profile.json"


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
    spec, _ = spec_of(cfg)
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
    ipc, n = profile["ipc_bytes_per_s"], max(piece_sizes(cfg))     # n: the largest piece
    worker_burst = server_burst = 0.0
    efficiency, efficiency_src = 1.0, "no --link"
    if cfg.link:
        worker_rate = parse_rate(cfg.link, "link") / 8 * WIRE_EFFICIENCY
        server_rate = parse_rate(cfg.server_link or cfg.link, "server_link") / 8 * WIRE_EFFICIENCY
        worker_burst, server_burst = (netem.burst_bytes(r / WIRE_EFFICIENCY * 8) * WIRE_EFFICIENCY
                                      for r in (worker_rate, server_rate))
        efficiency, efficiency_src = link_efficiency(cfg, profile, 4 * n, src)
        worker_rate, server_rate = worker_rate * efficiency, server_rate * efficiency
        link_src = f"--link {cfg.link}" + (f", --server-link {cfg.server_link}" if cfg.server_link
                                           else "") + " x 1448/1514 (TCP/IP headers at MTU 1500)"
    else:
        worker_rate = server_rate = ipc
        link_src = f"ipc, {src}"
    crypto = profile["crypto_s_per_byte"] if cfg.keys else 0.0
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
