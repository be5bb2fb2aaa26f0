"""`downpour bench core` runs and reports every figure it promises (timings are not asserted)."""

import json


def test_bench_core_json(downpour):
    r = downpour("bench", "core", "--json", "--no-torch", "--batch-sizes", "8", "--repeats", "10",
                 "--adam-size", "100000")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [(s["optimizer"], s["batch"]) for s in out["step"]] == [("sgd", 8), ("adam", 8)]
    assert all(s["numpy_ms"] > 0 and "ratio" not in s for s in out["step"])
    assert out["adam"]["elements"] == 100000 and out["adam"]["numpy_gb_s"] > 0
    assert out["copy"]["gb_s"] > 0 and out["threads"] == 1 and out["torch"] is None


def test_bench_core_table_and_bad_arguments(downpour):
    r = downpour("bench", "core", "--no-torch", "--batch-sizes", "4", "--repeats", "10",
                 "--adam-size", "1000")
    assert r.returncode == 0 and "step adam, batch 4" in r.stdout and "torch not installed" in r.stdout
    r = downpour("bench", "core", "--batch-sizes", "x")
    assert r.returncode == 2 and "--batch-sizes" in r.stderr
