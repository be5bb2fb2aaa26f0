"""What every server and worker does with the scheduler: register, then heartbeat.

    node                                   scheduler
     |-- register {role, addr, host} ------->|   held until the node can be given work
     |<------ ok {rank, incarnation, spec} ---|
     |-- heartbeat {rank, progress} -------->|   every heartbeat_s, from a thread
     |<------------- ok {stop, servers} ------|
     |-- next_chunk {done, want, progress} ->|   async, ssp workers: `ChunkFeed`, one
     |<------------- ok {chunks, end} --------|   chunk ahead of the one in training

Nodes may start in any order: a DEALER queues the registration until the
scheduler is there, and `register` gives up with a clear ClusterError after
`timeout` seconds. A node that hears nothing from the scheduler for `dead_after`
seconds sets `Heartbeat.lost` and stops on its own, so no process outlives the
run that started it.
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
import sys
import threading
import time
from collections import deque
from typing import Any, Callable

import zmq

from downpour.common.errors import ClusterError, ConfigError
from downpour.common.wire import protocol
from downpour.common.wire.address import parse
from downpour.common.wire.security import Keys
from downpour.common.wire.sockets import make_socket, send

POLL_TICK_S = 0.1       # longest wait for a heartbeat reply before checking for close()
JOIN_TIMEOUT_S = 5.0    # how long close() waits for the heartbeat thread to end
EAGER_S = 0.02          # heartbeat interval of a worker waiting for the word to start
NAME_GONE_S = 3.0       # a scheduler host name that stays unresolvable this long is gone
WAIT_SAY_S = 10.0       # how often a node waiting to register says so


def _host_name(scheduler: str) -> str | None:
    """The host name in the tcp:// address `scheduler`, or None (ipc, an IP address)."""
    try:
        where = parse(scheduler, "--scheduler", bind=False)
    except ConfigError:
        return None
    try:
        ipaddress.ip_address(where.host)
        return None
    except ValueError:
        return where.host or None


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
        return True
    except OSError:
        return False


def say(line: str) -> None:
    """A line for the person who started this node (stderr, at once): joined, left, why."""
    print(line, file=sys.stderr, flush=True)


def register(ctx: zmq.Context, scheduler: str, node: str, meta: dict[str, Any],
             timeout: float, keys: Keys | None = None) -> dict[str, Any] | None:
    """Register with the scheduler at `scheduler`; return the meta of its reply (rank,
    token, spec), or None when the run ended while this node waited for a place (it says
    so). With `keys` (the cluster's) over CurveZMQ.

    A node with no place yet (a spare server, a worker joining a full sync run) waits:
    it asks to wait half its `timeout`, is answered `again` after that, and registers
    again, so it stands by for as long as the scheduler answers. ClusterError after
    `timeout` seconds without an answer, and sooner when the scheduler's host name stops
    resolving for NAME_GONE_S: on a container network a name goes when its container
    exits, so a node whose scheduler is gone (or never came) does not wait out the whole
    timeout.
    """
    host = _host_name(scheduler)
    sock = make_socket(ctx, zmq.DEALER, scheduler, keys=keys, peer="scheduler")
    try:
        for seq in itertools.count(1):
            send(sock, protocol.encode({"op": "register", "node": node, "seq": seq, "meta": {
                "host": socket.gethostname(), "wait_s": timeout / 2, **meta}}))
            header = _answer(sock, scheduler, node, host, timeout, keys, say_waiting=seq == 1)
            try:
                reply = protocol.raise_for_error(header).get("meta", {})
            except protocol.RemoteError as e:
                raise ClusterError(f"{node}: the scheduler refused to register it: {e}") from None
            if reply.get("over"):
                say(f"{node}: the run ended while it waited for a place; nothing to do")
                return None
            if not reply.get("again"):
                return reply
            if seq == 1:
                say(f"{node}: every place is taken; it stands by as a spare while the "
                    f"scheduler at {scheduler} answers")
    finally:
        sock.close()


def _answer(sock: zmq.Socket, scheduler: str, node: str, host: str | None, timeout: float,
            keys: Keys | None, say_waiting: bool) -> dict[str, Any]:
    """The header of the scheduler's answer on `sock` (see `register`); with `say_waiting`,
    a line every WAIT_SAY_S while there is none."""
    start = time.monotonic()
    unresolved_since, said = None, start
    while not sock.poll(1000 * POLL_TICK_S):
        now = time.monotonic()
        if now - start > timeout:
            raise ClusterError(f"{node}: no answer from the scheduler at {scheduler} within "
                               f"{timeout:g} s; is it running, and is the address right?"
                               + (" Are these keys the scheduler's (--keys)?" if keys else ""))
        if host is not None and not _resolves(host):
            unresolved_since = unresolved_since or now
            if now - unresolved_since > NAME_GONE_S:
                raise ClusterError(f"{node}: the scheduler's host {host!r} has not resolved "
                                   f"for {NAME_GONE_S:g} s: the scheduler is not running (or "
                                   "the address is wrong)")
        else:
            unresolved_since = None
        if say_waiting and now - said > WAIT_SAY_S:
            said = now
            say(f"{node}: waiting for the scheduler at {scheduler} "
                f"({timeout - (now - start):.0f} s left)")
    return protocol.decode(sock.recv_multipart())[0]


class Heartbeat(threading.Thread):
    """Sends `progress()` to the scheduler every `interval` seconds from its own socket.

    `reply` holds the meta of the latest reply; `stop` is set when the scheduler
    says stop; `lost` when it has not answered for `dead_after` seconds; `refused`
    holds the scheduler's message when it refuses this node (its rank went to
    another, or its token is not its own). While `eager` is set it beats every
    EAGER_S instead (a worker waiting for the word to start: `wait_for_go`).
    """

    def __init__(self, ctx: zmq.Context, scheduler: str, node: str, interval: float,
                 dead_after: float, progress: Callable[[], dict[str, Any]],
                 keys: Keys | None = None):
        super().__init__(name=f"{node}-heartbeat", daemon=True)
        self.ctx, self.scheduler, self.node, self.keys = ctx, scheduler, node, keys
        self.interval, self.dead_after, self.progress = interval, dead_after, progress
        self.reply: dict[str, Any] = {}
        self.refused = ""
        self.stop, self.lost, self._closing = threading.Event(), threading.Event(), threading.Event()
        self.eager = threading.Event()

    def run(self) -> None:
        sock = self._socket()
        seq, last_heard = 0, time.monotonic()
        try:
            while not self._closing.is_set():
                seq += 1
                send(sock, protocol.encode({"op": "heartbeat", "node": self.node,
                                            "seq": seq, "meta": self.progress()}))
                deadline = time.monotonic() + (EAGER_S if self.eager.is_set() else self.interval)
                while (left := deadline - time.monotonic()) > 0 and not self._closing.is_set():
                    if not sock.poll(1000 * min(left, POLL_TICK_S)):
                        continue
                    self._heard(protocol.decode(sock.recv_multipart())[0])
                    last_heard = time.monotonic()
                if time.monotonic() - last_heard > self.dead_after:
                    self.lost.set()
        finally:
            sock.close()

    def said_stop(self) -> bool:
        """Whether the scheduler said stop; ClusterError if it refused this node or went
        silent (checked before every step of a worker)."""
        if self.refused:
            raise ClusterError(f"{self.node}: the scheduler refused it: {self.refused}")
        if self.stop.is_set():
            return True
        if self.lost.is_set():
            raise ClusterError(f"{self.node}: the scheduler stopped answering")
        return False

    def beat_now(self, timeout: float | None = None) -> bool:
        """Send one heartbeat now (e.g. the last one, saying done, or a last try before
        giving the scheduler up) and wait up to `timeout` (default dead_after) seconds
        for its reply; whether one came. A refusal sets `refused`."""
        sock = self._socket()
        try:
            send(sock, protocol.encode({"op": "heartbeat", "node": self.node, "seq": 0,
                                        "meta": self.progress()}))
            if not sock.poll(1000 * (self.dead_after if timeout is None else timeout)):
                return False
            self._heard(protocol.decode(sock.recv_multipart())[0])
            return True
        finally:
            sock.close()

    def _socket(self) -> zmq.Socket:
        return make_socket(self.ctx, zmq.DEALER, self.scheduler, keys=self.keys, peer="scheduler")

    def _heard(self, header: dict[str, Any]) -> None:
        """Take in the scheduler's answer to a heartbeat: its news, a stop, or a refusal."""
        if header["op"] == "ok":
            self.reply = header.get("meta", {})
            if self.reply.get("stop"):
                self.stop.set()
        elif header.get("code") in (protocol.E_STATE, protocol.E_DENIED):
            self.refused = header.get("msg", "refused")

    def close(self) -> None:
        self._closing.set()
        if self.is_alive():
            self.join(timeout=JOIN_TIMEOUT_S)


def worker_progress(rank: int, incarnation: int) -> dict[str, Any]:
    """A worker's progress as its heartbeats report it, before its first step: its
    counters (protocol.COUNTERS) at 0; t_start and t_end (Unix seconds) bracket its steps."""
    return {"role": "worker", "rank": rank, "incarnation": incarnation,
            **dict.fromkeys(protocol.COUNTERS, 0), "done": False, "t_start": 0.0, "t_end": 0.0}


def wait_for_go(heartbeat: Heartbeat, timeout_s: float, node: str) -> None:
    """Wait until the scheduler's heartbeat reply says `go` (every worker of the run is
    ready: ps/membership.py), beating every EAGER_S meanwhile, so that the workers take
    their first steps together. Returns at once on stop, on a refusal or when the
    scheduler is lost (the training loop handles those); ClusterError after `timeout_s`."""
    heartbeat.eager.set()
    try:
        deadline = time.monotonic() + timeout_s
        while not heartbeat.reply.get("go"):
            if heartbeat.stop.is_set() or heartbeat.refused or heartbeat.lost.is_set():
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"{node}: the scheduler did not say start within {timeout_s:g} "
                                   "s (--start-timeout-s): some other worker never got ready")
            time.sleep(EAGER_S / 2)
    finally:
        heartbeat.eager.clear()


class ChunkFeed:
    """A worker's chunks, drawn from the scheduler one ahead of the chunk in training.

    `take()` returns the next chunk to train, or None when the run has no more for
    this worker; it reports the previous chunk done and asks for the next one in the
    same request, sent while the new chunk trains, so the answer is there before it
    is needed (near the end of the run the scheduler deals nothing ahead, and the
    next `take()` asks again). `more()` says whether another chunk may follow the
    one in training (it waits for the answer in flight if there is one). Requests
    are retried with the same seq after `timeout` seconds, `retries` times;
    ClusterError after that, or when the scheduler refuses (e.g. this worker was
    declared dead).
    """

    def __init__(self, ctx: zmq.Context, scheduler: str, node: str, identity: dict[str, Any],
                 timeout: float, retries: int, ahead: int = 1,
                 lost: threading.Event | None = None,
                 progress: Callable[[], dict[str, Any]] | None = None, keys: Keys | None = None):
        """`lost` (the heartbeat's): set when the scheduler is gone; a wait then ends at once.
        `progress()`: the worker's counters, sent with each request so that the chunks
        reported done are counted even if the worker dies before its next heartbeat."""
        self.node, self.identity, self.timeout, self.retries = node, identity, timeout, retries
        self.progress = progress
        self.lost = lost
        self.ahead = ahead                    # chunks held beyond the one in training
        self.sock = make_socket(ctx, zmq.DEALER, scheduler, keys=keys, peer="scheduler")
        self.current: int | None = None       # the chunk in training
        self._hand: deque[int] = deque()      # chunks dealt, not started
        self._ended = False                   # the scheduler has nothing more to deal
        self._seq = 0
        self._pending: list | None = None     # the frames of the request in flight
        self._done: list[int] = []            # finished, not yet reported

    def take(self) -> int | None:
        """Finish the chunk in training and start the next; None when there is none."""
        if self.current is not None:
            self._done.append(self.current)
            self.current = None
        if not self._hand:
            self._wait()                      # the answer in flight, if any
        if not self._hand and not self._ended:
            self._ask(want=1 + self.ahead)
            self._wait()
        if self._hand:
            self.current = self._hand.popleft()
        if self._done or (not self._ended and len(self._hand) < self.ahead):
            self._ask(want=0 if self._ended else self.ahead - len(self._hand))
        if self.current is None:
            self._wait()                      # the last report: the ledger marks it done
        return self.current

    def more(self) -> bool:
        """Whether a chunk may follow the one in training: False only once the scheduler
        has said it has nothing more to deal and none is in hand."""
        if not self._hand:
            self._wait()
        return bool(self._hand) or not self._ended

    def close(self) -> None:
        self.sock.close()

    def _ask(self, want: int) -> None:
        """Send a request (after the answer to the one in flight, if any)."""
        self._wait()
        self._seq += 1
        meta = {**self.identity, "done": self._done, "want": want}
        if self.progress is not None:
            meta["progress"] = self.progress()
        self._pending = protocol.encode({"op": "next_chunk", "node": self.node, "seq": self._seq,
                                         "meta": meta})
        self._done = []
        send(self.sock, self._pending)

    def _wait(self) -> None:
        """Receive the answer to the request in flight (if any): Lazy Pirate, same seq."""
        if self._pending is None:
            return
        for attempt in range(self.retries + 1):
            if attempt:
                send(self.sock, self._pending)            # the same seq: answered once
            deadline = time.monotonic() + self.timeout
            while (left := deadline - time.monotonic()) > 0:
                if self.lost is not None and self.lost.is_set():
                    raise ClusterError(f"{self.node}: the scheduler stopped answering")
                if not self.sock.poll(1000 * min(left, POLL_TICK_S)):
                    continue
                header, _ = protocol.decode(self.sock.recv_multipart())
                if header["seq"] != self._seq:
                    continue                              # an answer to an earlier attempt
                try:
                    meta = protocol.raise_for_error(header).get("meta", {})
                except protocol.RemoteError as e:
                    raise ClusterError(f"{self.node}: the scheduler refused its chunk request: "
                                       f"{e}") from None
                self._hand.extend(meta.get("chunks", []))
                self._ended = bool(meta.get("end"))
                self._pending = None
                return
        raise ClusterError(f"{self.node}: the scheduler did not answer next_chunk in "
                           f"{self.retries + 1} attempts of {self.timeout:g} s; is it running?")

