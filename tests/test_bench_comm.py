"""`downpour bench comm` runs real servers (plain and CURVE) and raw pyzmq processes and
reports its figures for every transport; its temporary keys and sockets are removed."""

import json

import pytest

MS = ("downpour_ms", "curve_ms", "work_ms", "work_curve_ms", "bare_ms")
GB_S = ("downpour_gb_s", "curve_gb_s", "work_gb_s", "work_curve_gb_s", "bare_gb_s")
RATIOS = ("ratio", "work_ratio", "curve_ratio", "raw_curve_ratio", "curve_work_ratio")


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


@pytest.mark.parametrize("args, flag", [
    (("--shards", "0"), "--shards"),
    (("--transports", "udp"), "--transports='udp': expected names from ipc, tcp"),
    (("--transports", ""), "--transports='': expected names from ipc, tcp"),
    (("--repeats", "0"), "--repeats must be positive"),
])
def test_bench_comm_bad_arguments(downpour, args, flag):
    r = downpour("bench", "comm", "--vectors", "mlp", *args)
    assert r.returncode == 2 and flag in r.stderr, r.stderr
    assert r.stdout == ""
