"""What every server and worker does with the scheduler: register, then heartbeat.

    node                                   scheduler
     |-- register {role, addr, host} ------->|   held until the node can be given work
     |<------------- ok {rank, spec} ---------|
     |-- heartbeat {rank, progress} -------->|   every heartbeat_s, from a thread
     |<------------- ok {stop, servers} ------|

Nodes may start in any order: a DEALER queues the registration until the
scheduler is there, and `register` gives up with a clear ClusterError after
`timeout` seconds. A node that hears nothing from the scheduler for `dead_after`
seconds sets `Heartbeat.lost` and stops on its own, so no process outlives the
run that started it.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from typing import Any, Callable

import zmq

from downpour.common import protocol
from downpour.common.client import make_socket
from downpour.common.errors import ClusterError

POLL_TICK_S = 0.1       # longest wait for a heartbeat reply before checking for close()
JOIN_TIMEOUT_S = 5.0    # how long close() waits for the heartbeat thread to end


def say(line: str) -> None:
    """A line for the person who started this node (stderr, at once): joined, left, why."""
    print(line, file=sys.stderr, flush=True)


def register(ctx: zmq.Context, scheduler: str, node: str, meta: dict[str, Any],
             timeout: float) -> dict[str, Any]:
    """Register with the scheduler at `scheduler`; return the meta of its reply (rank, spec)."""
    sock = make_socket(ctx, zmq.DEALER, scheduler)
    try:
        sock.send_multipart(protocol.encode({"op": "register", "node": node, "seq": 1,
                                             "meta": {"host": socket.gethostname(), **meta}}))
        if not sock.poll(1000 * timeout):
            raise ClusterError(f"{node}: no answer from the scheduler at {scheduler} within "
                               f"{timeout:g} s; is it running, and is the address right?")
        header, _ = protocol.decode(sock.recv_multipart())
        try:
            return protocol.raise_for_error(header).get("meta", {})
        except protocol.RemoteError as e:
            raise ClusterError(f"{node}: the scheduler refused to register it: {e}") from None
    finally:
        sock.close()


class Heartbeat(threading.Thread):
    """Sends `progress()` to the scheduler every `interval` seconds from its own socket.

    `reply` holds the meta of the latest reply; `stop` is set when the scheduler
    says stop; `lost` when it has not answered for `dead_after` seconds.
    """

    def __init__(self, ctx: zmq.Context, scheduler: str, node: str, interval: float,
                 dead_after: float, progress: Callable[[], dict[str, Any]]):
        super().__init__(name=f"{node}-heartbeat", daemon=True)
        self.ctx, self.scheduler, self.node = ctx, scheduler, node
        self.interval, self.dead_after, self.progress = interval, dead_after, progress
        self.reply: dict[str, Any] = {}
        self.stop, self.lost, self._closing = threading.Event(), threading.Event(), threading.Event()

    def run(self) -> None:
        sock = make_socket(self.ctx, zmq.DEALER, self.scheduler)
        seq, last_heard = 0, time.monotonic()
        try:
            while not self._closing.is_set():
                seq += 1
                sock.send_multipart(protocol.encode({"op": "heartbeat", "node": self.node,
                                                     "seq": seq, "meta": self.progress()}))
                deadline = time.monotonic() + self.interval
                while (left := deadline - time.monotonic()) > 0 and not self._closing.is_set():
                    if not sock.poll(1000 * min(left, POLL_TICK_S)):
                        continue
                    header, _ = protocol.decode(sock.recv_multipart())
                    if header["op"] == "ok":
                        self.reply = header.get("meta", {})
                        last_heard = time.monotonic()
                        if self.reply.get("stop"):
                            self.stop.set()
                if time.monotonic() - last_heard > self.dead_after:
                    self.lost.set()
        finally:
            sock.close()

    def beat_now(self) -> None:
        """Send one heartbeat immediately (e.g. the last one, saying done) and wait for its reply."""
        sock = make_socket(self.ctx, zmq.DEALER, self.scheduler)
        try:
            sock.send_multipart(protocol.encode({"op": "heartbeat", "node": self.node, "seq": 0,
                                                 "meta": self.progress()}))
            if sock.poll(1000 * self.dead_after):
                header, _ = protocol.decode(sock.recv_multipart())
                if header["op"] == "ok":
                    self.reply = header.get("meta", {})
        finally:
            sock.close()

    def close(self) -> None:
        self._closing.set()
        if self.is_alive():
            self.join(timeout=JOIN_TIMEOUT_S)
