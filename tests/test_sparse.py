"""Sparse tables on the wire (ps/sparse.py, protocol's sparse ops, TableClient) and sparse
runs end to end (worker/sparse.py, the scheduler's evaluation, `downpour train --model`).

The server tests drive a real Server object with the run's token secret in process, frame
by frame, as its ROUTER would; the client and run tests start real processes."""

import json
import re
import subprocess
import time

import numpy as np
import pytest

from downpour.common.config import Config
from downpour.common.errors import ConfigError
from downpour.common.nn.layout import owners
from downpour.common.nn.model import model_layout
from downpour.common.training import check_cluster, model_spec
from downpour.common.wire import protocol
from downpour.common.wire.security import mint
from downpour.launch import CLI, child_env
from downpour.ps.server import Server

SECRET = b"s" * 32
IDENT = b"peer"
RUN_S = 120              # a whole small sparse run, start to end


def make_server(rank=0, shards=2, model="fm", optimizer="sgd", admit_after=1):
    cfg = Config(mode="async", model=model, data="criteo:unused", shards=shards, workers=2,
                 optimizer=optimizer, lr=0.5, embed_dim=3, embed_init=0.1, admit_after=admit_after)
    spec = model_spec(cfg, None)
    return Server(cfg, spec, rank, model_layout(spec).pieces(shards), secret=SECRET)


def owned(server, n=20, seed=0):
    """n sorted unique keys server owns."""
    keys = np.unique(np.random.default_rng(seed).integers(0, 2**62, 20 * n))
    return keys[owners(keys, server.cfg.shards) == server.rank][:n].astype("<i8")


def request(server, op, keys, rows=None, seq=1, token=True, **meta):
    header = {"op": op, "node": "worker-0", "seq": seq, "table": 0}
    if token:
        header["token"] = mint(SECRET, "worker", 0, 0)
    if meta:
        header["meta"] = meta
    return send(server, protocol.encode_sparse(header, keys, rows))


def send(server, frames):
    """(reply header, its rows or None) for `frames` as server.handle answers them."""
    _, replies = server.handle(IDENT, [bytes(f) for f in frames])
    [reply] = replies
    header, payload = protocol.decode([bytes(f) for f in reply.frames])
    rows = np.concatenate(protocol.payload(header, payload, header["n"])) if payload else None
    return header, rows


def table_state(server):
    return {k: v.copy() for k, v in server.tables.tables[0].export().items()}


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_pull_then_push_applies_the_rows_optimizer_and_an_evaluation_pull_changes_nothing():
    server = make_server()
    keys = owned(server)
    header, _ = request(server, "sparse_pull", keys, train=False)
    assert header["op"] == "ok" and header["n"] == len(keys) * 4
    assert server.tables.tables[0].stats()["keys_seen"] == 0          # an evaluation pull creates nothing
    header, rows = request(server, "sparse_pull", keys)
    rows = rows.reshape(len(keys), 4)
    assert header["op"] == "ok" and np.abs(rows).max() > 0            # embed_init 0.1
    grads = np.random.default_rng(1).standard_normal(rows.shape).astype(np.float32)
    header, _ = request(server, "sparse_push", keys, grads, seq=2)
    assert header["op"] == "ok" and header["meta"]["updated"] == len(keys)
    after = request(server, "sparse_pull", keys, train=False, seq=3)[1].reshape(rows.shape)
    assert np.array_equal(after, rows - np.float32(0.5) * grads)        # sgd, lr 0.5
    # the same push again (a retry: same seq) is answered, not applied
    assert request(server, "sparse_push", keys, grads, seq=2)[0]["meta"]["updated"] == 0
    assert np.array_equal(request(server, "sparse_pull", keys, train=False, seq=4)[1].reshape(rows.shape),
                          after)


def test_rows_do_not_depend_on_which_server_holds_them_or_the_number_of_servers():
    one, two = make_server(0, shards=1), make_server(1, shards=2)
    keys = owned(two)
    a = request(one, "sparse_pull", keys)[1]
    b = request(two, "sparse_pull", keys)[1]
    assert np.array_equal(a, b)


def bad_pushes(server, keys):
    """name -> (frames of a malformed push with a valid token)."""
    good = np.ones((len(keys), 4), np.float32)
    other = owned(make_server(1), n=3)
    nan = good.copy()
    nan[2, 1] = np.nan
    header = {"op": "sparse_push", "node": "worker-0", "seq": 9, "table": 0,
              "token": mint(SECRET, "worker", 0, 0)}
    enc = protocol.encode_sparse
    return {
        "unsorted keys": enc(header, keys[::-1].copy(), good),
        "duplicate keys": enc(header, np.r_[keys[:1], keys[:-1]].astype("<i8"), good),
        "a negative key": enc(header, np.r_[-5, keys[1:]].astype("<i8"), good),
        "another server's keys": enc(header, np.unique(np.r_[keys[:-3], other]).astype("<i8"), good),
        "rows of the wrong width": enc(header, keys, np.ones((len(keys), 3), np.float32)),
        "a row too few": enc(header, keys, good[:-1]),
        "NaN in a row": enc(header, keys, nan),
        "inf in a row": enc(header, keys, np.where(nan != nan, np.inf, nan).astype(np.float32)),
        "a keys frame cut short": [protocol.encode({**header, "keys": len(keys)},
                                                   good.reshape(-1))[0], keys.tobytes()[:-3],
                                   good.tobytes()],
        "no keys field": [protocol.encode(header, good.reshape(-1))[0], keys.tobytes(), good.tobytes()],
        "more keys than MAX_KEYS": [protocol.encode({**header, "keys": protocol.MAX_KEYS + 1})[0],
                                    keys.tobytes()],
        "an unknown table": enc({**header, "table": 7}, keys, good),
        "rows as float64": [protocol.encode({**header, "keys": len(keys)})[0], keys.tobytes(),
                            good.astype(np.float64).tobytes()],
    }


@pytest.mark.parametrize("case", list(bad_pushes(make_server(), owned(make_server()))))
def test_a_malformed_sparse_push_is_refused_and_changes_no_row(case):
    server = make_server()
    keys = owned(server)
    request(server, "sparse_pull", keys)                               # the rows exist
    before = table_state(server)
    header, _ = send(server, bad_pushes(server, keys)[case])
    assert (header["op"], header["code"]) == ("error", protocol.E_MALFORMED), header
    assert same(table_state(server), before)
    # and the server goes on: a good push still applies
    good = request(server, "sparse_push", keys, np.ones((len(keys), 4), np.float32), seq=20)[0]
    assert good["meta"]["updated"] == len(keys)


def test_training_pulls_and_pushes_need_a_workers_token():
    server = make_server()
    keys = owned(server)
    for op, rows in (("sparse_pull", None), ("sparse_push", np.ones((len(keys), 4), np.float32))):
        header, _ = request(server, op, keys, rows, token=False)
        assert header.get("code") == protocol.E_DENIED, (op, header)
    forged = {"op": "sparse_pull", "node": "worker-0", "seq": 1, "table": 0,
              "token": mint(b"x" * 32, "worker", 0, 0)}
    assert send(server, protocol.encode_sparse(forged, keys))[0]["code"] == protocol.E_DENIED
    assert server.tables.tables[0].stats()["keys_seen"] == 0


def test_admission_after_n_sightings_and_the_stats():
    server = make_server(admit_after=2)
    keys = owned(server, n=5)
    first = request(server, "sparse_pull", keys)[1]
    assert not first.any()                                            # seen once: zeros, no row
    request(server, "sparse_push", keys, np.ones((5, 4), np.float32), seq=2)
    second = request(server, "sparse_pull", keys, seq=3)[1]
    assert second.any()                                               # admitted now, at its init
    stats = send(server, [protocol.encode({"op": "stats", "node": "scheduler", "seq": 4,
                                           "table": 0})[0]])[0]["meta"]
    assert (stats["rows"], stats["admissions"], stats["ignored"]) == (5, 5, 5)
    assert stats["bytes_in"] > 0 and stats["bytes_out"] == 2 * 5 * 4 * 4


def test_row_staleness_counts_the_pushes_of_others_between_a_pull_and_a_push():
    server = make_server(shards=1)
    keys = owned(server, n=6)
    token = {rank: mint(SECRET, "worker", rank, 0) for rank in (0, 1)}

    def ask(rank, op, some, seq, rows=None):
        header = {"op": op, "node": f"worker-{rank}", "seq": seq, "table": 0, "token": token[rank]}
        assert send(server, protocol.encode_sparse(header, some, rows))[0]["op"] == "ok"
    ones = np.ones((6, 4), np.float32)
    ask(0, "sparse_pull", keys, 1)
    ask(1, "sparse_pull", keys[:4], 1)
    ask(1, "sparse_push", keys[:4], 2, ones[:4])          # reaches 4 of worker 0's rows
    ask(0, "sparse_push", keys, 2, ones)                 # 4 rows 1 push stale, 2 rows fresh
    assert server.tables.row_staleness == {0: 4 + 2, 1: 4}  # worker 1's 4 rows were fresh
    ask(0, "sparse_push", keys, 3, ones)                 # no pull of its own before: not counted
    assert sum(server.tables.row_staleness.values()) == 10


def test_sparse_settings_are_checked_before_a_run():
    with pytest.raises(ConfigError, match="give both --model and --data"):
        Config(mode="async", model="fm")
    with pytest.raises(ConfigError, match="criteo:DIR"):
        Config(mode="async", data="/tmp/x")
    with pytest.raises(ConfigError, match="--hidden"):
        Config(mode="async", model="lr", data="criteo:/x", hidden=(8,))
    with pytest.raises(ConfigError, match="drop --save"):
        Config(mode="async", model="lr", data="criteo:/x", save="m.npz")
    with pytest.raises(ConfigError, match="runs in --mode async"):
        check_cluster(Config(mode="sync", model="lr", data="criteo:/x"))
    with pytest.raises(ConfigError, match="hybrid is for sparse models"):
        check_cluster(Config(mode="hybrid", synthetic=1000))
    with pytest.raises(ConfigError, match="sgd, adagrad, adam"):
        make_server(optimizer="rmsprop")


# -- whole runs ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clicks(tmp_path_factory):
    out = tmp_path_factory.mktemp("clicks")
    subprocess.run([*CLI, "synth", "ctr", str(out), "--rows", "6000", "--seed", "3"], check=True,
                   env=child_env(), capture_output=True, timeout=RUN_S)
    return out


def train(tmp_path, clicks, *args):
    metrics = tmp_path / "m.jsonl"
    done = subprocess.run([*CLI, "train", "--mode", "async", "--workers", "2", "--shards", "2",
                           "--data", f"criteo:{clicks}", "--epochs", "2", "--batch-size", "128",
                           "--optimizer", "adam", "--lr", "0.003", "--progress", "none",
                           "--metrics", str(metrics), *map(str, args)],
                          env=child_env(), capture_output=True, text=True, timeout=RUN_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(metrics.read_text().splitlines()[-1])


@pytest.mark.timeout(2 * RUN_S)
def test_lr_and_fm_train_on_click_logs_and_report_their_tables(tmp_path, clicks):
    truth = json.loads((clicks / "truth.json").read_text())
    lr = train(tmp_path, clicks, "--model", "lr")
    fm = train(tmp_path, clicks, "--model", "fm", "--embed-dim", "8")
    for end in (lr, fm):
        assert end["samples"] == end["samples_asked"] == 2 * (6000 // 128) * 128
        assert truth["floor_logloss"] < end["test_logloss"] < truth["base_logloss"]
        assert 0.6 < end["test_auc"] < truth["floor_auc"]
        assert end["table_rows"] > 1000 and end["table_bytes"] > end["table_rows"] * 4
        assert end["bytes_pushed_per_sample"] > 39 * 4                # a row gradient per key
    assert fm["table_bytes"] > lr["table_bytes"]                       # 1 + 8 floats a row, not 1


@pytest.mark.timeout(2 * RUN_S)
def test_hybrid_holds_the_dense_part_in_step_and_lands_where_async_does(tmp_path, clicks):
    """hybrid (PERSIA): rows async, the bias sync: no dense staleness at all, rows a push
    or two stale, and the held-out logloss of the async run within noise."""
    hybrid = train(tmp_path, clicks, "--model", "fm", "--embed-dim", 8, "--mode", "hybrid")
    plain = train(tmp_path, clicks, "--model", "fm", "--embed-dim", 8)
    assert hybrid["mode"] == "hybrid" and hybrid["samples"] == hybrid["samples_asked"]
    assert hybrid["staleness_max"] == 0 and plain["staleness_max"] >= 1
    assert hybrid["row_staleness_max"] <= 4 and hybrid["row_staleness_p50"] == 0
    assert abs(hybrid["test_logloss"] - plain["test_logloss"]) < 0.01


@pytest.mark.timeout(2 * RUN_S)
def test_servers_beyond_the_dense_part_hold_tables_only_and_the_run_ends(tmp_path, clicks):
    """lr's dense part is 2 floats: of 3 servers, one holds rows only; it serves its keys'
    share and exits at the end with the others."""
    end = train(tmp_path, clicks, "--model", "lr", "--shards", "3", "--epochs", "1")
    assert end["shards"] == 3 and end["samples"] == end["samples_asked"]
    received = [end["nodes"][f"server-{i}"]["bytes_received"] for i in range(3)]
    assert min(received) > 0.2 * max(received)            # every server holds its share of keys


@pytest.mark.slow
@pytest.mark.timeout(4 * RUN_S)
def test_a_killed_server_is_replaced_with_its_table_rows_and_the_run_ends_as_undisturbed(
        tmp_path, nodes):
    """W2 S2 fm: one server is killed once both have checkpointed their tables, a spare
    takes its place from its checkpoint (its rows, their optimizer state), the workers
    follow it, and the held-out logloss ends within 0.005 of an undisturbed run's."""
    data = tmp_path / "clicks"
    subprocess.run([*CLI, "synth", "ctr", str(data), "--rows", "100000", "--seed", "2"],
                   check=True, env=child_env(), capture_output=True, timeout=RUN_S)
    run = ("--mode", "async", "--workers", 2, "--shards", 2, "--model", "fm", "--embed-dim", 8,
           "--data", f"criteo:{data}", "--epochs", 2, "--batch-size", 128, "--optimizer", "adam",
           "--lr", 0.003, "--progress", "none", "--dead-after-s", 1.5)
    undisturbed = train(tmp_path, data, "--model", "fm", "--embed-dim", 8)    # the same settings

    address, checkpoints = f"ipc://{tmp_path}/scheduler", tmp_path / "checkpoints"
    metrics = tmp_path / "killed.jsonl"
    scheduler = nodes("scheduler", "--bind", address, *run, "--metrics", metrics,
                      "--checkpoint-every-s", 0.3, "--progress", "lines")
    servers = [nodes("server", "--scheduler", address, "--bind", f"ipc://{tmp_path}/s{i}",
                     "--checkpoint-dir", checkpoints) for i in range(2)]
    workers = [nodes("worker", "--scheduler", address) for _ in range(2)]
    deadline = time.monotonic() + RUN_S
    while len(list(checkpoints.glob("table-0-server-*-of-2.npz"))) < 2:
        assert time.monotonic() < deadline and scheduler.poll() is None, "no table checkpoints"
        time.sleep(0.05)
    # a spare, standing by (every place is taken), registering again every 0.5 s
    spare = nodes("server", "--scheduler", address, "--bind", f"ipc://{tmp_path}/spare",
                  "--checkpoint-dir", checkpoints, "--resume", "--start-timeout-s", 1)
    servers[1].kill()
    _, said = scheduler.communicate(timeout=2 * RUN_S)
    assert scheduler.returncode == 0, said
    assert re.search(r"server-\d replaced, now at ipc://\S+/spare", said), said
    joined = spare.communicate(timeout=RUN_S)[1]
    restored = int(re.search(r"resumed ([\d,]+) table rows", joined).group(1).replace(",", ""))
    assert restored > 1000, joined
    for w in workers:
        assert w.wait(timeout=RUN_S) == 0
    end = json.loads(metrics.read_text().splitlines()[-1])
    assert end["samples"] == end["samples_asked"] and end["chunks_lost"] == 0
    assert end["table_rows"] > restored
    assert abs(end["test_logloss"] - undisturbed["test_logloss"]) < 0.005, (end, undisturbed)
