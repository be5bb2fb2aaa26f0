"""Emulated links (downpour/netem.py): a private namespace per run, tbf at the rate asked,
nothing left behind however the run ends. Skips where this machine cannot make user and
network namespaces (netem.problem says why)."""

import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from downpour import netem
from downpour.launch import CLI, child_env

pytestmark = pytest.mark.skipif(bool(netem.problem()), reason=netem.problem() or "ok")

GONE_S = 10.0            # how long the run's processes get to vanish after it ends
RATE = "100mbit"
RATE_BITS = 100_000_000
TRANSFER_S = 2.5         # seconds of bulk transfer through the link ...
WARMUP_S = 0.5           # ... the first of which are not counted (TCP's slow start)

MEASURE = """
import json, socket, subprocess, sys, time
from downpour import netem
sender = '''
import socket, sys, time
s = socket.create_connection((sys.argv[1], 46001), timeout=10)
chunk, end = bytes(1 << 16), time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    s.sendall(chunk)
s.close()
'''
receiver = '''
import socket, sys, time
srv = socket.socket(); srv.bind((sys.argv[1], 46001)); srv.listen(1); srv.settimeout(10)
print("ready", flush=True)
conn, _ = srv.accept(); conn.settimeout(10)
start, total, first, last = time.monotonic(), 0, None, None
while data := conn.recv(1 << 20):
    now = time.monotonic()
    if now - start >= float(sys.argv[2]):      # past TCP's slow start: the link's own rate
        first = first or now; last = now; total += len(data)
print(8 * total / (last - first), flush=True)
'''
with netem.Network() as net:
    a, b = net.add("a", int(sys.argv[1])), net.add("b", int(sys.argv[1]))
    rx = subprocess.Popen(net.command(b, [sys.executable, "-c", receiver, b.address, sys.argv[3]]),
                          stdout=subprocess.PIPE, text=True)
    assert rx.stdout.readline().strip() == "ready"
    subprocess.run(net.command(a, [sys.executable, "-c", sender, b.address, sys.argv[2]]),
                   check=True, timeout=30)
    print(json.dumps({"bits_per_s": float(rx.stdout.readline()), "a": a.address, "b": b.address}))
    rx.wait(timeout=10)
"""


def run_tagged(args, tag, **kwargs):
    """`downpour ARGS` as a process group of its own, every process of it carrying `tag`."""
    env = {**child_env(), "NETEM_TEST_TAG": tag}
    return subprocess.Popen([*CLI, *map(str, args)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def tagged(tag):
    """The pids of live processes whose environment carries `tag`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"NETEM_TEST_TAG={tag}".encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def all_gone(tag):
    deadline = time.monotonic() + GONE_S
    while (left := tagged(tag)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_a_link_delivers_its_rate(tmp_path):
    out = subprocess.run(
        [*CLI[:1], "-c", f"from downpour import netem; import sys; sys.exit(netem.run_inside("
         f"[sys.executable, '-c', {MEASURE!r}, '{RATE_BITS}', '{TRANSFER_S}', '{WARMUP_S}'], "
         f"dict(__import__('os')"
         f".environ)))"], env=child_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(measured["bits_per_s"] / RATE_BITS - 1) <= 0.10, measured
    assert measured["a"].startswith("198.18.0.") and measured["b"].startswith("198.18.0.")


@pytest.mark.slow
def test_a_run_behind_links_trains_and_leaves_nothing(tmp_path):
    tag = secrets.token_hex(4)
    run = run_tagged(["train", "--mode", "async", "--workers", 2, "--epochs", 1, "--link", RATE,
                      "--metrics", tmp_path / "m.jsonl", "--progress", "lines"], tag, cwd=tmp_path)
    out, err = run.communicate(timeout=240)
    assert run.returncode == 0, err
    assert "listening on tcp://198.18.0." in err and "no keys" in err      # protected mode allows it
    end = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["samples"] == end["samples_asked"]
    assert all_gone(tag) == []


@pytest.mark.slow
@pytest.mark.parametrize("how", ["interrupt", "kill"])
def test_an_interrupted_or_killed_launcher_leaves_nothing(tmp_path, how):
    """Ctrl-C (SIGINT to the group) ends the run as on ipc; SIGKILL of the launcher alone
    takes the namespace and every process in it along (--kill-child, PDEATHSIG)."""
    tag = secrets.token_hex(4)
    run = run_tagged(["train", "--mode", "async", "--workers", 2, "--epochs", 50, "--link", RATE,
                      "--metrics", tmp_path / "m.jsonl", "--progress", "none"], tag, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and '"eval"' not in ((tmp_path / "m.jsonl").read_text()
                                                           if (tmp_path / "m.jsonl").exists() else ""):
        assert run.poll() is None, run.communicate()
        time.sleep(0.1)
    assert len(tagged(tag)) >= 6          # launcher, unshare, the run's launcher, 4 nodes, holders
    if how == "interrupt":
        os.killpg(run.pid, signal.SIGINT)
        _, err = run.communicate(timeout=60)
        assert run.returncode == 130 and err.count("downpour: interrupted") == 1, err
    else:
        run.kill()
        run.wait(timeout=30)
    assert all_gone(tag) == []


def test_transport_ipc_with_a_link_is_refused(downpour):
    r = downpour("train", "--mode", "async", "--link", RATE, "--transport", "ipc")
    assert r.returncode == 2 and "--transport ipc would bypass the links" in r.stderr


@pytest.mark.parametrize("rate", ["fast", "100", "-1mbit", "0gbit", "1 parsec"])
def test_a_bad_rate_is_refused(downpour, rate):
    r = downpour("train", "--mode", "async", f"--link={rate}")
    assert r.returncode == 2 and "expected a rate as tc writes it" in r.stderr, r.stderr


def test_links_are_for_cluster_modes(downpour):
    r = downpour("train", "--mode", "single", "--link", RATE)
    assert r.returncode == 2 and "link is a setting of --mode" in r.stderr, r.stderr


def test_rates_in_tc_syntax():
    from downpour.common.config import parse_rate
    assert parse_rate("100mbit", "link") == 100_000_000
    assert parse_rate("1gbit", "link") == 10**9 and parse_rate("10Gbit", "link") == 10**10
    assert parse_rate("500kbit", "link") == 500_000 and parse_rate("1mbps", "link") == 8_000_000


def test_this_host_is_not_a_private_network():
    from downpour.common.wire.address import in_private_network
    assert in_private_network() is False
