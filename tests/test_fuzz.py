"""Fuzzing with hypothesis (invariant 5, docs/invariants.md): protocol.decode, a live server,
a live scheduler, and peers that do not hold the cluster's keys.

    target     inputs                                          must hold
    decode     random bytes and frames, msgpack values,        the header the documented contract
               valid-looking headers, byte mutations, sizes    gives (a reference below), or
               around MAX_HEADER                               ProtocolError E_MALFORMED/E_VERSION
    server     the same as frames, and requests of every op    one reply each, with the request's
               but shutdown: random piece, clock, seq, node,   seq; the process lives; its weights
               dtype, n, meta, forged tokens, payloads of      stay byte-identical (and a real
               right and wrong lengths, NaN, inf               worker's push still applies)
    scheduler  register (never as a valid worker: that would   one reply each (a valid server's
               seat the fuzzer), heartbeat, next_chunk,        registration is held while it waits
               unknown ops; random meta, forged tokens,        for a seat, as documented); it lives
               strange roles                                   and a real worker still gets in
    keys       everything, shutdown included, from a peer      no reply at all; with the worker key,
               without keys and from one with unknown keys     a reply to each and nothing changes

The cluster is a real `downpour scheduler` (async, one worker, one shard, still
assembling) and one `downpour server` registered with it: a server with the run's
token secret, so a push needs a worker's token. Frames stay under the server's
ZMQ_MAXMSGSIZE (a larger one costs the peer its connection, with no reply: tested
on its own). `--fuzz-examples N` (tests/conftest.py) sets the examples per target;
runs are derandomized, so the same command reproduces a failure. Each target prints
a summary line (shown with -s, and in pytest's terminal summary). The two scheduler bugs
the fuzzing found (odd progress times crashing the end of a run; waiting server
registrations locking workers out) are pinned by the last two tests.
"""

import math
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, NamedTuple

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from downpour.common.errors import ProtocolError
from downpour.common.wire import protocol
from downpour.common.wire.node import register
from downpour.common.wire.security import ROLES, Keys, mint, write_keys
from downpour.common.wire.sockets import WIRE_SLACK, frame_limit, make_socket
from downpour.launch import CLI, child_env
from downpour.ps.membership import MAX_WAITING

REPLY_S = 10.0            # seconds one reply may take on a shared, noisy machine
START_S = 60.0            # seconds for the cluster to start and answer
SILENT_S = 1.0            # seconds to wait for a reply that must not come
KEYLESS_MESSAGES = 200    # messages each peer without the cluster's keys sends each node
FUZZ_TIMEOUT_S = 1800     # per fuzz test: a long run (--fuzz-examples 20000) takes minutes per target
LR = np.float32(0.1)      # the run's SGD learning rate, as the server multiplies by it
SCHEDULER = ("--mode", "async", "--workers", 1, "--shards", 1, "--synthetic", 2000, "--hidden", 32,
             "--optimizer", "sgd", "--lr", 0.1, "--eval-every", 0, "--progress", "none",
             "--start-timeout-s", 900, "--dead-after-s", 60)

# -- what to send ----------------------------------------------------------------------------

INT64 = st.integers(-(2 ** 63), 2 ** 64 - 1)      # every integer msgpack carries
TEXTS = st.text(max_size=24)
SCALARS = st.one_of(st.none(), st.booleans(), INT64, st.floats(), TEXTS, st.binary(max_size=24))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
ODD = SCALARS | st.lists(SCALARS, max_size=3) | st.dictionaries(TEXTS, SCALARS, max_size=3)  # flat: quicker
# decode only: what a msgpack map cannot be in a header (other keys, extension types)
WIDE = st.recursive(SCALARS | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=16)),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(SCALARS.filter(lambda k: not isinstance(k, float)), inner, max_size=4),
                    max_leaves=10)
SPECIAL = (math.nan, math.inf, -math.inf, 3e38, 3e19, -0.0, 1e-45)   # 3e19 squared overflows float32


@st.composite
def usually(draw, right: st.SearchStrategy, wrong: st.SearchStrategy = ODD, odds: int = 20):
    """A value of `right`, and one time in odds + 1 one of `wrong` (sampled_from is uniform,
    integers() favours its bounds; the simplest choice, 0, is `right`)."""
    return draw(wrong if draw(st.sampled_from(range(odds + 1))) == odds else right)


NODES = ("worker-0", "worker-1", "worker-65535", "worker-65536", "worker-\u00b2", "worker--1",
         "server-0", "scheduler", "")
TOKENS = st.one_of(
    st.binary(min_size=24, max_size=24),                                  # a token's length, forged
    st.builds(mint, st.binary(min_size=32, max_size=32), st.sampled_from(ROLES),   # another run's secret
              st.integers(0, 2 ** 32 - 1), st.integers(0, 2 ** 32 - 1)),
    st.binary(max_size=40))
SERVER_OPS = tuple(op for op in protocol.SERVER_OPS if op != "shutdown")   # shutdown would stop it
OTHER_OPS = ("ok", "error", "Pull", "register ", "")
COUNTS = usually(st.integers(0, 10 ** 6) | st.floats(0, 1e9), st.floats() | INT64 | ODD, odds=3)
RANKS = usually(st.integers(0, 3), INT64 | ODD)
ROLE = usually(st.sampled_from(("server", "worker")),
               st.sampled_from(("scheduler", "Server", "worker ", "", "server\x00")) | ODD, odds=3)
PROGRESS = usually(st.dictionaries(st.sampled_from(protocol.COUNTERS + ("done", "t_start")), COUNTS))
# operation -> the fields its request usually has, and its meta
FIELDS = {"pull": ("piece",), "push": ("piece", "clock", "dtype", "n", "token"), "stats": ("piece",),
          "checkpoint": ("piece",), "shutdown": ("piece",), "control": ("piece", "meta"),
          "register": ("meta",), "heartbeat": ("meta",), "next_chunk": ("meta",)}
FIELDS["push_pull"] = FIELDS["push"]
META = {
    "push": st.fixed_dictionaries({}, optional={"last": usually(st.booleans())}),
    "control": st.fixed_dictionaries({}, optional={
        "lr_scale": usually(st.floats(1e-3, 1e3), st.sampled_from((0.0, -1.0, *SPECIAL)) | INT64 | ODD, 3),
        "live": usually(st.lists(st.integers(0, 3), max_size=3), st.lists(INT64, max_size=3) | ODD, 3)}),
    "register": st.fixed_dictionaries({"role": ROLE, "addr": usually(
        st.sampled_from(("ipc:///tmp/fuzz-elsewhere", "tcp://10.0.0.1:5000")), st.just("") | ODD, 1)},
        optional={"host": TEXTS, "wait_s": usually(    # a wait short enough to end mid-test is not fuzzed
            st.floats(60, 1e9), st.sampled_from((0, -1.0, math.nan, -math.inf, True, "60")) | ODD.filter(
                lambda v: not (waits(v) and v < 60)), 3)}),
    "heartbeat": st.fixed_dictionaries(
        {"role": ROLE, "rank": RANKS, "incarnation": RANKS, "token": usually(TOKENS)},
        optional={"samples": COUNTS, "steps": COUNTS, "done": usually(st.booleans()), "progress": PROGRESS}),
    "next_chunk": st.fixed_dictionaries(
        {"rank": RANKS, "incarnation": RANKS, "token": usually(TOKENS),
         "done": usually(st.lists(st.integers(0, 5), max_size=3), st.lists(INT64) | ODD),
         "want": usually(st.integers(0, 2), st.integers(-1, 3) | ODD, odds=3)},
        optional={"progress": PROGRESS})}
META["push_pull"] = META["push"]


@st.composite
def payloads(draw, n: int) -> list[bytes]:
    """Payload frames for a piece of `n` float32s: usually right, or wrong in one way or more."""
    kind = draw(usually(st.just("floats"), st.sampled_from(("none", "bytes")), odds=4))
    if kind == "none":
        return []
    if kind == "bytes":
        return draw(st.lists(st.binary(max_size=64), min_size=1, max_size=3))
    size = draw(usually(st.just(n), st.sampled_from((n - 1, n + 1, 0)) | st.integers(1, 64), odds=3))
    x = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1))).standard_normal(size).astype("<f4")
    if size and draw(usually(st.just(False), st.just(True), odds=2)):
        for _ in range(draw(st.integers(1, 2))):
            x[draw(st.integers(0, size - 1))] = draw(st.sampled_from(SPECIAL))
    data = x.tobytes()
    if draw(usually(st.just(False), st.just(True), odds=9)):          # cut mid-item
        data = data[:-1] if data else b"\0"
    at = st.integers(0, len(data))                                     # more frames, maybe empty
    cuts = sorted(draw(usually(st.just([]), st.lists(at | at.map(lambda i: i - i % 4), max_size=2), odds=2)))
    return [data[lo:hi] for lo, hi in zip([0, *cuts], [*cuts, len(data)])]


@st.composite
def requests(draw, ops: tuple[str, ...], n: int) -> list[bytes]:
    """The frames of a valid-looking request of one of `ops` (or, now and then, another op):
    each field usually right, any may be wrong, missing or unknown."""
    op = draw(usually(st.sampled_from(ops), st.sampled_from(OTHER_OPS) | TEXTS | ODD, odds=6))
    usual = FIELDS.get(op, ()) if isinstance(op, str) else ()
    payload = draw(payloads(n) if "n" in usual else usually(st.just([]), payloads(8), odds=4))
    elements = sum(len(f) for f in payload) // 4
    meta = META.get(op, st.just({})) if isinstance(op, str) else st.just({})
    extra = usually(st.just({}), st.dictionaries(TEXTS, VALUES, max_size=2), odds=3)
    fields = {"v": usually(st.just(protocol.VERSION)),
              "op": st.just(op),
              "node": usually(st.sampled_from(NODES), TEXTS | ODD),
              "seq": usually(st.integers(0, 2 ** 64 - 1)),
              "piece": usually(st.just(0), INT64 | ODD),
              "clock": usually(st.just(0), st.sampled_from((1, 2 ** 64 - 1)) | INT64 | ODD, odds=4),
              "token": usually(TOKENS),
              "dtype": usually(st.just("<f4"), st.sampled_from(("<f8", ">f4", "f4", "<i4")) | ODD),
              "n": usually(st.just(elements), INT64 | ODD),
              "meta": usually(st.tuples(meta, extra).map(lambda m: {**m[1], **m[0]})),
              "code": usually(st.sampled_from(sorted(protocol.ERRORS))),
              "msg": usually(TEXTS),
              "secret": ODD}                                           # not a field
    kept, rare = usually(st.just(True), st.just(False), 39), usually(st.just(False), st.just(True), 39)
    present = {k: kept if k in ("v", "op", "node", "seq", *usual) else rare if k in ("code", "msg", "secret")
               else usually(st.just(False), st.just(True), 3) for k in fields}
    header = {k: draw(field) for k, field in fields.items() if draw(present[k])}
    return [msgpack.packb(header, use_bin_type=True), *payload]


@st.composite
def mutated(draw, frames: st.SearchStrategy) -> list[bytes]:
    """`frames` with its header's bytes mutated: flipped, overwritten, inserted, deleted, cut."""
    head, *payload = draw(frames)
    b = bytearray(head)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(b)))
        how = draw(st.sampled_from(("flip", "set", "insert", "delete", "cut")))
        if how == "insert" or at == len(b):
            b[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif how == "flip":
            b[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "set":
            b[at] = draw(st.sampled_from((0x00, 0x7F, 0x80, 0xC0, 0xC1, 0xCF, 0xD3, 0xDB, 0xDF, 0xFF)))
        elif how == "delete":
            del b[at:at + draw(st.integers(1, 4))]
        else:
            del b[at:]
    return [bytes(b), *payload]


def messages(ops: tuple[str, ...], n: int) -> st.SearchStrategy:
    """What a fuzzer sends a node: mostly valid-looking requests, and mutated, random and odd frames."""
    valid = requests(ops, n)
    any_header = st.builds(lambda v, p: [msgpack.packb(v, use_bin_type=True), *p], VALUES, payloads(n))
    frames = st.lists(st.binary(max_size=200), min_size=1, max_size=4)
    return usually(valid, mutated(valid) | any_header | frames, odds=2)


def header_of(frames: list) -> dict | None:
    try:
        return protocol.decode(frames)[0]
    except ProtocolError:
        return None


def fuzz(examples: int, strategy: st.SearchStrategy, check: Callable[[Any], None]) -> None:
    """`check(value)` for `examples` values of `strategy`; derandomized, so a failure reproduces."""
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much, HealthCheck.large_base_example])
    @given(strategy)
    def run(value):
        check(value)
    run()


# -- the summary -----------------------------------------------------------------------------

class Summary:
    """Each target's summary line: printed when it is made (-s) and in pytest's terminal summary."""

    name = "downpour-fuzz-summary"

    def __init__(self):
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter):
        if self.lines:
            terminalreporter.write_sep("-", "fuzz summary")
            for line in self.lines:
                terminalreporter.write_line(line)


SUMMARY = Summary()


@pytest.fixture
def report(request) -> Callable[[str], None]:
    if not request.config.pluginmanager.has_plugin(Summary.name):
        request.config.pluginmanager.register(SUMMARY, Summary.name)

    def say(line: str) -> None:
        SUMMARY.lines.append(line)
        print(line)
    return say


@pytest.fixture
def examples(request) -> int:
    return request.config.getoption("--fuzz-examples")


@pytest.fixture(scope="module", autouse=True)
def hypothesis_home(tmp_path_factory):
    """Hypothesis's caches go to a temporary folder, not to a .hypothesis folder in the checkout
    (and no examples are kept anywhere: database=None)."""
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


# -- protocol.decode -------------------------------------------------------------------------

DOCUMENTED = {"v": int, "op": str, "node": str, "seq": int, "piece": int, "clock": int,   # the module
              "token": bytes, "dtype": str, "n": int, "meta": dict, "code": int, "msg": str,  # docstring
              "table": int, "keys": int}


def reference(head: bytes) -> int | dict:
    """What decode must make of a header frame, from the documented contract: its E_* code, or the header."""
    if len(head) > protocol.MAX_HEADER:
        return protocol.E_MALFORMED
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception:
        return protocol.E_MALFORMED
    if not isinstance(header, dict):
        return protocol.E_MALFORMED
    if type(header.get("v")) is int and header["v"] != protocol.VERSION:     # checked first
        return protocol.E_VERSION
    if not {"v", "op", "node", "seq"} <= header.keys() or any(
            type(value) is not DOCUMENTED.get(key) for key, value in header.items()):
        return protocol.E_MALFORMED
    if min(header["seq"], *(header.get(k, 0) for k in ("n", "clock", "table", "keys"))) < 0:
        return protocol.E_MALFORMED
    return header


def sized(delta: int) -> list[bytes]:
    """A pull header of MAX_HEADER + delta bytes."""
    base = {"v": protocol.VERSION, "op": "pull", "node": "x", "seq": 1, "msg": ""}
    overhead = len(msgpack.packb(base)) + 2           # a str16 length, for 256 <= len(msg) < 65536
    head = msgpack.packb({**base, "msg": "x" * (protocol.MAX_HEADER + delta - overhead)})
    assert len(head) == protocol.MAX_HEADER + delta
    return [head]


WRAPPERS = (bytes, bytearray, memoryview, zmq.Frame)     # what decode may be given as a frame
NESTED = st.builds(lambda depth, unit, end: [unit * depth + end], st.integers(0, 70_000),
                   st.sampled_from((b"\x91", b"\x81\xa1a", b"\xdd\x00\x00\x00\x01")),
                   st.sampled_from((b"\xc0", b"", b"\xc1")))
DECODE_INPUTS = {
    "random frames": st.lists(st.binary(max_size=300), min_size=1, max_size=3) | NESTED,
    "msgpack values": st.builds(lambda v, bin_type: [msgpack.packb(v, use_bin_type=bin_type)],
                                WIDE, st.booleans()),
    "headers": requests(protocol.SERVER_OPS + protocol.SCHEDULER_OPS, 8),
    "mutated headers": mutated(requests(protocol.SERVER_OPS + protocol.SCHEDULER_OPS, 8)),
    "sizes": st.builds(sized, st.integers(-3, 3)),
}


@pytest.mark.timeout(FUZZ_TIMEOUT_S)
@pytest.mark.parametrize("kind", DECODE_INPUTS)
def test_decode_keeps_its_contract_for_any_input(kind, examples, report):
    """decode gives the header the documented contract gives, or raises ProtocolError with
    E_MALFORMED or E_VERSION (its documented codes); never any other exception."""
    outcomes, start = Counter(), time.monotonic()

    def check(case):
        frames, wrap = case
        given_frames = [wrap(f) for f in frames]
        want = reference(frames[0])
        try:
            header, payload = protocol.decode(given_frames)
        except ProtocolError as e:
            assert getattr(e, "code", None) == want, (e, want)
            outcomes[protocol.ERRORS[e.code]] += 1
            return
        assert isinstance(want, dict), f"decoded, but the contract says {protocol.ERRORS[want]}"
        assert msgpack.packb(header) == msgpack.packb(want)           # NaN-proof equality
        assert payload == given_frames[1:]
        outcomes["decoded"] += 1

    fuzz(examples, st.tuples(DECODE_INPUTS[kind], st.sampled_from(WRAPPERS)), check)
    report(f"fuzz decode ({kind}): {sum(outcomes.values()):,} inputs, 0 crashes, 0 contract "
           f"violations; " + ", ".join(f"{v:,} {k}" for k, v in sorted(outcomes.items()))
           + f"; {time.monotonic() - start:.1f} s")


# -- live processes --------------------------------------------------------------------------

class Cluster(NamedTuple):
    scheduler: str                            # addresses
    server: str
    procs: dict[str, subprocess.Popen]        # "scheduler", "server" -> its process
    keys: Path | None                         # the cluster's key folder, if it runs CurveZMQ
    logs: Path                                # holds <name>.err, what each process wrote


@pytest.fixture
def ctx():
    context = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


@pytest.fixture
def cluster(tmp_path, socket_dir):
    """start(keys=False, run=SCHEDULER) -> Cluster: `downpour scheduler` (with the settings
    `run`) and one `downpour server` as real
    processes, at ipc:// paths in socket_dir; every process is ended at teardown."""
    procs: list[subprocess.Popen] = []

    def spawn(name: str, *args) -> subprocess.Popen:
        with open(tmp_path / f"{name}.err", "w") as err:
            proc = subprocess.Popen([*CLI, *map(str, args)], cwd=tmp_path, env=child_env(),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
        procs.append(proc)
        return proc

    def start(keys: bool = False, run: tuple = SCHEDULER) -> Cluster:
        key_dir = None
        if keys:
            key_dir = tmp_path / "keys"
            write_keys(key_dir)
        with_keys = ("--keys", key_dir) if keys else ()
        scheduler, server = f"ipc://{socket_dir}/scheduler", f"ipc://{socket_dir}/server"
        return Cluster(scheduler, server, {
            "scheduler": spawn("scheduler", "scheduler", "--bind", scheduler, *run, *with_keys),
            "server": spawn("server", "server", "--scheduler", scheduler, "--bind", server, *with_keys)},
            key_dir, tmp_path)

    try:
        yield start
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def died(cluster: Cluster) -> list[str]:
    """The cluster's processes that have exited, with the end of what they said."""
    return [f"{name} exited with {p.returncode}: {(cluster.logs / f'{name}.err').read_text()[-2000:]}"
            for name, p in cluster.procs.items() if p.poll() is not None]


def call(ctx: zmq.Context, cluster: Cluster, to: str, header: dict, payload: np.ndarray | None = None,
         role: str = "scheduler", wait_s: float = START_S) -> tuple[dict, np.ndarray | None]:
    """One request from a well-behaved peer (with `role`'s keys if the cluster has keys) to
    `to` ("server" or "scheduler"): the reply's header and a copy of its payload."""
    keys = Keys.load(cluster.keys, role) if cluster.keys else None
    sock = make_socket(ctx, zmq.DEALER, getattr(cluster, to), max_frame=protocol.MAX_FRAME, keys=keys,
                       peer=to)
    try:
        sock.send_multipart(protocol.encode({"node": "fuzz-check", "seq": 1, **header}, payload))
        deadline = time.monotonic() + wait_s
        while not sock.poll(100):
            assert not died(cluster), died(cluster)
            assert time.monotonic() < deadline, f"the {to} did not answer {header} in {wait_s:g} s"
        reply, frames = protocol.decode(sock.recv_multipart())
    finally:
        sock.close()
    params = np.concatenate(protocol.payload(reply, frames, reply["n"])) if frames else None
    return reply, params


def pull(ctx: zmq.Context, cluster: Cluster) -> np.ndarray:
    """The server's weights, as a client with no token (or the scheduler's key) pulls them."""
    header, params = call(ctx, cluster, "server", {"op": "pull", "piece": 0})
    assert header["op"] == "ok" and header["clock"] == 0, header
    return params


class Live:
    """Sends fuzz messages to one node of `cluster` over a DEALER from `connect()`, and keeps
    the count of what went wrong, with the first few messages that did it."""

    def __init__(self, target: str, cluster: Cluster, connect: Callable[[], zmq.Socket]):
        self.target, self.cluster, self.connect = target, cluster, connect
        self.sock = connect()
        self.count = Counter({"messages": 0, "crashes": 0, "weight changes": 0, "unanswered": 0,
                              "bad replies": 0})
        self.found: list[str] = []
        self.replies: Counter = Counter()        # "ok", or the error's name -> replies
        self.waiting: list[zmq.Socket] = []       # sockets whose request is held, as documented
        self.start = time.monotonic()

    def note(self, what: str, frames: list, detail: str) -> None:
        self.count[what] += 1
        if len(self.found) < 5:
            self.found.append(f"{what}: {detail}; message {[bytes(f)[:200] for f in frames]}")

    def send(self, frames: list, held: bool = False) -> tuple[dict, list] | None:
        """The reply to `frames`, checked: one, readable, with the request's seq (0 if its
        header is unreadable). None if there is none: `held` (a documented wait), or a crash
        or a message left unanswered (counted)."""
        if self.count["crashes"]:
            return None
        self.count["messages"] += 1
        request = header_of(frames)
        self.sock.send_multipart(frames)
        if held:               # its reply, if one ever comes, is not awaited: on with a new socket
            self.count["held"] += 1
            self.waiting.append(self.sock)     # kept open: closing (linger 0) could drop the message
            self.sock = self.connect()
            return None
        answered = self.sock.poll(1000 * REPLY_S)
        if died(self.cluster):
            self.note("crashes", frames, "; ".join(died(self.cluster)))
            return None
        if not answered:
            self.note("unanswered", frames, f"no reply in {REPLY_S:g} s")
            self._fresh()
            return None
        reply = self.sock.recv_multipart()
        extra = 0
        while self.sock.poll(0):
            self.sock.recv_multipart()
            extra += 1
        try:
            header, payload = protocol.decode(reply)
        except ProtocolError as e:
            self.note("bad replies", frames, f"an unreadable reply ({e})")
            return None
        seq = request["seq"] if request else 0
        error = header["op"] == "error"
        self.replies[protocol.ERRORS.get(header.get("code"), "?") if error else header["op"]] += 1
        if (header["op"] not in protocol.REPLY_OPS or header["seq"] != seq or extra
                or (header["op"] == "error" and header.get("code") not in protocol.ERRORS)):
            self.note("bad replies", frames, f"reply {header} to seq {seq}, and {extra} more")
        return header, payload

    def _fresh(self) -> None:
        """A new socket (a new identity): a late reply to the old one cannot be taken for another's."""
        self.sock.close()
        self.sock = self.connect()

    def close(self) -> None:
        for sock in [self.sock, *self.waiting]:
            sock.close()

    def clean(self) -> bool:
        return all(v == 0 for k, v in self.count.items() if k not in ("messages", "held"))

    def summary(self, *shown: str, note: str = "") -> str:
        counts = ", ".join(f"{self.count[k]:,} {k}" for k in ("messages", *shown))
        replies = ", ".join(f"{v:,} {k}" for k, v in self.replies.most_common())
        return (f"fuzz {self.target}: {counts}{note}; {time.monotonic() - self.start:.1f} s\n"
                f"    replies: {replies}")


def raw_dealer(ctx: zmq.Context, address: str, secure: Callable[[zmq.Socket], None] | None = None
               ) -> Callable[[], zmq.Socket]:
    """connect() -> a DEALER to `address` with linger 0, no keys unless `secure` gives some."""
    def connect() -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        if secure:
            secure(sock)
        sock.connect(address)
        return sock
    return connect


def check_server_reply(live: Live, before: np.ndarray, denied: tuple[str, ...] = ()
                       ) -> Callable[[list], None]:
    """check(frames) for fuzzing a server: a reply, and no sign of changed weights (an ok push,
    a version above 0, pulled weights that differ); ops in `denied` must be refused E_DENIED."""
    def check(frames: list) -> None:
        request = header_of(frames)
        op = request["op"] if request else None
        assume(op != "shutdown" or "shutdown" in denied)
        answer = live.send(frames)
        if answer is None:
            return
        header, payload = answer
        if header.get("clock", 0) != 0 or (header["op"] == "ok" and op in ("push", "push_pull")):
            live.note("weight changes", frames, f"reply {header}")
        elif payload and b"".join(bytes(f) for f in payload) != before.tobytes():
            live.note("weight changes", frames, "a pull's weights differ from the first")
        if op in denied and header.get("code") != protocol.E_DENIED:
            live.note("bad replies", frames, f"{op} from this peer answered {header}, not E_DENIED")
    return check


def take_a_worker(ctx: zmq.Context, cluster: Cluster) -> tuple[int, int, bytes]:
    """Register a worker as a real one does: its rank, incarnation and token."""
    keys = Keys.load(cluster.keys, "worker") if cluster.keys else None
    meta = register(ctx, cluster.scheduler, "worker", {"role": "worker"}, REPLY_S, keys)
    return meta["rank"], meta["incarnation"], meta["token"]


# -- a live server ---------------------------------------------------------------------------

@pytest.mark.timeout(FUZZ_TIMEOUT_S)
def test_fuzzed_server_answers_everything_and_keeps_its_weights(cluster, ctx, examples, report):
    c = cluster()
    before = pull(ctx, c)
    live = Live("server", c, raw_dealer(ctx, c.server))
    try:
        fuzz(examples, messages(SERVER_OPS, before.size),
             check_server_reply(live, before))
    finally:
        live.close()
    assert not died(c), died(c)
    after = pull(ctx, c)
    stats = call(ctx, c, "server", {"op": "stats", "piece": 0})[0]["meta"]
    if after.tobytes() != before.tobytes() or stats["version"] or stats["pushes"]:
        live.count["weight changes"] = max(1, live.count["weight changes"])
    report(live.summary("crashes", "weight changes", "unanswered", "bad replies"))
    assert live.clean(), live.found

    # the control: a push with a real worker's token does apply, exactly (lr back at its setting)
    rank, _, token = take_a_worker(ctx, c)
    assert call(ctx, c, "server", {"op": "control", "piece": 0, "meta": {"lr_scale": 1.0}})[0]["op"] == "ok"
    g = np.random.default_rng(1).standard_normal(before.size).astype(np.float32)
    header, params = call(ctx, c, "server", {"op": "push_pull", "node": f"worker-{rank}", "piece": 0,
                                             "clock": 0, "token": token}, g)
    assert (header["op"], header["clock"]) == ("ok", 1), header
    assert params.tobytes() == (before - g * LR).tobytes()


# -- a live server's sparse table -------------------------------------------------------------

SPARSE_OPS = (*protocol.SPARSE_OPS, "stats")
DIM = 1                                    # lr's rows
MAX_KEY = 2 ** 63 - 1


@st.composite
def key_frames(draw) -> tuple[int, bytes]:
    """(the keys a request says, its keys frame): usually sorted, unique, >= 0 and as many as
    it says; or unsorted, repeated, negative, cut, or any bytes."""
    n = draw(st.integers(0, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    keys = np.unique(rng.integers(0, MAX_KEY, n, dtype=np.int64))
    how = draw(usually(st.just("right"), st.sampled_from(("unsorted", "repeated", "negative", "cut",
                                                           "bytes")), odds=2))
    if how == "unsorted" and len(keys) > 1:
        keys = keys[::-1].copy()
    elif how == "repeated" and len(keys):
        keys = np.r_[keys, keys[-1:]]
    elif how == "negative" and len(keys):
        keys[0] = -draw(st.integers(1, 2 ** 63))
    data = keys.astype("<i8").tobytes()
    if how == "cut" and data:
        data = data[:-draw(st.integers(1, 7))]
    elif how == "bytes":
        data = draw(st.binary(max_size=40))
    return len(keys), data


@st.composite
def sparse_requests(draw) -> list[bytes]:
    """A valid-looking sparse_pull, sparse_push or table stats: each field usually right."""
    op = draw(usually(st.sampled_from(SPARSE_OPS), st.sampled_from(OTHER_OPS) | TEXTS | ODD, odds=6))
    n, keys = draw(key_frames())
    rows = draw(payloads(n * DIM)) if op == "sparse_push" else draw(usually(st.just([]), payloads(4), 4))
    fields = {"v": usually(st.just(protocol.VERSION)), "op": st.just(op),
              "node": usually(st.sampled_from(NODES), TEXTS | ODD),
              "seq": usually(st.integers(0, 2 ** 64 - 1)),
              "table": usually(st.just(0), INT64 | ODD), "keys": usually(st.just(n), INT64 | ODD),
              "token": usually(TOKENS),
              "dtype": usually(st.just("<f4"), st.sampled_from(("<f8", "<i8")) | ODD),
              "n": usually(st.just(sum(len(f) for f in rows) // 4), INT64 | ODD),
              "meta": usually(st.fixed_dictionaries({}, optional={"train": usually(st.booleans())})),
              "piece": ODD}
    rare, mostly = usually(st.just(False), st.just(True), 9), usually(st.just(True), st.just(False), 3)
    header = {k: draw(v) for k, v in fields.items()
              if k in ("v", "op", "node", "seq", "table", "keys") or draw(rare if k == "piece" else mostly)}
    frames = [msgpack.packb(header, use_bin_type=True)]
    if op == "stats":
        return frames
    return [*frames, *draw(usually(st.just([keys]), st.just([]), odds=9)), *rows]


def sparse_cluster(cluster, tmp_path) -> Cluster:
    """A scheduler of an lr run on 200 planted click-log lines, and its one server."""
    data = tmp_path / "clicks"
    subprocess.run([*CLI, "synth", "ctr", str(data), "--rows", "200", "--seed", "1"], check=True,
                   env=child_env(), capture_output=True, timeout=START_S)
    return cluster(run=("--mode", "async", "--workers", 1, "--shards", 1, "--model", "lr",
                        "--data", f"criteo:{data}", "--optimizer", "sgd", "--lr", 0.1,
                        "--batch-size", 16, "--eval-every", 0, "--progress", "none",
                        "--start-timeout-s", 900, "--dead-after-s", 60))


def table_stats(ctx: zmq.Context, cluster: Cluster) -> dict:
    return call(ctx, cluster, "server", {"op": "stats", "table": 0})[0]["meta"]


@pytest.mark.timeout(FUZZ_TIMEOUT_S)
def test_fuzzed_sparse_table_answers_everything_and_changes_no_row(cluster, ctx, examples, report,
                                                                    tmp_path):
    """Sparse requests from a peer with no worker's token: one reply each (an evaluation pull
    may read rows: zeros, for none exists); the table never gets a row, a sighting or a
    push; and a real worker's pull and push still apply."""
    c = sparse_cluster(cluster, tmp_path)
    assert table_stats(ctx, c)["keys_seen"] == 0
    live = Live("sparse table", c, raw_dealer(ctx, c.server))

    def check(frames: list) -> None:
        answer = live.send(frames)
        if answer is None:
            return
        header, payload = answer
        request = header_of(frames)
        if payload and any(bytes(f).strip(b"\0") for f in payload):
            live.note("weight changes", frames, "a row read other than zeros")
        if request and request["op"] == "sparse_push" and header["op"] == "ok":
            live.note("weight changes", frames, f"a push was taken: {header}")
    try:
        fuzz(examples, usually(sparse_requests(), mutated(sparse_requests()), odds=3), check)
    finally:
        live.close()
    assert not died(c), died(c)
    stats = table_stats(ctx, c)
    if stats["keys_seen"] or stats["rows"] or stats["pushes"]:
        live.note("weight changes", [], f"the table after the fuzzing: {stats}")
    report(live.summary("crashes", "weight changes", "unanswered", "bad replies"))
    assert live.clean(), live.found

    # the control: a real worker's training pull creates rows, and its push applies (sgd, lr 0.1)
    rank, _, token = take_a_worker(ctx, c)
    keys = np.array([3, 5, 2 ** 40], "<i8")
    worker = {"node": f"worker-{rank}", "table": 0, "token": token}
    sock = make_socket(ctx, zmq.DEALER, c.server, max_frame=protocol.MAX_FRAME)
    try:
        def ask(header, rows=None):
            sock.send_multipart(protocol.encode_sparse({"seq": header.pop("seq"), **worker, **header},
                                                       keys, rows))
            assert sock.poll(1000 * REPLY_S), f"no reply to {header}"
            reply, frames = protocol.decode(sock.recv_multipart())
            assert reply["op"] == "ok", reply
            return np.concatenate(protocol.payload(reply, frames, reply["n"])) if frames else None
        rows = ask({"op": "sparse_pull", "seq": 1})
        ask({"op": "sparse_push", "seq": 2}, np.ones((3, 1), np.float32))
        after = ask({"op": "sparse_pull", "seq": 3, "meta": {"train": False}})
    finally:
        sock.close()
    assert after.tobytes() == (rows - LR).tobytes()
    assert table_stats(ctx, c)["rows"] == 3


@pytest.mark.timeout(300)
def test_a_frame_over_the_servers_limit_gets_no_reply_and_the_server_goes_on(cluster, ctx):
    """ZMQ_MAXMSGSIZE (the largest piece, or MAX_HEADER) drops the peer before anything is read;
    a header over MAX_HEADER but within that is read, and refused E_MALFORMED."""
    c = cluster()
    before = pull(ctx, c)
    n, limit = before.size, frame_limit([(0, before.size)])
    assert limit > protocol.MAX_HEADER + 1024        # a model whose piece is larger than a header
    push = {"v": protocol.VERSION, "op": "push", "node": "worker-0", "seq": 1, "piece": 0, "clock": 0,
            "dtype": "<f4"}
    cases = {   # what: (frames, the error code of the one reply, or None for no reply)
        "a header over MAX_HEADER": ([msgpack.packb({**push, "op": "pull", "msg": "x" * (limit - 1024)})],
                                     protocol.E_MALFORMED),
        "a header over the frame limit": ([msgpack.packb({**push, "msg": "x" * (limit + WIRE_SLACK)})],
                                          None),
        "a payload frame over the frame limit": ([msgpack.packb({**push, "n": n + 64}),
                                                  bytes(4 * n + WIRE_SLACK + 256)], None),
        "200 frames, each within the limit": ([msgpack.packb({**push, "n": 200 * n}),
                                               *[bytes(4 * n)] * 200], protocol.E_PAYLOAD),
    }
    for what, (frames, code) in cases.items():
        sock = raw_dealer(ctx, c.server)()
        try:
            sock.send_multipart(frames)
            if code is None:
                assert not sock.poll(1000 * SILENT_S), f"{what} was answered"
            else:
                assert sock.poll(1000 * REPLY_S), f"{what} was not answered"
                header, _ = protocol.decode(sock.recv_multipart())
                assert (header["op"], header["code"]) == ("error", code), (what, header)
        finally:
            sock.close()
        assert not died(c), (what, died(c))
        assert pull(ctx, c).tobytes() == before.tobytes(), what


# -- a live scheduler ------------------------------------------------------------------------

def registration(frames: list) -> str:
    """What the assembling scheduler does with `frames` as a registration: "seat" (a valid
    worker's: it would seat the fuzzer), "wait" (a valid server's: every rank is taken, so it
    waits for a dead server's, unanswered), or "answer"."""
    header = header_of(frames)
    if header is None or header["op"] != "register":
        return "answer"
    meta = header.get("meta", {})
    if meta.get("role") == "worker":
        return "seat"
    addr = meta.get("addr")
    valid = isinstance(addr, str) and addr and ("wait_s" not in meta or waits(meta["wait_s"]))
    return "wait" if meta.get("role") == "server" and valid else "answer"


def waits(wait_s) -> bool:
    """Whether `wait_s` is a registration's valid wait: a positive number of seconds."""
    return isinstance(wait_s, (int, float)) and not isinstance(wait_s, bool) and wait_s > 0


@pytest.mark.timeout(FUZZ_TIMEOUT_S)
def test_fuzzed_scheduler_answers_everything_and_still_takes_a_worker(cluster, ctx, examples, report):
    c = cluster()
    pull(ctx, c)                                       # the server registered: the scheduler is up
    live = Live("scheduler", c, raw_dealer(ctx, c.scheduler))
    ops = protocol.SCHEDULER_OPS + ("pull", "shutdown")

    def check(frames: list) -> None:
        # a valid worker's registration would seat the fuzzer; MAX_WAITING waiting servers make
        # the scheduler refuse more servers, so the fuzz keeps them to half that
        fate = registration(frames)
        assume(fate != "seat" and (fate != "wait" or live.count["held"] < MAX_WAITING // 2))
        answer = live.send(frames, held=fate == "wait")
        if answer is not None and answer[0]["op"] == "ok":
            live.note("accepted", frames, f"reply {answer[0]}")

    try:
        fuzz(examples, messages(ops, 8), check)
    finally:
        live.close()
    assert not died(c), died(c)
    report(live.summary("crashes", "accepted", "unanswered", "bad replies", "held",
                        note=" (valid server registrations wait for a seat, as documented)"))
    assert live.clean(), live.found

    rank, incarnation, token = take_a_worker(ctx, c)
    header, _ = call(ctx, c, "scheduler", {"op": "heartbeat", "node": f"worker-{rank}", "meta": {
        "role": "worker", "rank": rank, "incarnation": incarnation, "token": token, "samples": 0}})
    assert header["op"] == "ok" and header["meta"]["stop"] is False, header
    assert header["meta"]["servers"] == [c.server]
    header, _ = call(ctx, c, "scheduler", {"op": "next_chunk", "node": f"worker-{rank}", "meta": {
        "rank": rank, "incarnation": incarnation, "token": token, "done": [], "want": 1, "progress": {}}})
    assert header["op"] == "ok" and header["meta"]["chunks"] == [0], header


@pytest.mark.timeout(300)
def test_a_registered_workers_odd_progress_does_not_crash_the_scheduler_at_the_end(cluster, ctx):
    """A fake worker says done having trained nothing: the scheduler ends the run with the
    last guard's one-line error (exit 2), not a traceback."""
    c = cluster()
    pull(ctx, c)
    rank, incarnation, token = take_a_worker(ctx, c)
    beat = {"op": "heartbeat", "node": f"worker-{rank}",
            "meta": {"role": "worker", "rank": rank, "incarnation": incarnation, "token": token}}
    call(ctx, c, "scheduler", {**beat, "meta": {**beat["meta"], "t_start": "x"}})   # refused or taken
    header, _ = call(ctx, c, "scheduler", {**beat, "seq": 2, "meta": {**beat["meta"], "done": True}})
    assert header["op"] == "ok", header                    # done: the run ends
    try:
        c.procs["scheduler"].wait(START_S)
    except subprocess.TimeoutExpired:
        pass
    said = (c.logs / "scheduler.err").read_text()
    assert c.procs["scheduler"].returncode == 2, died(c)
    assert "trained 0 samples" in said and "Traceback" not in said, said


@pytest.mark.timeout(300)
def test_waiting_server_registrations_do_not_lock_a_worker_out(cluster, ctx):
    c = cluster()
    pull(ctx, c)                                       # the server registered: every rank is taken
    sock = raw_dealer(ctx, c.scheduler)()              # one connection: taken in the order sent
    try:
        def register_as(seq: int, meta: dict) -> dict | None:
            sock.send_multipart(protocol.encode({"op": "register", "node": "fuzz", "seq": seq, "meta": meta}))
            return protocol.decode(sock.recv_multipart())[0] if sock.poll(1000 * REPLY_S) else None

        for seq in range(MAX_WAITING):
            sock.send_multipart(protocol.encode({"op": "register", "node": "fuzz", "seq": seq, "meta": {
                "role": "server", "addr": f"tcp://10.0.0.1:{5000 + seq}"}}))
        refused = register_as(MAX_WAITING, {"role": "server", "addr": "tcp://10.0.0.2:5000"})
        if not refused or refused.get("code") != protocol.E_STATE:     # the documented cap
            pytest.fail(f"the {MAX_WAITING + 1}th waiting registration was answered {refused}")
        header = register_as(MAX_WAITING + 1, {"role": "worker"})
        assert header is not None and header["op"] == "ok", header       # the run's one worker seat
    finally:
        sock.close()


# -- peers without the cluster's keys --------------------------------------------------------

@pytest.mark.timeout(FUZZ_TIMEOUT_S)
def test_peers_without_the_clusters_keys_get_no_reply_and_change_nothing(cluster, ctx, examples, report):
    c = cluster(keys=True)
    before = pull(ctx, c)
    publics = Keys.load(c.keys, "scheduler").publics

    def unknown_keys(role: str) -> Callable[[zmq.Socket], None]:
        public, secret = zmq.curve_keypair()

        def secure(sock: zmq.Socket) -> None:
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_serverkey = publics[role]          # it knows whom it calls, not a key of ours
        return secure

    start, replies, sent, handshakes = time.monotonic(), 0, 0, 0
    everything = {"server": messages(protocol.SERVER_OPS, before.size),
                  "scheduler": messages(protocol.SCHEDULER_OPS + ("shutdown",), 8)}
    for peer in ("no keys", "unknown keys"):
        for to, strategy in everything.items():
            connect = raw_dealer(ctx, getattr(c, to), unknown_keys(to) if peer == "unknown keys" else None)
            socks = [connect()]

            def send(frames: list) -> None:
                """Queue `frames` on a connection yet to shake hands: after a failed handshake
                ZeroMQ drops the connection for good, and a socket without one queues nothing."""
                nonlocal sent, handshakes
                try:
                    socks[-1].send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    socks.append(connect())
                    socks[-1].send_multipart(frames, zmq.NOBLOCK)
                    handshakes += 1
                sent += 1
            try:
                fuzz(min(examples, KEYLESS_MESSAGES), strategy, send)
                socks[-1].poll(1000 * SILENT_S)             # time for a reply that must not come
                for sock in socks:
                    while sock.poll(0):
                        sock.recv_multipart()
                        replies += 1
            finally:
                for sock in socks:
                    sock.close()
    assert not died(c), died(c)
    changed = pull(ctx, c).tobytes() != before.tobytes()
    report(f"fuzz keys: {sent:,} messages from peers with no keys or unknown keys, over {handshakes + 4:,} "
           f"connections (a new one whenever ZeroMQ dropped the last after its handshake failed): "
           f"{replies} replies, {int(changed)} weight changes; {time.monotonic() - start:.1f} s")
    assert not replies and not changed

    # a worker's key gets in: every message is answered, what a worker may not send is denied
    worker = Keys.load(c.keys, "worker")
    live = Live("server (worker key)", c, raw_dealer(ctx, c.server, lambda s: worker.secure(s, "server")))
    try:
        fuzz(examples, messages(protocol.SERVER_OPS, before.size),
             check_server_reply(live, before, denied=("stats", "control", "checkpoint", "shutdown")))
    finally:
        live.close()
    assert not died(c), died(c)
    if pull(ctx, c).tobytes() != before.tobytes():
        live.count["weight changes"] = max(1, live.count["weight changes"])
    report(live.summary("crashes", "weight changes", "unanswered", "bad replies"))
    assert live.clean(), live.found
