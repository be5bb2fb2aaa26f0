"""`downpour bench comm` runs real servers and echo processes and reports its figures."""

import json


def test_bench_comm_json(downpour):
    r = downpour("bench", "comm", "--json", "--vectors", "mlp", "--shards", "1,2", "--repeats", "5")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(row["vector"], row["shards"]) for row in rows] == [(1863690, 1), (1863690, 2)]
    for row in rows:
        assert row["downpour_ms"] > 0 and row["bare_ms"] > 0 and row["ratio"] > 0
        assert row["pieces"] >= row["shards"] and row["transport"] == "ipc"


def test_bench_comm_bad_arguments(downpour):
    r = downpour("bench", "comm", "--shards", "0")
    assert r.returncode == 2 and "--shards" in r.stderr
