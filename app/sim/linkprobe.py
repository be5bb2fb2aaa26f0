"""The emulated link as this host's TCP and tbf carry a run's messages: a measured figure.

    efficiency(link, nbytes, senders)
        k = senders workers each send WARMUP + ROUNDS messages of nbytes to one server,
        which answers each with nbytes (a push_pull without the work), every node behind
        `link` (app/netem.py: a private network namespace, tbf each way); the time
        the last ROUNDS take, as the engine's links predict it, over the time they took.

Why: tbf holds 50 ms of its rate. At 100 Mbit/s that is 625 KB, less than one 940 KB
message that TCP hands the qdisc at once, and 8 workers pushing at once overflow it at
the server's download, so the emulated link drops and retransmits: measured, 8 async
workers moved 78% of what a lossless link of that rate moves; at 1 Gbit/s the queue
holds 6.25 MB and they moved 98%. The engine has no losses; where the probe's tbf
queues drop packets (`tc -s qdisc`: 508 in the 100 Mbit/s, 8-sender, 940 KB probe;
none at 1 Gbit/s) the profile keeps the share of the model's rate the probe reached
(0.79 there), per link rate, message size and number of senders (at most MAX_SENDERS:
a sweep past them takes the figure of MAX_SENDERS), and the model's links carry that
share of their rate. Without drops the figure is 1.

The probe runs itself again inside the namespace (`python -m downpour.sim.linkprobe`):
`probe` builds the network and starts one `serve` and k `send` processes, each in its
node's namespace; the senders start together at a time given to all and each prints
when it started and ended.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from downpour import netem
from downpour.common.config import parse_rate
from downpour.common.errors import ClusterError
from downpour.launch import child_env

ROUNDS = 8              # messages each sender times ...
WARMUP = 2              # ... after this many untimed ones (TCP's windows open)
MAX_SENDERS = 16        # the most senders probed
PORT = 5700
START_AFTER_S = 1.5     # the senders start together this long after they are spawned
TIMEOUT_S = 20.0        # for any one wait of the probe
ATTEMPTS = 3            # probes tried before giving up
MODULE = [sys.executable, "-m", "downpour.sim.linkprobe"]


def efficiency(link: str, nbytes: int, senders: int) -> float:
    """The share of the model's link rate the emulated link carried (at most 1) when its
    tbf queues dropped packets; 1.0 when they dropped none (then the probe's own timing,
    a few round trips started in lock step, is no better a figure than the model's).
    ClusterError if the probe fails ATTEMPTS times."""
    senders = max(1, min(senders, MAX_SENDERS))
    for attempt in range(ATTEMPTS):
        with tempfile.TemporaryDirectory(prefix="downpour-probe-") as tmp:
            out = Path(tmp) / "probe.json"
            status = netem.run_inside([*MODULE, "probe", link, str(nbytes), str(senders), str(out)],
                                      child_env())
            if status == 0 and out.exists():
                probe = json.loads(out.read_text())
                break
    else:
        raise ClusterError(f"the link probe ({link}, {nbytes} bytes, {senders} senders) failed "
                           f"{ATTEMPTS} times (last exit {status})")
    if not probe["drops"]:
        return 1.0                 # no loss: what else the probe's timing shows is its own
    return min(1.0, model_seconds(link, nbytes, senders) / probe["seconds"])


def model_seconds(link: str, nbytes: int, senders: int) -> float:
    """How long the engine's links take for the probe's exchange (no CPU costs)."""
    from downpour.sim.network import (
        WIRE_EFFICIENCY,
        Bucket,
        Clock,
        Connection,
        Shared,
        Signal,
        spawn,
    )
    rate = parse_rate(link, "link") / 8 * WIRE_EFFICIENCY
    burst = netem.burst_bytes(parse_rate(link, "link")) * WIRE_EFFICIENCY
    clock = Clock()
    down, up = Shared(clock, Bucket(rate, burst)), Shared(clock, Bucket(rate, burst))
    ends = [0.0] * senders

    def sender(i: int):
        to_server, to_worker = Connection(down, Bucket(rate, burst)), Connection(up, Bucket(rate, burst))
        for _ in range(ROUNDS):
            answered = Signal(clock)
            to_server.send(nbytes, lambda: to_worker.send(nbytes, answered.fire))
            yield answered
        ends[i] = clock.now
    for i in range(senders):
        spawn(clock, sender(i))
    clock.run()
    return max(ends)


# ---------------------------------------------------------------------------- inside


def _probe(link: str, nbytes: int, senders: int, out: str) -> None:
    rate = parse_rate(link, "link")
    with netem.Network() as net:
        server = net.add("server", rate)
        workers = [net.add(f"worker-{i}", rate) for i in range(senders)]
        address = f"tcp://{server.address}:{PORT}"
        serve = subprocess.Popen(net.command(server, [*MODULE, "serve", address, str(nbytes),
                                                      str(senders * (WARMUP + ROUNDS + 1))]))
        start = time.time() + START_AFTER_S
        sends = [subprocess.Popen(net.command(w, [*MODULE, "send", address, str(nbytes), str(start)]),
                                  stdout=subprocess.PIPE, text=True) for w in workers]
        try:
            outputs = [p.communicate(timeout=3 * TIMEOUT_S)[0] for p in sends]
            serve.wait(timeout=TIMEOUT_S)
            if any(p.returncode for p in [serve, *sends]):
                raise SystemExit("link probe: a sender or the server failed")
            times = [json.loads(o) for o in outputs]
        finally:
            for p in [serve, *sends]:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        drops = _drops([]) + sum(_drops(["nsenter", "--target", str(n.holder), "--net"])
                                 for n in net.nodes.values())
    seconds = max(t[1] for t in times) - min(t[0] for t in times)
    Path(out).write_text(json.dumps({"seconds": seconds, "drops": drops}))


def _drops(prefix: list[str]) -> int:
    """Packets the tbf qdiscs of a namespace dropped (`tc -s qdisc show`)."""
    shown = subprocess.run([*prefix, "tc", "-s", "qdisc", "show"], capture_output=True, text=True,
                           timeout=netem.COMMAND_TIMEOUT_S).stdout
    return sum(int(d) for d in re.findall(r"dropped (\d+)", shown))


@contextmanager
def _socket(kind: str, address: str):
    """A ROUTER bound to `address`, or a DEALER connected to it; closed on the way out."""
    import zmq
    ctx = zmq.Context()
    sock = ctx.socket(getattr(zmq, kind))
    sock.linger = 0
    (sock.bind if kind == "ROUTER" else sock.connect)(address)
    try:
        yield sock
    finally:
        sock.close()
        ctx.term()


def _serve(address: str, nbytes: int, messages: int) -> None:
    reply = bytes(nbytes)
    with _socket("ROUTER", address) as sock:
        for _ in range(messages):
            if not sock.poll(1000 * TIMEOUT_S):
                raise SystemExit("link probe: no sender")
            ident, payload = sock.recv_multipart(copy=False)
            sock.send_multipart([ident, reply if len(payload) > 1 else b"x"], copy=False)


def _round_trip(sock, message: bytes) -> None:
    """Send `message`, wait for the answer; SystemExit if none comes in TIMEOUT_S."""
    sock.send(message, copy=False)
    if not sock.poll(1000 * TIMEOUT_S):
        raise SystemExit("link probe: the server did not answer")
    sock.recv(copy=False)


def _send(address: str, nbytes: int, start: float) -> None:
    message = bytes(nbytes)
    with _socket("DEALER", address) as sock:
        _round_trip(sock, b"x")                          # connected, before the clock starts
        time.sleep(max(0.0, start - time.time()))
        for _ in range(WARMUP):
            _round_trip(sock, message)
        t0 = time.time()
        for _ in range(ROUNDS):
            _round_trip(sock, message)
        print(json.dumps([t0, time.time()]))


if __name__ == "__main__":
    verb, *args = sys.argv[1:]
    if verb == "probe":
        _probe(args[0], int(args[1]), int(args[2]), args[3])
    elif verb == "serve":
        _serve(args[0], int(args[1]), int(args[2]))
    else:
        _send(args[0], int(args[1]), float(args[2]))
