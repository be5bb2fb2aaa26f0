"""One server's sparse embedding table: float32 rows of `dim` columns keyed by int64.

Keys are non-negative int64 (callers hash their features to 63 bits). An Index
(ps/index.py: open addressing in NumPy over whole batches) maps each key to a slot
holding its row number, or -1 while the key is seen but not admitted, and its
sightings. Rows live in an arena, rows 0 to rows-1, with the optimizer state, the
row's key and its last-use stamp beside them under the same numbers.

    table = Table(dim=16, optimizer="adagrad", lr=0.05, init_std=0.01, seed=7, max_rows=10**6)
    w = table.pull(keys)            # (n, dim) float32; keys sorted, unique, >= 0
    table.push(keys, grads)         # grads (n, dim) float32: one summed gradient a key

The cap, max_rows (0: none). A row is used by a training pull or a push of its key;
`clock` counts uses, one per key, and each row keeps the clock of its last use as its
stamp, so stamps are unique and the keys of one call are used in key order. A training
pull first stamps its keys' rows, then counts the rows it will admit; past max_rows it
evicts the rows of the smallest stamps (np.argpartition over the rows' stamps), whose
keys leave the index, sightings and all; then it admits.
- Evicted keys are deleted from the index, which has no tombstones (see ps/index.py):
  probes stay as short as if the evicted keys had never come, but the deletion moves
  other keys, so the pull then finds its own keys again.
- Row slots: an eviction only makes room for the rows the same pull admits, so the
  evicted rows are all taken again at once (their numbers, in order, then new rows
  after the last): a free list that never outlives the call. Rows stay 0 to rows-1, no
  compaction, nothing about free rows to export, and the arena stops growing at
  max_rows, so under a steady stream of new keys at the cap the bytes stay flat.

Guarantees:
- A key's first row depends on the key, `seed` and `init_std` only, not on the server,
  the batch or the order: zeros for init_std 0, else normal(0, init_std) from a
  counter-based hash of (seed, key, column). Tables that partition keys differently
  start every key from the same row.
- A training pull counts one sighting per key (until admission); a key is admitted, its
  row and optimizer state created, at its `admit_after`-th. Before that it reads as
  zeros and pushes to it are ignored (counted). An evaluation pull (train=False)
  creates nothing and counts nothing.
- pull returns a new array, never a view of the arena.
- A call with bad keys or gradients raises ValueError before anything changes: no
  row, no state, no counter, no stamp. So does a training pull of more keys than
  max_rows.
- With max_rows, the table holds at most max_rows rows after every call. The rows
  evicted to make room are the least recently used (an evaluation pull is no use; rows
  last used by one call go in key order), never a row of the pull's own keys. An
  evicted key is forgotten: if it comes back it is new (its first row, fresh optimizer
  state, admit_after sightings again). Keys waiting for admission hold no row and are
  not evicted: the cap bounds rows, not index entries (see Limit).
- export() holds the whole table as arrays, stamps and clock included; restore(export())
  answers every later call, evictions included, exactly as the original would (only
  the capacities, and so stats' bytes, may differ).

Limit: keys seen but not yet admitted (admit_after > 1) hold index entries (32 B a key
at load 1/2) and are never evicted, so keys each seen fewer than admit_after times grow
the index, and stats' keys_seen and bytes, without bound, whatever max_rows.

The optimizers and their update rules are in ps/rowopt.py; the measured cost is in the
comment below the constants.
"""

from __future__ import annotations

import numpy as np

from downpour.common.errors import ConfigError, DataError
from downpour.common.nn.hashing import GAMMA, splitmix64
from downpour.ps.index import Index
from downpour.ps.rowopt import DEFAULTS, OPTIMIZERS, RowState, real, whole

MIN_ROWS = 64              # initial arena capacity, rows
MAX_DIM = 1 << 20          # columns a row may have
MAX_ADMIT_AFTER = 2**31 - 1    # sightings are int32
MAX_ROWS = 2**31 - 1           # the index holds row numbers as int32
SETTINGS = ("dim", "optimizer", "lr", "init_std", "seed", "admit_after", "max_rows", "eps", "betas",
            "initial_accumulator")      # Table's arguments, as export() names them
COUNTERS = ("admissions", "evictions", "ignored", "pushes", "pulls")

_U64 = np.uint64
_LOW32 = _U64(0xFFFFFFFF)
_2_TO_MINUS_32 = 2.0**-32

# Measured with `python tests/test_table.py` (its `bench`), numpy 2.4, one core of the
# 2-core development VM, at 1,048,000 keys, dim 17, adagrad, at the worst load (0.4997):
#   pull(train=True) + push of 16,000 unique keys, 10% of them new:  4.0 ms (median; the
#     pull 2.1 ms, of which ~0.6 ms creates the 1,600 new rows, mostly float64 cos);
#   the one pull that then doubles index and arena: 150-360 ms;
#   the index: 32 B a key at load 1/2, 64 B just after a doubling (see ps/index.py);
#   the arena: a row's dim float32, its optimizer state, and 16 B (key, stamp: int64).
# With `bench_eviction`, the VM busy with other work (load 2.3 on 2 cores; it put the
# figures above at 5.3-5.8 ms and 2.6-2.8 ms), a training pull of 16,000 new keys into a
# full table of 1,000,000 rows, dim 17, adagrad (median of 9 pulls capped, of the 3
# before the next doubling uncapped; 3 runs):
#   with max_rows 1,000,000, each pull evicting 16,000 rows: 16 ms (16.5, 15.8, 16.3),
#     of which eviction 7.3 ms: the index's delete of the evicted keys ~6 ms (see
#     ps/index.py), argpartition over the stamps 1.2 ms; then ~0.8 ms finding the
#     pull's keys again (the delete moved some);
#   without a cap: 9 ms (9.1, 8.9, 8.3), most of it the 16,000 first rows.


def initial_rows(keys: np.ndarray, dim: int, init_std: float, seed: int) -> np.ndarray:
    """(len(keys), dim) float32: the first row of each key.

    Columns 2j and 2j+1 are init_std * (z0, z1), a standard normal pair by Box-Muller from
    the 64 bits h = splitmix64(splitmix64(splitmix64(seed) ^ key) + j * 0x9E3779B97F4A7C15),
    the j-th draw of a splitmix64 stream seeded by key and seed: u1 = ((h >> 32) + 1) / 2^32
    in (0, 1], u2 = (h mod 2^32) / 2^32, z0, z1 = sqrt(-2 ln u1) (cos, sin)(2 pi u2), in
    float64 (NumPy's float64 cos and log are libm's, so rounded to float32 the rows agree
    across machines; its float32 ones are SIMD code that may differ in the last bit).
    """
    if init_std == 0:
        return np.zeros((keys.size, dim), np.float32)
    salt = splitmix64(np.array([seed], _U64))
    base = splitmix64(keys.astype(_U64) ^ salt)                             # (n,)
    h = splitmix64(base[:, None] + np.arange((dim + 1) // 2, dtype=_U64) * GAMMA)  # (n, pairs)
    u1 = ((h >> _U64(32)).astype(np.float64) + 1.0) * _2_TO_MINUS_32
    angle = (h & _LOW32).astype(np.float64) * (2.0 * np.pi * _2_TO_MINUS_32)
    radius = init_std * np.sqrt(-2.0 * np.log(u1))
    cos = np.cos(angle)
    sin = np.copysign(np.sqrt(1.0 - cos * cos), np.pi - angle)   # half the cost of np.sin
    z = np.empty((keys.size, 2 * h.shape[1]), np.float32)         # (n, dim rounded up to even)
    z[:, 0::2] = radius * cos
    z[:, 1::2] = radius * sin
    return np.ascontiguousarray(z[:, :dim])


def check_keys(keys) -> None:
    """Return if `keys` is a 1-D int64 array, strictly increasing and >= 0; else raise
    ValueError saying what is wrong (the server answers it as a protocol error)."""
    if not isinstance(keys, np.ndarray) or keys.dtype != np.int64:
        what = f"array of {keys.dtype}" if isinstance(keys, np.ndarray) else type(keys).__name__
        raise ValueError(f"keys must be a numpy array of int64, got {what}")
    if keys.ndim != 1:
        raise ValueError(f"keys must be 1-D, got shape {keys.shape}")
    bad = np.flatnonzero(np.diff(keys) <= 0)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"keys must be strictly increasing (sorted, no duplicates), but keys[{i}] = "
                         f"{keys[i]} and keys[{i + 1}] = {keys[i + 1]}; np.unique(keys) makes them so")
    if keys.size and keys[0] < 0:
        raise ValueError(f"keys must be >= 0 (-1 marks an empty slot), got {keys[0]}")


def _records(a: np.ndarray) -> np.ndarray:
    """C-contiguous `a` (n, ...) as (n,) records of one row each: fancy assignment to a
    1-D record view copies a row in one go, twice as fast as to `a` itself."""
    return a.reshape(a.shape[0], -1).view(np.dtype((np.void, a[:1].nbytes))).reshape(-1)


def _grown(a: np.ndarray, rows: int, keep: int) -> np.ndarray:
    """A new array of `rows` rows holding a's first `keep`; the rest uninitialised."""
    out = np.empty((rows, *a.shape[1:]), a.dtype)
    out[:keep] = a[:keep]
    return out


# -- the table ---------------------------------------------------------------------------

class Table:
    """One server's rows: pull, push, stats, export/restore."""

    def __init__(self, dim: int, optimizer: str = "adagrad", lr: float = 0.05, *,
                 init_std: float = 0.0, seed: int = 0, admit_after: int = 1, max_rows: int = 0,
                 eps: float | None = None, betas: tuple = (0.9, 0.999), initial_accumulator: float = 0.0):
        """Raises ConfigError naming the setting if one is invalid, or if it is set but
        the optimizer has no use for it (eps for sgd, betas but for adam,
        initial_accumulator but for adagrad). eps None: the optimizer's default
        (adagrad 1e-10, adam 1e-8). max_rows 0: no cap."""
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        self.dim = whole("dim", dim, 1, MAX_DIM)
        self.lr = real("lr", lr)
        self.init_std = real("init_std", init_std)
        self.seed = whole("seed", seed, 0, 2**64 - 1)
        self.admit_after = whole("admit_after", admit_after, 1, MAX_ADMIT_AFTER)
        self.max_rows = whole("max_rows", max_rows, 0, MAX_ROWS)
        kind, given = OPTIMIZERS[optimizer], {"eps": eps, "betas": betas,
                                              "initial_accumulator": initial_accumulator}
        for name, value in given.items():
            if name not in kind.hyper and not np.array_equal(value, DEFAULTS[name]):
                raise ConfigError(f"{name} is not a setting of optimizer {optimizer!r} "
                                  f"(its settings: {', '.join(('lr',) + kind.hyper)})")
        self.opt = kind(self.lr, **{k: v for k, v in given.items() if k in kind.hyper and v is not None})
        self._index = Index()
        self._n = 0                                               # rows admitted: rows 0 .. n-1
        self._w = np.empty((MIN_ROWS, self.dim), np.float32)      # (row capacity, dim)
        self._state = {name: np.empty(self._state_shape(MIN_ROWS, spec), spec.dtype)
                       for name, spec in self.opt.state.items()}
        self._key = np.empty(MIN_ROWS, np.int64)                  # (row capacity,) each row's key
        self._stamp = np.empty(MIN_ROWS, np.int64)                # each row's clock at its last use
        self.clock = 0                                            # key uses so far (see _uses)
        self.admissions = self.evictions = self.ignored = self.pushes = self.pulls = 0

    def _state_shape(self, rows: int, spec: RowState) -> tuple:
        return (rows, self.dim) if spec.per_column else (rows,)

    # -- the verbs --------------------------------------------------------------------
    def pull(self, keys: np.ndarray, *, train: bool = True) -> np.ndarray:
        """(len(keys), dim) float32, a new array: each key's row, zeros for keys without one.

        keys: see check_keys (ValueError). train: use the keys' rows (see max_rows), count
        a sighting per key not yet admitted and admit those reaching admit_after (their
        rows created first, so they read their initial row), evicting the least recently
        used other rows first if max_rows would be passed. ValueError before any change if
        there are more keys than max_rows. train=False changes nothing but the pull count."""
        check_keys(keys)
        if train and self.max_rows and keys.size > self.max_rows:
            raise ValueError(f"a training pull of {keys.size:,} keys, but the table holds at most "
                             f"{self.max_rows:,} rows (max_rows): raise --table-max-rows or send "
                             "fewer keys a pull")
        self.pulls += 1
        slots = self._index.find(keys)
        rows = np.where(slots >= 0, self._index.row[slots], -1)
        if train:
            rows = self._train(keys, slots, rows)
        out = np.take(self._w, rows, axis=0)                    # (n, dim); row -1 reads the last
        out[rows < 0] = 0
        return out

    def push(self, keys: np.ndarray, grads: np.ndarray) -> int:
        """Apply the optimizer to the rows of `keys` with `grads` (len(keys), dim) float32,
        only read; keys without a row are ignored and counted. Returns the rows updated,
        which count as used. ValueError (bad keys, grads of another shape or dtype,
        non-finite values) before any change."""
        check_keys(keys)
        if not isinstance(grads, np.ndarray) or grads.dtype != np.float32 \
                or grads.shape != (keys.size, self.dim):
            got = f"{grads.dtype} {grads.shape}" if isinstance(grads, np.ndarray) else type(grads).__name__
            raise ValueError(f"grads must be a float32 array of shape ({keys.size}, {self.dim}) "
                             f"(one row per key), got {got}")
        if not np.isfinite(grads).all():
            raise ValueError("grads hold NaN or infinite values; nothing was applied")
        slots = self._index.find(keys)
        rows = np.where(slots >= 0, self._index.row[slots], -1)
        have = rows >= 0
        updated = int(have.sum())
        self.pushes += 1
        self.ignored += keys.size - updated
        if updated < keys.size:
            rows, grads = rows[have], grads[have]
        if updated:
            self._stamp[rows] = self._uses(updated)
            self._step(rows, grads)
        return updated

    def stats(self) -> dict:
        """rows, keys_seen (index entries: rows and keys waiting), admissions, evictions,
        ignored (pushed keys without a row), bytes (allocated: arena, optimizer state,
        index), pushes, pulls."""
        arena = sum(a.nbytes for a in (self._w, self._key, self._stamp, *self._state.values()))
        return {"rows": self._n, "keys_seen": len(self._index), "admissions": self.admissions,
                "evictions": self.evictions, "ignored": self.ignored,
                "bytes": arena + self._index.nbytes, "pushes": self.pushes, "pulls": self.pulls}

    # -- steps ------------------------------------------------------------------------
    def _uses(self, n: int) -> np.ndarray:
        """(n,) int64: the stamps of one call's n keys, in key order, after every earlier
        use; the clock moves past them. Stamps are unique, so least recently used is a total
        order: rows last used by one call go in key order."""
        stamps = np.arange(self.clock, self.clock + n, dtype=np.int64)
        self.clock += n
        return stamps

    def _train(self, keys: np.ndarray, slots: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """A training pull's changes to the table, in order: stamp the keys' rows, evict to
        make room under max_rows, count sightings, admit. Returns the keys' rows (-1: waits)."""
        stamps = self._uses(keys.size)
        have = rows >= 0
        self._stamp[rows[have]] = stamps[have]           # now the newest: never evicted below
        free = np.empty(0, np.intp)
        if self.max_rows:
            over = self._n + self._admitting(slots, rows) - self.max_rows
            if over > 0:                 # at most the rows of other keys, as len(keys) <= max_rows
                free = self._evict(over)
                slots = self._index.find(keys)           # removal moved keys of the index
        new = np.flatnonzero(slots < 0)
        if new.size:
            rehashed = self._index.grow(len(self._index) + new.size)
            slots[new] = self._index.insert(keys[new])
            if rehashed:                                 # every key moved
                slots = self._index.find(keys)
        waiting = np.flatnonzero(~have)
        if waiting.size:
            rows[waiting] = self._sight(keys[waiting], slots[waiting], stamps[waiting], free)
        return rows

    def _admitting(self, slots: np.ndarray, rows: np.ndarray) -> int:
        """How many of a training pull's keys (their slots, rows) its sightings will admit."""
        waiting = slots[(slots >= 0) & (rows < 0)]
        ready = int(np.count_nonzero(self._index.seen[waiting] >= self.admit_after - 1))
        return ready + (int(np.count_nonzero(slots < 0)) if self.admit_after == 1 else 0)

    def _evict(self, count: int) -> np.ndarray:
        """Forget the `count` least recently used rows: their index entries (sightings with
        them) go, their rows stay until reused. Returns their row numbers, sorted."""
        n = self._n
        rows = np.arange(n) if count == n else np.argpartition(self._stamp[:n], count - 1)[:count]
        rows.sort()
        self._index.delete(self._key[rows])
        self.evictions += count
        return rows

    def _sight(self, keys: np.ndarray, slots: np.ndarray, stamps: np.ndarray,
               free: np.ndarray) -> np.ndarray:
        """Count a sighting of keys without rows; admit those at admit_after, in key
        order, into the `free` rows first. Returns their rows (-1: still waiting)."""
        self._index.seen[slots] += 1
        ready = np.flatnonzero(self._index.seen[slots] >= self.admit_after)
        if ready.size:
            self._admit(keys[ready], slots[ready], stamps[ready], free)
        return self._index.row[slots]

    def _admit(self, keys: np.ndarray, slots: np.ndarray, stamps: np.ndarray, free: np.ndarray) -> None:
        """Create the rows of `keys` in the `free` rows (no more of them than keys: eviction
        made room for exactly these), then after the last row."""
        grow = keys.size - free.size
        rows = np.concatenate([free, np.arange(self._n, self._n + grow)])
        self._reserve(self._n + grow)
        _records(self._w)[rows] = _records(initial_rows(keys, self.dim, self.init_std, self.seed))
        for name, spec in self.opt.state.items():
            self._state[name][rows] = spec.initial
        self._key[rows], self._stamp[rows] = keys, stamps
        self._index.row[slots] = rows
        self._n += grow
        self.admissions += keys.size

    def _reserve(self, rows: int) -> None:
        """Double the arena (rows, their keys, stamps and state) until it holds `rows`, but
        never past max_rows."""
        capacity = self._w.shape[0]
        while capacity < rows:
            capacity *= 2
        if self.max_rows:
            capacity = min(capacity, max(self.max_rows, rows))
        if capacity > self._w.shape[0]:
            self._w, self._key, self._stamp = (_grown(a, capacity, self._n)
                                               for a in (self._w, self._key, self._stamp))
            self._state = {name: _grown(a, capacity, self._n) for name, a in self._state.items()}

    def _step(self, rows: np.ndarray, grads: np.ndarray) -> None:
        """Gather the rows and their state, update them, scatter them back (rows unique)."""
        w = np.take(self._w, rows, axis=0)                     # (n, dim)
        state = {name: np.take(a, rows, axis=0) for name, a in self._state.items()}
        self.opt.update(w, state, grads)
        _records(self._w)[rows] = _records(w)
        for name, a in self._state.items():
            _records(a)[rows] = _records(state[name])

    # -- checkpoints ------------------------------------------------------------------
    def settings(self) -> dict:
        """The arguments that build this table's twin: Table(**table.settings())."""
        given = {k: getattr(self.opt, k) for k in self.opt.hyper}
        return {"dim": self.dim, "optimizer": self.opt.name, "lr": self.lr, "init_std": self.init_std,
                "seed": self.seed, "admit_after": self.admit_after, "max_rows": self.max_rows, **given}

    def export(self) -> dict[str, np.ndarray]:
        """The whole table as new arrays: the settings (0-d; betas (2,)), the COUNTERS and
        the `clock` (0-d), `keys` (rows,), `rows` (rows, dim) and `stamps` (rows,) in row
        order, `state.<name>` per optimizer state in row order, and the keys seen but not
        admitted, sorted (`waiting_keys`), with their sightings (`waiting_seen`)."""
        n = self._n
        used = self._index.occupied()
        used = used[self._index.row[used] < 0]
        waiting = used[np.argsort(self._index.keys[used])]
        out = {k: np.array(v, np.uint64 if k == "seed" else None) for k, v in self.settings().items()}
        out.update((k, np.array(getattr(self, k))) for k in COUNTERS)
        out.update(clock=np.array(self.clock, np.int64), keys=self._key[:n].copy(),
                   rows=self._w[:n].copy(), stamps=self._stamp[:n].copy(),
                   waiting_keys=self._index.keys[waiting], waiting_seen=self._index.seen[waiting])
        out.update((f"state.{name}", a[:n].copy()) for name, a in self._state.items())
        return out

    @classmethod
    def restore(cls, d: dict[str, np.ndarray]) -> Table:
        """The table whose export() `d` is: every later call answers as the original's
        would. ConfigError for bad settings, DataError for missing or inconsistent arrays.
        (An export without max_rows is of a table without a cap.)"""
        try:
            settings = {k: tuple(d[k].tolist()) if k == "betas" else d[k].item()
                        for k in SETTINGS if k in d}
        except (AttributeError, ValueError) as e:
            raise DataError(f"a setting in Table.export() is not a 0-d array: {e}") from None
        table = cls(**settings)
        table._load(d)
        return table

    def _load(self, d: dict[str, np.ndarray]) -> None:
        """Fill this new table with export() `d`'s rows, state, stamps, index and counters."""
        try:
            keys, rows, stamps, wkeys, wseen = (d[k] for k in ("keys", "rows", "stamps", "waiting_keys",
                                                               "waiting_seen"))
            state = {name: d[f"state.{name}"] for name in self.opt.state}
            counters, clock = [int(d[k]) for k in COUNTERS], int(d["clock"])
            n = keys.size
            if self.max_rows and n > self.max_rows:
                raise ValueError(f"{n} rows, more than max_rows {self.max_rows}")
            expected = [(rows, (n, self.dim), np.float32), (stamps, (n,), np.int64),
                        (wseen, wkeys.shape, np.int32)]
            expected += [(state[name], self._state_shape(n, spec), spec.dtype)
                         for name, spec in self.opt.state.items()]
            if any(a.shape != shape or a.dtype != dtype for a, shape, dtype in expected):
                raise ValueError("an array has the wrong shape or dtype")
            check_keys(np.sort(keys))
            check_keys(wkeys)
            if wseen.size and not (wseen.min() >= 1 and wseen.max() < self.admit_after):
                raise ValueError("waiting_seen must be in [1, admit_after)")
            if np.intersect1d(keys, wkeys).size:
                raise ValueError("a key both has a row and waits")
            if n and not (stamps.min() >= 0 and stamps.max() < clock):
                raise ValueError("stamps must be in [0, clock)")
        except KeyError as e:
            raise DataError(f"Table.export() array {e} is missing") from None
        except (AttributeError, TypeError, ValueError) as e:
            raise DataError(f"inconsistent Table.export(): {e}") from None
        slots = self._index.insert(np.concatenate([keys, wkeys]))
        self._index.row[slots[:n]], self._index.seen[slots[:n]] = np.arange(n), self.admit_after
        self._index.seen[slots[n:]] = wseen
        self._reserve(n)
        self._n = n
        self._w[:n], self._key[:n], self._stamp[:n] = rows, keys, stamps
        for name, a in state.items():
            self._state[name][:n] = a
        for k, v in zip(COUNTERS, counters):
            setattr(self, k, v)
        self.clock = clock
