"""splitmix64 over NumPy arrays: the one hash behind sparse keys, their placement and rows.

    splitmix64(x) = z ^ (z >> 31), where (all mod 2^64)
        z = x + 0x9E3779B97F4A7C15
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB

(Steele, Lea and Flood 2014; its outputs for x = 0, 1, ... are splitmix64's published
stream.) A fixed function of the 64 bits alone, so every process on every machine gets
the same value, unlike Python's salted hash(). Users: a feature's key
(downpour.common.ctr), the server that owns a key (layout.owners), a key's home slot and
initial row in a table (downpour.ps.table).
"""

from __future__ import annotations

import numpy as np

GAMMA = np.uint64(0x9E3779B97F4A7C15)       # the increment: 2^64 / the golden ratio
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of every element of the uint64 array `x` (module docstring), a new array."""
    z = x + GAMMA                     # NumPy's uint64 arithmetic wraps silently on arrays
    z ^= z >> _S30
    z *= _M1
    z ^= z >> _S27
    z *= _M2
    z ^= z >> _S31
    return z
