"""The consistency modes inside one piece: ssp's bound, sync's backup workers,
the staleness-aware learning rate, and finished workers."""

from dataclasses import replace

import numpy as np
import pytest
from test_server import LR, answer, grads, make_piece, request, stats

from downpour.common.config import Config
from downpour.common.errors import ConfigError
from downpour.common.training import check_batches, check_cluster
from downpour.worker import hogwild

SSP = Config(mode="ssp", workers=3, shards=1, optimizer="sgd", lr=0.1)


def push_pull(piece, grad, seq, rank, clock, last=False):
    fields = {"piece": piece.rank, "clock": clock, **({"meta": {"last": True}} if last else {})}
    return piece.handle(f"w{rank}".encode(), request("push_pull", seq, grad, node=f"worker-{rank}",
                                                     **fields))


def answered(replies):
    return sorted(answer(r)[0] for r in replies)


@pytest.mark.parametrize("s", [0, 1, 2])
def test_ssp_holds_a_worker_more_than_s_clocks_ahead(s):
    piece = make_piece(replace(SSP, staleness=s))
    g = grads(piece.hi - piece.lo, 1)[0]
    seq = 0
    for k in range(s + 1):                    # worker 0 runs ahead alone
        seq += 1
        replies = push_pull(piece, g, seq, rank=0, clock=piece.version)
        if k < s:
            assert answered(replies) == [b"w0"], k          # still within the bound
    assert replies == []                      # s + 1 ahead of workers 1 and 2: held
    assert piece.worker_clock[0] == s + 1
    released = push_pull(piece, g, 100, rank=1, clock=0)
    assert b"w0" not in answered(released)    # worker 2 is still at clock 0
    released += push_pull(piece, g, 200, rank=2, clock=0)
    # workers 1 and 2 now have clock 1: worker 0 (clock s+1) is s ahead and goes on
    assert answered(released) == [b"w0", b"w1", b"w2"]
    gaps = {int(k): v for k, v in stats(piece)["clock_gap"].items()}
    assert max(gaps) <= s


def test_ssp_with_s0_is_lockstep_and_every_gradient_sees_all_earlier_clocks():
    piece = make_piece(replace(SSP, staleness=0))
    g = grads(piece.hi - piece.lo, 1)[0]
    versions_seen = {}
    for clock in range(3):                    # three rounds, workers in a changing order
        order = [0, 1, 2] if clock % 2 == 0 else [2, 0, 1]
        out = []
        for i, rank in enumerate(order):
            versions_seen[(rank, clock)] = piece.version if i == 0 else versions_seen[(order[0], clock)]
            out += push_pull(piece, g, 10 * clock + rank + 1, rank, clock=3 * clock)
        assert answered(out) == [b"w0", b"w1", b"w2"]       # released together, each round
        assert piece.version == 3 * (clock + 1)
    assert stats(piece)["clock_gap"] == {"0": 9}


def test_a_finished_or_dead_worker_holds_nobody_back():
    piece = make_piece(replace(SSP, staleness=0, workers=2))
    g = grads(piece.hi - piece.lo, 1)[0]
    assert answered(push_pull(piece, g, 1, rank=1, clock=0, last=True)) == [b"w1"]
    assert 1 in piece.finished
    for seq in range(2, 6):                   # worker 0 alone: never held
        assert answered(push_pull(piece, g, seq, rank=0, clock=piece.version)) == [b"w0"]
    piece = make_piece(replace(SSP, staleness=0, workers=2))
    assert push_pull(piece, g, 1, rank=0, clock=0) == []          # waits for worker 1
    reply = piece.handle(b"s", request("control", 9, node="scheduler", meta={"live": [0]}))
    assert answered(reply) == [b"s", b"w0"]                       # worker 1 died: released


def test_sync_backup_applies_after_w_minus_b_and_drops_the_straggler():
    cfg = Config(mode="sync", workers=3, shards=1, optimizer="sgd", lr=0.1, backup=1)
    piece = make_piece(cfg)
    g = grads(piece.hi - piece.lo, 3)
    p0 = piece.params.copy()
    assert push_pull(piece, g[0], 1, rank=0, clock=0) == []
    out = push_pull(piece, g[2], 1, rank=2, clock=0)
    assert answered(out) == [b"w0", b"w2"] and piece.version == 1
    mean = (g[0] + g[2]) * np.float32(0.5)
    assert np.array_equal(piece.params, p0 - mean * LR)
    late = push_pull(piece, g[1], 1, rank=1, clock=0)
    ident, header, params = answer(late[0])
    assert header["meta"] == {"dropped": True} and header["clock"] == 1
    assert np.array_equal(params, piece.params) and stats(piece)["dropped"] == 1


def test_staleness_aware_lr_divides_the_step_by_staleness_plus_one():
    cfg = Config(mode="async", workers=2, shards=1, optimizer="sgd", lr=0.1, staleness_lr=True)
    piece = make_piece(cfg)
    g = grads(piece.hi - piece.lo, 2)
    push_pull(piece, g[0], 1, rank=0, clock=0)                    # staleness 0: full step
    before = piece.params.copy()
    push_pull(piece, g[1], 1, rank=1, clock=0)                    # staleness 1: half a step
    lr = np.float32(0.1 * 0.5)
    assert np.array_equal(piece.params, before - g[1] * lr)


@pytest.mark.parametrize("settings,message", [
    (dict(mode="sync", backup=2, workers=2), "backup workers are for --mode sync"),
    (dict(mode="async", backup=1), "backup workers are for --mode sync"),
    (dict(mode="async", staleness=2), "bounds --mode ssp"),
    (dict(mode="ssp", n_push=2), "ssp mode exchanges every step"),
    (dict(mode="sync", staleness_lr=True), "staleness_lr scales asynchronous pushes"),
    (dict(mode="async", slow_worker="5:3"), "slow_worker names worker 5"),
    (dict(mode="async", slow_worker="1:0.5"), "expected RANK:FACTOR"),
])
def test_contradicting_mode_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        check_cluster(Config(**settings))


@pytest.mark.parametrize("mode,workers,largest", [
    ("single", 1, 10), ("async", 3, 10), ("ssp", 3, 10),   # every batch from the whole epoch
    ("hogwild", 3, 3),                                     # partitions of 4, 3 and 3 samples
    ("sync", 3, 3),                                        # one global batch of 3 x b <= 10
])
def test_the_largest_batch_that_can_be_drawn_from_10_samples(mode, workers, largest):
    ok = Config(mode=mode, workers=workers, batch_size=largest)
    check_batches(ok, 10)
    check_cluster(ok, 10)                                  # check_cluster(cfg, n) asks the same
    too_big = replace(ok, batch_size=largest + 1)
    for check in (check_batches, check_cluster):
        with pytest.raises(ConfigError, match=f"choose --batch-size {largest} or less"):
            check(too_big, 10)


def test_more_workers_than_samples_is_refused_in_the_modes_that_split_them():
    for mode in ("hogwild", "sync"):
        with pytest.raises(ConfigError, match="--workers 3 is more than the 2 training samples"):
            check_batches(Config(mode=mode, workers=3, batch_size=1), 2)
    check_batches(Config(mode="async", workers=3, batch_size=1), 2)  # chunks go to who asks


def test_hogwild_refuses_an_impossible_batch_before_it_starts_a_process(monkeypatch):
    started = []
    monkeypatch.setattr(hogwild, "_run", lambda *a, **k: started.append(a))
    with pytest.raises(ConfigError, match="the largest batch that works with 2 workers is 50"):
        hogwild.train(Config(mode="hogwild", workers=2, synthetic=100, batch_size=51, progress="none"))
    assert started == []
