"""`downpour simulate`: predict a run of `downpour train` with the calibrated model.

    downpour simulate [train settings]          the figures `train` ends with, predicted
        --json                                  one JSON line, the end record's field names
        --explain                               every number the model uses, unit and source
        --profile FILE                          the costs (default ~/.cache/downpour/profile.json;
                                                made by --calibrate, or on first use)
        --device-gflops G                       another machine's compute: FLOPs / G GFLOP/s
    downpour simulate --calibrate [settings]    measure this machine into the profile (< 1 min)
    downpour simulate --validate [--repeats N]  real emulated runs against their predictions
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from downpour.common.config import Config
from downpour.common.errors import ConfigError
from downpour.common.training import check_cluster, training_samples
from downpour.sim import profile as profiles
from downpour.sim.calibrate import calibrate
from downpour.sim.engine import Costs, Run

SIMULATED = ("async", "sync", "ssp")      # the modes the simulator models (dense models only)


def check(cfg: Config) -> int:
    """The training set's size; ConfigError for a run `train` would refuse."""
    if cfg.mode not in SIMULATED or cfg.model:
        raise ConfigError(f"simulate models --mode {', '.join(SIMULATED)} (a cluster of servers "
                          f"and workers, dense models), not --mode {cfg.mode}"
                          + (f" with --model {cfg.model}: sparse tables are not modelled"
                             if cfg.model else ""))
    n = training_samples(cfg)
    check_cluster(cfg, n)
    return n


def simulate(cfg: Config, costs: Costs) -> dict[str, Any]:
    """The predicted end figures of a run of `cfg` (EndRecord's names, and a few more)."""
    n = check(cfg)
    t0 = time.perf_counter()
    figures = Run(cfg, n, profiles.piece_sizes(cfg), costs).simulate()
    return {"simulated": True, **figures, "simulate_s": round(time.perf_counter() - t0, 3)}


def costs_for(cfg: Config, path: Path, device_gflops: float = 0.0, say=None
              ) -> tuple[Costs, list]:
    """The Costs of `cfg` from the profile at `path` (calibrated first if there is none);
    a model or codec measured now is kept in the profile."""
    say = say or (lambda text: print(text, file=sys.stderr))
    profile = profiles.load(path)
    if profile is None:
        say(f"simulate: no profile at {path}; calibrating this machine first (under a minute)")
        profile = calibrate(cfg, say)
        profiles.save(profile, path)
    before = json.dumps(profile, sort_keys=True)
    costs, rows = profiles.costs(cfg, profile, path, device_gflops)
    if json.dumps(profile, sort_keys=True) != before:
        profiles.save(profile, path)
    return costs, rows


def summary(r: dict[str, Any]) -> str:
    """The lines `train` ends with, for a simulated run."""
    lines = [f"simulated: {r['samples']:,} samples in {r['train_time_s']:.1f} s of training "
             f"({r['samples_per_s']:,.0f} samples/s, {r['updates_per_s']:,.1f} updates/s), "
             f"staleness p50/p99/max {r['staleness_p50']:g}/{r['staleness_p99']:g}/"
             f"{r['staleness_max']:g}",
             f"server busy {100 * r['server_utilization']:.0f}% of the time; workers waiting "
             f"{100 * r['worker_waiting_share']:.0f}%; {r['bytes_per_sample']:,.0f} bytes per sample"]
    if r.get("busiest_link"):
        lines.append(f"links: the busiest, {r['busiest_link']}, at "
                     f"{100 * r['link_utilization']:.0f}% of its rate")
    lines.append(f"({r['events']:,} events in {r['simulate_s']:.2f} s)")
    return "\n".join(lines)


def main(args, cfg: Config) -> int:
    path = Path(args.profile).expanduser()
    if args.device_gflops < 0:
        raise ConfigError(f"--device-gflops {args.device_gflops}: give a rate > 0 (GFLOP/s)")
    if args.calibrate:
        check(cfg)
        profile = calibrate(cfg, lambda t: print(t, file=sys.stderr))
        profiles.save(profile, path)
        print(f"wrote {path} in {profile['calibrate_s']:.1f} s")
        _, rows = profiles.costs(cfg, profile, path)
        print(profiles.explain(rows))
        return 0
    if args.validate:
        from downpour.sim import validate
        return validate.main(args, path)
    check(cfg)
    costs, rows = costs_for(cfg, path, args.device_gflops)
    if args.explain:
        print(profiles.explain(rows), file=sys.stderr if args.json else sys.stdout)
    result = simulate(cfg, costs)
    if args.json:
        print(json.dumps(result))
    else:
        print(summary(result))
    return 0
