"""Compression on the wire, as the servers and workers use it: compressed pushes applied as
what they decode to, topk pulls that keep each worker's copy exact, and runs that train
with codecs both ways. The codecs themselves: tests/test_codec.py."""

import json
from dataclasses import replace

import numpy as np
import pytest

from downpour.common.config import Config
from downpour.common.nn.model import ModelSpec, model_layout
from downpour.common.wire import codec, protocol
from downpour.ps.piece import PieceState

SPEC = ModelSpec(n_inputs=6, n_outputs=3, hidden=(5,))          # 53 parameters
ASYNC = Config(mode="async", workers=1, shards=1, optimizer="sgd", lr=0.1)
SMALL = ["--synthetic", "2000", "--hidden", "32", "--epochs", "3", "--batch-size", "50",
         "--progress", "none", "--eval-every", "0"]


def make_piece(cfg: Config = ASYNC) -> PieceState:
    lo, hi = model_layout(SPEC).shard_ranges(cfg.shards)[0]
    return PieceState(cfg, SPEC, 0, lo, hi)


def compressed(op: str, seq: int, fields: dict, parts: list, n: int, **header) -> list[bytes]:
    """The frames of a request whose payload a codec encoded."""
    return [*protocol.encode({"op": op, "node": "worker-0", "seq": seq, "piece": 0, **header,
                              **fields, "n": n}), *map(bytes, parts)]


def reply(replies: list) -> tuple[dict, list]:
    assert len(replies) == 1, replies
    return protocol.decode(replies[0].frames)


@pytest.mark.parametrize("text", ["fp16", "topk:0.3", "onebit"])
def test_a_compressed_push_applies_what_it_decodes_to(text):
    piece, reference = make_piece(), make_piece()
    n = piece.hi - piece.lo
    grad = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    fields, parts = codec.parse(text).encode(grad)
    header, _ = reply(piece.handle(b"w", compressed("push", 1, fields, parts, n, clock=0)))
    assert header["op"] == "ok", header
    sent = codec.dense({**fields, "n": n}, parts, np.empty(n, np.float32))
    reference.handle(b"w", protocol.encode({"op": "push", "node": "worker-0", "seq": 1,
                                            "piece": 0, "clock": 0}, sent))
    assert np.array_equal(piece.params, reference.params) and piece.version == 1


def test_a_malformed_compressed_push_changes_nothing():
    piece = make_piece()
    n, before = piece.hi - piece.lo, piece.params.copy()
    indices = np.array([5, 3], np.uint32)                      # not increasing
    values = np.ones(2, np.float32)
    header, _ = reply(piece.handle(b"w", compressed("push", 1, {"codec": "topk", "k": 2},
                                                    [indices, values], n, clock=0)))
    assert header["op"] == "error" and header["code"] == protocol.E_PAYLOAD
    assert np.array_equal(piece.params, before) and piece.version == 0


def pull_topk(piece: PieceState, seq: int, copy: np.ndarray, text: str = "topk:0.2") -> list:
    """A topk pull by worker-0, its reply applied to `copy` (the worker's); the reply frames."""
    replies = piece.handle(b"w", protocol.encode({"op": "pull", "node": "worker-0", "seq": seq,
                                                  "piece": 0, "meta": {"codec": text}}))
    header, payload = reply(replies)
    assert header["op"] == "ok", header
    if "codec" in header:
        codec.apply(header, payload, copy)
    else:                                                      # the first: the whole piece
        protocol.copy_payload(protocol.payload(header, payload, copy.size), copy)
    return replies[0].frames


def test_topk_pulls_keep_the_workers_copy_exact_and_send_everything_in_the_end():
    cfg = replace(ASYNC, pull_codec="topk:0.2")
    piece = make_piece(cfg)
    n = piece.hi - piece.lo
    copy = np.zeros(n, np.float32)
    first = pull_topk(piece, 1, copy)
    assert np.array_equal(copy, piece.params) and len(first) > 1     # whole, uncompressed
    rng = np.random.default_rng(1)
    seq = 1
    for _ in range(5):                                         # the weights move; pulls follow
        seq += 1
        grad = rng.standard_normal(n).astype(np.float32)
        piece.handle(b"w", protocol.encode({"op": "push", "node": "worker-0", "seq": seq,
                                            "piece": 0, "clock": piece.version}, grad))
        seq += 1
        pull_topk(piece, seq, copy)
        assert np.array_equal(copy, piece._copies[0].params)   # bit for bit the server's record
        assert not np.array_equal(copy, piece.params)          # 20% a pull: not all sent yet
    for _ in range(6):                                         # still weights: the rest arrives
        seq += 1
        pull_topk(piece, seq, copy)
    assert np.array_equal(copy, piece.params)


def test_a_retried_topk_pull_gets_the_same_reply_and_moves_the_copy_once():
    piece = make_piece(replace(ASYNC, pull_codec="topk:0.2"))
    n = piece.hi - piece.lo
    copy = np.zeros(n, np.float32)
    pull_topk(piece, 1, copy)
    piece.handle(b"w", protocol.encode({"op": "push", "node": "worker-0", "seq": 2, "piece": 0,
                                        "clock": 0}, np.ones(n, np.float32)))
    first = pull_topk(piece, 3, copy)
    record = piece._copies[0].params.copy()
    again = pull_topk(piece, 3, copy.copy())                   # the same seq: a retry
    assert [bytes(f) for f in again] == [bytes(f) for f in first]
    assert np.array_equal(piece._copies[0].params, record)


def test_a_pull_asking_another_codec_than_the_runs_is_refused():
    piece = make_piece(replace(ASYNC, pull_codec="fp16"))
    header, _ = reply(piece.handle(b"w", protocol.encode(
        {"op": "pull", "node": "worker-0", "seq": 1, "piece": 0, "meta": {"codec": "topk:0.5"}})))
    assert header["op"] == "error" and header["code"] == protocol.E_MALFORMED


def end_of(path):
    return json.loads(path.read_text().splitlines()[-1])


def codec_run(downpour, tmp_path, mode, *flags, codecs, warmup):
    """`downpour train` of SMALL with (push, pull) `codecs` and a warm-up of `warmup` epochs;
    the end record of the run, which must succeed."""
    push, pull = codecs
    r = downpour("train", "--mode", mode, *flags, *SMALL, "--push-codec", push, "--pull-codec",
                 pull, "--codec-warmup-epochs", warmup, "--metrics", "m.jsonl")
    assert r.returncode == 0, r.stderr
    return end_of(tmp_path / "m.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("mode, push, pull", [("async", "topk:0.05", "topk:0.05"),
                                              ("sync", "onebit", "fp16"),
                                              ("ssp", "fp16", "topk:0.1")])
def test_runs_with_codecs_both_ways_train_every_sample(downpour, tmp_path, mode, push, pull):
    end = codec_run(downpour, tmp_path, mode, "--workers", 2, "--shards", 2, codecs=(push, pull),
                    warmup=0)
    # uncompressed, these 3 epochs reach 0.42 (chance: 0.1); topk 5% both ways 0.34
    assert end["samples"] == end["samples_asked"] and end["test_accuracy"] > 0.25, end
    assert end["bytes_pushed_per_sample"] + end["bytes_pulled_per_sample"] == pytest.approx(
        end["bytes_per_sample"])
    # topk:R sends 8 bytes (index, value) per entry: 1 / 2R at best; a worker's first pull
    # is the whole piece, so pulls get less
    assert end["push_compression"] >= {"topk:0.05": 9.9, "onebit": 30, "fp16": 1.99}[push], end
    assert end["pull_compression"] >= {"topk:0.05": 5, "topk:0.1": 3, "fp16": 1.9}[pull], end


def test_sync_with_a_backup_worker_and_codecs_both_ways_finishes(downpour, tmp_path):
    end = codec_run(downpour, tmp_path, "sync", "--workers", 3, "--backup", 1,
                    codecs=("topk:0.05", "topk:0.05"), warmup=0)
    # 40 versions of 150 samples: uncompressed, this reaches 0.23 (chance: 0.1); topk 0.20
    assert end["test_accuracy"] > 0.15 and end["push_compression"] >= 9.9, end


def test_a_warm_up_sends_the_first_epochs_uncompressed(downpour, tmp_path):
    """1 of 3 epochs uncompressed, then topk 5% (10x): pushes come to 3 / (1 + 2/10) = 2.5x."""
    end = codec_run(downpour, tmp_path, "async", "--workers", 2, "--shards", 2,
                    codecs=("topk:0.05", "topk:0.05"), warmup=1)
    assert 2.3 <= end["push_compression"] <= 2.7 and 1.5 <= end["pull_compression"] < 2.7, end


@pytest.mark.parametrize("flags, said", [
    (["--push-codec", "topk:2"], "push_codec"),
    (["--push-codec", "zip"], "push_codec"),
    (["--pull-codec", "onebit"], "onebit sends signs"),
])
def test_a_bad_codec_is_refused_before_anything_starts(downpour, flags, said):
    r = downpour("train", "--mode", "async", *flags)
    assert r.returncode == 2 and said in r.stderr, r.stderr


def test_codecs_are_for_cluster_modes(downpour):
    r = downpour("train", "--mode", "single", "--push-codec", "fp16")
    assert r.returncode == 2 and "push_codec is a setting of --mode" in r.stderr, r.stderr
