"""`downpour plot` as a user runs it, and the pieces of downpour.plots it rests on."""

import numpy as np
import pytest

from downpour import plots
from downpour.common.errors import DataError
from downpour.common.metrics import MetricsLog

PNG = b"\x89PNG\r\n\x1a\n"
EXPECTED = 'expected JSON lines written by --metrics (each an object with an "event")'
needs_matplotlib = pytest.mark.skipif(not plots.available(),
                                      reason="plots need matplotlib: pip install -e '.[plot]'")


def write_run(path, mode="async", evals=3):
    """A metrics file as a run writes it: `evals` eval lines, then the end line."""
    with MetricsLog(str(path)) as log:
        for i in range(1, evals + 1):
            log.write("eval", elapsed_s=0.5 * i, epoch=float(i), samples=600 * i, updates=12 * i,
                      train_loss=1.0 / i, test_loss=1.1 / i, test_accuracy=0.5 + 0.1 * i, lr=0.01)
        log.write("end", mode=mode, elapsed_s=0.5 * evals, samples=600 * evals,
                  test_accuracy=0.5 + 0.1 * evals)
    return path


def refused(r) -> str:
    """The one error line of a command that must exit 2 without a traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("downpour: error: "), r.stderr
    return lines[0]


# -- files that are not metrics files ----------------------------------------------------------

@needs_matplotlib
def test_plot_of_a_csv_says_it_is_not_a_metrics_file(downpour, tmp_path):
    (tmp_path / "results.csv").write_text("mode,workers,shards,batch_size\nsingle,1,0,50\n")
    line = refused(downpour("plot", "results.csv", timeout=60))
    assert line == (f"downpour: error: results.csv is not a metrics file: {EXPECTED}, got text "
                    "starting 'mode,workers,shards,batc...'")
    assert not (tmp_path / "accuracy.png").exists()


@needs_matplotlib
def test_plot_of_a_saved_model_says_binary_data(downpour, tmp_path):
    np.savez(tmp_path / "model.npz", w=np.arange(10.0))
    line = refused(downpour("plot", "model.npz", timeout=60))
    assert line == f"downpour: error: model.npz is not a metrics file: {EXPECTED}, got binary data"


@needs_matplotlib
def test_plot_of_a_readme_says_what_text_it_found(downpour, tmp_path):
    (tmp_path / "README.md").write_text("# downpour\n\nDistributed training.\n")
    line = refused(downpour("plot", "README.md", timeout=60))
    assert line == (f"downpour: error: README.md is not a metrics file: {EXPECTED}, got text "
                    "starting '# downpour'")


@needs_matplotlib
def test_plot_of_a_run_without_evaluations_says_so(downpour, tmp_path):
    write_run(tmp_path / "early.jsonl", evals=0)
    line = refused(downpour("plot", "early.jsonl", timeout=60))
    assert line.startswith("downpour: error: early.jsonl has no eval lines, so no accuracy to plot")


@pytest.mark.parametrize("text, got", [
    ("", "an empty file"),
    ("[1, 2]\n", "JSON without an \"event\" (line 1: '[1, 2]')"),
    ('{"event": "eval", "elapsed_s": 1, "samples": 5, "test_accuracy": 0.5}\noops\n',
     "a line that is not JSON (line 2: 'oops')"),
])
def test_read_run_names_what_it_found(tmp_path, text, got):
    (tmp_path / "m.jsonl").write_text(text)
    with pytest.raises(DataError) as e:
        plots.read_run(tmp_path / "m.jsonl")
    assert str(e.value) == f"{tmp_path / 'm.jsonl'} is not a metrics file: {EXPECTED}, got {got}"


def test_read_run_ignores_a_last_line_cut_short(tmp_path):
    path = write_run(tmp_path / "killed.jsonl", evals=2)
    with open(path, "a") as f:
        f.write('{"event": "eval", "elapsed_s": 1.5, "sam')             # killed mid-write
    evals, end = plots.read_run(path)
    assert [e["samples"] for e in evals] == [600, 1200] and end["mode"] == "async"


# -- the output path --------------------------------------------------------------------------

@needs_matplotlib
def test_plot_out_creates_missing_folders(downpour, tmp_path):
    write_run(tmp_path / "async.jsonl")
    write_run(tmp_path / "run2.jsonl", mode="sync")
    r = downpour("plot", "async.jsonl", "run2.jsonl", "--out", "newdir/sub/acc.png", timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "newdir/sub/acc.png"
    assert (tmp_path / "newdir" / "sub" / "acc.png").read_bytes().startswith(PNG)


@needs_matplotlib
def test_plot_out_that_cannot_be_written_fails_before_drawing(downpour, tmp_path):
    write_run(tmp_path / "a.jsonl")
    line = refused(downpour("plot", "a.jsonl", "--out", "a.jsonl/x.png", timeout=60))
    assert line.startswith("downpour: error: cannot write --out 'a.jsonl/x.png': ")
    line = refused(downpour("plot", "a.jsonl", "--out", "acc.pgn", timeout=60))
    assert line.startswith("downpour: error: --out 'acc.pgn': expected an image file name ending in .png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


# -- what is drawn ----------------------------------------------------------------------------

@pytest.mark.parametrize("n", range(1, 8))
def test_staleness_bars_are_centred_on_their_tick(n):
    offsets, width = plots.bar_offsets(n)
    assert len(offsets) == n and width == pytest.approx(plots.GROUP_WIDTH / n)
    assert sum(offsets) / n == pytest.approx(0.0, abs=1e-12)           # the group's centre is the tick
    assert np.diff(offsets) == pytest.approx([width] * (n - 1))         # side by side, no overlap
    assert offsets[0] - width / 2 == pytest.approx(-plots.GROUP_WIDTH / 2)
    assert offsets[-1] + width / 2 == pytest.approx(plots.GROUP_WIDTH / 2)


def test_staleness_bar_offsets_by_hand():
    assert plots.bar_offsets(1) == ([0.0], 0.8)
    offsets, width = plots.bar_offsets(2)
    assert offsets == pytest.approx([-0.2, 0.2]) and width == pytest.approx(0.4)
    offsets, width = plots.bar_offsets(4)
    assert offsets == pytest.approx([-0.3, -0.1, 0.1, 0.3]) and width == pytest.approx(0.2)


@pytest.mark.parametrize("path, mode, label", [
    ("single.jsonl", "single", "single"),
    ("exp/runs/async-w2-s1-r0.jsonl", "async", "async-w2-s1-r0"),
    ("Hogwild_4.jsonl", "hogwild", "Hogwild_4"),
    ("run3.jsonl", "async", "run3 (async)"),
    ("async-w2.jsonl", "sync", "async-w2 (sync)"),                     # "sync" inside "async" is not it
    ("old.jsonl", None, "old"),
])
def test_the_legend_names_the_mode_once(path, mode, label):
    assert plots.run_label(path, mode) == label



# -- the figures against workers ------------------------------------------------------------------

def point(mode="async", workers=1, samples_per_s=100.0, time_to_target_s="", repeat=0, shards=1,
          link="", compute_scale=1.0, model="--hidden 8", host_bound="", simulated=False):
    """A results.csv (or simulated.csv) row with what the plots against workers read."""
    return {"mode": mode, "workers": workers, "shards": shards, "link": link,
            "compute_scale": compute_scale, "model": model, "repeat": repeat,
            "samples_per_s": samples_per_s, "time_to_target_s": time_to_target_s,
            "host_bound": host_bound, "simulated": simulated}


def test_speedup_is_over_the_same_line_at_one_worker_with_repeats_averaged():
    rows = [point(workers=1, samples_per_s=100.0), point(workers=1, samples_per_s=120.0, repeat=1),
            point(workers=2, samples_per_s=200.0), point(workers=2, samples_per_s=240.0, repeat=1),
            point(workers=4, samples_per_s=330.0),
            point(workers=1, samples_per_s=50.0, link="100mbit"),      # another line: its own W=1
            point(workers=4, samples_per_s=100.0, link="100mbit"),
            point(mode="sync", workers=2, samples_per_s=180.0),         # no W=1: no speedup
            point(mode="single", samples_per_s=400.0, shards=0)]
    base = plots.LineKey("async", "", 1.0, 1, "--hidden 8")
    assert plots.throughputs(rows)[base] == {1: 110.0, 2: 220.0, 4: 330.0}
    ups = plots.speedups(rows)
    assert ups[base] == pytest.approx({1: 1.0, 2: 2.0, 4: 3.0})
    assert ups[base._replace(link="100mbit")] == pytest.approx({1: 1.0, 4: 2.0})
    assert base._replace(mode="sync") not in ups
    assert ups[plots.LineKey("single", "", 1.0, 0, "--hidden 8")] == {1: 1.0}
    assert len(ups) == 3


def test_speedups_read_the_text_of_a_results_csv():
    rows = [{"mode": "hogwild", "workers": "1", "shards": "0", "repeat": "0", "samples_per_s": "80.5"},
            {"mode": "hogwild", "workers": "2", "shards": "0", "repeat": "0", "samples_per_s": "161"}]
    key = plots.line_key(rows[0])             # an older CSV: no link, scale, model, simulated
    assert key == plots.LineKey("hogwild", "", 1.0, 0, "", simulated=False)
    assert plots.speedups(rows) == {key: pytest.approx({1: 1.0, 2: 2.0})}


def test_time_to_target_is_the_mean_only_where_every_repeat_reached_it():
    rows = [point(workers=1, time_to_target_s=10.0), point(workers=1, time_to_target_s=14.0, repeat=1),
            point(workers=2, time_to_target_s=6.0), point(workers=2, time_to_target_s="", repeat=1),
            point(workers=4, time_to_target_s="3.5"), point(workers=8, time_to_target_s=None)]
    key = plots.line_key(rows[0])
    assert plots.times_to_target(rows) == {key: {1: 12.0, 2: None, 4: 3.5, 8: None}}


def test_a_point_is_host_bound_when_any_of_its_repeats_was():
    rows = [point(workers=1, host_bound=False), point(workers=2, host_bound=True),
            point(workers=2, host_bound=False, repeat=1), point(workers=4, host_bound="True"),
            point(workers=8, host_bound=""), point(workers=4, link="1gbit", host_bound="false"),
            point(workers=16, host_bound="True", simulated="True")]     # no host: never a ring
    key = plots.line_key(rows[0])
    assert plots.host_bound(rows) == {(key, 2), (key, 4)}


def test_a_legend_names_only_what_varies_among_the_modes_that_use_it():
    K = plots.LineKey
    keys = [K("single", "", 1.0, 0, "a"), K("async", "", 1.0, 1, "a"), K("async", "1gbit", 1.0, 1, "a"),
            K("hogwild", "", 4.0, 0, "a"), K("hogwild", "", 1.0, 0, "a")]
    # link varies among the cluster modes and the scale among the replica modes; shards do not
    assert list(plots.line_labels(keys).values()) == [
        "single process", "async no link x1", "async 1gbit x1", "hogwild x4", "hogwild x1"]
    keys = [K("single", "", 1.0, 0, "a"), K("single", "", 1.0, 0, "b"), K("sync", "", 1.0, 2, "b"),
            K("sync", "", 1.0, 1, "a")]
    assert list(plots.line_labels(keys).values()) == [
        "single process m0", "single process m1", "sync S=2 m1", "sync S=1 m0"]


@needs_matplotlib
def test_a_sweep_draws_six_plots_with_host_bound_and_unreached_points(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    rows = []
    for i, (mode, workers, rate, reached, bound) in enumerate([
            ("single", 1, 500.0, 2.0, ""), ("async", 1, 300.0, 3.0, False),
            ("async", 2, 500.0, "", True), ("sync", 2, 400.0, 2.5, False)]):   # sync: no W=1
        write_run(tmp_path / "runs" / f"{i}.jsonl", mode=mode)
        rows.append({**point(mode, workers, rate, reached, shards=0 if mode == "single" else 1,
                             host_bound=bound), "metrics": f"runs/{i}.jsonl"})
    legends, save = {}, plots._save

    def keep_legend(fig, path):
        legend = fig.axes[0].get_legend()                     # staleness: none without histograms
        legends[path.name] = [t.get_text() for t in legend.get_texts()] if legend else []
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep_legend)
    paths = plots.sweep(rows, tmp_path, target=0.8)
    assert [p.name for p in paths] == ["throughput.png", "speedup.png", "time_to_target.png",
                                       "accuracy_time.png", "accuracy_samples.png", "staleness.png"]
    for p in paths:
        assert p.read_bytes().startswith(PNG)
    ring = "host-bound: the step padding was not kept"
    assert legends["throughput.png"] == ["single process", "sync", "async", ring]
    assert legends["speedup.png"] == ["async", "ideal: speedup = W", ring,
                                      "not drawn, no run at W=1: sync"]
    assert legends["time_to_target.png"] == ["single process", "sync", "async", ring,
                                             "never reached it (drawn at the top)"]
    assert legends["accuracy_time.png"] == ["single process", "async W=1", "async W=2", "sync W=2",
                                            "target 80%"]


def test_accuracy_against_bytes_and_throughput_against_link_rate():
    rows = [{**point("async", 2, 100.0, link="100mbit"), "bytes_per_sample": 3000.0,
             "final_accuracy": 0.9, "push_codec": "none"},
            {**point("async", 2, 300.0, link="100mbit"), "bytes_per_sample": 300.0,
             "final_accuracy": 0.8, "push_codec": "topk:0.01"},
            {**point("async", 2, 900.0, link="1gbit"), "bytes_per_sample": 3000.0,
             "final_accuracy": 0.92, "push_codec": "none"},
            {**point("async", 2, 500.0, link="1gbit", repeat=1), "bytes_per_sample": 3000.0,
             "final_accuracy": 0.9, "push_codec": "none"},
            {**point("single"), "bytes_per_sample": "", "final_accuracy": 0.95}]
    points = plots.accuracy_bytes(rows)
    none_1g = plots.line_key(rows[2])
    assert points[(none_1g, 2)] == (3000.0, pytest.approx(0.91)) and len(points) == 3
    rates = plots.link_rates(rows)
    none, topk = plots.line_key(rows[0])._replace(link=""), plots.line_key(rows[1])._replace(link="")
    assert rates == {(none, 2): {100_000_000: 100.0, 10**9: 700.0}, (topk, 2): {100_000_000: 300.0}}


# -- measured and simulated rows together ----------------------------------------------------------

def test_simulated_rows_are_their_own_line_with_speedup_over_their_own_one_worker():
    rows = [point(workers=1, samples_per_s=100.0), point(workers=2, samples_per_s=150.0),
            point(workers=1, samples_per_s=120.0, simulated="True"),       # as simulated.csv holds it
            point(workers=2, samples_per_s=216.0, simulated=True),
            point(workers=64, samples_per_s=1200.0, simulated=True)]
    measured = plots.LineKey("async", "", 1.0, 1, "--hidden 8")
    simulated = measured._replace(simulated=True)
    assert [plots.line_key(r) for r in rows] == [measured] * 2 + [simulated] * 3
    assert plots.throughputs(rows) == {measured: {1: 100.0, 2: 150.0},
                                       simulated: {1: 120.0, 2: 216.0, 64: 1200.0}}
    assert plots.speedups(rows) == {measured: pytest.approx({1: 1.0, 2: 1.5}),
                                    simulated: pytest.approx({1: 1.0, 2: 1.8, 64: 10.0})}
    # a simulated line without W=1 has no speedup, though its measured twin has one
    assert set(plots.speedups(rows[:2] + rows[3:])) == {measured}


def test_a_simulated_line_says_so_in_its_legend():
    K = plots.LineKey
    keys = [K("single", "", 1.0, 0, "a"), K("async", "", 1.0, 1, "a"),
            K("async", "", 1.0, 1, "a", simulated=True), K("async", "1gbit", 1.0, 1, "a", simulated=True)]
    assert list(plots.line_labels(keys).values()) == [
        "single process", "async no link", "async no link (simulated)", "async 1gbit (simulated)"]


def test_worker_counts_spanning_more_than_sixteen_times_go_on_a_log2_axis():
    assert not plots.log_workers([1, 2, 4, 16]) and not plots.log_workers([4, 64])
    assert plots.log_workers([1, 2, 64]) and plots.log_workers(["2", "1024"])
    assert not plots.log_workers([])


def kept_axes(monkeypatch) -> dict:
    """{file name: the axes of the figure} of every plot `plots.sweep` saves from now on."""
    drawn, save = {}, plots._save

    def keep(fig, path):
        drawn[path.name] = fig.axes[0]
        return save(fig, path)
    monkeypatch.setattr(plots, "_save", keep)
    return drawn


@needs_matplotlib
def test_a_sweep_draws_simulated_points_beside_the_measured_ones(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    rows = []
    for i, (mode, workers, rate) in enumerate([("single", 1, 500.0), ("async", 1, 300.0),
                                               ("async", 2, 550.0)]):
        write_run(tmp_path / "runs" / f"{i}.jsonl", mode=mode)
        rows.append({**point(mode, workers, rate, 2.0, shards=0 if mode == "single" else 1),
                     "metrics": f"runs/{i}.jsonl"})
    ws = [1, 2, 4, 16, 64, 256]
    rows += [{**point("async", str(w), str(280.0 * w ** 0.8), "", simulated="True"), "metrics": ""}
             for w in ws]                                          # as simulated.csv holds them
    drawn = kept_axes(monkeypatch)
    paths = plots.sweep(rows, tmp_path, target=0.8)
    assert [p.name for p in paths] == ["throughput.png", "speedup.png", "time_to_target.png",
                                       "accuracy_time.png", "accuracy_samples.png", "staleness.png"]
    assert all(p.read_bytes().startswith(PNG) for p in paths)
    for name in ("throughput.png", "speedup.png"):
        ax = drawn[name]
        lines = {line.get_label(): line for line in ax.get_lines()}
        measured, simulated = lines["async"], lines["async (simulated)"]
        assert measured.get_color() == simulated.get_color()
        assert (measured.get_marker(), measured.get_linestyle()) == ("o", "-")
        assert (simulated.get_marker(), simulated.get_linestyle(), simulated.get_markerfacecolor()) == (
            "s", ":", "none")
        assert list(simulated.get_xdata()) == ws
        assert ax.get_xscale() == ax.get_yscale() == "log" and list(ax.get_xticks()) == ws
    speedup = {line.get_label(): line for line in drawn["speedup.png"].get_lines()}
    assert list(speedup["async (simulated)"].get_ydata()) == pytest.approx([w ** 0.8 for w in ws])
    # the plots of the runs' metrics files hold the measured runs only, on their own ticks
    labels = [line.get_label() for line in drawn["time_to_target.png"].get_lines()]
    assert "async (simulated)" not in labels and "async" in labels
    assert drawn["time_to_target.png"].get_xscale() == "linear"
    assert [t.get_text() for t in drawn["accuracy_time.png"].get_legend().get_texts()] == [
        "single process", "async W=1", "async W=2", "target 80%"]


@needs_matplotlib
def test_a_simulated_sweep_alone_draws_throughput_and_speedup(tmp_path):
    rows = [{**point("sync", w, 100.0 * w, simulated=True), "metrics": ""} for w in (1, 2, 4)]
    paths = plots.sweep(rows, tmp_path, target=0.8)
    assert [p.name for p in paths] == ["throughput.png", "speedup.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speedup.png", "throughput.png"]
