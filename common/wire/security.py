"""The cluster's keys and what they let a peer do: CurveZMQ, a ZAP handler, rank tokens.

    keys DIR   scheduler.key  scheduler.key_secret     one CURVE key pair per role, in
               server.key     server.key_secret        pyzmq's zmq.auth certificate format
               worker.key     worker.key_secret        (secrets mode 0600)

A node given `--keys DIR` needs its own role's secret and the three public keys.
Every socket then runs CurveZMQ: the scheduler's and the servers' ROUTERs are
CURVE servers, every DEALER a CURVE client that knows the public key of the role
it connects to. A `Zap` handler in each binding process admits only the three
public keys, and names the role of the key as the connection's User-Id: a peer
with no keys, or unknown keys, fails the handshake and gets nothing at all.

Who may do what is `protocol.PERMITTED`, checked against `peer_role` (the role
ZAP authenticated, never the `node` field the peer writes). All workers share one
key, so the key cannot tell them apart: the scheduler gives each node it registers
a token, `mint(secret, role, rank, incarnation)`, an HMAC of those under a secret
of the run that only the scheduler and the servers hold. A worker sends its token
with every push, heartbeat and chunk request, and is counted under the rank the
token names, whatever its `node` says; servers check tokens with `read_token`,
needing no word from the scheduler per worker. Without keys the tokens still name
the ranks (so a peer cannot push under a made-up name), but travel in clear.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import struct
import threading
from pathlib import Path
from typing import NamedTuple

import zmq
import zmq.auth
import zmq.utils.z85

from downpour.common.errors import ConfigError
from downpour.common.wire import protocol

ROLES = ("scheduler", "server", "worker")
ZAP_ENDPOINT = "inproc://zeromq.zap.01"     # where libzmq asks for a verdict on each handshake
ZAP_POLL_MS = 100                           # how often the handler checks for close()
ZAP_DOMAIN = b"downpour"                     # with ZAP_ENFORCE_DOMAIN: no handler, no handshake
TOKEN_MAC = 16                              # bytes of HMAC-SHA256 kept in a token
TOKEN = struct.Struct("<II")                # rank, incarnation; then the MAC


class Keys(NamedTuple):
    """One node's keys: its role's pair and every role's public key (z85 bytes)."""

    role: str
    public: bytes
    secret: bytes
    publics: dict[str, bytes]        # role -> public key

    @classmethod
    def load(cls, directory: str | Path, role: str) -> "Keys":
        """The keys of `role` in `directory`; ConfigError naming what is missing or unreadable."""
        d = Path(directory)
        publics = {}
        for name in ROLES:
            publics[name] = _read(d / f"{name}.key", d)[0]
        public, secret = _read(d / f"{role}.key_secret", d)
        if not secret:
            raise ConfigError(f"{d / (role + '.key_secret')} holds no secret key; make the keys "
                              f"with `downpour keys {d}`")
        if public != publics[role]:
            raise ConfigError(f"{role}.key_secret and {role}.key in {d} are not one pair; make the "
                              f"keys again with `downpour keys` in an empty folder")
        return cls(role, public, secret, publics)

    def secure(self, sock: zmq.Socket, peer: str | None = None) -> None:
        """Make `sock` (not yet bound or connected) a CURVE server, or with `peer` (a role) a
        CURVE client of that role's key."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        if peer is None:
            sock.curve_server = True
            sock.zap_domain = ZAP_DOMAIN                 # fail closed: with no Zap running,
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)   # every handshake fails
        else:
            sock.curve_serverkey = self.publics[peer]


def _read(path: Path, directory: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the key {path} ({e}); a node needs its role's .key_secret "
                          f"and scheduler.key, server.key, worker.key: make them with "
                          f"`downpour keys {directory}`") from None


def write_keys(directory: str | Path) -> list[Path]:
    """Write a key pair per role into `directory` (made if missing); the files written.

    Keeps the keys already there (returns []) if all six files are; ConfigError if only
    some are, since mixing pairs of two clusters would lock nodes out.
    """
    d = Path(directory)
    files = [d / f"{role}.{ext}" for role in ROLES for ext in ("key", "key_secret")]
    present = [f for f in files if f.exists()]
    if len(present) == len(files):
        return []
    if present:
        raise ConfigError(f"{d} holds {', '.join(f.name for f in present)} but not all six key "
                          "files; remove them, or give an empty folder")
    d.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)                # secrets are never readable by others, not even briefly
    try:
        for role in ROLES:
            public, secret = zmq.auth.create_certificates(str(d), role)
            os.chmod(public, 0o644)
            os.chmod(secret, 0o600)
    finally:
        os.umask(old)
    return files


def peer_role(frame: zmq.Frame) -> str | None:
    """The role ZAP authenticated for the connection `frame` came by; None without keys
    (or for bytes, which carry no connection)."""
    if not isinstance(frame, zmq.Frame):
        return None
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:                 # no ZAP handler ran: a socket without CURVE
        return None
    return user if user in ROLES else None


class Zap(threading.Thread):
    """The ZAP handler of one context: admits CURVE clients holding one of the cluster's
    public keys, with the key's role as User-Id; refuses everything else.

    Start it before binding a CURVE server socket; `close()` before `ctx.term()`. A
    CURVE server socket made by `Keys.secure` admits nobody while no handler runs.
    """

    def __init__(self, ctx: zmq.Context, keys: Keys):
        super().__init__(name="zap", daemon=True)
        self.roles = {public: role for role, public in keys.publics.items()}
        self.refused = 0                                  # handshakes refused so far
        self._stop_event = threading.Event()
        self._sock = ctx.socket(zmq.REP)
        self._sock.linger = 0
        self._sock.bind(ZAP_ENDPOINT)
        self.start()

    def run(self) -> None:
        while not self._stop_event.is_set():
            if not self._sock.poll(ZAP_POLL_MS):
                continue
            # version, request id, domain, address, identity, mechanism, credentials...
            request = self._sock.recv_multipart()
            request_id, mechanism, credentials = request[1], request[5], request[6:]
            role = None
            if mechanism == b"CURVE" and len(credentials) == 1 and len(credentials[0]) == 32:
                role = self.roles.get(zmq.utils.z85.encode(credentials[0]))
            if role is None:
                self.refused += 1
            self._sock.send_multipart([b"1.0", request_id, b"200" if role else b"400",
                                       b"OK" if role else b"not a key of this cluster",
                                       (role or "").encode(), b""])
        self._sock.close()

    def close(self) -> None:
        """Stop answering (new handshakes then fail) and close the socket; safe to call twice."""
        self._stop_event.set()
        if self.is_alive():
            self.join()

    def __enter__(self) -> "Zap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def guard(ctx: zmq.Context, keys: Keys | None) -> contextlib.AbstractContextManager:
    """A running `Zap` for `keys` on `ctx` (closed on exit), or nothing without keys. Enter
    it before binding, leave it after closing the sockets it guards."""
    return Zap(ctx, keys) if keys is not None else contextlib.nullcontext()


def mint(secret: bytes, role: str, rank: int, incarnation: int) -> bytes:
    """The token of `role` `rank` in its `incarnation`: rank, incarnation, and their MAC."""
    head = TOKEN.pack(rank, incarnation)
    return head + _mac(secret, role, head)


def read_token(secret: bytes, token: object, role: str) -> tuple[int, int]:
    """(rank, incarnation) of a token minted for `role` under `secret`; E_DENIED otherwise."""
    if not isinstance(token, bytes) or len(token) != TOKEN.size + TOKEN_MAC:
        raise protocol.error(protocol.E_DENIED, f"a {role} request needs the token its "
                             "registration gave; this one has none or a malformed one")
    head, mac = token[:TOKEN.size], token[TOKEN.size:]
    if not hmac.compare_digest(mac, _mac(secret, role, head)):
        raise protocol.error(protocol.E_DENIED, f"the token is not one this run gave a {role}")
    return TOKEN.unpack(head)


def _mac(secret: bytes, role: str, head: bytes) -> bytes:
    return hmac.new(secret, role.encode() + b":" + head, hashlib.sha256).digest()[:TOKEN_MAC]
