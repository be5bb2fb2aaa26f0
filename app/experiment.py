"""`downpour experiment`: a sweep of training runs, turned into a table and plots.

    for each mode, model, link, compute scale, push and pull codec, number of workers
    W, number of shards S and repeat:
        downpour train --mode MODE [--layers MODEL] [--link RATE] [--compute-scale F] \\
                       --workers W --shards S --seed SEED+REPEAT [settings] \\
                       --metrics OUT/runs/NAME.jsonl
    -> OUT/results.csv   one row per run
    -> OUT/*.png         throughput and speedup against workers, time to the target
                         accuracy against workers, accuracy against wall time and against
                         samples, the staleness distribution (downpour.plots)

    downpour experiment --simulate [--profile FILE] [the same axes and settings]
    -> OUT/simulated.csv one row per case of the cluster modes, predicted by the
                         calibrated model of downpour.sim instead of run
    -> OUT/*.png         throughput and speedup against workers

The plots of either kind read both CSVs when OUT holds both, so a measured sweep and a
simulated one into the same OUT (the simulated one reaching far more workers than this
host runs) draw on the same axes, the simulated lines marked apart.

The axes, each a flag of `downpour experiment` taking a list, in the order above:

    --modes          modes                                  single,sync,async,ssp,hogwild
    --layers         models separated by ';', each hidden   'dense:64,relu;conv:8:3,relu,
                     layers as `train --layers` takes them   maxpool:2,flatten,dense:64,relu'
                     (default: the one model of --hidden)
    --link           rates in tc's syntax, or none for a    none,100mbit,1gbit
                     run without links (default: none)
    --compute-scale  factors >= 1 (default 1: no padding)   1,4
    --push-codec     push codecs (default none)             none,topk:0.01,onebit
    --pull-codec     pull codecs (default none)             none,fp16
    --workers        worker counts                          1,2,4
    --shards         shard counts of the cluster modes      1,2
    --repeats N      runs per case, seeds seed..seed+N-1    3

Lists are comma-separated but for --layers, whose models hold commas.

A single value is one setting, as in `downpour train`; a TOML file (--config) or a
DOWNPOUR_* variable gives link, compute_scale and layers one value each. Every value
is checked before the first run (`parse_axes`, then `sweep_plan` against the data and
the other settings), and a repeated value runs once.

Every run is a separate `downpour train` process, exactly as a user would start it,
so runs do not share caches or state. A mode runs only the values of the axes it
uses: single once per model and repeat (W = 1, no shards, no link, no padding),
hogwild once per model, compute scale and W (no shards, no link).

Run files are OUT/runs/MODE-wW-sS[-LINK][-xF][-mI][-pushC][-pullC]-rR.jsonl: the link
(`none` for none), the compute scale (x4), the model's place in --layers (m0, m1, ...;
messages name models so too) and the codecs (pushtopk0.01) appear only when that axis has
more than one value, so a sweep of one value of each keeps the names it always had.

--simulate predicts each case with `downpour.sim.command.simulate`, with the costs of
--profile (default: `downpour simulate`'s; calibrated first if there is none). It
models the cluster modes only: single and hogwild are left out, with a note. The cases
and their checks are the measured sweep's.

Before the first run, the sweep says on stderr, once each, what it leaves out:
cases that cannot exist (single at 2 workers, hogwild at 2 shards, or settings that
contradict a case, as sync with --backup 1 at 1 worker), and settings given that a
mode does not use (--backup in an async run, --link in a hogwild run), which that
mode's runs drop.

Columns of results.csv and simulated.csv:

    mode, workers, shards     the case (shards 0: single, hogwild)
    link                      the run's link rate; '' = none
    compute_scale             the run's --compute-scale (1 = no padding)
    model                     its --layers text, or the flags of the MLP it trains
                              (`model_name`: --hidden 256,128)
    batch_size, repeat, seed
    samples_per_s, updates_per_s
    time_to_target_s          the wall time of the first evaluation at or above --target;
                              empty if never
    final_accuracy, best_accuracy
    staleness_p50, staleness_p99, staleness_max, bytes
    push_codec, pull_codec    the run's codecs (none: uncompressed)
    bytes_per_sample          bytes through the servers per trained sample: pushed
    bytes_pushed_per_sample   plus pulled
    bytes_pulled_per_sample
    push_compression          float32 bytes over the bytes sent, each way (1: none)
    pull_compression
    link_utilization          the busiest link's traffic over its rate, 0..1
    busiest_link              which link that is, e.g. "server-0 download"
    host_bound                True when the padding of --compute-scale or --slow-worker
                              could not be kept (the figures measure this host)
    elapsed_s, metrics        the run's wall time; its metrics file, relative to OUT
    simulated                 True in simulated.csv, False in results.csv (a results.csv
                              without the column is measured)

A figure the run's `end` record does not hold (a mode without it, a run without
--link or without padding) is empty. simulated.csv has the same columns; the simulator
predicts no accuracy, host_bound or wall time, so time_to_target_s, final_accuracy,
best_accuracy, host_bound, elapsed_s and metrics are empty there.
"""

from __future__ import annotations

import csv
import io
import itertools
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, NamedTuple

from downpour import plots
from downpour.common import config
from downpour.common.config import FIELDS, Config
from downpour.common.errors import ConfigError, DownpourError
from downpour.common.fileio import atomic_write, prepare_output
from downpour.common.metrics import Progress, read_metrics
from downpour.launch import CLI, child_env

if TYPE_CHECKING:
    from downpour.common.data import Dataset

COLUMNS = ("mode", "workers", "shards", "link", "compute_scale", "model", "push_codec",
           "pull_codec", "batch_size", "repeat", "seed", "samples_per_s", "updates_per_s",
           "time_to_target_s", "final_accuracy", "best_accuracy", "staleness_p50",
           "staleness_p99", "staleness_max", "bytes", "bytes_per_sample",
           "bytes_pushed_per_sample", "bytes_pulled_per_sample", "push_compression",
           "pull_compression", "link_utilization", "busiest_link", "host_bound", "elapsed_s",
           "metrics", "simulated")
END_FIELDS = ("staleness_p50", "staleness_p99", "staleness_max", "bytes", "bytes_per_sample",
              "bytes_pushed_per_sample", "bytes_pulled_per_sample", "push_compression",
              "pull_compression", "link_utilization", "busiest_link",
              "host_bound")                      # copied from the end record, or the simulator's
AXES = ("layers", "link", "compute_scale", "push_codec", "pull_codec")   # swept beyond mode, W, S
SWEPT = ("mode", "workers", "shards", "seed", "metrics", "save", "progress", "config")
ONE_CASE = {"single": "single runs one process", "hogwild": "hogwild has no servers"}
NO_LINK = "none"                             # --link's word for a run without links
SHAPE_SAMPLES = 50                           # synthetic samples made to learn the data's shape
MEASURED_CSV, SIMULATED_CSV = "results.csv", "simulated.csv"     # in OUT


class Axes(NamedTuple):
    """The values swept beyond modes, workers, shards and repeats, each distinct, in the
    order given. Each field is the Config setting it sets: link '' is no link, layers ''
    the MLP of --hidden."""
    layers: tuple[str, ...] = ("",)
    link: tuple[str, ...] = ("",)
    compute_scale: tuple[float, ...] = (1.0,)
    push_codec: tuple[str, ...] = ("none",)
    pull_codec: tuple[str, ...] = ("none",)

    @classmethod
    def of(cls, cfg: Config) -> "Axes":
        """The one value of each that `cfg` holds."""
        return cls(*((getattr(cfg, name),) for name in cls._fields))


class Case(NamedTuple):
    """One run of the sweep: its record (mode, workers, shards, the Axes settings, repeat)
    and its settings."""
    run: dict
    cfg: Config


class Sweep(NamedTuple):
    """The runs to start, in order, and what the sweep leaves out, one sentence each."""
    cases: list[Case]
    notes: list[str]


def _items(text: str, sep: str = ",") -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]


def parse_links(text: str) -> tuple[str, ...]:
    """The --link values of a sweep: rates in tc's syntax (lower case), or '' for `none`.
    An empty text is one run without links. ConfigError naming the first bad value."""
    links = []
    for item in _items(text):
        if item.lower() == NO_LINK:
            links.append("")
            continue
        try:
            config.parse_rate(item, "link")
        except ConfigError:
            raise ConfigError(f"--link {text!r}: {item!r} is neither a rate nor {NO_LINK}: write "
                              f"rates as tc does (100mbit, 1gbit, 10gbit; bps units are bytes per "
                              f"second) or {NO_LINK} for a run without links, separated by "
                              f"commas, e.g. --link {NO_LINK},1gbit") from None
        links.append("".join(item.split()).lower())
    return tuple(dict.fromkeys(links)) or ("",)


def parse_compute_scales(text: str) -> tuple[float, ...]:
    """The --compute-scale values of a sweep: finite numbers >= 1. ConfigError naming the
    first bad value."""
    scales = []
    for item in _items(text):
        try:
            scale = float(item)
        except ValueError:
            scale = float("nan")
        if not 1.0 <= scale < float("inf"):
            raise ConfigError(f"--compute-scale {text!r}: {item!r} is not a number >= 1: give "
                              "factors of at least 1 separated by commas, e.g. --compute-scale "
                              "1,4 (1 = no padding)")
        scales.append(scale)
    if not scales:
        raise ConfigError(f"--compute-scale {text!r}: expected factors >= 1 separated by "
                          "commas, e.g. 1,4")
    return tuple(dict.fromkeys(scales))


def parse_models(text: str) -> tuple[str, ...]:
    """The --layers values of a sweep: models separated by ';', each a layer spec (as
    `train --layers` takes it, tokens separated by commas), its syntax checked; an empty
    text is the MLP of --hidden. ConfigError naming the model and its first bad token."""
    from downpour.common.nn.layerspec import parse as parse_layers
    models = _items(text, ";")
    for i, model in enumerate(models):
        try:
            parse_layers(model)
        except ConfigError as e:
            raise ConfigError(f"--layers: {_model_label(i, len(models))} {model!r}: {e}") from None
    return tuple(dict.fromkeys(models)) or ("",)


def parse_codecs(text: str, name: str) -> tuple[str, ...]:
    """The values of --push-codec or --pull-codec (`name`: push_codec, pull_codec) in a
    sweep: codecs separated by commas, each normalised (common/wire/codec.py). ConfigError
    naming the first bad one, and for onebit pulls."""
    from downpour.common.wire import codec
    flag, codecs = "--" + name.replace("_", "-"), []
    for item in _items(text):
        try:
            parsed = codec.parse(item)
        except ConfigError as e:
            raise ConfigError(f"{flag} {text!r}: {item!r}: {e}") from None
        if name == "pull_codec" and parsed.name == "onebit":
            raise ConfigError(f"{flag} {text!r}: onebit sends signs, which suit gradients, not "
                              "weights; pull with none, fp16 or topk:R")
        codecs.append(parsed.text)
    if not codecs:
        raise ConfigError(f"{flag} {text!r}: expected codecs separated by commas, e.g. none,topk:0.01")
    return tuple(dict.fromkeys(codecs))


def _model_label(i: int, n: int) -> str:
    """How messages name the i-th of `n` models: as its runs' file names do (m0, m1, ...)."""
    return f"model m{i}" if n > 1 else "the model"


def parse_axes(given: Mapping[str, Any], layers: str | None = None, link: str | None = None,
               compute_scale: str | None = None, push_codec: str | None = None,
               pull_codec: str | None = None) -> Axes:
    """The Axes of the texts of --layers, --link, --compute-scale, --push-codec and
    --pull-codec; one not given (None)
    is the one value of the settings `given` (as config.given returns them), or the
    default. ConfigError naming the first bad value, or for `none` in --link with
    --server-link."""
    texts = {"layers": (layers, parse_models), "link": (link, parse_links),
             "compute_scale": (compute_scale, parse_compute_scales),
             "push_codec": (push_codec, lambda t: parse_codecs(t, "push_codec")),
             "pull_codec": (pull_codec, lambda t: parse_codecs(t, "pull_codec"))}  # Axes' order
    axes = Axes(*(parse(text) if text is not None else (given.get(name, FIELDS[name].default),)
                  for name, (text, parse) in texts.items()))
    if link is not None and "" in axes.link and given.get("server_link"):
        raise ConfigError(f"--link {NO_LINK} runs without links, but --server-link "
                          f"{given['server_link']} gives the servers a link of their own: drop "
                          f"{NO_LINK} from --link, or drop --server-link")
    return axes


def _used(name: str, values: Iterable, mode: str) -> Iterable:
    """The distinct `values` of setting `name` if `mode` uses it, else its default alone."""
    return dict.fromkeys(values) if mode in FIELDS[name].metadata["modes"] else (FIELDS[name].default,)


def plan(modes: list[str], workers: list[int], shards: list[int], repeats: int,
         axes: Axes = Axes()) -> list[dict]:
    """The runs of a sweep, as records {mode, workers, shards, layers, link, compute_scale,
    push_codec, pull_codec, repeat}, in the order run: modes outermost, then models, links,
    compute scales, push and pull codecs, workers, shards and repeats. A value given twice
    runs once."""
    runs = []
    for mode in dict.fromkeys(modes):
        grid = itertools.product(*(_used(name, getattr(axes, name), mode) for name in AXES),
                                 [1] if mode == "single" else dict.fromkeys(workers),
                                 [0] if mode in ONE_CASE else dict.fromkeys(shards), range(repeats))
        runs += [{"mode": mode, "workers": w, "shards": s, **dict(zip(AXES, values)), "repeat": r}
                 for *values, w, s, r in grid]
    return runs


def run_name(run: dict, axes: Axes = Axes()) -> str:
    """The name of a run's metrics file (without .jsonl): MODE-wW-sS, then its link
    (`none` for none), compute scale (x4) and model index (m1) where that axis of `axes`
    has more than one value, then -rR. Distinct for the distinct runs of `plan`."""
    parts = [run["mode"], f"w{run['workers']}", f"s{run['shards']}"]
    parts += [short for short, _ in _varied(run, axes)]
    return "-".join([*parts, f"r{run['repeat']}"])


def _varied(run: dict, axes: Axes) -> list[tuple[str, str]]:
    """What tells `run` apart on each axis of `axes` with more than one value, in run_name's
    order: (for a file name, in words), e.g. ("x4", "compute scale 4")."""
    link, scale = run.get("link", ""), run.get("compute_scale", 1.0)
    model = axes.layers.index(run.get("layers", "")) if len(axes.layers) > 1 else 0
    push, pull = run.get("push_codec", "none"), run.get("pull_codec", "none")
    named = {"link": (link or NO_LINK, f"link {link}" if link else "no link"),
             "compute_scale": (f"x{scale:.15g}", f"compute scale {scale:g}"),
             "layers": (f"m{model}", f"model m{model}"),
             "push_codec": ("push" + push.replace(":", ""), f"pushes {push}"),
             "pull_codec": ("pull" + pull.replace(":", ""), f"pulls {pull}")}
    return [named[name] for name in named if len(getattr(axes, name)) > 1]


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
    """The settings of one run: `cfg` with the run's mode, workers, shards, seed and the
    Axes settings its record holds, and every setting in `given` that the mode does not use
    back at its default."""
    swept = replace(cfg, mode=run["mode"], workers=run["workers"], shards=max(1, run["shards"]),
                    seed=cfg.seed + run["repeat"], **{k: run[k] for k in AXES if k in run})
    unused = config.unused_settings([*given, "workers", "shards"], run["mode"])
    return replace(swept, **{k: FIELDS[k].default for k in unused})


def _case_name(run: dict, axes: Axes = Axes()) -> str:
    """'sync at 1 worker', with what tells the case apart on the axes that vary:
    'sync at 1 worker (no link, model m1)'."""
    varied = [words for _, words in _varied(run, axes)]
    return f"{run['mode']} at {_counted([run['workers']], 'worker')}" + (
        f" and {run['shards']} shards" if run["shards"] > 1 else "") + (
        f" ({', '.join(varied)})" if varied else "")


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


def _data_shape(cfg: Config) -> tuple[int, Dataset]:
    """(n, a training set shaped as the runs'), for the checks before the first run: MNIST
    is opened (~0.1 s); --synthetic N is N, shaped by a few samples made the same way."""
    from downpour.common.training import open_datasets
    train, _, _ = open_datasets(replace(cfg, synthetic=min(cfg.synthetic, SHAPE_SAMPLES)))
    return cfg.synthetic or len(train), train


def check_axes(cfg: Config, axes: Axes, data: Dataset) -> None:
    """ConfigError, naming the value, for a value of `axes` that `cfg`'s other settings
    contradict (--server-link with a run without links; --hidden with --layers) or, for a
    model, whose layers do not fit `data` (a Dataset: its features and classes) shaped
    by --input-shape."""
    from downpour.common.training import model_spec
    for name in AXES:
        values = getattr(axes, name)
        for i, value in enumerate(values):
            if name == "layers":
                what = f"{_model_label(i, len(values))} " + (repr(value) if value else "of --hidden")
            else:
                what = repr(value or NO_LINK) if name == "link" else f"{value:g}" if \
                    name == "compute_scale" else repr(value)
            try:
                case = replace(cfg, **{name: value})
                if name == "layers":
                    model_spec(case, data)
            except ConfigError as e:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag}: {what}: {e}") from None


def sweep_plan(cfg: Config, modes: list[str], workers: list[int], shards: list[int], repeats: int,
               given: Iterable[str] = (), axes: Axes | None = None) -> Sweep:
    """The cases of a sweep and what it leaves out (see the module docstring).

    `given` names the settings given explicitly; those `cfg` holds at a value other than
    the default count as given too, and so do the Axes settings swept at a value other than
    the default. `axes` None: the one value of each that `cfg` holds. ConfigError for a
    value of `axes` that cannot run (`check_axes`), or if no case is left to run.
    """
    from downpour.common.training import check_cluster
    axes = axes or Axes.of(cfg)
    cfg.slowdown                        # a malformed --slow-worker is an error, not a skip of every case
    n, data = _data_shape(cfg)          # a batch the data cannot give is a case skipped
    check_axes(cfg, axes, data)
    given = set(given) | {k for k in AXES if any(v != FIELDS[k].default for v in getattr(axes, k))}
    names = [k for k in FIELDS if k not in SWEPT and (k in given or getattr(cfg, k) != FIELDS[k].default)]
    notes = []
    if dropped := impossible(modes, workers, shards):
        notes.append(f"{'; '.join(ONE_CASE[m] for m in dropped)}; skipping "
                     f"{', '.join(c for mode_cases in dropped.values() for c in mode_cases)}")
    notes += _unused_notes(names, modes)
    cases, contradicted = [], {}                # contradicted: {reason: the cases it rules out}
    for run in plan(modes, workers, shards, repeats, axes):
        case = Case(run, case_config(cfg, run, names))
        try:
            check_cluster(case.cfg, n)
        except ConfigError as e:
            ruled_out = contradicted.setdefault(str(e), [])
            if run["repeat"] == 0:
                ruled_out.append(_case_name(run, axes))
            continue
        cases.append(case)
    notes += [f"{reason}; skipping {', '.join(ruled_out)}" for reason, ruled_out in contradicted.items()]
    if not cases:
        raise ConfigError("no run of the sweep can start: " + "; ".join(notes))
    return Sweep(cases, notes)


def model_name(cfg: Config) -> str:
    """The model of `cfg` in a few words: its --layers text, or the flags of the MLP it
    trains without one (`--hidden 256,128`, with --activation, --batchnorm and --dropout
    where they are not the default)."""
    if cfg.layers:
        return cfg.layers
    words = ["--hidden", ",".join(map(str, cfg.hidden))]
    if cfg.activation != FIELDS["activation"].default:
        words += ["--activation", cfg.activation]
    if cfg.batchnorm:
        words.append("--batchnorm")
    if cfg.dropout:
        words += ["--dropout", f"{cfg.dropout:g}"]
    return " ".join(words)


def _case_columns(run: dict, cfg: Config, end: Mapping[str, Any]) -> dict[str, Any]:
    """The columns of a row up to updates_per_s: the case (`run` its record, `cfg` its own
    settings) and the throughput of `end` (an end record, or the simulator's figures)."""
    return {"mode": run["mode"], "workers": run["workers"], "shards": run["shards"],
            "link": cfg.link, "compute_scale": cfg.compute_scale, "model": model_name(cfg),
            "push_codec": cfg.push_codec, "pull_codec": cfg.pull_codec,
            "batch_size": cfg.batch_size, "repeat": run["repeat"], "seed": cfg.seed,
            "samples_per_s": end["samples_per_s"], "updates_per_s": end["updates_per_s"]}


def _end_columns(end: Mapping[str, Any]) -> dict[str, Any]:
    """The END_FIELDS of `end`, '' for each it does not hold (or holds as None)."""
    return {k: end.get(k) if end.get(k) is not None else "" for k in END_FIELDS}


def row(run: dict, cfg: Config, path: Path, target: float) -> dict[str, Any]:
    """The results.csv row of a finished run: `run` its record, `cfg` its own settings
    (`case_config`), `path` its metrics file (in OUT/runs). A figure its `end` record does
    not hold is ''. DownpourError if the file has no `end` line."""
    evals, end = read_metrics(path)
    if end is None:
        raise DownpourError(f"{path} has no end line: the run did not finish")
    reached = [e["elapsed_s"] for e in evals if e["test_accuracy"] >= target]
    return {**_case_columns(run, cfg, end),
            "time_to_target_s": reached[0] if reached else "",
            "final_accuracy": end["test_accuracy"],
            "best_accuracy": max([e["test_accuracy"] for e in evals], default=end["test_accuracy"]),
            **_end_columns(end),
            "elapsed_s": end["elapsed_s"], "metrics": str(path.relative_to(path.parents[1])),
            "simulated": False}


def simulated_row(run: dict, cfg: Config, figures: Mapping[str, Any]) -> dict[str, Any]:
    """The simulated.csv row of a case: `run` its record, `cfg` its own settings, `figures`
    what `downpour.sim.command.simulate` predicted for it. The columns the simulator does
    not predict (accuracy, time to target, host_bound, wall time, metrics file) are ''."""
    return {**dict.fromkeys(COLUMNS, ""), **_case_columns(run, cfg, figures),
            **_end_columns(figures), "simulated": True}


def run_sweep(cfg: Config, modes: list[str], workers: list[int], shards: list[int], repeats: int,
              out: Path, target: float, given: Iterable[str] = (),
              axes: Axes | None = None) -> list[dict]:
    """Run every run of the sweep; write results.csv and the plots; return the rows.

    `given` names the settings given explicitly and `axes` the values swept beyond modes,
    workers and shards (see `sweep_plan`). ConfigError, before any run, if a value cannot
    run, `out` cannot be written or no case can run; DownpourError if a run fails.
    """
    axes = axes or Axes.of(cfg)
    cases, notes = sweep_plan(cfg, modes, workers, shards, repeats, given, axes)
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
        name = run_name(run, axes)
        path = out / "runs" / f"{name}.jsonl"
        argv = [*CLI, "train", *config.to_args(replace(run_cfg, metrics=str(path), save="",
                                                       progress="none", config=""))]
        progress.update(i, f"run {i + 1}/{len(runs)}: {name}")
        done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode != 0:
            raise DownpourError(f"run {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        rows.append(row(run, run_cfg, path, target))
        r = rows[-1]
        progress.line(f"{name:<22} {r['samples_per_s']:>9,.0f} samples/s  accuracy "
                      f"{100 * r['final_accuracy']:.2f}%  time to {target:g}: "
                      f"{r['time_to_target_s'] or 'never'}")
    progress.update(len(runs))
    progress.close()
    _write_and_plot(rows, out / MEASURED_CSV, target, progress)
    return rows


def simulate_sweep(cfg: Config, modes: list[str], workers: list[int], shards: list[int],
                   repeats: int, out: Path, profile: Path, target: float,
                   given: Iterable[str] = (), axes: Axes | None = None) -> list[dict]:
    """Predict every case of the sweep's cluster modes with the simulator, with the costs
    of the profile at `profile` (calibrated first if there is none); write simulated.csv
    and the plots; return the rows.

    single and hogwild are left out with a note. ConfigError, before any case, as
    `run_sweep`'s, and if the sweep has no cluster mode.
    """
    from downpour.sim.command import SIMULATED, costs_for, simulate
    axes = axes or Axes.of(cfg)
    cluster = [m for m in modes if m in SIMULATED]
    left_out = [m for m in dict.fromkeys(modes) if m not in SIMULATED]
    if not cluster:
        raise ConfigError(f"--simulate models the cluster modes, but --modes is "
                          f"{','.join(left_out)}: add one of {', '.join(SIMULATED)}")
    cases, notes = sweep_plan(cfg, cluster, workers, shards, repeats, given, axes)
    out = prepare_output(out, "--out", directory=True)
    if left_out:
        notes.insert(0, f"the simulator models the cluster modes ({', '.join(SIMULATED)}); "
                        f"leaving out {', '.join(left_out)}")
    for note in notes:
        print(f"experiment: {note}", file=sys.stderr)
    progress = Progress(len(cases), cfg.progress)
    progress.line(f"experiment: {len(cases)} simulated runs into {out}")
    rows = []
    for i, (run, run_cfg) in enumerate(cases):
        name = run_name(run, axes)
        progress.update(i, f"simulating {i + 1}/{len(cases)}: {name}")
        costs, _ = costs_for(run_cfg, profile, say=progress.line)
        rows.append(simulated_row(run, run_cfg, simulate(run_cfg, costs)))
        progress.line(f"{name:<22} {rows[-1]['samples_per_s']:>9,.0f} samples/s (simulated)")
    progress.update(len(cases))
    progress.close()
    _write_and_plot(rows, out / SIMULATED_CSV, target, progress)
    return rows


def read_rows(out: Path) -> list[dict[str, str]]:
    """The rows of OUT/results.csv, then of OUT/simulated.csv, of those that exist, as CSV
    text (downpour.plots reads a results.csv from before the simulated column as measured)."""
    rows = []
    for name in (MEASURED_CSV, SIMULATED_CSV):
        if (out / name).is_file():
            with open(out / name, newline="") as f:
                rows += list(csv.DictReader(f))
    return rows


def _write_and_plot(rows: list[dict], path: Path, target: float, progress: Progress) -> None:
    """Write `rows` to the CSV `path` (atomically), then the plots of every row in its
    folder, measured and simulated (`read_rows`)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))
    if not plots.available():
        progress.line(f"{path.name} written; for the plots install matplotlib "
                      "(pip install -e '.[plot]')")
        return
    for plotted in plots.sweep(read_rows(path.parent), path.parent, target):
        progress.line(f"wrote {plotted}")
