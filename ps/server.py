"""A parameter-server process: one shard of the vector, held as pieces.

    request --> ROUTER --> Server.handle --> the piece it names (ps/piece.py) --> replies

The shard assigned by the scheduler is cut into pieces (downpour.common.nn.layout.Layout.pieces),
each a `PieceState` with its own slice, optimizer state and version, so that the
server updates one piece while the next is still arriving. `serve` is the loop: a
ROUTER socket polled with a timeout, a heartbeat thread to the scheduler, and
SIGTERM/SIGINT handling that checkpoints and exits. Initial weights are the
single-process trainer's for the same seed, sliced: the server computes the whole
initial vector once and each piece keeps its range.

With --resume a server continues each piece from the checkpoint THIS run wrote
(the scheduler's run id, in the cluster spec, is in every checkpoint): a server
restarted, or started in a dead one's place, picks up where that rank stopped.
Where this run wrote none, the piece starts fresh; a checkpoint of another run
(an earlier run's, left in the same directory) is never continued, only named.

A server registers before it binds: its ROUTER takes frames no larger than its
largest piece (ZMQ_MAXMSGSIZE must be set before the bind), and the pieces come
with the registration's reply. So a tcp port 0 is chosen first (`concrete`), and
the endpoint said at registration is bound right after it. With keys, a ZAP handler
admits only the cluster's keys, and each request is checked against the role of
the key it came with (protocol.PERMITTED) before any piece sees it.

A run with a sparse model gives every server its tables too (ps/sparse.py): a request
whose header names a `table` goes to them, any other to the piece it names. Its dense
part may be smaller than the number of servers (Layout.pieces with spare): a server may
then hold tables only, and stops once its tables are told to.
"""

from __future__ import annotations

import signal
import socket
import time
from dataclasses import replace

import zmq

from downpour.common import config
from downpour.common.config import Config
from downpour.common.errors import ClusterError, ConfigError, DataError, ProtocolError
from downpour.common.fileio import prepare_output
from downpour.common.nn.layout import Piece
from downpour.common.nn.model import ModelSpec, initial_params, model_layout
from downpour.common.wire import address, protocol, security
from downpour.common.wire.node import Heartbeat, register, say
from downpour.common.wire.security import Keys, guard
from downpour.common.wire.sockets import bind_router, frame_limit
from downpour.ps.piece import PieceState, Reply
from downpour.ps.sparse import Tables, make_tables

FINAL_BEAT_S = 2.0             # a last heartbeat before a server gives its scheduler up
POLL_MS = 100                  # how long `serve` waits for a request before checking for a stop
DEFAULT_BIND = "tcp://*:0"            # with keys: a free port on every interface
LOOPBACK_BIND = "tcp://127.0.0.1:0"   # without keys: a free port on this host only (protected mode)


def advertised(endpoint: str, host: str) -> str:
    """The address others use: a wildcard tcp bind's host replaced by `host` (a name or an
    IP address, IPv6 without brackets)."""
    where = address.parse(endpoint, "--bind", bind=True)
    return str(where._replace(host=host)) if where.wildcard else endpoint


class Server:
    """The pieces one server process holds, and the routing of each request to its piece.

    Each piece has its own state (its slice of the vector, its optimizer state, its
    version): the optimizer being element-wise, pieces updated one by one give the
    same numbers as the whole range updated at once.
    """

    def __init__(self, cfg: Config, spec: ModelSpec, rank: int, pieces: list[Piece],
                 run_id: str = "", secret: bytes | None = None, eval_samples: int = 0):
        """Server `rank` of the run `run_id`, whose pieces are `pieces` (all servers');
        `secret` checks the workers' tokens (None: a server with no scheduler);
        `eval_samples`: the pieces snapshot their weights every this many samples applied."""
        self.rank, self.cfg, self.run_id = rank, cfg, run_id
        self.node = f"server-{rank}"
        initial = initial_params(spec, cfg.seed)
        # this server's pieces: piece number (the header's "piece" field) -> its state
        self.pieces = {i: PieceState(cfg, spec, i, p.lo, p.hi, initial, self.node, run_id, secret,
                                     eval_samples)
                       for i, p in enumerate(pieces) if p.server == rank}
        self.resumed: list[int] = []          # the pieces `resume` restored
        self.tables_resumed = False           # ... and whether it restored the tables
        self.tables = make_tables(cfg, rank)          # None: a dense model
        if self.tables is not None:
            self.tables.secret, self.tables.node, self.tables.run_id = secret, self.node, run_id
        if not self.pieces and self.tables is None:
            raise ConfigError(f"server {rank} holds no piece of the {len(pieces)} given")

    def handle(self, ident: bytes, frames: list) -> tuple[PieceState | Tables | None, list[Reply]]:
        """(the piece or tables that answered, the replies); a request no piece can take,
        or that the sender's key may not send, gets an error."""
        header = None                    # the error answers the request's seq if it was readable
        try:
            header, payload = protocol.decode(frames)
            protocol.permit(header["op"], security.peer_role(frames[0]))
            if "table" in header and self.tables is not None:
                return self.tables, self.tables.handle_request(ident, header, payload)
            piece = self.pieces.get(header.get("piece"))
            if piece is None:
                raise protocol.error(protocol.E_PIECE, f"{self.node} holds pieces "
                                     f"{sorted(self.pieces)}, not {header.get('piece')!r}")
        except ProtocolError as e:
            return None, [Reply(ident, protocol.error_reply(e.code, str(e), header, self.node))]
        return piece, piece.handle_request(ident, header, payload)

    @property
    def stopping(self) -> bool:
        """Every piece, and the tables, were told to shut down."""
        return all(p.stopping for p in self.pieces.values()) and \
            (self.tables is None or self.tables.stopping)

    @property
    def version(self) -> int:
        return min((p.version for p in self.pieces.values()), default=0)

    @property
    def snapshots(self) -> list[int]:
        """The evaluation points every piece of this server holds a snapshot of."""
        held = [set(p.snapshots) for p in self.pieces.values()]
        return sorted(set.intersection(*held)) if held else []

    @property
    def max_frame(self) -> int:
        """The largest frame a request to this server has: a header, its largest piece, or
        with tables a whole frame (keys and rows come in frames of up to MAX_FRAME)."""
        if self.tables is not None:
            return protocol.MAX_FRAME
        return frame_limit([(p.lo, p.hi) for p in self.pieces.values()])

    def resume(self) -> str:
        """Continue every piece from this run's checkpoint where there is one; the others
        start fresh. What happened, in words, if anything but all resumed ("" then).

        DataError if a checkpoint of this run does not fit its piece (another model or
        layout), or a file in the directory is not a checkpoint.
        """
        notes = [self._resume_pieces()] if self.pieces else []
        if self.tables is not None:
            notes.append(self._resume_tables())
        return "; ".join(note for note in notes if note)

    def _resume_tables(self) -> str:
        """Restore the tables from this run's checkpoint if there is one; what happened,
        in words, unless they were restored."""
        saved = self.tables.saved_run()
        if saved == self.run_id:
            self.tables.restore()
            self.tables_resumed = True
            return ""
        where = f"in {self.cfg.checkpoint_dir}"
        if saved is None:
            return f"{self.node}: no table checkpoint of run {self.run_id or '(unnamed)'} {where}: " \
                   "its tables start empty"
        return f"{self.node}: ignores the table checkpoint of run {saved or '(unnamed)'} {where}; " \
               "its tables start empty"

    def _resume_pieces(self) -> str:
        saved = {i: piece.saved_run() for i, piece in self.pieces.items()}
        for i in sorted(saved):
            if saved[i] == self.run_id:
                self.pieces[i].restore()
        self.resumed = sorted(i for i, run in saved.items() if run == self.run_id)
        if len(self.resumed) == len(self.pieces):
            return ""
        where, run = f"in {self.cfg.checkpoint_dir}", self.run_id or "(unnamed)"
        others = sorted({saved_run or "(unnamed)" for saved_run in saved.values()
                         if saved_run is not None and saved_run != self.run_id})
        fresh = ", ".join(str(i) for i in sorted(set(self.pieces) - set(self.resumed)))
        if others:
            return (f"{self.node}: ignores checkpoint(s) of run {', '.join(others)} {where} and "
                    + (f"starts piece(s) {fresh} fresh" if self.resumed else "starts fresh"))
        if self.resumed:
            return (f"{self.node}: no checkpoint of run {run} {where} for piece(s) {fresh}: "
                    "starting them fresh")
        return f"{self.node}: no checkpoint of run {run} {where}: starting fresh"

    def close(self) -> str:
        """Wait for every send in flight; checkpoint if there is a directory. Returns why a
        checkpoint was not written (a newer server of the run replaced this one), or ""."""
        for piece in self.pieces.values():
            piece.wait_sent()
            if self.cfg.checkpoint_dir:
                try:
                    piece.checkpoint()
                except DataError as e:
                    return str(e)
        if self.cfg.checkpoint_dir and self.tables is not None:
            try:
                self.tables.checkpoint()
            except DataError as e:
                return str(e)
        return ""


def concrete(endpoint: str) -> str:
    """`endpoint` with a tcp port 0 (or *) replaced by a port free now, to bind soon.

    A given port is tried the same way (a plain socket, bound and closed at once), so a
    bind that would fail (the port taken, not an address of this host, no permission) is
    a ConfigError naming the address and the cause before the server registers it.
    """
    where = address.parse(endpoint, "--bind", bind=True)
    if where.scheme != "tcp":
        return endpoint
    family = socket.AF_INET6 if ":" in where.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as ZeroMQ binds
            probe.bind(("" if where.wildcard else where.host, where.port))
            return str(where._replace(port=probe.getsockname()[1]))
    except socket.gaierror:
        raise ConfigError(f"cannot listen on {where}: {where.host!r} is not a name of this host; "
                          "give one of its IP addresses, 127.0.0.1 or *") from None
    except OSError as e:
        raise address.bind_failure(str(where), e.errno, e.strerror) from None


def own_address() -> str:
    """This host's address as its name resolves (a container's IP on its network), else its name."""
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        return name


def serve(server: Server, sock: zmq.Socket, heartbeat: Heartbeat | None = None,
          poll_ms: int = POLL_MS) -> str:
    """Answer requests on `sock` until shutdown, SIGTERM/SIGINT, or a lost scheduler;
    return why it stopped, in words."""
    stop: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _: stop.append(signal.Signals(signum).name))
    while not (stop or server.stopping or (heartbeat and (heartbeat.lost.is_set()
                                                           or heartbeat.refused))):
        if not sock.poll(poll_ms):
            continue
        ident, *frames = sock.recv_multipart(copy=False)
        began = time.perf_counter()
        piece, replies = server.handle(ident.bytes, frames)
        for reply in replies:
            tracker = sock.send_multipart([reply.ident, *reply.frames], copy=False, track=True)
            if piece is not None:
                piece.sent(tracker, sum(len(f) for f in reply.frames))
        if piece is not None:
            piece.busy_s += time.perf_counter() - began
    if heartbeat and heartbeat.lost.is_set() and not heartbeat.refused:
        heartbeat.beat_now(timeout=FINAL_BEAT_S)   # gone, or was this process asleep (paused)?
    if heartbeat and heartbeat.refused:   # its state is stale: no checkpoint, nothing sent
        return f"fenced out by the scheduler: {heartbeat.refused}"
    fenced = server.close()
    if fenced:
        return f"stopped without a checkpoint: {fenced}"
    if stop:
        why = f"stopped by {stop[0]}"
    elif server.stopping:
        why = "shut down by the scheduler"
    else:
        why = "the scheduler stopped answering; stopped"
    return why + (" after a checkpoint" if server.cfg.checkpoint_dir else "")


def standalone(cfg: Config, spec: ModelSpec, rank: int, address: str) -> None:
    """Serve server `rank` of `cfg.shards` at `address` with no scheduler, until a shutdown.

    For benchmarks and tests: the pieces come from the model's layout, as the
    scheduler would assign them. With cfg.keys (as a server), over CurveZMQ.
    """
    pieces = model_layout(spec).pieces(cfg.shards, cfg.piece_elements, spare=bool(cfg.model))
    server = Server(cfg, spec, rank, pieces)
    keys = Keys.load(cfg.keys, "server") if cfg.keys else None
    ctx = zmq.Context()
    try:
        with guard(ctx, keys):
            sock, _ = bind_router(ctx, address, server.max_frame, keys)
            try:
                serve(server, sock)
            finally:
                sock.close()
    finally:
        ctx.term()


def _resumed(server: Server) -> str:
    """The join line's account of a resume: at which version, of how many pieces; the
    table rows restored."""
    rows = f", resumed {sum(t.stats()['rows'] for t in server.tables.tables.values()):,} table " \
           "rows" if server.tables_resumed else ""
    if not server.resumed:
        return rows
    some = "" if len(server.resumed) == len(server.pieces) else \
        f" {len(server.resumed)} of {len(server.pieces)} pieces"
    return f", resumed{some} at version {min(server.pieces[i].version for i in server.resumed)}" + rows


def main(cfg: Config) -> int:
    """`downpour server`: register with the scheduler, take a shard, serve its pieces."""
    if not cfg.scheduler:
        raise ConfigError("a server needs the scheduler's address: --scheduler tcp://HOST:PORT "
                          "(or DOWNPOUR_SCHEDULER)")
    if cfg.resume and not cfg.checkpoint_dir:
        raise ConfigError("--resume continues from the checkpoints in --checkpoint-dir; give "
                          "one (or DOWNPOUR_CHECKPOINT_DIR)")
    if cfg.checkpoint_dir:
        prepare_output(cfg.checkpoint_dir, "--checkpoint-dir", directory=True)
    keys = Keys.load(cfg.keys, "server") if cfg.keys else None
    ctx = zmq.Context()
    try:
        with guard(ctx, keys):                      # before the bind: no handshake goes unchecked
            _register_and_serve(cfg, ctx, keys)
    finally:
        ctx.term()
    return 0


def _register_and_serve(cfg: Config, ctx: zmq.Context, keys: Keys | None) -> None:
    """`main`'s work: register at an endpoint chosen first, bind it with the frame limit of
    the pieces the registration gave, serve them until the run ends."""
    endpoint = concrete(cfg.bind or (DEFAULT_BIND if keys else LOOPBACK_BIND))
    host = address.parse_host(cfg.advertise, "--advertise") if cfg.advertise else own_address()
    addr = advertised(endpoint, host)
    if keys is None and address.reachable(endpoint):                             # --insecure
        say(f"server: {address.insecure_warning(endpoint)}")
    elif keys is None and not cfg.bind and \
            address.parse(cfg.scheduler, "--scheduler", bind=False).exposed:
        say(f"server: listens on this host only ({endpoint}: no keys), so workers on other "
            "hosts cannot reach it; give every node --keys DIR (`downpour keys DIR`), or "
            "--bind tcp://*:PORT --insecure on a network you trust")
    meta = register(ctx, cfg.scheduler, "server", {"role": "server", "addr": addr},
                    cfg.start_timeout_s, keys)
    if meta is None:                                 # the run ended while it stood by
        return
    rank = meta["rank"]
    run = replace(config.from_dict(meta["config"]), checkpoint_dir=cfg.checkpoint_dir,
                  resume=cfg.resume)
    server = Server(run, ModelSpec.from_dict(meta["model"]), rank,
                    [Piece(*p) for p in meta["pieces"]],     # [[server, lo, hi], ...] on the wire
                    meta.get("run_id", ""), meta["secret"], meta.get("eval_samples", 0))
    try:
        sock, _ = bind_router(ctx, endpoint, server.max_frame, keys)
    except ConfigError as e:              # free when `concrete` tried it, before registering
        raise ClusterError(f"{server.node}: {e}; it was free when this server registered it, "
                           "so another process took it since: start the server again") from None
    try:
        if cfg.resume and (note := server.resume()):
            say(note)
        pieces = [server.pieces[i] for i in sorted(server.pieces)]
        serving = [f"[{pieces[0].lo}, {pieces[-1].hi}) of the vector ({len(pieces)} piece(s))"
                   ] if pieces else []
        serving += ["its keys' rows of the sparse table"] if server.tables is not None else []
        say(f"{server.node}: joined the scheduler at {cfg.scheduler}; serving "
            f"{' and '.join(serving)} at {addr}" + _resumed(server))
        incarnation, token = meta["incarnation"], meta["token"]
        for piece in server.pieces.values():
            piece.incarnation = incarnation
        if server.tables is not None:
            server.tables.incarnation = incarnation
        heartbeat = Heartbeat(ctx, cfg.scheduler, server.node, run.heartbeat_s, run.dead_after_s,
                              lambda: {"role": "server", "rank": rank, "incarnation": incarnation,
                                       "token": token, "version": server.version,
                                       "snapshots": server.snapshots}, keys)
        heartbeat.start()
        try:
            why = serve(server, sock, heartbeat)
        finally:
            heartbeat.close()
        if heartbeat.lost.is_set() or heartbeat.refused:
            raise ClusterError(f"{server.node}: {why} at version {server.version}")
        say(f"{server.node}: {why} at version {server.version}")
    finally:
        sock.close()
