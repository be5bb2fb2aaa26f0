"""The wire protocol: every operation, field and error code, and the one encode/decode pair.

A message is a ZeroMQ multipart message (a ROUTER socket sees the peer's identity
frame in front of it):

    frame 0     header    msgpack map, at most MAX_HEADER bytes, never pickle
    frame 1..k  payload   raw little-endian array bytes: one array, cut into frames
                          of at most MAX_FRAME bytes (16 MiB); k = 0 when there is none

Header fields (every message has v, op, node, seq):

    v       int    protocol version; a receiver answers any other with E_VERSION
    op      str    the operation below, or "ok" / "error" in a reply
    node    str    sender: "scheduler", "server-<i>", "worker-<i>", or a tool's name
    seq     int    sender's sequence number, >= 0; the reply echoes it. A retried
                   request reuses its seq, so a server applies a push at most once
    table   int    the sparse table a sparse_pull, sparse_push or stats is for
    keys    int    sparse_pull and sparse_push: the keys in frame 1
    piece   int    the piece of the vector a request to a server is for: its index in
                   downpour.common.nn.layout.Layout.pieces (servers check they hold it)
    clock   int    parameter version of the piece named by piece: every piece counts its
                   own updates, and pieces differ (one restored from a checkpoint is
                   behind). Push request: the version of THIS piece's weights the
                   gradient was computed on, so staleness = the piece's version at
                   apply time - clock; in sync mode the version whose global batch it
                   is, the same for every piece. Reply: the piece's version after the
                   operation. (The field keeps its name; it is a version, never the
                   ssp clock: a worker's count of pushes applied, ps/piece.py)
    token   bytes  a worker's pull, push and push_pull: the token its registration gave
                   (downpour.common.wire.security); a push counts under the rank the token
                   names, whatever `node` says
    dtype   str    payload dtype; the allow-list is DTYPES ("<f4")
    n       int    payload elements in all payload frames together
    codec   str    a compressed payload: its codec (common/wire/codec.py: fp16, topk,
                   onebit), whose frames replace the float32 ones; n is still the
                   elements they stand for, and no dtype is sent
    k       int    a topk payload: the entries sent
    meta    map    operation-specific fields (below)
    code    int    error replies: one of the E_* codes
    msg     str    error replies: what was wrong and what to do

Operations to a shard server, each for one piece (replies carry clock):

    pull        -> ok + payload: the piece's parameters, meta: samples (applied to
                them so far). With meta snapshot=k (the scheduler's evaluation
                pulls): the parameters the piece kept when its applied samples
                first reached k * eval_samples (the cluster spec), clock: the
                version then, meta: samples and time (Unix seconds) then; every
                snapshot up to k is released. E_STATE if it keeps no snapshot k
    push        payload: a gradient for the piece; meta: last (true on a worker's
                final push), samples (the samples the gradient covers, an int;
                0 when absent) -> ok (applied; in sync mode held until the version
                completes, in ssp mode held while the worker is too far ahead)
    push_pull   push, then the parameters after it in the same reply
    stats       (a piece's) -> ok, meta: version, pushes, dropped, staleness and clock_gap
                histograms, bytes_in and bytes_out (payload bytes), busy_s (s spent
                answering), lr, live, samples (applied), snapshots (the evaluation
                points kept)
    control     meta: lr_scale (float) and/or live (list of worker ranks) -> ok
    checkpoint  -> ok, meta: path of the checkpoint written
    shutdown    -> ok; the server checkpoints if it has a directory, then exits

Operations to a server's sparse tables (ps/sparse.py; a run with --model lr or fm), each
for one table (the header's `table`, no `piece`). Keys are int64 >= 0, sorted, unique
and owned by the server (downpour.common.nn.layout.owners); the header's `keys` counts
them and frame 1 holds them raw (little-endian int64, at most MAX_KEYS); rows follow
as the float32 payload of n = keys x the table's dim elements, row after row:

    sparse_pull   frame 1: keys; meta: train (true: a worker's training pull, which
                  counts a sighting of every key and creates the rows of admitted
                  ones, evicting the least recently used past the run's
                  table_max_rows; false: an evaluation pull, which creates and counts
                  nothing, and keys without a row read zeros) -> ok + payload: the rows
    sparse_push   frame 1: keys, then payload: one gradient row per key -> ok, meta:
                  updated (rows the optimizer changed; keys not admitted yet are
                  ignored). A retried push (its seq already taken) is answered, not
                  applied again
    stats         (a table's) -> ok, meta: rows, keys_seen, admissions, evictions,
                  ignored, bytes, pushes, pulls, and the server's sparse bytes_in, bytes_out and busy_s
    checkpoint    (to the tables) -> ok, meta: path (table 0's file), rows; E_STATE
                  without a checkpoint directory
    shutdown      (to the tables) -> ok; a server of tables only then exits

Operations to the scheduler:

    register    meta: role ("server" | "worker"), addr (a server's endpoint),
                host, wait_s (how long a registration may wait for a place)
                -> ok, meta: rank, incarnation, token and the cluster spec
                (see ps/scheduler.py), which holds run_id: the run's random id, written
                into every checkpoint, so --resume continues this run's only; a
                server's also holds secret, the key to the run's tokens. A
                worker that registers mid-run takes the lowest dead worker's rank,
                or (async, ssp) a new one. A registration with no place yet (a spare
                server, a worker joining a full sync run) waits; after wait_s it is
                answered ok, meta: again (register again to keep waiting), and at the
                run's end ok, meta: over (nothing to do)
    heartbeat   meta: rank, role, incarnation, token, and a worker's progress
                (samples, steps, loss_sum, loss_count, done) or a server's
                (version, snapshots: the evaluation points all its pieces keep)
                -> ok, meta: stop (bool), servers (current endpoints)
    next_chunk  async and ssp workers: meta: rank, incarnation, token, done (the chunks
                finished since the last request, in order), want (chunks to deal, 0-2),
                progress (the worker's COUNTERS as of the request)
                -> ok, meta: chunks (chunk numbers dealt, to train in order), end
                (true: the table is empty, nothing more will be dealt). A retry with
                the same seq gets the same answer

The rank and incarnation a node sends must be those its registration got, and its
token theirs (E_DENIED otherwise); a node whose rank was given to another (it was
declared dead) gets E_STATE.

Who may send what (PERMITTED): with keys, the role is the one ZAP authenticated for
the connection (downpour.common.wire.security), never the `node` field. Anything not
listed is refused with E_DENIED. Without keys every peer may send everything, but
pushes, heartbeats and chunk requests still need their token.

    scheduler   pull, sparse_pull, stats, control, checkpoint, shutdown
    server      register, heartbeat
    worker      pull, push, push_pull, sparse_pull, sparse_push, register, heartbeat, next_chunk

(a scheduler's sparse_pull is an evaluation pull: a training pull needs a worker's token)

Error codes (an error reply changes nothing on the server that sends it):

    1  E_MALFORMED   not a header: not msgpack, too large, not a map, a missing or
                     mistyped field, an unknown field
    2  E_VERSION     another protocol version
    3  E_UNKNOWN_OP  an operation this receiver does not offer
    4  E_PAYLOAD     wrong dtype, wrong length, missing frames, non-finite values (in a
                     sparse request, every fault of its keys or rows is E_MALFORMED)
    5  E_PIECE       the request names a piece this server does not hold, or none
    6  E_STATE       not possible now (a push's clock ahead of its piece, a registration
                     after the cluster is full, a checkpoint without a directory)
    7  E_INTERNAL    the receiver failed; msg says how
    8  E_DENIED      this peer may not do this: its key's role may not send the
                     operation, or its token is missing, forged or not its own

A synchronous push for a version already applied (a straggler's) is not an
error: it is dropped, counted, and answered "ok" with meta {"dropped": true}
and, for push_pull, the current parameters.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import msgpack
import numpy as np

from downpour.common.errors import ProtocolError

VERSION = 4       # 4: sparse tables (3: the header field shard is now piece; 2: pushes say their samples)
MAX_HEADER = 64 * 1024               # bytes; checked before unpacking
MAX_FRAME = 16 * 1024 * 1024         # bytes per payload frame
DTYPES = {"<f4": np.dtype("<f4")}    # the payload dtypes a receiver accepts
MAX_WORKERS = 1 << 16                # worker ranks are 0 .. MAX_WORKERS - 1

MAX_KEYS = 1 << 20                   # keys in one sparse request (8 MiB of int64)
KEY_DTYPE = np.dtype("<i8")

SERVER_OPS = ("pull", "push", "push_pull", "stats", "control", "checkpoint", "shutdown")
SPARSE_OPS = ("sparse_pull", "sparse_push")
SCHEDULER_OPS = ("register", "heartbeat", "next_chunk")
COUNTERS = ("samples", "steps", "loss_sum", "loss_count",    # a worker's progress that adds up:
            "compute_s", "padding_s", "cpu_s", "waiting_s",   # s (common/step.py StepTimes;
            "steps_over", "bytes_sent", "bytes_received")     # waiting: the rest), frames' bytes
REPLY_OPS = ("ok", "error")

E_MALFORMED, E_VERSION, E_UNKNOWN_OP, E_PAYLOAD, E_PIECE, E_STATE, E_INTERNAL, E_DENIED = range(1, 9)

ERRORS = {E_MALFORMED: "malformed", E_VERSION: "version", E_UNKNOWN_OP: "unknown operation",
          E_PAYLOAD: "bad payload", E_PIECE: "wrong piece", E_STATE: "bad state",
          E_INTERNAL: "internal", E_DENIED: "denied"}

# operation -> the roles (of the key a peer authenticated with) that may send it
PERMITTED = {"pull": ("scheduler", "worker"), "push": ("worker",), "push_pull": ("worker",),
             "sparse_pull": ("scheduler", "worker"), "sparse_push": ("worker",),
             "stats": ("scheduler",), "control": ("scheduler",), "checkpoint": ("scheduler",),
             "shutdown": ("scheduler",), "register": ("server", "worker"),
             "heartbeat": ("server", "worker"), "next_chunk": ("worker",)}

# field -> the Python types it may have
_FIELDS = {"v": int, "op": str, "node": str, "seq": int, "piece": int, "clock": int,
           "token": bytes, "dtype": str, "n": int, "meta": dict, "code": int, "msg": str,
           "codec": str, "k": int, "table": int, "keys": int}
_REQUIRED = ("v", "op", "node", "seq")


class RemoteError(ProtocolError):
    """An error reply: `code` is one of the E_* codes."""

    def __init__(self, code: int, msg: str):
        super().__init__(f"{ERRORS.get(code, 'error')} ({code}): {msg}")
        self.code = code


def encode(header: dict[str, Any], payload: np.ndarray | None = None) -> list:
    """The frames of a message: the packed header, then `payload` in MAX_FRAME pieces.

    Payload frames are memoryviews of `payload` itself (no copy): the caller must
    not change it until ZeroMQ has sent it (send with copy=False, track=True and
    wait on the tracker, or wait for the reply).
    """
    frames: list = []
    if payload is not None:
        if payload.dtype.str not in DTYPES or payload.ndim != 1 or not payload.flags.c_contiguous:
            raise ProtocolError(f"payload must be a contiguous 1-D array of {list(DTYPES)}, "
                                f"got {payload.dtype.str} {payload.shape}")
        header = {**header, "dtype": payload.dtype.str, "n": int(payload.size)}
        data = memoryview(payload).cast("B")
        frames = [data[lo:lo + MAX_FRAME] for lo in range(0, len(data), MAX_FRAME)]
    head = msgpack.packb({"v": VERSION, **header}, use_bin_type=True)
    if len(head) > MAX_HEADER:
        raise ProtocolError(f"header of {len(head)} bytes exceeds MAX_HEADER={MAX_HEADER}")
    return [head, *frames]


def decode(frames: Sequence) -> tuple[dict[str, Any], list]:
    """(header, payload frames) of a received message; the header is fully validated.

    Raises ProtocolError with `.code` set (E_MALFORMED or E_VERSION) if the
    header is not a valid header of this protocol version. Payload frames are
    returned as they came (bytes, zmq.Frame or memoryview): see `payload`.
    """
    if not frames:
        raise error(E_MALFORMED, "empty message")
    head = _buffer(frames[0])
    if len(head) > MAX_HEADER:
        raise error(E_MALFORMED, f"header of {len(head)} bytes exceeds {MAX_HEADER}")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception as e:                       # msgpack raises several unrelated types
        raise error(E_MALFORMED, f"header is not msgpack ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise error(E_MALFORMED, f"header is a {type(header).__name__}, expected a map")
    v = header.get("v")
    if isinstance(v, int) and not isinstance(v, bool) and v != VERSION:  # first: fields differ by version
        raise error(E_VERSION, f"protocol version {v}, this node speaks {VERSION}")
    for key in _REQUIRED:
        if key not in header:
            raise error(E_MALFORMED, f"header lacks the field {key!r}")
    for key, value in header.items():
        want = _FIELDS.get(key)
        if want is None:
            raise error(E_MALFORMED, f"unknown header field {key!r}")
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise error(E_MALFORMED, f"field {key!r} is {type(value).__name__}, "
                                      f"expected {want.__name__}")
    if min(header["seq"], *(header.get(k, 0) for k in ("n", "clock", "table", "keys"))) < 0:
        raise error(E_MALFORMED, "seq, n, clock, table and keys must be >= 0")
    return header, list(frames[1:])


def payload(header: dict[str, Any], frames: Sequence, n: int) -> list[np.ndarray]:
    """The payload as read-only float32 views of its frames (no copy), checked to hold `n` elements.

    Raises ProtocolError(E_PAYLOAD) if the dtype is not allowed, the header's n
    is not `n`, a frame is empty or larger than MAX_FRAME, or the bytes do not add
    up. The views are only valid while `frames` are alive.
    """
    dtype = header.get("dtype")
    if dtype not in DTYPES:
        raise error(E_PAYLOAD, f"payload dtype {dtype!r} is not allowed; send {list(DTYPES)}")
    if header.get("n") != n:
        raise error(E_PAYLOAD, f"payload has n={header.get('n')} elements, expected {n}")
    if not frames:
        raise error(E_PAYLOAD, f"no payload frames for {n} elements")
    itemsize = DTYPES[dtype].itemsize
    views, total = [], 0
    for frame in frames:
        buf = _buffer(frame)
        if not 0 < len(buf) <= MAX_FRAME or len(buf) % itemsize:
            raise error(E_PAYLOAD, f"payload frame of {len(buf)} bytes; frames hold whole "
                                    f"{dtype} items, at most {MAX_FRAME} bytes")
        views.append(np.frombuffer(buf, DTYPES[dtype]))
        total += len(buf)
    if total != n * itemsize:
        raise error(E_PAYLOAD, f"payload has {total} bytes, {n} {dtype} items need {n * itemsize}")
    return views


def encode_sparse(header: dict[str, Any], keys: np.ndarray, rows: np.ndarray | None = None) -> list:
    """The frames of a sparse request: the header (with `keys` set), the keys frame, and
    `rows` ((len(keys), dim) float32, row after row) as the payload if given. Zero-copy,
    as `encode`: neither array may change until ZeroMQ has sent them."""
    if keys.dtype != KEY_DTYPE or keys.ndim != 1 or not keys.flags.c_contiguous:
        raise ProtocolError(f"keys must be a contiguous 1-D {KEY_DTYPE.str} array, got "
                            f"{keys.dtype.str} {keys.shape}")
    if len(keys) > MAX_KEYS:
        raise ProtocolError(f"{len(keys)} keys in one request; at most MAX_KEYS={MAX_KEYS}")
    head, *payload = encode({**header, "keys": len(keys)},
                            None if rows is None else rows.reshape(-1))
    return [head, memoryview(keys).cast("B"), *payload]


def sparse_keys(header: dict[str, Any], frames: Sequence) -> tuple[np.ndarray, list]:
    """(the keys of a sparse request as a read-only int64 view, the payload frames after
    them). E_MALFORMED if the header has no `keys` or `table`, there are more than
    MAX_KEYS, or frame 1 is not that many int64s. Order, uniqueness and ownership are the
    table's to check (ps/sparse.py)."""
    n = header.get("keys")
    if n is None or "table" not in header:
        raise error(E_MALFORMED, f"a {header.get('op')} needs the header fields table and keys")
    if n > MAX_KEYS:
        raise error(E_MALFORMED, f"{n} keys in one request; at most MAX_KEYS={MAX_KEYS}")
    if not frames:
        raise error(E_MALFORMED, f"no keys frame for {n} keys")
    buf = _buffer(frames[0])
    if len(buf) != n * KEY_DTYPE.itemsize:
        raise error(E_MALFORMED, f"the keys frame has {len(buf)} bytes; {n} int64 keys need "
                                 f"{n * KEY_DTYPE.itemsize}")
    return np.frombuffer(buf, KEY_DTYPE), list(frames[1:])


def copy_payload(views: Iterable[np.ndarray], out: np.ndarray) -> None:
    """Copy payload views (from `payload`) back to back into `out`."""
    lo = 0
    for v in views:
        out[lo:lo + v.size] = v
        lo += v.size


def error_reply(code: int, msg: str, request: dict[str, Any] | None = None, node: str = "") -> list:
    """The frames of an error reply to `request` (which may be None if it was unreadable)."""
    request = request or {}
    seq = request.get("seq") if isinstance(request.get("seq"), int) and request["seq"] >= 0 else 0
    return encode({"op": "error", "node": node, "seq": seq, "code": code, "msg": msg[:2000]})


def raise_for_error(header: dict[str, Any]) -> dict[str, Any]:
    """`header` if it is an ok reply; RemoteError if it is an error reply."""
    if header["op"] == "error":
        raise RemoteError(header.get("code", E_INTERNAL), header.get("msg", ""))
    return header


def _buffer(frame) -> memoryview:
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def permit(op: str, role: str | None) -> None:
    """E_DENIED unless a peer of `role` (None: no keys, anyone) may send `op`."""
    if role is not None and role not in PERMITTED.get(op, ()):
        raise error(E_DENIED, f"a {role} may not send {op!r} (the {role} key's role "
                    f"is checked, not the node field)")


def error(code: int, msg: str) -> ProtocolError:
    """A ProtocolError carrying the E_* `code` an error reply should have."""
    e = ProtocolError(msg)
    e.code = code
    return e
