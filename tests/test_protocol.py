"""The wire protocol: encode/decode round trips, zero-copy payloads, and every way a message can be wrong."""

import re

import msgpack
import numpy as np
import pytest
import zmq

from downpour.common.errors import ProtocolError
from downpour.common.wire import protocol

HEADER = {"op": "push", "node": "worker-3", "seq": 7, "piece": 1, "clock": 4}


def packed(header: dict) -> bytes:
    """A header frame exactly as given (no version added): for messages encode would refuse."""
    return msgpack.packb(header, use_bin_type=True)


def valid(**changes) -> dict:
    """A complete, valid header dict with `changes` applied (None deletes a field)."""
    h = {"v": protocol.VERSION, **HEADER, **changes}
    return {k: v for k, v in h.items() if v is not None}


def code_of(frames) -> int:
    with pytest.raises(ProtocolError) as info:
        protocol.decode(frames)
    return info.value.code


def payload_code(header: dict, frames, n: int) -> int:
    with pytest.raises(ProtocolError) as info:
        protocol.payload(header, frames, n)
    return info.value.code


# -- round trips -------------------------------------------------------------------------

def test_round_trip_without_payload():
    meta = {"lr_scale": 0.5, "live": [0, 2]}
    frames = protocol.encode({**HEADER, "meta": meta})
    assert len(frames) == 1
    header, payload = protocol.decode(frames)
    assert header == {"v": protocol.VERSION, **HEADER, "meta": meta}
    assert payload == []


def test_round_trip_with_payload():
    x = np.arange(10, dtype=np.float32) * np.float32(0.25) - 1
    frames = protocol.encode(HEADER, x)
    assert len(frames) == 2                       # 40 bytes: one payload frame
    header, payload = protocol.decode([bytes(f) for f in frames])
    assert header == {"v": protocol.VERSION, **HEADER, "dtype": "<f4", "n": 10}
    views = protocol.payload(header, payload, 10)
    out = np.empty(10, np.float32)
    protocol.copy_payload(views, out)
    assert out.tobytes() == x.tobytes()


def test_decode_accepts_zmq_frames():
    x = np.linspace(-1, 1, 5, dtype=np.float32)
    frames = [zmq.Frame(bytes(f)) for f in protocol.encode(HEADER, x)]
    header, payload = protocol.decode(frames)
    views = protocol.payload(header, payload, 5)
    assert np.concatenate(views).tobytes() == x.tobytes()


def test_payload_is_split_into_frames_of_at_most_max_frame(monkeypatch):
    monkeypatch.setattr(protocol, "MAX_FRAME", 12)       # 3 float32 per frame
    x = (np.arange(11, dtype=np.float32) - 5) / np.float32(3)
    frames = protocol.encode(HEADER, x)
    sizes = [len(f) for f in frames[1:]]
    assert sizes == [12, 12, 12, 8]                      # uneven: the last frame is short
    header, payload = protocol.decode([bytes(f) for f in frames])
    views = protocol.payload(header, payload, 11)
    assert [v.size for v in views] == [3, 3, 3, 2]
    out = np.full(11, np.nan, np.float32)
    protocol.copy_payload(views, out)
    assert out.tobytes() == x.tobytes()


def test_payload_views_are_read_only_and_copy_payload_fills_a_slice():
    x = np.arange(4, dtype=np.float32)
    header, payload = protocol.decode([bytes(f) for f in protocol.encode(HEADER, x)])
    (view,) = protocol.payload(header, payload, 4)
    assert not view.flags.writeable
    out = np.zeros(8, np.float32)
    protocol.copy_payload([view], out[2:6])
    assert out.tolist() == [0, 0, 0, 1, 2, 3, 0, 0]


@pytest.mark.parametrize("max_frame", [16 * 1024 * 1024, 8])
def test_encode_does_not_copy_the_array(monkeypatch, max_frame):
    monkeypatch.setattr(protocol, "MAX_FRAME", max_frame)
    x = np.arange(6, dtype=np.float32)
    frames = protocol.encode(HEADER, x)
    for f in frames[1:]:
        assert np.shares_memory(np.frombuffer(f, np.float32), x)
    x[:] = -7                                    # the frames see the change: they are the array
    assert b"".join(bytes(f) for f in frames[1:]) == x.tobytes()


@pytest.mark.parametrize("bad", [np.zeros(3, np.float64), np.zeros(3, ">f4"), np.zeros(3, np.int32),
                                 np.zeros((2, 2), np.float32), np.zeros(6, np.float32)[::2]])
def test_encode_refuses_payloads_it_cannot_send_as_is(bad):
    with pytest.raises(ProtocolError):
        protocol.encode(HEADER, bad)


def test_encode_refuses_an_oversized_header():
    with pytest.raises(ProtocolError, match="MAX_HEADER"):
        protocol.encode({**HEADER, "msg": "x" * protocol.MAX_HEADER})


# -- malformed headers -------------------------------------------------------------------

@pytest.mark.parametrize("frames, why", [
    ([], "empty message"),
    ([b""], "an empty header frame"),
    ([b"\xc1not msgpack"], "0xc1 is never used by msgpack"),
    ([packed(valid()) + b"\x00"], "trailing bytes after the map"),
    ([packed([1, "push", "worker-0", 0])], "a list, not a map"),
    ([packed("pull")], "a string, not a map"),
    ([packed(7)], "an int, not a map"),
    ([msgpack.packb({1: 2})], "a map with a non-string key"),
])
def test_not_a_header_is_malformed(frames, why):
    assert code_of(frames) == protocol.E_MALFORMED, why


@pytest.mark.parametrize("field", ["v", "op", "node", "seq"])
def test_missing_required_field_is_malformed(field):
    assert code_of([packed(valid(**{field: None}))]) == protocol.E_MALFORMED


@pytest.mark.parametrize("field, value", [
    ("op", 3), ("node", b"worker-0"), ("seq", "7"), ("seq", 1.0), ("seq", True), ("piece", False),
    ("clock", 2.5), ("n", "3"), ("dtype", 4), ("meta", [1, 2]), ("code", "1"),
    ("msg", 1), ("v", True), ("v", "1"), ("v", 1.0),
])
def test_mistyped_field_is_malformed(field, value):
    assert code_of([packed(valid(**{field: value}))]) == protocol.E_MALFORMED


def test_unknown_field_is_malformed():
    with pytest.raises(ProtocolError, match="'shards'") as info:
        protocol.decode([packed(valid(shards=1))])
    assert info.value.code == protocol.E_MALFORMED


@pytest.mark.parametrize("field", ["seq", "n", "clock"])
def test_negative_counter_is_malformed(field):
    assert code_of([packed(valid(**{field: -1}))]) == protocol.E_MALFORMED


def test_oversized_header_is_refused_before_unpacking(monkeypatch):
    def unpack(*args, **kwargs):
        raise AssertionError("an oversized header was unpacked")
    big = packed(valid(msg="x" * protocol.MAX_HEADER))
    assert len(big) > protocol.MAX_HEADER
    monkeypatch.setattr(protocol.msgpack, "unpackb", unpack)
    with pytest.raises(ProtocolError, match="exceeds") as info:
        protocol.decode([big])
    assert info.value.code == protocol.E_MALFORMED


def test_header_of_exactly_max_header_bytes_is_accepted():
    h = valid(msg="")
    h["msg"] = "x" * (protocol.MAX_HEADER - len(packed(h)) - 2)   # str8 -> str16 adds 2 bytes
    head = packed(h)
    assert len(head) == protocol.MAX_HEADER
    assert protocol.decode([head])[0] == h


@pytest.mark.parametrize("header", [
    valid(v=0), valid(v=protocol.VERSION - 1), valid(v=protocol.VERSION + 1),
    valid(v=protocol.VERSION + 1, newfield=1), valid(v=protocol.VERSION + 1, seq=None),
    valid(v=protocol.VERSION + 1, seq="s"),
])
def test_other_protocol_version_is_e_version(header):
    """Checked before the fields: another version's header may have other fields."""
    with pytest.raises(ProtocolError, match="version") as info:
        protocol.decode([packed(header)])
    assert info.value.code == protocol.E_VERSION


def test_decode_returns_payload_frames_as_they_came():
    header, payload = protocol.decode([packed(valid()), b"abcd", b"efgh"])
    assert header == valid()
    assert [bytes(f) for f in payload] == [b"abcd", b"efgh"]


# -- payload errors ----------------------------------------------------------------------

def test_payload_wrong_or_missing_dtype():
    frames = [np.zeros(3, np.float64).tobytes()]
    assert payload_code({"dtype": "<f8", "n": 3}, frames, 3) == protocol.E_PAYLOAD
    assert payload_code({"dtype": ">f4", "n": 3}, [bytes(12)], 3) == protocol.E_PAYLOAD
    assert payload_code({"n": 3}, [bytes(12)], 3) == protocol.E_PAYLOAD


def test_payload_n_mismatch():
    assert payload_code({"dtype": "<f4", "n": 4}, [bytes(16)], 3) == protocol.E_PAYLOAD
    assert payload_code({"dtype": "<f4"}, [bytes(12)], 3) == protocol.E_PAYLOAD


def test_payload_without_frames():
    assert payload_code({"dtype": "<f4", "n": 3}, [], 3) == protocol.E_PAYLOAD


@pytest.mark.parametrize("frames", [[bytes(6), bytes(6)], [bytes(11), bytes(1)], [bytes(0), bytes(12)]])
def test_payload_frame_of_partial_items_or_empty(frames):
    """Frames hold whole float32 items, even when the total would add up."""
    assert sum(map(len, frames)) == 12
    assert payload_code({"dtype": "<f4", "n": 3}, frames, 3) == protocol.E_PAYLOAD


@pytest.mark.parametrize("frames", [[bytes(8)], [bytes(16)], [bytes(8), bytes(8)]])
def test_payload_total_bytes_mismatch(frames):
    assert payload_code({"dtype": "<f4", "n": 3}, frames, 3) == protocol.E_PAYLOAD


def test_payload_frame_larger_than_max_frame(monkeypatch):
    monkeypatch.setattr(protocol, "MAX_FRAME", 8)
    assert payload_code({"dtype": "<f4", "n": 3}, [bytes(12)], 3) == protocol.E_PAYLOAD
    assert len(protocol.payload({"dtype": "<f4", "n": 3}, [bytes(8), bytes(4)], 3)) == 2


# -- error replies -----------------------------------------------------------------------

def test_error_reply_round_trip_and_raise_for_error():
    frames = protocol.error_reply(protocol.E_PIECE, "wrong piece", {"seq": 9}, "server-1")
    header, payload = protocol.decode(frames)
    assert payload == []
    assert header == {"v": protocol.VERSION, "op": "error", "node": "server-1", "seq": 9,
                      "code": protocol.E_PIECE, "msg": "wrong piece"}
    with pytest.raises(protocol.RemoteError, match="wrong piece") as info:
        protocol.raise_for_error(header)
    assert info.value.code == protocol.E_PIECE
    assert isinstance(info.value, ProtocolError)


def test_error_reply_to_an_unreadable_request_and_a_long_message():
    header, _ = protocol.decode(protocol.error_reply(protocol.E_MALFORMED, "x" * 5000, None))
    assert header["seq"] == 0 and header["code"] == protocol.E_MALFORMED
    assert len(header["msg"]) == 2000


def test_raise_for_error_passes_ok_replies():
    header = protocol.decode(protocol.encode({"op": "ok", "node": "server-0", "seq": 3, "clock": 1}))[0]
    assert protocol.raise_for_error(header) is header


def test_protocol_error_code_defaults_and_error_sets_it():
    assert ProtocolError("x").code == protocol.E_MALFORMED
    assert protocol.error(protocol.E_STATE, "late").code == protocol.E_STATE


# -- the documentation -------------------------------------------------------------------

def test_every_code_op_and_field_is_documented():
    doc = protocol.__doc__
    codes = {name: value for name, value in vars(protocol).items() if re.fullmatch(r"E_[A-Z_]+", name)}
    assert set(codes.values()) == set(protocol.ERRORS) == set(range(1, 9))
    for name, value in codes.items():
        assert re.search(rf"^\s+{value}\s+{name}\s", doc, re.M), f"{name} = {value} is not documented"
    for op in (*protocol.SERVER_OPS, *protocol.SCHEDULER_OPS):
        assert re.search(rf"^    {op}\s", doc, re.M), f"operation {op!r} is not documented"
    wire_type = {int: "int", str: "str", dict: "map", bytes: "bytes"}
    for field, kind in protocol._FIELDS.items():
        assert re.search(rf"^    {field}\s+{wire_type[kind]}\s", doc, re.M), f"field {field!r} undocumented"


def test_every_operation_has_its_permitted_roles_documented():
    assert set(protocol.PERMITTED) == {*protocol.SERVER_OPS, *protocol.SPARSE_OPS, *protocol.SCHEDULER_OPS}
    for role in ("scheduler", "server", "worker"):
        ops = sorted(op for op, roles in protocol.PERMITTED.items() if role in roles)
        line = re.search(rf"^    {role}\s+(.*)$", protocol.__doc__, re.M).group(1)
        assert sorted(line.split(", ")) == ops, (role, line)


@pytest.mark.parametrize("op, role, allowed", [
    ("shutdown", "worker", False), ("control", "server", False), ("push", "scheduler", False),
    ("register", "scheduler", False), ("next_chunk", "server", False), ("no_such_op", "worker", False),
    ("pull", "worker", True), ("pull", "scheduler", True), ("shutdown", "scheduler", True),
    ("shutdown", None, True)])
def test_permit_checks_the_authenticated_role(op, role, allowed):
    if allowed:
        protocol.permit(op, role)
    else:
        with pytest.raises(ProtocolError) as e:
            protocol.permit(op, role)
        assert e.value.code == protocol.E_DENIED and role in str(e.value)
