"""`downpour experiment`: a sweep of training runs, turned into a table and plots.

    for each mode, number of workers W, number of shards S and repeat:
        downpour train --mode MODE --workers W --shards S --seed SEED+REPEAT [settings] \\
                       --metrics OUT/runs/NAME.jsonl
    -> OUT/results.csv   one row per run
    -> OUT/*.png         throughput against workers, accuracy against wall time and
                         against samples, the staleness distribution (downpour.plots)

Every run is a separate `downpour train` process, exactly as a user would start it,
so runs do not share caches or state. Single mode runs once per repeat (W = 1,
no shards) and hogwild once per W (no shards): their settings do not vary with S.

Before the first run, the sweep says on stderr, once each, what it leaves out:
cases that cannot exist (single at 2 workers, hogwild at 2 shards, or settings that
contradict a case, as sync with --backup 1 at 1 worker), and settings given that a
mode does not use (--backup in an async run), which that mode's runs drop.

Columns of results.csv: mode, workers, shards, batch_size, repeat, seed,
samples_per_s, updates_per_s, time_to_target_s (the wall time of the first
evaluation at or above --target; empty if never), final_accuracy, best_accuracy,
staleness_p50, staleness_p99, staleness_max, bytes, elapsed_s, metrics (the file).
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from downpour import plots
from downpour.common import config
from downpour.common.config import FIELDS, Config
from downpour.common.errors import ConfigError, DownpourError
from downpour.common.fileio import atomic_write, prepare_output
from downpour.common.metrics import Progress, read_metrics
from downpour.launch import CLI, child_env

COLUMNS = ("mode", "workers", "shards", "batch_size", "repeat", "seed", "samples_per_s",
           "updates_per_s", "time_to_target_s", "final_accuracy", "best_accuracy",
           "staleness_p50", "staleness_p99", "staleness_max", "bytes", "elapsed_s", "metrics")
SWEPT = ("mode", "workers", "shards", "seed", "metrics", "save", "progress", "config")
ONE_CASE = {"single": "single runs one process", "hogwild": "hogwild has no servers"}


class Case(NamedTuple):
    """One run of the sweep: its record (mode, workers, shards, repeat) and its settings."""
    run: dict
    cfg: Config


class Sweep(NamedTuple):
    """The runs to start, in order, and what the sweep leaves out, one sentence each."""
    cases: list[Case]
    notes: list[str]


def plan(modes: list[str], workers: list[int], shards: list[int], repeats: int) -> list[dict]:
    """The runs of a sweep, as (mode, workers, shards, repeat) records, in the order run."""
    runs = []
    for mode in modes:
        for w in ([1] if mode == "single" else workers):
            for s in ([0] if mode in ("single", "hogwild") else shards):
                for r in range(repeats):
                    runs.append({"mode": mode, "workers": w, "shards": s, "repeat": r})
    return runs


def _counted(values: list[int], noun: str) -> str:
    """[2, 4], "worker" -> "2 and 4 workers"."""
    text = " and ".join(map(str, dict.fromkeys(values)))
    return f"{text} {noun}" + ("" if values == [1] else "s")


def impossible(modes: list[str], workers: list[int], shards: list[int]) -> dict[str, list[str]]:
    """{mode: the cases of it that `plan` leaves out because they cannot exist}, e.g.
    {"single": ["single at 2 workers"]}."""
    cases: dict[str, list[str]] = {}
    for mode in modes:
        if mode == "single" and (ws := [w for w in workers if w != 1]):
            cases.setdefault(mode, []).append(f"{mode} at {_counted(ws, 'worker')}")
        if mode in ONE_CASE and (ss := [s for s in shards if s != 1]):
            cases.setdefault(mode, []).append(f"{mode} at {_counted(ss, 'shard')}")
    return cases


def case_config(cfg: Config, run: dict, given: Iterable[str] = ()) -> Config:
    """The settings of one run: `cfg` with the run's mode, workers, shards and seed, and
    every setting in `given` that the mode does not use back at its default."""
    swept = replace(cfg, mode=run["mode"], workers=run["workers"], shards=max(1, run["shards"]),
                    seed=cfg.seed + run["repeat"])
    unused = config.unused_settings([*given, "workers", "shards"], run["mode"])
    return replace(swept, **{k: FIELDS[k].default for k in unused})


def _case_name(run: dict) -> str:
    return f"{run['mode']} at {_counted([run['workers']], 'worker')}" + (
        f" and {run['shards']} shards" if run["shards"] > 1 else "")


def _unused_notes(names: list[str], modes: list[str]) -> list[str]:
    """A sentence for each setting in `names` that some mode in `modes` does not use."""
    idle: dict[str, list[str]] = {}             # {setting: the modes of the sweep not using it}
    used_by: dict[str, tuple[str, ...]] = {}    # {setting: the modes that use it}
    for mode in modes:
        for name, users in config.unused_settings(names, mode).items():
            idle.setdefault(name, []).append(mode)
            used_by[name] = users
    return [f"{name} is a setting of --mode {', '.join(used_by[name])}; not used by the "
            f"{', '.join(idle[name])} runs" for name in idle]


def sweep_plan(cfg: Config, modes: list[str], workers: list[int], shards: list[int], repeats: int,
               given: Iterable[str] = ()) -> Sweep:
    """The cases of a sweep and what it leaves out (see the module docstring).

    `given` names the settings given explicitly; those `cfg` holds at a value other than
    the default count as given too. ConfigError if no case is left to run.
    """
    from downpour.common.training import check_cluster, training_samples
    cfg.slowdown                        # a malformed --slow-worker is an error, not a skip of every case
    n = training_samples(cfg)           # a batch the data cannot give is a case skipped
    given = set(given)
    names = [k for k in FIELDS if k not in SWEPT and (k in given or getattr(cfg, k) != FIELDS[k].default)]
    notes = []
    if dropped := impossible(modes, workers, shards):
        notes.append(f"{'; '.join(ONE_CASE[m] for m in dropped)}; skipping "
                     f"{', '.join(c for mode_cases in dropped.values() for c in mode_cases)}")
    notes += _unused_notes(names, modes)
    cases, contradicted = [], {}                # contradicted: {reason: the cases it rules out}
    for run in plan(modes, workers, shards, repeats):
        case = Case(run, case_config(cfg, run, names))
        try:
            check_cluster(case.cfg, n)
        except ConfigError as e:
            ruled_out = contradicted.setdefault(str(e), [])
            if run["repeat"] == 0:
                ruled_out.append(_case_name(run))
            continue
        cases.append(case)
    notes += [f"{reason}; skipping {', '.join(ruled_out)}" for reason, ruled_out in contradicted.items()]
    if not cases:
        raise ConfigError("no run of the sweep can start: " + "; ".join(notes))
    return Sweep(cases, notes)


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
              out: Path, target: float, given: Iterable[str] = ()) -> list[dict]:
    """Run every run of the sweep; write results.csv and the plots; return the rows.

    `given` names the settings given explicitly (see `sweep_plan`). ConfigError, before
    any run, if `out` cannot be written or no case can run; DownpourError if a run fails.
    """
    cases, notes = sweep_plan(cfg, modes, workers, shards, repeats, given)
    out = prepare_output(out, "--out", directory=True)
    for note in notes:
        print(f"experiment: {note}", file=sys.stderr)
    (out / "runs").mkdir(exist_ok=True)
    runs = [case.run for case in cases]
    progress = Progress(len(runs), cfg.progress)
    progress.line(f"experiment: {len(runs)} runs into {out}")
    env = child_env()
    rows = []
    for i, (run, run_cfg) in enumerate(cases):
        name = f"{run['mode']}-w{run['workers']}-s{run['shards']}-r{run['repeat']}"
        path = out / "runs" / f"{name}.jsonl"
        argv = [*CLI, "train", *config.to_args(replace(run_cfg, metrics=str(path), save="",
                                                       progress="none", config=""))]
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
