"""Progress of long loops, with or without a terminal.

On a terminal (stderr is a TTY) a rich progress bar; otherwise (CI, ``nohup``, a scheduler, output piped to
a file) one plain line on stderr at least every ``interval`` seconds, and one when the loop ends:
``training: 1,200/4,000 (30%), 412.5/s, ETA 0:00:07, loss 0.4312``. ``QARM_PROGRESS=bar|log|off``
forces one behaviour.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Protocol, TextIO


class Advance(Protocol):
    def __call__(self, n: int = 1, **fields: object) -> None: ...


def _fields(fields: dict[str, object]) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())


def _mode(stream: TextIO) -> str:
    forced = os.environ.get("QARM_PROGRESS", "").strip().lower()
    if forced in ("bar", "log", "off"):
        return forced
    isatty = getattr(stream, "isatty", None)
    return "bar" if callable(isatty) and isatty() else "log"


class LogLines:
    """``advance(n, **fields)`` that prints a line every ``interval`` seconds (and :meth:`close` a last one)."""

    def __init__(self, total: int, description: str, stream: TextIO, interval: float = 10.0,
                 clock: object = time.monotonic, completed: int = 0) -> None:
        self.total, self.description, self.stream, self.interval = total, description, stream, interval
        self.clock = clock  # injectable for tests
        self.done, self.completed, self.fields = completed, completed, ""  # completed: before this run (resumed)
        self.start = self.last = self._now()

    def _now(self) -> float:
        return float(self.clock())  # type: ignore[operator]

    def __call__(self, n: int = 1, **fields: object) -> None:
        self.done += n
        if fields:
            self.fields = _fields(fields)
        now = self._now()
        if now - self.last >= self.interval:
            self.last = now
            self.line(now)

    def line(self, now: float | None = None) -> None:
        now = self._now() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        rate = (self.done - self.completed) / elapsed
        parts = [f"{self.description}: {self.done:,}/{self.total:,}"]
        if self.total > 0:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        parts.append(f"{rate:,.1f}/s")
        if self.total > self.done and rate > 0:
            parts.append(f"ETA {timedelta(seconds=round((self.total - self.done) / rate))}")
        elif self.done >= self.total:
            parts.append(f"done in {timedelta(seconds=round(elapsed))}")
        if self.fields:
            parts.append(self.fields)
        print(", ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        if self.done > self.completed:
            self.line()


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True, *, interval: float = 10.0,
                 stream: TextIO | None = None, completed: int = 0) -> Iterator[Advance]:
    """Yield ``advance(n=1, **fields)`` (fields: e.g. ``loss=0.43``, shown beside the count).
    ``completed``: units done before (a resumed run), counted in the total but not in the rate.

    ``enabled=False`` does nothing. Otherwise a transient rich bar on a terminal, or log lines every
    ``interval`` seconds without one (see the module docstring)."""
    out = stream or sys.stderr
    mode = _mode(out) if enabled else "off"
    if mode == "off":
        yield lambda n=1, **fields: None
        return
    if mode == "log":
        lines = LogLines(total, description, out, interval, completed=completed)
        try:
            yield lines
        finally:
            lines.close()
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=Console(file=out), transient=True) as bar:
        task = bar.add_task(description, total=total, info="", completed=completed)

        def advance(n: int = 1, **fields: object) -> None:
            if fields:
                bar.update(task, advance=n, info=_fields(fields))
            else:
                bar.update(task, advance=n)

        yield advance
