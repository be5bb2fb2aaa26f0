"""A server's sparse tables, and their answer to sparse_pull, sparse_push and stats.

    request --> Server.handle --(header has "table")--> Tables.handle_request --> Table

Stats of a table add the server's sparse traffic (payload bytes in and out, time spent
answering) to the table's own figures, for the run's end record.

A run with a sparse model (--model lr or fm) gives every server table 0: the rows of the
keys `downpour.common.nn.layout.owners` places on it, each of the model's row width
(1 for lr, 1 + embed_dim for fm), with the run's optimizer applied lazily per row
(ps/table.py). The model's dense part (its bias) stays on the pieces of the vector.

Guarantees:
- A request is fully validated before anything changes: the table exists; the keys
  frame holds `keys` int64s, sorted, unique, >= 0 and all owned by this server; a push
  carries exactly keys x dim finite float32s. Every fault of a sparse request is
  E_MALFORMED (wrong length or dtype included), and a refused request changes no row,
  no count and no optimizer state.
- With the run's secret, a push and a training pull need a worker's token (E_DENIED
  otherwise), as dense pushes do; an evaluation pull (meta train false) needs none and
  creates and counts nothing, so the scheduler can read the table without changing it.
- A push is applied at most once per (sender, seq): a retried push is answered, not
  applied again. A retried training pull counts its keys' sightings again (admission
  may come one sighting early for them); its rows are read again.
- Rows go out as a new array per reply (Table.pull copies), so a later push never
  changes a reply still being sent.
- Row staleness: a worker's push of a row counts the pushes of other workers that
  reached the row between that worker's training pull of it and its push (what its
  gradient missed); the histogram is in the stats. A row has no version of its own.
- Checkpoints (every table's rows, optimizer state and admission counts, and the pushes
  taken) are written atomically, one file per table and server; `restore` continues
  from them exactly, and only from this run's, of this server's rank and number of
  servers (which fix the keys it owns: a replacement owns exactly its predecessor's).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from downpour.common.checkpoint import check_not_replaced, load_arrays, load_meta, save_arrays
from downpour.common.config import Config
from downpour.common.errors import ConfigError, DataError, ProtocolError
from downpour.common.nn.layout import owners
from downpour.common.nn.sparse import CtrModel
from downpour.common.wire import protocol
from downpour.ps.piece import MAX_SENDERS, Reply, identify
from downpour.ps.rowopt import OPTIMIZERS
from downpour.ps.table import Table, check_keys


def make_tables(cfg: Config, rank: int) -> "Tables | None":
    """Server `rank`'s tables for the run `cfg` (None: a dense model, no tables)."""
    if not cfg.model:
        return None
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"--optimizer {cfg.optimizer}: sparse tables update rows with "
                          f"{', '.join(OPTIMIZERS)}; choose one of them")
    kwargs = cfg.optimizer_kwargs()
    if kwargs.pop("weight_decay"):
        raise ConfigError("--weight-decay is not applied to table rows; drop it for --model")
    hyper = {k: kwargs.pop(k) for k in ("eps", "betas", "initial_accumulator") if k in kwargs}
    if kwargs:
        raise ConfigError(f"optimizer_args {', '.join(kwargs)}: the table's {cfg.optimizer} "
                          "takes only eps, betas (adam) and initial_accumulator (adagrad)")
    dim = CtrModel(cfg.model, cfg.embed_dim).dim
    return Tables({0: Table(dim, cfg.optimizer, cfg.lr, init_std=cfg.embed_init, seed=cfg.seed,
                            admit_after=cfg.admit_after, max_rows=cfg.table_max_rows, **hyper)},
                  rank, cfg.shards, directory=cfg.checkpoint_dir)


class Tables:
    """The tables of server `rank` of `n_servers`, by number (the header's `table`)."""

    def __init__(self, tables: dict[int, Table], rank: int, n_servers: int,
                 secret: bytes | None = None, node: str = "", directory: str = "",
                 run_id: str = ""):
        """`directory`: where checkpoints go ("" = none); `run_id`: the run's, written into
        them (and set with `secret` by the server that holds the tables)."""
        self.tables, self.rank, self.n_servers = tables, rank, n_servers
        self.secret, self.node = secret, node or f"server-{rank}"
        self.directory, self.run_id = directory, run_id
        self.incarnation = 0          # the registration of the server holding them (a fence)
        self._incarnations: dict[int, int] = {}       # worker rank -> latest incarnation heard
        self.last_seq: dict[str, int] = {}            # sender -> seq of its last push taken
        self.bytes_in = self.bytes_out = 0              # payload bytes, as pieces count them
        self.busy_s = 0.0                               # s answering (serve measures it)
        # row staleness: sender -> (the keys of its last training pull, the pushes of others
        # to each since), and the histogram of staleness over every row pushed
        self._pulled: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.row_staleness: Counter = Counter()
        self.stopping = False                           # a shutdown came

    def handle_request(self, ident: bytes, header: dict, payload: list) -> list[Reply]:
        """The reply to a request for a table (its header decoded, its role permitted)."""
        self.bytes_in += sum(len(f) for f in payload)
        try:
            table = self.tables.get(header["table"])
            if table is None:
                raise protocol.error(protocol.E_MALFORMED, f"{self.node} holds tables "
                                     f"{sorted(self.tables)}, not {header['table']}")
            op = header["op"]
            if op == "shutdown":                      # the scheduler's: the run is over
                self.stopping = True
                return [Reply(ident, self._ok(header))]
            if op == "checkpoint":
                return [Reply(ident, self._ok(header, path=str(self.checkpoint()[header["table"]]),
                                              rows=table.stats()["rows"]))]
            if op == "stats":
                return [Reply(ident, self._ok(header, **table.stats(), bytes_in=self.bytes_in,
                                              row_staleness={str(k): v for k, v in
                                                             sorted(self.row_staleness.items())},
                                              bytes_out=self.bytes_out,
                                              busy_s=round(self.busy_s, 6)))]
            if op not in protocol.SPARSE_OPS:
                raise protocol.error(protocol.E_UNKNOWN_OP, f"a table answers "
                                     f"{', '.join(protocol.SPARSE_OPS)}, stats and shutdown, "
                                     f"not {op!r}")
            keys, rest = self._keys(header, payload)
            if op == "sparse_pull":
                return [Reply(ident, self._pull(table, header, keys))]
            return [Reply(ident, self._push(table, header, keys, rest))]
        except ProtocolError as e:
            return [Reply(ident, protocol.error_reply(e.code, str(e), header, self.node))]
        except (DataError, OSError) as e:              # a checkpoint that could not be written
            return [Reply(ident, protocol.error_reply(protocol.E_STATE, str(e), header, self.node))]

    # -- checkpoints ------------------------------------------------------------------------
    def checkpoint_path(self, number: int) -> Path:
        """Table `number`'s checkpoint: its name holds the server's rank and the number of
        servers, whose keys it owns (layout.owners)."""
        return Path(self.directory) / f"table-{number}-server-{self.rank}-of-{self.n_servers}.npz"

    def checkpoint(self) -> dict[int, Path]:
        """Write every table (rows, optimizer state, admission counts) and the pushes taken,
        each atomically; the paths. E_STATE without a directory; DataError (nothing
        written) if a newer server of this run has replaced this one."""
        if not self.directory:
            raise protocol.error(protocol.E_STATE, f"{self.node} has no --checkpoint-dir")
        paths = {}
        for number, table in self.tables.items():
            path = self.checkpoint_path(number)
            path.parent.mkdir(parents=True, exist_ok=True)
            check_not_replaced(path, self.run_id, self.incarnation, "table checkpoint")
            save_arrays(path, table.export(), {
                "run_id": self.run_id, "incarnation": self.incarnation, "rank": self.rank,
                "servers": self.n_servers, "table": number, "last_seq": self.last_seq})
            paths[number] = path
        return paths

    def saved_run(self) -> str | None:
        """The run id of table 0's checkpoint: None if there is none. DataError if the file
        is not a checkpoint."""
        path = self.checkpoint_path(0)
        return str(load_meta(path, "table checkpoint").get("run_id", "")) if path.is_file() else None

    def restore(self) -> None:
        """Continue every table from its checkpoint of this run; DataError if one is missing,
        of another run or server, or does not fit the run's table."""
        for number, table in list(self.tables.items()):
            path = self.checkpoint_path(number)
            arrays, meta = load_arrays(path, "table checkpoint")
            if (meta.get("run_id"), meta.get("rank"), meta.get("servers")) != \
                    (self.run_id, self.rank, self.n_servers):
                raise DataError(f"{path} holds server {meta.get('rank')} of {meta.get('servers')} "
                                f"of run {meta.get('run_id')}; this is server {self.rank} of "
                                f"{self.n_servers} of run {self.run_id}")
            restored = Table.restore(arrays)
            if restored.settings() != table.settings():
                raise DataError(f"{path}: a table of {restored.settings()}, the run's is "
                                f"{table.settings()}: resume with the same settings")
            self.tables[number] = restored
            self.last_seq = {str(k): int(v) for k, v in meta.get("last_seq", {}).items()}

    def sent(self, tracker, nbytes: int) -> None:
        """A reply went out (serve says so of every reply): its rows are an array of its
        own, which ZeroMQ keeps alive until sent, so there is nothing to wait for."""

    def _keys(self, header: dict, payload: list) -> tuple[np.ndarray, list]:
        keys, rest = protocol.sparse_keys(header, payload)
        try:
            check_keys(keys)
        except ValueError as e:
            raise protocol.error(protocol.E_MALFORMED, f"keys: {e}") from None
        if self.n_servers > 1 and len(keys):
            mine = owners(keys, self.n_servers) == self.rank
            if not mine.all():
                raise protocol.error(protocol.E_MALFORMED, f"{int((~mine).sum())} of the "
                                     f"{len(keys)} keys belong to other servers (key "
                                     f"{int(keys[~mine][0])} first); send each key to "
                                     "downpour.common.nn.layout.owners(keys, servers)")
        return keys, rest

    def _pull(self, table: Table, header: dict, keys: np.ndarray) -> list:
        train = header.get("meta", {}).get("train", True)
        if type(train) is not bool:
            raise protocol.error(protocol.E_MALFORMED, f"meta train must be true or false, "
                                 f"got {train!r}")
        sender = identify(self.secret, self._incarnations, header, needs_token=True) if train else None
        try:
            rows = table.pull(keys, train=train)
        except ValueError as e:                        # more new rows than the cap holds
            raise protocol.error(protocol.E_MALFORMED, str(e)) from None
        if sender is not None and (sender.key in self._pulled or len(self._pulled) < MAX_SENDERS):
            self._pulled[sender.key] = (keys.copy(), np.zeros(len(keys), np.int64))
        return self._ok(header, rows)

    def _push(self, table: Table, header: dict, keys: np.ndarray, rest: list) -> list:
        try:
            views = protocol.payload(header, rest, len(keys) * table.dim)
        except ProtocolError as e:
            raise protocol.error(protocol.E_MALFORMED, f"rows: {e}") from None
        grads = views[0] if len(views) == 1 else np.concatenate(views)
        grads = grads.reshape(len(keys), table.dim)
        if not np.isfinite(grads).all():
            raise protocol.error(protocol.E_MALFORMED, "the gradient rows hold NaN or infinite "
                                 "values; nothing was applied")
        sender = identify(self.secret, self._incarnations, header, needs_token=True)
        if header["seq"] <= self.last_seq.get(sender.key, -1):       # a retry: taken already
            return self._ok(header, updated=0, retried=True)
        if sender.key not in self.last_seq and len(self.last_seq) >= MAX_SENDERS:
            raise protocol.error(protocol.E_STATE, f"this table already keeps {MAX_SENDERS} "
                                 "senders' sequence numbers; it takes pushes from no new one")
        self.last_seq[sender.key] = header["seq"]
        self._count_staleness(sender.key, keys)
        return self._ok(header, updated=table.push(keys, grads))

    def _count_staleness(self, sender: str, keys: np.ndarray) -> None:
        """A push of `keys` by `sender`: its rows' staleness (the pushes of others that
        reached each row between this sender's training pull of it and now) into the
        histogram, and one more push on the rows every other sender has pulled."""
        pulled = self._pulled.pop(sender, None)
        if pulled is not None:
            where, hit = _find(pulled[0], keys)
            for value, count in enumerate(np.bincount(pulled[1][where[hit]])):
                if count:
                    self.row_staleness[value] += int(count)
        for other, others in self._pulled.items():
            where, hit = _find(others[0], keys)
            others[1][where[hit]] += 1

    def _ok(self, header: dict, payload: np.ndarray | None = None, **meta) -> list:
        reply = {"op": "ok", "node": self.node, "seq": header["seq"], "table": header["table"]}
        if meta:
            reply["meta"] = meta
        frames = protocol.encode(reply, None if payload is None else payload.reshape(-1))
        self.bytes_out += sum(len(f) for f in frames[1:])
        return frames


def _find(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(where each of `keys` is, or would be, in `sorted_keys`; whether it is there)."""
    where = np.minimum(np.searchsorted(sorted_keys, keys), max(len(sorted_keys) - 1, 0))
    return where, (sorted_keys[where] == keys) if len(sorted_keys) else np.zeros(len(keys), bool)
