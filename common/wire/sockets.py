"""The sockets every role uses: made, bounded and closed in one place.

    make_socket   a socket with linger 0, a frame limit, a receive queue bound and a send
                  timeout, bound or connected; with keys a CURVE server or client. A
                  failed bind or connect closes it and raises a ConfigError that names
                  the address and the cause (downpour.common.wire.address.CAUSES)
    send          queue frames, or say False where ZeroMQ cannot queue them in time
    bind_router   a ROUTER bound to an address, and the endpoint it got
    frame_limit   the largest frame a message about given pieces may have

Every socket is bounded: frames of at most `max_frame` bytes (a peer that sends a
larger one is disconnected), at most RCV_HWM messages queued per peer, and, with
keys, CurveZMQ (downpour.common.wire.security).
"""

from __future__ import annotations

from typing import Sequence

import zmq

from downpour.common.wire import protocol
from downpour.common.wire.address import bind_failure
from downpour.common.wire.security import Keys

RCV_HWM = 100      # messages queued per peer before ZeroMQ stops reading from it
WIRE_SLACK = 128   # bytes a frame grows by on the wire (CurveZMQ's box: nonce, MAC, flags)
SEND_TIMEOUT_MS = 1000   # the longest a send may block (a DEALER with no live connection blocks)


def make_socket(ctx: zmq.Context, kind: int, address: str, *, bind: bool = False,
                max_frame: int = protocol.MAX_HEADER, keys: Keys | None = None,
                peer: str = "") -> zmq.Socket:
    """A socket with linger 0 (closing never blocks), connected or bound to `address`.

    It takes frames of at most `max_frame` bytes and queues at most RCV_HWM messages
    per peer. With `keys`, a bound socket is a CURVE server (enter security.guard on
    `ctx` first) and a connected one a CURVE client of the role `peer`.

    If the bind or connect fails, the socket is closed (so the context can still be
    terminated) and a ConfigError names the address and the cause in words: the port is
    taken, the address is not this host's, no permission (downpour.common.wire.address.CAUSES).
    """
    sock = ctx.socket(kind)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame + WIRE_SLACK)    # checked on the wire's bytes
        sock.setsockopt(zmq.RCVHWM, RCV_HWM)
        sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        if address.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)                           # an IPv6 address: allow it
        if keys is not None:
            keys.secure(sock, None if bind else peer)
        if bind:
            sock.bind(address)
        else:
            sock.connect(address)
    except zmq.ZMQError as e:
        sock.close()
        raise bind_failure(address, e.errno, e.strerror, bind=bind) from None
    except BaseException:
        sock.close()
        raise
    return sock


def send(sock: zmq.Socket, frames: list, track: bool = False) -> zmq.MessageTracker | bool:
    """Queue `frames` on `sock` (zero-copy with a tracker, if `track`); False if they could
    not be queued within SEND_TIMEOUT_MS: a DEALER whose connection ZeroMQ dropped for
    good (a reply over its frame limit, a failed CURVE handshake) has nowhere to queue
    them. The request is then lost, as a dropped one would be, and the caller's timeout
    and retries end the wait."""
    try:
        return sock.send_multipart(frames, copy=not track, track=track) if track else \
            (sock.send_multipart(frames) or True)
    except zmq.Again:
        return False


def bind_router(ctx: zmq.Context, address: str, max_frame: int = protocol.MAX_HEADER,
                keys: Keys | None = None) -> tuple[zmq.Socket, str]:
    """A ROUTER bound to `address` (tcp port 0 = a free port) and the endpoint it got;
    ConfigError (the socket closed) if the bind fails (`make_socket`)."""
    sock = make_socket(ctx, zmq.ROUTER, address, bind=True, max_frame=max_frame, keys=keys)
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


def frame_limit(ranges: Sequence[tuple[int, int]]) -> int:
    """The largest frame a message about pieces `ranges` has: a header, or a piece's float32s."""
    return max(protocol.MAX_HEADER, *(4 * min(hi - lo, protocol.MAX_FRAME // 4) for lo, hi in ranges))
