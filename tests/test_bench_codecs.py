"""`downpour bench codecs` runs and reports every figure it promises (timings are not asserted)."""

import json


def test_bench_codecs_json_has_a_row_per_codec_and_the_ratios(downpour):
    r = downpour("bench", "codecs", "--json", "--n", "20000", "--repeats", "2")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    rows = {row["codec"]: row for row in out["rows"]}
    assert out["n"] == 20000 and list(rows) == ["copy", "none", "fp16", "topk:0.01",
                                                 "topk:0.001", "onebit"]
    assert all(row["encode_ms"] > 0 and row["decode_ms"] > 0 for row in rows.values())
    assert rows["fp16"]["ratio"] == 2.0 and rows["onebit"]["ratio"] > 30
    assert 49 < rows["topk:0.01"]["ratio"] <= 50      # 8 bytes per entry sent: 1 / (2 x 0.01)


def test_bench_codecs_refuses_a_bad_size(downpour):
    r = downpour("bench", "codecs", "--n", "0")
    assert r.returncode == 2 and "--n" in r.stderr, r.stderr
