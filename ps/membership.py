"""Who is in the cluster: registration, seats for servers, heartbeats and liveness.

The scheduler's bookkeeping of its nodes, apart from the run it conducts
(ps/scheduler.py). It answers the two operations nodes send the scheduler:

    register    a server gets a rank and its shard at once (a free rank while the
                cluster assembles, later a dead server's rank: it replaces it); a
                worker gets its rank, and the cluster spec once all S servers are in
                (until then its reply is held)
    heartbeat   records the node's progress; the reply says whether to stop, whether
                the workers may start (`go`: every worker is ready) and where the
                servers are (a replaced server has moved)

    next_chunk  (async, ssp) passed to the conductor's `on_next_chunk`, once the
                rank and incarnation are checked

A node silent for dead_after_s is dead. A dead worker changes the live set
(`live_changed`, which the conductor passes on to sync and ssp servers) and is
reported to `on_worker_dead`; a dead server's rank goes to the next server that
registers. A worker that registers mid-run takes the lowest dead worker's rank
(a restart, or a new node in its place); without one it gets a new rank in async
and ssp runs, and is refused in sync runs, whose global batch has W slices. Each
registration gets a new incarnation and a token naming its role, rank and
incarnation (downpour.common.wire.security.mint, under the run's secret, which servers
get in their spec to check workers' pushes). A node sends its token with every
request and is taken for the node the token names: a worker declared dead in a
dealt run, or whose rank went to another, is refused. With keys, the role a peer
registers or heartbeats as must be its key's (protocol.PERMITTED). Waiting
registrations are capped (MAX_WAITING), and so are worker ranks (MAX_WORKERS). A
registration waits for a place for the `wait_s` it asks (else start_timeout_s), then is
answered `again` and forgotten: a spare that is still there registers again, so it stands
by for the whole run, and one that is gone holds no place. At the run's end every waiting
registration is answered `over`.
Nothing here pulls, pushes or evaluates.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import zmq

from downpour.common.config import Config
from downpour.common.errors import ClusterError, ConfigError, ProtocolError
from downpour.common.order import deals_chunks
from downpour.common.wire import address, protocol, security

SECRET_BYTES = 32        # the run's token secret
MAX_WAITING = 64         # registrations held at once, per role: spare servers, sync spare workers
MAX_WAIT_S = 86400.0     # the longest a registration waits for a place, whatever it asks (s)
AGAIN_LINGER_S = 1.0     # at the end, how long registrations told `again` are still answered
TIMES = ("t_start", "t_end")   # a worker's progress: Unix seconds bracketing its steps


@dataclass
class NodeState:
    role: str
    rank: int
    addr: str = ""
    last_seen: float = field(default_factory=time.monotonic)
    progress: dict[str, Any] = field(default_factory=dict)     # its last heartbeat's meta
    dead: bool = False
    incarnation: int = 0                                       # which registration holds the rank


class HeldWorker(NamedTuple):
    """A worker that registered before all the servers (its reply waits for them), or in a
    sync run with every rank taken (rank -1: it waits for a dead one's until `until`)."""
    ident: bytes
    header: dict
    rank: int
    until: float = math.inf          # time.monotonic() when its node stops waiting


class SpareServer(NamedTuple):
    """A server that registered while every rank was taken: it waits for a dead one's
    until `until`."""
    ident: bytes
    header: dict
    addr: str
    until: float = math.inf          # time.monotonic() when its node stops waiting


class Membership:
    """The scheduler's nodes: who registered, at which rank and address, who is alive.

    `base_spec` is what every node needs to take part (run id, settings, model, pieces);
    a node's registration reply adds its rank and the server addresses. `log`
    takes a line for people. `on_server_moved(rank, addr)` is called when a
    server replaces a dead one.
    """

    def __init__(self, cfg: Config, sock: zmq.Socket, base_spec: dict[str, Any],
                 log: Callable[[str], None]):
        self.cfg, self.sock, self.base_spec, self.log = cfg, sock, base_spec, log
        self.servers: dict[int, NodeState] = {}
        self.workers: dict[int, NodeState] = {}
        self.stopping = False              # told to every worker in its heartbeat reply
        self.live_changed = False          # the live workers changed since the conductor looked
        self.started = False               # assembled: from now on a worker may join
        self._go = False                   # the workers may take their first steps (`go`)
        self.on_server_moved: Callable[[int, str], None] | None = None
        self.on_worker_dead: Callable[[int], None] | None = None
        self.on_next_chunk: Callable[[int, dict], dict[str, Any]] | None = None
        self.retired: dict[int, Counter] = {}    # rank -> progress of its earlier incarnations
        self.secret = secrets.token_bytes(SECRET_BYTES)   # tokens are minted under it
        self._incarnations = 0
        self._held: list[HeldWorker] = []              # workers waiting for the servers
        self._spares: list[SpareServer] = []           # servers waiting for a rank
        self._spare_workers: list[HeldWorker] = []     # sync: workers waiting for a rank
        self._told_again = -math.inf                   # when a spare was last told `again`

    # -- what the conductor asks -------------------------------------------------------------
    @property
    def assembled(self) -> bool:
        return len(self.servers) == self.cfg.shards and len(self.workers) == self.cfg.workers

    @property
    def go(self) -> bool:
        """Whether workers may take their first step: once the cluster has assembled and
        every worker seated then has loaded its data (its progress says `ready`) or died,
        and from then on (a worker joining mid-run starts at once). So the workers of a
        run start together, not each as soon as it has loaded the data while the others
        still load theirs: many workers on few cores would measure their own start-up."""
        if not self._go and self.started:
            self._go = all(w.progress.get("ready") or w.dead for w in self.workers.values())
        return self._go

    def addresses(self) -> list[str]:
        """The servers' addresses by rank."""
        return [s.addr for _, s in sorted(self.servers.items())]

    def live_workers(self) -> list[int]:
        """Ranks of the workers that are alive and not done: those a sync version waits for."""
        return sorted(r for r, w in self.workers.items() if not w.dead and not w.progress.get("done"))

    def dead_workers(self) -> list[int]:
        return sorted(r for r, w in self.workers.items() if w.dead)

    def all_done(self) -> bool:
        """Every live worker has finished its steps."""
        return all(w.progress.get("done") for w in self.workers.values() if not w.dead)

    def snapshots(self) -> set[int]:
        """The evaluation points every server holds a snapshot of, as their last heartbeats
        said (a server that says nothing usable holds none)."""
        held = []
        for server in self.servers.values():
            points = server.progress.get("snapshots")
            ok = isinstance(points, list) and all(type(k) is int for k in points)
            held.append(set(points) if ok else set())
        return set.intersection(*held) if held else set()

    def total(self, key: str) -> float:
        """The sum of a progress counter (protocol.COUNTERS) over every worker that ever held a rank."""
        return (sum(w.progress.get(key, 0) for w in self.workers.values())
                + sum(c[key] for c in self.retired.values()))

    def worker_counters(self) -> dict[int, dict[str, float]]:
        """Each rank's progress counters (protocol.COUNTERS), earlier incarnations included."""
        return {r: {k: w.progress.get(k, 0) + self.retired.get(r, Counter())[k]
                    for k in protocol.COUNTERS} for r, w in sorted(self.workers.items())}

    def worker_samples(self) -> dict[str, int]:
        """Samples trained under each rank, earlier incarnations included: who did the work."""
        return {str(r): int(c["samples"]) for r, c in self.worker_counters().items()}

    def worker_progress(self) -> list[dict[str, Any]]:
        return [w.progress for w in self.workers.values()]

    # -- the loop ------------------------------------------------------------------------
    def assemble(self, interrupted: Callable[[], bool], timeout_s: float, tick_ms: int) -> None:
        """Serve registrations until all S servers and W workers are in.

        ClusterError naming who is missing after `timeout_s`; KeyboardInterrupt as
        soon as `interrupted()` says so.
        """
        deadline = time.monotonic() + timeout_s
        while not self.assembled:
            if interrupted():
                raise KeyboardInterrupt
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"the cluster did not assemble in {timeout_s:g} s: "
                    f"{len(self.servers)} of {self.cfg.shards} server(s) and {len(self.workers)} of "
                    f"{self.cfg.workers} worker(s) registered; start the missing nodes with "
                    f"--scheduler pointing here")
            self._serve(tick_ms)
        self.started = True
        self.log("cluster assembled: " + ", ".join(
            [f"server-{r} at {s.addr}" for r, s in sorted(self.servers.items())]))

    def tend(self, timeout_ms: int = 0) -> None:
        """Answer registrations and heartbeats for up to `timeout_ms`, then notice deaths."""
        self._serve(timeout_ms)
        self._check_liveness()
        self._expire_waiting()

    # -- messages --------------------------------------------------------------------------
    def _serve(self, timeout_ms: int) -> None:
        """Answer every message that arrives within `timeout_ms`."""
        if not self.sock.poll(timeout_ms):
            return
        while self.sock.poll(0):
            ident, *frames = self.sock.recv_multipart(copy=False)
            ident = ident.bytes
            header = None
            try:
                header, _ = protocol.decode(frames)
                role = security.peer_role(frames[0])
                protocol.permit(header["op"], role)
                if header["op"] == "register":
                    self._register(ident, header, role)
                elif header["op"] == "heartbeat":
                    self._reply(ident, header, self._heartbeat(header, role))
                elif header["op"] == "next_chunk" and self.on_next_chunk is not None:
                    node = self._sender(header, "worker", role)
                    self._note(node, header.get("meta", {}).get("progress", {}))
                    self._reply(ident, header, self.on_next_chunk(node.rank, header))
                else:
                    raise protocol.error(protocol.E_UNKNOWN_OP, f"the scheduler offers "
                                         f"{', '.join(protocol.SCHEDULER_OPS)}, not {header['op']!r}")
            except ProtocolError as e:
                self.sock.send_multipart([ident, *protocol.error_reply(e.code, str(e), header,
                                                                        "scheduler")])

    def _reply(self, ident: bytes, request: dict, meta: dict[str, Any]) -> None:
        self.sock.send_multipart([ident, *protocol.encode(
            {"op": "ok", "node": "scheduler", "seq": request["seq"], "meta": meta})])

    def _register(self, ident: bytes, header: dict, key_role: str | None) -> None:
        meta = header.get("meta", {})
        role = meta.get("role")
        if key_role is not None and role != key_role:
            raise protocol.error(protocol.E_DENIED, f"a peer with the {key_role} key registers "
                                 f"as a {key_role}, not as {role!r}")
        if role == "server":
            addr = meta.get("addr")
            if not isinstance(addr, str) or not addr:
                raise protocol.error(protocol.E_MALFORMED, "a server registers with its addr")
            try:                              # every node connects to it: a real address only
                addr = str(address.parse(addr, "addr", bind=False))
            except ConfigError as e:
                raise protocol.error(protocol.E_MALFORMED, str(e)) from None
            self._check_room(self._spares, "server")
            self._spares.append(SpareServer(ident, header, addr, self._until(meta)))
            self._seat_servers()
        elif role == "worker":
            rank = self._worker_rank()
            if rank is None:                  # sync: it waits for a dead worker's place
                self._check_room(self._spare_workers, "worker")
                self._spare_workers.append(HeldWorker(ident, header, -1, self._until(meta)))
                self.log("a worker waits for a dead worker's place (a sync run has one slice "
                         "of each global batch per worker)")
                return
            self._admit_worker(ident, header, rank)
        else:
            raise protocol.error(protocol.E_MALFORMED, f"role must be server or worker, not {role!r}")

    def _until(self, meta: dict) -> float:
        """When a registration stops waiting for a place: after its node's `wait_s` (at most
        MAX_WAIT_S), or this scheduler's start_timeout_s when it sends none."""
        wait_s = meta.get("wait_s", self.cfg.start_timeout_s)
        if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or not wait_s > 0:
            raise protocol.error(protocol.E_MALFORMED, f"wait_s must be a positive number of "
                                 f"seconds, not {wait_s!r}")
        return time.monotonic() + min(wait_s, MAX_WAIT_S)

    def _expire_waiting(self) -> None:
        """Answer `again` to the waiting registrations whose wait is up, and forget them."""
        now = time.monotonic()
        for waiting in (self._spares, self._spare_workers):
            for done in [w for w in waiting if w.until <= now]:
                waiting.remove(done)
                self._reply(done.ident, done.header, {"again": True})
                self._told_again = now

    def dismiss_waiting(self) -> None:
        """The run is over: answer `over` to every registration still waiting for a place,
        and to those that come back within AGAIN_LINGER_S of an `again` (a spare told
        `again` just before the end registers anew after it: unanswered, it would take the
        scheduler for lost)."""
        linger_until = self._told_again + AGAIN_LINGER_S
        while True:
            for waiting in (self._spares, self._spare_workers):
                for w in waiting:
                    self._reply(w.ident, w.header, {"over": True})
                waiting.clear()
            if time.monotonic() >= linger_until:
                return
            self._serve(10)

    @staticmethod
    def _check_room(waiting: list, role: str) -> None:
        """E_STATE if MAX_WAITING registrations of `role` already wait (each role has its own
        queue: waiting servers never keep a worker from a free seat)."""
        if len(waiting) >= MAX_WAITING:
            raise protocol.error(protocol.E_STATE, f"{MAX_WAITING} {role} registrations are already "
                                 "waiting for a place; try again later")

    def _admit_worker(self, ident: bytes, header: dict, rank: int) -> None:
        """Worker `rank` is the registration `header`'s, with a new incarnation."""
        self._incarnations += 1
        self.workers[rank] = NodeState("worker", rank, incarnation=self._incarnations)
        if self.started:
            self.live_changed = True
            self.log(f"worker-{rank} joined mid-run")
        if len(self.servers) == self.cfg.shards:
            self._reply(ident, header, self._spec(rank, self.workers[rank]))
        else:
            self._held.append(HeldWorker(ident, header, rank))

    def _seat_workers(self) -> None:
        """Give waiting workers (sync) the ranks of dead ones."""
        while self._spare_workers and any(w.dead for w in self.workers.values()):
            spare = self._spare_workers.pop(0)
            self._admit_worker(spare.ident, spare.header, self._worker_rank())

    def _worker_rank(self) -> int | None:
        """The rank for a worker that registers now: the lowest dead one's, a free one while
        assembling, or (async, ssp, once started) a new one; None for a sync run that has
        none free (the worker waits for one to die)."""
        dead = sorted(r for r, w in self.workers.items() if w.dead)
        if dead:
            old = self.workers[dead[0]]
            kept = self.retired.setdefault(dead[0], Counter())
            kept.update({k: old.progress.get(k, 0) for k in protocol.COUNTERS})
            return dead[0]
        if len(self.workers) < self.cfg.workers:
            return len(self.workers)
        if self.started and max(self.workers) + 1 >= protocol.MAX_WORKERS:
            raise protocol.error(protocol.E_STATE, f"the run has {protocol.MAX_WORKERS} worker "
                                 "ranks, the most it can hold")
        if self.started:
            return max(self.workers) + 1 if deals_chunks(self.cfg) else None
        raise protocol.error(protocol.E_STATE, f"the run already has its {len(self.workers)} "
                             "worker(s); raise --workers to add more")

    def _seat_servers(self) -> None:
        """Give waiting servers a rank: a free one while assembling, later a dead one's.

        A server that registers when every rank is taken waits here until a server
        dies (it then takes over that rank, and with --resume its checkpoint), or
        until its own registration times out.
        """
        while self._spares:
            free = [r for r in range(self.cfg.shards) if r not in self.servers] or \
                   [r for r, s in sorted(self.servers.items()) if s.dead]
            if not free:
                return
            spare, rank = self._spares.pop(0), free[0]
            replacing = rank in self.servers
            was_at = self.servers[rank].progress.get("version") if replacing else None
            self._incarnations += 1
            self.servers[rank] = NodeState("server", rank, spare.addr,
                                           incarnation=self._incarnations)
            self._reply(spare.ident, spare.header, self._spec(rank, self.servers[rank]))
            if replacing:
                if self.on_server_moved is not None:
                    self.on_server_moved(rank, spare.addr)
                self.log(f"server-{rank} replaced, now at {spare.addr} (the dead one was at "
                         f"version {was_at})")
            if len(self.servers) == self.cfg.shards:
                for held in self._held:
                    worker = self.workers[held.rank]
                    worker.last_seen = time.monotonic()   # it could not beat while held
                    self._reply(held.ident, held.header, self._spec(held.rank, worker))
                self._held.clear()

    def _spec(self, rank: int, node: NodeState) -> dict[str, Any]:
        """What a node needs to take part: the run's spec, its rank and incarnation and,
        once all are in, the servers' addresses."""
        spec = {"rank": rank, "incarnation": node.incarnation,
                "token": security.mint(self.secret, node.role, rank, node.incarnation),
                **self.base_spec}
        if node.role == "server":
            spec["secret"] = self.secret                  # to check the workers' tokens
        if len(self.servers) == self.cfg.shards:
            spec["servers"] = self.addresses()
        return spec

    def _heartbeat(self, header: dict, key_role: str | None) -> dict[str, Any]:
        meta = header.get("meta", {})
        node = self._sender(header, meta.get("role"), key_role)
        was_done = node.progress.get("done")
        self._note(node, meta)
        node.last_seen = time.monotonic()
        if node.dead or (meta.get("done") and not was_done):
            node.dead = False
            self.live_changed = True            # back, or done: servers stop waiting for it
        return {"stop": self.stopping, "go": self.go, "servers": self.addresses(),
                "incarnations": [s.incarnation for _, s in sorted(self.servers.items())]}

    @staticmethod
    def _note(node: NodeState, progress: Any) -> None:
        """Take in a node's progress (a heartbeat's meta, or a chunk request's). Its
        counters (protocol.COUNTERS) only grow: heartbeats and chunk requests come by different
        sockets, so an older report may arrive after a newer one. E_MALFORMED, changing
        nothing, for a counter that is not a number >= 0."""
        if not isinstance(progress, dict):
            raise protocol.error(protocol.E_MALFORMED, f"progress must be a map, got {progress!r}")
        counters = [k for k in protocol.COUNTERS if k in progress]
        for key in [*counters, *(k for k in TIMES if k in progress)]:
            value = progress[key]
            if type(value) not in (int, float) or not 0 <= value < math.inf:
                raise protocol.error(protocol.E_MALFORMED, f"progress {key} must be a finite number "
                                     f">= 0, got {value!r}")
        if type(progress.get("done", False)) is not bool:
            raise protocol.error(protocol.E_MALFORMED, f"progress done must be true or false, got "
                                 f"{progress['done']!r}")
        progress = {k: v for k, v in progress.items() if k != "token"}
        node.progress = {**node.progress, **progress,
                         **{k: max(node.progress.get(k, 0), progress[k]) for k in counters}}

    def _sender(self, header: dict, role: Any, key_role: str | None) -> NodeState:
        """The server or worker a request comes from: the one its token names (the
        rank and incarnation its registration got).

        E_DENIED for a peer whose key is not of `role`, and for a token missing or not
        minted for `role` in this run; E_STATE for a rank nobody of `role` holds, for an
        earlier holder of a rank that went to another (a server woken after it was
        replaced is fenced out this way), and (async, ssp) for a worker declared dead:
        its chunks were dealt again.
        """
        if role not in ("server", "worker"):
            raise protocol.error(protocol.E_MALFORMED, f"role must be server or worker, not {role!r}")
        if key_role is not None and role != key_role:
            raise protocol.error(protocol.E_DENIED, f"a peer with the {key_role} key may not "
                                 f"speak for a {role}")
        rank, incarnation = security.read_token(self.secret, header.get("meta", {}).get("token"),
                                                role)
        node = {"server": self.servers, "worker": self.workers}[role].get(rank)
        if node is None:
            raise protocol.error(protocol.E_STATE, f"{header['node']} is not registered")
        if incarnation != node.incarnation:
            raise protocol.error(protocol.E_STATE, f"{role}-{rank}'s rank went to another "
                                 f"{role} after this one was declared dead; stop it (restarted, "
                                 "it registers afresh)")
        if role == "worker" and node.dead and deals_chunks(self.cfg):
            raise protocol.error(protocol.E_STATE, f"worker-{rank} was declared dead after "
                                 f"{self.cfg.dead_after_s:g} s of silence and its chunks were dealt "
                                 "again; restart it to register again")
        return node

    def _check_liveness(self) -> None:
        now, dead_after = time.monotonic(), self.cfg.dead_after_s
        for node in [*self.servers.values(), *self.workers.values()]:
            if node.dead or now - node.last_seen < dead_after:
                continue
            if node.role == "worker" and node.progress.get("done"):
                continue                                  # finished, and gone: not a death
            node.dead = True
            self.log(f"{node.role}-{node.rank} stopped answering for {dead_after:g} s: marked dead")
            if node.role == "worker":
                self.live_changed = True
                if self.on_worker_dead is not None:
                    self.on_worker_dead(node.rank)
                self._seat_workers()
            else:
                self._seat_servers()
        wait_s = dead_after + self.cfg.start_timeout_s          # for a replacement to register
        if self.workers and all(w.dead and now - w.last_seen > wait_s for w in self.workers.values()):
            raise ClusterError(f"every worker has died and none registered in their place within "
                               f"{self.cfg.start_timeout_s:g} s; the run cannot go on")
        gone = [s for s in self.servers.values()
                if s.dead and now - s.last_seen > dead_after + self.cfg.start_timeout_s]
        if gone:
            raise ClusterError(f"server-{gone[0].rank} at {gone[0].addr} died and no server "
                               f"replaced it within {self.cfg.start_timeout_s:g} s")
