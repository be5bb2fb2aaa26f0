"""`downpour bench comm` runs real servers (plain and CURVE) and raw pyzmq processes and
reports its figures for every transport; its temporary keys and sockets are removed. Its
sparse contenders read the rows a table of each key's owner holds."""

import json
import multiprocessing

import numpy as np
import pytest

from downpour.bench import sparse
from downpour.common.nn.layout import owners
from downpour.ps.sparse import make_tables
from downpour.ps.table import initial_rows

MS = ("downpour_ms", "curve_ms", "work_ms", "work_curve_ms", "bare_ms")
GB_S = ("downpour_gb_s", "curve_gb_s", "work_gb_s", "work_curve_gb_s", "bare_gb_s")
RATIOS = ("ratio", "work_ratio", "curve_ratio", "raw_curve_ratio", "curve_work_ratio")
SPARSE_HEAD = ["keys", "S", "tr"] + ["downpour", "raw", "keys/s", "MB/s", "kept"] * 2


def test_bench_comm_json(downpour, tmp_path):
    scratch = tmp_path / "tmp"             # the benchmark's temporary folder (keys, ipc sockets)
    scratch.mkdir()
    r = downpour("bench", "comm", "--json", "--vectors", "mlp", "--shards", "1,2", "--repeats", "3",
                 "--transports", "ipc,tcp", env={"TMPDIR": str(scratch)})
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(row["vector"], row["shards"], row["transport"]) for row in rows] == [
        (1863690, 1, "ipc"), (1863690, 1, "tcp"), (1863690, 2, "ipc"), (1863690, 2, "tcp")]
    for row in rows:
        assert row["pieces"] >= row["shards"]
        for field in MS + GB_S + RATIOS:
            assert row[field] > 0, (field, row)
        # each ratio is the throughput kept: the reference's time over the contender's
        assert row["work_ratio"] == pytest.approx(row["work_ms"] / row["downpour_ms"])
        assert row["curve_ratio"] == pytest.approx(row["downpour_ms"] / row["curve_ms"])
        assert row["raw_curve_ratio"] == pytest.approx(row["work_ms"] / row["work_curve_ms"])
    assert list(scratch.iterdir()) == []   # the keys went with the run


def test_bench_comm_table(downpour):
    r = downpour("bench", "comm", "--vectors", "mlp", "--shards", "1", "--repeats", "1",
                 "--transports", "tcp")
    assert r.returncode == 0, r.stderr
    head, row = r.stdout.splitlines()[3:5]
    assert head.split() == ["vector", "S", "tr", "pieces", "downpour", "curve", "work", "work+c",
                            "bare", "GB/s", "ratio", "work", "curve", "raw", "c", "c/w"]
    assert row.split()[:4] == ["1,863,690", "1", "tcp", "2"]


def test_bench_comm_sparse_json(downpour, tmp_path):
    scratch = tmp_path / "tmp"             # the benchmark's temporary folder (ipc sockets)
    scratch.mkdir()
    r = downpour("bench", "comm", "--json", "--vectors", "sparse", "--shards", "1,2,4", "--repeats", "2",
                 "--sparse-keys", "1000", "--transports", "ipc,tcp", env={"TMPDIR": str(scratch)})
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    # 4 servers: more than the bias's 2 floats; two of them hold tables only
    assert [(row["keys"], row["dim"], row["shards"], row["transport"]) for row in rows] == [
        (1000, 17, s, tr) for s in (1, 2, 4) for tr in ("ipc", "tcp")]
    wire = 1000 * (8 + 4 * 17)             # bytes a call carries: keys and rows, both ways
    for row in rows:
        for op in ("pull", "push"):
            for c in ("downpour", "raw"):
                seconds = row[f"{c}_{op}_ms"] / 1e3
                assert seconds > 0, (c, op, row)
                assert row[f"{c}_{op}_keys_s"] == pytest.approx(1000 / seconds)
                assert row[f"{c}_{op}_mb_s"] == pytest.approx(wire / seconds / 1e6)
            assert row[f"{op}_ratio"] == pytest.approx(row[f"raw_{op}_ms"] / row[f"downpour_{op}_ms"])
    assert list(scratch.iterdir()) == []   # the sockets went with the run


def test_bench_comm_dense_and_sparse_tables(downpour):
    r = downpour("bench", "comm", "--vectors", "mlp", "sparse", "--shards", "1", "--repeats", "1",
                 "--sparse-keys", "500", "--transports", "tcp")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[4].split()[:4] == ["1,863,690", "1", "tcp", "2"]        # the dense table first
    start = next(i for i, line in enumerate(lines) if line.startswith("downpour bench comm, sparse"))
    head, row = lines[start + 3:start + 5]
    assert head.split() == SPARSE_HEAD
    assert row.split()[:3] == ["500", "1", "tcp"]


def test_sparse_contenders_read_the_rows_of_a_table_per_owner():
    """Through 2 servers each, downpour and raw pyzmq read each key's initial row, then
    the row a local table of its owner holds after the same push; their processes end."""
    cfg = sparse.sparse_config(2)
    rng = np.random.default_rng(1)
    keys = sparse.random_keys(rng, 500)
    grads = rng.standard_normal((500, 17), dtype=np.float32)
    where = owners(keys, 2)
    assert set(where) == {0, 1}                            # both servers hold some of the keys
    initial = initial_rows(keys, 17, cfg.embed_init, cfg.seed)
    expected = np.empty((500, 17), np.float32)
    for s in range(2):
        table, mine = make_tables(cfg, s).tables[0], where == s
        table.pull(keys[mine])
        table.push(keys[mine], grads[mine])
        expected[mine] = table.pull(keys[mine])
    assert (expected != initial).all()                     # the push moved every value
    with sparse.sparse_contenders(cfg, "ipc") as contenders:
        assert list(contenders) == ["downpour", "raw"]
        for lookups in contenders.values():
            np.testing.assert_array_equal(lookups.pull(keys), initial)
            lookups.push(keys, grads)
            np.testing.assert_array_equal(lookups.pull(keys), expected)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("args, flag", [
    (("--shards", "0"), "--shards"),
    (("--sparse-keys", "0"), "--sparse-keys must be in [1, 1048576]"),
    (("--transports", "udp"), "--transports='udp': expected names from ipc, tcp"),
    (("--transports", ""), "--transports='': expected names from ipc, tcp"),
    (("--repeats", "0"), "--repeats must be positive"),
])
def test_bench_comm_bad_arguments(downpour, args, flag):
    r = downpour("bench", "comm", "--vectors", "mlp", *args)
    assert r.returncode == 2 and flag in r.stderr, r.stderr
    assert r.stdout == ""


def test_bench_comm_fill_grows_the_tables_and_a_cap_holds_them(downpour):
    """--fill streams new keys: every key makes a row on its owner; with a cap each server
    keeps that many rows, evicting the rest, and the client's memory does not grow."""
    r = downpour("bench", "comm", "--fill", "60000", "--shards", "2", "--transports", "ipc",
                 "--sparse-keys", "4000", "--json")
    assert r.returncode == 0, r.stderr
    grown = json.loads(r.stdout)
    assert sum(grown["end"]["server_rows"]) == 60000 and grown["dim"] == 17
    assert min(grown["end"]["server_rows"]) > 25000                # both servers own keys
    r = downpour("bench", "comm", "--fill", "60000", "--shards", "2", "--transports", "ipc",
                 "--sparse-keys", "4000", "--table-max-rows", "10000", "--json")
    assert r.returncode == 0, r.stderr
    capped = json.loads(r.stdout)
    assert capped["end"]["server_rows"] == [10000, 10000]
    assert sum(capped["end"]["evictions"]) == 60000 - 20000
    assert capped["end"]["table_mb"] < grown["end"]["table_mb"]
    assert capped["client_peak_rss_mb"] < 300
