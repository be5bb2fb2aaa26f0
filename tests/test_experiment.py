"""`downpour experiment` and `downpour plot`: a sweep's CSV and plots, as a user runs them."""

import csv

import pytest

from downpour import plots
from downpour.common import config
from downpour.common.config import Config
from downpour.common.errors import ConfigError
from downpour.common.metrics import MetricsLog
from downpour.experiment import (
    COLUMNS,
    Axes,
    case_config,
    impossible,
    model_name,
    parse_axes,
    parse_compute_scales,
    parse_links,
    parse_models,
    plan,
    read_rows,
    row,
    run_name,
    simulated_row,
    sweep_plan,
)

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ("--synthetic", 600, "--hidden", 8, "--epochs", 1, "--batch-size", 50, "--target", 0.5)
CONV = "conv:4:3,relu,maxpool:2,flatten,dense:8,relu"
SIM = ("--simulate", "--synthetic", 6400, "--hidden", 8, "--epochs", 1, "--batch-size", 50,
       "--progress", "none")
UNPREDICTED = ("time_to_target_s", "final_accuracy", "best_accuracy", "host_bound", "elapsed_s",
               "metrics")                                  # empty in simulated.csv
needs_matplotlib = pytest.mark.skipif(not plots.available(),
                                      reason="plots need matplotlib: pip install -e '.[plot]'")


def test_plan_runs_single_once_and_hogwild_without_shards():
    runs = plan(["single", "async", "hogwild"], [1, 2], [1, 2], repeats=2)
    assert [(r["mode"], r["workers"], r["shards"]) for r in runs if r["repeat"] == 0] == [
        ("single", 1, 0), ("async", 1, 1), ("async", 1, 2), ("async", 2, 1), ("async", 2, 2),
        ("hogwild", 1, 0), ("hogwild", 2, 0)]
    assert len(runs) == 14


def test_the_cases_that_cannot_exist_are_named():
    assert impossible(["single", "async"], [1, 2], [1]) == {"single": ["single at 2 workers"]}
    assert impossible(["single", "sync", "hogwild"], [2, 4], [1, 2]) == {
        "single": ["single at 2 and 4 workers", "single at 2 shards"], "hogwild": ["hogwild at 2 shards"]}
    assert impossible(["single", "hogwild", "async"], [1, 2], [1]) == {"single": ["single at 2 workers"]}


def test_a_case_runs_without_the_settings_its_mode_does_not_use():
    cfg = Config(backup=1, n_fetch=2, lr=0.05, seed=3)
    given = ["backup", "n_fetch", "lr"]
    single = case_config(cfg, {"mode": "single", "workers": 1, "shards": 0, "repeat": 1}, given)
    assert config.to_args(single) == ["--seed", "4", "--lr", "0.05"]       # no --workers, --backup
    sync = case_config(cfg, {"mode": "sync", "workers": 4, "shards": 2, "repeat": 0}, given)
    assert (sync.mode, sync.workers, sync.shards, sync.backup, sync.n_fetch) == ("sync", 4, 2, 1, 1)
    hogwild = case_config(cfg, {"mode": "hogwild", "workers": 3, "shards": 0, "repeat": 0}, given)
    assert (hogwild.workers, hogwild.shards, hogwild.backup) == (3, 1, 0)


def test_the_sweep_says_once_what_it_leaves_out():
    cases, notes = sweep_plan(Config(backup=1), ["single", "sync", "async"], [1, 2], [1], repeats=2,
                              given=["backup", "lr"])
    assert notes == [
        "single runs one process; skipping single at 2 workers",
        "backup is a setting of --mode sync; not used by the single, async runs",
        "backup=1: backup workers are for --mode sync, and fewer than the 1 worker(s); "
        "skipping sync at 1 worker"]
    assert [(c.run["mode"], c.run["workers"], c.run["repeat"], c.cfg.backup) for c in cases] == [
        ("single", 1, 0, 0), ("single", 1, 1, 0), ("sync", 2, 0, 1), ("sync", 2, 1, 1),
        ("async", 1, 0, 0), ("async", 1, 1, 0), ("async", 2, 0, 0), ("async", 2, 1, 0)]
    with pytest.raises(ConfigError, match="no run of the sweep can start: backup=1"):
        sweep_plan(Config(backup=1), ["sync"], [1], [1], repeats=1, given=["backup"])


@pytest.mark.slow
def test_an_experiment_skips_impossible_cases_and_unused_settings_once(downpour, tmp_path):
    r = downpour("experiment", "--modes", "single,async", "--workers", "1,2", "--backup", 1,
                 "--repeats", 2, "--out", "exp/new", "--progress", "none", *TINY, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert lines.count("experiment: single runs one process; skipping single at 2 workers") == 1
    assert lines.count("experiment: backup is a setting of --mode sync; not used by the single, "
                       "async runs") == 1
    rows = list(csv.DictReader(open(tmp_path / "exp" / "new" / "results.csv")))
    assert [(x["mode"], x["workers"], x["repeat"]) for x in rows] == [
        ("single", "1", "0"), ("single", "1", "1"), ("async", "1", "0"), ("async", "1", "1"),
        ("async", "2", "0"), ("async", "2", "1")]


def test_an_experiment_out_that_cannot_be_written_fails_before_any_run(downpour, tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    r = downpour("experiment", "--modes", "single", "--out", "taken/exp", *TINY, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("downpour: error: cannot write --out 'taken/exp': ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@needs_matplotlib
@pytest.mark.slow
def test_a_small_sweep_writes_the_csv_and_six_plots(downpour, tmp_path):
    r = downpour("experiment", "--workers", "1,2", "--modes", "single,sync,async,ssp,hogwild",
                 "--out", "exp", "--synthetic", 2000, "--hidden", 32, "--epochs", 2,
                 "--batch-size", 50, "--eval-every", 0.5, "--lr", 0.01, "--target", 0.5, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "exp" / "results.csv")))
    assert list(rows[0]) == list(COLUMNS)
    assert [(x["mode"], x["workers"]) for x in rows] == [
        ("single", "1"), ("sync", "1"), ("sync", "2"), ("async", "1"), ("async", "2"),
        ("ssp", "1"), ("ssp", "2"), ("hogwild", "1"), ("hogwild", "2")]
    for x in rows:
        assert float(x["samples_per_s"]) > 0 and 0 < float(x["final_accuracy"]) <= 1
        assert (tmp_path / "exp" / x["metrics"]).is_file()
    # one worker: every mode takes the single-process steps, so all end alike
    one = {x["final_accuracy"] for x in rows if x["workers"] == "1" and x["mode"] != "hogwild"}
    assert len(one) == 1
    assert {(x["link"], x["compute_scale"], x["model"]) for x in rows} == {("", "1.0", "--hidden 32")}
    for name in ("throughput", "speedup", "time_to_target", "accuracy_time", "accuracy_samples",
                 "staleness"):
        data = (tmp_path / "exp" / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    r = downpour("plot", *[tmp_path / "exp" / x["metrics"] for x in rows[:3]], "--out", "curves.png")
    assert r.returncode == 0 and (tmp_path / "curves.png").read_bytes().startswith(PNG)


@needs_matplotlib
def test_bad_sweep_arguments(downpour):
    r = downpour("experiment", "--out", "x", "--modes", "async,turbo")
    assert r.returncode == 2 and "--modes" in r.stderr
    r = downpour("experiment", "--out", "x", "--workers", "0")
    assert r.returncode == 2 and "positive integers" in r.stderr
    r = downpour("plot", "missing.jsonl")
    assert r.returncode == 2 and "no metrics file" in r.stderr


# -- the axes beyond modes, workers and shards ------------------------------------------------------

def test_the_axes_parse_into_distinct_values_in_the_order_given():
    assert parse_links("none, 100mbit,1GBit,100mbit,") == ("", "100mbit", "1gbit")
    assert parse_links("") == ("",) and parse_links("1gbit") == ("1gbit",)
    assert parse_compute_scales("1, 4,4.0,2.5") == (1.0, 4.0, 2.5)
    assert parse_models(f"dense:8,relu; {CONV} ;dense:8,relu;") == ("dense:8,relu", CONV)
    assert parse_models("") == ("",)
    given = {"link": "10mbit", "compute_scale": 2.0}          # a TOML file's or DOWNPOUR_*'s one value
    assert parse_axes(given) == Axes(layers=("",), link=("10mbit",), compute_scale=(2.0,))
    assert parse_axes(given, link="none,1gbit", compute_scale="1,4", layers="dense:8,relu") == Axes(
        layers=("dense:8,relu",), link=("", "1gbit"), compute_scale=(1.0, 4.0))
    assert Axes.of(Config(link="1gbit", layers="dense:8,relu")) == Axes(("dense:8,relu",), ("1gbit",), (1.0,))


@pytest.mark.parametrize("flag, text, message", [
    ("link", "100mbit,fast", "--link '100mbit,fast': 'fast' is neither a rate nor none: write rates "
                             "as tc does (100mbit, 1gbit, 10gbit; bps units are bytes per second) or "
                             "none for a run without links, separated by commas, e.g. --link none,1gbit"),
    ("link", "0mbit", "--link '0mbit': '0mbit' is neither a rate nor none: "),
    ("compute_scale", "1,0.5", "--compute-scale '1,0.5': '0.5' is not a number >= 1: give factors of "
                               "at least 1 separated by commas, e.g. --compute-scale 1,4 (1 = no padding)"),
    ("compute_scale", "four", "--compute-scale 'four': 'four' is not a number >= 1"),
    ("compute_scale", "1,inf", "--compute-scale '1,inf': 'inf' is not a number >= 1"),
    ("compute_scale", "nan", "--compute-scale 'nan': 'nan' is not a number >= 1"),
    ("compute_scale", " , ", "--compute-scale ' , ': expected factors >= 1 separated by commas"),
    ("layers", "dense:8,relu;conv:x", "--layers: model m1 'conv:x': layer 1 'conv:x': expected conv:C:K"),
    ("layers", "dense:8,,relu", "--layers: the model 'dense:8,,relu': layers 'dense:8,,relu': an empty"),
])
def test_a_bad_axis_value_is_named_with_what_to_write(flag, text, message):
    with pytest.raises(ConfigError) as e:
        parse_axes({}, **{flag: text})
    assert str(e.value).startswith(message)


def test_a_run_without_links_contradicts_server_link():
    with pytest.raises(ConfigError, match="--link none runs without links, but --server-link 1gbit "
                                          "gives the servers a link of their own: drop none"):
        parse_axes({"server_link": "1gbit"}, link="none,100mbit")
    assert parse_axes({"server_link": "1gbit"}, link="100mbit,1gbit").link == ("100mbit", "1gbit")


@pytest.mark.parametrize("cfg, layers, message", [
    (Config(synthetic=600, input_shape=(1, 28, 28)), ("dense:8,relu", CONV),
     "--layers: model m0 'dense:8,relu': layer 1 'dense:8' needs vectors, but its input is images "
     "1,28,28 (C,H,W): put flatten before it"),
    (Config(synthetic=600), ("dense:8,relu", CONV),
     f"--layers: model m1 {CONV!r}: conv:4:3 needs images (C,H,W), but its input is vectors of 784"),
    (Config(synthetic=600, hidden=(64,)), ("dense:8,relu",),
     "--layers: the model 'dense:8,relu': hidden describes the layers of --hidden, but layers is set"),
])
def test_every_model_is_checked_against_the_data_before_any_run(cfg, layers, message):
    with pytest.raises(ConfigError) as e:
        sweep_plan(cfg, ["async"], [1], [1], repeats=1, axes=Axes(layers=layers))
    assert str(e.value).startswith(message)
    cases, _ = sweep_plan(Config(synthetic=600, input_shape=(1, 28, 28)), ["async"], [1], [1], 1,
                          axes=Axes(layers=("flatten,dense:8,relu", CONV)))
    assert [c.cfg.layers for c in cases] == ["flatten,dense:8,relu", CONV]


def test_plan_runs_every_model_link_and_scale_where_the_mode_uses_them():
    axes = Axes(layers=("", "dense:8,relu"), link=("", "1gbit"), compute_scale=(1.0, 4.0))
    runs = plan(["single", "async", "hogwild"], [1, 2], [1], repeats=1, axes=axes)
    names = [run_name(r, axes) for r in runs]
    # single: no link, no padding; hogwild: no link; async: every combination
    assert len(runs) == 2 + 2 * 2 * 2 * 2 + 2 * 2 * 2
    assert names[:8] == [
        "single-w1-s0-none-x1-m0-r0", "single-w1-s0-none-x1-m1-r0",
        "async-w1-s1-none-x1-m0-r0", "async-w2-s1-none-x1-m0-r0",
        "async-w1-s1-none-x4-m0-r0", "async-w2-s1-none-x4-m0-r0",
        "async-w1-s1-1gbit-x1-m0-r0", "async-w2-s1-1gbit-x1-m0-r0"]
    assert names[-2:] == ["hogwild-w1-s0-none-x4-m1-r0", "hogwild-w2-s0-none-x4-m1-r0"]
    assert len(set(names)) == len(names)
    assert {(r["link"], r["compute_scale"]) for r in runs if r["mode"] == "single"} == {("", 1.0)}
    assert {r["link"] for r in runs if r["mode"] == "hogwild"} == {""}
    assert {r["compute_scale"] for r in runs if r["mode"] == "hogwild"} == {1.0, 4.0}
    # one value on each axis: the names of before
    assert [run_name(r) for r in plan(["async"], [2], [1, 2], repeats=1)] == [
        "async-w2-s1-r0", "async-w2-s2-r0"]


def test_the_cases_of_a_sweep_carry_their_link_scale_and_model():
    axes = Axes(layers=("", "dense:8,relu"), link=("", "100mbit"), compute_scale=(1.0, 2.5))
    cases, notes = sweep_plan(Config(synthetic=600, backup=1), ["single", "sync", "hogwild"], [1, 2],
                              [1], repeats=1, given=["backup"], axes=axes)
    assert "link is a setting of --mode async, sync, ssp, hybrid; not used by the single, hogwild " \
           "runs" in notes
    assert "compute_scale is a setting of --mode async, sync, ssp, hybrid, hogwild; not used by the single " \
           "runs" in notes
    assert ("backup=1: backup workers are for --mode sync, and fewer than the 1 worker(s); skipping "
            "sync at 1 worker (no link, compute scale 1, model m0), sync at 1 worker (no link, "
            "compute scale 2.5, model m0)") in notes[-1]
    got = {(c.cfg.mode, c.run["workers"], c.cfg.link, c.cfg.compute_scale, c.cfg.layers) for c in cases}
    assert ("single", 1, "", 1.0, "dense:8,relu") in got
    assert ("sync", 2, "100mbit", 2.5, "") in got and ("hogwild", 2, "", 2.5, "dense:8,relu") in got
    assert len(got) == len(cases) == 2 + 2 * 2 * 2 + 2 * 2 * 2             # sync at W=1 ruled out
    sync = next(c.cfg for c in cases if c.cfg.mode == "sync" and c.cfg.link and c.cfg.compute_scale > 1)
    assert config.to_args(sync) == ["--mode", "sync", "--synthetic", "600", "--backup", "1",
                                    "--compute-scale", "2.5", "--link", "100mbit"]
    single = next(c.cfg for c in cases if c.cfg.mode == "single" and c.cfg.layers)
    assert config.to_args(single) == ["--synthetic", "600", "--layers", "dense:8,relu"]


def test_the_model_column_names_the_model():
    assert model_name(Config()) == "--hidden 256,128"
    assert model_name(Config(hidden=(64,), activation="tanh", batchnorm=True, dropout=0.2)) == \
        "--hidden 64 --activation tanh --batchnorm --dropout 0.2"
    assert model_name(Config(layers=CONV, input_shape=(1, 28, 28))) == CONV


def write_metrics(path, **end):
    """A run's metrics file: three evaluations (accuracy 0.5, 0.7, 0.6), then the end line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with MetricsLog(str(path)) as log:
        for i, accuracy in enumerate((0.5, 0.7, 0.6), 1):
            log.write("eval", elapsed_s=1.5 * i, epoch=float(i), samples=100 * i, updates=i,
                      train_loss=1.0, test_loss=1.0, test_accuracy=accuracy, lr=0.01)
        log.write("end", mode="async", elapsed_s=4.5, samples_per_s=800.0, updates_per_s=8.0,
                  test_accuracy=0.6, **end)
    return path


def test_a_row_carries_the_run_settings_and_the_end_record(tmp_path):
    run = {"mode": "async", "workers": 2, "shards": 1, "layers": CONV, "link": "100mbit",
           "compute_scale": 4.0, "repeat": 1}
    cfg = case_config(Config(seed=7, batch_size=32, input_shape=(1, 28, 28)), run)
    path = write_metrics(tmp_path / "runs" / "a.jsonl", bytes=5000, bytes_per_sample=12.5,
                         link_utilization=0.42, busiest_link="server-0 download", host_bound=True,
                         staleness_p50=1.0, staleness_p99=None)
    r = row(run, cfg, path, target=0.65)
    assert list(r) == list(COLUMNS)
    assert {k: r[k] for k in ("mode", "workers", "shards", "link", "compute_scale", "model",
                              "batch_size", "repeat", "seed")} == {
        "mode": "async", "workers": 2, "shards": 1, "link": "100mbit", "compute_scale": 4.0,
        "model": CONV, "batch_size": 32, "repeat": 1, "seed": 8}
    assert (r["time_to_target_s"], r["final_accuracy"], r["best_accuracy"]) == (3.0, 0.6, 0.7)
    assert (r["bytes_per_sample"], r["link_utilization"], r["busiest_link"], r["host_bound"]) == (
        12.5, 0.42, "server-0 download", True)
    assert (r["staleness_p50"], r["staleness_p99"], r["metrics"]) == (1.0, "", "runs/a.jsonl")
    assert r["simulated"] is False
    # an end record without the new fields (single mode, or a run before they existed)
    single = {"mode": "single", "workers": 1, "shards": 0, "repeat": 0}
    path = write_metrics(tmp_path / "runs" / "b.jsonl")
    r = row(single, case_config(Config(), single), path, target=0.9)
    assert [r[k] for k in ("link", "compute_scale", "model", "time_to_target_s", "bytes_per_sample",
                           "link_utilization", "busiest_link", "host_bound")] == [
        "", 1.0, "--hidden 256,128", "", "", "", "", ""]


def test_bad_axes_on_the_command_line_fail_before_any_run(downpour, tmp_path):
    for args, message in [
        (("--link", "none,fast"), "downpour: error: --link 'none,fast': 'fast' is neither a rate nor none"),
        (("--compute-scale", "0.5"), "downpour: error: --compute-scale '0.5': '0.5' is not a number >= 1"),
        (("--layers", f"dense:8,relu;{CONV}"), f"downpour: error: --layers: model m1 {CONV!r}: conv:4:3 "
                                               "needs images"),
        (("--link", "none,1gbit", "--server-link", "10gbit"), "downpour: error: --link none runs "
                                                              "without links, but --server-link 10gbit"),
    ]:
        r = downpour("experiment", "--out", "exp", "--synthetic", 600, *args, timeout=60)
        assert r.returncode == 2 and r.stderr.startswith(message), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "exp").exists()


def test_codecs_are_axes_named_in_the_runs_and_checked_first():
    from downpour.experiment import parse_codecs
    assert parse_codecs("none, TopK:0.010,fp16,none", "push_codec") == ("none", "topk:0.01", "fp16")
    for text, message in (("none,zip", "--push-codec 'none,zip': 'zip': "),
                          ("topk:2", "--push-codec 'topk:2': 'topk:2': ")):
        with pytest.raises(ConfigError) as e:
            parse_codecs(text, "push_codec")
        assert str(e.value).startswith(message)
    with pytest.raises(ConfigError, match="--pull-codec 'onebit': onebit sends signs"):
        parse_codecs("onebit", "pull_codec")
    axes = parse_axes({}, push_codec="none,onebit", pull_codec="fp16")
    assert (axes.push_codec, axes.pull_codec) == (("none", "onebit"), ("fp16",))
    runs = plan(["single", "async"], [2], [1], repeats=1, axes=axes)
    assert [run_name(r, axes) for r in runs] == ["single-w1-s0-pushnone-r0",
                                                 "async-w2-s1-pushnone-r0", "async-w2-s1-pushonebit-r0"]
    assert [(r["push_codec"], r["pull_codec"]) for r in runs] == [
        ("none", "none"), ("none", "fp16"), ("onebit", "fp16")]


def test_a_codec_sweep_writes_its_codecs_and_compression(downpour, tmp_path):
    r = downpour("experiment", "--workers", "2", "--modes", "async", "--out", "exp",
                 "--synthetic", 2000, "--hidden", 32, "--epochs", 2, "--batch-size", 50,
                 "--eval-every", 0, "--push-codec", "none,topk:0.05", "--pull-codec", "fp16",
                 "--codec-warmup-epochs", 0, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "exp" / "results.csv")))
    assert [(x["push_codec"], x["pull_codec"]) for x in rows] == [("none", "fp16"),
                                                                  ("topk:0.05", "fp16")]
    assert float(rows[0]["push_compression"]) == 1.0 and float(rows[1]["push_compression"]) > 9.9
    assert all(float(x["pull_compression"]) > 1.9 for x in rows)


# -- --simulate: the sweep through the simulator ----------------------------------------------------

@pytest.fixture(scope="session")
def sim_profile(tmp_path_factory):
    """The simulator's costs for this session's tests: calibrated by the first sweep that
    uses them (~5 s), then read."""
    return tmp_path_factory.mktemp("simulator") / "profile.json"


def test_a_simulated_row_holds_the_predictions_and_leaves_the_rest_empty():
    run = {"mode": "sync", "workers": 64, "shards": 2, "link": "1gbit", "compute_scale": 4.0,
           "repeat": 1}
    cfg = case_config(Config(seed=7, batch_size=32), run)
    figures = {"simulated": True, "samples_per_s": 5000.0, "updates_per_s": 156.25,
               "staleness_p50": 0.0, "staleness_p99": 0.0, "staleness_max": 0.0, "bytes": 10**9,
               "bytes_per_sample": 2000.0, "bytes_pushed_per_sample": 1000.0,
               "bytes_pulled_per_sample": 1000.0, "push_compression": 1.0, "pull_compression": 1.0,
               "link_utilization": 0.9, "busiest_link": "server-0 download", "train_time_s": 12.0}
    r = simulated_row(run, cfg, figures)
    assert list(r) == list(COLUMNS) and r["simulated"] is True
    assert {k: r[k] for k in ("mode", "workers", "shards", "link", "compute_scale", "batch_size",
                              "repeat", "seed")} == {
        "mode": "sync", "workers": 64, "shards": 2, "link": "1gbit", "compute_scale": 4.0,
        "batch_size": 32, "repeat": 1, "seed": 8}
    assert (r["samples_per_s"], r["updates_per_s"], r["bytes_per_sample"], r["busiest_link"]) == (
        5000.0, 156.25, 2000.0, "server-0 download")
    assert [r[k] for k in UNPREDICTED] == [""] * len(UNPREDICTED)
    unlinked = simulated_row(run, cfg, {**figures, "link_utilization": None, "busiest_link": None})
    assert (unlinked["link_utilization"], unlinked["busiest_link"]) == ("", "")


def test_the_plots_read_both_csvs_and_an_older_results_csv_as_measured(tmp_path):
    assert read_rows(tmp_path) == []
    (tmp_path / "results.csv").write_text("mode,workers,shards,repeat,samples_per_s\n"
                                          "async,1,1,0,100.0\n")          # before `simulated`
    run = {"mode": "async", "workers": 2, "shards": 1, "repeat": 0}
    with open(tmp_path / "simulated.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerow(simulated_row(run, case_config(Config(), run),
                                      {"samples_per_s": 180.0, "updates_per_s": 3.6}))
    rows = read_rows(tmp_path)
    assert [(x["workers"], x["samples_per_s"]) for x in rows] == [("1", "100.0"), ("2", "180.0")]
    assert [plots.line_key(x).simulated for x in rows] == [False, True]


def test_a_simulated_sweep_writes_simulated_csv_and_leaves_out_single(downpour, tmp_path,
                                                                       sim_profile):
    r = downpour("experiment", *SIM, "--profile", sim_profile, "--modes", "single,async",
                 "--workers", "1,2,4,64", "--link", "1gbit", "--compute-scale", 4, "--out", "exp",
                 timeout=180)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines().count("experiment: the simulator models the cluster modes (async, "
                                       "sync, ssp); leaving out single") == 1
    rows = list(csv.DictReader(open(tmp_path / "exp" / "simulated.csv")))
    assert list(rows[0]) == list(COLUMNS)
    assert [(x["mode"], x["workers"], x["link"], x["compute_scale"], x["simulated"]) for x in rows] == [
        ("async", w, "1gbit", "4.0", "True") for w in ("1", "2", "4", "64")]
    assert {x[k] for x in rows for k in UNPREDICTED} == {""}
    rates = [float(x["samples_per_s"]) for x in rows]
    assert 0 < 1.5 * rates[0] < rates[1]         # compute-bound: a second worker nearly doubles it
    assert float(rows[0]["bytes_per_sample"]) > 0 and 0 < float(rows[0]["link_utilization"]) <= 1
    plotted = ["speedup.png", "throughput.png"] if plots.available() else []
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["simulated.csv", *plotted]
    assert sim_profile.is_file()


@needs_matplotlib
def test_a_simulated_sweep_beside_a_measured_one_plots_both(downpour, tmp_path, sim_profile):
    run = {"mode": "async", "workers": 1, "shards": 1, "repeat": 0}
    path = write_metrics(tmp_path / "exp" / "runs" / "async-w1-s1-r0.jsonl")
    measured = row(run, case_config(Config(synthetic=6400, hidden=(8,), batch_size=50), run), path,
                   target=0.65)
    with open(tmp_path / "exp" / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, [c for c in COLUMNS if c != "simulated"], extrasaction="ignore")
        writer.writeheader()                                   # a results.csv from before --simulate
        writer.writerow(measured)
    before = (tmp_path / "exp" / "results.csv").read_text()
    r = downpour("experiment", *SIM, "--profile", sim_profile, "--modes", "async",
                 "--workers", "1,2,32", "--out", "exp", timeout=180)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "exp" / "results.csv").read_text() == before
    assert [x["workers"] for x in csv.DictReader(open(tmp_path / "exp" / "simulated.csv"))] == [
        "1", "2", "32"]
    # the plots of the measured runs' metrics files are drawn too: results.csv was read
    for name in ("throughput", "speedup", "time_to_target", "accuracy_time"):
        assert (tmp_path / "exp" / f"{name}.png").read_bytes().startswith(PNG)


def test_simulate_needs_a_cluster_mode_and_profile_needs_simulate(downpour, tmp_path):
    r = downpour("experiment", "--simulate", "--modes", "single,hogwild", "--out", "exp",
                 "--synthetic", 600, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith(
        "downpour: error: --simulate models the cluster modes, but --modes is single,hogwild: add "
        "one of async, sync, ssp"), r.stderr
    r = downpour("experiment", "--profile", "p.json", "--out", "exp", "--synthetic", 600, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith(
        "downpour: error: --profile holds the simulator's costs: add --simulate"), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
