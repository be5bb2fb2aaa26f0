"""Tests of ps/table.py (its index alone: tests/test_index.py): first rows, the table
against a dict on random operations through several doublings of its index, colliding
keys, every optimizer against its formula in float64 (and against the dense
optimizers of common/nn/optim.py for a row pushed every step), admission, validation
that changes nothing, the cap (LRU order, evicted keys coming back new, a dict-based
reference on random operations, flat memory), export/restore and settings.

`python tests/test_table.py` measures pull + push at 1M rows, the index's bytes per key
against a dict's (see `bench`), and a pull of new keys into a full table with and
without max_rows (see `bench_eviction`)."""

import io
import time
import tracemalloc

import numpy as np
import pytest
from hashref import splitmix64 as ref_splitmix64

from downpour.common.errors import ConfigError, DataError
from downpour.common.nn.optim import make_optimizer
from downpour.ps.index import MIN_SLOTS
from downpour.ps.table import Table, check_keys, initial_rows


def keys_of(*values) -> np.ndarray:
    return np.unique(np.array(values, np.int64))


def assert_exports_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


# ---- first rows -----------------------------------------------------------------------

def test_a_pull_repeats_and_reads_the_initial_rows():
    t = Table(8, init_std=0.1, seed=5)
    keys = keys_of(3, 17, 2**40, 2**63 - 1)
    first = t.pull(keys)
    assert np.array_equal(first, initial_rows(keys, 8, 0.1, 5))
    assert first.dtype == np.float32 and first.shape == (4, 8)
    first[:] = 123.0                                        # a new array: the table is untouched
    assert np.array_equal(t.pull(keys), initial_rows(keys, 8, 0.1, 5))
    assert np.array_equal(t.pull(keys), t.pull(keys))


def test_first_rows_depend_on_key_and_seed_only():
    keys = keys_of(*range(0, 3000, 7), 2**50, 2**62 + 1)
    one = Table(17, init_std=0.05, seed=11)
    one.pull(keys)
    other = Table(17, init_std=0.05, seed=11)               # other keys first, then ours in pieces
    other.pull(keys_of(*range(1, 5000, 3)))
    for piece in reversed(np.array_split(keys, 5)):
        other.pull(piece)
    assert np.array_equal(one.pull(keys), other.pull(keys))
    reseeded = Table(17, init_std=0.05, seed=12).pull(keys)
    assert not np.isclose(reseeded, one.pull(keys)).any()
    assert not Table(17, init_std=0.0, seed=11).pull(keys).any()


def test_first_rows_are_normal_with_init_std():
    keys = np.arange(20000, dtype=np.int64)                 # consecutive keys: not hashes
    rows = initial_rows(keys, 16, 0.5, 3).astype(np.float64)
    assert abs(rows.mean()) < 0.005                         # 320k draws: standard error ~0.0009
    assert abs(rows.std() - 0.5) < 0.005                    # standard error ~0.0006
    corr = np.corrcoef(rows.T)                              # columns independent (cos and sin too)
    assert np.abs(corr - np.eye(16)).max() < 0.04           # standard error ~0.007
    assert np.array_equal(initial_rows(keys[::-1], 16, 0.5, 3), initial_rows(keys, 16, 0.5, 3)[::-1])
    assert initial_rows(keys[:3], 5, 0.5, 3).shape == (3, 5)    # an odd dim


# ---- the table against a dict, through its index --------------------------------------

class Reference:
    """The table's contract in dicts: sgd, lr 1, init_std 0, admission after N sightings,
    at most max_rows rows (0: no cap), the least recently used (by training pulls and
    pushes; in one call, the smaller key first) evicted first, never a key of the call."""

    def __init__(self, dim, admit_after, max_rows=0):
        self.dim, self.admit_after, self.max_rows = dim, admit_after, max_rows
        self.rows, self.seen, self.used = {}, {}, {}       # key -> row, sightings, (call, key) of last use
        self.calls = self.ignored = self.evictions = 0

    def pull(self, keys, train=True):
        keys = [int(k) for k in keys]
        if train:
            self.calls += 1
            self.used.update((k, (self.calls, k)) for k in keys if k in self.rows)
            coming = [k for k in keys if k not in self.rows and self.seen.get(k, 0) + 1 >= self.admit_after]
            over = len(self.rows) + len(coming) - self.max_rows if self.max_rows else 0
            for k in sorted(self.rows, key=self.used.get)[:max(over, 0)]:
                del self.rows[k], self.seen[k], self.used[k]
                self.evictions += 1
            for k in keys:
                if k not in self.rows:
                    self.seen[k] = self.seen.get(k, 0) + 1
                    if self.seen[k] >= self.admit_after:
                        self.rows[k], self.used[k] = np.zeros(self.dim), (self.calls, k)
        return np.array([self.rows.get(k, np.zeros(self.dim)) for k in keys]).reshape(-1, self.dim)

    def push(self, keys, grads):
        self.calls += 1
        for k, g in zip(map(int, keys), grads):
            if k in self.rows:
                self.rows[k], self.used[k] = self.rows[k] - g, (self.calls, k)
            else:
                self.ignored += 1


@pytest.mark.parametrize("admit_after", [1, 2])
def test_the_index_agrees_with_a_dict_through_growth(admit_after):
    rng = np.random.default_rng(admit_after)
    # small consecutive keys (not hashes) and random 63-bit ones
    pool = np.concatenate([np.arange(3000), rng.integers(0, 2**63 - 1, 3000)]).astype(np.int64)
    table, ref = Table(3, "sgd", lr=1.0, admit_after=admit_after), Reference(3, admit_after)
    for step in range(120):
        keys = np.unique(rng.choice(pool[: 50 * (step + 1)], size=rng.integers(1, 200)))
        train = step % 5 != 0
        assert np.array_equal(table.pull(keys, train=train), ref.pull(keys, train))
        grads = rng.integers(-4, 5, (keys.size, 3)).astype(np.float32)   # exact in float32
        assert table.push(keys, grads) == sum(int(k) in ref.rows for k in keys)
        ref.push(keys, grads)
    every = np.unique(pool)
    assert np.array_equal(table.pull(every, train=False), ref.pull(every, train=False))
    stats = table.stats()
    assert stats["rows"] == stats["admissions"] == len(ref.rows) > 2000
    assert stats["keys_seen"] == len(ref.seen) and stats["ignored"] == ref.ignored
    assert table._index.capacity >= 8 * MIN_SLOTS and table._w.shape[0] >= 2048   # grown several times
    assert len(table._index) <= table._index.capacity / 2


def test_a_pull_that_doubles_the_index_keeps_every_key_of_its_batch():
    t = Table(4, "sgd", init_std=1.0)
    old = np.arange(30, dtype=np.int64) * 1000             # 30 entries: the 64 slots are at load 1/2
    t.pull(old)
    capacity = t._index.capacity
    batch = np.unique(np.concatenate([old, np.arange(5, 15, dtype=np.int64)]))
    assert np.array_equal(t.pull(batch), initial_rows(batch, 4, 1.0, 0))
    assert t._index.capacity > capacity
    assert t.stats()["rows"] == t.stats()["keys_seen"] == 40


def test_keys_that_share_a_home_slot_resolve_in_one_batch():
    """Eight keys with home slot 62 of 64 run past the end and wrap around, over the home
    slots of two more keys (63 and 0)."""
    homes = {}
    for k in range(200000):
        homes.setdefault(ref_splitmix64(k) & (MIN_SLOTS - 1), []).append(k)
    keys = keys_of(*homes[62][:8], homes[63][0], homes[0][0])
    t = Table(2, "sgd", lr=1.0, init_std=1.0)
    assert t._index.capacity == MIN_SLOTS
    assert np.array_equal(t.pull(keys), initial_rows(keys, 2, 1.0, 0))
    slots = t._index.find(keys)
    assert sorted(slots) == [0, 1, 2, 3, 4, 5, 6, 7, 62, 63]
    assert np.array_equal(t._index.keys[slots], keys)
    grads = np.arange(20, dtype=np.float32).reshape(10, 2)   # each row moves by its own gradient
    assert t.push(keys, grads) == 10
    assert np.array_equal(t.pull(keys), initial_rows(keys, 2, 1.0, 0) - grads)


@pytest.mark.parametrize("admit_after", [1, 2])
def test_the_table_agrees_with_a_dict_under_a_cap(admit_after):
    """Many evictions from runs of a small index: every surviving key keeps its row."""
    rng = np.random.default_rng(10 + admit_after)
    pool = np.unique(np.concatenate([np.arange(300), rng.integers(0, 2**63 - 1, 300)]).astype(np.int64))
    table, ref = Table(3, "sgd", lr=1.0, admit_after=admit_after, max_rows=60), Reference(3, admit_after, 60)
    for step in range(400):
        keys = np.unique(rng.choice(pool, size=rng.integers(1, 61)))
        train = step % 5 != 0
        assert np.array_equal(table.pull(keys, train=train), ref.pull(keys, train)), step
        grads = rng.integers(-4, 5, (keys.size, 3)).astype(np.float32)   # exact in float32
        assert table.push(keys, grads) == sum(int(k) in ref.rows for k in keys)
        ref.push(keys, grads)
        assert table.stats()["rows"] == len(ref.rows) <= 60
    assert np.array_equal(table.pull(pool, train=False), ref.pull(pool, train=False))
    s = table.stats()
    assert s["evictions"] == ref.evictions > 1000 and s["admissions"] - s["evictions"] == s["rows"]
    assert s["keys_seen"] == len(ref.seen) == len(table._index) and s["ignored"] == ref.ignored
    exported = table.export()
    assert sorted(exported["keys"]) == sorted(ref.rows)
    assert np.array_equal(table._index.row[table._index.find(exported["keys"])], np.arange(s["rows"]))


# ---- optimizers ----------------------------------------------------------------------

PUSHES = [(3, 10), (10, 42, 77), (3, 77), (3, 10, 42, 77), (42,)]   # rows appear in different pushes
CASES = [("sgd", {}), ("adagrad", {}), ("adagrad", {"eps": 1e-3, "initial_accumulator": 0.1}),
         ("adam", {}), ("adam", {"betas": (0.8, 0.99), "eps": 1e-6})]


def by_hand(name, h, w, g, state, lr):
    """One update of row w (float64) by the formula, state a dict of this row's state."""
    if name == "sgd":
        return w - lr * g
    if name == "adagrad":
        a = state["sum"] = state.get("sum", h.get("initial_accumulator", 0.0)) + g * g
        return w - lr * g / (np.sqrt(a) + h.get("eps", 1e-10))
    (b1, b2), eps = h.get("betas", (0.9, 0.999)), h.get("eps", 1e-8)
    t = state["t"] = state.get("t", 0) + 1
    m = state["m"] = b1 * state.get("m", 0.0) + (1 - b1) * g
    v = state["v"] = b2 * state.get("v", 0.0) + (1 - b2) * g * g
    return w - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)


@pytest.mark.parametrize("name, h", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_every_optimizer_follows_its_formula(name, h):
    rng, lr = np.random.default_rng(4), 0.03
    t = Table(5, name, lr, init_std=0.1, seed=2, **h)
    every = keys_of(3, 10, 42, 77)
    expected = {int(k): row.astype(np.float64) for k, row in zip(every, t.pull(every))}
    state = {int(k): {} for k in every}
    for pushed in PUSHES:
        keys = keys_of(*pushed)
        grads = rng.standard_normal((keys.size, 5)).astype(np.float32)
        before = t.pull(every, train=False)
        assert t.push(keys, grads) == keys.size
        for k, g in zip(keys, grads.astype(np.float64)):
            expected[int(k)] = by_hand(name, h, expected[int(k)], g, state[int(k)], lr)
        untouched = ~np.isin(every, keys)                   # lazy: rows not pushed do not move
        assert np.array_equal(t.pull(every, train=False)[untouched], before[untouched])
    got = t.pull(every, train=False)
    np.testing.assert_allclose(got, np.array([expected[int(k)] for k in every]), rtol=1e-5, atol=1e-6)
    if name == "adam":                                      # each row counts its own updates
        assert list(t.export()["state.step"]) == [sum(int(k) in p for p in PUSHES) for k in every]


@pytest.mark.parametrize("name, h, dense", [
    ("adagrad", {"eps": 1e-6, "initial_accumulator": 0.2}, {"eps": 1e-6, "initial_accumulator_value": 0.2}),
    ("adam", {"betas": (0.8, 0.99)}, {"betas": (0.8, 0.99)})])
def test_a_row_pushed_every_step_moves_as_under_the_dense_optimizer(name, h, dense):
    rng, lr = np.random.default_rng(9), 0.01
    t = Table(6, name, lr, init_std=0.3, **h)
    key = keys_of(7)
    param = t.pull(key)[0].copy()
    opt = make_optimizer(name, **dense)
    for _ in range(6):
        g = rng.standard_normal((1, 6)).astype(np.float32)
        t.push(key, g)
        opt.step(param, g[0].copy(), lr)
    np.testing.assert_allclose(t.pull(key)[0], param, rtol=1e-5, atol=1e-7)


# ---- admission -----------------------------------------------------------------------

def test_a_key_is_admitted_at_its_third_training_sighting():
    t = Table(4, "sgd", init_std=1.0, admit_after=3)
    key, other = keys_of(5), keys_of(5, 6)
    grad = np.ones((1, 4), np.float32)
    for sighting in (1, 2):
        assert not t.pull(key).any()
        for _ in range(3):
            assert not t.pull(other, train=False).any()     # evaluation pulls count nothing
        before = t.export()
        assert t.push(key, grad) == 0                       # ignored: nothing but counters moves
        after = t.export()
        assert after["ignored"] == before["ignored"] + 1 and after["pushes"] == before["pushes"] + 1
        assert_exports_equal({k: v for k, v in after.items() if k not in ("ignored", "pushes")},
                             {k: v for k, v in before.items() if k not in ("ignored", "pushes")})
        assert list(after["waiting_keys"]) == [5] and list(after["waiting_seen"]) == [sighting]
    assert np.array_equal(t.pull(key), initial_rows(key, 4, 1.0, 0))     # the third
    assert t.push(key, grad) == 1
    assert np.array_equal(t.pull(key, train=False), initial_rows(key, 4, 1.0, 0) - 0.05)
    s = t.stats()
    assert (s["rows"], s["keys_seen"], s["admissions"], s["ignored"]) == (1, 1, 1, 2)


def test_keys_at_different_sightings_in_one_batch():
    t = Table(2, init_std=1.0, admit_after=2)
    t.pull(keys_of(1, 2))
    rows = t.pull(keys_of(1, 2, 3))                         # 1, 2: second sighting; 3: first
    assert rows[:2].any(axis=1).all() and not rows[2].any()
    assert t.stats()["rows"] == 2 and t.stats()["keys_seen"] == 3


def test_an_evaluation_pull_of_unseen_keys_creates_nothing():
    t = Table(3, init_std=1.0)
    assert not t.pull(keys_of(1, 2, 3), train=False).any()
    s = t.stats()
    assert (s["rows"], s["keys_seen"], s["pulls"]) == (0, 0, 1)


# ---- the cap: eviction of the least recently used rows ---------------------------------

def test_the_least_recently_used_rows_go_first():
    t = Table(2, "sgd", lr=1.0, init_std=1.0, max_rows=6)
    t.pull(keys_of(1, 2, 3))
    t.pull(keys_of(4, 5, 6))                                  # full
    t.push(keys_of(2), np.ones((1, 2), np.float32))           # a push uses 2
    t.pull(keys_of(1))                                        # a training pull uses 1
    t.pull(keys_of(3, 4), train=False)                        # an evaluation pull uses nothing
    t.pull(keys_of(7, 8))                                     # the oldest go: 3, 4
    assert sorted(t.export()["keys"]) == [1, 2, 5, 6, 7, 8]
    t.pull(keys_of(9))                                        # 5 and 6 were used by one call: 5 first
    assert sorted(t.export()["keys"]) == [1, 2, 6, 7, 8, 9]
    t.pull(keys_of(10, 11))                                   # then 6, then 2 (its push), not 1
    assert sorted(t.export()["keys"]) == [1, 7, 8, 9, 10, 11]
    s = t.stats()
    assert (s["rows"], s["keys_seen"], s["admissions"], s["evictions"]) == (6, 6, 11, 5)
    assert np.array_equal(t.pull(keys_of(1, 3), train=False), np.vstack(    # 3 is forgotten
        [initial_rows(keys_of(1), 2, 1.0, 0), np.zeros((1, 2))]))


@pytest.mark.parametrize("name", ["adagrad", "adam"])
def test_an_evicted_key_comes_back_at_its_first_row_with_fresh_state(name):
    lr, key, g = 0.1, keys_of(5), np.array([[0.5, -1.0, 2.0]], np.float32)
    t = Table(3, name, lr, init_std=0.5, seed=3, max_rows=4)
    first = initial_rows(key, 3, 0.5, 3)
    t.pull(key)
    for _ in range(3):
        t.push(key, g)
    assert not np.isclose(t.pull(key, train=False), first).any()
    t.pull(keys_of(10, 11, 12, 13))                           # four new rows: 5 goes
    assert not t.pull(key, train=False).any()
    assert np.array_equal(t.pull(key), first)                 # back (10 goes)
    exported = t.export()
    assert sorted(exported["keys"]) == [5, 11, 12, 13]
    row = list(exported["keys"]).index(5)
    fresh = {"adagrad": {"state.sum": 0.0},
             "adam": {"state.exp_avg": 0.0, "state.exp_avg_sq": 0.0, "state.step": 0}}[name]
    for state, value in fresh.items():
        assert (exported[state][row] == value).all(), state
    t.push(key, g)                                            # one step from the first row and fresh state
    expected = by_hand(name, {}, first[0].astype(np.float64), g[0].astype(np.float64), {}, lr)
    np.testing.assert_allclose(t.pull(key, train=False)[0], expected, rtol=1e-6)


def test_an_evicted_key_is_sighted_again_from_zero():
    t = Table(2, init_std=1.0, admit_after=2, max_rows=2)
    for k in (5, 6):
        t.pull(keys_of(k))
        t.pull(keys_of(k))                                    # admitted at the second sighting
    t.pull(keys_of(7))                                        # waits: nothing is evicted for it
    assert (t.stats()["rows"], t.stats()["evictions"]) == (2, 0)
    t.pull(keys_of(7))                                        # admitted: 5 goes, sightings and all
    assert sorted(t.export()["keys"]) == [6, 7]
    assert not t.pull(keys_of(5)).any()                       # a first sighting again
    exported = t.export()
    assert list(exported["waiting_keys"]) == [5] and list(exported["waiting_seen"]) == [1]
    assert np.array_equal(t.pull(keys_of(5)), initial_rows(keys_of(5), 2, 1.0, 0))
    assert sorted(t.export()["keys"]) == [5, 7] and t.stats()["evictions"] == 2


def test_a_calls_own_keys_are_never_evicted():
    t = Table(2, "sgd", init_std=1.0, max_rows=4)
    t.pull(keys_of(1, 2))
    t.pull(keys_of(3, 4))
    batch = keys_of(1, 2, 8, 9)                               # 1 and 2 are the oldest, but in use now
    assert np.array_equal(t.pull(batch), initial_rows(batch, 2, 1.0, 0))
    assert sorted(t.export()["keys"]) == [1, 2, 8, 9]
    batch = keys_of(20, 21, 22, 23)                           # max_rows new keys: every row goes
    assert np.array_equal(t.pull(batch), initial_rows(batch, 2, 1.0, 0))
    assert sorted(t.export()["keys"]) == [20, 21, 22, 23] and t.stats()["evictions"] == 6


def test_a_training_pull_of_more_keys_than_max_rows_is_refused_and_changes_nothing():
    t = Table(2, "adam", init_std=1.0, max_rows=3)
    t.pull(keys_of(1, 2))
    t.push(keys_of(1, 2), np.ones((2, 2), np.float32))
    before = t.export()
    with pytest.raises(ValueError, match=r"4 keys, but the table holds at most 3 rows \(max_rows\): "
                                         "raise --table-max-rows or send fewer keys"):
        t.pull(keys_of(1, 2, 3, 4))
    assert_exports_equal(t.export(), before)
    rows = t.pull(keys_of(1, 2, 3, 4), train=False)           # creating nothing, these are served
    assert np.array_equal(rows[:2], before["rows"]) and not rows[2:].any()
    assert t.push(keys_of(1, 2, 3, 4), np.ones((4, 2), np.float32)) == 2
    assert t.stats()["rows"] == 2


def test_memory_stays_flat_under_a_stream_of_new_keys_at_the_cap():
    cap = 1000
    t = Table(4, "adam", init_std=0.1, max_rows=cap)
    stream = np.arange(11 * cap, dtype=np.int64) * 7919
    for lo in range(0, cap, 100):                             # fill to the cap
        t.pull(stream[lo:lo + 100])
    at_cap = t.stats()
    assert at_cap["rows"] == cap and t._w.shape[0] == cap     # the arena does not double past it
    for lo in range(cap, stream.size, 100):                   # then 10x the cap of new keys
        keys = stream[lo:lo + 100]
        t.pull(keys)
        t.push(keys, np.ones((100, 4), np.float32))
    s = t.stats()
    assert s["bytes"] == at_cap["bytes"]
    assert (s["rows"], s["keys_seen"], s["admissions"], s["evictions"]) == (cap, cap, 11 * cap, 10 * cap)
    assert np.array_equal(np.sort(t.export()["keys"]), stream[-cap:])    # the newest stay


# ---- validation ----------------------------------------------------------------------

@pytest.mark.parametrize("keys, message", [
    ([1, 2, 3], "numpy array of int64, got list"),
    (np.array([1, 2], np.int32), "int64, got array of int32"),
    (np.array([[1, 2]], np.int64), "1-D"),
    (np.array([1, 3, 2], np.int64), r"keys\[1\] = 3 and keys\[2\] = 2"),
    (np.array([1, 1], np.int64), "strictly increasing"),
    (np.array([-1, 4], np.int64), ">= 0"),
])
def test_check_keys_says_what_is_wrong(keys, message):
    with pytest.raises(ValueError, match=message):
        check_keys(keys)
    t = Table(2, init_std=1.0)
    t.pull(keys_of(0, 4))
    before = t.export()
    with pytest.raises(ValueError, match=message):
        t.pull(keys)
    with pytest.raises(ValueError, match=message):
        t.push(keys, np.zeros((2, 2), np.float32))
    assert_exports_equal(t.export(), before)


def test_empty_keys_are_a_batch():
    t = Table(3)
    check_keys(np.array([], np.int64))
    assert t.pull(np.array([], np.int64)).shape == (0, 3)
    assert t.push(np.array([], np.int64), np.zeros((0, 3), np.float32)) == 0


@pytest.mark.parametrize("grads, message", [
    (np.zeros((2, 4), np.float32), r"shape \(3, 4\)"),
    (np.zeros((3, 5), np.float32), r"shape \(3, 4\)"),
    (np.zeros(12, np.float32), r"shape \(3, 4\)"),
    (np.zeros((3, 4), np.float64), "float32"),
    ([[0.0] * 4] * 3, "float32"),
    (np.array([[0, 0, 0, np.nan]] + [[0] * 4] * 2, np.float32), "NaN"),
    (np.array([[0, 0, 0, 0], [0, np.inf, 0, 0], [0] * 4], np.float32), "infinite"),
])
@pytest.mark.parametrize("name", ["adagrad", "adam"])
def test_a_refused_push_changes_nothing(name, grads, message):
    t = Table(4, name, init_std=1.0)
    keys = keys_of(1, 2, 3)
    t.pull(keys)
    t.push(keys, np.ones((3, 4), np.float32))
    before = t.export()
    with pytest.raises(ValueError, match=message):
        t.push(keys, grads)
    assert_exports_equal(t.export(), before)


@pytest.mark.parametrize("kwargs, setting", [
    ({"dim": 0}, "dim"), ({"dim": 2.0}, "dim"), ({"dim": True}, "dim"),
    ({"optimizer": "rmsprop"}, "optimizer"), ({"lr": -0.1}, "lr"), ({"lr": float("nan")}, "lr"),
    ({"init_std": -1.0}, "init_std"), ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"),
    ({"admit_after": 0}, "admit_after"), ({"admit_after": 1.5}, "admit_after"),
    ({"eps": 0.0}, "eps"), ({"optimizer": "adam", "eps": -1e-8}, "eps"),
    ({"optimizer": "adam", "betas": (1.0, 0.9)}, r"betas\[0\]"),
    ({"optimizer": "adam", "betas": (0.9,)}, "betas"), ({"optimizer": "adam", "betas": "ab"}, "betas"),
    ({"initial_accumulator": -0.5}, "initial_accumulator"),
    ({"optimizer": "sgd", "eps": 1e-8}, "eps is not a setting of optimizer 'sgd'"),
    ({"optimizer": "adagrad", "betas": (0.8, 0.9)}, "betas is not a setting"),
    ({"optimizer": "sgd", "betas": np.array([0.8, 0.9])}, "betas is not a setting"),
    ({"optimizer": "adam", "initial_accumulator": 0.1}, "initial_accumulator is not a setting"),
])
def test_a_bad_setting_is_a_config_error_naming_it(kwargs, setting):
    with pytest.raises(ConfigError, match=setting):
        Table(**{"dim": 4, **kwargs})


# ---- stats, export and restore -------------------------------------------------------

def test_stats_count_calls_and_allocated_bytes():
    t = Table(8, "adam", init_std=1.0, admit_after=2)
    t.pull(keys_of(1, 2))
    t.pull(keys_of(1, 2, 3), train=False)
    t.pull(keys_of(2, 3))
    t.push(keys_of(1, 2, 3), np.ones((3, 8), np.float32))
    index = t._index.keys.nbytes + t._index.row.nbytes + t._index.seen.nbytes
    arena = t._w.nbytes + t._key.nbytes + t._stamp.nbytes + sum(a.nbytes for a in t._state.values())
    assert t.stats() == {"rows": 1, "keys_seen": 3, "admissions": 1, "evictions": 0, "ignored": 2,
                         "bytes": index + arena, "pushes": 1, "pulls": 3}
    assert arena == t._w.shape[0] * (8 * 4 * 3 + 4 + 8 + 8)   # w, m, v (float32), t (int32), key, stamp


def drive(table, rng, steps, pool):
    """Random training pulls, evaluation pulls and pushes; the pulls' results."""
    out = []
    for step in range(steps):
        keys = np.unique(rng.choice(pool, size=40))
        out.append(table.pull(keys, train=step % 4 != 3))
        table.push(keys, rng.standard_normal((keys.size, table.dim)).astype(np.float32))
    return out


@pytest.mark.parametrize("name, h", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_restore_of_an_export_answers_as_the_original(name, h):
    pool = np.arange(0, 3000, 3, dtype=np.int64) * 7919
    original = Table(6, name, 0.02, init_std=0.1, seed=8, admit_after=2, **h)
    drive(original, np.random.default_rng(0), 30, pool)
    exported = original.export()
    assert exported["waiting_keys"].size > 0 and exported["keys"].size > 0
    saved = io.BytesIO()
    np.savez(saved, **exported)                              # an export needs no pickle
    saved.seek(0)
    with np.load(saved, allow_pickle=False) as f:
        twin = Table.restore(dict(f))
    assert_exports_equal(twin.export(), exported)
    same = [k for k in original.stats() if k != "bytes"]          # capacities may differ
    assert [twin.stats()[k] for k in same] == [original.stats()[k] for k in same]
    a = drive(original, np.random.default_rng(1), 30, np.concatenate([pool, pool + 1]))
    b = drive(twin, np.random.default_rng(1), 30, np.concatenate([pool, pool + 1]))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert_exports_equal(twin.export(), original.export())


@pytest.mark.parametrize("name, h", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_restore_goes_on_evicting_as_the_original(name, h):
    pool = np.arange(1, 301, dtype=np.int64) * 7919           # 300 keys, at most 40 rows
    original = Table(6, name, 0.02, init_std=0.1, seed=8, admit_after=2, max_rows=40, **h)
    drive(original, np.random.default_rng(2), 30, pool)
    exported = original.export()
    assert original.stats()["evictions"] > 50 and exported["keys"].size == 40
    assert exported["stamps"].size == 40 and exported["stamps"].max() < exported["clock"]
    saved = io.BytesIO()
    np.savez(saved, **exported)
    saved.seek(0)
    with np.load(saved, allow_pickle=False) as f:
        twin = Table.restore(dict(f))
    assert_exports_equal(twin.export(), exported)
    a = drive(original, np.random.default_rng(3), 40, pool)
    b = drive(twin, np.random.default_rng(3), 40, pool)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert_exports_equal(twin.export(), original.export())
    same = [k for k in original.stats() if k != "bytes"]
    assert [twin.stats()[k] for k in same] == [original.stats()[k] for k in same]
    assert twin.stats()["evictions"] > exported["evictions"] + 50


def test_an_export_is_a_copy():
    t = Table(3, init_std=1.0)
    keys = keys_of(4, 9)
    t.pull(keys)
    exported = t.export()
    exported["rows"][:] = 0
    exported["keys"][:] = 0
    assert np.array_equal(t.pull(keys, train=False), initial_rows(keys, 3, 1.0, 0))


def test_restore_refuses_an_incomplete_or_inconsistent_export():
    t = Table(3, "adam", init_std=1.0, admit_after=3)
    t.pull(keys_of(1, 2))
    t.pull(keys_of(1, 2))
    t.pull(keys_of(1))
    good = t.export()
    for change, message in [
        (lambda d: d.pop("state.exp_avg"), "state.exp_avg"),
        (lambda d: d.update(rows=d["rows"].astype(np.float64)), "shape or dtype"),
        (lambda d: d.update(keys=np.array([2], np.int64)), "both has a row and waits"),
        (lambda d: d.update(waiting_seen=np.array([3], np.int32)), "admit_after"),
        (lambda d: d.update(lr=np.array([0.1, 0.2])), "0-d"),
        (lambda d: d.pop("clock"), "clock"),
        (lambda d: d.update(stamps=d["stamps"].astype(np.int32)), "shape or dtype"),
        (lambda d: d.update(stamps=d["stamps"] + 100), r"stamps must be in \[0, clock\)"),
        (lambda d: d.update(keys=np.array([1, 7], np.int64), max_rows=np.array(1)), "more than max_rows"),
    ]:
        d = {k: v.copy() for k, v in good.items()}
        change(d)
        with pytest.raises(DataError, match=message):
            Table.restore(d)
    with pytest.raises(ConfigError, match="admit_after"):
        Table.restore({**good, "admit_after": np.array(0)})


# ---- measurement ---------------------------------------------------------------------

def bench(rows=1_000_000, dim=17, batch=16_000, new=0.1, steps=30, seed=0):
    """Figures for ps/table.py at `rows` keys (adagrad, `dim` columns):
    - median ms of pull(train=True) + push of `batch` unique keys, a `new` share of them
      never seen, over `steps` steps that stay below the next doubling (1M + 30 * 1600
      keys < 2^20 rows and 2^21 * MAX_LOAD slots: the worst load, no doubling);
    - ms of the one pull that then doubles index and arena;
    - the index's bytes per key (its allocated arrays) and a dict {key: row}'s
      (tracemalloc: the dict and its int objects)."""
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, 2**63 - 1, rows + batch * (steps + 2), dtype=np.int64))
    rng.shuffle(keys)
    old, fresh = keys[:rows], keys[rows:]
    table = Table(dim, "adagrad", init_std=0.01)
    for lo in range(0, rows, 100_000):
        table.pull(np.sort(old[lo:lo + 100_000]))
    n_new, times, pulls = int(batch * new), [], []
    for step in range(steps):
        b = np.unique(np.concatenate([rng.choice(old, batch - n_new, replace=False),
                                      fresh[step * n_new:(step + 1) * n_new]]))
        g = rng.standard_normal((b.size, dim)).astype(np.float32)
        t0 = time.perf_counter()
        table.pull(b)
        t1 = time.perf_counter()
        table.push(b, g)
        times.append(time.perf_counter() - t0)
        pulls.append(t1 - t0)
    slots, index_bytes = table._index.capacity, table._index.nbytes
    t0 = time.perf_counter()
    table.pull(np.sort(fresh[steps * n_new:steps * n_new + batch]))
    doubling_ms = 1e3 * (time.perf_counter() - t0)
    assert table._index.capacity == 2 * slots
    tracemalloc.start()
    d = {int(k): i for i, k in enumerate(old)}
    dict_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del d
    return {"ms_pull_push": 1e3 * float(np.median(times)), "ms_pull": 1e3 * float(np.median(pulls)),
            "keys": rows + steps * n_new, "index_slots": slots,
            "index_bytes_per_key": index_bytes / (rows + steps * n_new),
            "dict_bytes_per_key": dict_bytes / rows, "ms_doubling_pull": doubling_ms}


def bench_eviction(rows=1_000_000, dim=17, batch=16_000, steps=9, seed=0):
    """Median ms of a training pull of `batch` keys, all new, into a table of `rows` rows
    (adagrad, `dim` columns): with max_rows = rows (each pull evicts `batch` rows), and
    without a cap, over the pulls that stay below the next doubling (2^20 rows)."""
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, 2**63 - 1, rows + batch * steps, dtype=np.int64))
    rng.shuffle(keys)
    old, fresh = keys[:rows], keys[rows:]
    out = {}
    for cap, n in (("capped", steps), ("uncapped", min(steps, ((1 << 20) - rows) // batch))):
        table = Table(dim, "adagrad", init_std=0.01, max_rows=rows if cap == "capped" else 0)
        for lo in range(0, rows, 100_000):
            table.pull(np.sort(old[lo:lo + 100_000]))
        times = []
        for step in range(n):
            b = np.sort(fresh[step * batch:(step + 1) * batch])
            t0 = time.perf_counter()
            table.pull(b)
            times.append(time.perf_counter() - t0)
        assert table.stats()["evictions"] == (n * batch if cap == "capped" else 0)
        out[f"ms_new_pull_{cap}"] = 1e3 * float(np.median(times))
    return out


if __name__ == "__main__":
    for name, value in {**bench(), **bench_eviction()}.items():
        print(f"{name:>22} {value:.3f}")
