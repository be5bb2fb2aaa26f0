"""PNG plots of runs and sweeps, with matplotlib (the optional `plot` extra).

    sweep(rows, out)  throughput.png      samples/s against workers, one line per mode
                      accuracy_time.png   test accuracy against wall time, per run
                      accuracy_samples.png test accuracy against samples processed
                      staleness.png       distribution of staleness per async-family run
    curves(paths, out) accuracy against wall time and against samples for any metrics files

matplotlib is imported only when a plot is drawn, with the Agg backend (no screen).
"""

from __future__ import annotations

import importlib.util
from collections import defaultdict
from pathlib import Path

from downpour.common.metrics import read_metrics

MODES_ORDER = ("single", "sync", "async", "ssp", "hogwild")
FIGSIZE = (6.4, 4.4)          # inches, one plot


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def sweep(rows: list[dict], out: Path, target: float | None = None) -> list[Path]:
    """The four plots of a sweep (rows as in results.csv, with `metrics` relative to `out`)."""
    out = Path(out)
    first = [(r, *read_metrics(out / r["metrics"])) for r in rows if int(r["repeat"]) == 0]
    return [_throughput(rows, out / "throughput.png"),
            _accuracy(first, "elapsed_s", "wall time (s)", out / "accuracy_time.png",
                      "Test accuracy against wall time", target),
            _accuracy(first, "samples", "samples processed", out / "accuracy_samples.png",
                      "Test accuracy against samples processed", target),
            _staleness(first, out / "staleness.png")]


def _throughput(rows: list[dict], path: Path) -> Path:
    """Mean samples/s against workers, a line per mode; single process as a level."""
    fig, ax = _pyplot().subplots(figsize=FIGSIZE)
    by_mode: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_mode[r["mode"]][int(r["workers"])].append(float(r["samples_per_s"]))
    for mode in sorted(by_mode, key=lambda m: MODES_ORDER.index(m) if m in MODES_ORDER else 99):
        ws = sorted(by_mode[mode])
        means = [sum(by_mode[mode][w]) / len(by_mode[mode][w]) for w in ws]
        if mode == "single":
            ax.axhline(means[0], linestyle="--", color="gray", label="single process")
        else:
            ax.plot(ws, means, marker="o", label=mode)
    ax.set(xlabel="workers", ylabel="samples / s", title="Throughput against workers")
    ax.set_xticks(sorted({int(r["workers"]) for r in rows}))
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _accuracy(runs: list[tuple], x_key: str, x_label: str, path: Path, title: str,
              target: float | None) -> Path:
    """Test accuracy against `x_key` of every eval line, a line per run."""
    fig, ax = _pyplot().subplots(figsize=FIGSIZE)
    for r, evals, _ in runs:
        label = r["mode"] if r["mode"] == "single" else f"{r['mode']} W={r['workers']}" + (
            f" S={r['shards']}" if int(r["shards"]) > 0 else "")
        ax.plot([e[x_key] for e in evals], [100 * e["test_accuracy"] for e in evals],
                marker=".", label=label)
    if target:
        ax.axhline(100 * target, linestyle=":", color="gray", label=f"target {100 * target:g}%")
    ax.set(xlabel=x_label, ylabel="test accuracy (%)", title=title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _staleness(runs: list[tuple], path: Path) -> Path:
    """The staleness distribution of every async-family (and sync) run, as grouped bars."""
    fig, ax = _pyplot().subplots(figsize=FIGSIZE)
    drawn = 0
    for r, _, end in runs:
        if r["mode"] not in ("async", "ssp", "sync"):
            continue
        hist = {int(k): v for k, v in ((end or {}).get("staleness_hist") or {}).items()}
        if not hist:
            continue
        total = sum(hist.values())
        xs = sorted(hist)
        offset = (drawn % 6) * 0.12 - 0.3
        ax.bar([x + offset for x in xs], [hist[x] / total for x in xs], width=0.12,
               label=f"{r['mode']} W={r['workers']} S={r['shards']}")
        drawn += 1
    ax.set(xlabel="staleness (versions between pull and apply)", ylabel="fraction of pushes",
           title="Staleness distribution")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if drawn:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def curves(paths: list[Path], out: Path) -> Path:
    """Accuracy against wall time and against samples for the runs in `paths`, side by side."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    for path in paths:
        evals, end = read_metrics(path)
        end = end or {}
        if not evals:
            continue
        label = Path(path).stem + (f" ({end.get('mode')})" if end.get("mode") else "")
        acc = [100 * e["test_accuracy"] for e in evals]
        left.plot([e["elapsed_s"] for e in evals], acc, marker=".", label=label)
        right.plot([e["samples"] for e in evals], acc, marker=".", label=label)
    left.set(xlabel="wall time (s)", ylabel="test accuracy (%)", title="Accuracy against wall time")
    right.set(xlabel="samples processed", ylabel="test accuracy (%)",
              title="Accuracy against samples processed")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, Path(out))
