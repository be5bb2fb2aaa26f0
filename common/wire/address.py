"""Socket addresses, read and checked before any socket exists.

    tcp://HOST:PORT   HOST  an IPv4 address, an IPv6 one in brackets ([::1]), or a host
                            name (never resolved here: a name is looked up when the socket
                            connects, and common/wire/node.py notices one that stops resolving);
                            a bind may also give * (every interface)
                      PORT  1-65535; a bind may also give 0 or * (a free port)
    ipc://PATH        a unix socket file (@NAME: Linux's abstract namespace), at most
                      IPC_PATH_MAX bytes

`parse` turns a flag's text into an `Address`, or into a ConfigError that says what was
wrong and shows the corrected form; `str(address)` is the endpoint ZeroMQ takes. This
module never imports zmq: the command line checks every address flag with it before a
context exists, and the words for a failed bind (`bind_failure`) serve ZeroMQ's errors
and plain sockets' alike.

Protected mode (`check_exposure`), as Redis has it: without keys a node listens only
where nobody else can reach it: ipc, loopback tcp, or inside a run's own private
network namespace. Anywhere else needs the cluster's keys, or --insecure, said aloud.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
import struct
from typing import NamedTuple

from downpour.common.errors import ConfigError

SCHEMES = ("tcp", "ipc")
PORT_MAX = 65535                # the highest tcp port
PRIVILEGED_PORT_MAX = 1023      # ports up to this one need root (or CAP_NET_BIND_SERVICE)
IPC_PATH_MAX = 107              # bytes of a unix socket's path: sun_path holds 108 with its NUL
HOST_NAME_MAX = 253             # characters of a DNS name
WILDCARDS = ("*", "0.0.0.0", "::")    # hosts that mean every interface
EMULATED_NET = ipaddress.ip_network("198.18.0.0/24")   # a run's emulated links (RFC 2544's range)
ROUTES = "/proc/net/route"      # this network namespace's IPv4 routes (Linux)
EXAMPLE_PORT = 46999            # the port the corrected forms show when none was given
SIOCGIFADDR = 0x8915            # Linux ioctl: an interface's IPv4 address, in a struct ifreq
IFNAMSIZ = 16                   # bytes of ifreq's interface name, with its NUL
IFREQ_BYTES = 40                # bytes of a struct ifreq: the name, then a sockaddr
SIN_ADDR_AT = IFNAMSIZ + 4      # where the address lies: after the name, sin_family, sin_port

_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")   # of a host name
_DOTTED = re.compile(r"[\d.]+")                                          # looks like IPv4

# errno of a failed bind or connect -> the cause in words, with what to do
CAUSES = {
    errno.EADDRINUSE: "another process listens there: pick another port, or stop that process",
    errno.EADDRNOTAVAIL: "it is not an address of this host: give one of this host's addresses, "
                         "127.0.0.1 (this host only) or * (every interface)",
    errno.EACCES: f"no permission: ports up to {PRIVILEGED_PORT_MAX} need root; pick one from "
                  f"{PRIVILEGED_PORT_MAX + 1} to {PORT_MAX} (or, for ipc, a folder you may write)",
    errno.ENOENT: "its folder does not exist: make it first, or pick another path",
    errno.ENODEV: "no interface or address of this host has that name",
    errno.EINVAL: "ZeroMQ does not take it as an address: write tcp://HOST:PORT or ipc://PATH",
    errno.EPROTONOSUPPORT: "downpour's sockets speak tcp:// and ipc:// only",
}


class Address(NamedTuple):
    """A parsed address: `str()` gives the canonical endpoint."""

    scheme: str         # "tcp" or "ipc"
    host: str           # tcp: "*", an IP address (IPv6 without brackets) or a host name; ipc: ""
    port: int           # tcp: 1-65535, or 0 for a free port (a bind); ipc: 0
    path: str           # ipc: the socket file; tcp: ""

    def __str__(self) -> str:
        if self.scheme == "ipc":
            return f"ipc://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    @property
    def wildcard(self) -> bool:
        """Whether it means every interface of this host (a bind's *, 0.0.0.0 or ::)."""
        return self.scheme == "tcp" and self.host in WILDCARDS

    @property
    def exposed(self) -> bool:
        """Whether a socket bound here can be reached from other hosts: tcp off loopback.
        A host name other than localhost counts as exposed (it is not resolved here)."""
        return self.scheme == "tcp" and not is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """Whether `host` (as written, never resolved) names this host's loopback: localhost,
    127.0.0.0/8, ::1 (or ::ffff:127.x.y.z)."""
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def parse(text: str, flag: str, *, bind: bool) -> Address:
    """The address `text` given as `flag` (named in errors), for a socket that binds to it
    (`bind`) or connects to it. ConfigError, with the corrected form where there is one,
    for: no scheme (a bare port, HOST:PORT), a scheme other than tcp and ipc, a missing or
    out-of-range port, a malformed host, a wildcard to connect to, an empty or too long
    ipc path."""
    text = text.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise ConfigError(f"{flag} {text!r} is not an address: expected tcp://HOST:PORT or "
                          f"ipc://PATH{_guess(text, flag)}")
    if scheme not in SCHEMES:
        raise ConfigError(f"{flag} {text!r}: downpour's sockets speak tcp:// and ipc://, not "
                          f"{scheme}://; e.g. {flag} {_example()}")
    if scheme == "ipc":
        return _ipc(rest, text, flag)
    host, port = _split(rest, text, flag, bind)
    return Address("tcp", _host(host, text, flag, bind), _port(port, host, text, flag, bind), "")


def parse_host(text: str, flag: str) -> str:
    """A host name or IP address given alone (--advertise), without brackets. ConfigError
    for an address with a scheme or a port, a wildcard, or a malformed name."""
    text = text.strip()
    if "://" in text or (text.count(":") == 1 and not text.startswith("[")):
        host = text.partition("://")[2] or text
        host = host.rpartition(":")[0] or host
        raise ConfigError(f"{flag} takes a host name or IP address alone, the one other hosts "
                          f"reach this node by, not {text!r}: e.g. {flag} {host}")
    host = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if host in WILDCARDS:
        raise ConfigError(f"{flag} {text!r}: a wildcard is for --bind; give the host name or IP "
                          f"address other hosts reach this node by, e.g. {flag} 10.0.0.5")
    return _host(host, text, flag, bind=False)


def check_exposure(where: Address, flag: str, *, keys: bool, insecure: bool,
                   private_network: bool | None = None) -> None:
    """Protected mode: ConfigError if a node without `keys` would listen at `where`
    beyond this host and `insecure` was not given.

    `private_network`: the node runs inside a run's own private network namespace (the
    emulated links of a local run, downpour/netem.py), where every address is private to
    the run and any bind is allowed; None: look (`in_private_network`)."""
    if keys or insecure or not where.exposed:
        return
    if in_private_network() if private_network is None else private_network:
        return
    port = where.port or EXAMPLE_PORT
    raise ConfigError(
        f"{flag} {where} listens beyond this host without keys: anyone who reaches the port "
        f"could control the run. Make the cluster's keys with `downpour keys DIR` and give "
        f"every node --keys DIR; or listen on this host only ({flag} tcp://127.0.0.1:{port}, "
        f"or ipc://PATH); or, on a network you trust, add --insecure")


def in_private_network() -> bool:
    """Whether this process's network is a run's own emulated one (downpour/netem.py):
    every address it has, but loopback, is on EMULATED_NET and no route leads anywhere
    else, so nobody outside the run can reach a port here. Read from the interfaces and
    the routing table, never from a flag a peer could pass."""
    addresses = [ipaddress.ip_address(a) for a in host_addresses()]
    outside = [a for a in addresses if not a.is_loopback and a not in EMULATED_NET]
    if outside or not any(a in EMULATED_NET for a in addresses):
        return False
    try:
        with open(ROUTES) as f:
            routes = [line.split() for line in f.read().splitlines()[1:] if line.strip()]
    except OSError:
        return False
    for fields in routes:                       # Iface Destination Gateway Flags ... Mask
        dest = ipaddress.ip_address(bytes(reversed(bytes.fromhex(fields[1]))))
        mask = ipaddress.ip_address(bytes(reversed(bytes.fromhex(fields[7]))))
        net = ipaddress.ip_network(f"{dest}/{mask}", strict=False)
        if not (net.subnet_of(EMULATED_NET) or net.is_loopback):
            return False
    return True


def reachable(endpoint: str) -> bool:
    """Whether others than this host's users and the run's own nodes can reach a socket
    bound at `endpoint`: tcp off loopback, outside a run's emulated network."""
    return parse(endpoint, "--bind", bind=True).exposed and not in_private_network()


def insecure_warning(endpoint: str) -> str:
    """What a node listening at `endpoint` without keys (--insecure) says first."""
    return (f"--insecure: listening on {', '.join(endpoints(endpoint))} without keys: anyone "
            "who reaches the port can control the run")


def bind_failure(address: str, code: int | None, detail: str = "", *, bind: bool = True
                 ) -> ConfigError:
    """The error for a bind (or connect) to `address` that failed with errno `code`: the
    address, the cause in words and what to do; `detail` is the system's own words, used
    when the errno has none here."""
    cause = CAUSES.get(code) or detail or "unknown cause"
    return ConfigError(f"cannot {'listen on' if bind else 'connect to'} {address}: {cause}")


def endpoints(endpoint: str) -> list[str]:
    """The addresses a socket bound at `endpoint` listens on: itself, or for a wildcard
    (tcp://0.0.0.0:5555, as ZeroMQ reports tcp://*:5555) one per IPv4 address of this host."""
    try:
        where = parse(endpoint, "endpoint", bind=True)
    except ConfigError:
        return [endpoint]
    if not where.wildcard:
        return [str(where)]
    return [str(where._replace(host=ip)) for ip in host_addresses()] or [str(where)]


def host_addresses() -> list[str]:
    """This host's IPv4 addresses (each interface's first; loopback first), as a wildcard
    bind listens on them; [] where the interfaces cannot be read (not Linux)."""
    found = []
    try:
        import fcntl
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            for _, name in socket.if_nameindex():
                request = struct.pack(f"{IFNAMSIZ}s{IFREQ_BYTES - IFNAMSIZ}x",
                                      name.encode()[:IFNAMSIZ - 1])
                try:
                    reply = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, request)
                except OSError:
                    continue                    # no IPv4 address on it
                found.append(socket.inet_ntoa(reply[SIN_ADDR_AT:SIN_ADDR_AT + 4]))
    except (ImportError, OSError, AttributeError):
        return []
    unique = list(dict.fromkeys(found))
    return sorted(unique, key=lambda ip: not ipaddress.ip_address(ip).is_loopback)


# -- the parts of `parse` --------------------------------------------------------------------
def _example(host: str = "127.0.0.1", port: int | str = EXAMPLE_PORT) -> str:
    return f"tcp://{host}:{port}"


def _guess(text: str, flag: str) -> str:
    """The corrected form of an address given without a scheme, as '; ...' (or "")."""
    if text.isdigit():
        return f"; for port {text} of this host write {flag} {_example(port=text)}"
    if text.startswith(("/", "./", "@")):
        return f"; for a unix socket write {flag} ipc://{text}"
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and host and "/" not in host:
        return f"; write {flag} tcp://{text}"
    return f", e.g. {flag} {_example()}"


def _ipc(path: str, text: str, flag: str) -> Address:
    if not path:
        raise ConfigError(f"{flag} {text!r}: an ipc address needs a file path, e.g. "
                          f"{flag} ipc:///tmp/downpour/scheduler")
    if len(path.encode()) > IPC_PATH_MAX:
        raise ConfigError(f"{flag} {text!r}: the path is {len(path.encode())} bytes; a unix "
                          f"socket's path takes at most {IPC_PATH_MAX}: pick a shorter one "
                          "(e.g. under /tmp)")
    return Address("ipc", "", 0, path)


def _split(rest: str, text: str, flag: str, bind: bool) -> tuple[str, str]:
    """(host, port) of tcp://`rest`; ConfigError when there is no port."""
    if rest.startswith("["):
        host, close, after = rest[1:].partition("]")
        if not close or not after.startswith(":"):
            raise ConfigError(f"{flag} {text!r}: an IPv6 address goes in brackets before the "
                              f"port, e.g. {flag} tcp://[{host or '::1'}]:{EXAMPLE_PORT}")
        return host, after[1:]
    host, sep, port = rest.rpartition(":")
    if not sep:
        raise ConfigError(f"{flag} {text!r} has no port: write {flag} tcp://{rest or 'HOST'}:PORT, "
                          f"e.g. {_example(rest or '127.0.0.1')}"
                          + ("; port 0 picks a free one" if bind else ""))
    if ":" in host:
        raise ConfigError(f"{flag} {text!r}: an IPv6 address goes in brackets, e.g. "
                          f"{flag} tcp://[{host}]:{port}")
    return host, port


def _host(host: str, text: str, flag: str, bind: bool) -> str:
    """`host` checked: *, an IP address or a host name; ConfigError naming what is wrong."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if host == "*" or (ip is not None and ip.is_unspecified):
        if bind:
            return host if host == "*" else str(ip)
        raise ConfigError(f"{flag} {text!r}: {host} means every interface, which a node binds "
                          "to but cannot connect to: give the host it listens on, e.g. "
                          f"{flag} {_example()} (or tcp://HOSTNAME:PORT)")
    if ip is not None:
        return str(ip)
    if _DOTTED.fullmatch(host):
        raise ConfigError(f"{flag} {text!r}: {host!r} is not an IPv4 address (four numbers "
                          "0-255, e.g. 127.0.0.1)")
    labels = host.rstrip(".").split(".")
    if not host or len(host) > HOST_NAME_MAX or not all(_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(f"{flag} {text!r}: {host!r} is not a host name or IP address (a "
                          "name is letters, digits, - and _ between dots, e.g. scheduler or "
                          "node-1.example.org)")
    return host


def _port(port: str, host: str, text: str, flag: str, bind: bool) -> int:
    """`port` as a number: 1-65535, or for a bind also 0 or * (a free port)."""
    if bind and port == "*":
        return 0
    low = 0 if bind else 1
    if not port.isdigit() or not low <= int(port) <= PORT_MAX:
        shown = f"[{host}]" if ":" in host else host
        raise ConfigError(f"{flag} {text!r}: the port must be a number from {low} to {PORT_MAX}"
                          + (" (0 or * picks a free one)" if bind else "")
                          + f", e.g. {flag} tcp://{shown}:{EXAMPLE_PORT}")
    return int(port)
