"""A worker of a sparse model (--model lr or fm): click logs streamed from disk, rows
pulled from the servers' tables, the dense bias on the pieces of the vector. Async
(Downpour), or hybrid (PERSIA): the same steps, but the dense push_pull is held by the
servers until every live worker has pushed that step (ps/piece.py's sync rule), while
the rows stay asynchronous.

Per step:

    the chunk's lines, parsed once     common/ctr.py: labels (n,), keys (n, F) int64
    a batch of them                    common/order.py file_chunk_batches
    dedup                              uniq (U,) sorted unique keys, inv (B, F)
    sparse_pull(uniq)                  rows (U, d), each key's row once (training pull:
                                       counts sightings, creates admitted rows)
    loss and gradients                 common/nn/sparse.py: d rows (U, d), d bias
    sparse_push(uniq, d rows)    }     in flight together: one summed gradient row per
    push_pull(d bias)            }     key, and the bias's gradient with the samples it
                                       covers (the servers count them for the records)

A replaced server (its tables restored from their checkpoint, ps/sparse.py) is followed
as dense workers follow one: a request in flight goes to the replacement at once. The
chunks come from the scheduler (node.ChunkFeed), as for dense async workers; a
chunk is a contiguous run of lines of the file, read and parsed when it is dealt, so
the file is never in memory. The rows a step uses are those pulled for it, so a row's
staleness is the pushes other workers made to it between this worker's pull and push:
at most one round trip's worth.
"""

from __future__ import annotations

import time

import numpy as np

from downpour.common.config import Config
from downpour.common.ctr import CtrSplit
from downpour.common.nn.model import Model, ModelSpec
from downpour.common.nn.sparse import CtrModel, bias_index, dedup
from downpour.common.order import file_chunk, file_chunk_batches
from downpour.common.wire import protocol
from downpour.common.wire.client import ShardClient, TableClient
from downpour.common.wire.node import ChunkFeed, Heartbeat, worker_progress
from downpour.common.wire.protocol import RemoteError

TABLE = 0                # the one table of lr and fm


class SparseReplica:
    """Worker `rank` of a sparse run: trains on the chunks dealt to it."""

    def __init__(self, cfg: Config, spec: ModelSpec, rank: int, data: CtrSplit,
                 client: ShardClient, tables: TableClient, piece_servers: list[int],
                 incarnation: int = 0):
        self.cfg, self.rank, self.data = cfg, rank, data
        self.client, self.tables = client, tables
        self.piece_servers = piece_servers            # the server that holds each dense piece
        self._incarnations: list[int] | None = None   # of the servers, as the scheduler last said
        self.ctr = CtrModel(cfg.model, cfg.embed_dim)
        self.dense = Model(spec, seed=cfg.seed, stream=rank)        # the bias, on the pieces
        self.bias_at = bias_index(self.dense)
        self.grad = np.zeros_like(self.dense.params)
        self.versions: tuple[int, ...] = (0,) * len(client.ranges)
        self.progress = worker_progress(rank, incarnation)

    def run(self, heartbeat: Heartbeat | None, feed: ChunkFeed) -> None:
        """Train every chunk the feed deals, or stop when the scheduler says so."""
        if heartbeat is not None:                  # follow replaced servers while waiting
            self.client.while_waiting = self.tables.while_waiting = \
                lambda: self._follow(heartbeat.reply)
        p = self.progress
        p["t_start"], started = time.time(), time.perf_counter()
        self.client.pull(self.dense.params)
        self.versions = tuple(self.client.versions)
        compute = cpu = 0.0
        n = self.data.lines
        while (chunk := feed.take()) is not None:
            batch = self.data.read(file_chunk(n, self.cfg, chunk)[1])
            batches = file_chunk_batches(n, self.cfg, chunk, len(batch.labels))
            for i, idx in enumerate(batches):
                if heartbeat is not None and heartbeat.said_stop():
                    feed.close()
                    break
                if heartbeat is not None:
                    self._follow(heartbeat.reply)
                last = i == len(batches) - 1 and not feed.more()
                t0, c0 = time.perf_counter(), time.process_time()
                bags = dedup(batch.keys[idx])
                t1 = time.perf_counter()
                rows = self.tables.pull(TABLE, bags.uniq)                  # waiting
                t2, c2 = time.perf_counter(), time.process_time()
                loss, d_rows, d_bias = self.ctr.loss_and_grads(
                    rows, bags, float(self.dense.params[self.bias_at]), batch.labels[idx])
                self.grad[self.bias_at] = d_bias
                compute += t1 - t0 + time.perf_counter() - t2
                cpu += time.process_time() - c2 + (c2 - c0)
                self._push(bags.uniq, d_rows, last, (len(idx), loss * len(idx)))
                p["samples"] += len(idx)
                p["steps"] += 1
                p["loss_sum"] += loss
                p["loss_count"] += 1
                p.update(compute_s=compute, cpu_s=cpu,
                         bytes_sent=self.client.bytes_sent + self.tables.bytes_sent,
                         bytes_received=self.client.bytes_received + self.tables.bytes_received,
                         waiting_s=max(0.0, time.perf_counter() - started - compute))
            else:
                continue
            break
        self.client.wait_sent()
        p["t_end"], p["done"] = time.time(), True

    def _follow(self, reply: dict) -> None:
        """Reconnect to any server that was replaced (the scheduler's heartbeat reply): its
        tables and its pieces of the bias."""
        if not reply.get("servers"):
            return
        known, self._incarnations = self._incarnations, reply.get("incarnations")
        self.tables.follow(reply, range(len(self.tables.addresses)), known)
        self.client.follow(reply, self.piece_servers, known)

    def _push(self, keys: np.ndarray, d_rows: np.ndarray, last: bool,
              covered: tuple[int, float]) -> None:
        """The rows' gradients and the bias's, in flight together; the new bias after."""
        self.tables.start_push(TABLE, keys, d_rows)
        # hybrid: the dense part is sync, every piece at the version whose step this is
        computed_on = min(self.versions) if self.cfg.mode == "hybrid" else self.versions
        self.client.start("push_pull", self.grad, computed_on, last, covered)
        try:
            self.tables.finish_sparse()
        finally:
            try:
                self.client.finish(self.dense.params)
            except RemoteError as e:             # a server restored behind this worker
                if e.code != protocol.E_STATE:
                    raise
                self.client.pull(self.dense.params)
        self.versions = tuple(self.client.versions)

