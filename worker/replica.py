"""A worker replica: a full model, a share of the data, and one socket per shard.

Per step, in async mode (DistBelief's Downpour SGD with n_fetch and n_push):

    the gradient of the next batch          the weights are those last fetched: piece i
    (downpour.common.step.GradientStep)     at version v_i
                                            added to the sum of gradients (a sum when
                                            n_push > 1, as DistBelief pushes)
    every n_push steps:  push the sum       to piece i marked as computed on v_i
    every n_fetch steps: pull the weights   and learn each piece's version
                         (one push_pull when both fall on the same step)

Each piece has its own version: servers apply pushes independently, and one
restored from a checkpoint is behind the others. So a push carries, per piece, the
version of that piece's weights the gradient was computed on (`versions`), and
each server counts staleness against its own piece's history.

In sync mode every step is a push_pull whose reply is the next version, which the
server sends once every live worker has pushed; all pieces move together, and a
push says for every piece the version whose global batch it is (`version`, the
lowest piece's). With `overlap` (async, n_fetch = n_push = 1) the next gradient is
computed while the push_pull is in flight, as DistBelief's replicas do: each
gradient is then one version staler, and the servers count it. The batches are
those downpour.common.order gives (in async and ssp, of the chunks the scheduler
deals), so one async worker without overlap takes exactly the single-process
trainer's steps.

A worker takes its first step when the scheduler says `go`: every worker of the run
has loaded its data (node.wait_for_go). Started one by one, the first workers would
train while the others still load, and 16 workers on 2 cores would measure their own
start-up. Each worker reports where its time went (compute, padding, the rest:
waiting) and the bytes it sent and received, for the run's end record.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from typing import Any, Iterator

import numpy as np
import zmq

from downpour.common import config
from downpour.common.config import Config
from downpour.common.ctr import CtrSplit
from downpour.common.data import Dataset
from downpour.common.errors import ConfigError
from downpour.common.nn.layout import Piece
from downpour.common.nn.model import Model, ModelSpec
from downpour.common.nn.sparse import CtrModel
from downpour.common.order import (
    chunk_batches,
    deals_chunks,
    epoch_samples,
    sync_batch,
    sync_versions,
    worker_steps,
)
from downpour.common.step import GradientStep
from downpour.common.training import open_datasets
from downpour.common.wire import protocol
from downpour.common.wire.client import ShardClient, TableClient
from downpour.common.wire.node import (
    ChunkFeed,
    Heartbeat,
    register,
    say,
    wait_for_go,
    worker_progress,
)
from downpour.common.wire.protocol import RemoteError
from downpour.common.wire.security import Keys
from downpour.worker.sparse import SparseReplica

SEQ_SPAN = 2**40        # sequence numbers each incarnation of a rank has to itself


class Replica:
    """Worker `rank` of a run: trains on its batches against the shard servers."""

    def __init__(self, cfg: Config, spec: ModelSpec, rank: int, data: Dataset, client: ShardClient,
                 piece_servers: list[int], incarnation: int = 0):
        self.cfg, self.rank, self.data, self.client = cfg, rank, data, client
        self.piece_servers = piece_servers          # the server that holds each piece
        self.model = Model(spec, seed=cfg.seed, stream=rank)
        # per piece: the version of the weights in model.params, noted as they arrive
        self.versions: tuple[int, ...] = (0,) * len(piece_servers)
        self._incarnations: list[int] | None = None   # of the servers, as the scheduler last said
        # what heartbeats report; t_start/t_end (Unix seconds) bracket the training steps
        self.progress = worker_progress(rank, incarnation)
        sync, params = cfg.mode == "sync", self.model.params
        self._overlap = cfg.overlap and not sync
        self._in_flight = False                     # overlap: a push_pull whose weights are due
        self._unpushed = (0, 0.0)                   # (samples, loss sum) of gradients not yet pushed
        self._acc = np.zeros_like(params) if cfg.n_push > 1 and not sync else None  # summed grads
        self._send = np.empty_like(params) if self._overlap else None    # the gradient in flight
        self._step = GradientStep(cfg, self.model, data, f"worker-{rank}", rank)
        self._warmup_samples = cfg.codec_warmup_epochs * epoch_samples(len(data), cfg)

    def run(self, heartbeat: Heartbeat | None = None, feed: ChunkFeed | None = None) -> None:
        """Take every step of this worker's share, or stop early when the scheduler says so.

        `heartbeat` (its scheduler's word: stop, lost, servers moved) is checked before
        every step and while waiting for a server; `feed` deals the chunks to train in
        async and ssp mode, where it is required."""
        if deals_chunks(self.cfg) != (feed is not None):
            raise ValueError(f"worker-{self.rank}: a ChunkFeed is for the modes that deal "
                             f"chunks (async, ssp), and they need one; {self.cfg.mode} mode "
                             f"was given {'one' if feed is not None else 'none'}")
        if heartbeat is not None:
            self.client.while_waiting = lambda: self._follow(heartbeat.reply)
        self.progress["t_start"], started = time.time(), time.perf_counter()
        self._exchange(self.client.pull, self.model.params)
        for step, idx, last in self._batches(feed):
            if heartbeat is not None and self._told_to_stop(heartbeat):
                break
            loss = self._gradient(idx)
            self._communicate(step, last)
            p = self.progress
            p["samples"] += len(idx)
            p["steps"] += 1
            p["loss_sum"] += loss
            p["loss_count"] += 1
            self._note_times(started)
        if self._in_flight:
            self._exchange(self.client.finish, self.model.params)
            self._in_flight = False
        self.client.wait_sent()
        self._note_times(started)
        self.progress["t_end"] = time.time()
        self.progress["done"] = True

    def _note_times(self, started: float) -> None:
        """Put where the time since `started` (perf_counter s) went, and the bytes moved,
        into the progress: computing, padding, and the rest, waiting (on servers, on the
        scheduler's chunks)."""
        p, times = self.progress, self._step.times
        p.update(compute_s=times.compute_s, padding_s=times.padding_s, cpu_s=times.cpu_s,
                 steps_over=times.over, bytes_sent=self.client.bytes_sent,
                 bytes_received=self.client.bytes_received,
                 waiting_s=max(0.0, time.perf_counter() - started - times.compute_s
                               - times.padding_s))

    def _told_to_stop(self, heartbeat: Heartbeat) -> bool:
        """Whether the scheduler said stop (Heartbeat.said_stop); follows moved servers."""
        if heartbeat.said_stop():
            return True
        self._follow(heartbeat.reply)
        return False

    def _gradient(self, idx: np.ndarray) -> float:
        """The loss of batch `idx`; its gradient is left in model.grads (and added to the
        sum of gradients when n_push > 1)."""
        loss = self._step.step(idx)
        if self._acc is not None:
            self._acc += self.model.grads
        samples, loss_sum = self._unpushed
        self._unpushed = (samples + len(idx), loss_sum + loss * len(idx))
        return loss

    @property
    def version(self) -> int:
        """The lowest version among the pieces of the weights held: in sync mode, where all
        pieces move together, the version whose global batch comes next."""
        return min(self.versions)

    def _communicate(self, step: int, last: bool) -> None:
        """Push and pull as the step's place in the n_push / n_fetch cycle says."""
        cfg, m, sync = self.cfg, self.model, self.cfg.mode == "sync"
        # the codecs' warm-up: this worker's samples x W stand for the run's
        self.client.compress = (self.progress["samples"] + cfg.batch_size) * cfg.workers \
            >= self._warmup_samples
        grad = self._acc if self._acc is not None else m.grads
        push = sync or last or (step + 1) % cfg.n_push == 0
        fetch = sync or (step + 1) % cfg.n_fetch == 0
        # the weights the gradient was computed on: taken before the in-flight push_pull's
        # weights replace them (overlap)
        computed_on = self.version if sync else self.versions
        if self._in_flight:                   # the previous push_pull: its weights arrive now
            self._exchange(self.client.finish, m.params)
            self._in_flight = False
        covered = self._unpushed
        if push and fetch and self._overlap:
            np.copyto(self._send, grad)
            self.client.start("push_pull", self._send, computed_on, last, covered)
            self._in_flight = True
        elif push and fetch:
            self._exchange(self.client.push_pull, grad, computed_on, m.params, last, covered)
        elif push:
            self._exchange(self.client.push, grad, computed_on, last, covered)
        elif fetch:
            self._exchange(self.client.pull, m.params)
        if push:
            self._unpushed = (0, 0.0)
            if self._acc is not None:
                self._acc[:] = 0

    def _batches(self, feed: ChunkFeed | None) -> Iterator[tuple[int, np.ndarray, bool]]:
        """(step, sample indices, whether it is the last step) for this worker.

        Async and ssp: the batches of the chunks `feed` deals, in order. Sync mode
        follows the version the servers answered with (`self.version`): each step
        computes this worker's slice of that version's global batch, so a worker that
        was too late for a version (backup workers) skips to the next.
        """
        n, cfg, step = len(self.data), self.cfg, 0
        if deals_chunks(cfg):
            while (chunk := feed.take()) is not None:
                batches = chunk_batches(n, cfg, chunk)
                for i, idx in enumerate(batches):
                    yield step, idx, i == len(batches) - 1 and not feed.more()
                    step += 1
            return
        total = sync_versions(n, cfg)
        while self.version < total:
            yield step, sync_batch(n, cfg, self.rank, self.version)[1], self.version == total - 1
            step += 1

    def _exchange(self, verb, *args) -> None:
        """`verb(*args)`, then note the version of each piece of the weights now held (a
        verb that brings none leaves them as they were). If a server refuses the push
        because it is behind this worker (it was restored from a checkpoint), drop the
        gradient and pull the weights."""
        try:
            verb(*args)
        except RemoteError as e:
            if e.code != protocol.E_STATE:
                raise
            self.client.pull(self.model.params)
        self.versions = tuple(self.client.versions)

    def _follow(self, reply: dict) -> None:
        """Reconnect to the pieces of any server that was replaced (the scheduler's heartbeat
        reply: `servers`, their addresses, and `incarnations`): moved, or restarted at the
        same address, whose new process never got what was sent to the old one."""
        if not reply.get("servers"):
            return
        known, self._incarnations = self._incarnations, reply.get("incarnations")
        self.client.follow(reply, self.piece_servers, known)


def main(cfg: Config) -> int:
    """`downpour worker`: register with the scheduler, train, report done."""
    if not cfg.scheduler:
        raise ConfigError("a worker needs the scheduler's address: --scheduler tcp://HOST:PORT "
                          "(or DOWNPOUR_SCHEDULER)")
    keys = Keys.load(cfg.keys, "worker") if cfg.keys else None
    ctx = zmq.Context()
    try:
        _register_and_train(cfg, ctx, keys)
    finally:
        ctx.term()
    return 0


def _register_and_train(cfg: Config, ctx: zmq.Context, keys: Keys | None) -> None:
    """`main`'s work: register, take the run's settings and check the data against the
    scheduler's, then train with a heartbeat (and in async and ssp a chunk feed) until
    done or told to stop.

    Every socket made here is closed on every path before `main` ends the context (the
    ExitStack), whatever fails after it was made."""
    meta = register(ctx, cfg.scheduler, "worker", {"role": "worker"}, cfg.start_timeout_s, keys)
    if meta is None:                                 # the run ended while it stood by
        return
    rank, token = meta["rank"], meta["token"]
    node, run = f"worker-{rank}", _run_settings(cfg, meta)
    train, about = _training_data(run, meta, node)
    pieces = [Piece(*p) for p in meta["pieces"]]     # [[server, lo, hi], ...] on the wire
    first_seq, spec = meta["incarnation"] * SEQ_SPAN, ModelSpec.from_dict(meta["model"])
    with contextlib.ExitStack() as sockets:
        client = sockets.enter_context(ShardClient(
            [meta["servers"][p.server] for p in pieces], [(p.lo, p.hi) for p in pieces], node,
            run.timeout_s, run.retries, ctx, first_seq=first_seq, keys=keys,
            token=token, push_codec=run.push_codec, pull_codec=run.pull_codec))
        if run.model:                                # a sparse model: tables beside the pieces
            tables = sockets.enter_context(TableClient(
                meta["servers"], node, CtrModel(run.model, run.embed_dim).dim, run.timeout_s,
                run.retries, ctx, first_seq=first_seq, keys=keys, token=token))
            replica = SparseReplica(run, spec, rank, train, client, tables,
                                    [p.server for p in pieces], meta["incarnation"])
        else:
            replica = Replica(run, spec, rank, train, client, [p.server for p in pieces],
                              meta["incarnation"])
        heartbeat = Heartbeat(ctx, cfg.scheduler, node, run.heartbeat_s, run.dead_after_s,
                              lambda: {**replica.progress, "token": token}, keys)
        sockets.callback(heartbeat.close)            # its thread closes its own socket
        feed = None
        if deals_chunks(run):
            feed = _chunk_feed(cfg, ctx, keys, meta, replica, heartbeat)
            sockets.callback(feed.close)
        work = (f"chunks of {run.chunk_batches} batches dealt" if feed is not None
                else f"{worker_steps(len(train), run, rank)} steps")
        say(f"{node}: joined the scheduler at {cfg.scheduler}; {run.mode} mode, {work} on "
            f"{about}; servers {', '.join(meta['servers'])}")
        replica.progress["ready"] = True             # its data loaded: it can start
        heartbeat.eager.set()                        # (wait_for_go: the first beats come fast)
        heartbeat.start()
        wait_for_go(heartbeat, run.start_timeout_s, node)
        replica.run(heartbeat, feed)
        heartbeat.beat_now()                         # say done at once
    p = replica.progress
    why = "stopped early: the scheduler said stop" if heartbeat.stop.is_set() else "done"
    say(f"{node}: {why} after {p['steps']} steps ({p['samples']:,} samples)")


def _run_settings(cfg: Config, meta: dict[str, Any]) -> Config:
    """The run's settings as the scheduler sent them, but for this host's data directory
    and cores, where given."""
    local = {k: getattr(cfg, k) for k in ("data_dir", "threads") if getattr(cfg, k)
             != getattr(Config(), k)}
    return replace(config.from_dict(meta["config"]), **local)


def _training_data(run: Config, meta: dict[str, Any], node: str) -> tuple[Dataset | CtrSplit, str]:
    """(the training split, a sentence saying what it is); ConfigError unless it is the
    scheduler's (as many samples of as many features)."""
    train, _, about = open_datasets(run)
    if run.model and len(train) != meta["n_train"]:
        raise ConfigError(f"{node}: its training file has {len(train):,} lines, the "
                          f"scheduler's {meta['n_train']:,}; give every node the same data")
    if not run.model and (len(train) != meta["n_train"]
                          or train.n_features != meta["model"]["n_inputs"]):
        raise ConfigError(f"{node}: its training data has {len(train)} samples of "
                          f"{train.n_features} features, the scheduler's "
                          f"{meta['n_train']} of {meta['model']['n_inputs']}; give every "
                          "node the same data")
    return train, about


def _chunk_feed(cfg: Config, ctx: zmq.Context, keys: Keys | None, meta: dict[str, Any],
                replica: Replica | SparseReplica, heartbeat: Heartbeat) -> ChunkFeed:
    """The feed of chunks the scheduler deals (async, ssp); each request carries the
    replica's counters, and a wait ends when the heartbeat has lost the scheduler."""
    identity = {k: meta[k] for k in ("rank", "incarnation", "token")}
    return ChunkFeed(ctx, cfg.scheduler, f"worker-{meta['rank']}", identity, replica.cfg.timeout_s,
                     replica.cfg.retries, lost=heartbeat.lost, keys=keys,
                     progress=lambda: {k: replica.progress[k] for k in protocol.COUNTERS})
