"""A parameter-server process: one shard of the vector, held as pieces.

    request --> ROUTER --> Server.handle --> the piece it names (ps/shard.py) --> replies

The shard assigned by the scheduler is cut into pieces (common.layout.Layout.pieces),
each a `Shard` with its own slice, optimizer state and version, so that the
server updates one piece while the next is still arriving. `serve` is the loop: a
ROUTER socket polled with a timeout, a heartbeat thread to the scheduler, and
SIGTERM/SIGINT handling that checkpoints and exits. Initial weights are the
single-process trainer's for the same seed, sliced: the server computes the whole
initial vector once and each piece keeps its range.
"""

from __future__ import annotations

import signal
import socket
import sys
from dataclasses import replace

import zmq

from downpour.common import config, protocol
from downpour.common.client import make_socket
from downpour.common.config import Config
from downpour.common.errors import ConfigError, ProtocolError
from downpour.common.model import ModelSpec, initial_params, model_layout
from downpour.common.node import Heartbeat, register
from downpour.ps.shard import Reply, Shard


def bind_router(ctx: zmq.Context, address: str) -> tuple[zmq.Socket, str]:
    """A ROUTER bound to `address` (tcp port 0 = a free port) and the endpoint it got."""
    sock = make_socket(ctx, zmq.ROUTER, address, bind=True)
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


def advertised(endpoint: str, host: str) -> str:
    """The address others use: a wildcard tcp bind is replaced by `host`."""
    for wildcard in ("0.0.0.0", "*"):
        if endpoint.startswith(f"tcp://{wildcard}:"):
            return endpoint.replace(wildcard, host, 1)
    return endpoint


class Server:
    """The pieces one server process holds, and the routing of each request to its piece.

    A piece is a Shard of its own (its slice of the vector, its optimizer state, its
    version): the optimizer being element-wise, pieces updated one by one give the
    same numbers as the whole range updated at once.
    """

    def __init__(self, cfg: Config, spec: ModelSpec, rank: int,
                 pieces: list[tuple[int, int, int]]):
        """Server `rank` of a run whose pieces are [(server, lo, hi), ...] (all servers')."""
        self.rank, self.cfg = rank, cfg
        self.node = f"server-{rank}"
        initial = initial_params(spec, cfg.seed)
        self.shards = {i: Shard(cfg, spec, i, lo, hi, initial, self.node)
                       for i, (server, lo, hi) in enumerate(pieces) if server == rank}
        if not self.shards:
            raise ConfigError(f"server {rank} holds no piece of the {len(pieces)} given")

    def handle(self, ident: bytes, frames: list) -> tuple[Shard | None, list[Reply]]:
        """(the piece that answered, its replies); a request no piece can take gets an error."""
        header = None                    # the error answers the request's seq if it was readable
        try:
            header, payload = protocol.decode(frames)
            shard = self.shards.get(header.get("shard"))
            if shard is None:
                raise protocol.error(protocol.E_SHARD, f"{self.node} holds pieces "
                                     f"{sorted(self.shards)}, not {header.get('shard')!r}")
        except ProtocolError as e:
            return None, [(ident, protocol.error_reply(e.code, str(e), header, self.node))]
        return shard, shard.handle_request(ident, header, payload)

    @property
    def stopping(self) -> bool:
        return all(s.stopping for s in self.shards.values())

    @property
    def version(self) -> int:
        return min(s.version for s in self.shards.values())

    def restore(self) -> None:
        for shard in self.shards.values():
            shard.restore()

    def close(self) -> None:
        """Wait for every send in flight; checkpoint if there is a directory."""
        for shard in self.shards.values():
            shard.wait_sent()
            if self.cfg.checkpoint_dir:
                shard.checkpoint()


def own_address() -> str:
    """This host's address as its name resolves (a container's IP on its network), else its name."""
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        return name


def serve(server: Server, sock: zmq.Socket, heartbeat: Heartbeat | None = None,
          poll_ms: int = 100) -> None:
    """Answer requests on `sock` until shutdown, SIGTERM/SIGINT, or a lost scheduler."""
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))
    while not (stop or server.stopping or (heartbeat and heartbeat.lost.is_set())):
        if not sock.poll(poll_ms):
            continue
        ident, *frames = sock.recv_multipart(copy=False)
        shard, replies = server.handle(ident.bytes, frames)
        for to, out in replies:
            tracker = sock.send_multipart([to, *out], copy=False, track=True)
            if shard is not None:
                shard.sent(tracker, sum(len(f) for f in out))
    server.close()
    if heartbeat and heartbeat.lost.is_set():
        print(f"{server.node}: the scheduler stopped answering; stopped"
              + (" after a checkpoint" if server.cfg.checkpoint_dir else ""), file=sys.stderr)


def standalone(cfg: Config, spec: ModelSpec, rank: int, address: str) -> None:
    """Serve server `rank` of `cfg.shards` at `address` with no scheduler, until a shutdown.

    For benchmarks and tests: the pieces come from the model's layout, as the
    scheduler would assign them.
    """
    pieces = model_layout(spec).pieces(cfg.shards, cfg.piece_elements)
    ctx = zmq.Context()
    sock, _ = bind_router(ctx, address)
    try:
        serve(Server(cfg, spec, rank, pieces), sock)
    finally:
        sock.close()
        ctx.term()


def main(cfg: Config) -> int:
    """`downpour server`: register with the scheduler, take a shard, serve its pieces."""
    if not cfg.scheduler:
        raise ConfigError("a server needs the scheduler's address: --scheduler tcp://HOST:PORT "
                          "(or DOWNPOUR_SCHEDULER)")
    ctx = zmq.Context()
    sock, endpoint = bind_router(ctx, cfg.bind or "tcp://*:0")
    try:
        addr = advertised(endpoint, cfg.advertise or own_address())
        meta = register(ctx, cfg.scheduler, "server", {"role": "server", "addr": addr},
                        cfg.start_timeout_s)
        rank = meta["rank"]
        run = replace(config.from_dict(meta["config"]), checkpoint_dir=cfg.checkpoint_dir,
                      resume=cfg.resume)
        server = Server(run, ModelSpec.from_dict(meta["model"]), rank,
                        [tuple(p) for p in meta["pieces"]])
        if cfg.resume:
            server.restore()
        heartbeat = Heartbeat(ctx, cfg.scheduler, server.node, run.heartbeat_s, run.dead_after_s,
                              lambda: {"role": "server", "rank": rank, "version": server.version})
        heartbeat.start()
        try:
            serve(server, sock, heartbeat)
        finally:
            heartbeat.close()
    finally:
        sock.close()
        ctx.term()
    return 0
