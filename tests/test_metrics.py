"""Metrics lines and the progress bar."""

import io
import json

from downpour.common.metrics import MetricsLog, Progress


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
