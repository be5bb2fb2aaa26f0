"""`downpour experiment` and `downpour plot`: a sweep's CSV and plots, as a user runs them."""

import csv

import pytest

from downpour.common import config
from downpour.common.config import Config
from downpour.common.errors import ConfigError
from downpour.experiment import COLUMNS, case_config, impossible, plan, sweep_plan

pytest.importorskip("matplotlib", reason="plots need matplotlib: pip install -e '.[plot]'")
PNG = b"\x89PNG\r\n\x1a\n"
TINY = ("--synthetic", 600, "--hidden", 8, "--epochs", 1, "--batch-size", 50, "--target", 0.5)


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


@pytest.mark.slow
def test_a_small_sweep_writes_the_csv_and_four_plots(downpour, tmp_path):
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
    for name in ("throughput", "accuracy_time", "accuracy_samples", "staleness"):
        data = (tmp_path / "exp" / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    r = downpour("plot", *[tmp_path / "exp" / x["metrics"] for x in rows[:3]], "--out", "curves.png")
    assert r.returncode == 0 and (tmp_path / "curves.png").read_bytes().startswith(PNG)


def test_bad_sweep_arguments(downpour):
    r = downpour("experiment", "--out", "x", "--modes", "async,turbo")
    assert r.returncode == 2 and "--modes" in r.stderr
    r = downpour("experiment", "--out", "x", "--workers", "0")
    assert r.returncode == 2 and "positive integers" in r.stderr
    r = downpour("plot", "missing.jsonl")
    assert r.returncode == 2 and "no metrics file" in r.stderr
