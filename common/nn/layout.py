"""The flat parameter layout: the one place that decides where every tensor lives.

Every parameter of a model is a view into ONE contiguous 1-D vector, and the
gradients use the same layout in a second vector of the same length:

    flat   | 0.dense.W (784*256) | 0.dense.b (256) | 2.dense.W (256*128) | ... |
    offset   0                     200704            200960
    shard    [------------- 0 -------------)[------------- 1 --------------)

A parameter-server shard is a contiguous slice [lo, hi) of the vector, cut
without regard to tensor boundaries, so S shards hold equal bytes and a push or
pull for a shard is one contiguous buffer. Each shard is further cut into pieces
(`pieces`), each pushed, applied and answered on its own, so that a server works
on one piece while the next is still on the wire. `ps/` and `worker/` never
compute offsets, shard ranges or pieces themselves: they ask a `Layout`.

Sparse tables are placed here too: `owners` says which server holds each key's row.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Iterable, Mapping, NamedTuple

import numpy as np

from downpour.common.errors import ConfigError
from downpour.common.nn.hashing import splitmix64


@dataclass(frozen=True)
class Tensor:
    """One named tensor of the layout: `shape` stored at `[offset, offset + size)`."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return prod(self.shape)

    @property
    def stop(self) -> int:
        return self.offset + self.size


class Piece(NamedTuple):
    """A piece of the flat vector, [lo, hi), held by server `server`."""

    server: int
    lo: int
    hi: int


class Layout:
    """An ordered list of named tensors packed back to back in one flat vector.

    Build it from `(name, shape)` pairs; offsets follow from the order. Two
    layouts are equal when their names, shapes and order are.
    """

    def __init__(self, tensors: Iterable[tuple[str, Iterable[int]]]):
        placed: list[Tensor] = []
        offset = 0
        for name, shape in tensors:
            shape = tuple(int(d) for d in shape)
            if any(d <= 0 for d in shape):
                raise ConfigError(f"tensor {name!r} has shape {shape}; every dimension must be >= 1")
            placed.append(Tensor(name, shape, offset))
            offset += placed[-1].size
        names = [t.name for t in placed]
        if len(set(names)) != len(names):
            raise ConfigError(f"tensor names must be unique, got {names}")
        self.tensors: tuple[Tensor, ...] = tuple(placed)
        self.size: int = offset
        self._by_name = {t.name: t for t in placed}

    def __getitem__(self, name: str) -> Tensor:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self.tensors)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Layout({len(self.tensors)} tensors, {self.size} elements)"

    def view(self, flat: np.ndarray, name: str) -> np.ndarray:
        """The tensor `name` as a view into `flat` (no copy; writes go through)."""
        t = self._by_name[name]
        return flat[t.offset:t.stop].reshape(t.shape)

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Every tensor as a view into `flat`, by name."""
        if flat.shape != (self.size,):
            raise ValueError(f"flat vector has shape {flat.shape}, the layout needs ({self.size},)")
        return {t.name: self.view(flat, t.name) for t in self.tensors}

    def shard_ranges(self, n_shards: int, spare: bool = False) -> list[tuple[int, int]]:
        """Cut [0, size) into `n_shards` contiguous ranges whose sizes differ by at most one;
        with `spare`, more shards than elements may be asked (some ranges are then empty)."""
        if not 1 <= n_shards <= (n_shards if spare else self.size):
            raise ConfigError(f"number of shards must be between 1 and {self.size} "
                              f"(the parameter count), got {n_shards}")
        bounds = [i * self.size // n_shards for i in range(n_shards + 1)]
        return list(zip(bounds[:-1], bounds[1:]))

    def pieces(self, n_servers: int, max_piece: int = 0, spare: bool = False) -> list[Piece]:
        """Each server's range cut into pieces of at most `max_piece` elements, in vector order.

        A server applies and answers each piece of a push as soon as that piece
        has arrived, so computing one piece overlaps the transfer of the next.
        Pieces of one server are near-equal; `max_piece` 0 means one piece per server.
        A piece's index in the list is its number on the wire (the header's "piece" field).
        With `spare` (a sparse model's servers, which hold tables too), servers may
        outnumber the elements; a server whose range is empty gets no piece.
        """
        out: list[Piece] = []
        for server, (lo, hi) in enumerate(self.shard_ranges(n_servers, spare)):
            if hi == lo:
                continue
            k = max(1, -(-(hi - lo) // max_piece)) if max_piece > 0 else 1
            bounds = [lo + i * (hi - lo) // k for i in range(k + 1)]
            out += [Piece(server, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        return out

    def to_dict(self) -> dict:
        """A plain, msgpack- and JSON-friendly description: `{"tensors": [[name, [dims]], ...]}`."""
        return {"tensors": [[t.name, list(t.shape)] for t in self.tensors]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Layout":
        try:
            return cls((str(name), shape) for name, shape in d["tensors"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"not a layout description ({e}); expected "
                              '{"tensors": [[name, [dims...]], ...]}') from None


def owners(keys: np.ndarray, n_servers: int) -> np.ndarray:
    """The server that holds each key's row in a sparse table: (len(keys),) int64 in
    [0, n_servers), splitmix64(key) mod n_servers. It depends on the key and the number
    of servers only, so every process on every machine agrees, keys of one field spread
    evenly, and a replaced server owns exactly the keys its predecessor did."""
    if n_servers < 1:
        raise ConfigError(f"n_servers must be >= 1, got {n_servers}")
    return (splitmix64(keys.astype(np.uint64)) % np.uint64(n_servers)).astype(np.int64)
