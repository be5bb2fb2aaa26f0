"""Emulated links (downpour/netem.py): a private namespace per run, tbf at the rate asked,
nothing left behind however the run ends. Skips where this machine cannot make user and
network namespaces (netem.problem says why)."""

import json
import os
import secrets
import shutil
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


def procs_of(tag, role):
    """The pids of the `downpour ROLE` processes carrying `tag` (the nodes themselves, not
    the nsenter that started them nor the holders)."""
    found = []
    for pid in tagged(tag):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"downpour.cli" in argv and role.encode() in argv and b"nsenter" not in argv[0]:
            found.append(pid)
    return found


@pytest.mark.slow
def test_a_worker_killed_behind_a_link_has_its_chunks_dealt_again(tmp_path):
    """SIGKILL of a worker 30% into an async run behind links: the run goes on, and the
    living worker trains the dead one's chunks, as on ipc (test_cluster.py)."""
    tag, metrics = secrets.token_hex(4), tmp_path / "m.jsonl"
    run = run_tagged(["train", "--mode", "async", "--workers", 2, "--synthetic", 6000,
                      "--hidden", 64, "--epochs", 12, "--batch-size", 20, "--eval-every", 0.25,
                      "--dead-after-s", 3.0, "--link", "1gbit", "--progress", "lines",
                      "--metrics", metrics], tag, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(
            json.loads(line).get("epoch", 0) >= 0.3 * 12
            for line in (metrics.read_text().splitlines() if metrics.exists() else [])):
        assert run.poll() is None, run.communicate()
        time.sleep(0.1)
    workers = procs_of(tag, "worker")
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    end = json.loads(metrics.read_text().splitlines()[-1])
    assert len(end["dead_workers"]) == 1 and "stopped answering" in err
    assert end["samples_asked"] == 12 * 300 * 20
    assert end["samples"] >= 0.95 * end["samples_asked"]
    assert end["chunks_lost"] <= 1 and end["test_accuracy"] > 0.5
    assert end["busiest_link"] and 0 < end["link_utilization"] < 1.05
    assert all_gone(tag) == []


NOBODY = 65534
RUNTIME = ("numpy", "numpy.libs", "zmq", "pyzmq.libs", "msgpack")   # what downpour imports
SOURCES = {"app": "downpour", "common": "downpour/common", "ps": "downpour/ps",
           "worker": "downpour/worker"}                            # pyproject's package-dir


def python_for_nobody(folder):
    """(a Python that user `nobody` can run, with this checkout and its runtime copied into
    `folder`/site, a world-readable copy); skips where this Python's minor version has no
    interpreter that nobody can reach."""
    import sys
    import sysconfig
    site = folder / "site"
    repo, packages = Path(__file__).resolve().parents[1], Path(sysconfig.get_paths()["purelib"])
    for source, target in SOURCES.items():
        shutil.copytree(repo / source, site / target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in RUNTIME:
        if (packages / name).exists():
            shutil.copytree(packages / name, site / name, ignore=shutil.ignore_patterns("__pycache__"))
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644 | (path.stat().st_mode & 0o111))
    for python in (f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}", sys.executable):
        probe = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                                *netem.UNSHARE, python, "-c", "import downpour.cli, numpy, zmq, msgpack"],
                               env={"PYTHONPATH": str(site), "PATH": os.environ["PATH"]},
                               capture_output=True, timeout=60, cwd=folder)
        if probe.returncode == 0:
            return python, site
    pytest.skip(f"no Python {sys.version_info[0]}.{sys.version_info[1]} that user nobody can run")


@pytest.mark.slow
def test_a_run_behind_links_works_for_a_user_without_root(tmp_path):
    """As user nobody (no capability, no sudo): the run makes its own user, network and
    mount namespace, trains to the end and leaves nothing."""
    import tempfile
    if os.getuid() != 0:
        pytest.skip("this test switches to user nobody, which needs root; run as any other "
                    "user, every test here is already unprivileged")
    if shutil.which("setpriv") is None:
        pytest.skip("switching to user nobody needs setpriv (util-linux)")
    folder = Path(tempfile.mkdtemp(prefix="downpour-nobody-"))   # not under pytest's 0700 tmp
    try:
        python, site = python_for_nobody(folder)
        tag, home = secrets.token_hex(4), folder / "home"
        home.mkdir()
        os.chown(home, NOBODY, NOBODY)
        run = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python, "-m",
             "downpour.cli", "train", "--mode", "async", "--workers", "2", "--epochs", "1",
             "--link", RATE, "--metrics", "m.jsonl", "--progress", "lines"],
            env={"PYTHONPATH": str(site), "PATH": os.environ["PATH"], "HOME": str(home),
                 "NETEM_TEST_TAG": tag}, cwd=home, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stderr
        assert (home / "m.jsonl").stat().st_uid == NOBODY
        end = json.loads((home / "m.jsonl").read_text().splitlines()[-1])
        assert end["event"] == "end" and end["samples"] == end["samples_asked"]
        assert all_gone(tag) == []
    finally:
        shutil.rmtree(folder, ignore_errors=True)
