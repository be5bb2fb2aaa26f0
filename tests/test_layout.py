"""The flat layout: offsets, views, shard ranges."""

import numpy as np
import pytest

from downpour.common.errors import ConfigError
from downpour.common.nn.layout import Layout


def test_offsets_follow_order():
    layout = Layout([("a", (2, 3)), ("b", (3,)), ("c", (4, 1))])
    assert [(t.offset, t.stop) for t in layout.tensors] == [(0, 6), (6, 9), (9, 13)]
    assert layout.size == 13 and len(layout) == 3 and "b" in layout


def test_views_share_memory_with_the_flat_vector():
    layout = Layout([("a", (2, 3)), ("b", (3,))])
    flat = np.arange(9, dtype=np.float32)
    views = layout.views(flat)
    assert views["a"].shape == (2, 3) and np.array_equal(views["b"], [6, 7, 8])
    views["a"][1, 2] = -1
    assert flat[5] == -1
    with pytest.raises(ValueError, match="needs"):
        layout.views(np.zeros(8, np.float32))


@pytest.mark.parametrize("size", [1, 7, 100, 235146])
@pytest.mark.parametrize("shards", [1, 2, 3, 7])
def test_shard_ranges_cover_exactly_once_and_are_balanced(size, shards):
    layout = Layout([("w", (size,))])
    if shards > size:
        with pytest.raises(ConfigError, match="shards"):
            layout.shard_ranges(shards)
        return
    ranges = layout.shard_ranges(shards)
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    lengths = [hi - lo for lo, hi in ranges]
    assert max(lengths) - min(lengths) <= 1


def test_round_trip_and_equality():
    layout = Layout([("a", (2, 3)), ("b", (3,))])
    again = Layout.from_dict(layout.to_dict())
    assert again == layout and again != Layout([("a", (3, 2)), ("b", (3,))])
    with pytest.raises(ConfigError, match="not a layout"):
        Layout.from_dict({"tensors": [["a"]]})


def test_bad_tensors():
    with pytest.raises(ConfigError, match="unique"):
        Layout([("a", (1,)), ("a", (2,))])
    with pytest.raises(ConfigError, match=">= 1"):
        Layout([("a", (0, 2))])
