"""Tests of ps/index.py: the hash against splitmix64 written out in Python integers,
deletion from a run that wraps around, the index against a dict on random inserts and
deletes through several doublings (the linear-probing invariant checked after each),
growth, and a refused delete that changes nothing. The index through a table, and its
measured cost: tests/test_table.py."""

import itertools

import numpy as np
import pytest
from hashref import splitmix64 as ref_splitmix64

from downpour.ps.index import EMPTY, MAX_LOAD, MIN_SLOTS, Index, home_slots


def keys_of(*values) -> np.ndarray:
    return np.unique(np.array(values, np.int64))


def keys_homed_at(*homes_wanted, capacity=MIN_SLOTS):
    """The first keys (0, 1, ...) whose home slot of `capacity` is each of `homes_wanted`."""
    out, taken = [], {}
    for home in homes_wanted:
        k = taken.get(home, -1) + 1
        while ref_splitmix64(k) & (capacity - 1) != home:
            k += 1
        taken[home] = k
        out.append(k)
    return out


def assert_sound(index: Index):
    """Every key sits after its home slot with no empty slot between (what find relies
    on), the load is at most MAX_LOAD, and empty slots hold EMPTY, -1, 0."""
    used = index.keys != EMPTY
    assert len(index) == used.sum() <= index.capacity * MAX_LOAD
    assert (index.row[~used] == -1).all() and (index.seen[~used] == 0).all()
    homes = home_slots(index.keys[used], index.capacity)
    for slot, home in zip(np.flatnonzero(used), homes):
        between = (home + np.arange((slot - home) % index.capacity)) % index.capacity
        assert used[between].all(), (slot, home)


def test_home_slots_are_the_keys_splitmix64_mod_the_capacity():
    keys = np.array([0, 1, 99, 2**63 - 1], np.int64)
    assert list(home_slots(keys, 64)) == [ref_splitmix64(int(k)) & 63 for k in keys]


def test_removing_keys_of_a_run_that_wraps_around_keeps_the_others_findable():
    """A run of 10 keys over slots 61..6 (five homed at 62, wrapping past the end, over the
    homes of keys homed at 63, 0 and 2): remove every one, two and three of them in turn."""
    keys = keys_of(*keys_homed_at(61, 62, 62, 62, 62, 62, 63, 0, 0, 2))
    assert keys.size == 10
    for size in (1, 2, 3):
        for gone in map(list, itertools.combinations(range(10), size)):
            index = Index()
            slots = index.insert(keys)
            assert sorted(slots) == [0, 1, 2, 3, 4, 5, 6, 61, 62, 63]
            index.row[slots], index.seen[slots] = np.arange(10), np.arange(10) + 100
            index.delete(keys[gone])
            kept = np.delete(np.arange(10), gone)
            found = index.find(keys)
            assert (found[gone] == -1).all() and (found[kept] >= 0).all()
            assert np.array_equal(index.keys[found[kept]], keys[kept])
            assert np.array_equal(index.row[found[kept]], kept)             # row and sightings move too
            assert np.array_equal(index.seen[found[kept]], kept + 100)
            empty = index.keys == -1
            assert len(index) == 10 - size == (~empty).sum()
            assert (index.row[empty] == -1).all() and (index.seen[empty] == 0).all()
            again = index.insert(keys[gone])                             # and they can come back
            assert np.array_equal(index.find(keys)[gone], again)
            assert_sound(index)


def test_the_index_agrees_with_a_dict_on_random_inserts_and_deletes():
    rng = np.random.default_rng(0)
    # small consecutive keys (not hashes) and random 63-bit ones
    pool = np.unique(np.concatenate([np.arange(800), rng.integers(0, 2**63 - 1, 800)]).astype(np.int64))
    index, ref = Index(), {}                                # key -> (row, seen)
    for step in range(150):
        batch = np.unique(rng.choice(pool[: 20 * (step + 1)], size=rng.integers(1, 60)))
        present = np.isin(batch, np.fromiter(ref, np.int64, len(ref)))
        if step % 3 == 2:                                   # delete the present keys of the batch
            index.delete(batch[present])
            for k in batch[present]:
                del ref[int(k)]
        else:                                               # insert the absent ones
            new = batch[~present]
            grew = index.capacity
            slots = index.insert(new)
            assert (index.row[slots] == -1).all() and (index.seen[slots] == 0).all()
            if index.capacity != grew:
                slots = index.find(new)
            index.row[slots], index.seen[slots] = new % 1000, new % 7 + step
            ref.update((int(k), (int(k % 1000), int(k % 7 + step))) for k in new)
        found = index.find(pool)
        there = np.array([int(k) in ref for k in pool])
        assert np.array_equal(found >= 0, there), step
        assert np.array_equal(index.keys[found[there]], pool[there])
        got = zip(index.row[found[there]].tolist(), index.seen[found[there]].tolist())
        assert list(got) == [ref[int(k)] for k in pool[there]]
        assert_sound(index)
    assert index.capacity >= 16 * MIN_SLOTS and len(index) == len(ref) > 0    # grown several times


def test_grow_doubles_until_the_load_fits_and_keeps_every_key():
    index = Index()
    keys = np.arange(32, dtype=np.int64) * 1000
    slots = index.insert(keys)                              # 32 keys in 64 slots: load 1/2
    index.row[slots], index.seen[slots] = np.arange(32), 5
    assert index.capacity == MIN_SLOTS and not index.grow(32)
    assert index.grow(33) and index.capacity == 2 * MIN_SLOTS
    assert index.grow(129) and index.capacity == 8 * MIN_SLOTS    # 129 / 0.5 > 256: doubled twice more
    found = index.find(keys)
    assert np.array_equal(index.row[found], np.arange(32)) and (index.seen[found] == 5).all()
    assert len(index) == 32 and index.nbytes == 16 * index.capacity
    assert np.array_equal(index.occupied(), np.sort(found))
    assert_sound(index)


@pytest.mark.parametrize("capacity", [0, 32, 100])
def test_a_capacity_not_a_power_of_two_from_min_slots_is_refused(capacity):
    with pytest.raises(ValueError, match="power of two"):
        Index(capacity)


def test_a_delete_of_an_absent_key_is_refused_and_changes_nothing():
    index = Index()
    slots = index.insert(keys_of(1, 2, 3))
    index.row[slots] = [7, 8, 9]
    before = index.keys.copy(), index.row.copy(), index.seen.copy()
    with pytest.raises(KeyError, match="key 4 is not in the index"):
        index.delete(keys_of(2, 4))
    assert all(np.array_equal(a, b) for a, b in zip(before, (index.keys, index.row, index.seen)))
    assert len(index) == 3
