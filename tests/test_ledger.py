"""The ledger of chunks: dealt in order, one ahead, returned or lost with a dead worker,
answered once per seq. (The chunk math it deals from: tests/test_order.py.)"""

import numpy as np
import pytest

from downpour.common.errors import ProtocolError
from downpour.common.wire import protocol
from downpour.ps.ledger import Ledger


def ledger(total=6):
    return Ledger(total, lambda c: 30)


def test_chunks_are_dealt_in_order_one_ahead():
    book = Ledger(10, lambda c: 30)
    assert book.request(0, 1, [], 2, live=2) == {"chunks": [0, 1], "end": False}
    assert book.request(1, 1, [], 2, live=2) == {"chunks": [2, 3], "end": False}
    assert book.request(0, 2, [0], 1, live=2) == {"chunks": [4], "end": False}  # 1 trains, 4 ahead
    assert list(book.hands[0]) == [1, 4] and book.done == 1


def test_near_the_end_nothing_is_dealt_ahead():
    """With no more chunks left than live workers, a worker in training gets none ahead;
    one with an empty hand still gets one, and the last one says end."""
    book = ledger(5)
    book.request(0, 1, [], 2, live=2)                         # 0 trains, 1 ahead
    book.request(1, 1, [], 2, live=2)                         # 2 trains, 3 ahead
    assert book.request(0, 2, [0], 1, live=2) == {"chunks": [], "end": False}   # 1 left: kept
    assert book.request(0, 3, [1], 1, live=2) == {"chunks": [4], "end": True}   # empty hand
    assert book.request(1, 2, [2], 1, live=2) == {"chunks": [], "end": True}
    assert book.request(1, 3, [3], 0, live=2) == {"chunks": [], "end": True}
    assert list(book.hands[0]) == [4] and book.done == 4 and book.left() == [4]


def test_a_retry_gets_the_same_answer_and_deals_nothing_more():
    book = ledger()
    first = book.request(0, 7, [], 2)
    assert book.request(0, 7, [], 2) == first
    assert list(book.hands[0]) == [0, 1]


def test_a_dead_workers_training_chunk_is_lost_and_the_rest_dealt_again_first():
    book = ledger()
    book.request(0, 1, [], 2)                  # worker 0: trains 0, holds 1
    book.request(1, 1, [], 2)                  # worker 1: trains 2, holds 3
    assert book.drop(0) == [0]
    assert book.lost == [0] and book.samples_lost() == 30
    assert book.request(1, 2, [2], 1) == {"chunks": [1], "end": False}   # back on the table
    assert book.request(1, 3, [3], 1) == {"chunks": [4], "end": False}   # then new ones
    assert sorted(book.left()) == [1, 4, 5]


def test_every_chunk_is_in_exactly_one_place():
    book, rng = ledger(40), np.random.default_rng(0)
    seq = dict.fromkeys(range(3), 0)
    for _ in range(200):
        rank = int(rng.integers(3))
        if rng.random() < 0.05:
            book.drop(rank)
            seq[rank] = 0
            continue
        hand = list(book.hands.get(rank, []))
        seq[rank] += 1
        book.request(rank, seq[rank], hand[:1] if hand else [], 1 if hand else 2)
        held = [c for h in book.hands.values() for c in h]
        places = held + book.lost + list(book._table) + list(range(book._next, book.total))
        assert len(places) + book.done == 40 and len(set(places)) == len(places)


@pytest.mark.parametrize("done, want, code", [
    ([1], 1, protocol.E_STATE),              # not the chunk in training
    ("0", 1, protocol.E_MALFORMED), ([0.0], 1, protocol.E_MALFORMED),
    ([], 3, protocol.E_MALFORMED), ([], -1, protocol.E_MALFORMED), ([], True, protocol.E_MALFORMED),
])
def test_a_bad_request_is_refused_and_changes_nothing(done, want, code):
    book = ledger()
    book.request(0, 1, [], 2)
    with pytest.raises(ProtocolError) as caught:
        book.request(0, 2, done, want)
    assert caught.value.code == code
    assert list(book.hands[0]) == [0, 1] and book.done == 0
