"""`downpour simulate`: the discrete-event model's contract, its profile, its command line.

The engine is held to cases whose answer is known without it: a lone worker's step
time, a link's rate, the sync barrier with a backup worker, the ssp bound, the chunks
of a run all trained. The command line is run as a user runs it, with a profile
calibrated once per session in a temporary folder.
"""

import json
import math

import pytest

from downpour.common.config import Config
from downpour.common.order import asked_samples
from downpour.sim.engine import Costs, Run, payload_bytes
from downpour.sim.network import WIRE_EFFICIENCY

N = 2048                      # training samples of the engine's runs
PIECE = 50_000                # elements of the one piece of the server


def costs(**kw) -> Costs:
    """Costs with nothing but a 1 ms batch and a network 1000x faster than anything here."""
    base = dict(compute_s=1e-3, compute_cv=0.0, client_msg_s=0.0, server_msg_s=0.0,
                copy_s_per_byte=0.0, check_s_per_elem=0.0, add_s_per_elem=0.0,
                apply_s_per_elem=0.0, encode_s_per_elem={}, decode_s_per_elem={},
                server_s={f"{op}{c}": 0.0 for op in ("push_pull", "push", "pull") for c in ("", " codec")},
                server_elem_s=0.0,
                worker_rate=1e12, server_rate=1e12, worker_burst=0.0, server_burst=0.0,
                crypto_s_per_byte=0.0)
    return Costs(**{**base, **kw})


def run(pieces=(PIECE,), n=N, c=None, **settings) -> dict:
    cfg = Config(**{"mode": "async", "workers": 1, "shards": 1, "batch_size": 64, "epochs": 1,
                    **settings})
    return Run(cfg, n, list(pieces), c or costs()).simulate()


def test_a_lone_worker_takes_its_compute_per_step():
    r = run(compute_scale=4)
    steps = N // 64
    assert r["samples"] == steps * 64
    assert r["train_time_s"] == pytest.approx(steps * 4e-3, rel=1e-3)
    assert r["staleness_p50"] == 0 and r["staleness_max"] == 0


def test_every_chunk_is_trained_once_whatever_the_workers():
    for workers in (1, 3, 8):
        r = run(workers=workers, epochs=2)
        assert r["samples"] == asked_samples(N, Config(mode="async", batch_size=64, epochs=2))
        assert sum(r["worker_steps"].values()) * 64 == r["samples"]


def test_a_link_bound_run_moves_the_servers_link_rate():
    """16 workers, each step's push and pull 200 KB, compute negligible: the server's link
    carries the run, so samples/s is at most its rate / bytes per sample each way, and
    the link is busy nearly all the time."""
    rate = 1e9 / 8 * WIRE_EFFICIENCY
    c = costs(compute_s=1e-5, worker_rate=rate, server_rate=rate)
    r = run(workers=16, epochs=8, c=c)
    bound = rate / payload_bytes("none", PIECE) * 64
    assert 0.85 * bound < r["samples_per_s"] <= bound
    assert r["busiest_link"] is None          # no --link: the record leaves it out
    linked = run(workers=16, epochs=8, link="1gbit", c=c)
    assert linked["busiest_link"].startswith("server-0") and 0.95 < linked["link_utilization"] <= 1.0


def test_servers_add_link_capacity_unless_they_wait_for_their_replies():
    """Two servers carry twice the bytes of one, when the kernel takes each reply whole.
    When it takes only `sndbuf` bytes, a server applies its next push once its replies
    are nearly out (PieceState.wait_sent), and a reply capped at half a worker's link
    leaves part of the server's unused."""
    rate = 1e8
    c = costs(compute_s=1e-5, worker_rate=rate, server_rate=rate, sndbuf=1e9)
    one = run(workers=8, epochs=4, c=c, shards=1)
    two = run(pieces=(PIECE // 2,), workers=8, epochs=4, c=c, shards=2)
    assert two["samples_per_s"] == pytest.approx(2 * one["samples_per_s"], rel=0.1)
    waiting = run(pieces=(PIECE // 2,), workers=8, epochs=4, c=c._replace(sndbuf=16384), shards=2)
    assert waiting["samples_per_s"] < 0.8 * two["samples_per_s"]
    assert waiting["server_blocked_share"] > 0.5 > two["server_blocked_share"]


def test_async_staleness_is_the_other_workers_pushes():
    r = run(workers=4, epochs=4)
    assert r["staleness_p50"] == 3


def test_a_burst_through_an_idle_bucket_is_faster_than_the_rate():
    rate = 1e6
    plain = run(workers=1, c=costs(worker_rate=rate, server_rate=rate))
    bursty = run(workers=1, c=costs(worker_rate=rate, server_rate=rate, worker_burst=1e5,
                                    server_burst=1e5))
    assert bursty["samples_per_s"] > 1.5 * plain["samples_per_s"]


def test_sync_with_a_backup_worker_leaves_the_straggler_behind():
    slow = run(mode="sync", workers=4, backup=1, slow_worker="0:10", epochs=2)
    fair = run(mode="sync", workers=4, epochs=2)
    waiting = run(mode="sync", workers=4, slow_worker="0:10", epochs=2)
    assert slow["dropped"] > 0 and fair["dropped"] == 0
    assert slow["updates_per_s"] > 5 * waiting["updates_per_s"]
    assert fair["staleness_max"] == 0


def test_ssp_holds_a_worker_to_the_bound():
    r = run(mode="ssp", workers=4, staleness=2, slow_worker="0:3", epochs=2)
    free = run(mode="async", workers=4, slow_worker="0:3", epochs=2)
    assert r["clock_gap_max"] <= 2
    assert r["samples_per_s"] < free["samples_per_s"]


def test_overlap_hides_the_round_trip_and_costs_one_version():
    c = costs(compute_s=1e-2, worker_rate=4e7, server_rate=4e7)     # 10 ms each way, 10 ms compute
    plain, overlapped = run(c=c, epochs=2), run(c=c, epochs=2, overlap=True)
    assert overlapped["samples_per_s"] > 1.5 * plain["samples_per_s"]
    assert overlapped["staleness_p50"] == 1 and plain["staleness_p50"] == 0


def test_topk_pushes_send_fewer_bytes_after_the_warm_up():
    c = costs(encode_s_per_elem={"topk:0.01": 0.0}, decode_s_per_elem={"topk:0.01": 0.0})
    r = run(c=c, workers=2, epochs=2, push_codec="topk:0.01", codec_warmup_epochs=1.0)
    assert 1.8 < r["push_compression"] < 2.2          # one epoch whole, one at 1/50
    assert r["pull_compression"] == 1.0


def test_a_thousand_workers_and_128_servers_are_simulated():
    """The issue's scale: 1,024 workers, 10 steps each on average (chunks of 4 batches are
    dealt, one ahead: each takes 2 to 4), one piece on each of 128 servers."""
    rate = 1e9 / 8 * WIRE_EFFICIENCY
    r = run(pieces=(235_146 // 128,), n=655_360, workers=1024, shards=128,
            c=costs(worker_rate=rate, server_rate=rate, client_msg_s=1e-4, server_msg_s=2e-5))
    steps = r["worker_steps"].values()
    assert r["samples"] == 655_360 and sum(steps) == 10 * 1024 and set(steps) <= {8, 12, 16}
    assert math.isfinite(r["samples_per_s"]) and r["samples_per_s"] > 0


# -- the command line ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def profile(tmp_path_factory):
    """A profile of this machine, calibrated once (a few seconds)."""
    import subprocess

    from downpour.launch import CLI, child_env
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    done = subprocess.run([*CLI, "simulate", "--calibrate", "--profile", str(path)], env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return path


def test_calibrate_writes_every_cost_with_its_unit(profile):
    p = json.loads(profile.read_text())
    for key in ("client_msg_s", "server_msg_s", "copy_s_per_byte", "check_s_per_elem",
                "add_s_per_elem", "ipc_bytes_per_s", "crypto_s_per_byte"):
        assert p[key] > 0 or key == "crypto_s_per_byte", key
    assert set(p["apply_s_per_elem"]) >= {"sgd", "adam", "adagrad"}
    assert {"fp16", "topk:0.01", "onebit"} <= set(p["encode_s_per_elem"])
    (model,) = p["models"].values()
    assert model["compute_s"] > 0 and model["flops"] > 0


def test_simulate_prints_the_end_record_fields_as_json(downpour, profile):
    r = downpour("simulate", "--json", "--profile", profile, "--workers", "4", "--shards", "2",
                 "--link", "1gbit", "--compute-scale", "4", "--epochs", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["simulated"] is True and out["mode"] == "async" and out["workers"] == 4
    for key in ("samples_per_s", "updates_per_s", "staleness_p50", "staleness_p99", "staleness_max",
                "link_utilization", "busiest_link", "server_utilization", "bytes_per_sample"):
        assert key in out, key
    assert out["samples_per_s"] > 0


def test_explain_names_every_number_with_unit_and_source(downpour, profile):
    r = downpour("simulate", "--explain", "--profile", profile, "--link", "100mbit",
                 "--push-codec", "topk:0.01", "--device-gflops", "50")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    names = {line.split()[0] for line in lines
             if line and not line.startswith(("simulated:", "server busy", "links:", "("))}
    assert {"compute_s", "client_msg_s", "server_msg_s", "apply_s_per_elem", "worker_rate",
            "encode_s_per_elem[topk:0.01]", "worker_burst"} <= names
    assert any("--device-gflops 50" in line for line in lines)
    assert any("--link 100mbit" in line for line in lines)


@pytest.mark.parametrize("args, words", [
    (("--mode", "single"), "simulate models --mode"),
    (("--device-gflops", "-1"), "--device-gflops"),
    (("--mode", "sync", "--workers", "2", "--backup", "2"), "backup"),
    (("--pull-codec", "onebit"), "onebit"),
])
def test_bad_settings_get_a_clear_error(downpour, profile, args, words):
    r = downpour("simulate", "--profile", profile, *args)
    assert r.returncode == 2 and words in r.stderr, r.stderr


def test_a_profile_that_is_not_one_is_refused(downpour, tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    r = downpour("simulate", "--profile", bad)
    assert r.returncode == 2 and "--calibrate" in r.stderr, r.stderr


# -- validation ----------------------------------------------------------------------------


def _end(samples_per_s, p50, cpu_s=1.0, steps=1000, host_bound=False):
    return {"samples_per_s": samples_per_s, "staleness_p50": p50, "host_bound": host_bound,
            "nodes": {"worker-0": {"steps": steps, "cpu_s": cpu_s}, "server-0": {"busy_s": 1.0}}}


def test_validation_compares_the_median_of_the_runs_not_host_bound():
    from downpour.sim.validate import compare, device_speed, table
    ends = [_end(100, 3), _end(120, 4), _end(90, 3), _end(10, 9, host_bound=True)]
    assert device_speed(ends) == pytest.approx(1e-3)
    row = compare("case", ends, {"samples_per_s": 110, "staleness_p50": 4},
                  {"samples_per_s": 80, "staleness_p50": 3})
    assert row["counted"] == 3 and row["measured_samples_per_s"] == 100
    assert row["error"] == pytest.approx(0.10) and row["profile_error"] == pytest.approx(-0.20)
    assert row["staleness_diff"] == 1
    bound = compare("bound", ends[3:], {"samples_per_s": 1, "staleness_p50": 0},
                    {"samples_per_s": 1, "staleness_p50": 0})
    text = table([row, bound])
    assert "+10.0%" in text and "-20.0%" in text and "every run host bound" in text
    assert "median |error| 10.0%" in text


def test_a_slower_host_slows_every_cpu_cost_but_not_the_links():
    from downpour.sim.profile import slowed
    c = costs(client_msg_s=1e-4, server_elem_s=1e-9, worker_rate=1e8, worker_burst=1e5,
              encode_s_per_elem={"fp16": 1e-9})
    s = slowed(c, 2.0)
    assert s.client_msg_s == 2e-4 and s.server_elem_s == 2e-9 and s.encode_s_per_elem["fp16"] == 2e-9
    assert s.compute_s == c.compute_s and s.worker_rate == 1e8      # a --link's rate is the link's
    ipc = slowed(costs(worker_rate=4e9, server_rate=4e9), 2.0)
    assert ipc.worker_rate == 2e9                                    # ipc is the kernel's copies


@pytest.mark.slow
def test_validation_runs_a_real_case_and_keeps_its_end_records(tmp_path):
    """One real run of a one-case grid, kept in the --runs file; a second call reads it."""
    from downpour.sim.validate import measure
    grid = {"async W1 S1 ipc x2 mlp": dict(mode="async", workers=1, shards=1, compute_scale=2,
                                           epochs=1, hidden=(32,))}
    runs = tmp_path / "runs.json"
    ends = measure(grid, 1, lambda _: None, runs)
    (end,) = ends["async W1 S1 ipc x2 mlp"]
    assert end["samples_per_s"] > 0 and json.loads(runs.read_text()) == ends
    again = measure(grid, 1, lambda _: pytest.fail("ran again"), runs)
    assert again == ends


# -- the link probe ------------------------------------------------------------------------


def test_the_models_probe_time_is_the_bytes_over_the_rate():
    """One sender: each round trip crosses the link twice, one way at a time; eight: the
    server's link carries both ways at once. A burst through an idle bucket is faster."""
    from downpour.sim import linkprobe
    rate = 1e8 / 8 * WIRE_EFFICIENCY
    nbytes, rounds = 1_000_000, linkprobe.ROUNDS
    one = linkprobe.model_seconds("100mbit", nbytes, 1)
    assert 0.8 * 2 * rounds * nbytes / rate < one <= 2 * rounds * nbytes / rate
    eight = linkprobe.model_seconds("100mbit", nbytes, 8)
    assert eight == pytest.approx(8 * rounds * nbytes / rate, rel=0.1)


@pytest.mark.slow
def test_the_link_probe_measures_a_share_of_the_rate():
    from downpour import netem
    from downpour.sim import linkprobe
    if netem.problem():
        pytest.skip(netem.problem())
    e = linkprobe.efficiency("100mbit", 200_000, 2)
    assert 0.3 < e <= 1.0
