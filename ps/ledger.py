"""The scheduler's ledger of work: every chunk of the run, on the table, dealt, done or lost.

Async and ssp runs do not split the data between workers in advance. Each epoch's
seeded order is cut into chunks of `chunk_batches` batches, numbered across epochs
(downpour.common.order.chunk_batches gives a chunk's batches), and the
scheduler deals them to workers as they ask (next_chunk), one ahead of the chunk a
worker is training. So a fast worker takes more chunks and a slow one fewer, and
the run ends when the last chunk is done, not when the slowest share is.

    table ──deal──> a worker's hand ──done──> done
      ^              [training, prefetched...]
      └──── a dead worker's prefetched chunks      its training chunk ──> lost

Guarantees:
- A chunk is in at most one place: the table, one worker's hand, done or lost. So
  every sample is trained once per epoch, except the samples of lost chunks.
- Chunks are dealt in order, chunks back on the table first; with one worker this
  is the single-process order.
- A worker trains its hand in the order dealt: the head is the chunk in training,
  the rest were not started.
- Near the end (no more chunks left to deal than there are live workers) nobody
  is dealt a chunk ahead: a straggler does not sit on a chunk that an idle fast
  worker could train. A worker with nothing in hand is always dealt one if any is
  left, so the run ends when the last chunk is done. When the worker dies, its head is lost (some of its
  pushes may have been applied) and the rest go back on the table.
- A request is answered once per seq: a retry (same rank and seq) gets the same
  reply, and changes nothing.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from downpour.common.wire import protocol

MAX_WANT = 2            # chunks one request may ask for: one to train, one ahead


class Ledger:
    """The chunks 0 .. total-1 of a run and where each one is."""

    def __init__(self, total: int, samples_of: Callable[[int], int]):
        self.total = total
        self.samples_of = samples_of                       # chunk -> its samples
        self.hands: dict[int, deque[int]] = {}             # rank -> chunks dealt, head in training
        self.done = 0                                      # chunks finished
        self.lost: list[int] = []                          # chunks whose worker died in them
        self._next = 0                                     # the next chunk never dealt
        self._table: deque[int] = deque()                  # chunks back from dead workers
        self._answered: dict[int, tuple[int, dict[str, Any]]] = {}   # rank -> (seq, reply)

    @property
    def exhausted(self) -> bool:
        """Nothing is left to deal (chunks may still be in hands)."""
        return self.remaining() == 0

    def request(self, rank: int, seq: int, done: Any, want: Any, live: int = 1) -> dict[str, Any]:
        """The reply to worker `rank`'s next_chunk: note `done`, deal up to `want` (of
        `live` workers alive now).

        ProtocolError (E_MALFORMED) for bad fields and (E_STATE) for a `done` that is
        not the worker's chunk in training; either changes nothing.
        """
        answered = self._answered.get(rank)
        if answered is not None and answered[0] == seq:
            return answered[1]                            # a retry: the same answer
        if not isinstance(done, list) or not all(type(c) is int for c in done):
            raise protocol.error(protocol.E_MALFORMED, f"done must be a list of chunk numbers, "
                                 f"got {done!r}")
        if type(want) is not int or not 0 <= want <= MAX_WANT:
            raise protocol.error(protocol.E_MALFORMED, f"want must be an integer in [0, "
                                 f"{MAX_WANT}], got {want!r}")
        hand = self.hands.setdefault(rank, deque())
        if list(hand)[:len(done)] != done:
            raise protocol.error(protocol.E_STATE, f"worker-{rank} reports chunks {done} done, "
                                 f"but holds {list(hand)}, to be finished in that order")
        for _ in done:
            hand.popleft()
        self.done += len(done)
        if hand and self.remaining() <= live:
            want = 0                                      # the end game: nothing dealt ahead
        dealt = []
        while len(dealt) < want and not self.exhausted:
            chunk = self._table.popleft() if self._table else self._take_new()
            hand.append(chunk)
            dealt.append(chunk)
        reply = {"chunks": dealt, "end": self.exhausted}
        self._answered[rank] = (seq, reply)
        return reply

    def remaining(self) -> int:
        """Chunks left to deal."""
        return len(self._table) + self.total - self._next

    def drop(self, rank: int) -> list[int]:
        """Worker `rank` is dead: its chunk in training is lost, the rest go back on the
        table (dealt before any new chunk). Returns the chunks lost."""
        hand = self.hands.pop(rank, deque())
        self._answered.pop(rank, None)
        lost = [hand.popleft()] if hand else []
        self.lost += lost
        self._table.extend(hand)
        return lost

    def samples_lost(self) -> int:
        """Samples of the lost chunks (some of their steps may have been applied)."""
        return sum(self.samples_of(c) for c in self.lost)

    def left(self) -> list[int]:
        """Chunks never finished: still on the table, never dealt, or in a hand."""
        held = [c for hand in self.hands.values() for c in hand]
        return [*self._table, *range(self._next, self.total), *held]

    def _take_new(self) -> int:
        chunk, self._next = self._next, self._next + 1
        return chunk
