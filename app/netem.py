"""Emulated links: every node of a local run behind its own bandwidth-limited NIC, no root.

    downpour train --link RATE [--server-link RATE] ...
      the launcher runs itself again under `unshare --user --map-root-user --net --mount
      --fork --kill-child`: a private user, network and mount namespace that only this
      run's processes share and that vanishes with them (when the launcher is SIGKILLed
      too: --kill-child), so nothing on the host changes: no bridge, no iptables rule.

      inside it, on EMULATED_NET (RFC 2544's benchmarking range, private to the run):

        bridge dp-br  .1
          veth dp-h<i> <-> dp-n<i>   node i's NIC, in a network namespace of its own
                                     (held by a `sleep` process), address .<i + 2>
          tbf RATE on dp-n<i>        egress of the node: its upload
          tbf RATE on dp-h<i>        egress of the bridge port towards it: its download

Each node runs as `nsenter --target HOLDER --net downpour ROLE ...` and listens over tcp
on its own address; a node finds its network private by looking (common/wire/address.py,
`in_private_network`), so protected mode lets it listen there without keys. Bandwidth
is emulated, latency is not (this kernel has no netem).

Python 3.11 has no os.setns: the namespaces are entered with util-linux's `unshare` and
`nsenter`, the links made with iproute2's `ip` and `tc`.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import time
from typing import NamedTuple

from downpour.common.errors import ClusterError, ConfigError
from downpour.common.wire.address import EMULATED_NET

INSIDE_VAR = "NETEM_DOWNPOUR_RUN"       # set in the re-run launcher: it is inside the namespace
UNSHARE = ["unshare", "--user", "--map-root-user", "--net", "--mount", "--propagation", "private",
           "--fork", "--kill-child"]
TOOLS = ("unshare", "nsenter", "ip", "tc", "sleep")
PROBE_TIMEOUT_S = 10.0                  # for `unshare ... true`, the check that namespaces work
COMMAND_TIMEOUT_S = 10.0                # for each ip / tc command
HOLDER_WAIT_S = 5.0                     # for a holder to be in its own network namespace
HOLDER_POLL_S = 0.005
BRIDGE = "dp-br"
TBF_LATENCY = "50ms"                    # tbf's queue: packets waiting longer are dropped
TBF_BURST_S = 0.004                     # the bucket holds this many seconds of the rate ...
TBF_BURST_MIN_BYTES = 16 * 1024         # ... and at least this (tbf needs >= rate / HZ)
PR_SET_PDEATHSIG = 1


class Node(NamedTuple):
    """A node's place on the emulated network."""

    name: str
    address: str        # its IPv4 address on EMULATED_NET
    holder: int         # pid of the process holding its network namespace


def problem() -> str:
    """Why emulated links cannot run on this machine, in words with what to do; "" if they can."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return (f"--link needs {', '.join(missing)} (util-linux and iproute2): install them, "
                "e.g. apt-get install util-linux iproute2")
    try:
        probe = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True,
                               timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"`unshare --user --net` did not return in {PROBE_TIMEOUT_S:g} s"
    if probe.returncode != 0:
        return ("this kernel lets this user make no user and network namespace "
                f"({probe.stderr.strip() or probe.returncode}); run as root, or allow them "
                "(sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0), "
                "or run without --link")
    return ""


def inside() -> bool:
    """Whether this process is the launcher re-run inside the run's namespace."""
    return os.environ.get(INSIDE_VAR) == "1"


def run_inside(argv: list[str], env: dict[str, str]) -> int:
    """Run `argv` (the launcher's own command) inside a new private namespace; its status.
    ConfigError before anything starts if this machine cannot."""
    why = problem()
    if why:
        raise ConfigError(why)
    proc = subprocess.Popen([*UNSHARE, *argv], env={**env, INSIDE_VAR: "1"}, stdin=subprocess.DEVNULL,
                            preexec_fn=die_with_parent)     # SIGKILLed launcher: all goes
    try:
        return proc.wait()
    except KeyboardInterrupt:              # the same Ctrl-C reached the run: let it end itself
        return proc.wait()


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a child, before exec: have the kernel send it `sig` when its parent dies
    (PR_SET_PDEATHSIG, Linux; elsewhere nothing)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except OSError:
        pass


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise ClusterError(f"emulated network: `{' '.join(argv)}` failed: {done.stderr.strip()}")


class Network:
    """The run's emulated network, built inside its private namespace (see the module
    docstring); a context manager whose exit ends the namespace holders."""

    def __init__(self):
        if not inside():
            raise RuntimeError("Network() is built inside the run's namespace (run_inside)")
        self.nodes: dict[str, Node] = {}
        self._holders: list[subprocess.Popen] = []
        self._hosts = EMULATED_NET.hosts()
        self.gateway = str(next(self._hosts))
        _run("ip", "link", "set", "lo", "up")
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/{EMULATED_NET.prefixlen}", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")

    def add(self, name: str, rate_bits: int) -> Node:
        """A node `name` behind a link of `rate_bits` bits/s each way: its namespace, address
        and shaped veth."""
        i = len(self.nodes)
        address = str(next(self._hosts))
        holder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"], stdin=subprocess.DEVNULL,
                                  preexec_fn=die_with_parent)
        self._holders.append(holder)
        _own_namespace(holder.pid)
        host_end, node_end = f"dp-h{i}", f"dp-n{i}"
        _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end)
        _run("ip", "link", "set", node_end, "netns", str(holder.pid))
        _run("ip", "link", "set", host_end, "master", BRIDGE, "up")
        _shape(host_end, rate_bits)
        enter = ["nsenter", "--target", str(holder.pid), "--net"]
        _run(*enter, "ip", "link", "set", "lo", "up")
        _run(*enter, "ip", "addr", "add", f"{address}/{EMULATED_NET.prefixlen}", "dev", node_end)
        _run(*enter, "ip", "link", "set", node_end, "up")
        _shape(node_end, rate_bits, enter)
        node = Node(name, address, holder.pid)
        self.nodes[name] = node
        return node

    @staticmethod
    def command(node: Node, argv: list[str]) -> list[str]:
        """`argv` run in `node`'s network namespace."""
        return ["nsenter", "--target", str(node.holder), "--net", "--", *argv]

    def close(self) -> None:
        """End the holders (their namespaces, veths and shaping go with them); safe twice."""
        for holder in self._holders:
            if holder.poll() is None:
                holder.kill()
            holder.wait(timeout=COMMAND_TIMEOUT_S)
        self._holders.clear()

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _own_namespace(pid: int) -> None:
    """Wait until process `pid` is in a network namespace other than this one."""
    mine = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + HOLDER_WAIT_S
    while time.monotonic() < deadline:
        try:
            if os.readlink(f"/proc/{pid}/ns/net") != mine:
                return
        except OSError:
            raise ClusterError(f"emulated network: the namespace holder {pid} exited") from None
        time.sleep(HOLDER_POLL_S)
    raise ClusterError(f"emulated network: process {pid} had no network namespace of its own "
                       f"after {HOLDER_WAIT_S:g} s")


def burst_bytes(rate_bits: float) -> int:
    """The bucket of a tbf at `rate_bits` bits/s: what an idle link passes at once."""
    return max(TBF_BURST_MIN_BYTES, int(rate_bits / 8 * TBF_BURST_S))


def _shape(device: str, rate_bits: int, prefix: list[str] | None = None) -> None:
    """tbf at `rate_bits` bits/s on `device`'s egress."""
    burst = burst_bytes(rate_bits)
    _run(*(prefix or []), "tc", "qdisc", "add", "dev", device, "root", "tbf", "rate",
         f"{rate_bits}bit", "burst", str(burst), "latency", TBF_LATENCY)
