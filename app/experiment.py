"""`downpour experiment`: a sweep of training runs, turned into a table and plots.

    for each mode, number of workers W, number of shards S and repeat:
        downpour train --mode MODE --workers W --shards S --seed SEED+REPEAT [settings] \\
                       --metrics OUT/runs/NAME.jsonl
    -> OUT/results.csv   one row per run
    -> OUT/*.png         throughput against workers, accuracy against wall time and
                         against samples, the staleness distribution (common/plots.py)

Every run is a separate `downpour train` process, exactly as a user would start it,
so runs do not share caches or state. Single mode runs once per repeat (W = 1,
no shards) and hogwild once per W (no shards): their settings do not vary with S.

Columns of results.csv: mode, workers, shards, batch_size, repeat, seed,
samples_per_s, updates_per_s, time_to_target_s (the wall time of the first
evaluation at or above --target; empty if never), final_accuracy, best_accuracy,
staleness_p50, staleness_p99, staleness_max, bytes, elapsed_s, metrics (the file).
"""

from __future__ import annotations

import csv
import io
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

from downpour import plots
from downpour.common import config
from downpour.common.config import Config
from downpour.common.errors import DownpourError
from downpour.common.fileio import atomic_write
from downpour.common.metrics import Progress, read_metrics
from downpour.launch import CLI, child_env

COLUMNS = ("mode", "workers", "shards", "batch_size", "repeat", "seed", "samples_per_s",
           "updates_per_s", "time_to_target_s", "final_accuracy", "best_accuracy",
           "staleness_p50", "staleness_p99", "staleness_max", "bytes", "elapsed_s", "metrics")
SWEPT = ("mode", "workers", "shards", "seed", "metrics", "save", "progress", "config")


def plan(modes: list[str], workers: list[int], shards: list[int], repeats: int) -> list[dict]:
    """The runs of a sweep, as (mode, workers, shards, repeat) records, in the order run."""
    runs = []
    for mode in modes:
        for w in ([1] if mode == "single" else workers):
            for s in ([0] if mode in ("single", "hogwild") else shards):
                for r in range(repeats):
                    runs.append({"mode": mode, "workers": w, "shards": s, "repeat": r})
    return runs


def row(run: dict, cfg: Config, path: Path, target: float) -> dict[str, Any]:
    evals, end = read_metrics(path)
    if end is None:
        raise DownpourError(f"{path} has no end line: the run did not finish")
    reached = [e["elapsed_s"] for e in evals if e["test_accuracy"] >= target]
    return {**run, "batch_size": cfg.batch_size, "seed": cfg.seed + run["repeat"],
            "samples_per_s": end["samples_per_s"], "updates_per_s": end["updates_per_s"],
            "time_to_target_s": reached[0] if reached else "",
            "final_accuracy": end["test_accuracy"],
            "best_accuracy": max([e["test_accuracy"] for e in evals], default=end["test_accuracy"]),
            **{k: end.get(k) if end.get(k) is not None else "" for k in
               ("staleness_p50", "staleness_p99", "staleness_max", "bytes")},
            "elapsed_s": end["elapsed_s"], "metrics": str(path.relative_to(path.parents[1]))}


def run_sweep(cfg: Config, modes: list[str], workers: list[int], shards: list[int], repeats: int,
              out: Path, target: float) -> list[dict]:
    """Run every run of the sweep; write results.csv and the plots; return the rows."""
    runs = plan(modes, workers, shards, repeats)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    progress = Progress(len(runs), cfg.progress)
    progress.line(f"experiment: {len(runs)} runs into {out}")
    env = child_env()
    base = config.to_args(replace(cfg, **{k: config.FIELDS[k].default for k in SWEPT}))
    rows = []
    for i, run in enumerate(runs):
        name = f"{run['mode']}-w{run['workers']}-s{run['shards']}-r{run['repeat']}"
        path = out / "runs" / f"{name}.jsonl"
        argv = [*CLI, "train", *base, "--mode", run["mode"],
                "--workers", str(run["workers"]), "--shards", str(max(1, run["shards"])),
                "--seed", str(cfg.seed + run["repeat"]), "--metrics", str(path),
                "--progress", "none"]
        progress.update(i, f"run {i + 1}/{len(runs)}: {name}")
        done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode != 0:
            raise DownpourError(f"run {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        rows.append(row(run, cfg, path, target))
        r = rows[-1]
        progress.line(f"{name:<22} {r['samples_per_s']:>9,.0f} samples/s  accuracy "
                      f"{100 * r['final_accuracy']:.2f}%  time to {target:g}: "
                      f"{r['time_to_target_s'] or 'never'}")
    progress.update(len(runs))
    progress.close()
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "results.csv", lambda f: f.write(text.getvalue().encode()))
    if not plots.available():
        progress.line("results.csv written; for the plots install matplotlib "
                      "(pip install -e '.[plot]')")
    else:
        for path in plots.sweep(rows, out, target):
            progress.line(f"wrote {path}")
    return rows
