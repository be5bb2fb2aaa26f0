"""Metrics lines, the end record and the progress bar."""

import io
import json

import pytest

from downpour.common.metrics import MetricsLog, Progress, end_record

# what each mode's `end` line holds (besides event and time), as the runs write it
EVERY_MODE = {"mode", "workers", "shards", "elapsed_s", "train_time_s", "epoch", "samples",
              "updates", "samples_per_s", "updates_per_s", "train_loss", "test_loss",
              "test_accuracy", "stopped_early", "parameters", "data"}
TRAFFIC = {"bytes", "bytes_per_s", "staleness_p50", "staleness_p99", "staleness_max",
           "host_bound"}
CLUSTER = TRAFFIC | {"run_id", "batch_size", "dead_workers", "samples_asked", "worker_samples",
                     "staleness_hist", "clock_gap_max", "clock_gap_hist", "dropped",
                     "bytes_per_sample", "link_utilization", "busiest_link", "nodes",
                     "bytes_pushed_per_sample", "bytes_pulled_per_sample", "push_compression",
                     "pull_compression"}
CHUNKS = {"chunk_batches", "chunks", "chunks_lost", "samples_lost", "chunks_left", "samples_left"}
END_KEYS = {"single": EVERY_MODE, "hogwild": EVERY_MODE | TRAFFIC, "sync": EVERY_MODE | CLUSTER,
            "async": EVERY_MODE | CLUSTER | CHUNKS, "ssp": EVERY_MODE | CLUSTER | CHUNKS}


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_metrics_lines_are_complete_json(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLog(str(path))
    log.write("eval", samples=10, test_accuracy=0.5)
    assert json.loads(path.read_text())["samples"] == 10      # flushed before close
    log.write("end", samples=20)
    log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [m["event"] for m in lines] == ["eval", "end"] and all("time" in m for m in lines)
    assert log.events == lines


def test_bar_on_a_terminal_and_lines_elsewhere():
    tty = Terminal()
    bar = Progress(total=10, stream=tty)
    bar.update(10, "loss 0.1")
    bar.line("evaluated")
    bar.close()
    out = tty.getvalue()
    assert "\r[" in out and "100.0% loss 0.1" in out and "evaluated\n" in out

    pipe = io.StringIO()
    lines = Progress(total=10, stream=pipe)
    lines.update(10, "loss 0.1")
    lines.line("evaluated")
    assert pipe.getvalue() == "evaluated\n"                   # no bar when not a terminal

    quiet = io.StringIO()
    Progress(total=10, mode="none", stream=quiet).line("x")
    assert quiet.getvalue() == ""


def end_of(mode, **fields):
    """An end record of `mode`, every field it writes given (0 for those only some modes have)."""
    given = {k: 0 for k in END_KEYS[mode] - EVERY_MODE} | fields
    return end_record(mode=mode, workers=2, shards=0, parameters=10, data="d", samples=1000,
                      updates=20, epoch_samples=400, elapsed_s=3.14159, train_time_s=2.71828,
                      last_eval={"train_loss": 0.5, "test_loss": 0.6, "test_accuracy": 0.7,
                                 "samples": 1000}, stopped_early=False, **given)


@pytest.mark.parametrize("mode", sorted(END_KEYS))
def test_each_mode_writes_the_end_fields_it_always_wrote(mode):
    assert set(end_of(mode).to_json()) == END_KEYS[mode]


def test_hogwild_writes_its_staleness_as_null_and_single_leaves_it_out():
    hogwild = end_of("hogwild", staleness_p50=None, staleness_p99=None, staleness_max=None)
    assert json.loads(json.dumps(hogwild.to_json()))["staleness_max"] is None
    assert "staleness_max" not in end_of("single", staleness_max=3.0).to_json()


def test_the_end_record_derives_rates_and_epoch_from_the_totals():
    end = end_of("single")
    assert (end.elapsed_s, end.train_time_s, end.epoch) == (3.142, 2.718, 2.5)
    assert end.samples_per_s == 1000 / 2.71828 and end.updates_per_s == 20 / 2.71828
    assert (end.train_loss, end.test_loss, end.test_accuracy) == (0.5, 0.6, 0.7)
    assert end_of("sync", updates_per_s=9.0).updates_per_s == 9.0      # the servers' count
    with pytest.raises(TypeError):
        end_of("sync", staleness=1.0)                                  # no such field
