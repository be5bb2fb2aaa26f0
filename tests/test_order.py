"""Tests for common/order.py: which samples every step of every mode takes, and the counts."""

from dataclasses import replace

import numpy as np
import pytest

from downpour.common.config import MODES, Config
from downpour.common.errors import ConfigError, DataError
from downpour.common.order import (
    asked_samples,
    batch_indices,
    chunk_batches,
    chunk_samples,
    chunks_per_epoch,
    deals_chunks,
    epoch_permutation,
    epoch_samples,
    epoch_steps,
    partition,
    steps_per_epoch,
    sync_batch,
    sync_versions,
    total_chunks,
    worker_batches,
    worker_steps,
)

CFG = Config(mode="async", workers=2, batch_size=10, chunk_batches=3, epochs=2, seed=4)
N = 95                                    # 9 full batches an epoch: chunks of 3, 3, 3


# ---------------------------------------------------------------------------- epochs and batches


def test_epoch_permutation_is_reproducible_and_varies_by_epoch():
    order = epoch_permutation(1000, seed=7, epoch=2)
    assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(1000))
    np.testing.assert_array_equal(order, epoch_permutation(1000, 7, 2))
    np.testing.assert_array_equal(order, np.random.default_rng([7, 2]).permutation(1000))
    assert not np.array_equal(order, epoch_permutation(1000, 7, 3))
    assert not np.array_equal(order, epoch_permutation(1000, 8, 2))
    with pytest.raises(ConfigError, match="epoch=-1"):
        epoch_permutation(10, 0, -1)


def test_batch_indices_drops_the_incomplete_last_batch():
    order = np.arange(10, dtype=np.int64)[::-1].copy()
    batches = list(batch_indices(order, 3))
    assert [b.tolist() for b in batches] == [[9, 8, 7], [6, 5, 4], [3, 2, 1]]  # 0 dropped
    assert steps_per_epoch(10, 3) == 3 and steps_per_epoch(9, 3) == 3
    assert all(np.shares_memory(b, order) for b in batches)  # views, no copies
    assert list(batch_indices(order, 11)) == [] and steps_per_epoch(10, 11) == 0
    assert len(list(batch_indices(order, 10))) == 1
    with pytest.raises(ConfigError, match="batch size 0"):
        list(batch_indices(order, 0))


@pytest.mark.parametrize("n, n_parts", [(10, 1), (10, 3), (10, 10), (7, 4), (60000, 7), (5, 2)])
def test_partition_tiles_the_range_exactly_once(n, n_parts):
    parts = [partition(n, n_parts, p) for p in range(n_parts)]
    assert [i for r in parts for i in r] == list(range(n))
    sizes = [len(r) for r in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    reference = np.array_split(np.arange(n), n_parts)
    assert [(r.start, r.stop) for r in parts] == [(a[0], a[-1] + 1) for a in reference]


def test_partition_validates_its_arguments():
    with pytest.raises(DataError, match="cannot split 3 samples into 4 non-empty parts"):
        partition(3, 4, 0)
    with pytest.raises(ConfigError, match="n_parts=0"):
        partition(3, 0, 0)
    with pytest.raises(ConfigError, match=r"part=2, expected an integer in 0..1"):
        partition(3, 2, 2)
    with pytest.raises(ConfigError, match="part=-1"):
        partition(3, 2, -1)


# ---------------------------------------------------------------------------- who takes what


def test_only_async_ssp_and_hybrid_deal_chunks():
    assert [m for m in MODES if deals_chunks(Config(mode=m))] == ["async", "ssp", "hybrid"]


@pytest.mark.parametrize("mode, workers", [("single", 1), ("hogwild", 3), ("sync", 3)])
def test_worker_steps_counts_the_batches_a_worker_walks(mode, workers):
    cfg = replace(CFG, mode=mode, workers=workers)
    for rank in range(workers):
        assert worker_steps(N, cfg, rank) == len(list(worker_batches(N, cfg, rank)))


def test_hogwild_workers_walk_their_partitions_in_the_epochs_order():
    cfg = replace(CFG, mode="hogwild", workers=3, batch_size=4)
    for epoch in range(cfg.epochs):
        order = epoch_permutation(N, cfg.seed, epoch)
        for rank in range(3):
            part = partition(N, 3, rank)
            mine = [idx for e, idx in worker_batches(N, cfg, rank) if e == epoch]
            walked = np.concatenate(mine)
            assert set(walked) <= set(part) and len(mine) == len(part) // 4
            # in the order the permutation lists them: a prefix of its samples in `part`
            assert np.array_equal(walked, [i for i in order if i in part][:len(walked)])
    steps, per_step = epoch_steps(N, cfg)
    assert sum(worker_steps(N, cfg, r) for r in range(3)) == cfg.epochs * steps


# ---------------------------------------------------------------------------- chunks (async, ssp)


def test_chunks_cut_each_epoch_into_the_single_process_batches():
    assert chunks_per_epoch(N, CFG) == 3 and total_chunks(N, CFG) == 6
    assert chunks_per_epoch(N, replace(CFG, chunk_batches=4)) == 3      # 4 + 4 + 1
    single = replace(CFG, mode="single", workers=1)
    dealt = [idx for c in range(total_chunks(N, CFG)) for idx in chunk_batches(N, CFG, c)]
    expected = [idx for _, idx in worker_batches(N, single, 0)]
    assert len(dealt) == len(expected) == 18
    assert all(np.array_equal(a, b) for a, b in zip(dealt, expected))
    assert asked_samples(N, CFG) == 2 * 9 * 10
    short = replace(CFG, chunk_batches=4)
    assert [len(chunk_batches(N, short, c)) for c in range(3)] == [4, 4, 1]


@pytest.mark.parametrize("k", [1, 3, 4, 9, 20])
def test_chunk_samples_are_the_samples_of_its_batches_and_add_up_to_the_run(k):
    cfg = replace(CFG, chunk_batches=k)
    sizes = [chunk_samples(N, cfg, c) for c in range(total_chunks(N, cfg))]
    assert sizes == [sum(map(len, chunk_batches(N, cfg, c))) for c in range(total_chunks(N, cfg))]
    assert sum(sizes) == asked_samples(N, cfg) == cfg.epochs * epoch_samples(N, cfg)


# ---------------------------------------------------------------------------- versions (sync)


def test_sync_workers_split_each_global_batch_in_rank_order():
    cfg = replace(CFG, mode="sync", workers=3, batch_size=7)            # global batches of 21
    per_epoch = steps_per_epoch(N, 21)
    assert sync_versions(N, cfg) == cfg.epochs * per_epoch == cfg.epochs * epoch_steps(N, cfg)[0]
    for version in range(sync_versions(N, cfg)):
        epoch, j = divmod(version, per_epoch)
        parts = [sync_batch(N, cfg, rank, version) for rank in range(3)]
        assert all(e == epoch for e, _ in parts)
        together = np.concatenate([idx for _, idx in parts])
        assert np.array_equal(together, epoch_permutation(N, cfg.seed, epoch)[j * 21:(j + 1) * 21])
    assert asked_samples(N, cfg) == sync_versions(N, cfg) * 21 == cfg.epochs * epoch_samples(N, cfg)


# ---------------------------------------------------------------------------- counts of a run


@pytest.mark.parametrize("mode, workers", [("single", 1), ("async", 2), ("hogwild", 3), ("sync", 3)])
def test_epoch_samples_is_the_updates_of_an_epoch_times_their_samples(mode, workers):
    cfg = replace(CFG, mode=mode, workers=workers)
    steps, per_step = epoch_steps(N, cfg)
    assert epoch_samples(N, cfg) == steps * per_step <= N


@pytest.mark.parametrize("mode, workers", [("single", 1), ("hogwild", 3)])
def test_the_walking_modes_take_epochs_times_the_samples_of_one(mode, workers):
    cfg = replace(CFG, mode=mode, workers=workers, batch_size=4)
    walked = sum(worker_steps(N, cfg, r) for r in range(workers)) * cfg.batch_size
    assert walked == cfg.epochs * epoch_samples(N, cfg)
