"""Click-through data: keys, the Criteo parser, chunk offsets, the metrics (common/ctr.py),
and the planted-model generator with its command (app/synth.py, `downpour synth ctr`).

The parser is checked against a plain Python reference (split on tabs, int(), int(.., 16),
splitmix64 on Python integers), the metrics against hand computations and pair counts."""

import json
import math
import os

import numpy as np
import pytest
from hashref import M64
from hashref import splitmix64 as mix64

from downpour import synth
from downpour.common import ctr
from downpour.common.errors import ConfigError, DataError

pytestmark = pytest.mark.timeout(60)

def ref_key(field: int, text: str) -> int:
    if text == "":
        return mix64(mix64(field + ctr.MISSING_FIELD)) & (M64 >> 1)
    if field < ctr.N_INT:
        x = int(text)
        v = x if x <= 2 else 3 + math.floor(2 * math.log2(x))
    else:
        v = int(text, 16)
    return mix64(mix64(field) ^ (v & M64)) & (M64 >> 1)


def ref_parse(text: str) -> tuple[list[float], list[list[int]]]:
    labels, keys = [], []
    for line in text.splitlines():
        fields = line.split("\t")
        labels.append(float(fields[0]))
        keys.append([ref_key(f, v) for f, v in enumerate(fields[1:])])
    return labels, keys


def line(label="0", ints=("",) * 13, cats=("",) * 26) -> str:
    return "\t".join([label, *ints, *cats])


INTS = ("5", "-1", "", "0", "1382", "4", "15", "2", "181", "1", "2", "", "123456789012345678")
CATS = ("68fd1e64", "80e26c9b", "fb936136", "7b4723c4", "25c83c98", "", "1f89b562", "a73ee510",
        "a8cd5504", "b2cb9c98", "37c9c164", "2824a5f6", "1adce6ef", "8ba8b39a", "891b62e7",
        "e5ba7672", "f54016b9", "21ddcdc9", "b1252a9d", "07b5194c", "", "3a171ecb", "c5c50484",
        "0123456789ABCDEF", "0", "ffffffffffffffff")
LINES = [line("1", INTS, CATS), line(), line("0", ("-123456789012345678",) + INTS[1:], CATS[::-1]),
         line("1", ("3",) * 13, ("7",) * 26)]


def write(tmp_path, text: str, name="d.tsv"):
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


def read_all(path):
    return ctr.read_chunk(path, 0, os.path.getsize(path))


# ---------------------------------------------------------------------------- keys


def test_field_keys_are_pinned():
    """A change of the formula changes every table's keys: it must be deliberate."""
    assert ctr.field_keys(0, np.array([0, 1, -1, 1000])).tolist() == [
        2812178212566171247, 627405149472732430, 3303439293501059696, 1598041676984150431]
    assert ctr.field_keys(13, np.array([0x68fd1e64, 0], np.uint64)).tolist() == [
        6420534968047154062, 49193664019364436]
    assert ctr.field_keys(38, np.array([M64], np.uint64)).tolist() == [3752406113129884624]
    missing = ctr.field_keys(13, np.zeros(2, np.uint64), missing=np.array([True, False]))
    assert missing.tolist() == [5631851989651180946, 49193664019364436]


def test_field_keys_match_the_reference_and_are_non_negative():
    rng = np.random.default_rng(0)
    ints = rng.integers(-10**6, 10**12, 200)
    cats = rng.integers(0, 2**64, 200, dtype=np.uint64)
    for f in (0, 7, 12):
        keys = ctr.field_keys(f, ints)
        assert keys.dtype == np.int64
        assert keys.tolist() == [ref_key(f, str(x)) for x in ints]
    for f in (13, 38):
        keys = ctr.field_keys(f, cats)
        assert keys.tolist() == [ref_key(f, format(int(x), "x")) for x in cats]
        assert np.array_equal(keys, ctr.field_keys(f, cats.view(np.int64)))   # same bits
    big = ctr.field_keys(20, rng.integers(0, 2**64, 100_000, dtype=np.uint64))
    assert big.min() >= 0 and big.max() > 2**62        # non-negative, and all 63 bits used


def test_fields_and_missing_values_get_keys_of_their_own():
    values = np.arange(1000, dtype=np.uint64)
    keys = [ctr.field_keys(f, values) for f in range(ctr.N_INT, ctr.FIELDS)]
    assert len(np.unique(np.concatenate(keys))) == 1000 * ctr.N_CAT
    missing = [int(ctr.field_keys(f, np.zeros(1, np.uint64), np.ones(1, bool))[0])
               for f in range(ctr.FIELDS)]
    zeros = [int(ctr.field_keys(f, np.zeros(1, np.uint64))[0]) for f in range(ctr.FIELDS)]
    assert len(set(missing) | set(zeros)) == 2 * ctr.FIELDS


def test_field_keys_refuses_a_field_out_of_range():
    with pytest.raises(ConfigError, match="field 39 is not a key field"):
        ctr.field_keys(ctr.FIELDS, np.zeros(1))


def test_int_bins_half_octaves():
    x = np.array([-5, -1, 0, 1, 2, 3, 4, 5, 6, 8, 1000, 2**40])
    assert ctr.int_bins(x).tolist() == [-5, -1, 0, 1, 2, 6, 7, 7, 8, 9, 22, 83]
    assert ctr.field_keys(3, np.array([4]))[0] == ctr.field_keys(3, np.array([5]))[0]  # one bin


# ---------------------------------------------------------------------------- parsing


def test_hand_written_lines_match_the_reference(tmp_path):
    text = "\n".join(LINES)                                 # the last line without its newline
    batch = read_all(write(tmp_path, text))
    labels, keys = ref_parse(text)
    assert batch.labels.dtype == np.float32 and batch.labels.tolist() == labels
    assert batch.keys.dtype == np.int64 and batch.keys.shape == (4, ctr.FIELDS)
    assert batch.keys.tolist() == keys
    assert batch.keys[2, 0] == ctr.field_keys(0, np.array([-123456789012345678]))[0]
    assert batch.keys[0, 13 + 23] == ctr.field_keys(36, np.array([0x0123456789ABCDEF]))[0]
    assert batch.keys[1, 5] == ctr.field_keys(5, np.zeros(1), np.ones(1, bool))[0]
    assert np.array_equal(read_all(write(tmp_path, text + "\n", "nl.tsv")).keys, batch.keys)


def test_crlf_lines_read_as_lf(tmp_path):
    lf = read_all(write(tmp_path, "\n".join(LINES) + "\n"))
    crlf = read_all(write(tmp_path, "\r\n".join(LINES) + "\r\n", "crlf.tsv"))
    assert np.array_equal(lf.keys, crlf.keys) and np.array_equal(lf.labels, crlf.labels)


def test_a_large_random_file_matches_the_reference(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(3000):
        ints = ["" if rng.random() < 0.2 else str(int(rng.integers(-50, 10**int(rng.integers(1, 19)))))
                for _ in range(13)]
        cats = ["" if rng.random() < 0.1 else format(int(rng.integers(0, 2**int(rng.integers(1, 64)))), "x")
                for _ in range(26)]
        rows.append(line(str(int(rng.random() < 0.3)), ints, cats))
    text = "\n".join(rows) + "\n"
    batch = read_all(write(tmp_path, text))
    labels, keys = ref_parse(text)
    assert batch.labels.tolist() == labels and batch.keys.tolist() == keys


@pytest.mark.parametrize("bad, message", [
    (line("1", INTS, CATS[:-1]), "line 2 of the chunk at byte 0: 38 tabs (39 fields); expected 39 tabs"),
    (line("1", INTS, CATS) + "\textra", "line 2 of the chunk at byte 0: 40 tabs"),
    ("", "line 2 of the chunk at byte 0: 0 tabs"),
    (line("1", INTS, ("68fd1e6g",) + CATS[1:]), "line 2 of the chunk at byte 0: field C1 is '68fd1e6g'; "
                                                 "expected hex digits"),
    (line("1", INTS, CATS[:25] + ("12345678901234567",)), "line 2 of the chunk at byte 0: field C26 is "
                                                          "'12345678901234567'; expected at most 16"),
    (line("2", INTS, CATS), "line 2 of the chunk at byte 0: field label is '2'; expected 0 or 1"),
    (line("", INTS, CATS), "field label is ''; expected 0 or 1"),
    (line("1", ("1.5",) + INTS[1:], CATS), "line 2 of the chunk at byte 0: field I1 is '1.5'; expected a "
                                           "decimal integer"),
    (line("1", INTS[:4] + ("-",) + INTS[5:], CATS), "field I5 is '-'; expected a decimal integer"),
    (line("1", INTS[:4] + ("5-",) + INTS[5:], CATS), "field I5 is '5-'"),
    (line("1", INTS[:12] + ("1" * 19,), CATS), "field I13 is '1111111111111111111'; expected a decimal "
                                               "integer of at most 18 digits"),
    (line("1", INTS, CATS).replace("68fd", "68\x00d"), "line 2 of the chunk at byte 0: control byte 0x00"),
])
def test_malformed_lines_name_the_line_and_what_was_expected(tmp_path, bad, message):
    path = write(tmp_path, "\n".join([LINES[0], bad, LINES[1]]) + "\n")
    with pytest.raises(DataError, match="d.tsv: ") as e:
        read_all(path)
    assert message in str(e.value)


@pytest.mark.parametrize("char", ["/", ":", "@", "G", "`", "g", " ", "\r", "\u00e9"])
def test_every_byte_next_to_a_digit_range_is_refused(tmp_path, char):
    """The 8-characters-at-once checks are exact at each end of 0-9, a-f and A-F."""
    for position in range(8):
        hex_value = "1234abcd"[:position] + char + "1234abcd"[position + 1:]
        path = write(tmp_path, line("1", INTS, (hex_value,) + CATS[1:]))
        with pytest.raises(DataError, match="field C1 is .*; expected hex digits"):
            read_all(path)
        number = "12345678"[:position] + char + "12345678"[position + 1:]
        path = write(tmp_path, line("1", (number,) + INTS[1:], CATS))
        with pytest.raises(DataError, match="field I1 is .*; expected a decimal integer"):
            read_all(path)


def test_line_numbers_count_within_the_chunk_across_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(ctr, "_PIECE_BYTES", 1000)          # many pieces per chunk
    text = "\n".join(LINES * 20 + ["0\t1"] + LINES) + "\n"
    path = write(tmp_path, text)
    with pytest.raises(DataError, match="line 81 of the chunk at byte 0: 1 tabs"):
        read_all(path)
    good = "\n".join(LINES * 20) + "\n"
    assert read_all(write(tmp_path, good, "g.tsv")).keys.tolist() == ref_parse(good)[1]


def test_a_range_not_on_line_boundaries_is_refused(tmp_path):
    path = write(tmp_path, "\n".join(LINES) + "\n")
    size = os.path.getsize(path)
    with pytest.raises(DataError, match="byte 5 is not the start of a line"):
        ctr.read_chunk(path, 5, size)
    with pytest.raises(DataError, match=f"byte {size - 3} is not the end of a line"):
        ctr.read_chunk(path, 0, size - 3)
    with pytest.raises(DataError, match="not inside the file"):
        ctr.read_chunk(path, 0, size + 1)
    empty = ctr.read_chunk(path, size, size)
    assert empty.labels.shape == (0,) and empty.keys.shape == (0, ctr.FIELDS)


# ---------------------------------------------------------------------------- index


@pytest.mark.parametrize("chunk_lines", [1, 7, 100, 1000, 5000])
@pytest.mark.parametrize("final_newline", [True, False])
def test_chunks_cover_the_file_and_read_as_the_whole(tmp_path, monkeypatch, chunk_lines, final_newline):
    monkeypatch.setattr(ctr, "_BLOCK_BYTES", 4096)          # chunks cross many blocks
    text = "\n".join((LINES * 250)[:999]) + ("\n" if final_newline else "")
    path = write(tmp_path, text)
    off = ctr.index(path, chunk_lines)
    assert off.dtype == np.int64 and off[0] == 0 and off[-1] == len(text)
    assert (np.diff(off) > 0).all() and len(off) - 1 == math.ceil(999 / chunk_lines)
    data = text.encode()
    lines = [data[a:b].count(b"\n") + (b == len(data) and not final_newline)
             for a, b in zip(off[:-1], off[1:])]
    assert lines[:-1] == [chunk_lines] * (len(lines) - 1) and sum(lines) == 999
    whole = read_all(path)
    parts = [ctr.read_chunk(path, int(a), int(b)) for a, b in zip(off[:-1], off[1:])]
    assert np.array_equal(np.concatenate([p.keys for p in parts]), whole.keys)
    assert np.array_equal(np.concatenate([p.labels for p in parts]), whole.labels)
    split = ctr.CtrSplit(path, chunk_lines)
    assert len(split) == split.lines == 999 and split.chunks == len(off) - 1
    assert np.array_equal(split.read(split.chunks - 1).keys, parts[-1].keys)


def test_index_refuses_an_empty_or_missing_file_and_a_bad_chunk_size(tmp_path):
    with pytest.raises(DataError, match="e.tsv: the file is empty"):
        ctr.index(write(tmp_path, "", "e.tsv"), 10)
    with pytest.raises(DataError, match="no such file"):
        ctr.index(tmp_path / "nowhere.tsv", 10)
    with pytest.raises(ConfigError, match="chunk_lines=0"):
        ctr.index(write(tmp_path, LINES[0]), 0)


# ---------------------------------------------------------------------------- metrics


def test_logloss_by_hand():
    assert ctr.logloss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert ctr.logloss([1, 0], [1.0, 0.0]) == pytest.approx(-math.log(1 - 1e-7))    # clipped
    assert ctr.logloss([1], [0.0]) == pytest.approx(-math.log(1e-7))
    with pytest.raises(DataError, match="2 labels and 3 predictions"):
        ctr.logloss([1, 0], [0.5, 0.5, 0.5])


def test_auc_by_hand():
    assert ctr.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert ctr.auc([0, 1], [0.5, 0.5]) == 0.5                                 # a tie is one half
    # pairs (pos, neg): (.2,.2) 1/2, (.2,.1) 1, (.9,.2) 1, (.9,.1) 1
    assert ctr.auc([0, 1, 1, 0], [0.2, 0.2, 0.9, 0.1]) == pytest.approx(3.5 / 4)
    assert ctr.auc([1, 1, 0], [0.1, 0.2, 0.3]) == 0.0


def test_auc_counts_pairs():
    rng = np.random.default_rng(2)
    y = rng.random(300) < 0.3
    p = rng.integers(0, 20, 300) / 20                        # many ties
    pos, neg = p[y], p[~y]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert ctr.auc(y, p) == pytest.approx(pairs / (len(pos) * len(neg)), rel=1e-12)


def test_auc_of_one_class_is_refused():
    with pytest.raises(DataError, match="AUC needs both classes; the labels are all 0"):
        ctr.auc([0, 0], [0.1, 0.2])


# ---------------------------------------------------------------------------- synth


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth")
    return folder, synth.write_ctr(folder, 5000, 7)


def test_synth_writes_the_rows_and_the_truth(planted):
    folder, truth = planted
    assert json.loads((folder / "truth.json").read_text()) == truth
    train, test = ctr.CtrSplit(folder / "train.tsv", 1000), ctr.CtrSplit(folder / "test.tsv", 1000)
    assert (len(train), len(test)) == (5000, 1000) == (truth["rows"], truth["test_rows"])
    batch = read_all(folder / "train.tsv")
    assert batch.labels.mean() == pytest.approx(truth["train_label_rate"])
    assert abs(truth["train_label_rate"] - 0.25) < 0.03             # the bias sets the mean to 0.25
    assert abs(truth["test_label_rate"] - 0.25) < 0.06              # 1000 rows: 4 sd
    assert truth["floor_logloss"] < truth["base_logloss"] - 0.1
    # 5,000 rows leave most of the large fields' values unseen: far from the floor
    assert truth["floor_logloss"] + 0.05 < truth["seen_logloss"] < truth["base_logloss"]
    assert 0.5 < truth["floor_auc"] < 1
    rate = truth["test_label_rate"]
    assert truth["base_logloss"] == pytest.approx(-(rate * math.log(truth["train_label_rate"]) + (1 - rate)
                                                    * math.log(1 - truth["train_label_rate"])))
    assert truth["params"]["cardinalities"][0] == 10 and truth["params"]["cardinalities"][-1] == 10**6


def test_synth_text_follows_the_planted_layout(planted):
    folder, _ = planted
    rows = [r.split("\t") for r in (folder / "train.tsv").read_text().splitlines()]
    assert all(len(r) == 40 for r in rows)
    ints = np.array([[f == "" for f in r[1:14]] for r in rows])
    assert abs(ints.mean() - synth.INT_MISSING) < 0.02              # missing with p = 0.1
    assert all(int(f) >= 0 for r in rows for f in r[1:14] if f)
    cats = [r[14:] for r in rows]
    assert all(len(f) == 8 and int(f, 16) >= 0 for r in cats for f in r)
    for i in (0, 5, 10):                                    # never more values than the field has
        assert len({r[i] for r in cats}) <= synth.CARDINALITIES[i]
    assert len({r[0] for r in cats}) == 10                  # 10 values, Zipf: all seen in 5000 rows


def test_synth_is_deterministic_per_seed(planted, tmp_path):
    folder, truth = planted
    again = synth.write_ctr(tmp_path / "a", 5000, 7)
    other = synth.write_ctr(tmp_path / "b", 5000, 8)
    for name in ("train.tsv", "test.tsv", "truth.json"):
        assert (tmp_path / "a" / name).read_bytes() == (folder / name).read_bytes()
    assert again == truth
    assert (tmp_path / "b" / "train.tsv").read_bytes() != (folder / "train.tsv").read_bytes()
    assert other["bias"] != truth["bias"]
    assert not list((tmp_path / "a").glob(".*.tmp"))        # no temporary left behind


def test_synth_refuses_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="--rows 4: expected a whole number >= 5"):
        synth.write_ctr(tmp_path, 4, 0)
    with pytest.raises(ConfigError, match="--seed -1"):
        synth.write_ctr(tmp_path, 10, -1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        synth.write_ctr(tmp_path / "file", 10, 0)
    assert not (tmp_path / "train.tsv").exists()


def test_synth_command(downpour, tmp_path):
    r = downpour("synth", "ctr", "out", "--rows", "400", "--seed", "3")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert r.stdout.split() == [os.path.join("out", n) for n in ("train.tsv", "test.tsv", "truth.json")]
    truth = json.loads((out / "truth.json").read_text())
    assert (truth["rows"], truth["test_rows"], truth["seed"]) == (400, 80, 3)
    assert len(read_all(out / "train.tsv").labels) == 400 and len(read_all(out / "test.tsv").labels) == 80
    assert f"the best possible test logloss is {truth['floor_logloss']:.4f}" in r.stderr
    r = downpour("synth", "ctr", "out", "--rows", "4")
    assert r.returncode == 2 and r.stderr.strip().endswith("expected a whole number >= 5 (the test "
                                                           "split gets rows // 5)")
