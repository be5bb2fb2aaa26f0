"""Evaluation points: every `eval` record describes the weights it evaluated.

A piece counts the samples it has applied and keeps a copy of its weights at each
evaluation point (ps/piece.py); the scheduler evaluates those copies, so a record's
epoch, samples, updates and elapsed_s are the moment of the weights (common/metrics.py
states the rules these tests pin down).
"""

import json
from dataclasses import replace

import numpy as np
import pytest

from downpour.common.config import Config
from downpour.common.nn.model import ModelSpec, model_layout
from downpour.common.order import epoch_steps, eval_interval, steps_per_epoch
from downpour.common.wire import protocol
from downpour.ps.piece import SNAPSHOTS_KEPT, PieceState

SPEC = ModelSpec(n_inputs=6, n_outputs=3, hidden=(5,))          # 53 parameters
ASYNC = Config(mode="async", workers=2, shards=1, optimizer="sgd", lr=0.1)
SYNC = Config(mode="sync", workers=2, shards=1, optimizer="sgd", lr=0.1)
N = model_layout(SPEC).size


def make_piece(cfg: Config, eval_samples: int, **kwargs) -> PieceState:
    return PieceState(cfg, SPEC, 0, 0, N, eval_samples=eval_samples, **kwargs)


def send(state: PieceState, op: str, seq: int, payload=None, node="worker-0", **fields) -> list:
    """The decoded replies (header, parameters or None) to one request to the piece `state`."""
    frames = [bytes(f) for f in protocol.encode({"op": op, "node": node, "seq": seq, **fields},
                                                payload)]
    out = []
    for _, reply in state.handle(b"peer", frames):
        header, payload = protocol.decode(reply)
        out.append((header, np.concatenate(protocol.payload(header, payload, header["n"]))
                    if payload else None))
    return out


def push(piece: PieceState, seq: int, samples: int, node="worker-0", loss=0.5) -> list:
    """A push of a gradient of `samples` samples whose mean loss is `loss`."""
    grad = np.random.default_rng(seq).standard_normal(N).astype(np.float32)
    return send(piece, "push", seq, grad, node=node, piece=0, clock=piece.version,
                meta={"samples": samples, "loss_sum": loss * samples})


def pull_point(piece: PieceState, point: int) -> tuple[dict, np.ndarray | None]:
    [reply] = send(piece, "pull", 99, node="scheduler", piece=0, meta={"snapshot": point})
    return reply


def test_the_apply_that_reaches_a_point_keeps_those_weights():
    piece = make_piece(ASYNC, eval_samples=100)
    push(piece, 1, 64, loss=2.0)
    assert piece.samples == 64 and piece.snapshots == {}
    push(piece, 2, 64, loss=1.0)                        # 128: point 1 passed here
    at_point = piece.params.copy()
    push(piece, 3, 64)                                  # 192: still point 1
    assert sorted(piece.snapshots) == [1]
    header, params = pull_point(piece, 1)
    assert header["op"] == "ok" and header["clock"] == 2
    assert header["meta"]["samples"] == 128 and header["meta"]["loss_sum"] == 64 * 3.0
    assert header["meta"]["time"] > 0
    assert params.tobytes() == at_point.tobytes()
    assert params.tobytes() != piece.params.tobytes()   # the piece moved on; the snapshot did not
    assert piece.snapshots == {}                         # released once pulled


def test_a_push_past_several_points_keeps_one_snapshot_of_the_last():
    piece = make_piece(ASYNC, eval_samples=10)
    push(piece, 1, 35)
    assert sorted(piece.snapshots) == [3]


def test_a_snapshot_pulled_or_never_taken_is_e_state_and_changes_nothing():
    piece = make_piece(ASYNC, eval_samples=100)
    push(piece, 1, 100)
    push(piece, 2, 100)
    assert sorted(piece.snapshots) == [1, 2]
    header, _ = pull_point(piece, 2)                    # releases 1 too
    assert header["op"] == "ok"
    for point in (1, 2, 7):
        header, params = pull_point(piece, point)
        assert (header["op"], header["code"], params) == ("error", protocol.E_STATE, None)


def test_at_most_snapshots_kept_the_oldest_goes():
    piece = make_piece(ASYNC, eval_samples=1)
    for seq in range(1, SNAPSHOTS_KEPT + 3):
        push(piece, seq, 1)
    assert sorted(piece.snapshots) == list(range(3, SNAPSHOTS_KEPT + 3))


@pytest.mark.parametrize("meta", [{"samples": -1}, {"samples": 1.5}, {"samples": "64"},
                                  {"samples": True}, {"samples": 2**41},
                                  {"samples": 1, "loss_sum": float("nan")},
                                  {"samples": 1, "loss_sum": "1"}, {"loss_sum": None}])
def test_a_push_with_bad_samples_is_refused_and_changes_nothing(meta):
    piece = make_piece(ASYNC, eval_samples=10)
    before = piece.params.copy()
    grad = np.ones(N, np.float32)
    [(header, _)] = send(piece, "push", 1, grad, piece=0, clock=0, meta=meta)
    assert (header["op"], header["code"]) == ("error", protocol.E_MALFORMED)
    assert piece.params.tobytes() == before.tobytes() and piece.version == 0 and piece.samples == 0


def test_a_bad_snapshot_number_is_malformed():
    piece = make_piece(ASYNC, eval_samples=10)
    header, _ = pull_point(piece, "1")
    assert (header["op"], header["code"]) == ("error", protocol.E_MALFORMED)


def test_sync_counts_the_samples_of_every_push_it_averages():
    piece = make_piece(SYNC, eval_samples=256)
    for version in range(2):
        assert push(piece, version + 1, 64, node="worker-0") == []     # held for worker-1
        replies = push(piece, version + 1, 64, node="worker-1")      # both answered
        assert [h["clock"] for h, _ in replies] == [version + 1] * 2
    assert (piece.version, piece.samples) == (2, 256)
    header, _ = pull_point(piece, 1)
    assert (header["clock"], header["meta"]["samples"]) == (2, 256)


def test_a_plain_pull_says_the_samples_of_its_weights():
    piece = make_piece(ASYNC, eval_samples=0)
    push(piece, 1, 64)
    [(header, _)] = send(piece, "pull", 2, piece=0)
    assert header["clock"] == 1 and header["meta"] == {"samples": 64, "loss_sum": 32.0}
    assert piece.snapshots == {}                        # eval_samples 0: no snapshots


def test_samples_survive_a_checkpoint(tmp_path):
    cfg = replace(ASYNC, checkpoint_dir=str(tmp_path))
    piece = make_piece(cfg, eval_samples=100)
    push(piece, 1, 150)
    piece.checkpoint()
    restored = make_piece(cfg, eval_samples=100)
    restored.restore()
    assert restored.samples == 150 and restored.snapshots == {}
    push(restored, 2, 50)                               # 200: point 2, not point 1 again
    assert sorted(restored.snapshots) == [2]


@pytest.mark.parametrize("mode,workers,batch,every,expect", [
    ("sync", 2, 64, 1.0, 78 * 128),        # 10,000 samples: 78 global batches of 128
    ("async", 2, 64, 1.0, 156 * 64),       # 156 batches of 64, whoever takes them
    ("async", 2, 64, 0.5, 78 * 64),
    ("sync", 3, 100, 0.25, 8 * 300),       # 33 global batches of 300: a quarter is 8 (rounded)
    ("async", 2, 64, 0.0, 0),              # no evaluation points
])
def test_eval_interval_is_whole_updates_of_an_epoch(mode, workers, batch, every, expect):
    cfg = Config(mode=mode, workers=workers, batch_size=batch, eval_every=every)
    assert eval_interval(10_000, cfg) == expect
    steps, per_step = epoch_steps(10_000, cfg)
    assert steps == steps_per_epoch(10_000, per_step) and steps * per_step <= 10_000


def eval_records(path):
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in lines if r["event"] == "eval"], next(r for r in lines if r["event"] == "end")


@pytest.mark.slow
def test_sync_evaluations_land_on_the_epochs_asked_and_count_whole_versions(downpour, tmp_path):
    """The issue's run: sync, 2 workers, 2 shards, 6 epochs, an evaluation per epoch."""
    r = downpour("train", "--mode", "sync", "--workers", 2, "--shards", 2, "--epochs", 6,
                 "--metrics", "m.jsonl", "--progress", "none", timeout=240)
    assert r.returncode == 0, r.stderr
    evals, end = eval_records(tmp_path / "m.jsonl")
    assert [round(e["epoch"], 4) for e in evals] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], evals
    for e in evals:
        assert e["samples"] == e["updates"] * 2 * 64, e
        assert 0 < e["train_loss"] < 3, e               # the loss of the samples since the last
    assert [e["elapsed_s"] for e in evals] == sorted(e["elapsed_s"] for e in evals)
    assert end["samples"] == evals[-1]["samples"] and end["updates"] == evals[-1]["updates"]


@pytest.mark.slow
def test_async_evaluations_land_within_a_tenth_of_an_epoch(downpour, tmp_path):
    r = downpour("train", "--mode", "async", "--workers", 2, "--shards", 2, "--epochs", 4,
                 "--eval-every", 0.5, "--metrics", "m.jsonl", "--progress", "none", timeout=240)
    assert r.returncode == 0, r.stderr
    evals, end = eval_records(tmp_path / "m.jsonl")
    epochs = [e["epoch"] for e in evals]
    assert len(evals) == 8 and all(abs(got - 0.5 * k) < 0.1 for k, got in enumerate(epochs, 1)), epochs
    for e in evals:                                     # every push is one batch of 64
        assert e["samples"] == e["updates"] * 64, e
        assert 0 < e["train_loss"] < 3, e
    assert end["samples"] == evals[-1]["samples"]


@pytest.mark.slow
def test_hogwild_evaluates_the_copy_taken_at_each_point(downpour, tmp_path):
    """The process whose step reaches a point copies the shared weights: its records land
    within a step per process of the point, whatever the evaluating process was doing."""
    r = downpour("train", "--mode", "hogwild", "--workers", 2, "--epochs", 4, "--metrics",
                 "m.jsonl", "--progress", "none", timeout=240)
    assert r.returncode == 0, r.stderr
    evals, end = eval_records(tmp_path / "m.jsonl")
    per_epoch = 156 * 64                                 # two partitions of 5,000: 78 batches each
    for k, e in enumerate(evals, 1):
        assert 0 <= e["samples"] - k * per_epoch <= 2 * 64, (k, e)
        assert e["samples"] == e["updates"] * 64 and abs(e["epoch"] - k) < 0.1, e
    assert len(evals) == 4 and end["samples"] == evals[-1]["samples"] == 4 * per_epoch
    assert [e["elapsed_s"] for e in evals] == sorted(e["elapsed_s"] for e in evals)
