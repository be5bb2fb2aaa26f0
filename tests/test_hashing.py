"""common/nn/hashing.py and layout.owners against the Python-integer reference."""

import numpy as np
from hashref import M64
from hashref import splitmix64 as ref

from downpour.common.nn.hashing import splitmix64
from downpour.common.nn.layout import owners


def test_splitmix64_is_the_published_function():
    assert ref(0) == 0xE220A8397B1DCDAF                  # the published stream's first output
    xs = [0, 1, 2, 0x9E3779B97F4A7C15, M64, 1 << 63, 12345678901234567]
    assert splitmix64(np.array(xs, np.uint64)).tolist() == [ref(x) for x in xs]


def test_owners_spread_keys_evenly_and_agree_with_the_reference():
    keys = np.arange(0, 300_000, 3, dtype=np.int64)
    where = owners(keys, 3)
    assert where.tolist()[:50] == [ref(int(k)) % 3 for k in keys[:50]]
    counts = np.bincount(where, minlength=3)
    assert counts.min() > 0.97 * len(keys) / 3          # multiples of 3 too: the mix, not the key
