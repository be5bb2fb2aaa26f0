"""`downpour bench core` runs and reports every figure it promises (timings are not asserted)."""

import json


def test_bench_core_json(downpour):
    r = downpour("bench", "core", "--json", "--no-torch", "--batch-sizes", "8", "--repeats", "10",
                 "--adam-size", "100000")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [(s["model"], s["optimizer"], s["batch"]) for s in out["step"]] == [
        ("mlp", "sgd", 8), ("mlp", "adam", 8), ("cnn", "adam", 64), ("lstm", "adam", 64)]
    assert all(s["numpy_ms"] > 0 and "ratio" not in s for s in out["step"])
    assert out["adam"]["elements"] == 100000 and out["adam"]["numpy_gb_s"] > 0
    assert out["copy"]["gb_s"] > 0 and out["threads"] == 1 and out["torch"] is None


def test_bench_core_table_and_bad_arguments(downpour):
    r = downpour("bench", "core", "--no-torch", "--batch-sizes", "4", "--repeats", "10",
                 "--adam-size", "1000")
    assert r.returncode == 0 and "step mlp adam, batch 4" in r.stdout
    assert "step cnn adam, batch 64" in r.stdout and "step lstm adam, batch 64" in r.stdout
    assert "torch not installed" in r.stdout
    r = downpour("bench", "core", "--batch-sizes", "x")
    assert r.returncode == 2 and "--batch-sizes" in r.stderr
