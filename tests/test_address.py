"""Addresses read before any socket exists (common/wire/address.py), and the sockets made from
them closed on every failure (common/wire/client.py make_socket, ps/server.py concrete)."""

import errno
import socket

import pytest
import zmq

from downpour.common.errors import ConfigError
from downpour.common.wire import address
from downpour.common.wire.address import Address, check_exposure, is_loopback, parse, parse_host
from downpour.common.wire.sockets import bind_router, make_socket
from downpour.ps.server import advertised, concrete

HANG_S = 10          # a test that would hang (ctx.term() with a socket open) fails after this


@pytest.fixture
def busy_port():
    """A tcp port of 127.0.0.1 another socket listens on, for the length of the test."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("text, bind, expected", [
    ("tcp://127.0.0.1:46999", False, Address("tcp", "127.0.0.1", 46999, "")),
    ("tcp://scheduler:5555", False, Address("tcp", "scheduler", 5555, "")),   # never resolved
    ("tcp://downpour_scheduler.1.abc:5555", False,
     Address("tcp", "downpour_scheduler.1.abc", 5555, "")),                   # a swarm task name
    ("tcp://[::1]:6000", False, Address("tcp", "::1", 6000, "")),
    ("tcp://*:5555", True, Address("tcp", "*", 5555, "")),
    ("tcp://*:*", True, Address("tcp", "*", 0, "")),
    ("tcp://0.0.0.0:0", True, Address("tcp", "0.0.0.0", 0, "")),
    ("tcp://localhost:65535", True, Address("tcp", "localhost", 65535, "")),
    ("ipc:///tmp/downpour/scheduler", True, Address("ipc", "", 0, "/tmp/downpour/scheduler")),
    ("ipc://@downpour", False, Address("ipc", "", 0, "@downpour")),
])
def test_good_addresses_parse_to_their_parts(text, bind, expected):
    assert parse(text, "--bind", bind=bind) == expected


@pytest.mark.parametrize("text, canonical", [
    ("tcp://*:*", "tcp://*:0"), ("tcp://[::1]:6000", "tcp://[::1]:6000"),
    ("  tcp://127.0.0.1:5555 ", "tcp://127.0.0.1:5555"), ("ipc://@x", "ipc://@x"),
])
def test_str_is_the_canonical_endpoint(text, canonical):
    assert str(parse(text, "--bind", bind=True)) == canonical


@pytest.mark.parametrize("text, flag, bind, message", [
    ("5555", "--bind", True, "--bind '5555' is not an address: expected tcp://HOST:PORT or "
     "ipc://PATH; for port 5555 of this host write --bind tcp://127.0.0.1:5555"),
    ("127.0.0.1:46999", "--scheduler", False, "--scheduler '127.0.0.1:46999' is not an address: "
     "expected tcp://HOST:PORT or ipc://PATH; write --scheduler tcp://127.0.0.1:46999"),
    ("localhost:46999", "--scheduler", False, "--scheduler 'localhost:46999' is not an address: "
     "expected tcp://HOST:PORT or ipc://PATH; write --scheduler tcp://localhost:46999"),
    ("/tmp/s", "--bind", True, "--bind '/tmp/s' is not an address: expected tcp://HOST:PORT or "
     "ipc://PATH; for a unix socket write --bind ipc:///tmp/s"),
    ("tcp://localhost", "--bind", True, "--bind 'tcp://localhost' has no port: write --bind "
     "tcp://localhost:PORT, e.g. tcp://localhost:46999; port 0 picks a free one"),
    ("udp://h:1", "--bind", True, "--bind 'udp://h:1': downpour's sockets speak tcp:// and "
     "ipc://, not udp://; e.g. --bind tcp://127.0.0.1:46999"),
    ("tcp://h:0", "--scheduler", False, "--scheduler 'tcp://h:0': the port must be a number from "
     "1 to 65535, e.g. --scheduler tcp://h:46999"),
    ("tcp://h:65536", "--bind", True, "--bind 'tcp://h:65536': the port must be a number from 0 "
     "to 65535 (0 or * picks a free one), e.g. --bind tcp://h:46999"),
    ("tcp://h:*", "--scheduler", False, "--scheduler 'tcp://h:*': the port must be a number from "
     "1 to 65535, e.g. --scheduler tcp://h:46999"),
    ("tcp://*:5555", "--scheduler", False, "--scheduler 'tcp://*:5555': * means every interface, "
     "which a node binds to but cannot connect to: give the host it listens on, e.g. "
     "--scheduler tcp://127.0.0.1:46999 (or tcp://HOSTNAME:PORT)"),
    ("tcp://::1:5555", "--scheduler", False, "--scheduler 'tcp://::1:5555': an IPv6 address goes "
     "in brackets, e.g. --scheduler tcp://[::1]:5555"),
    ("tcp://1.2.3:5", "--scheduler", False, "--scheduler 'tcp://1.2.3:5': '1.2.3' is not an IPv4 "
     "address (four numbers 0-255, e.g. 127.0.0.1)"),
    ("tcp://a b:5", "--scheduler", False, "--scheduler 'tcp://a b:5': 'a b' is not a host name or "
     "IP address (a name is letters, digits, - and _ between dots, e.g. scheduler or "
     "node-1.example.org)"),
    ("ipc://", "--bind", True, "--bind 'ipc://': an ipc address needs a file path, e.g. --bind "
     "ipc:///tmp/downpour/scheduler"),
])
def test_a_bad_address_says_what_is_wrong_and_the_corrected_form(text, flag, bind, message):
    with pytest.raises(ConfigError) as e:
        parse(text, flag, bind=bind)
    assert str(e.value) == message


def test_an_ipc_path_must_fit_a_unix_socket():
    longest = "/" + "x" * (address.IPC_PATH_MAX - 1)
    assert parse(f"ipc://{longest}", "--bind", bind=True).path == longest
    with pytest.raises(ConfigError, match="the path is 108 bytes; a unix socket's path takes "
                                          "at most 107"):
        parse(f"ipc://{longest}x", "--bind", bind=True)


@pytest.mark.parametrize("text, host", [("B", "B"), ("10.0.0.5", "10.0.0.5"), ("[::1]", "::1"),
                                        ("::1", "::1"), ("node-1.example.org", "node-1.example.org")])
def test_advertise_takes_a_host_alone(text, host):
    assert parse_host(text, "--advertise") == host


@pytest.mark.parametrize("text, message", [
    ("tcp://B:6000", "--advertise takes a host name or IP address alone, the one other hosts "
     "reach this node by, not 'tcp://B:6000': e.g. --advertise B"),
    ("B:6000", "--advertise takes a host name or IP address alone, the one other hosts reach "
     "this node by, not 'B:6000': e.g. --advertise B"),
    ("*", "--advertise '*': a wildcard is for --bind; give the host name or IP address other "
     "hosts reach this node by, e.g. --advertise 10.0.0.5"),
])
def test_advertise_refuses_an_address_or_a_wildcard(text, message):
    with pytest.raises(ConfigError) as e:
        parse_host(text, "--advertise")
    assert str(e.value) == message


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("localhost", True), ("LOCALHOST", True),
    ("::1", True), ("::ffff:127.0.0.1", True), ("*", False), ("0.0.0.0", False), ("::", False),
    ("10.0.0.5", False), ("scheduler", False), ("localhost.example.org", False),
])
def test_loopback_is_read_from_the_text_never_resolved(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("text", ["tcp://*:5555", "tcp://0.0.0.0:0", "tcp://10.0.0.5:6000",
                                  "tcp://[::]:0", "tcp://myhost:6000"])
def test_protected_mode_refuses_a_public_bind_without_keys(text):
    where = parse(text, "--bind", bind=True)
    with pytest.raises(ConfigError) as e:
        check_exposure(where, "--bind", keys=False, insecure=False)
    assert "downpour keys DIR" in str(e.value) and "--insecure" in str(e.value)
    assert f"--bind {where} listens beyond this host without keys" in str(e.value)
    check_exposure(where, "--bind", keys=True, insecure=False)        # each of these lets it
    check_exposure(where, "--bind", keys=False, insecure=True)
    check_exposure(where, "--bind", keys=False, insecure=False, private_network=True)


@pytest.mark.parametrize("text", ["tcp://127.0.0.1:5555", "tcp://localhost:0", "tcp://[::1]:0",
                                  "ipc:///tmp/s"])
def test_protected_mode_allows_loopback_and_ipc(text):
    check_exposure(parse(text, "--bind", bind=True), "--bind", keys=False, insecure=False)


def test_a_wildcard_is_listed_as_this_hosts_addresses():
    found = address.endpoints("tcp://0.0.0.0:5555")
    ips = address.host_addresses()
    assert ips and ips[0].startswith("127.")                       # loopback first
    assert found == [f"tcp://{ip}:5555" for ip in ips]
    assert address.endpoints("tcp://127.0.0.1:5555") == ["tcp://127.0.0.1:5555"]
    assert address.endpoints("ipc:///tmp/s") == ["ipc:///tmp/s"]


@pytest.mark.parametrize("code, words", [
    (errno.EADDRINUSE, "another process listens there: pick another port, or stop that process"),
    (errno.EADDRNOTAVAIL, "it is not an address of this host"),
    (errno.EACCES, "no permission: ports up to 1023 need root"),
])
def test_a_failed_bind_is_named_with_its_cause_in_words(code, words):
    e = address.bind_failure("tcp://10.0.0.5:80", code, "system words")
    assert str(e).startswith(f"cannot listen on tcp://10.0.0.5:80: {words}")
    assert str(address.bind_failure("x", 12345, "system words")) == "cannot listen on x: system words"


@pytest.mark.timeout(HANG_S)
def test_a_failed_bind_closes_its_socket_so_the_context_ends(busy_port):
    """Before, the failed socket stayed open and ctx.term() never returned."""
    ctx = zmq.Context()
    try:
        with pytest.raises(ConfigError) as e:
            bind_router(ctx, f"tcp://127.0.0.1:{busy_port}")
        assert str(e.value) == (f"cannot listen on tcp://127.0.0.1:{busy_port}: another process "
                                "listens there: pick another port, or stop that process")
        with pytest.raises(ConfigError, match="cannot listen on tcp://203.0.113.123:5555: it is not "
                                              "an address of this host"):
            make_socket(ctx, zmq.ROUTER, "tcp://203.0.113.123:5555", bind=True)
        with pytest.raises(ConfigError, match="cannot connect to 127.0.0.1:5555: ZeroMQ does "
                                              "not take it as an address"):
            make_socket(ctx, zmq.DEALER, "127.0.0.1:5555")
    finally:
        ctx.term()


def test_a_servers_port_is_tried_before_it_registers(busy_port):
    with pytest.raises(ConfigError) as e:
        concrete(f"tcp://127.0.0.1:{busy_port}")
    assert str(e.value) == (f"cannot listen on tcp://127.0.0.1:{busy_port}: another process "
                            "listens there: pick another port, or stop that process")
    free = parse(concrete("tcp://127.0.0.1:0"), "--bind", bind=True)
    assert free.host == "127.0.0.1" and 0 < free.port <= address.PORT_MAX
    assert concrete("ipc:///tmp/s") == "ipc:///tmp/s"


@pytest.mark.parametrize("endpoint, host, expected", [
    ("tcp://*:6000", "10.0.0.5", "tcp://10.0.0.5:6000"),
    ("tcp://0.0.0.0:6000", "server-b", "tcp://server-b:6000"),
    ("tcp://[::]:6000", "fd00::5", "tcp://[fd00::5]:6000"),
    ("tcp://127.0.0.1:6000", "10.0.0.5", "tcp://127.0.0.1:6000"),     # not a wildcard: as bound
    ("ipc:///tmp/s0", "10.0.0.5", "ipc:///tmp/s0"),
])
def test_a_wildcard_bind_is_advertised_by_its_host(endpoint, host, expected):
    assert advertised(endpoint, host) == expected
