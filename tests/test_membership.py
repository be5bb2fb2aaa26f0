"""The scheduler's membership: registration, held replies, heartbeats, deaths and replacements,
driven over real sockets."""

import time
from dataclasses import replace

import pytest
import zmq

from downpour.common.config import Config
from downpour.common.errors import ClusterError
from downpour.common.wire import protocol, security
from downpour.ps.membership import Membership

CFG = Config(mode="sync", workers=2, shards=2, heartbeat_s=0.1, dead_after_s=0.3, start_timeout_s=5.0)
BASE = {"config": {}, "model": {}, "pieces": [[0, 0, 5], [1, 5, 9]], "n_train": 10}
WAIT_S = 5.0                          # the longest a test waits for a reply


@pytest.fixture
def cluster(tmp_path):
    """(membership, connect): a Membership on a ROUTER, and DEALER peers that talk to it."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.bind(f"ipc://{tmp_path}/scheduler")
    lines = []
    nodes = Membership(CFG, router, BASE, log=lines.append)
    nodes.lines = lines
    peers = []

    def connect():
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(f"ipc://{tmp_path}/scheduler")
        peers.append(s)
        return s

    yield nodes, connect
    for s in peers:
        s.close()
    router.close()
    ctx.term()


def send(sock, op, seq=0, **meta):
    sock.send_multipart(protocol.encode({"op": op, "node": "peer", "seq": seq, "meta": meta}))


def reply(nodes, sock, within_s=WAIT_S):
    """The header of `sock`'s next reply, tending `nodes` meanwhile; None if none came."""
    deadline = time.monotonic() + (within_s or WAIT_S)
    while time.monotonic() < deadline:
        nodes.tend(10)
        if sock.poll(10):
            return protocol.decode(sock.recv_multipart())[0]
    return None


def test_a_worker_that_comes_before_the_servers_waits_for_them(cluster):
    nodes, connect = cluster
    worker = connect()
    send(worker, "register", role="worker")
    assert reply(nodes, worker, within_s=0.2) is None           # held: no servers yet
    servers = [connect(), connect()]
    for i, s in enumerate(servers):
        send(s, "register", role="server", addr=f"tcp://host:{6000 + i}")
        header = reply(nodes, s)
        assert header["meta"]["rank"] == i and header["meta"]["pieces"] == BASE["pieces"]
    header = reply(nodes, worker)
    assert header["meta"]["rank"] == 0
    assert header["meta"]["servers"] == ["tcp://host:6000", "tcp://host:6001"]


def test_a_worker_held_longer_than_dead_after_is_alive_when_the_servers_come(cluster):
    """While the cluster assembles (only registrations are served) a held worker cannot
    beat; its wait is not silence: released, it counts as just seen."""
    nodes, connect = cluster
    worker = connect()
    send(worker, "register", role="worker")
    held_until = time.monotonic() + 2 * CFG.dead_after_s
    while time.monotonic() < held_until:
        nodes._serve(10)
    for i in range(2):
        send(connect(), "register", role="server", addr=f"tcp://host:{6000 + i}")
    while worker.poll(10) == 0:
        nodes._serve(10)
    nodes._check_liveness()
    assert nodes.dead_workers() == [] and not any("marked dead" in line for line in nodes.lines)


def test_registration_errors_change_nothing(cluster):
    nodes, connect = cluster
    peer = connect()
    send(peer, "register", role="observer")
    assert reply(nodes, peer)["code"] == protocol.E_MALFORMED
    send(peer, "register", role="server")                        # no addr
    assert reply(nodes, peer)["code"] == protocol.E_MALFORMED
    for bad in ("host:6000", "tcp://host", "tcp://*:6000", "tcp://host:0", "udp://host:1"):
        send(peer, "register", role="server", addr=bad)          # no node could connect to it
        assert reply(nodes, peer)["code"] == protocol.E_MALFORMED, bad
    assert not nodes.servers and not nodes._spares
    send(peer, "heartbeat", role="worker", rank=0)               # no token
    assert reply(nodes, peer)["code"] == protocol.E_DENIED
    forged = security.mint(b"not the run's secret", "worker", 0, 1)
    send(peer, "heartbeat", role="worker", token=forged)
    assert reply(nodes, peer)["code"] == protocol.E_DENIED
    send(peer, "heartbeat", role="worker", token=security.mint(nodes.secret, "worker", 0, 1))
    assert reply(nodes, peer)["code"] == protocol.E_STATE      # a true token, of nobody yet
    send(peer, "pull")
    assert reply(nodes, peer)["code"] == protocol.E_UNKNOWN_OP
    assert nodes.servers == {} and nodes.workers == {}


def test_a_third_worker_is_refused_while_assembling(cluster):
    nodes, connect = cluster
    nodes.cfg = replace(CFG, dead_after_s=60.0)         # nobody dies while this test waits
    for expected in (None, None, protocol.E_STATE):
        w = connect()
        send(w, "register", role="worker")
        header = reply(nodes, w, within_s=0.2)
        assert (header and header.get("code")) == expected
    assert sorted(nodes.workers) == [0, 1]


def test_a_silent_worker_dies_and_the_live_set_changes(cluster):
    nodes, connect = cluster
    for i in range(2):
        send(connect(), "register", role="server", addr=f"tcp://host:{6000 + i}")
    workers = [connect(), connect()]
    token = {}
    for w in workers:
        send(w, "register", role="worker")
        meta = reply(nodes, w)["meta"]
        token[meta["rank"]] = meta["token"]
    assert sorted(token) == [0, 1]
    assert nodes.assembled and nodes.live_workers() == [0, 1]
    deadline = time.monotonic() + WAIT_S
    while not nodes.workers[1].dead and time.monotonic() < deadline:
        for s, rank in ((workers[0], 0),):                       # worker 1 stays silent
            send(s, "heartbeat", role="worker", rank=rank, token=token[rank], samples=64,
                 done=False)
            assert reply(nodes, s)["meta"]["stop"] is False
        for rank in (0, 1):                                      # the servers keep beating
            nodes.servers[rank].last_seen = time.monotonic()
        time.sleep(0.05)
    assert nodes.workers[1].dead and nodes.live_changed
    assert nodes.live_workers() == [0] and nodes.dead_workers() == [1]
    assert nodes.total("samples") == 64
    assert any("worker-1 stopped answering" in line for line in nodes.lines)


def test_a_dead_server_is_replaced_by_a_spare(cluster):
    nodes, connect = cluster
    moved = []
    nodes.on_server_moved = lambda rank, addr: moved.append((rank, addr))
    for i in range(2):
        s = connect()
        send(s, "register", role="server", addr=f"tcp://host:{6000 + i}")
        assert reply(nodes, s)["meta"]["rank"] == i
    spare = connect()
    send(spare, "register", role="server", addr="tcp://spare:7000")
    assert reply(nodes, spare, within_s=0.2) is None             # every rank is taken: it waits
    nodes.servers[1].last_seen -= 10 * CFG.dead_after_s          # server-1 falls silent
    header = reply(nodes, spare)
    assert header["meta"]["rank"] == 1 and header["meta"]["servers"][1] == "tcp://spare:7000"
    assert moved == [(1, "tcp://spare:7000")] and not nodes.servers[1].dead



@pytest.mark.parametrize("role", ["server", "worker"])
def test_a_waiting_registration_is_answered_again_after_its_wait_and_over_at_the_end(cluster, role):
    """A spare (a server, or a worker joining a full sync run) waits the wait_s it asked,
    is answered `again` and forgotten: a place that comes free later is not sent to it. Its
    next registration waits again; the end of the run answers it `over`."""
    nodes, connect = cluster
    nodes.cfg = replace(CFG, dead_after_s=60.0)
    assembled(nodes, connect)
    meta = {"role": role, "addr": "tcp://spare:7000"} if role == "server" else {"role": role}
    spare = connect()
    send(spare, "register", seq=1, wait_s=0.3, **meta)
    t0 = time.monotonic()
    header = reply(nodes, spare)
    assert header["op"] == "ok" and header["meta"] == {"again": True} and header["seq"] == 1
    assert 0.3 <= time.monotonic() - t0 < 2.0
    assert not nodes._spares and not nodes._spare_workers
    getattr(nodes, f"{role}s")[1].last_seen -= 61            # a place comes free: not its
    assert reply(nodes, spare, within_s=0.3) is None
    getattr(nodes, f"{role}s")[1].last_seen = time.monotonic()   # back (a test's shortcut)
    getattr(nodes, f"{role}s")[1].dead = False
    send(spare, "register", seq=2, wait_s=60, **meta)
    assert reply(nodes, spare, within_s=0.3) is None                 # waits again
    nodes.dismiss_waiting()
    header = reply(nodes, spare)
    assert header["meta"] == {"over": True} and header["seq"] == 2


def test_a_spare_told_again_just_before_the_end_is_answered_over(cluster):
    """The run ends between a spare's `again` and its next registration: the scheduler
    still answers it `over` (for AGAIN_LINGER_S), so the spare does not take it for lost."""
    import threading
    nodes, connect = cluster
    nodes.cfg = replace(CFG, dead_after_s=60.0)
    assembled(nodes, connect)
    spare = connect()
    send(spare, "register", seq=1, wait_s=0.1, role="server", addr="tcp://spare:7000")
    assert reply(nodes, spare)["meta"] == {"again": True}
    comes_back = threading.Timer(0.3, send, (spare, "register"),
                                 {"seq": 2, "wait_s": 60, "role": "server", "addr": "tcp://spare:7000"})
    comes_back.start()
    nodes.dismiss_waiting()                                     # returns after the linger
    comes_back.join()
    assert spare.poll(1000)
    header = protocol.decode(spare.recv_multipart())[0]
    assert header["meta"] == {"over": True} and header["seq"] == 2


def test_a_registration_without_wait_s_waits_start_timeout_s_and_a_bad_one_is_refused(cluster):
    nodes, connect = cluster
    nodes.cfg = replace(CFG, dead_after_s=60.0, start_timeout_s=0.3)
    assembled(nodes, connect)
    spare = connect()
    send(spare, "register", role="server", addr="tcp://spare:7000")
    assert reply(nodes, spare)["meta"] == {"again": True}
    for bad in ("5", 0, -1.0, float("nan"), True):
        send(spare, "register", role="server", addr="tcp://spare:7000", wait_s=bad)
        header = reply(nodes, spare)
        assert header["code"] == protocol.E_MALFORMED and "wait_s" in header["msg"], (bad, header)
    assert not nodes._spares

def test_a_dead_server_with_no_replacement_ends_the_run(cluster):
    nodes, connect = cluster
    for i in range(2):
        send(connect(), "register", role="server", addr=f"tcp://host:{6000 + i}")
    nodes.tend(100)
    nodes.workers[0] = replace(nodes.servers[0], role="worker", rank=0)   # a live worker
    nodes.servers[0].last_seen -= CFG.dead_after_s + CFG.start_timeout_s + 1   # long gone
    with pytest.raises(ClusterError, match="server-0 .* died and no server replaced it"):
        for _ in range(3):
            nodes.workers[0].last_seen = time.monotonic()
            nodes.tend(10)


def assembled(nodes, connect):
    """Two servers and two workers registered; {rank: (socket, token)} of the workers."""
    for i in range(2):
        send(connect(), "register", role="server", addr=f"tcp://host:{6000 + i}")
    workers = {}
    for _ in range(2):
        w = connect()
        send(w, "register", role="worker")
        meta = reply(nodes, w)["meta"]
        workers[meta["rank"]] = (w, meta["token"])
    nodes.started = True                               # what assemble() sets
    return workers


@pytest.mark.parametrize("mode, rank", [("async", 2), ("ssp", 2), ("sync", None)])
def test_a_worker_that_joins_mid_run_gets_a_new_rank_but_in_sync(cluster, mode, rank):
    nodes, connect = cluster
    nodes.cfg = replace(CFG, mode=mode, dead_after_s=60.0)
    assembled(nodes, connect)
    joiner = connect()
    send(joiner, "register", role="worker")
    header = reply(nodes, joiner, within_s=None if rank is not None else 0.3)
    if rank is None:                              # it waits for a dead worker's place
        assert header is None and any("waits for a dead worker's place" in line
                                      for line in nodes.lines)
        nodes.workers[1].last_seen -= 100
        header = reply(nodes, joiner)
        assert header["meta"]["rank"] == 1
    else:
        assert header["meta"]["rank"] == rank and nodes.live_changed
        assert any("worker-2 joined mid-run" in line for line in nodes.lines)


def test_a_restarted_worker_takes_the_dead_rank_and_the_old_one_is_refused(cluster):
    nodes, connect = cluster
    nodes.cfg = replace(CFG, mode="async", dead_after_s=60.0)
    dropped = []
    nodes.on_worker_dead = dropped.append
    workers = assembled(nodes, connect)
    nodes.workers[1].progress = {"samples": 640, "steps": 10, "loss_sum": 5.0, "loss_count": 10}
    nodes.workers[1].last_seen -= 100                  # worker-1 falls silent: dead
    nodes.tend(0)
    assert dropped == [1] and nodes.workers[1].dead
    old, old_token = workers[1]
    send(old, "heartbeat", role="worker", token=old_token)
    assert "declared dead" in reply(nodes, old)["msg"]             # its chunks went to others
    restarted = connect()
    send(restarted, "register", role="worker")
    meta = reply(nodes, restarted)["meta"]
    assert meta["rank"] == 1 and meta["token"] != old_token
    send(old, "heartbeat", role="worker", token=old_token)
    assert "went to another worker" in reply(nodes, old)["msg"]
    assert nodes.total("samples") == 640 and nodes.worker_samples() == {"0": 0, "1": 640}


def test_counters_come_with_chunk_requests_and_only_grow(cluster):
    """A worker's chunk request carries its counters, so what it finished counts even if it
    dies before its next heartbeat; an older heartbeat arriving late takes nothing back."""
    nodes, connect = cluster
    nodes.cfg = replace(CFG, mode="async", dead_after_s=60.0)
    nodes.on_next_chunk = lambda rank, header: {"chunks": [], "end": True}
    sock, token = assembled(nodes, connect)[0]
    me = {"role": "worker", "token": token}
    send(sock, "next_chunk", seq=1, **me, done=[], want=1, progress={"samples": 160, "steps": 2})
    assert reply(nodes, sock)["op"] == "ok"
    send(sock, "heartbeat", seq=2, **me, samples=80, steps=1, loss_sum=2.0, loss_count=1)
    assert reply(nodes, sock)["op"] == "ok"
    assert nodes.worker_samples()["0"] == 160 and nodes.total("steps") == 2
    assert nodes.total("loss_sum") == 2.0
    for bad in [{"samples": "many"}, {"steps": -1}, {"samples": float("nan")}, [1]]:
        send(sock, "next_chunk", seq=3, **me, done=[], want=1, progress=bad)
        answer = reply(nodes, sock)
        assert answer["op"] == "error" and "progress" in answer["msg"], answer
    assert nodes.worker_samples()["0"] == 160 and nodes.total("steps") == 2
