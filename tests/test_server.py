"""The server: a piece's state (`PieceState`) driven directly, and a live server fed malformed messages."""

import multiprocessing
from dataclasses import replace
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from downpour.common.checkpoint import load_meta
from downpour.common.config import Config
from downpour.common.errors import ClusterError, DataError
from downpour.common.nn.model import ModelSpec, initial_params, model_layout
from downpour.common.wire import protocol
from downpour.common.wire.client import ShardClient
from downpour.common.wire.sockets import make_socket
from downpour.ps.piece import PieceState, Reply, worker_rank
from downpour.ps.server import Server, _resumed, standalone

SPEC = ModelSpec(n_inputs=6, n_outputs=3, hidden=(5,))          # 6*5+5 + 5*3+3 = 53 parameters
ASYNC = Config(mode="async", workers=1, shards=2, optimizer="sgd", lr=0.1)
SYNC = Config(mode="sync", workers=3, shards=2, optimizer="sgd", lr=0.1)
LR = np.float32(0.1)                     # SGD multiplies by lr as a float32 scalar
V = protocol.VERSION


def ranges(cfg: Config) -> list[tuple[int, int]]:
    return model_layout(SPEC).shard_ranges(cfg.shards)


def make_piece(cfg: Config = ASYNC, rank: int = 0, run_id: str = "") -> PieceState:
    lo, hi = ranges(cfg)[rank]
    return PieceState(cfg, SPEC, rank, lo, hi, run_id=run_id)


def request(op: str, seq: int, payload: np.ndarray | None = None, node: str = "worker-0",
            **fields) -> list[bytes]:
    """The frames of a request as a ROUTER would hand them over (bytes)."""
    return [bytes(f) for f in protocol.encode({"op": op, "node": node, "seq": seq, **fields}, payload)]


def answer(reply: Reply) -> tuple[bytes, dict, np.ndarray | None]:
    """(identity, header, a copy of the parameters or None) of one reply.

    Copied at once: a piece's parameter replies are views of its live parameters.
    """
    ident, frames = reply
    header, payload = protocol.decode(frames)
    params = np.concatenate(protocol.payload(header, payload, header["n"])) if payload else None
    return ident, header, params


def only(replies: list) -> tuple[dict, np.ndarray | None]:
    """The header and parameters of the single reply in `replies`."""
    assert len(replies) == 1, replies
    return answer(replies[0])[1:]


def push(piece: PieceState, grad: np.ndarray, seq: int, clock: int, node: str = "worker-0",
         op: str = "push", ident: bytes = b"peer") -> list:
    return piece.handle(ident, request(op, seq, grad, node=node, piece=piece.rank, clock=clock))


def pull(piece: PieceState) -> tuple[dict, np.ndarray]:
    return only(piece.handle(b"peer", request("pull", 0, node="tool", piece=piece.rank)))


def stats(piece: PieceState) -> dict:
    header, _ = only(piece.handle(b"peer", request("stats", 0, node="tool")))
    return header["meta"]


def error_code(replies: list) -> int:
    header, _ = only(replies)
    assert header["op"] == "error", header
    return header["code"]


def grads(n: int, count: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) for _ in range(count)]


# -- async ---------------------------------------------------------------------------------

def test_worker_rank():
    assert worker_rank("worker-3") == 3
    assert worker_rank("worker-0") == 0
    odd = ("server-1", "worker-", "worker-x", "worker--1", "scheduler", "worker-\u00b2", "worker-\u0663")
    for node in odd:                                  # \u00b2 is "2" superscript, \u0663 Arabic-Indic 3
        assert worker_rank(node) is None, node


def test_initial_params_are_the_slice_of_the_single_process_vector():
    full = initial_params(SPEC, ASYNC.seed)
    assert ranges(ASYNC) == [(0, 26), (26, 53)]
    for rank, (lo, hi) in enumerate(ranges(ASYNC)):
        header, params = pull(make_piece(ASYNC, rank))
        assert header["op"] == "ok" and header["clock"] == 0
        assert params.tobytes() == full[lo:hi].tobytes()
    other = replace(ASYNC, seed=5)
    assert pull(make_piece(other, 1))[1].tobytes() == initial_params(SPEC, 5)[26:53].tobytes()


def test_async_push_applies_sgd_exactly_and_bumps_the_version():
    piece = make_piece(ASYNC, 1)
    p0 = piece.params.copy()
    g1, g2 = grads(piece.hi - piece.lo, 2)
    header, params = only(push(piece, g1, seq=1, clock=0))
    assert header == {"v": protocol.VERSION, "op": "ok", "node": "server-1", "seq": 1, "clock": 1}
    assert params is None
    p1 = p0 - g1 * LR
    assert piece.params.tobytes() == p1.tobytes()

    header, params = only(push(piece, g2, seq=2, clock=1, op="push_pull"))
    p2 = p1 - g2 * LR
    assert header["clock"] == 2 and params.tobytes() == p2.tobytes()
    header, params = pull(piece)
    assert header["clock"] == 2 and params.tobytes() == p2.tobytes()


def test_push_split_over_several_frames_is_applied_like_one(monkeypatch):
    one = make_piece(ASYNC, 1)
    (g,) = grads(one.hi - one.lo, 1)
    push(one, g, seq=1, clock=0)
    monkeypatch.setattr(protocol, "MAX_FRAME", 12)
    many = make_piece(ASYNC, 1)
    frames = request("push", 1, g, piece=1, clock=0)
    assert len(frames) == 1 + 9                            # 27 float32 = 9 frames of 3
    assert only(many.handle(b"peer", frames))[0]["clock"] == 1
    assert many.params.tobytes() == one.params.tobytes()


def test_a_retried_push_is_answered_but_not_applied_twice():
    piece = make_piece()
    g1, g2 = grads(piece.hi - piece.lo, 2)
    push(piece, g1, seq=5, clock=0)
    after_one = piece.params.copy()
    header, params = only(push(piece, g1, seq=5, clock=0, op="push_pull"))    # the retry
    assert header["op"] == "ok" and header["seq"] == 5 and header["clock"] == 1
    assert params.tobytes() == after_one.tobytes() == piece.params.tobytes()
    header, _ = only(push(piece, g2, seq=4, clock=0))                          # older still
    assert header["op"] == "ok" and piece.version == 1
    assert only(push(piece, g1, seq=5, clock=1, node="worker-1"))[0]["clock"] == 2   # seqs are per node
    assert only(push(piece, g2, seq=6, clock=2))[0]["clock"] == 3                   # a new seq is applied
    assert piece.params.tobytes() == ((after_one - g1 * LR) - g2 * LR).tobytes()
    assert stats(piece)["pushes"] == 3


def test_staleness_is_recorded_and_reported():
    piece = make_piece()
    g = grads(piece.hi - piece.lo, 3)
    push(piece, g[0], seq=1, clock=0)
    push(piece, g[1], seq=2, clock=1)
    push(piece, g[2], seq=1, clock=0, node="worker-1")         # computed on version 0, applied at 2
    meta = stats(piece)
    assert meta["staleness"] == {"0": 2, "2": 1}
    assert meta["version"] == 3 and meta["pushes"] == 3 and meta["dropped"] == 0
    assert meta["lr"] == pytest.approx(0.1) and meta["live"] == [0]
    assert meta["bytes_in"] == 3 * 4 * 26                    # payload bytes


@pytest.mark.parametrize("fields, code", [
    ({"piece": 0, "clock": 1}, protocol.E_STATE),              # ahead of the version
    ({"piece": 1, "clock": 0}, protocol.E_PIECE),
    ({"clock": 0}, protocol.E_PIECE),                          # no piece at all
])
def test_push_refused_changes_nothing(fields, code):
    piece = make_piece()
    before = piece.params.copy()
    (g,) = grads(piece.hi - piece.lo, 1)
    for op in ("push", "push_pull"):
        assert error_code(piece.handle(b"peer", request(op, 1, g, **fields))) == code
    assert piece.params.tobytes() == before.tobytes() and piece.version == 0
    assert piece.last_seq == {}
    assert only(push(piece, g, seq=1, clock=0))[0]["clock"] == 1   # the seq was not used up


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e19])   # 3e19 squared overflows float32
def test_non_finite_gradient_is_refused(bad):
    piece = make_piece()
    before = piece.params.copy()
    (g,) = grads(piece.hi - piece.lo, 1)
    g[7] = bad
    assert error_code(push(piece, g, seq=1, clock=0)) == protocol.E_PAYLOAD
    assert piece.params.tobytes() == before.tobytes() and piece.version == 0


def test_a_server_answers_a_piece_it_does_not_hold_with_the_requests_seq():
    """So the client raises E_PIECE at once instead of waiting for a reply it never matches."""
    server = Server(ASYNC, SPEC, 0, model_layout(SPEC).pieces(ASYNC.shards))
    piece, replies = server.handle(b"p", request("pull", 7, piece=1))
    header = only(replies)[0]
    assert piece is None and (header["seq"], header["code"]) == (7, protocol.E_PIECE)


def test_pull_for_another_piece_and_unknown_op():
    piece = make_piece()
    assert error_code(piece.handle(b"p", request("pull", 1, piece=1))) == protocol.E_PIECE
    for op in ("register", "heartbeat", "_push", "__init__", "ok", "error", "PULL"):
        assert error_code(piece.handle(b"p", request(op, 1, piece=0))) == protocol.E_UNKNOWN_OP


def test_error_reply_goes_to_the_sender_with_its_seq():
    piece = make_piece()
    ((ident, frames),) = piece.handle(b"sender", request("nope", 41))
    header, _ = protocol.decode(frames)
    assert ident == b"sender" and header["seq"] == 41 and header["node"] == "server-0"


# -- sync ----------------------------------------------------------------------------------

def mean_in_rank_order(gs: list[np.ndarray]) -> np.ndarray:
    """The server's mean: a sum in rank order, then times float32(1/k)."""
    total = gs[0].copy()
    for g in gs[1:]:
        total += g
    return total * np.float32(1.0 / len(gs)) if len(gs) > 1 else total


def test_sync_waits_for_every_worker_then_applies_the_mean_once():
    piece = make_piece(SYNC, 1)
    p0 = piece.params.copy()
    g = grads(piece.hi - piece.lo, 3)
    assert push(piece, g[0], seq=1, clock=0, node="worker-0", ident=b"w0") == []
    assert push(piece, g[2], seq=1, clock=0, node="worker-2", ident=b"w2", op="push_pull") == []
    assert piece.version == 0 and piece.params.tobytes() == p0.tobytes()
    replies = [answer(r) for r in push(piece, g[1], seq=1, clock=0, node="worker-1", ident=b"w1")]
    expected = p0 - mean_in_rank_order(g) * LR
    assert piece.params.tobytes() == expected.tobytes()
    assert [ident for ident, _, _ in replies] == [b"w0", b"w1", b"w2"]
    assert all(h["op"] == "ok" and h["clock"] == 1 and h["seq"] == 1 for _, h, _ in replies)
    assert [p is None for _, _, p in replies] == [True, True, False]     # only worker-2 asked push_pull
    assert replies[2][2].tobytes() == expected.tobytes()

    # a straggler's push for version 0, now applied: answered, counted, dropped
    header, _ = only(push(piece, g[0], seq=2, clock=0, node="worker-2"))
    assert header["op"] == "ok" and header["meta"] == {"dropped": True} and header["clock"] == 1
    assert piece.params.tobytes() == expected.tobytes()
    meta = stats(piece)
    assert meta["dropped"] == 1 and meta["pushes"] == 3 and meta["staleness"] == {"0": 3}


def test_sync_retry_while_gathering_is_answered_once_at_release():
    piece = make_piece(SYNC, 0)
    g = grads(piece.hi - piece.lo, 3)
    assert push(piece, g[0], seq=1, clock=0, node="worker-0", ident=b"old") == []
    assert push(piece, g[0], seq=1, clock=0, node="worker-0", ident=b"new") == []   # retried
    assert push(piece, g[1], seq=1, clock=0, node="worker-1", ident=b"w1") == []
    replies = push(piece, g[2], seq=1, clock=0, node="worker-2", ident=b"w2")
    assert [ident for ident, _ in replies] == [b"new", b"w1", b"w2"]
    assert piece.version == 1


def test_sync_push_from_a_non_worker_is_refused():
    piece = make_piece(SYNC, 0)
    (g,) = grads(piece.hi - piece.lo, 1)
    for node in ("tool", "worker-3", "worker-\u00b2"):          # rank >= workers; a digit int() refuses
        assert error_code(push(piece, g, seq=1, clock=0, node=node)) == protocol.E_MALFORMED
    assert piece.version == 0 and piece._waiting == {}


def test_control_live_releases_a_version_missing_a_dead_worker():
    piece = make_piece(SYNC, 0)
    p0 = piece.params.copy()
    g = grads(piece.hi - piece.lo, 2)
    assert push(piece, g[0], seq=1, clock=0, node="worker-0", ident=b"w0") == []
    assert push(piece, g[1], seq=1, clock=0, node="worker-1", ident=b"w1") == []
    replies = [answer(r) for r in piece.handle(b"sched", request("control", 3, node="scheduler",
                                                                  meta={"live": [0, 1]}))]
    assert [(ident, h["op"], h["seq"]) for ident, h, _ in replies] == [
        (b"sched", "ok", 3), (b"w0", "ok", 1), (b"w1", "ok", 1)]
    assert piece.version == 1
    assert piece.params.tobytes() == (p0 - mean_in_rank_order(g) * LR).tobytes()
    assert stats(piece)["live"] == [0, 1]


def test_control_live_with_nothing_waiting_releases_nothing():
    piece = make_piece(SYNC, 0)
    replies = piece.handle(b"sched", request("control", 1, node="scheduler", meta={"live": [1]}))
    assert len(replies) == 1 and piece.version == 0


# -- control -------------------------------------------------------------------------------

def test_control_lr_scale_changes_the_effective_lr():
    piece = make_piece()
    p0 = piece.params.copy()
    (g,) = grads(piece.hi - piece.lo, 1)
    header, _ = only(piece.handle(b"s", request("control", 1, node="scheduler", meta={"lr_scale": 0.5})))
    assert header["op"] == "ok"
    assert stats(piece)["lr"] == pytest.approx(0.05)
    push(piece, g, seq=1, clock=0)
    assert piece.params.tobytes() == (p0 - g * np.float32(0.1 * 0.5)).tobytes()


@pytest.mark.parametrize("meta", [
    {"lr_scale": 0}, {"lr_scale": -1.0}, {"lr_scale": float("nan")}, {"lr_scale": float("inf")},
    {"lr_scale": "2"}, {"lr_scale": True}, {"lr_scale": None},
    {"live": [protocol.MAX_WORKERS]}, {"live": [-1]}, {"live": 0}, {"live": ["0"]},
    {"live": [0.0]}, {"lr_scale": 0.5, "live": [1 << 20]},
])
def test_bad_control_values_are_malformed(meta):
    piece = make_piece()
    assert error_code(piece.handle(b"s", request("control", 1, node="scheduler", meta=meta))) \
        == protocol.E_MALFORMED
    assert piece.schedule.scale == 1.0 and piece.live == {0}


def test_a_sync_piece_takes_only_the_ranks_of_its_global_batch():
    """Sync splits each global batch in W slices: rank W has no slice. Async and ssp take
    workers that join mid-run, with new ranks."""
    piece = make_piece(SYNC)
    assert error_code(piece.handle(b"s", request("control", 1, node="scheduler",
                                                 meta={"live": [0, 3]}))) == protocol.E_MALFORMED
    assert piece.live == {0, 1, 2}
    ssp = make_piece(replace(SYNC, mode="ssp", staleness=1))
    header, _ = only(ssp.handle(b"s", request("control", 1, node="scheduler", meta={"live": [0, 5]})))
    assert header["op"] == "ok" and ssp.live == {0, 5}


# -- checkpoints ---------------------------------------------------------------------------

def test_checkpoint_and_restore_continue_bit_identically(tmp_path):
    cfg = replace(ASYNC, optimizer="adam", lr=0.01, checkpoint_dir=str(tmp_path))
    original = make_piece(cfg, 1, run_id="0123abcd")
    g = grads(original.hi - original.lo, 6)
    for i in range(3):
        push(original, g[i], seq=i + 1, clock=i)
    push(original, g[0], seq=1, clock=1, node="worker-7")                  # staleness 2
    path = original.checkpoint()
    assert path == tmp_path / "piece-26-53.npz" and path.is_file()
    assert load_meta(path)["run_id"] == "0123abcd"

    resumed = make_piece(cfg, 1, run_id="0123abcd")
    assert resumed.saved_run() == "0123abcd"
    resumed.restore()
    assert resumed.version == original.version == 4
    assert resumed.params.tobytes() == original.params.tobytes()
    assert stats(resumed)["staleness"] == stats(original)["staleness"] == {"0": 3, "2": 1}
    assert only(push(resumed, g[5], seq=3, clock=4))[0]["clock"] == 4      # a retry, remembered
    for i in range(3, 6):
        for piece in (original, resumed):
            assert only(push(piece, g[i], seq=i + 1, clock=i, op="push_pull"))[0]["clock"] == i + 2
        assert resumed.params.tobytes() == original.params.tobytes()
    assert not np.array_equal(resumed.params, initial_params(SPEC, cfg.seed)[26:53])


def test_checkpoint_op_writes_the_file(tmp_path):
    piece = make_piece(replace(ASYNC, checkpoint_dir=str(tmp_path / "new")))
    header, _ = only(piece.handle(b"s", request("checkpoint", 2, node="scheduler")))
    assert header["op"] == "ok"
    assert Path(header["meta"]["path"]) == tmp_path / "new" / "piece-0-26.npz"
    assert Path(header["meta"]["path"]).is_file()


def test_restore_refuses_a_checkpoint_of_another_range(tmp_path):
    cfg = replace(ASYNC, checkpoint_dir=str(tmp_path))
    make_piece(cfg, 0).checkpoint()
    wrong = PieceState(cfg, SPEC, 0, 0, 27)              # piece 0, but another range
    before = wrong.params.copy()
    with pytest.raises(DataError, match=r"no checkpoint for piece \[0, 27\).*piece-0-26.npz"):
        wrong.restore()
    assert wrong.params.tobytes() == before.tobytes()
    (tmp_path / "piece-0-26.npz").rename(tmp_path / "piece-26-53.npz")
    with pytest.raises(DataError, match="resume with the same model"):
        make_piece(cfg, 1).restore()                      # piece 1 reading piece 0's file
    with pytest.raises(DataError, match="no checkpoint for piece"):
        make_piece(cfg, 0).restore()


def test_restore_refuses_a_checkpoint_of_another_run(tmp_path):
    cfg = replace(ASYNC, checkpoint_dir=str(tmp_path))
    make_piece(cfg, 0, run_id="aaaa").checkpoint()
    other = make_piece(cfg, 0, run_id="bbbb")
    with pytest.raises(DataError, match="a checkpoint of run aaaa, this piece belongs to run bbbb"):
        other.restore()
    assert other.params.tobytes() == initial_params(SPEC, cfg.seed)[0:26].tobytes()


def trained_server(cfg: Config, rank: int, run_id: str, pushes: int = 3) -> Server:
    """Server `rank` of run `run_id` after `pushes` pushes to each of its pieces, checkpointed."""
    server = Server(cfg, SPEC, rank, model_layout(SPEC).pieces(cfg.shards, cfg.piece_elements),
                    run_id)
    for i, piece in server.pieces.items():
        for seq, g in enumerate(grads(piece.hi - piece.lo, pushes, seed=i), start=1):
            assert only(push(piece, g, seq=seq, clock=seq - 1))[0]["op"] == "ok"
    server.close()                                   # checkpoints every piece, as on shutdown
    return server


def test_resume_continues_this_runs_checkpoints_bit_identically(tmp_path):
    cfg = replace(ASYNC, optimizer="adam", lr=0.01, checkpoint_dir=str(tmp_path))
    before = trained_server(cfg, 1, "aaaa")
    again = Server(cfg, SPEC, 1, model_layout(SPEC).pieces(cfg.shards), "aaaa")
    assert again.resume() == "" and again.resumed == [1]
    assert _resumed(again) == ", resumed at version 3"
    assert again.pieces[1].params.tobytes() == before.pieces[1].params.tobytes()
    assert again.pieces[1].opt.t == before.pieces[1].opt.t == 3


def test_resume_ignores_another_runs_checkpoints_and_starts_fresh(tmp_path):
    """A previous run's leftovers on the same volume (a container restarted with --resume
    for a new run): named in one line, never continued, nothing raised."""
    cfg = replace(ASYNC, checkpoint_dir=str(tmp_path))
    trained_server(cfg, 1, "aaaa")
    fresh = Server(cfg, SPEC, 1, model_layout(SPEC).pieces(cfg.shards), "bbbb")
    assert fresh.resume() == f"server-1: ignores checkpoint(s) of run aaaa in {tmp_path} and starts fresh"
    assert fresh.resumed == [] and _resumed(fresh) == "" and fresh.version == 0
    assert fresh.pieces[1].params.tobytes() == initial_params(SPEC, cfg.seed)[26:53].tobytes()
    fresh.close()                                    # its own checkpoint replaces the leftover
    assert load_meta(tmp_path / "piece-26-53.npz")["run_id"] == "bbbb"


def test_resume_without_a_checkpoint_of_this_run_starts_fresh(tmp_path):
    cfg = replace(ASYNC, checkpoint_dir=str(tmp_path))
    fresh = Server(cfg, SPEC, 0, model_layout(SPEC).pieces(cfg.shards), "bbbb")
    assert fresh.resume() == f"server-0: no checkpoint of run bbbb in {tmp_path}: starting fresh"
    assert fresh.resumed == [] and fresh.version == 0
    assert fresh.pieces[0].params.tobytes() == initial_params(SPEC, cfg.seed)[0:26].tobytes()


def test_resume_of_some_pieces_says_which_start_fresh(tmp_path):
    """One server holding two pieces, only one of which this run has checkpointed."""
    cfg = replace(ASYNC, checkpoint_dir=str(tmp_path))
    trained_server(cfg, 0, "aaaa")                           # piece [0, 26) of run aaaa
    pieces = model_layout(SPEC).pieces(1, 27)                # one server: [0, 26) and [26, 53)
    assert [(p.lo, p.hi) for p in pieces] == [(0, 26), (26, 53)]
    server = Server(replace(cfg, shards=1), SPEC, 0, pieces, "aaaa")
    assert server.resume() == (f"server-0: no checkpoint of run aaaa in {tmp_path} for piece(s) 1: "
                               "starting them fresh")
    assert server.resumed == [0] and _resumed(server) == ", resumed 1 of 2 pieces at version 3"
    assert (server.pieces[0].version, server.pieces[1].version) == (3, 0)


def test_resume_refuses_a_checkpoint_of_this_run_that_does_not_fit(tmp_path):
    cfg = replace(ASYNC, checkpoint_dir=str(tmp_path))
    trained_server(cfg, 0, "aaaa")
    (tmp_path / "piece-0-26.npz").rename(tmp_path / "piece-26-53.npz")     # piece 0's state
    server = Server(cfg, SPEC, 1, model_layout(SPEC).pieces(cfg.shards), "aaaa")
    with pytest.raises(DataError, match="resume with the same model and number of shards"):
        server.resume()
    assert server.pieces[1].params.tobytes() == initial_params(SPEC, cfg.seed)[26:53].tobytes()


def test_checkpoint_op_without_a_directory_is_e_state():
    piece = make_piece()
    assert error_code(piece.handle(b"s", request("checkpoint", 1, node="scheduler"))) == protocol.E_STATE


def test_shutdown_op_stops_the_piece():
    piece = make_piece()
    header, _ = only(piece.handle(b"s", request("shutdown", 1, node="scheduler")))
    assert header["op"] == "ok" and piece.stopping


# -- a live server -------------------------------------------------------------------------

WAIT_S = 20.0                # an upper bound for one reply (the first includes process start)


@pytest.fixture
def spawn_server(socket_dir):
    """start(cfg, rank) -> (address, process): `standalone` in a spawned process at an ipc:// path.

    Every process started is ended when the test ends, whatever happened.
    """
    procs = []

    def start(cfg: Config, rank: int):
        address = f"ipc://{socket_dir / f's{len(procs)}.ipc'}"
        proc = multiprocessing.get_context("spawn").Process(
            target=standalone, args=(cfg, SPEC, rank, address), daemon=True)
        proc.start()
        procs.append(proc)
        return address, proc

    try:
        yield start
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(10)


@pytest.fixture
def dealer():
    """A raw DEALER (linger 0) in its own context."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        yield sock
    finally:
        sock.close()
        ctx.term()


def exchange(sock: zmq.Socket, frames: list) -> tuple[dict, np.ndarray | None]:
    """Send `frames`, wait (bounded) for the one reply; its header and a copy of its parameters."""
    sock.send_multipart(frames)
    assert sock.poll(1000 * WAIT_S), "the server did not answer"
    return answer((b"", sock.recv_multipart()))[1:]


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_live_server_survives_malformed_messages(spawn_server, dealer, mode):
    """Invariant 5 (docs/invariants.md): nothing malformed crashes a server or changes its weights.

    In sync mode with one worker, a push from worker-0 completes its version at once.
    """
    address, proc = spawn_server(replace(ASYNC, mode=mode, timeout_s=5.0), 1)
    dealer.connect(address)
    lo, hi = ranges(ASYNC)[1]
    n = hi - lo

    def frames(op="push", seq=1, payload=None, **fields):
        return request(op, seq, payload, **{"piece": 1, "clock": 0, **fields})

    def raw(**header):
        return [msgpack.packb(header)]

    header, before = exchange(dealer, frames("pull"))
    assert header["op"] == "ok" and header["clock"] == 0
    assert before.tobytes() == initial_params(SPEC, ASYNC.seed)[lo:hi].tobytes()

    (g,) = grads(n, 1)
    head = frames(payload=g)[0]                      # a valid push header: dtype <f4, n = 27
    nan = g.copy()
    nan[3] = np.nan
    malformed = {
        "garbage bytes": ([b"\xc1\x00garbage\xff"], protocol.E_MALFORMED),
        "empty header frame": ([b""], protocol.E_MALFORMED),
        "truncated payload": ([head, g.tobytes()[:-4]], protocol.E_PAYLOAD),
        "payload cut mid-item": ([head, g.tobytes()[:-1]], protocol.E_PAYLOAD),
        "push without payload": ([head], protocol.E_PAYLOAD),
        "wrong dtype": (raw(v=V, op="push", node="worker-0", seq=1, piece=1, clock=0, dtype="<f8", n=n)
                        + [g.astype(np.float64).tobytes()], protocol.E_PAYLOAD),
        "wrong length (long)": (frames(payload=np.append(g, np.float32(1))), protocol.E_PAYLOAD),
        "wrong length (short)": (frames(payload=g[:-1]), protocol.E_PAYLOAD),
        "unknown operation": (frames("explode"), protocol.E_UNKNOWN_OP),
        "oversized header": (raw(v=V, op="pull", node="x", seq=1, msg="x" * protocol.MAX_HEADER),
                             protocol.E_MALFORMED),
        "wrong protocol version": (raw(v=V + 1, op="pull", node="x", seq=1), protocol.E_VERSION),
        "header is a msgpack list": ([msgpack.packb([1, "pull", "x", 1])], protocol.E_MALFORMED),
        "unknown header field": (raw(v=V, op="pull", node="x", seq=1, secret=1), protocol.E_MALFORMED),
        "push with NaN": (frames(payload=nan), protocol.E_PAYLOAD),
        "push with inf": (frames(payload=np.full(n, np.inf, np.float32)), protocol.E_PAYLOAD),
        "wrong piece": (frames(payload=g, piece=0), protocol.E_PIECE),
        "clock ahead": (frames(payload=g, clock=9), protocol.E_STATE),
        "infinite lr_scale": (frames("control", meta={"lr_scale": float("inf")}), protocol.E_MALFORMED),
    }
    if mode == "sync":                               # not worker-<rank>: int("\u00b2") would raise
        malformed["push from a non-worker"] = (frames(payload=g, node="worker-\u00b2"), protocol.E_MALFORMED)
    for what, (message, code) in malformed.items():
        header, params = exchange(dealer, message)
        assert (header["op"], header.get("code")) == ("error", code), what
        assert params is None, what

    # a frame over the server's limit (a header, or its largest piece) costs the peer its
    # connection (ZMQ_MAXMSGSIZE), before any of it is read
    big = dealer.context.socket(zmq.DEALER)
    try:
        big.linger = 0
        big.connect(address)
        big.send_multipart(raw(v=V, op="pull", node="x", seq=1, msg="x" * 4 * protocol.MAX_HEADER))
        assert not big.poll(500), "an oversized header was answered"
    finally:
        big.close()

    header, after = exchange(dealer, frames("pull", seq=2))
    assert header["op"] == "ok" and header["clock"] == 0
    assert after.tobytes() == before.tobytes()
    meta = exchange(dealer, frames("stats", seq=3))[0]["meta"]
    assert meta["version"] == 0 and meta["pushes"] == 0 and meta["lr"] == pytest.approx(0.1)

    header, params = exchange(dealer, frames("push_pull", seq=4, payload=g))
    assert header["op"] == "ok" and header["clock"] == 1
    assert params.tobytes() == (before - g * LR).tobytes()

    assert exchange(dealer, frames("shutdown", seq=5))[0]["op"] == "ok"
    proc.join(WAIT_S)
    assert proc.exitcode == 0


def test_shard_client_against_live_servers(spawn_server):
    """Two shards: the client's verbs reproduce single-process SGD; a retry is not applied twice."""
    cfg = replace(ASYNC, timeout_s=5.0)
    servers = [spawn_server(cfg, rank) for rank in range(cfg.shards)]
    full = initial_params(SPEC, cfg.seed)
    ctx = zmq.Context()
    try:
        with ShardClient([a for a, _ in servers], ranges(cfg), "worker-0", timeout=WAIT_S,
                         retries=0, ctx=ctx) as client:
            params = np.empty_like(full)
            assert client.pull(params) == 0
            assert params.tobytes() == full.tobytes()
            (g,) = grads(full.size, 1)
            assert client.push_pull(g, 0, params) == 1
            assert params.tobytes() == (full - g * LR).tobytes()
            client.seq -= 2                                  # resend both shards' last seq: a retry
            assert client.push(g, 0) == 1
            assert [h["meta"]["pushes"] for h in client.call_all("stats")] == [1, 1]
            assert all(h["op"] == "ok" for h in client.call_all("shutdown"))
    finally:
        ctx.term()
    for _, proc in servers:
        proc.join(WAIT_S)
        assert proc.exitcode == 0


def test_shard_client_raises_cluster_error_when_nothing_listens():
    ctx = zmq.Context()
    try:
        probe = ctx.socket(zmq.ROUTER)
        probe.setsockopt(zmq.LINGER, 0)
        port = probe.bind_to_random_port("tcp://127.0.0.1")
        probe.close()                                        # the port is free again: nobody listens
        address = f"tcp://127.0.0.1:{port}"
        with ShardClient([address], [(0, 53)], "worker-0", timeout=0.2, retries=1, ctx=ctx) as client:
            with pytest.raises(ClusterError, match=f"piece 0 at {address}.*2 attempts"):
                client.pull(np.empty(53, np.float32))
    finally:
        ctx.term()


def test_shard_client_sends_the_pieces_of_one_server_in_order_on_one_connection(tmp_path):
    """Pieces [0, 3) held by one server reach it from one peer, in piece order (so it can
    apply each while the next arrives); replies are matched to pieces by seq, in any order;
    moving a piece to another address connects there."""
    ctx = zmq.Context()
    try:
        here, there = f"ipc://{tmp_path}/a", f"ipc://{tmp_path}/b"
        server = make_socket(ctx, zmq.ROUTER, here, bind=True)
        with ShardClient([here] * 3, [(0, 4), (4, 8), (8, 12)], "worker-0", timeout=WAIT_S,
                         retries=0, ctx=ctx) as client:
            g = np.arange(12, dtype=np.float32)
            client.start("push_pull", g)
            got = [server.recv_multipart() for _ in range(3)]
            assert len({ident for ident, *_ in got}) == 1
            headers = [msgpack.unpackb(h) for _, h, *_ in got]
            assert [h["piece"] for h in headers] == [0, 1, 2]
            for (ident, _, _), h in reversed(list(zip(got, headers))):    # answered backwards
                reply = np.full(4, h["piece"], np.float32)
                server.send_multipart([ident, *protocol.encode(
                    {"op": "ok", "node": "s", "seq": h["seq"], "clock": 1}, reply)])
            out = np.empty(12, np.float32)
            assert client.finish(out) == 1
            assert out.tolist() == [0] * 4 + [1] * 4 + [2] * 4
            client.reconnect(2, there)
            moved = make_socket(ctx, zmq.ROUTER, there, bind=True)
            client.start("pull")
            assert [msgpack.unpackb(server.recv_multipart()[1])["piece"] for _ in range(2)] == [0, 1]
            assert msgpack.unpackb(moved.recv_multipart()[1])["piece"] == 2
            moved.close()
        server.close()
    finally:
        ctx.term()


def test_shard_client_keeps_each_pieces_version_and_pushes_each_its_own_clock(tmp_path):
    """Pieces move on independently (a restored server is behind the others): the client
    notes the version of each piece's parameters as they arrive, and a push can say per
    piece what its gradient was computed on. Replies without parameters change no version."""
    ctx = zmq.Context()
    try:
        here = f"ipc://{tmp_path}/a"
        server = make_socket(ctx, zmq.ROUTER, here, bind=True)

        def answer_all(clocks, params=True):
            """Answer the three requests in flight: piece i at version clocks[i]; their headers."""
            got = [server.recv_multipart() for _ in range(3)]
            headers = [msgpack.unpackb(h) for _, h, *_ in got]
            for (ident, *_), h in zip(got, headers):
                server.send_multipart([ident, *protocol.encode(
                    {"op": "ok", "node": "s", "seq": h["seq"], "clock": clocks[h["piece"]]},
                    np.ones(4, np.float32) if params else None)])
            return headers

        with ShardClient([here] * 3, [(0, 4), (4, 8), (8, 12)], "worker-0", timeout=WAIT_S,
                         retries=0, ctx=ctx) as client:
            out, g = np.zeros(12, np.float32), np.ones(12, np.float32)
            assert client.versions == [0, 0, 0]
            client.start("pull")
            answer_all([5, 2, 9])
            assert client.finish(out) == 2 and client.versions == [5, 2, 9]
            client.start("push", g, client.versions)
            assert [h["clock"] for h in answer_all([6, 3, 10], params=False)] == [5, 2, 9]
            assert client.finish() == 3 and client.versions == [5, 2, 9]     # weights unchanged
            client.start("push_pull", g, 4)                                  # one clock for all
            assert [h["clock"] for h in answer_all([7, 5, 11])] == [4, 4, 4]
            assert client.finish(out) == 5 and client.versions == [7, 5, 11]
            with pytest.raises(ValueError, match="2 versions for 3 pieces"):
                client.start("push", g, [1, 2])
        server.close()
    finally:
        ctx.term()


def test_shard_client_runs_while_waiting_and_resends_a_reconnected_piece_at_once(tmp_path):
    """While a server stays silent the client calls `while_waiting` every WAIT_TICK (the
    scheduler answers heartbeats there); a piece it moves to a new server is sent there
    at once, not after the timeout, and without spending a retry."""
    ctx = zmq.Context()
    try:
        silent, there = f"ipc://{tmp_path}/silent", f"ipc://{tmp_path}/there"
        make_socket(ctx, zmq.ROUTER, silent, bind=True)          # takes requests, never answers
        moved = make_socket(ctx, zmq.ROUTER, there, bind=True)
        calls = []

        def while_waiting():
            calls.append(1)
            if len(calls) == 3:
                client.reconnect(0, there)
            elif moved.poll(0):
                ident, header, *_ = moved.recv_multipart()
                moved.send_multipart([ident, *protocol.encode(
                    {"op": "ok", "node": "s", "seq": msgpack.unpackb(header)["seq"], "clock": 7},
                    np.ones(4, np.float32))])

        with ShardClient([silent], [(0, 4)], "scheduler", timeout=60, retries=0, ctx=ctx,
                         while_waiting=while_waiting) as client:
            out = np.zeros(4, np.float32)
            assert client.pull(out) == 7                         # retries=0: a timeout would raise
            assert out.tolist() == [1] * 4
        assert len(calls) >= 4
    finally:
        ctx.destroy(linger=0)


def test_an_ssp_worker_that_joins_starts_at_the_slowest_clock():
    """A joiner (or a restarted worker) holds nobody back for the pushes it missed."""
    cfg = replace(SYNC, mode="ssp", workers=1, staleness=1)
    piece = make_piece(cfg)
    grad = np.ones(piece.hi - piece.lo, np.float32)
    for seq in range(1, 6):                                   # worker-0 alone: 5 clocks
        assert len(push(piece, grad, seq, piece.version)) == 1
    only(piece.handle(b"s", request("control", 1, node="scheduler", meta={"live": [0, 1]})))
    assert piece.worker_clock[1] == 5
    assert len(push(piece, grad, 6, piece.version)) == 1       # 6 - 5 <= 1: not held back
    assert push(piece, grad, 7, piece.version) == []           # 7 - 5 > 1: waits for worker-1
    released = push(piece, grad, 1, piece.version, node="worker-1")
    assert len(released) == 2                                  # worker-1's reply and worker-0's


def test_a_stale_server_never_overwrites_its_replacements_checkpoint(tmp_path):
    """A server replaced while it was hung (paused) wakes with stale state: it must not
    write over the checkpoint of the newer server that took its shard."""
    cfg = replace(ASYNC, checkpoint_dir=str(tmp_path))
    old, new = make_piece(cfg), make_piece(cfg)
    old.incarnation, new.incarnation = 3, 7
    push(new, np.ones(new.hi - new.lo, np.float32), 1, 0)
    new.checkpoint()
    with pytest.raises(DataError, match="written by a newer server of this run"):
        old.checkpoint()
    restored = make_piece(cfg)
    restored.restore()
    assert restored.version == new.version == 1
