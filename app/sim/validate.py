"""`downpour simulate --validate`: real emulated runs against the simulator's predictions.

Each case of GRID runs `--repeats` times as `downpour train` (behind emulated links where
it says, with --compute-scale padding), the repeats of all cases interleaved so that a
slow spell of this shared machine hits them all; the measured figure is the median of
a case's runs whose `host_bound` is false (a run whose padding the host could not keep
measures the host, which the simulator does not model). The prediction is the
simulator's for the same settings, with the profile's costs.

Two predictions per case. Given the device: the workers' compute is the CPU time per
step the runs measured (their end records' nodes), times --compute-scale: an emulated
device on this host is as fast as its steps' CPU time, which contention with the other
processes here stretches by up to 1.7x (0.69 ms for the MLP's batch alone, 1.1 to 1.3
ms with 8 to 16 workers and a server on two cores) and which the simulator does not
model; the host was that much slower for every process, so every other CPU cost of the
profile is scaled by the same ratio (profile.slowed); the links, the protocol and the
rest come from the profile. From the profile alone: the compute too, as --calibrate
measured it alone. The first judges the model of the protocol and the network; the
second what a user predicting a run on this host without running it gets.

The grid: async, sync (a straggler, a backup worker) and ssp; W 1 to 16, S 1 to 4;
1gbit and 100mbit links, and ipc at W <= 2; two models of different compute per
parameter (the MLP 256-128: 6 FLOPs per parameter and sample; a CNN: ~60); codecs none
and top-k; overlap. Evaluations are off (--eval-every 0: the final one only, after
training time) in the runs and the model alike.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from downpour.common import config
from downpour.common.config import Config
from downpour.common.errors import DownpourError
from downpour.common.fileio import atomic_write
from downpour.common.metrics import read_metrics
from downpour.launch import CLI, child_env

MLP = {"hidden": (256, 128)}
CNN = {"layers": "conv:32:3,relu,maxpool:2,conv:64:3,relu,maxpool:2,flatten,dense:128,relu",
       "input_shape": (1, 28, 28)}
COMMON = {"batch_size": 64, "eval_every": 0.0, "codec_warmup_epochs": 0.0}
TOPK = {"push_codec": "topk:0.01", "pull_codec": "topk:0.01"}

# name -> settings of `downpour train`
GRID: dict[str, dict[str, Any]] = {
    "async W1 S1 ipc x2 mlp": dict(mode="async", workers=1, shards=1, compute_scale=2, epochs=2, **MLP),
    "async W2 S1 ipc x4 mlp": dict(mode="async", workers=2, shards=1, compute_scale=4, epochs=2, **MLP),
    "async W2 S2 ipc x2 cnn": dict(mode="async", workers=2, shards=2, compute_scale=2, epochs=1, **CNN),
    "async W1 S1 1gbit x2 mlp": dict(mode="async", workers=1, shards=1, link="1gbit", compute_scale=2,
                                     epochs=1, **MLP),
    "async W4 S1 1gbit x4 mlp": dict(mode="async", workers=4, shards=1, link="1gbit", compute_scale=4,
                                     epochs=2, **MLP),
    "async W4 S1 1gbit x4 mlp overlap": dict(mode="async", workers=4, shards=1, link="1gbit",
                                             compute_scale=4, epochs=2, overlap=True, **MLP),
    "async W8 S1 1gbit x8 mlp": dict(mode="async", workers=8, shards=1, link="1gbit", compute_scale=8,
                                     epochs=2, **MLP),
    "async W16 S4 1gbit x16 mlp": dict(mode="async", workers=16, shards=4, link="1gbit",
                                       compute_scale=16, epochs=2, **MLP),
    "async W8 S1 1gbit x8 cnn": dict(mode="async", workers=8, shards=1, link="1gbit",
                                     compute_scale=8, epochs=2, **CNN),
    "async W2 S1 100mbit x4 mlp": dict(mode="async", workers=2, shards=1, link="100mbit",
                                       compute_scale=4, epochs=1, **MLP),
    "async W8 S1 100mbit x8 mlp": dict(mode="async", workers=8, shards=1, link="100mbit",
                                       compute_scale=8, epochs=1, **MLP),
    "async W4 S2 100mbit x8 mlp topk": dict(mode="async", workers=4, shards=2, link="100mbit",
                                            compute_scale=8, epochs=2, **MLP, **TOPK),
    "async W8 S1 1gbit x16 mlp topk": dict(mode="async", workers=8, shards=1, link="1gbit",
                                           compute_scale=16, epochs=2, **MLP, **TOPK),
    "sync W4 S1 1gbit x4 mlp slow backup": dict(mode="sync", workers=4, shards=1, link="1gbit",
                                                compute_scale=4, epochs=2, slow_worker="0:3", backup=1,
                                                **MLP),
    "sync W8 S2 1gbit x8 cnn": dict(mode="sync", workers=8, shards=2, link="1gbit", compute_scale=8,
                                    epochs=1, **CNN),
    "ssp W8 S1 1gbit x8 mlp slow s2": dict(mode="ssp", workers=8, shards=1, link="1gbit",
                                           compute_scale=8, epochs=2, slow_worker="0:2", staleness=2,
                                           **MLP),
}
FIGURES = ("samples_per_s", "staleness_p50")


def case_config(settings: dict[str, Any]) -> Config:
    return Config(**{**COMMON, **settings})


def run_once(cfg: Config, metrics: Path, timeout: float = 600.0) -> dict[str, Any]:
    """The `end` record of one real `downpour train` run of `cfg`."""
    argv = [*CLI, "train", *config.to_args(replace(cfg, metrics=str(metrics), progress="none"))]
    done = subprocess.run(argv, env=child_env(), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise DownpourError(f"validation run failed (exit {done.returncode}): {' '.join(argv)}\n"
                            f"{done.stderr[-2000:]}")
    _, end = read_metrics(metrics)
    if end is None:
        raise DownpourError(f"validation run wrote no end record: {' '.join(argv)}")
    return end


def measure(grid: dict[str, dict[str, Any]], repeats: int, say=print, runs: Path | None = None
            ) -> dict[str, list[dict]]:
    """Every case's end records, `repeats` each, the repeats interleaved. With `runs`, the
    records it already holds count and each new one is added to it as it comes (a
    validation stopped halfway goes on where it stopped)."""
    ends: dict[str, list[dict]] = {name: [] for name in grid}
    if runs is not None and runs.exists():
        try:
            held = json.loads(runs.read_text())
        except ValueError as e:
            raise config.ConfigError(f"--runs {runs} is not JSON ({e}); give another file") from None
        ends.update({k: v for k, v in held.items() if k in grid})
    with tempfile.TemporaryDirectory(prefix="downpour-validate-") as tmp:
        for r in range(repeats):
            for i, (name, settings) in enumerate(grid.items()):
                if len(ends[name]) > r:
                    continue
                end = run_once(case_config(settings), Path(tmp) / f"{i}-{r}.jsonl")
                ends[name].append(end)
                if runs is not None:
                    atomic_write(runs, lambda f: f.write(json.dumps(ends).encode()))
                say(f"validate: {name} run {r + 1}/{repeats}: {end['samples_per_s']:,.0f} "
                    f"samples/s, staleness p50 {end['staleness_p50']:g}"
                    + (", host bound" if end.get("host_bound") else ""))
    return {name: v[:repeats] for name, v in ends.items()}


def cpu_per_step(end: dict[str, Any]) -> float | None:
    """The mean CPU s of a worker's step in a run (its end record's nodes)."""
    workers = [v for k, v in (end.get("nodes") or {}).items() if k.startswith("worker") and v["steps"]]
    if not workers:
        return None
    return sum(v["cpu_s"] for v in workers) / sum(v["steps"] for v in workers)


def compare(name: str, ends: list[dict], device: dict[str, Any], profiled: dict[str, Any]
            ) -> dict[str, Any]:
    """One row of the table: measured (the median of the runs not host bound) against the
    prediction given the device (`device`: the runs' CPU per step as the workers' compute)
    and the prediction from the profile alone (`profiled`)."""
    kept = [e for e in ends if not e.get("host_bound")]
    row: dict[str, Any] = {"case": name, "runs": len(ends), "counted": len(kept)}
    for f in FIGURES:
        row[f"measured_{f}"] = statistics.median(e[f] for e in kept) if kept else None
        row[f"predicted_{f}"] = device[f]
    m = row["measured_samples_per_s"]
    row["error"] = (device["samples_per_s"] - m) / m if m else None
    row["profile_samples_per_s"] = profiled["samples_per_s"]
    row["profile_error"] = (profiled["samples_per_s"] - m) / m if m else None
    ms = row["measured_staleness_p50"]
    row["staleness_diff"] = device["staleness_p50"] - ms if ms is not None else None
    return row


def device_speed(ends: list[dict]) -> float | None:
    """The CPU s per step of the runs not host bound (the median of their means)."""
    cpus = [c for c in (cpu_per_step(e) for e in ends if not e.get("host_bound")) if c]
    return statistics.median(cpus) if cpus else None


def table(rows: list[dict[str, Any]]) -> str:
    """The validation table: samples/s measured, predicted given the device (error), and
    from the profile alone (error); staleness p50 measured and predicted."""
    head = (f"{'case':<36} {'measured':>9} {'predicted':>9} {'error':>7} {'profile':>9} "
            f"{'error':>7}  {'p50':>4} {'pred':>4}  runs")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["measured_samples_per_s"] is None:
            lines.append(f"{r['case']:<36} {'(every run host bound)':>27}")
            continue
        lines.append(f"{r['case']:<36} {r['measured_samples_per_s']:>9,.0f} "
                     f"{r['predicted_samples_per_s']:>9,.0f} {100 * r['error']:>+6.1f}% "
                     f"{r['profile_samples_per_s']:>9,.0f} {100 * r['profile_error']:>+6.1f}%  "
                     f"{r['measured_staleness_p50']:>4g} {r['predicted_staleness_p50']:>4g}  "
                     f"{r['counted']}/{r['runs']}")
    for key, what in (("error", "given the device"), ("profile_error", "from the profile alone")):
        errors = [abs(r[key]) for r in rows if r[key] is not None]
        if errors:
            lines.append(f"samples/s {what}: median |error| {100 * statistics.median(errors):.1f}%, "
                         f"largest {100 * max(errors):.1f}%")
    diffs = [abs(r["staleness_diff"]) for r in rows if r["staleness_diff"] is not None]
    if diffs:
        lines.append(f"staleness p50: off by at most {max(diffs):g} version(s)")
    return "\n".join(lines)


def main(args, profile_path: Path) -> int:
    from downpour.sim.command import costs_for, simulate
    from downpour.sim.profile import slowed
    if args.repeats < 1:
        raise config.ConfigError(f"--repeats {args.repeats}: give 1 or more runs per case")
    def say(text: str) -> None:
        print(text, file=sys.stderr)
    # the costs first (a model the profile lacks is measured now, not between runs)
    costs = {name: costs_for(case_config(s), profile_path, say=say)[0] for name, s in GRID.items()}
    ends = measure(GRID, args.repeats, say, Path(args.runs) if args.runs else None)
    rows = []
    for name, settings in GRID.items():
        cfg, speed = case_config(settings), device_speed(ends[name])
        device = costs[name] if speed is None else slowed(
            costs[name], speed / costs[name].compute_s)._replace(compute_s=speed)
        rows.append(compare(name, ends[name], simulate(cfg, device), simulate(cfg, costs[name])))
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(table(rows))
    return 0
