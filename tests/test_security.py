"""A secure cluster: keys, CurveZMQ, permissions by the key's role, rank tokens, and bounded
resources, against a real scheduler and server (processes, ipc sockets in tmp_path)."""

import os
import stat
import time

import numpy as np
import pytest
import zmq

from downpour.common.errors import ClusterError, ConfigError, ProtocolError
from downpour.common.wire import protocol, security
from downpour.common.wire.client import ShardClient
from downpour.common.wire.node import register
from downpour.common.wire.sockets import SEND_TIMEOUT_MS, bind_router, make_socket, send

WAIT_S = 20.0                 # the longest any reply may take (the first includes process start)
SILENCE_S = 1.0               # how long "no reply" is waited for
MODEL = ("--synthetic", 400, "--hidden", 8, "--batch-size", 10, "--optimizer", "sgd", "--lr", 0.1,
         "--dead-after-s", 60,
         "--start-timeout-s", 60)


# -- keys and tokens --------------------------------------------------------------------------

def test_keys_are_one_pair_per_role_with_private_secrets(tmp_path, downpour):
    r = downpour("keys", tmp_path / "k")
    assert r.returncode == 0, r.stderr
    for role in security.ROLES:
        assert stat.S_IMODE((tmp_path / "k" / f"{role}.key_secret").stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "k" / f"{role}.key").stat().st_mode) == 0o644
        keys = security.Keys.load(tmp_path / "k", role)
        assert keys.role == role and keys.publics[role] == keys.public
    before = {p.name: p.read_bytes() for p in (tmp_path / "k").iterdir()}
    again = downpour("keys", tmp_path / "k")                       # kept, not replaced
    assert again.returncode == 0 and "kept" in again.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "k").iterdir()} == before


def test_missing_or_partial_keys_are_clear_errors(tmp_path, downpour):
    security.write_keys(tmp_path / "k")
    (tmp_path / "k" / "server.key_secret").unlink()
    with pytest.raises(ConfigError, match=r"server\.key_secret .*downpour keys"):
        security.Keys.load(tmp_path / "k", "server")
    r = downpour("keys", tmp_path / "k")
    assert r.returncode == 2 and "not all six" in r.stderr
    r = downpour("worker", "--scheduler", "ipc:///nowhere", "--keys", tmp_path / "none")
    assert r.returncode == 2 and "worker.key" in r.stderr and "downpour keys" in r.stderr


def test_a_token_names_its_role_rank_and_incarnation_and_cannot_be_forged():
    secret = b"s" * 32
    token = security.mint(secret, "worker", 3, 7)
    assert security.read_token(secret, token, "worker") == (3, 7)
    forged = bytearray(token)
    forged[0] = 4                                                   # rank 4, same MAC
    for bad, role in [(bytes(forged), "worker"), (token, "server"), (token[:-1], "worker"),
                      (None, "worker"), (security.mint(b"x" * 32, "worker", 3, 7), "worker")]:
        with pytest.raises(ProtocolError) as e:
            security.read_token(secret, bad, role)
        assert e.value.code == protocol.E_DENIED


def test_a_curve_socket_admits_only_cluster_keys_and_nobody_without_a_zap_handler(tmp_path, ctx):
    security.write_keys(tmp_path / "k")
    server, worker = (security.Keys.load(tmp_path / "k", role) for role in ("server", "worker"))
    for guarded in (False, True):
        zap = security.Zap(ctx, server) if guarded else None
        router, address = bind_router(ctx, f"ipc://{tmp_path}/r{guarded}", keys=server)
        stranger = ctx.socket(zmq.DEALER)
        stranger.linger = 0
        stranger.curve_publickey, stranger.curve_secretkey = zmq.curve_keypair()
        stranger.curve_serverkey = server.public
        stranger.connect(address)
        member = peer(ctx, address, worker)
        for sock in (member, stranger):
            sock.send(b"hello")
        got = [router.recv_multipart(copy=False) for _ in range(2) if router.poll(1000 * SILENCE_S)]
        if not guarded:
            assert got == []                                          # fail closed
        else:
            assert [security.peer_role(frames[1]) for frames in got] == ["worker"]
            zap.close()
        for sock in (member, stranger, router):
            sock.close()


# -- a live cluster with keys -----------------------------------------------------------------

@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def cluster(start, tmp_path, ctx, mode="async", keys=True):
    """A scheduler waiting for 2 workers and its one server, with keys in tmp_path/k (or
    none); this test registers as a worker: (server address, register meta, worker keys,
    server process, scheduler process)."""
    keys_dir = tmp_path / "k"
    security.write_keys(keys_dir)
    flags = ("--keys", keys_dir) if keys else ()
    scheduler = start("scheduler", "--bind", f"ipc://{tmp_path}/sch", "--mode", mode,
                      "--workers", 2, "--shards", 1, *MODEL, *flags)
    server = start("server", "--scheduler", f"ipc://{tmp_path}/sch", "--bind",
                   f"ipc://{tmp_path}/srv", *flags)
    worker_keys = security.Keys.load(keys_dir, "worker") if keys else None
    meta = register(ctx, f"ipc://{tmp_path}/sch", "test-worker", {"role": "worker"}, WAIT_S,
                    worker_keys)
    return meta["servers"][0], meta, worker_keys, server, scheduler


def peer(ctx, address, keys=None, peer_role="server"):
    """A DEALER to `address`: with `keys` as their role, a CURVE client of `peer_role`."""
    return make_socket(ctx, zmq.DEALER, address, keys=keys, peer=peer_role, max_frame=protocol.MAX_FRAME)


def ask(sock, op, seq, payload=None, within=WAIT_S, **fields):
    """Send one request; its reply header and payload (as float32), or None if none came."""
    sock.send_multipart(protocol.encode({"op": op, "node": "worker-0", "seq": seq, **fields}, payload))
    if not sock.poll(1000 * within):
        return None
    header, frames = protocol.decode(sock.recv_multipart())
    return header, (np.frombuffer(b"".join(frames), np.float32) if frames else None)


def weights(ctx, address, keys, token):
    header, params = ask(peer(ctx, address, keys), "pull", 1, piece=0, token=token)
    assert header["op"] == "ok", header
    return header["clock"], params


def test_without_keys_or_with_unknown_keys_a_peer_gets_no_reply(nodes, tmp_path, ctx):
    address, meta, keys, server, _ = cluster(nodes, tmp_path, ctx)
    version, before = weights(ctx, address, keys, meta["token"])
    g = np.ones(len(before), np.float32)
    stranger = zmq.curve_keypair()
    for who in (None, stranger):
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        if who is not None:
            sock.curve_publickey, sock.curve_secretkey = who
            sock.curve_serverkey = keys.publics["server"]          # it even knows the server's key
        sock.connect(address)
        for seq, (op, payload) in enumerate([("pull", None), ("push", g), ("shutdown", None)]):
            sock.send_multipart(protocol.encode({"op": op, "node": "worker-0", "seq": seq + 1,
                                                 "piece": 0, "token": meta["token"]}, payload))
        assert not sock.poll(1000 * SILENCE_S), f"a peer with {who and 'unknown'} keys got a reply"
        sock.close()
    assert server.poll() is None
    after_version, after = weights(ctx, address, keys, meta["token"])
    assert after_version == version and after.tobytes() == before.tobytes()


def test_the_worker_key_may_pull_but_not_control_or_shut_down(nodes, tmp_path, ctx):
    address, meta, keys, server, _ = cluster(nodes, tmp_path, ctx)
    version, before = weights(ctx, address, keys, meta["token"])
    sock = peer(ctx, address, keys)
    for seq, (op, extra) in enumerate([("control", {"meta": {"lr_scale": 1e6}}), ("shutdown", {}),
                                       ("checkpoint", {}), ("stats", {})], start=10):
        header, _ = ask(sock, op, seq, piece=0, node="scheduler", **extra)
        assert (header["op"], header["code"]) == ("error", protocol.E_DENIED), (op, header)
        assert "a worker may not send" in header["msg"]
    assert server.poll() is None
    as_scheduler = peer(ctx, address, security.Keys.load(tmp_path / "k", "scheduler"))
    assert ask(as_scheduler, "stats", 1, piece=0)[0]["meta"]["lr"] == pytest.approx(0.1)  # unscaled
    assert np.array_equal(weights(ctx, address, keys, meta["token"])[1], before)


def test_the_worker_key_cannot_register_as_a_server_or_speak_for_one(nodes, tmp_path, ctx):
    address, meta, keys, _, _ = cluster(nodes, tmp_path, ctx)
    with pytest.raises(Exception, match="registers as a worker, not as 'server'"):
        register(ctx, f"ipc://{tmp_path}/sch", "x", {"role": "server", "addr": "tcp://x:1"}, WAIT_S,
                 keys)
    sock = peer(ctx, f"ipc://{tmp_path}/sch", keys, "scheduler")
    header, _ = ask(sock, "heartbeat", 1, meta={"role": "server", "token": meta["token"]})
    assert (header["op"], header["code"]) == ("error", protocol.E_DENIED)
    header, _ = ask(sock, "heartbeat", 2, meta={"role": "worker", "token": meta["token"]})
    assert header["op"] == "ok"                                    # its own role and token: fine


def test_a_client_with_another_clusters_keys_gives_up_with_a_clear_error(nodes, tmp_path, ctx):
    """Its handshake fails, ZeroMQ drops the connection for good, and a send would block
    forever: the client's sends time out instead, and its retries end in a ClusterError."""
    address, meta, _, server, _ = cluster(nodes, tmp_path, ctx)
    security.write_keys(tmp_path / "other")
    client = ShardClient([address], [tuple(meta["pieces"][0][1:])], "worker-0", timeout=0.5,
                         retries=2, ctx=ctx, keys=security.Keys.load(tmp_path / "other", "worker"),
                         token=meta["token"])
    began = time.monotonic()
    with pytest.raises(ClusterError, match="are these the cluster's keys"):
        client.pull(np.empty(meta["pieces"][0][2], np.float32))
    assert time.monotonic() - began < 10 and server.poll() is None
    client.close()


def test_a_send_on_a_connection_zeromq_dropped_for_good_times_out(nodes, tmp_path, ctx):
    """A reply over the client's frame limit is a protocol error: ZeroMQ drops the
    connection and does not reconnect, and a DEALER with no connection blocks on send.
    `send` gives up after SEND_TIMEOUT_MS instead (this hung a scheduler for an hour)."""
    address, meta, keys, _, _ = cluster(nodes, tmp_path, ctx)
    sock = make_socket(ctx, zmq.DEALER, address, keys=keys, peer="server", max_frame=1024)
    pull = protocol.encode({"op": "pull", "node": "worker-0", "seq": 1, "piece": 0,
                            "token": meta["token"]})
    assert send(sock, pull) is True
    assert not sock.poll(1000 * SILENCE_S)              # the reply was too large: dropped
    began = time.monotonic()
    assert False in [send(sock, pull) for _ in range(3)]
    assert time.monotonic() - began < 3 * (SEND_TIMEOUT_MS / 1000) + 2


def test_a_push_counts_under_its_tokens_rank_whatever_node_says(nodes, tmp_path, ctx):
    """Sync, 2 workers: worker-0's token pushes twice, once naming itself worker-1. Were
    the node field believed, the two pushes would complete the version; they are both
    worker-0's, so the second supersedes the first and the version waits for worker-1."""
    address, meta, keys, _, _ = cluster(nodes, tmp_path, ctx, mode="sync")
    other = register(ctx, f"ipc://{tmp_path}/sch", "test-worker", {"role": "worker"}, WAIT_S, keys)
    assert {meta["rank"], other["rank"]} == {0, 1}
    me, them = (meta, other) if meta["rank"] == 0 else (other, meta)
    _, before = weights(ctx, address, keys, me["token"])
    g = np.ones(len(before), np.float32)
    first, second, third = peer(ctx, address, keys), peer(ctx, address, keys), peer(ctx, address, keys)
    push = {"piece": 0, "clock": 0}
    assert ask(first, "push", 1, g, within=SILENCE_S, node="worker-1", token=me["token"], **push) \
        is None                                                    # held: the version waits
    assert ask(second, "push", 2, g, within=SILENCE_S, node="worker-0", token=me["token"],
               **push) is None                                     # held in the first one's place
    header, _ = protocol.decode(first.recv_multipart()) if first.poll(1000 * WAIT_S) else (None, None)
    assert header["code"] == protocol.E_STATE and "superseded" in header["msg"]
    for bad in (None, security.mint(b"x" * 32, "worker", 1, them["incarnation"])):
        fields = {"token": bad} if bad else {}
        header, _ = ask(third, "push", 5, g, node="worker-1", **push, **fields)
        assert header["code"] == protocol.E_DENIED
    header, params = ask(third, "push_pull", 6, g, node="worker-7", token=them["token"], **push)
    assert header["op"] == "ok" and header["clock"] == 1           # worker-0 and worker-1: complete
    assert np.allclose(params, before - 0.1 * g)


# -- bounded resources --------------------------------------------------------------------

def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_idle_peers_and_a_flood_of_100000_messages_do_not_grow_memory(nodes, tmp_path, ctx, capsys):
    """No keys, so every message reaches the code; the flooder never reads its replies."""
    address, meta, _, server, scheduler = cluster(nodes, tmp_path, ctx, keys=False)
    targets = {"server": (server, address), "scheduler": (scheduler, f"ipc://{tmp_path}/sch")}
    g = np.ones(len(weights(ctx, address, None, meta["token"])[1]), np.float32)
    report = []
    for name, (proc, where) in targets.items():
        idle = [peer(ctx, where) for _ in range(200)]               # connect, send nothing
        flooder = peer(ctx, where)
        flooder.sndtimeo = 10_000
        warm = [(protocol.encode({"op": "heartbeat", "node": f"w{i}", "seq": i, "meta": {}}))
                for i in range(1000)]
        for frames in warm:
            flooder.send_multipart(frames)
        time.sleep(1.0)
        before = rss_mib(proc.pid)
        for i in range(100_000):
            kind = i % 4
            if kind == 0:
                frames = [os.urandom(16)]
            elif kind == 1:
                frames = protocol.encode({"op": "pull", "node": f"worker-{i}", "seq": i, "piece": 0,
                                          "token": os.urandom(24)})
            elif kind == 2:
                frames = protocol.encode({"op": "heartbeat", "node": f"n{i}", "seq": i,
                                          "meta": {"role": "worker", "token": os.urandom(24)}})
            else:
                frames = protocol.encode({"op": "push", "node": f"worker-{i}", "seq": i, "piece": 0,
                                          "clock": 0}, g[:8])
            flooder.send_multipart(frames)
        answer = peer(ctx, where)                                  # it still answers, at once
        header, _ = ask(answer, "pull" if name == "server" else "heartbeat", 1, within=60, piece=0,
                        meta={"role": "worker"})
        assert header is not None and proc.poll() is None
        after = rss_mib(proc.pid)
        report.append(f"{name}: RSS {before:.1f} MiB before, {after:.1f} MiB after 200 idle peers "
                      f"and 100,000 messages (+{after - before:.1f})")
        assert after - before < 32, report[-1]
        for s in [*idle, flooder, answer]:
            s.close()
    with capsys.disabled():
        print("\n" + "\n".join(report))


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_local_cluster_with_keys_trains_to_the_end(tmp_path, downpour, mode):
    security.write_keys(tmp_path / "k")
    r = downpour("train", "--mode", mode, "--workers", 2, "--shards", 2, "--keys", tmp_path / "k",
                 "--synthetic", 2000, "--hidden", 16, "--epochs", 2, "--metrics", "m.jsonl")
    assert r.returncode == 0, r.stderr
    end = [line for line in (tmp_path / "m.jsonl").read_text().splitlines() if '"end"' in line]
    assert end and '"dead_workers": []' in end[-1]
    single = downpour("train", "--mode", "single", "--keys", tmp_path / "k")
    assert single.returncode == 2 and "keys is a setting of --mode async" in single.stderr
