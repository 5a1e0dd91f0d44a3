"""Progress without a terminal: log lines every interval with count, rate and ETA; a resumed count is not
taken for speed."""

from __future__ import annotations

import io

import pytest

from qarm.progress import LogLines, progress_bar


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_log_lines_every_interval_with_count_rate_and_eta():
    out, clock = io.StringIO(), Clock()
    lines = LogLines(1000, "training", out, interval=10.0, clock=clock)
    for _ in range(100):  # 100 steps in 9.9 s: no line yet
        clock.now += 0.099
        lines(1, loss=0.5)
    assert out.getvalue() == ""
    clock.now = 10.0
    lines(1, loss=0.25)  # 101 steps in 10 s
    text = out.getvalue().strip()
    assert text == "training: 101/1,000 (10%), 10.1/s, ETA 0:01:29, loss 0.25", text
    clock.now = 100.0
    lines(899)
    lines.close()
    last = out.getvalue().strip().splitlines()[-1]
    assert last.startswith("training: 1,000/1,000 (100%), 10.0/s, done in 0:01:40"), last


def test_a_resumed_count_is_not_counted_as_speed():
    out, clock = io.StringIO(), Clock()
    lines = LogLines(1000, "training", out, interval=10.0, clock=clock, completed=900)
    clock.now = 10.0
    lines(50)
    assert out.getvalue().startswith("training: 950/1,000 (95%), 5.0/s, ETA 0:00:10"), out.getvalue()


def test_progress_bar_without_a_terminal_writes_lines(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("QARM_PROGRESS", raising=False)
    out = io.StringIO()  # not a TTY
    with progress_bar(3, "encoding", True, interval=0.0, stream=out) as advance:
        for _ in range(3):
            advance(1)
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("encoding: 1/3") and "done in" in lines[-1], lines
    monkeypatch.setenv("QARM_PROGRESS", "off")
    quiet = io.StringIO()
    with progress_bar(3, "encoding", True, interval=0.0, stream=quiet) as advance:
        advance(3)
    assert quiet.getvalue() == ""
    with progress_bar(3, "encoding", False, interval=0.0, stream=quiet) as advance:
        advance(3)
    assert quiet.getvalue() == ""
