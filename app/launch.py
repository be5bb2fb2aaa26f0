"""`downpour train --mode async|sync|ssp`: a whole cluster as processes on this machine.

Starts the scheduler, S servers and W workers, each a `downpour <role>` process
(the very commands the docker-compose services run), talking over ipc sockets in
a temporary directory, or loopback tcp. The scheduler's output (progress bar,
evaluation lines, summary) comes to this terminal; servers and workers write to
log files, whose last lines are shown if the run fails. After a failure or Ctrl-C
the logs are kept (next to --metrics, else in a folder under the current one) and
the folder is named; after a success they go with the temporary directory.

Every process started here is ended before `launch` returns, on success, failure
or Ctrl-C: SIGTERM first (servers checkpoint on it), SIGKILL after a grace
period. Each child also asks the kernel (PR_SET_PDEATHSIG) to be sent SIGTERM if
the launcher dies without cleaning up.

Ctrl-C at a terminal sends SIGINT to the whole process group: the scheduler (which
says `downpour: interrupted` and exits 130) and the launcher each get it, in either
order. Both are one interrupt, said once: the launcher says it only when the
scheduler did not, and a second SIGINT does not cut its cleanup short.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

from downpour import netem
from downpour.common import config
from downpour.common.config import Config
from downpour.common.errors import ClusterError

GRACE_S = 10.0                 # how long children get to exit after the run ends
FAILED_GRACE_S = 2.0           # ... after the scheduler failed
INTERRUPT_GRACE_S = 3.0        # ... after Ctrl-C
SIGNAL_WAIT_S = 3.0            # how long children get to exit after each SIGTERM, SIGKILL
FILE_POLL_S = 0.02             # how often to look for the scheduler's endpoint file
TAIL_LINES = 15                # lines of each failed process's log shown
EXIT_INTERRUPTED = 130         # exit status after Ctrl-C: 128 + SIGINT, as a shell reports it
INTERRUPTED = (EXIT_INTERRUPTED, -signal.SIGINT)   # the scheduler's exit status after Ctrl-C
TCP_BIND = "tcp://127.0.0.1:0"  # --transport tcp: loopback, a free port
SCHEDULER_PORT = 5555          # --link: the scheduler's port on its own emulated address
NODE_SETTINGS = ("scheduler", "bind", "advertise", "insecure", "checkpoint_dir", "resume",
                 "endpoint_file", "keys", "transport")   # the scheduler keeps the links' rates
LOGS_SUFFIX = "-logs"          # the nodes' logs kept next to --metrics: runs/m.jsonl -> runs/m-logs
LOGS_NAME = "downpour-logs-%Y%m%d-%H%M%S"   # ... else this folder, under the current one


_TERM_WITH_PARENT = partial(netem.die_with_parent, signal.SIGTERM)  # children: SIGTERM, then checkpoint


CLI = [sys.executable, "-m", "downpour.cli"]
"""The downpour command line of this interpreter and checkout, for child processes."""


def child_env() -> dict[str, str]:
    """This environment for a child downpour process: no DOWNPOUR_* settings (the child
    gets its settings as flags), and this checkout first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(config.ENV_PREFIX)}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


class Cluster:
    """The processes of one local run; a context manager that always ends them."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = child_env()

    def start(self, name: str, args: list[str], log: bool = True,
              node: netem.Node | None = None) -> subprocess.Popen:
        """Start `downpour ARGS` as `name` (in `node`'s network namespace, if given)."""
        out = open(self._log(name), "wb") if log else None
        argv = [*CLI, *args] if node is None else netem.Network.command(node, [*CLI, *args])
        try:
            proc = subprocess.Popen(argv, env=self.env,
                                    stdout=out, stderr=subprocess.STDOUT if log else None,
                                    stdin=subprocess.DEVNULL, preexec_fn=_TERM_WITH_PARENT)
        finally:
            if out:
                out.close()
        self.procs[name] = proc
        return proc

    def stop(self, grace: float = GRACE_S) -> None:
        """Wait up to `grace` s for every process to exit, then SIGTERM, then SIGKILL."""
        deadline = time.monotonic() + grace
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            for p in self.procs.values():
                if p.poll() is None and sig is not None:
                    p.send_signal(sig)
            for p in self.procs.values():
                try:
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            deadline = time.monotonic() + SIGNAL_WAIT_S
            if all(p.poll() is not None for p in self.procs.values()):
                return

    def _log(self, name: str) -> Path:
        return self.run_dir / (name.replace(" ", "-") + ".log")

    def tails(self, lines: int = TAIL_LINES) -> str:
        parts = []
        for name, p in self.procs.items():
            log = self._log(name)
            if log.exists() and (p.returncode not in (0, None) or name.startswith("server")):
                text = log.read_text(errors="replace").strip().splitlines()[-lines:]
                if text:
                    parts.append(f"--- {name} (exit {p.returncode}) ---\n" + "\n".join(text))
        return "\n".join(parts)


def launch(cfg: Config) -> int:
    """Run `cfg` as a local cluster; the scheduler's exit status, or EXIT_INTERRUPTED after
    Ctrl-C. Every process is ended, and after a failure or an interrupt the nodes' logs
    are kept and named (`_keep_logs`), before it returns or raises."""
    if cfg.link and not netem.inside():              # again, inside a private namespace
        return netem.run_inside([*CLI, "train", *config.to_args(cfg)], child_env())
    run_dir = Path(tempfile.mkdtemp(prefix="downpour-"))
    cluster = Cluster(run_dir)
    interrupt = _FirstInterrupt()
    status: int | None = None                        # None: the run raised
    network = None
    try:
        network = netem.Network() if cfg.link else None
        status = _run(cfg, cluster, network)
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    finally:
        interrupt.disarm()                           # from here a SIGINT does nothing
        try:
            _finish(cfg, cluster, status)
        finally:
            interrupt.restore()
            if network is not None:
                network.close()
    return EXIT_INTERRUPTED if status in INTERRUPTED else status


def _run(cfg: Config, cluster: Cluster, network: netem.Network | None) -> int:
    """Start the scheduler, then the servers and workers; the scheduler's exit status.
    With `network` every node gets a namespace, address and link of its own on it."""
    run_dir = cluster.run_dir
    keys = ["--keys", cfg.keys] if cfg.keys else []           # every role, itself included
    common = ["--threads", str(cfg.threads), "--start-timeout-s", str(cfg.start_timeout_s), *keys]
    endpoint_file = run_dir / "scheduler.endpoint"
    server_rate = config.parse_rate(cfg.server_link or cfg.link, "server_link") if network else 0

    def place(name: str, ipc_file: str, port: int, rate: int = server_rate
              ) -> tuple[netem.Node | None, str]:
        """(the node's place on the emulated network or None, where it listens)."""
        if network is not None:
            node = network.add(name, rate)
            return node, f"tcp://{node.address}:{port}"
        return None, f"ipc://{run_dir}/{ipc_file}" if cfg.transport == "ipc" else TCP_BIND

    node, bind = place("scheduler", "scheduler", SCHEDULER_PORT)
    run_settings = replace(cfg, **{k: config.FIELDS[k].default for k in NODE_SETTINGS})
    scheduler = cluster.start("scheduler", ["scheduler", *config.to_args(run_settings), *keys,
                                            "--bind", bind, "--endpoint-file", str(endpoint_file)],
                              log=False, node=node)
    endpoint = _wait_for_file(endpoint_file, scheduler, cfg.start_timeout_s)
    # Ranks go by registration order, not launch order: process i need not be server-i,
    # so neither its socket nor its log is named by a number that could pass for a rank.
    for i in range(cfg.shards):
        node, server_bind = place(f"server process {i}", f"server-{secrets.token_hex(3)}", 0)
        extra = ["--checkpoint-dir", cfg.checkpoint_dir] if cfg.checkpoint_dir else []
        extra += ["--resume"] if cfg.resume else []
        cluster.start(f"server process {i}", ["server", "--scheduler", endpoint,
                                              "--bind", server_bind, *common, *extra], node=node)
    worker_rate = config.parse_rate(cfg.link, "link") if network else 0
    for i in range(cfg.workers):
        node = network.add(f"worker process {i}", worker_rate) if network else None
        cluster.start(f"worker process {i}", ["worker", "--scheduler", endpoint, *common],
                      node=node)
    return scheduler.wait()


def _finish(cfg: Config, cluster: Cluster, status: int | None) -> None:
    """End every process; say what went wrong (once), keep the logs after a failure or an
    interrupt and say where; remove the temporary directory."""
    interrupted = status in INTERRUPTED
    cluster.stop(grace=GRACE_S if status == 0 else INTERRUPT_GRACE_S if interrupted
                 else FAILED_GRACE_S)
    scheduler = cluster.procs.get("scheduler")
    if interrupted:
        if scheduler is None or scheduler.returncode != EXIT_INTERRUPTED:
            print("downpour: interrupted", file=sys.stderr)  # the scheduler did not say it
    elif status not in (0, None):
        tails = cluster.tails()
        print(f"downpour: the scheduler failed (exit {status})" +
              (f"; the other processes said:\n{tails}" if tails else ""), file=sys.stderr)
    kept = _keep_logs(cfg, cluster.run_dir) if status != 0 else None
    if kept is not None:
        print(f"downpour: the nodes' logs are kept in {kept}", file=sys.stderr)
    if kept != cluster.run_dir:
        shutil.rmtree(cluster.run_dir, ignore_errors=True)


def _keep_logs(cfg: Config, run_dir: Path) -> Path | None:
    """Move the nodes' logs out of `run_dir` into a new folder: next to --metrics
    (runs/m.jsonl -> runs/m-logs), else LOGS_NAME under the current folder (a number
    added if it exists). The folder; `run_dir` itself if they could not be moved (it is
    then kept); None if there are no logs."""
    logs = sorted(run_dir.glob("*.log"))
    if not logs:
        return None
    if cfg.metrics:
        metrics = Path(cfg.metrics)
        base = metrics.parent / (metrics.stem + LOGS_SUFFIX)
    else:
        base = Path(time.strftime(LOGS_NAME))
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    try:
        folder.mkdir(parents=True)
        for log in logs:
            shutil.move(str(log), str(folder / log.name))
    except OSError:
        return run_dir
    return folder


class _FirstInterrupt:
    """The launcher's SIGINT handler while a run is on: the first SIGINT raises
    KeyboardInterrupt; once disarmed (the run is over, or being stopped), a SIGINT does
    nothing, so the same Ctrl-C reaching it late, or a second one, never cuts the cleanup
    short or makes a second line. A SIGINT ignored when it starts stays ignored."""

    def __init__(self):
        self.armed = True
        self._previous = signal.getsignal(signal.SIGINT) or signal.default_int_handler
        if self._previous is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, self)

    def __call__(self, signum, frame) -> None:
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt

    def disarm(self) -> None:
        self.armed = False

    def restore(self) -> None:
        """Put back the handler there was before."""
        if self._previous is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, self._previous)


def _wait_for_file(path: Path, proc: subprocess.Popen, timeout: float) -> str:
    """The contents of `path` once `proc` has written it; ClusterError if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text()
        if proc.poll() is not None:
            raise ClusterError(f"the scheduler exited (status {proc.returncode}) before it was ready")
        time.sleep(FILE_POLL_S)
    raise ClusterError(f"the scheduler did not start listening within {timeout:g} s")
