"""`downpour experiment` and `downpour plot`: a sweep's CSV and plots, as a user runs them."""

import csv

import pytest

from downpour.experiment import COLUMNS, plan

pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"


def test_plan_runs_single_once_and_hogwild_without_shards():
    runs = plan(["single", "async", "hogwild"], [1, 2], [1, 2], repeats=2)
    assert [(r["mode"], r["workers"], r["shards"]) for r in runs if r["repeat"] == 0] == [
        ("single", 1, 0), ("async", 1, 1), ("async", 1, 2), ("async", 2, 1), ("async", 2, 2),
        ("hogwild", 1, 0), ("hogwild", 2, 0)]
    assert len(runs) == 14


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
