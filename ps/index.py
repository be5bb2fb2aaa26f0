"""A hash index of int64 keys in NumPy: key -> slot, by open addressing with linear
probing, every operation over a whole batch of keys at once.

    index = Index()                  # MIN_SLOTS slots, empty
    slots = index.insert(keys)       # (n,) intp: the slots of new keys (row -1, seen 0)
    index.row[slots] = rows          # per slot, two int32 the owner sets: row and seen
    slots = index.find(keys)         # (n,) intp: each key's slot, -1 where it has none
    index.delete(keys)               # the keys leave, row and seen with them
    index.grow(entries)              # room for `entries` keys; True if it rehashed
    index.occupied()                 # the slots in use, ascending
    len(index), index.capacity, index.nbytes

Per slot the index holds a key (int64; EMPTY, -1, where there is none), and two int32
that it moves with the key and otherwise leaves to its owner: `row` (-1 when empty)
and `seen` (0 when empty). ps/table.py keeps there a key's row number (-1 while the key
waits for admission) and its sightings.

Design:
- A key's home slot is splitmix64(key) mod capacity, a power of two. Keys are usually
  hashes already; mixing them again costs little and protects the index from keys that
  are not (consecutive ids).
- Every batch operation loops over probe rounds, never over keys: a round reads, for
  each key still probing, its home slot (round 1: most keys sit there) or the next
  PROBE_WINDOW slots (8 int64: one cache line). Keys of one batch that want the same
  empty slot get it by np.unique on the slots (the first wins; the others probe on).
- The load stays at most MAX_LOAD. An insert that would pass it first doubles the
  capacity, as often as needed, and places every key again (a vectorized rehash in
  chunks of REHASH_CHUNK keys, which bounds the (n, width) temporaries).
- Deletion re-places, for each emptied slot, the keys after it up to the end of its
  run, but for those in their home slot, which no probe passes (Sedgewick's deletion
  for linear probing, itself a form of Knuth's backward shift; here for the whole batch
  in probe rounds, by the same placement as insertion). Chosen over tombstones, which
  lengthen every later probe under a steady stream of deletions and need a periodic
  rehash of the whole index, a stall of a few hundred ms at 1M keys; this costs in
  proportion to the deleted keys and the runs after them.

Guarantees:
- find gives each key's slot (keys[slot] == key) or -1; it changes nothing.
- After every insert and delete each key in the index is found, with its row and seen;
  the load is at most MAX_LOAD; empty slots hold EMPTY, -1 and 0.
- A delete leaves no tombstone: the slots it empties hold EMPTY again, and a probe
  stops at the first empty slot, so deleted keys lengthen no later probe.
- The capacity is a power of two, at least MIN_SLOTS; it only grows.
- delete raises KeyError, before any change, if a key is not in the index.
- Slots, and the arrays keys, row and seen themselves, hold until the next insert,
  grow or delete: a rehash replaces the arrays and moves every key, and a delete moves
  keys of the runs it touches. Find the keys again after one.

Asked of callers, not checked (it would cost a pass over the batch): keys >= 0 and
unique in a batch (ps/table.py's check_keys makes sure), and insert's keys absent.

Limit: the index never drops a key by itself; a key stays until its owner deletes it.
ps/table.py deletes only the keys of the rows it evicts, so a key seen but not yet
admitted (admit_after > 1) holds an entry that no eviction frees: keys each seen fewer
than admit_after times grow the index without bound, whatever max_rows.

Cost: 16 B a slot (key int64, row int32, seen int32), so 32 B a key at load 1/2 and
64 B just after a doubling, against ~105 B a key for a dict {key: row} (measured; see
the comment below the constants).
"""

from __future__ import annotations

import numpy as np

from downpour.common.nn.hashing import splitmix64

EMPTY = -1                 # the key of an empty slot; real keys are >= 0
MAX_LOAD = 0.5             # index entries per slot, at most
MIN_SLOTS = 64             # initial capacity (a power of two)
PROBE_WINDOW = 8           # slots a probe round reads after the first (8 int64: a cache line)
REHASH_CHUNK = 1 << 16     # keys placed per round trip while rehashing

# Measured through Table with `python tests/test_table.py`, numpy 2.4, CPython 3.11, one
# core of the 2-core development VM:
#   `bench`, 1,048,000 keys in 2^21 slots: 32 B a key (the three arrays), against 105 B
#     for a dict {key: row} (tracemalloc: the dict and its int objects);
#   `bench_eviction`, the VM busy with other work, 1,000,000 keys at load 0.48: a delete
#     of 16,000 keys ~6 ms, of which re-placing the runs' tails 5.4 ms (1.7 keys follow
#     an emptied slot, 60% of them in their home slot and left alone), finding the keys
#     the rest; a find of 16,000 keys then ~0.8 ms.


def home_slots(keys: np.ndarray, capacity: int) -> np.ndarray:
    """(n,) intp: the slot where each key's probe starts, splitmix64(key) mod capacity (a
    power of two)."""
    return (splitmix64(keys.astype(np.uint64)) & np.uint64(capacity - 1)).astype(np.intp)


class Index:
    """Open addressing with linear probing: int64 key -> slot, and per slot two int32,
    `row` and `seen`, that move with the key. Contract in the module docstring."""

    def __init__(self, capacity: int = MIN_SLOTS):
        """ValueError unless capacity is a power of two >= MIN_SLOTS."""
        if capacity < MIN_SLOTS or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two >= {MIN_SLOTS}, got {capacity}")
        self.keys = np.full(capacity, EMPTY, np.int64)     # (capacity,)
        self.row = np.full(capacity, -1, np.int32)         # (capacity,)
        self.seen = np.zeros(capacity, np.int32)           # (capacity,)
        self._used = 0

    def __len__(self) -> int:
        """The keys in the index."""
        return self._used

    @property
    def capacity(self) -> int:
        """Slots, used or not."""
        return self.keys.size

    @property
    def nbytes(self) -> int:
        """Bytes of the three arrays."""
        return self.keys.nbytes + self.row.nbytes + self.seen.nbytes

    # -- the verbs --------------------------------------------------------------------
    def find(self, keys: np.ndarray) -> np.ndarray:
        """(n,) intp: the slot of each key, -1 where it has none."""
        pos = home_slots(keys, self.capacity)
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

    def insert(self, keys: np.ndarray) -> np.ndarray:
        """(n,) intp: the slots given to `keys` (unique, none in the index), row -1, seen
        0. Grows first if the load would pass MAX_LOAD (see grow)."""
        self.grow(self._used + keys.size)
        self._used += keys.size
        return self._place(keys)

    def delete(self, keys: np.ndarray) -> None:
        """Remove `keys` (unique), their row and seen with them; every other key stays
        findable, though keys after them in their runs may move. KeyError, before any
        change, if one is not in the index."""
        slots = self.find(keys)
        if (slots < 0).any():
            raise KeyError(f"key {keys[np.argmax(slots < 0)]} is not in the index; nothing was deleted")
        self._remove(slots)

    def grow(self, entries: int) -> bool:
        """Make room for `entries` keys in all at load <= MAX_LOAD: double the capacity
        until it does, then place every key again. Returns whether it did (then every
        slot and array from before is void)."""
        capacity = self.capacity
        while entries > capacity * MAX_LOAD:
            capacity *= 2
        if capacity == self.capacity:
            return False
        self._rehash(capacity)
        return True

    def occupied(self) -> np.ndarray:
        """(len,) intp: the slots in use, ascending."""
        return np.flatnonzero(self.keys != EMPTY)

    # -- steps ------------------------------------------------------------------------
    def _remove(self, slots: np.ndarray) -> None:
        """Empty `slots` (distinct, in use) and place again the keys after each up to the
        end of its run, but for those in their home slot (see the module docstring)."""
        self.keys[slots], self.row[slots], self.seen[slots] = EMPTY, -1, 0
        self._used -= slots.size
        tail = self._runs_after(slots)        # two emptied slots of a run split it: disjoint
        tail = tail[home_slots(self.keys[tail], self.capacity) != tail]
        keys, row, seen = self.keys[tail], self.row[tail], self.seen[tail]
        self.keys[tail], self.row[tail], self.seen[tail] = EMPTY, -1, 0
        placed = self._place(keys)            # each lands between its home and its old slot
        self.row[placed], self.seen[placed] = row, seen

    def _runs_after(self, slots: np.ndarray) -> np.ndarray:
        """The used slots after each of `slots`, up to the next empty one (wrapping around)."""
        length = np.zeros(slots.size, np.intp)
        todo, pos = np.arange(slots.size), slots + 1
        while todo.size:
            cand, there = self._probe(pos, PROBE_WINDOW)
            empty = there == EMPTY
            first = empty.argmax(axis=1)
            ended = empty[np.arange(todo.size), first]
            length[todo] += np.where(ended, first, PROBE_WINDOW)
            todo, pos = todo[~ended], pos[~ended] + PROBE_WINDOW
        starts = np.repeat(slots + 1 - np.cumsum(length) + length, length)    # (sum(length),)
        return (starts + np.arange(starts.size)) & (self.capacity - 1)

    def _probe(self, pos: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, width) slots pos, pos + 1, ... (wrapping around), and the keys in them."""
        cand = (pos[:, None] + np.arange(width)) & (self.capacity - 1)
        return cand, self.keys[cand]

    def _place(self, keys: np.ndarray) -> np.ndarray:
        """Write `keys` (unique, absent) into the first empty slot of their runs."""
        slots = np.empty(keys.size, np.intp)
        todo = np.arange(keys.size)
        pos, width = home_slots(keys, self.capacity), 1
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
        used = self.occupied()
        keys, row, seen = self.keys[used], self.row[used], self.seen[used]
        self.keys = np.full(capacity, EMPTY, np.int64)
        self.row = np.full(capacity, -1, np.int32)
        self.seen = np.zeros(capacity, np.int32)
        for lo in range(0, keys.size, REHASH_CHUNK):         # bounds the (n, width) temporaries
            slots = self._place(keys[lo:lo + REHASH_CHUNK])
            self.row[slots], self.seen[slots] = row[lo:lo + REHASH_CHUNK], seen[lo:lo + REHASH_CHUNK]
