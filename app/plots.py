"""PNG plots of runs and sweeps, with matplotlib (the optional `plot` extra).

    sweep(rows, out)  throughput.png      samples/s against workers
                      speedup.png         samples/s over the same line's at W = 1, against
                                          workers, with the ideal (speedup = W) dashed
                      throughput_link.png samples/s against the link rate (several links)
                    and of the measured rows only (they need the runs' metrics files):
                      accuracy_bytes.png  final accuracy against bytes per sample (cluster runs)
                      time_to_target.png  wall time to the target accuracy against workers;
                                          a point never reaching it is an open marker at the top
                      accuracy_time.png   test accuracy against wall time, per run
                      accuracy_samples.png test accuracy against samples processed
                      staleness.png       distribution of staleness per async-family run
    curves(paths, out) accuracy against wall time and against samples for any metrics files

In a plot against workers a line is one `LineKey`: mode, link, compute scale, shards,
model and codecs held fixed, measured or simulated, repeats averaged; its legend names
what varies in the sweep (`line_labels`), single process is a dashed level, and a point
at which a run was host-bound (it could not keep its --compute-scale or --slow-worker
padding, so it measured this host) wears a red ring. A simulated line (rows of
`downpour experiment --simulate`, `simulated` true) is drawn in the colour of the
measured line of the same settings, in open squares on a dotted line, and its legend
says "(simulated)"; its speedup is over its own simulated W = 1. Worker counts spanning
more than LOG_SPAN times are drawn on a log2 axis (throughput and speedup: log-log, so
the points at a few workers are not flattened by those at hundreds). The figures drawn are pure functions
of the rows, callable without matplotlib: `throughputs`, `speedups`, `times_to_target`,
`host_bound`, `log_workers`.

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
from typing import Any, Iterable, NamedTuple

from downpour.common.config import CLUSTER, REPLICAS
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
MODEL_CHARS = 40              # how much of a model's layers the legend's key to m0, m1... shows
RING_AREA = 160               # points^2: the ring around a host-bound point
LEVEL_STYLES = ("--", ":", "-.")   # single-process levels, one per model
ABOVE_TOP = 1.08              # a point never reaching the target is drawn this far above the highest
LOG_SPAN = 16                 # worker counts spanning more than this factor: a log2 axis
MEASURED_MARKS = {"marker": "o"}
SIMULATED_MARKS = {"marker": "s", "markerfacecolor": "none", "linestyle": ":"}


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
    """The plots of a sweep, rows as in results.csv and simulated.csv (`metrics` relative
    to `out`), in this order: throughput.png and speedup.png of every row; with measured
    rows, time_to_target.png, accuracy_time.png, accuracy_samples.png and staleness.png of
    those; accuracy_bytes.png (final accuracy against bytes per sample) of the measured
    cluster runs, if any; throughput_link.png (samples/s against the link rate) of every
    row, when the sweep has several links."""
    out = Path(out)
    labels = line_labels(line_key(r) for r in rows)
    measured = [r for r in rows if not line_key(r).simulated]
    first = [(r, *read_metrics(out / r["metrics"])) for r in measured if int(r["repeat"]) == 0]
    paths = [_throughput(rows, labels, out / "throughput.png"),
             _speedup(rows, labels, out / "speedup.png")]
    if measured:
        paths += [_time_to_target(measured, labels, out / "time_to_target.png", target),
                  _accuracy(first, labels, "elapsed_s", "wall time (s)", out / "accuracy_time.png",
                            "Test accuracy against wall time", target),
                  _accuracy(first, labels, "samples", "samples processed",
                            out / "accuracy_samples.png", "Test accuracy against samples processed",
                            target),
                  _staleness(first, labels, out / "staleness.png")]
    if any(r.get("bytes_per_sample") not in ("", None) for r in measured):
        paths.append(_accuracy_bytes(measured, labels, out / "accuracy_bytes.png"))
    if len(link_rates(rows)) and len({r.get("link") for r in rows}) > 1:
        paths.append(_throughput_link(rows, labels, out / "throughput_link.png"))
    return paths


# -- the figures against bytes and link rates, without matplotlib ------------------------------

def accuracy_bytes(rows: list[dict]) -> dict[tuple[LineKey, int], tuple[float, float]]:
    """{(line, workers): (bytes per sample, final accuracy)}, means over the repeats, for
    the runs that moved bytes (the cluster modes)."""
    points: dict[tuple[LineKey, int], list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("bytes_per_sample") not in ("", None):
            points[(line_key(r), int(r["workers"]))].append(r)
    return {key: (sum(float(r["bytes_per_sample"]) for r in rs) / len(rs),
                  sum(float(r["final_accuracy"]) for r in rs) / len(rs)) for key, rs in points.items()}


def link_rates(rows: list[dict]) -> dict[tuple[LineKey, int], dict[int, float]]:
    """{(line without its link, workers): {link rate in bits/s: samples/s}}, means over the
    repeats, for the runs behind links."""
    from downpour.common.config import parse_rate
    lines: dict[tuple[LineKey, int], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("link"):
            key = (line_key(r)._replace(link=""), int(r["workers"]))
            lines[key][parse_rate(r["link"], "link")].append(float(r["samples_per_s"]))
    return {key: {rate: sum(v) / len(v) for rate, v in sorted(points.items())}
            for key, points in lines.items()}


def _accuracy_bytes(rows: list[dict], labels: dict[LineKey, str], path: Path) -> Path:
    """Final test accuracy against bytes per sample (log scale), a point per line and W."""
    fig, ax = _pyplot().subplots(figsize=FIGSIZE)
    for (key, w), (nbytes, accuracy) in accuracy_bytes(rows).items():
        ax.scatter([nbytes], [100 * accuracy], label=f"{labels[key]} W={w}")
    return _finish_log_x(fig, ax, path, "bytes per sample (log)", "final test accuracy (%)",
                         "Accuracy against bytes per sample")


def _throughput_link(rows: list[dict], labels: dict[LineKey, str], path: Path) -> Path:
    """Samples/s against the link rate (log scale), a line per line-without-link and W."""
    fig, ax = _pyplot().subplots(figsize=FIGSIZE)
    names = line_labels(key._replace(link="") for key in labels)     # the link is the x axis
    for (key, w), points in link_rates(rows).items():
        ax.plot([rate / 1e6 for rate in points], list(points.values()), **_marks(key),
                label=f"{names[key]} W={w}")
    return _finish_log_x(fig, ax, path, "link rate (Mbit/s, log)", "samples / s",
                         "Throughput against the link rate")


def _finish_log_x(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """A plot against a log-scale x: labels, legend and grid; saved to `path`."""
    ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(fig, path)


# -- the figures against workers, without matplotlib ---------------------------------------------

class LineKey(NamedTuple):
    """What a line of a plot against workers holds fixed: every swept setting but W, and
    whether its rows were measured or simulated."""
    mode: str
    link: str                 # '' = no link
    compute_scale: float
    shards: int               # 0: single, hogwild
    model: str
    push_codec: str = "none"
    pull_codec: str = "none"
    simulated: bool = False


def _true(value: Any) -> bool:
    """A flag of a row, as a bool: True, or its CSV text ("True"; any case)."""
    return value is True or str(value).lower() == "true"


def line_key(row: dict) -> LineKey:
    """The line of a results.csv or simulated.csv row (values as numbers or as CSV text);
    a column that an older results.csv lacks takes its default (`simulated`: False)."""
    return LineKey(row["mode"], row.get("link") or "", float(row.get("compute_scale") or 1.0),
                   int(row["shards"]), row.get("model") or "", row.get("push_codec") or "none",
                   row.get("pull_codec") or "none", _true(row.get("simulated")))


def _by_point(rows: list[dict]) -> dict[LineKey, dict[int, list[dict]]]:
    """The rows by line, then by workers (a point's repeats together), in the order met."""
    lines: dict[LineKey, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        lines[line_key(r)][int(r["workers"])].append(r)
    return {key: dict(sorted(points.items())) for key, points in lines.items()}


def throughputs(rows: list[dict]) -> dict[LineKey, dict[int, float]]:
    """{line: {workers: samples/s}}, the mean over a point's repeats."""
    return {key: {w: sum(float(r["samples_per_s"]) for r in rs) / len(rs) for w, rs in points.items()}
            for key, points in _by_point(rows).items()}


def speedups(rows: list[dict]) -> dict[LineKey, dict[int, float]]:
    """{line: {workers: speedup}}, each point over its own line's at one worker:

        speedup(W) = samples/s(W) / samples/s(1)     (each the mean over the repeats)

    the mode, link, compute scale, shards and model the same. A line without a W = 1
    point has no speedup and is left out."""
    return {key: {w: v / points[1] for w, v in points.items()}
            for key, points in throughputs(rows).items() if points.get(1, 0) > 0}


def times_to_target(rows: list[dict]) -> dict[LineKey, dict[int, float | None]]:
    """{line: {workers: s to the target accuracy}}, the mean over a point's repeats; None
    where a repeat never reached it (a mean over those that did would flatter the point)."""
    out: dict[LineKey, dict[int, float | None]] = {}
    for key, points in _by_point(rows).items():
        out[key] = {}
        for w, rs in points.items():
            times = [r.get("time_to_target_s") for r in rs]
            out[key][w] = None if any(t in ("", None) for t in times) else \
                sum(float(t) for t in times) / len(times)
    return out


def host_bound(rows: list[dict]) -> set[tuple[LineKey, int]]:
    """The points (line, workers) at which a measured repeat was host-bound (`host_bound`
    true); a simulated row never is (it ran on no host)."""
    return {(line_key(r), int(r["workers"])) for r in rows
            if _true(r.get("host_bound")) and not _true(r.get("simulated"))}


def log_workers(workers: Iterable[int]) -> bool:
    """Whether a plot against `workers` draws them on a log2 axis: the largest more than
    LOG_SPAN times the smallest."""
    ws = [int(w) for w in workers]
    return bool(ws) and max(ws) > LOG_SPAN * min(ws)


def line_labels(keys: Iterable[LineKey]) -> dict[LineKey, str]:
    """The legend entry of each line: its mode ("single process" for single), then its
    link, compute scale, shards and codecs where they differ between the lines of the
    modes that use them, its model (m0, m1, ... in the order met) where models differ,
    and "(simulated)" for a simulated line: "async 1gbit x4 S=2 m1 (simulated)"."""
    keys = list(dict.fromkeys(keys))
    models = list(dict.fromkeys(k.model for k in keys))
    axes = (("link", CLUSTER, lambda k: k.link or "no link"),
            ("compute_scale", REPLICAS, lambda k: f"x{k.compute_scale:g}"),
            ("shards", CLUSTER, lambda k: f"S={k.shards}"),
            ("push_codec", CLUSTER, lambda k: f"push {k.push_codec}"),
            ("pull_codec", CLUSTER, lambda k: f"pull {k.pull_codec}"))
    varies = {name for name, modes, _ in axes if len({getattr(k, name) for k in keys if k.mode in modes}) > 1}
    labels = {}
    for k in keys:
        parts = ["single process" if k.mode == "single" else k.mode]
        parts += [show(k) for name, modes, show in axes if name in varies and k.mode in modes]
        parts += [f"m{models.index(k.model)}"] if len(models) > 1 else []
        parts += ["(simulated)"] if k.simulated else []
        labels[k] = " ".join(parts)
    return labels


# -- the plots against workers ---------------------------------------------------------------------

def _mode_rank(key: LineKey) -> int:
    return MODES_ORDER.index(key.mode) if key.mode in MODES_ORDER else len(MODES_ORDER)


def _marks(key: LineKey) -> dict[str, Any]:
    """How the points of line `key` are drawn: filled circles, or for a simulated line open
    squares on a dotted line."""
    return SIMULATED_MARKS if key.simulated else MEASURED_MARKS


def _draw_lines(ax, lines: dict[LineKey, dict[int, float | None]], labels: dict[LineKey, str],
                top: float | None = None) -> None:
    """A line per key against workers, single process as a dashed gray level; a point
    whose value is None is an open marker at `top`, not joined to the line. A line keeps
    its colour from plot to plot (the place of its settings in `labels`), and a simulated
    line takes the colour of the measured line of the same settings (`_marks` tells them
    apart)."""
    settings = dict.fromkeys(k._replace(simulated=False) for k in labels if k.mode != "single")
    colors = {key: f"C{i % 10}" for i, key in enumerate(settings)}
    levels = 0
    for key in sorted(lines, key=_mode_rank):
        points = lines[key]
        ws = [w for w, v in points.items() if v is not None]
        never = [w for w, v in points.items() if v is None]
        if key.mode == "single":
            color = "gray"
            if ws:
                ax.axhline(points[ws[0]], linestyle=LEVEL_STYLES[levels % len(LEVEL_STYLES)],
                           color=color, label=labels[key])
                levels += 1
        else:
            color = colors[key._replace(simulated=False)]
            ax.plot(ws, [points[w] for w in ws], **_marks(key), color=color, label=labels[key])
        if never:                           # a single process that never got there has no level
            ax.plot(never, [top] * len(never), linestyle="none", marker="o", markerfacecolor="none",
                    markeredgecolor=color, label=labels[key] if key.mode == "single" and not ws else "")


def _ring_host_bound(ax, lines: dict[LineKey, dict[int, float | None]], bound: set,
                     top: float | None = None) -> None:
    """A red ring around every point of `lines` in `bound`, and a legend entry for it."""
    xy = [(w, top if lines[key][w] is None else lines[key][w])
          for key, w in bound if w in lines.get(key, {})]
    if xy:
        ax.scatter(*zip(*xy), s=RING_AREA, facecolors="none", edgecolors="red", linewidths=1.5,
                   zorder=3, label="host-bound: the step padding was not kept")


def _finish(ax, keys: Iterable[LineKey], rows: list[dict], title: str, ylabel: str,
            log_y: bool = False) -> None:
    """Labels, worker ticks (the workers of `rows`, on a log2 axis if `log_workers`: with
    `log_y`, the y axis too), grid and the legend, with a key to m0, m1, ... if models
    differ."""
    models = list(dict.fromkeys(k.model for k in keys))
    if len(models) > 1:
        for i, model in enumerate(models):
            shown = model if len(model) <= MODEL_CHARS else model[:MODEL_CHARS] + "..."
            ax.plot([], [], linestyle="none", label=f"m{i}: {shown}")
    ws = sorted({int(r["workers"]) for r in rows})
    ax.set(xlabel="workers" + (" (log2)" if log_workers(ws) else ""), ylabel=ylabel, title=title)
    if log_workers(ws):
        _log2(ax, "x")
        if log_y:
            _log2(ax, "y")
    ax.set_xticks(ws)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)


def _log2(ax, which: str) -> None:
    """The `which` ("x" or "y") axis of `ax` on a log2 scale, its ticks plain numbers (16,
    not 2^4), without minor ticks."""
    from matplotlib.ticker import FuncFormatter, NullLocator
    axis, set_scale = (ax.xaxis, ax.set_xscale) if which == "x" else (ax.yaxis, ax.set_yscale)
    set_scale("log", base=2)
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_locator(NullLocator())


def _throughput(rows: list[dict], labels: dict[LineKey, str], path: Path) -> Path:
    """Mean samples/s against workers, a line per LineKey; single process as a level."""
    fig, ax = _pyplot().subplots(figsize=FIGSIZE)
    means = throughputs(rows)
    _draw_lines(ax, means, labels)
    _ring_host_bound(ax, means, host_bound(rows))
    _finish(ax, labels, rows, "Throughput against workers", "samples / s", log_y=True)
    return _save(fig, path)


def _speedup(rows: list[dict], labels: dict[LineKey, str], path: Path) -> Path:
    """`speedups` against workers, a line per LineKey but single's, the ideal dashed."""
    fig, ax = _pyplot().subplots(figsize=FIGSIZE)
    ups = {key: points for key, points in speedups(rows).items() if key.mode != "single"}
    _draw_lines(ax, ups, labels)
    ws = sorted({int(r["workers"]) for r in rows})
    ax.plot(ws, ws, linestyle="--", color="black", label="ideal: speedup = W")
    _ring_host_bound(ax, ups, host_bound(rows))
    if missing := [labels[k] for k in labels if k.mode != "single" and k not in ups]:
        ax.plot([], [], linestyle="none", label=f"not drawn, no run at W=1: {', '.join(missing)}")
    _finish(ax, labels, rows, "Speedup against workers (over the same line at W=1)",
            "speedup (samples/s over W=1's)", log_y=True)     # log-log: the ideal a diagonal
    return _save(fig, path)


def _time_to_target(rows: list[dict], labels: dict[LineKey, str], path: Path,
                    target: float | None) -> Path:
    """`times_to_target` against workers; a point that never reached it is an open marker
    drawn above the highest that did."""
    fig, ax = _pyplot().subplots(figsize=FIGSIZE)
    times = times_to_target(rows)
    reached = [t for points in times.values() for t in points.values() if t is not None]
    top = ABOVE_TOP * max(reached, default=1.0)
    _draw_lines(ax, times, labels, top)
    _ring_host_bound(ax, times, host_bound(rows), top)
    what = f"{100 * target:g}% test accuracy" if target else "the target accuracy"
    if len(reached) < sum(len(points) for points in times.values()):
        ax.plot([], [], linestyle="none", marker="o", markerfacecolor="none", markeredgecolor="gray",
                label="never reached it (drawn at the top)")
    ax.set_ylim(bottom=0, top=top * ABOVE_TOP)
    _finish(ax, labels, rows, f"Time to {what} against workers", "wall time to target (s)")
    return _save(fig, path)


def _run_label(r: dict, labels: dict[LineKey, str]) -> str:
    """The legend entry of one run: its line's, and W but for single process."""
    label = labels[line_key(r)]
    return label if r["mode"] == "single" else f"{label} W={r['workers']}"


def _accuracy(runs: list[tuple], labels: dict[LineKey, str], x_key: str, x_label: str,
              path: Path, title: str, target: float | None) -> Path:
    """Test accuracy against `x_key` of every eval line, a line per run."""
    fig, ax = _pyplot().subplots(figsize=FIGSIZE)
    for r, evals, _ in runs:
        ax.plot([e[x_key] for e in evals], [100 * e["test_accuracy"] for e in evals],
                marker=".", label=_run_label(r, labels))
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


def _staleness(runs: list[tuple], labels: dict[LineKey, str], path: Path) -> Path:
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
               label=_run_label(r, labels))
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
