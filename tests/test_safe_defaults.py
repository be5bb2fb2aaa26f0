"""Safe defaults, as a new user meets them (issue 17): every address is checked before a
socket exists, a failed bind is said at once, nodes without keys listen on loopback only,
and Ctrl-C of a local cluster is said once, its logs kept. Real processes, under timeouts:
before the fix each of the bad-address rows printed nothing and never exited."""

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from downpour.common.config import Config
from downpour.common.wire.address import host_addresses
from downpour.launch import CLI, LOGS_NAME, _keep_logs, child_env

BAD_ADDRESS_S = 2.0     # a bad address or a failed bind ends the command within this
HANG_S = 20             # a command that would hang fails (subprocess.TimeoutExpired) after this
GONE_S = 10.0           # every process of a run has exited this long after the launcher
POLL_S = 0.05           # how often a wait for a file or a process looks again
SMALL = ["--synthetic", "200", "--hidden", "8", "--batch-size", "50", "--progress", "lines"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group(pgid: int) -> list[int]:
    """The pids of the living (not zombie) processes in process group `pgid` (from /proc)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, _, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state != "Z":
            found.append(int(entry))
    return found


def wait_until(condition, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Poll `condition()` until true; fail if `proc` exits first or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate(timeout=HANG_S)
        assert time.monotonic() < deadline, f"not within {timeout:g} s"
        time.sleep(POLL_S)


@pytest.fixture
def started(tmp_path):
    """Start `downpour ARGS` in its own process group; whatever is left is killed at teardown."""
    procs = []

    def start(*args):
        p = subprocess.Popen([*CLI, *map(str, args)], cwd=tmp_path, env=child_env(),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(p)
        return p
    yield start
    for p in procs:
        for pid in group(p.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.communicate(timeout=HANG_S)


def refused(downpour, *args) -> str:
    """Run `downpour ARGS`: it must exit 2 within BAD_ADDRESS_S with one error line; that line."""
    start = time.monotonic()
    r = downpour(*args, timeout=HANG_S)
    took = time.monotonic() - start
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    assert took < BAD_ADDRESS_S, f"{took:.2f} s"
    line, = r.stderr.strip().splitlines()
    return line


def test_a_second_scheduler_on_a_taken_port_exits_2_at_once(downpour, started, tmp_path):
    """Before: the failed bind left its socket open and ctx.term() waited forever."""
    port = free_port()
    first = started("scheduler", "--mode", "async", "--bind", f"tcp://127.0.0.1:{port}", *SMALL,
                    "--endpoint-file", "first.endpoint")
    wait_until((tmp_path / "first.endpoint").exists, first)      # written once it listens
    line = refused(downpour, "scheduler", "--mode", "async", "--bind", f"tcp://127.0.0.1:{port}",
                   *SMALL)
    assert line == (f"downpour: error: cannot listen on tcp://127.0.0.1:{port}: another process "
                    "listens there: pick another port, or stop that process")
    first.send_signal(signal.SIGTERM)                           # the first one is unharmed
    _, err = first.communicate(timeout=HANG_S)
    assert first.returncode == 130 and err.strip().splitlines()[-1] == "downpour: interrupted"


@pytest.mark.parametrize("args, message", [
    (["scheduler", "--mode", "async", "--bind", "5555"],
     "--bind '5555' is not an address: expected tcp://HOST:PORT or ipc://PATH; for port 5555 of "
     "this host write --bind tcp://127.0.0.1:5555"),
    (["scheduler", "--mode", "async", "--bind", "tcp://localhost"],
     "--bind 'tcp://localhost' has no port: write --bind tcp://localhost:PORT, e.g. "
     "tcp://localhost:46999; port 0 picks a free one"),
    (["worker", "--scheduler", "127.0.0.1:46999", "--start-timeout-s", "5"],
     "--scheduler '127.0.0.1:46999' is not an address: expected tcp://HOST:PORT or ipc://PATH; "
     "write --scheduler tcp://127.0.0.1:46999"),
    (["server", "--scheduler", "localhost:46999"],
     "--scheduler 'localhost:46999' is not an address: expected tcp://HOST:PORT or ipc://PATH; "
     "write --scheduler tcp://localhost:46999"),
    (["server", "--scheduler", "tcp://127.0.0.1:46999", "--advertise", "tcp://b:6000"],
     "--advertise takes a host name or IP address alone, the one other hosts reach this node "
     "by, not 'tcp://b:6000': e.g. --advertise b"),
])
def test_a_bad_address_exits_2_at_once_with_the_corrected_form(downpour, args, message):
    """Before: each printed nothing and never exited (the worker ignored its 5 s)."""
    assert refused(downpour, *args) == f"downpour: error: {message}"


def test_a_server_tries_its_port_before_it_registers(downpour):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        line = refused(downpour, "server", "--scheduler", f"tcp://127.0.0.1:{free_port()}",
                       "--bind", f"tcp://127.0.0.1:{busy}", "--start-timeout-s", 30)
    assert line == (f"downpour: error: cannot listen on tcp://127.0.0.1:{busy}: another process "
                    "listens there: pick another port, or stop that process")


@pytest.mark.parametrize("role, bind", [("scheduler", "tcp://*:{port}"),
                                        ("server", "tcp://0.0.0.0:0"),
                                        ("server", "tcp://{ip}:{port}")])
def test_without_keys_a_public_bind_is_refused(downpour, role, bind):
    ip = next((a for a in host_addresses() if not a.startswith("127.")), "10.0.0.5")
    where = bind.format(port=free_port(), ip=ip)
    args = ["--mode", "async", *SMALL] if role == "scheduler" else \
        ["--scheduler", "tcp://127.0.0.1:46999"]
    line = refused(downpour, role, "--bind", where, *args)
    assert line.startswith(f"downpour: error: --bind {where} listens beyond this host without "
                           "keys: anyone who reaches the port could control the run. Make the "
                           "cluster's keys with `downpour keys DIR` and give every node --keys DIR")
    assert line.endswith("or, on a network you trust, add --insecure")


def test_insecure_starts_and_its_first_line_says_so(downpour, socket_dir):
    port = free_port()
    r = downpour("scheduler", "--mode", "async", "--bind", f"tcp://*:{port}", "--insecure",
                 *SMALL, "--start-timeout-s", 1, timeout=HANG_S)
    first, *_, last = r.stderr.strip().splitlines()
    assert re.match(rf"run [0-9a-f]+: --insecure: listening on tcp://127\.0\.0\.1:{port}, ", first)
    assert "without keys: anyone who reaches the port can control the run; " in first
    assert r.returncode == 2 and "did not assemble in 1 s" in last     # it ran: it waited
    r = downpour("server", "--scheduler", f"ipc://{socket_dir}/nowhere", "--bind", "tcp://*:0",
                 "--insecure", "--start-timeout-s", 1, timeout=HANG_S)
    first, *_, last = r.stderr.strip().splitlines()
    assert re.fullmatch(r"server: --insecure: listening on tcp://127\.0\.0\.1:\d+(, tcp://\S+)* "
                        r"without keys: anyone who reaches the port can control the run", first)
    assert r.returncode == 2 and "no answer from the scheduler" in last


def test_without_keys_the_default_binds_are_loopback(started, socket_dir):
    """The scheduler's first line names where it listens; a server on its default bind is
    registered at a port of 127.0.0.1 (before: every interface, for both)."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 5555)) == 0:
            pytest.skip("something on this host listens on 5555, the scheduler's default port")
    scheduler = started("scheduler", "--mode", "async", "--workers", 1, *SMALL, "--epochs", 1,
                        "--eval-every", 0)
    nodes = [started("server", "--scheduler", "tcp://127.0.0.1:5555"),
             started("worker", "--scheduler", "tcp://127.0.0.1:5555")]
    _, err = scheduler.communicate(timeout=120)
    assert scheduler.returncode == 0, err
    lines = err.strip().splitlines()
    assert re.match(r"run [0-9a-f]+: listening on tcp://127\.0\.0\.1:5555; synthetic data", lines[0])
    assert any(re.fullmatch(r"cluster assembled: server-0 at tcp://127\.0\.0\.1:\d+", line)
               for line in lines), lines
    for node in nodes:
        node.communicate(timeout=HANG_S)
        assert node.returncode == 0


@pytest.mark.parametrize("who", ["group", "launcher"])
def test_ctrl_c_of_a_cluster_run_is_said_once_and_keeps_the_logs(started, tmp_path, who):
    """SIGINT to the whole process group, as a terminal's Ctrl-C, or to the launcher alone.
    Before: `the scheduler failed (exit 130)` and every node's log, or two lines; the logs
    went with the temporary folder."""
    metrics = tmp_path / "runs" / "m.jsonl"
    run = started("train", "--mode", "async", "--workers", 2, "--synthetic", 6000, "--hidden", 64,
                  "--epochs", 200, "--eval-every", 0.5, "--progress", "none",
                  "--metrics", "runs/m.jsonl")
    wait_until(lambda: metrics.exists() and '"event": "eval"' in metrics.read_text(), run)
    assert len(group(run.pid)) == 5                # the launcher, scheduler, server, 2 workers
    (os.killpg if who == "group" else os.kill)(run.pid, signal.SIGINT)
    _, err = run.communicate(timeout=HANG_S + 10)
    assert run.returncode == 130
    assert err.count("interrupted") == 1 and "failed" not in err and "Traceback" not in err, err
    *_, said, kept = err.strip().splitlines()
    assert said == "downpour: interrupted"
    assert kept == f"downpour: the nodes' logs are kept in {Path('runs', 'm-logs')}"
    logs = sorted(p.name for p in (tmp_path / "runs" / "m-logs").iterdir())
    assert logs == ["server-process-0.log", "worker-process-0.log", "worker-process-1.log"]
    deadline = time.monotonic() + GONE_S
    while group(run.pid):
        assert time.monotonic() < deadline, group(run.pid)
        time.sleep(POLL_S)


def test_kept_logs_go_next_to_the_metrics_or_under_the_current_folder(tmp_path, monkeypatch):
    def run_dir(name):
        d = tmp_path / name
        d.mkdir()
        (d / "worker-process-0.log").write_text("said\n")
        (d / "scheduler.endpoint").write_text("ipc://x")          # not a log: stays
        return d

    cfg = Config(mode="async", metrics=str(tmp_path / "runs" / "m.jsonl"))
    (tmp_path / "runs").mkdir()
    assert _keep_logs(cfg, run_dir("a")) == tmp_path / "runs" / "m-logs"
    assert _keep_logs(cfg, run_dir("b")) == tmp_path / "runs" / "m-logs-2"    # never overwritten
    assert (tmp_path / "runs" / "m-logs-2" / "worker-process-0.log").read_text() == "said\n"
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["scheduler.endpoint"]
    monkeypatch.chdir(tmp_path)
    kept = _keep_logs(Config(mode="async"), run_dir("c"))
    assert kept.parent == Path(".") and re.fullmatch(
        LOGS_NAME.replace("%Y%m%d", r"\d{8}").replace("%H%M%S", r"\d{6}"), kept.name)
    assert _keep_logs(cfg, tmp_path / "runs") is None                     # no logs, no folder


def test_help_names_insecure(downpour):
    for role in ("scheduler", "server"):
        r = downpour(role, "--help")
        assert r.returncode == 0 and "--insecure" in r.stdout
