"""One server's sparse embedding table: float32 rows of `dim` columns keyed by int64.

Keys are non-negative int64 (callers hash their features to 63 bits; -1 marks an
empty slot). An open-addressing index (linear probing, load factor <= 1/2, doubled
with a vectorized rehash) maps each key to a slot holding its row number, or -1 while
the key is seen but not admitted, and its sightings. Rows live in an arena, numbered
in order of admission, with the optimizer state beside them under the same numbers.

    table = Table(dim=16, optimizer="adagrad", lr=0.05, init_std=0.01, seed=7)
    w = table.pull(keys)            # (n, dim) float32; keys sorted, unique, >= 0
    table.push(keys, grads)         # grads (n, dim) float32: one summed gradient a key

Every batch operation loops over probe rounds, never over keys: a round reads, for
each key still probing, its home slot (round 1) or the next PROBE_WINDOW slots (one
cache line); keys of one batch that want the same empty slot get it by np.unique on
the slots (the first wins; the others probe on).

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
  row, no state, no counter.
- export() holds the whole table as arrays; restore(export()) answers every later call
  exactly as the original would (only the capacities, and so stats' bytes, may differ).

The update rules are written out in sgd_update, adagrad_update and lazy_adam_update;
the measured cost is in the comment below the constants.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from downpour.common.errors import ConfigError, DataError
from downpour.common.nn.hashing import GAMMA, splitmix64

EMPTY = -1                 # the key of an empty slot; real keys are >= 0
MAX_LOAD = 0.5             # index entries per slot, at most
MIN_SLOTS = 64             # initial index capacity (a power of two)
PROBE_WINDOW = 8           # slots a probe round reads after the first (8 int64: a cache line)
REHASH_CHUNK = 1 << 16     # keys placed per round trip while rehashing
MIN_ROWS = 64              # initial arena capacity, rows
MAX_DIM = 1 << 20          # columns a row may have
MAX_ADMIT_AFTER = 2**31 - 1    # sightings are int32
SETTINGS = ("dim", "optimizer", "lr", "init_std", "seed", "admit_after", "eps", "betas",
            "initial_accumulator")      # Table's arguments, as export() names them
COUNTERS = ("admissions", "ignored", "pushes", "pulls")

_U64 = np.uint64
_LOW32 = _U64(0xFFFFFFFF)
_2_TO_MINUS_32 = 2.0**-32

# Measured with `python tests/test_table.py` (its `bench`), numpy 2.4, one core of the
# 2-core development VM, at 1,048,000 keys, dim 17, adagrad, at the worst load (0.4997):
#   pull(train=True) + push of 16,000 unique keys, 10% of them new:  4.0 ms (median; the
#     pull 2.1 ms, of which ~0.6 ms creates the 1,600 new rows, mostly float64 cos);
#   the one pull that then doubles index and arena: 150-360 ms;
#   the index: 16 B a slot (key int64, row int32, sightings int32), 32 B a key at load
#     1/2 and 64 B just after a doubling, against 105 B a key for a dict {key: row}
#     (tracemalloc: the dict and its int objects).


def home_slots(keys: np.ndarray, capacity: int) -> np.ndarray:
    """The slot where each key's probe starts: splitmix64(key) mod capacity (a power of
    two). The keys are hashes already; mixing them again costs little and protects
    the index from keys that are not."""
    return (splitmix64(keys.astype(_U64)) & _U64(capacity - 1)).astype(np.intp)


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


# -- hyperparameters -------------------------------------------------------------------------

def _real(name, value, what="a finite number >= 0", ok=lambda x: x >= 0) -> float:
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and ok(value)):
        raise ConfigError(f"{name} must be {what}, got {value!r}")
    return float(value)


def _whole(name, value, lo, hi) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def _betas(value) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ConfigError(f"betas must be a pair (beta1, beta2) of numbers in [0, 1), got {value!r}")
    return tuple(_real(f"betas[{i}]", b, "a number in [0, 1)", lambda x: 0 <= x < 1)
                 for i, b in enumerate(value))


# -- per-row optimizers: validated hyperparameters, state per row, the update ---------------

class RowState(NamedTuple):
    """One array of optimizer state beside the arena: (rows, dim) if per_column, else
    (rows,); a row's entries are set to `initial` when the row is admitted."""

    per_column: bool
    dtype: type
    initial: float


def sgd_update(w, g, lr) -> None:
    """w <- w - lr g. w (n, dim) updated in place."""
    w -= lr * g


def adagrad_update(w, acc, g, lr, eps) -> None:
    """acc <- acc + g^2;  w <- w - lr g / (sqrt(acc) + eps). w, acc (n, dim) in place."""
    acc += g * g
    step = np.sqrt(acc)
    step += eps
    np.divide(g, step, out=step)
    step *= lr
    w -= step


def lazy_adam_update(w, m, v, t, g, lr, b1, b2, eps) -> None:
    """Adam on the rows of one push, each with its own step count t. In place:

        t <- t + 1
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        w <- w - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    w, m, v, g: (n, dim); t: (n,) int32. Dense Adam decays m and v of every element at
    every step, those with a zero gradient too, and shares one t. Here, as in
    torch.optim.SparseAdam and TF's LazyAdam, a row's m and v move only when the row is
    pushed; unlike them (one t per tensor) each row also keeps its own t, so its bias
    correction counts the updates its m and v have had.
    """
    t += 1
    m *= b1
    m += (1 - b1) * g
    v *= b2
    v += (1 - b2) * (g * g)
    t64 = t.astype(np.float64)[:, None]
    bc1 = (1 - b1**t64).astype(np.float32)           # (n, 1)
    bc2 = (1 - b2**t64).astype(np.float32)
    denom = np.sqrt(v / bc2)
    denom += eps
    w -= lr * (m / bc1) / denom


class Sgd:
    """Plain SGD; no state."""

    name, hyper, state = "sgd", (), {}

    def __init__(self, lr: float):
        self.lr = lr

    def update(self, w, state, g):
        sgd_update(w, g, self.lr)


class Adagrad:
    """Adagrad (torch's, without lr_decay); state `sum` of squared gradients."""

    name, hyper = "adagrad", ("eps", "initial_accumulator")

    def __init__(self, lr: float, eps: float = 1e-10, initial_accumulator: float = 0.0):
        self.lr, self.eps = lr, _real("eps", eps, "a finite number > 0", lambda x: x > 0)
        self.initial_accumulator = _real("initial_accumulator", initial_accumulator)
        self.state = {"sum": RowState(True, np.float32, self.initial_accumulator)}

    def update(self, w, state, g):
        adagrad_update(w, state["sum"], g, self.lr, self.eps)


class LazyAdam:
    """Lazy Adam with a step count per row; state `exp_avg` (m), `exp_avg_sq` (v), `step` (t)."""

    name, hyper = "adam", ("eps", "betas")
    state = {"exp_avg": RowState(True, np.float32, 0.0), "exp_avg_sq": RowState(True, np.float32, 0.0),
             "step": RowState(False, np.int32, 0)}

    def __init__(self, lr: float, eps: float = 1e-8, betas=(0.9, 0.999)):
        self.lr, self.betas = lr, _betas(betas)   # (beta1, beta2)
        self.eps = _real("eps", eps, "a finite number > 0", lambda x: x > 0)

    def update(self, w, state, g):
        lazy_adam_update(w, state["exp_avg"], state["exp_avg_sq"], state["step"], g,
                         self.lr, *self.betas, self.eps)


OPTIMIZERS = {o.name: o for o in (Sgd, Adagrad, LazyAdam)}
_DEFAULTS = {"eps": None, "betas": (0.9, 0.999), "initial_accumulator": 0.0}   # Table's


# -- the index ---------------------------------------------------------------------------

class _Index:
    """Open addressing with linear probing: key -> slot; per slot a row number (-1: not
    admitted) and a sighting count. At most MAX_LOAD of the slots are used."""

    def __init__(self, capacity: int = MIN_SLOTS):
        self.keys = np.full(capacity, EMPTY, np.int64)     # (capacity,)
        self.row = np.full(capacity, -1, np.int32)
        self.seen = np.zeros(capacity, np.int32)
        self.used = 0

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.row.nbytes + self.seen.nbytes

    def find(self, keys: np.ndarray) -> np.ndarray:
        """(n,) intp: the slot of each key, -1 where it has none."""
        pos = home_slots(keys, self.keys.size)
        there = self.keys[pos]                       # round 1: most keys sit in their home slot
        hit = there == keys
        slots = np.where(hit, pos, -1)
        todo = np.flatnonzero(~hit & (there != EMPTY))
        want, pos = keys[todo], pos[todo] + 1
        while todo.size:                             # later rounds: the next PROBE_WINDOW slots
            cand, there = self._probe(pos, PROBE_WINDOW)
            stop = (there == want[:, None]) | (there == EMPTY)   # the key, or the end of its run
            first = stop.argmax(axis=1)
            every = np.arange(todo.size)
            settled = stop[every, first]
            hit = settled & (there[every, first] == want)
            slots[todo[hit]] = cand[every, first][hit]
            todo, want, pos = todo[~settled], want[~settled], pos[~settled] + PROBE_WINDOW
        return slots

    def add(self, keys: np.ndarray) -> np.ndarray:
        """(n,) slots given to `keys` (unique, none in the index), row -1, sightings 0;
        doubles the capacity first while the load would pass MAX_LOAD (every slot that
        find() gave before may then be another)."""
        capacity = self.keys.size
        while self.used + keys.size > capacity * MAX_LOAD:
            capacity *= 2
        if capacity > self.keys.size:
            self._rehash(capacity)
        self.used += keys.size
        return self._place(keys)

    def _probe(self, pos: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, width) slots pos, pos + 1, ... (wrapping around), and the keys in them."""
        cand = (pos[:, None] + np.arange(width)) & (self.keys.size - 1)
        return cand, self.keys[cand]

    def _place(self, keys: np.ndarray) -> np.ndarray:
        """Write `keys` (unique, absent) into the first empty slot of their runs."""
        slots = np.empty(keys.size, np.intp)
        todo = np.arange(keys.size)
        pos, width = home_slots(keys, self.keys.size), 1
        while todo.size:
            cand, there = self._probe(pos, width)
            free = there == EMPTY
            first = free.argmax(axis=1)
            has = np.flatnonzero(free[np.arange(todo.size), first])
            target = cand[has, first[has]]
            won, i = np.unique(target, return_index=True)      # one winner a slot
            winners = has[i]
            self.keys[won] = keys[todo[winners]]
            slots[todo[winners]] = won
            pos = pos + width                   # the window was full: the next one
            pos[has] = target + 1               # its free slot went to another: go on after it
            go = np.ones(todo.size, bool)
            go[winners] = False
            todo, pos, width = todo[go], pos[go], PROBE_WINDOW
        return slots

    def _rehash(self, capacity: int) -> None:
        used = np.flatnonzero(self.keys != EMPTY)
        keys, row, seen = self.keys[used], self.row[used], self.seen[used]
        self.keys = np.full(capacity, EMPTY, np.int64)
        self.row = np.full(capacity, -1, np.int32)
        self.seen = np.zeros(capacity, np.int32)
        for lo in range(0, keys.size, REHASH_CHUNK):         # bounds the (n, width) temporaries
            slots = self._place(keys[lo:lo + REHASH_CHUNK])
            self.row[slots], self.seen[slots] = row[lo:lo + REHASH_CHUNK], seen[lo:lo + REHASH_CHUNK]


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
                 init_std: float = 0.0, seed: int = 0, admit_after: int = 1,
                 eps: float | None = None, betas: tuple = (0.9, 0.999), initial_accumulator: float = 0.0):
        """Raises ConfigError naming the setting if one is invalid, or if it is set but
        the optimizer has no use for it (eps for sgd, betas but for adam,
        initial_accumulator but for adagrad). eps None: the optimizer's default
        (adagrad 1e-10, adam 1e-8)."""
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        self.dim = _whole("dim", dim, 1, MAX_DIM)
        self.lr = _real("lr", lr)
        self.init_std = _real("init_std", init_std)
        self.seed = _whole("seed", seed, 0, 2**64 - 1)
        self.admit_after = _whole("admit_after", admit_after, 1, MAX_ADMIT_AFTER)
        kind, given = OPTIMIZERS[optimizer], {"eps": eps, "betas": betas,
                                              "initial_accumulator": initial_accumulator}
        for name, value in given.items():
            if name not in kind.hyper and not np.array_equal(value, _DEFAULTS[name]):
                raise ConfigError(f"{name} is not a setting of optimizer {optimizer!r} "
                                  f"(its settings: {', '.join(('lr',) + kind.hyper)})")
        self.opt = kind(self.lr, **{k: v for k, v in given.items() if k in kind.hyper and v is not None})
        self._index = _Index()
        self._n = 0                                               # rows admitted
        self._w = np.empty((MIN_ROWS, self.dim), np.float32)      # (row capacity, dim)
        self._state = {name: np.empty(self._state_shape(MIN_ROWS, spec), spec.dtype)
                       for name, spec in self.opt.state.items()}
        self.admissions = self.ignored = self.pushes = self.pulls = 0

    def _state_shape(self, rows: int, spec: RowState) -> tuple:
        return (rows, self.dim) if spec.per_column else (rows,)

    # -- the verbs --------------------------------------------------------------------
    def pull(self, keys: np.ndarray, *, train: bool = True) -> np.ndarray:
        """(len(keys), dim) float32, a new array: each key's row, zeros for keys without one.

        keys: see check_keys (ValueError). train: count a sighting per key not yet
        admitted and admit those reaching admit_after (their rows created first, so they
        read their initial row). train=False changes nothing but the pull count."""
        check_keys(keys)
        self.pulls += 1
        slots = self._index.find(keys)
        if train:
            new = np.flatnonzero(slots < 0)
            if new.size:
                capacity = self._index.keys.size
                slots[new] = self._index.add(keys[new])
                if self._index.keys.size != capacity:         # rehashed: every key moved
                    slots = self._index.find(keys)
        rows = np.where(slots >= 0, self._index.row[slots], -1)
        if train:
            waiting = np.flatnonzero(rows < 0)
            if waiting.size:
                rows[waiting] = self._sight(keys[waiting], slots[waiting])
        out = np.take(self._w, rows, axis=0)                    # (n, dim); row -1 reads the last
        out[rows < 0] = 0
        return out

    def push(self, keys: np.ndarray, grads: np.ndarray) -> int:
        """Apply the optimizer to the rows of `keys` with `grads` (len(keys), dim) float32,
        only read; keys without a row are ignored and counted. Returns the rows updated.
        ValueError (bad keys, grads of another shape or dtype, non-finite values) before
        any change."""
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
            self._step(rows, grads)
        return updated

    def stats(self) -> dict:
        """rows, keys_seen (index entries: rows and keys waiting), admissions, ignored (pushed
        keys without a row), bytes (allocated: arena, optimizer state, index), pushes, pulls."""
        arena = self._w.nbytes + sum(a.nbytes for a in self._state.values())
        return {"rows": self._n, "keys_seen": self._index.used, "admissions": self.admissions,
                "ignored": self.ignored, "bytes": arena + self._index.nbytes,
                "pushes": self.pushes, "pulls": self.pulls}

    # -- steps ------------------------------------------------------------------------
    def _sight(self, keys: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Count a sighting of keys without rows; admit those at admit_after, in key
        order. Returns their rows (-1: still waiting)."""
        self._index.seen[slots] += 1
        ready = np.flatnonzero(self._index.seen[slots] >= self.admit_after)
        if ready.size:
            self._admit(keys[ready], slots[ready])
        return self._index.row[slots]

    def _admit(self, keys: np.ndarray, slots: np.ndarray) -> None:
        lo, hi = self._n, self._n + keys.size                  # the new rows
        self._reserve(hi)
        self._w[lo:hi] = initial_rows(keys, self.dim, self.init_std, self.seed)
        for name, spec in self.opt.state.items():
            self._state[name][lo:hi] = spec.initial
        self._index.row[slots] = np.arange(lo, hi)
        self._n += keys.size
        self.admissions += keys.size

    def _reserve(self, rows: int) -> None:
        """Double the arena (rows and state) until it holds `rows`."""
        capacity = self._w.shape[0]
        while capacity < rows:
            capacity *= 2
        if capacity > self._w.shape[0]:
            self._w = _grown(self._w, capacity, self._n)
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
                "seed": self.seed, "admit_after": self.admit_after, **given}

    def export(self) -> dict[str, np.ndarray]:
        """The whole table as new arrays: the settings (0-d; betas (2,)), the COUNTERS (0-d),
        `keys` (rows,) and `rows` (rows, dim) in row order, `state.<name>` per optimizer
        state in row order, and the keys seen but not admitted, sorted (`waiting_keys`), with
        their sightings (`waiting_seen`)."""
        used = np.flatnonzero(self._index.keys != EMPTY)
        row = self._index.row[used]
        keys = np.empty(self._n, np.int64)
        keys[row[row >= 0]] = self._index.keys[used[row >= 0]]
        waiting = used[row < 0]
        waiting = waiting[np.argsort(self._index.keys[waiting])]
        out = {k: np.array(v, np.uint64 if k == "seed" else None) for k, v in self.settings().items()}
        out.update((k, np.array(getattr(self, k))) for k in COUNTERS)
        out.update(keys=keys, rows=self._w[:self._n].copy(), waiting_keys=self._index.keys[waiting],
                   waiting_seen=self._index.seen[waiting])
        out.update((f"state.{name}", a[:self._n].copy()) for name, a in self._state.items())
        return out

    @classmethod
    def restore(cls, d: dict[str, np.ndarray]) -> Table:
        """The table whose export() `d` is: every later call answers as the original's
        would. ConfigError for bad settings, DataError for missing or inconsistent arrays."""
        try:
            settings = {k: tuple(d[k].tolist()) if k == "betas" else d[k].item()
                        for k in SETTINGS if k in d}
        except (AttributeError, ValueError) as e:
            raise DataError(f"a setting in Table.export() is not a 0-d array: {e}") from None
        table = cls(**settings)
        table._load(d)
        return table

    def _load(self, d: dict[str, np.ndarray]) -> None:
        """Fill this new table with export() `d`'s rows, state, index and counters."""
        try:
            keys, rows, wkeys, wseen = (d[k] for k in ("keys", "rows", "waiting_keys", "waiting_seen"))
            state = {name: d[f"state.{name}"] for name in self.opt.state}
            counters = [int(d[k]) for k in COUNTERS]
            n = keys.size
            expected = [(rows, (n, self.dim), np.float32), (wseen, wkeys.shape, np.int32)]
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
        except KeyError as e:
            raise DataError(f"Table.export() array {e} is missing") from None
        except (AttributeError, TypeError, ValueError) as e:
            raise DataError(f"inconsistent Table.export(): {e}") from None
        slots = self._index.add(np.concatenate([keys, wkeys]))
        self._index.row[slots[:n]], self._index.seen[slots[:n]] = np.arange(n), self.admit_after
        self._index.seen[slots[n:]] = wseen
        self._reserve(n)
        self._n = n
        self._w[:n] = rows
        for name, a in state.items():
            self._state[name][:n] = a
        for k, v in zip(COUNTERS, counters):
            setattr(self, k, v)
