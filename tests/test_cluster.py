"""Whole clusters as real processes: the invariants (docs/invariants.md), accuracy, failures and
clean exits."""

import json
import os
import re
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import zmq

from downpour.common.checkpoint import load_arrays, load_model
from downpour.common.wire import protocol
from downpour.common.wire.sockets import make_socket
from downpour.launch import CLI, child_env

SMALL = ["--synthetic", "2000", "--hidden", "32", "--epochs", "2", "--batch-size", "50",
         "--progress", "none", "--eval-every", "0"]


def params(path):
    return load_model(path)["params"]


def descendants(pid):
    """Pids of every living descendant of `pid` (from /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def role(pid):
    """The downpour command a process runs: python -m downpour.cli ROLE ..."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    return argv[3].decode() if len(argv) > 3 and argv[2] == b"downpour.cli" else None


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def background(tmp_path):
    """Start `downpour ARGS` in its own session; whatever is left is killed at teardown."""
    started = []
    def start(*args, **kwargs):
        p = subprocess.Popen([*CLI, *map(str, args)], cwd=tmp_path, env=child_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, **kwargs)
        started.append(p)
        return p
    yield start
    for p in started:
        pids = [p.pid, *descendants(p.pid)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(timeout=10)


def wait_for_eval(path, proc, timeout=60, epoch=0.0, updates=0):
    """Block until the metrics file has an eval line at `epoch` or later and `updates` or more
    (the run is training)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = [json.loads(line) for line in (path.read_text().splitlines() if path.exists()
                                                 else []) if line.endswith("}")]
        if any(r["event"] == "eval" and r["epoch"] >= epoch and r["updates"] >= updates
               for r in records):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"the run never evaluated at epoch {epoch} and {updates} updates or later")


def end_line(path):
    record = json.loads(path.read_text().splitlines()[-1])
    assert record["event"] == "end", record
    return record


def assert_adds_up(end):
    """The figures of a cluster run's end record agree with each other: the workers' samples
    add up to the run's, the rates are the totals over the training time (written rounded
    to the ms, so to within 0.5 ms of it), and the staleness percentiles are in order."""
    assert sum(end["worker_samples"].values()) == end["samples"] > 0, end["worker_samples"]
    rounding = 0.0005 / end["train_time_s"]             # the largest relative error of the ms
    for rate, total in (("samples_per_s", "samples"), ("updates_per_s", "updates"),
                        ("bytes_per_s", "bytes")):
        assert end[rate] == pytest.approx(end[total] / end["train_time_s"], rel=rounding), rate
    assert end["staleness_p50"] <= end["staleness_p99"] <= end["staleness_max"]
    workers = [n for name, n in end["nodes"].items() if name.startswith("worker")]
    servers = [n for name, n in end["nodes"].items() if name.startswith("server")]
    assert sum(w["steps"] for w in workers) * end["batch_size"] == end["samples"]
    assert end["bytes_per_sample"] == pytest.approx(end["bytes"] / end["samples"])
    # servers count payload bytes, workers every frame (headers too)
    received = sum(s["bytes_received"] for s in servers)
    assert 0.95 * sum(w["bytes_sent"] for w in workers) <= received <= sum(w["bytes_sent"] for w in workers)
    assert end["link_utilization"] is None and end["busiest_link"] is None   # no --link


class Lines:
    """The lines a process writes to a pipe, collected by a thread as they come."""

    def __init__(self, pipe):
        self.lines = []
        self._thread = threading.Thread(target=lambda: self.lines.extend(pipe), daemon=True)
        self._thread.start()

    def wait_for(self, text, proc, timeout=60):
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert proc.poll() is None and time.monotonic() < deadline, (text, self.lines)
            time.sleep(0.05)

    def text(self, finished=True):
        """What was written so far; with `finished`, all of it (the process has exited)."""
        if finished:
            self._thread.join(timeout=10)
        return "".join(self.lines)


@pytest.mark.parametrize("shards", [1, 3])
def test_async_with_one_worker_is_exactly_single_process_sgd(downpour, tmp_path, shards):
    r = downpour("train", "--mode", "single", *SMALL, "--save", "single.npz")
    assert r.returncode == 0, r.stderr
    r = downpour("train", "--mode", "async", "--workers", 1, "--shards", shards, *SMALL,
                 "--save", "async.npz")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(params(tmp_path / "async.npz"), params(tmp_path / "single.npz"))


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adam", "sgd", "momentum"])
def test_sync_equals_single_process_with_the_global_batch(downpour, tmp_path, mnist_dir,
                                                          optimizer):
    """W=2 workers at batch 32 = one process at batch 64 taken as 2 micro-batches, bit for
    bit, for S = 1, 2, 3 (one MNIST epoch). A plain batch of 64 agrees only up to
    rounding grown by Adam's first step and by ReLU flips (downpour.common.step.batch_gradient)."""
    data = ["--data-dir", mnist_dir, "--train-split", "t10k", "--test-split", "train-5k",
            "--hidden", "256,128", "--epochs", "1", "--optimizer", optimizer, "--progress", "none",
            "--eval-every", "0", "--lr", "0.05" if optimizer != "adam" else "0.001"]
    r = downpour("train", "--mode", "single", "--batch-size", 64, "--micro-batches", 2, *data,
                 "--save", "single.npz")
    assert r.returncode == 0, r.stderr
    single = params(tmp_path / "single.npz")
    for shards in (1, 2, 3):
        r = downpour("train", "--mode", "sync", "--workers", 2, "--shards", shards,
                     "--batch-size", 32, *data, "--save", f"sync{shards}.npz")
        assert r.returncode == 0, r.stderr
        assert np.array_equal(params(tmp_path / f"sync{shards}.npz"), single)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_two_workers_two_shards_reach_95_percent_on_mnist(downpour, tmp_path, mnist_dir, mode):
    r = downpour("train", "--mode", mode, "--workers", 2, "--shards", 2, "--data-dir", mnist_dir,
                 "--train-split", "t10k", "--test-split", "train-5k", "--hidden", "256,128",
                 "--optimizer", "adam", "--lr", "0.001", "--batch-size", 64, "--epochs", 15,
                 "--eval-every", 5, "--progress", "none", "--metrics", "m.jsonl", timeout=300)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    end, evals = records[-1], records[:-1]
    # reached: async's last weights vary run to run (96.1-96.3% here alone, 93.8% once
    # under the full suite's load), so the bound is on the best evaluation, the end
    # record being the last one's
    assert end["event"] == "end" and max(e["test_accuracy"] for e in evals) >= 0.95
    assert end["test_accuracy"] == evals[-1]["test_accuracy"]
    if mode == "async":
        assert end["samples"] == 2 * 15 * (5000 // 64) * 64
        assert end["staleness_max"] >= 1          # two workers: someone pushes on old weights
    else:
        assert end["staleness_max"] == 0 and end["updates"] == 15 * (10000 // 128)
    assert_adds_up(end)


@pytest.mark.slow
def test_killing_a_worker_does_not_stop_an_async_run(background, tmp_path):
    """SIGKILL of a worker 30% into the run: the living worker takes the dead one's share
    of the chunks, so the run still covers its epochs but for the chunk that was lost."""
    metrics = tmp_path / "m.jsonl"
    run = background("train", "--mode", "async", "--workers", 2, "--synthetic", 6000,
                     "--hidden", 64, "--epochs", 12, "--batch-size", 20, "--eval-every", 0.25,
                     "--dead-after-s", 3.0, "--progress", "lines", "--metrics", metrics)
    wait_for_eval(metrics, run, epoch=0.3 * 12)
    workers = [pid for pid in descendants(run.pid) if role(pid) == "worker"]
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    end = end_line(metrics)
    assert len(end["dead_workers"]) == 1 and "stopped answering" in err
    assert end["samples_asked"] == 12 * 300 * 20
    assert end["samples"] >= 0.95 * end["samples_asked"], {k: v for k, v in end.items()
                                                           if "hist" not in k}
    assert end["chunks_lost"] <= 1 and end["samples_lost"] <= 4 * 20
    assert end["test_accuracy"] > 0.5


def test_a_compute_scale_pads_every_step_to_that_many_times_its_cpu_time(downpour, tmp_path):
    """--compute-scale 8: each worker's compute and padding come to 8 x its compute's CPU
    time, its time is compute + padding + waiting, and the host kept up (host_bound false)."""
    r = downpour("train", "--mode", "async", "--workers", 2, "--compute-scale", 8, *SMALL,
                 "--hidden", "256,256", "--metrics", "m.jsonl")   # steps of ~1 ms CPU, not ~0.1
    assert r.returncode == 0, r.stderr
    end = end_line(tmp_path / "m.jsonl")
    assert_adds_up(end)
    assert end["host_bound"] is False
    for rank in ("0", "1"):
        w = end["nodes"][f"worker-{rank}"]
        assert w["padding_s"] > 0 and w["steps_over"] < w["steps"]
        # the time owed after the last step (at most one step's) is never slept
        one_step = 8 * w["cpu_s"] / w["steps"]
        assert w["compute_s"] + w["padding_s"] == pytest.approx(8 * w["cpu_s"], rel=0.1, abs=one_step)
        assert w["compute_s"] + w["padding_s"] + w["waiting_s"] <= end["train_time_s"] + 0.01


def test_a_fast_worker_takes_more_chunks_than_a_straggler(downpour, tmp_path):
    """A straggler whose steps take 20 times the compute (steps this small are mostly
    communication, which the slowdown leaves alone)."""
    r = downpour("train", "--mode", "async", "--workers", 2, "--slow-worker", "1:20", *SMALL,
                 "--metrics", "m.jsonl")
    assert r.returncode == 0, r.stderr
    end = end_line(tmp_path / "m.jsonl")
    done = end["worker_samples"]
    assert done["0"] + done["1"] == end["samples"] == end["samples_asked"]
    assert done["0"] > 1.5 * done["1"], done
    assert_adds_up(end)


def hand_cluster(background, tmp_path, *settings, mode="async"):
    """A scheduler, one server and two workers started by hand, as docker-compose runs them;
    (scheduler, its stderr Lines, workers, address)."""
    address = f"ipc://{tmp_path}/scheduler"
    scheduler = background("scheduler", "--bind", address, "--mode", mode, "--workers", 2,
                           "--shards", 1, "--synthetic", 6000, "--hidden", 64, "--batch-size", 20,
                           "--eval-every", 0.5, "--dead-after-s", 3.0, "--progress", "lines",
                           "--metrics", tmp_path / "m.jsonl", *settings)
    background("server", "--scheduler", address, "--bind", f"ipc://{tmp_path}/s0")
    workers = [background("worker", "--scheduler", address) for _ in range(2)]
    return scheduler, Lines(scheduler.stderr), workers, address


def test_a_worker_started_mid_run_joins_and_trains_chunks(background, tmp_path):
    scheduler, said, workers, address = hand_cluster(background, tmp_path, "--epochs", 20)
    wait_for_eval(tmp_path / "m.jsonl", scheduler)
    joiner = background("worker", "--scheduler", address)
    scheduler.wait(timeout=120)
    assert scheduler.returncode == 0, said.text()
    assert "worker-2 joined mid-run" in said.text()
    end = end_line(tmp_path / "m.jsonl")
    assert set(end["worker_samples"]) == {"0", "1", "2"} and end["worker_samples"]["2"] > 0
    assert end["samples"] == end["samples_asked"]
    _, err = joiner.communicate(timeout=30)
    assert err.startswith("worker-2: joined") and "worker-2: done after" in err



def test_spares_stand_by_past_their_timeout_and_leave_when_the_run_ends(background, tmp_path):
    """A server, and a worker joining a full sync run, started with a 2 s start timeout:
    they stand by for the rest of the run and exit 0 when it ends. (A node waits half its
    timeout for each `again`; the other half is slack for a scheduler busy evaluating,
    which 0.5 s did not always cover on a loaded machine.)"""
    scheduler, said, workers, address = hand_cluster(background, tmp_path, "--epochs", 60,
                                                     mode="sync")
    wait_for_eval(tmp_path / "m.jsonl", scheduler)
    t0 = time.monotonic()
    spares = {"server": background("server", "--scheduler", address, "--start-timeout-s", 2,
                                   "--bind", f"ipc://{tmp_path}/spare"),
              "worker": background("worker", "--scheduler", address, "--start-timeout-s", 2)}
    scheduler.wait(timeout=120)
    assert scheduler.returncode == 0, said.text()
    for role, spare in spares.items():
        _, err = spare.communicate(timeout=30)
        assert spare.returncode == 0, err
        assert err.startswith(f"{role}: every place is taken; it stands by as a spare"), err
        assert err.endswith(f"{role}: the run ended while it waited for a place; nothing to do\n")
    assert time.monotonic() - t0 > 4, "the run ended before the spares outlived their timeout"

@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_restarted_worker_takes_the_dead_ranks_place(background, tmp_path, mode):
    scheduler, said, workers, address = hand_cluster(background, tmp_path, "--epochs", 20,
                                                     mode=mode)
    wait_for_eval(tmp_path / "m.jsonl", scheduler)
    workers[1].kill()
    said.wait_for("stopped answering", scheduler)
    dead = int(re.search(r"worker-(\d) stopped answering", said.text(finished=False)).group(1))
    restarted = background("worker", "--scheduler", address)
    scheduler.wait(timeout=120)
    assert scheduler.returncode == 0, said.text()
    end = end_line(tmp_path / "m.jsonl")
    assert set(end["worker_samples"]) == {"0", "1"} and end["dead_workers"] == [], said.text()
    if mode == "async":    # every chunk trained and counted but the one the dead worker was in
        assert end["chunks_lost"] <= 1 and end["chunks_left"] == 0, end
        assert end["samples_asked"] - end["samples_lost"] <= end["samples"] <= end["samples_asked"], end
    _, err = restarted.communicate(timeout=30)
    assert err.startswith(f"worker-{dead}: joined") and f"worker-{dead}: done after" in err


@pytest.mark.slow
@pytest.mark.parametrize("who", ["launcher", "group"])
def test_interrupting_the_launcher_leaves_no_process(background, tmp_path, who):
    """SIGINT to the launcher alone, or to its whole process group as Ctrl-C does."""
    metrics = tmp_path / "m.jsonl"
    run = background("train", "--mode", "sync", "--workers", 2, "--shards", 2, "--synthetic",
                     6000, "--hidden", 64, "--epochs", 50, "--eval-every", 0.5, "--progress",
                     "none", "--metrics", metrics)
    wait_for_eval(metrics, run)
    family = descendants(run.pid)
    assert len(family) == 5                        # scheduler, 2 servers, 2 workers
    if who == "launcher":
        os.kill(run.pid, signal.SIGINT)
    else:
        os.killpg(run.pid, signal.SIGINT)
    run.communicate(timeout=30)
    assert run.returncode == 130
    assert not [pid for pid in family if alive(pid)]


def test_interrupting_hogwild_says_one_line(background, tmp_path):
    """Ctrl-C (SIGINT to the whole group) on Hogwild!: one line, exit 130, no traceback from
    the spawned processes, none of them left."""
    metrics = tmp_path / "m.jsonl"
    run = background("train", "--mode", "hogwild", "--workers", 2, "--synthetic", 6000,
                     "--hidden", 64, "--epochs", 200, "--eval-every", 0.5, "--progress", "none",
                     "--metrics", metrics)
    wait_for_eval(metrics, run)
    family = descendants(run.pid)
    assert len(family) >= 2
    os.killpg(run.pid, signal.SIGINT)
    _, err = run.communicate(timeout=30)
    assert run.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1] == "downpour: interrupted"
    assert all_gone(family)            # the shared-memory tracker exits once its parent has


def all_gone(pids, within_s=10.0):
    """Whether every pid has exited within `within_s` seconds (polled, bounded)."""
    deadline = time.monotonic() + within_s
    while [pid for pid in pids if alive(pid)]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_roles_started_in_any_order_finish_a_run(background, tmp_path):
    """Workers and servers first, the scheduler last: the commands docker-compose runs."""
    address = f"ipc://{tmp_path}/scheduler"
    nodes = [background("worker", "--scheduler", address),
             background("server", "--scheduler", address, "--bind", f"ipc://{tmp_path}/s0"),
             background("worker", "--scheduler", address),
             background("server", "--scheduler", address, "--bind", f"ipc://{tmp_path}/s1")]
    scheduler = background("scheduler", "--bind", address, "--mode", "async", "--workers", 2,
                           "--shards", 2, *SMALL, "--metrics", "m.jsonl", "--progress", "lines")
    out, err = scheduler.communicate(timeout=120)
    assert scheduler.returncode == 0, err
    said = {}
    for node in nodes:
        said[node] = node.communicate(timeout=30)[1]
        assert node.returncode == 0
        joined, *_, left = said[node].strip().splitlines()   # what a person who started it sees
        assert re.fullmatch(rf"(server|worker)-[01]: joined the scheduler at {address}; .+", joined)
        assert re.fullmatch(r"server-[01]: shut down by the scheduler at version \d+|"
                            r"worker-[01]: done after \d+ steps \([\d,]+ samples\)", left), left
    assert json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])["event"] == "end"
    assembled = next(line for line in err.splitlines() if line.startswith("cluster assembled"))
    for rank in (0, 1):                  # each rank is named with the address of that server
        bind = re.search(rf"server-{rank} at (ipc://\S+?)(,|$)", assembled).group(1)
        server = next(n for n in nodes if bind in n.args)
        assert said[server].startswith(f"server-{rank}: joined")


def test_a_missing_node_is_a_clear_error_not_a_hang(downpour, tmp_path):
    r = downpour("scheduler", "--bind", f"ipc://{tmp_path}/s", "--mode", "async", "--workers", 1,
                 "--start-timeout-s", 0.5, *SMALL)
    assert r.returncode == 2
    assert "did not assemble in 0.5 s: 0 of 1 server(s) and 0 of 1 worker(s)" in r.stderr
    r = downpour("worker", "--scheduler", f"ipc://{tmp_path}/nowhere", "--start-timeout-s", 0.3)
    assert r.returncode == 2 and "no answer from the scheduler" in r.stderr
    r = downpour("server")
    assert r.returncode == 2 and "needs the scheduler's address" in r.stderr
    r = downpour("server", "--scheduler", f"ipc://{tmp_path}/nowhere", "--resume")
    assert r.returncode == 2 and "--resume continues from the checkpoints in --checkpoint-dir" in r.stderr


def test_contradicting_cluster_settings(downpour):
    r = downpour("train", "--mode", "sync", "--n-push", 2, *SMALL)
    assert r.returncode == 2 and "n_push is a setting of --mode async; --mode sync does" in r.stderr
    r = downpour("train", "--mode", "async", "--n-push", 2, "--overlap", *SMALL)
    assert r.returncode == 2 and "overlap works with n_fetch = n_push = 1" in r.stderr
    r = downpour("scheduler", "--workers", 1, *SMALL)
    assert r.returncode == 2
    assert "the scheduler conducts --mode async, sync, ssp, hybrid, not 'single'" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("codecs", [(), ("--push-codec", "fp16", "--pull-codec", "topk:0.2",
                                         "--codec-warmup-epochs", 0)], ids=["plain", "codecs"])
def test_a_killed_server_is_replaced_from_its_checkpoint_and_the_run_goes_on(background, tmp_path,
                                                                            codecs):
    """With topk pulls too: the replacement holds no copy of the worker's weights, so the
    worker's first pull from it is whole."""
    address, checkpoints = f"ipc://{tmp_path}/scheduler", tmp_path / "checkpoints"
    metrics = tmp_path / "m.jsonl"
    scheduler = background("scheduler", "--bind", address, "--mode", "async", "--workers", 1,
                           "--synthetic", 6000, "--hidden", 64, "--epochs", 30, "--batch-size", 20,
                           "--eval-every", 1, "--progress", "lines", "--metrics", metrics,
                           "--checkpoint-every-s", 0.3, "--dead-after-s", 1.5, "--retries", 0,
                           *codecs)
    # the default 30 s timeout and no retry: the run goes on only because the scheduler and the
    # worker keep answering heartbeats while they wait, and resend to the replacement at once
    server = background("server", "--scheduler", address, "--bind", f"ipc://{tmp_path}/s0",
                        "--checkpoint-dir", checkpoints)
    worker = background("worker", "--scheduler", address)
    wait_for_eval(metrics, scheduler)
    deadline = time.monotonic() + 30
    while not list(checkpoints.glob("piece-*.npz")) and time.monotonic() < deadline:
        time.sleep(0.05)
    saved = np.load(next(checkpoints.glob("piece-*.npz")))["params"]
    # a spare, standing by past its own start timeout (it registers again every 0.5 s)
    replacement = background("server", "--scheduler", address, "--bind", f"ipc://{tmp_path}/s0b",
                             "--checkpoint-dir", checkpoints, "--resume", "--start-timeout-s", 1)
    time.sleep(2.5)
    server.kill()
    server.wait(timeout=10)
    out, err = scheduler.communicate(timeout=180)
    assert scheduler.returncode == 0, err
    assert "server-0 stopped answering" in err and "server-0 replaced, now at" in err
    said = {node: node.communicate(timeout=30)[1] for node in (worker, replacement)}
    assert worker.returncode == replacement.returncode == 0, said
    assert re.search(r"server-0: joined .*, resumed at version \d+\n", said[replacement])
    assert said[replacement].startswith("server: every place is taken; it stands by as a spare")
    end = json.loads(metrics.read_text().splitlines()[-1])
    assert end["event"] == "end" and end["test_accuracy"] > 0.5
    assert not np.array_equal(saved, np.load(next(checkpoints.glob("piece-*.npz")))["params"])


def checkpoint_now(address, piece):
    """Order the server at `address` to checkpoint `piece`, as the scheduler does; the
    checkpoint's meta."""
    ctx = zmq.Context.instance()
    sock = make_socket(ctx, zmq.DEALER, address)
    try:
        sock.send_multipart(protocol.encode({"op": "checkpoint", "node": "test", "seq": 1,
                                              "piece": piece}))
        assert sock.poll(30_000), f"{address} did not answer a checkpoint"
        header, _ = protocol.decode(sock.recv_multipart())
    finally:
        sock.close()
    return load_arrays(protocol.raise_for_error(header)["meta"]["path"])[1]


@pytest.mark.slow
def test_a_server_restored_to_an_older_version_adds_no_staleness(background, tmp_path):
    """Two servers; server-1 checkpoints, the run goes on for hundreds of updates, then it is
    killed and replaced from that checkpoint: its piece is now far behind server-0's. Each
    push must be counted against the version of the piece it goes to, so one worker's
    staleness stays 0 throughout (one clock for all pieces made every later push to
    server-0 as stale as the checkpoint was old)."""
    address, checkpoints = f"ipc://{tmp_path}/scheduler", tmp_path / "checkpoints"
    metrics = tmp_path / "m.jsonl"
    scheduler = background("scheduler", "--bind", address, "--mode", "async", "--workers", 1,
                           "--shards", 2, "--synthetic", 6000, "--hidden", 64, "--epochs", 20,
                           "--batch-size", 20, "--eval-every", 0.25, "--progress", "lines",
                           "--metrics", metrics, "--dead-after-s", 1.5, "--retries", 0)
    said = Lines(scheduler.stderr)
    servers = [background("server", "--scheduler", address, "--bind", f"ipc://{tmp_path}/s{i}",
                          "--checkpoint-dir", checkpoints) for i in range(2)]
    background("worker", "--scheduler", address)
    said.wait_for("cluster assembled", scheduler)
    s1 = re.search(r"server-1 at (ipc://\S+?)(,|$)", said.text(finished=False)).group(1)
    wait_for_eval(metrics, scheduler)
    saved = checkpoint_now(s1, piece=1)
    wait_for_eval(metrics, scheduler, updates=saved["version"] + 300)
    killed = next(s for s in servers if s1 in s.args)
    killed.kill()
    killed.wait(timeout=10)
    replacement = background("server", "--scheduler", address, "--bind", f"ipc://{tmp_path}/s1b",
                             "--checkpoint-dir", checkpoints, "--resume")
    scheduler.wait(timeout=180)
    assert scheduler.returncode == 0, said.text()
    run_id = re.match(r"run ([0-9a-f]{16}): ", said.text()).group(1)
    assert "server-1 replaced, now at" in said.text()
    _, err = replacement.communicate(timeout=30)
    assert saved["run_id"] == run_id and f"resumed at version {saved['version']}" in err, err
    end = end_line(metrics)
    assert end["run_id"] == run_id and end["test_accuracy"] > 0.5
    assert end["staleness_max"] == 0, end["staleness_hist"]


def run_by_hand(background, tmp_path, name, *server_settings):
    """A run of one worker and two servers started by hand (the servers with `server_settings`),
    to the end; (its run id, the scheduler's stderr, each server's stderr)."""
    address = f"ipc://{tmp_path}/{name}"
    scheduler = background("scheduler", "--bind", address, "--mode", "async", "--workers", 1,
                           "--shards", 2, *SMALL, "--metrics", f"{name}.jsonl",
                           "--save", f"{name}.npz", "--progress", "lines")
    servers = [background("server", "--scheduler", address, "--bind", f"{address}-s{i}",
                          *server_settings) for i in range(2)]
    background("worker", "--scheduler", address)
    _, err = scheduler.communicate(timeout=120)
    assert scheduler.returncode == 0, err
    said = [server.communicate(timeout=30)[1] for server in servers]
    assert [server.returncode for server in servers] == [0, 0], said
    run_id = re.match(r"run ([0-9a-f]{16}): ", err).group(1)
    assert end_line(tmp_path / f"{name}.jsonl")["run_id"] == run_id
    return run_id, err, said


def test_a_server_ignores_another_runs_checkpoints_and_starts_fresh(downpour, background, tmp_path):
    """A checkpoint volume that outlives runs, servers always started with --resume (as under
    a restart policy): the next run's servers name the earlier run's checkpoints and start
    fresh, so with one worker the run is still exactly single-process SGD."""
    checkpoints = tmp_path / "checkpoints"
    first, _, _ = run_by_hand(background, tmp_path, "first", "--checkpoint-dir", checkpoints)
    assert len(list(checkpoints.glob("piece-*.npz"))) == 2            # written at shutdown
    again, _, said = run_by_hand(background, tmp_path, "again", "--checkpoint-dir", checkpoints,
                                 "--resume")
    assert again != first
    for text in said:
        lines = text.splitlines()
        joined = next(i for i, line in enumerate(lines) if " joined the scheduler" in line)
        rank = re.match(r"server-(\d): joined", lines[joined]).group(1)
        assert lines[joined - 1] == (f"server-{rank}: ignores checkpoint(s) of run {first} in "
                                     f"{checkpoints} and starts fresh")
        assert "resumed" not in lines[joined]
    r = downpour("train", "--mode", "single", *SMALL, "--save", "single.npz")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(params(tmp_path / "again.npz"), params(tmp_path / "single.npz"))


def test_overlap_makes_every_push_but_the_first_one_version_stale(downpour, tmp_path):
    """One worker with --overlap: each gradient is computed on the weights that came before
    the push_pull in flight, so each piece counts every push but the first as 1 stale."""
    r = downpour("train", "--mode", "async", "--workers", 1, "--shards", 2, "--overlap", *SMALL,
                 "--metrics", "m.jsonl")
    assert r.returncode == 0, r.stderr
    steps = 2 * 2000 // 50
    assert end_line(tmp_path / "m.jsonl")["staleness_hist"] == {"0": 2, "1": 2 * (steps - 1)}


@pytest.mark.parametrize("staleness", [0, 1])
def test_ssp_keeps_every_gradient_within_the_bound(downpour, tmp_path, staleness):
    r = downpour("train", "--mode", "ssp", "--staleness", staleness, "--workers", 2, "--shards", 2,
                 *SMALL, "--metrics", "m.jsonl")
    assert r.returncode == 0, r.stderr
    end = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])
    gaps = {int(k): v for k, v in end["clock_gap_hist"].items()}
    assert sum(gaps.values()) == 2 * 2 * 2 * (1000 // 50)    # pieces x workers x epochs x steps
    assert end["clock_gap_max"] <= staleness and max(gaps) <= staleness


def test_sync_backup_worker_drops_a_stragglers_gradients(downpour, tmp_path):
    """A worker 30 times slower than the other: with one backup, versions go on without it
    and its late gradients are dropped (the exact count depends on timing, not the rule)."""
    # 6 epochs: long enough that the straggler has joined before the other has finished
    r = downpour("train", "--mode", "sync", "--workers", 2, "--backup", 1, "--slow-worker", "1:30",
                 *SMALL, "--hidden", 128, "--epochs", 6, "--metrics", "m.jsonl")
    assert r.returncode == 0, r.stderr
    end = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])
    assert end["updates"] == 6 * (2000 // 100) and end["dropped"] > 0


@pytest.mark.slow
def test_hogwild_two_processes_reach_94_percent_on_mnist(downpour, tmp_path, mnist_dir):
    before = set(os.listdir("/dev/shm"))
    r = downpour("train", "--mode", "hogwild", "--workers", 2, "--data-dir", mnist_dir,
                 "--train-split", "t10k", "--test-split", "train-5k", "--hidden", "256,128",
                 "--epochs", 15, "--eval-every", 5, "--progress", "none", "--metrics", "m.jsonl")
    assert r.returncode == 0, r.stderr
    end = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])
    assert end["mode"] == "hogwild" and end["test_accuracy"] >= 0.94
    assert end["samples"] == 2 * 15 * (5000 // 64) * 64
    assert set(os.listdir("/dev/shm")) <= before              # shared memory released


def test_early_stopping_and_plateau_reach_a_cluster(downpour, tmp_path):
    """The scheduler feeds the held-out loss to reduce-on-plateau (servers get the new
    scale) and to early stopping (workers stop)."""
    r = downpour("train", "--mode", "async", "--workers", 2, "--synthetic", 4000, "--hidden", 16,
                 "--epochs", 40, "--batch-size", 50, "--optimizer", "sgd", "--lr", "1e-9",
                 "--lr-schedule", "plateau:factor=0.5,patience=1", "--patience", 3,
                 "--eval-every", 0.5, "--heartbeat-s", 0.05, "--progress", "lines",
                 "--metrics", "m.jsonl")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    end, evals = lines[-1], [m for m in lines if m["event"] == "eval"]
    assert end["stopped_early"] and end["samples"] < 40 * (4000 // 100) * 100   # not all epochs
    assert r.stderr.count("early stop") == 1
    lrs = [e["lr"] for e in evals]
    assert lrs[0] == pytest.approx(1e-9) and min(lrs) < lrs[0]
