"""PNG plots of runs and sweeps, with matplotlib (the optional `plot` extra).

    sweep(rows, out)  throughput.png      samples/s against workers, one line per mode
                      accuracy_time.png   test accuracy against wall time, per run
                      accuracy_samples.png test accuracy against samples processed
                      staleness.png       distribution of staleness per async-family run
    curves(paths, out) accuracy against wall time and against samples for any metrics files

`read_run` is the checked reader of one metrics file that `curves` uses: a file that
is not one (a CSV, a saved model, a README) is a DataError that says so.
matplotlib is imported only when a plot is drawn, with the Agg backend (no screen).
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from downpour.common.errors import ConfigError, DataError
from downpour.common.fileio import prepare_output
from downpour.common.metrics import read_metrics

MODES_ORDER = ("single", "sync", "async", "ssp", "hogwild")
FIGSIZE = (6.4, 4.4)          # inches, one plot
GROUP_WIDTH = 0.8             # x units: the bars of one staleness value share this much
SNIFF_BYTES = 8192            # how much of a file is read to tell binary from text
SHOWN_CHARS = 24              # how much of a bad line a message quotes
EXPECTED = 'expected JSON lines written by --metrics (each an object with an "event")'
EVAL_FIELDS = ("elapsed_s", "samples", "test_accuracy")   # what `curves` plots of an eval line


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _quote(text: str) -> str:
    text = text.strip()
    return repr(text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "...")


def _text(path: Path) -> str | None:
    """The text of `path`, or None if it is binary: a NUL byte, or not UTF-8."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)          # a large binary file is refused without reading it all
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head)   # a character split at the end is fine
            return None if b"\0" in head else (head + f.read()).decode("utf-8")
        except UnicodeDecodeError:
            return None


def read_run(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """(eval lines, end line or None) of the metrics file `path`, checked.

    Raises DataError, naming the file, what was expected and what it holds, when it is
    missing, binary, not JSON lines of objects with an "event", or has no eval line
    with the fields plotted. A last line cut short (a run killed mid-write) is ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no metrics file {str(path)!r}" + (": it is a directory" if path.is_dir() else ""))
    not_metrics = f"{path} is not a metrics file: {EXPECTED}, got"
    text = _text(path)
    if text is None:
        raise DataError(f"{not_metrics} binary data")
    if not text.strip():
        raise DataError(f"{not_metrics} an empty file")
    lines = text.splitlines(keepends=True)
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines) and line.lstrip().startswith("{") and not line.endswith("\n"):
                break                                          # cut short: the run was killed
            got = f"a line that is not JSON (line {i}: {_quote(line)})" if records else \
                f"text starting {_quote(line)}"
            raise DataError(f"{not_metrics} {got}") from None
        if not isinstance(record, dict) or "event" not in record:
            raise DataError(f'{not_metrics} JSON without an "event" (line {i}: {_quote(line)})')
        if record["event"] == "eval":
            missing = [k for k in EVAL_FIELDS if not isinstance(record.get(k), (int, float))]
            if missing:
                raise DataError(f"{path} line {i}: an eval line without a number for "
                                f"{', '.join(missing)}")
        records.append(record)
    evals = [r for r in records if r["event"] == "eval"]
    ends = [r for r in records if r["event"] == "end"]
    if not evals:
        raise DataError(f"{path} has no eval lines, so no accuracy to plot: the run stopped "
                        "before its first evaluation (evaluate more often with --eval-every)")
    return evals, (ends[-1] if ends else None)


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


def bar_offsets(n: int, group_width: float = GROUP_WIDTH) -> tuple[list[float], float]:
    """(x offset of each of `n` bars from their tick, bar width): side by side, the
    group of `n` centred on the tick and `group_width` wide."""
    width = group_width / max(1, n)
    return [(i - (n - 1) / 2) * width for i in range(n)], width


def _staleness(runs: list[tuple], path: Path) -> Path:
    """The staleness distribution of every async-family (and sync) run, as grouped bars."""
    fig, ax = _pyplot().subplots(figsize=FIGSIZE)
    hists = []                                # (run row, {staleness: pushes})
    for r, _, end in runs:
        hist = {int(k): v for k, v in ((end or {}).get("staleness_hist") or {}).items()}
        if r["mode"] in ("async", "ssp", "sync") and hist:
            hists.append((r, hist))
    offsets, width = bar_offsets(len(hists))
    for (r, hist), offset in zip(hists, offsets):
        total = sum(hist.values())
        xs = sorted(hist)
        ax.bar([x + offset for x in xs], [hist[x] / total for x in xs], width=width,
               label=f"{r['mode']} W={r['workers']} S={r['shards']}")
    ax.set(xlabel="staleness (versions between pull and apply)", ylabel="fraction of pushes",
           title="Staleness distribution")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if hists:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def run_label(path: str | Path, mode: str | None) -> str:
    """The legend entry of a metrics file: its name, then its mode unless the name says it
    (`single.jsonl` -> single; `run3.jsonl` -> run3 (async))."""
    stem = Path(path).stem
    if not mode or mode in re.split(r"[^a-z0-9]+", stem.lower()):
        return stem
    return f"{stem} ({mode})"


def _check_image_name(out: Path) -> None:
    """ConfigError unless `out` ends in an image format matplotlib writes."""
    from matplotlib.backend_bases import FigureCanvasBase
    formats = FigureCanvasBase.get_supported_filetypes()
    if out.suffix.lower().lstrip(".") not in formats:
        raise ConfigError(f"--out {str(out)!r}: expected an image file name ending in .png "
                          f"(or {', '.join('.' + f for f in sorted(formats) if f != 'png')})")


def curves(paths: list[Path], out: Path) -> Path:
    """Accuracy against wall time and against samples for the runs in `paths`, side by side.

    Every file is read and checked (`read_run`), and `out` made ready to write, before
    anything is drawn: DataError for a bad file, ConfigError for a bad `out`.
    """
    runs = [(path, *read_run(path)) for path in paths]
    out = Path(out)
    _check_image_name(out)
    prepare_output(out, "--out")
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    for path, evals, end in runs:
        label = run_label(path, (end or {}).get("mode"))
        acc = [100 * e["test_accuracy"] for e in evals]
        left.plot([e["elapsed_s"] for e in evals], acc, marker=".", label=label)
        right.plot([e["samples"] for e in evals], acc, marker=".", label=label)
    left.set(xlabel="wall time (s)", ylabel="test accuracy (%)", title="Accuracy against wall time")
    right.set(xlabel="samples processed", ylabel="test accuracy (%)",
              title="Accuracy against samples processed")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, out)
