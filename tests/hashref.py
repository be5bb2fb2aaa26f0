"""splitmix64 on Python integers: the reference the array version (common/nn/hashing.py)
and everything built on it (keys, owners, table slots) are checked against. A helper
module, as gradcheck.py is."""

M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """splitmix64 as published (Steele, Lea, Flood 2014): the output for state x."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)
