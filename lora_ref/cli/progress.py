"""Progress of long work, on stderr: one rewritten line on a terminal, periodic plain lines otherwise.

:class:`Progress` is called once as each item (a targeted tensor) starts. On a TTY it redraws
``  merge 3/12 (17%) 1.2 MiB/7.0 MiB ETA 0:00:05 name``; the percentage and the ETA are by bytes
when the items' sizes are known (ETA = elapsed x (total - done) / done, done counting the items
already finished), else by count. When stderr is not a terminal (a log, CI) it writes the same
text as a plain line every ``interval`` seconds (:data:`INTERVAL` by default; none for work shorter than that).
:meth:`Progress.close` ends the line, so the summary that follows (stdout) starts on its own line;
:func:`progress_line` closes it whether the work succeeds or not. Work that reports steps
(``progress(step, total, name)``, as the exporter does) calls :meth:`Progress.step`; without
sizes, the percentage and the ETA are by count.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TextIO

from . import printable

#: Seconds between two plain progress lines when stderr is not a terminal.
INTERVAL = 5.0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """``progress(name)`` callback for :func:`lora_ref.checkpoint.merge_checkpoint` and friends."""

    def __init__(self, label: str, sizes: Mapping[str, int], *, stream: TextIO | None = None, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.sizes, self.clock = label, dict(sizes), clock
        self.interval = INTERVAL if interval is None else interval
        self.total = len(self.sizes)  # items; :meth:`step` sets it when the work announces its count
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        self.total_bytes = sum(self.sizes.values())
        self.started = clock()
        self.last_line = self.started  # not a TTY: the first line after ``interval`` s (a short run prints none)
        self.count, self.done_bytes, self.current = 0, 0, 0  # items started, bytes of items finished, current item's bytes
        self.drawn = False

    def line(self, name: str) -> str:
        total = self.total
        finished = self.done_bytes if self.total_bytes else self.count - 1
        whole = self.total_bytes or total
        text = f"  {self.label} {self.count}/{total} ({100 * finished / max(whole, 1):.0f}%)"
        if self.total_bytes:
            text += f" {_size(self.done_bytes)}/{_size(self.total_bytes)}"
        elapsed = self.clock() - self.started
        if finished > 0:
            text += f" ETA {_clock(elapsed * (whole - finished) / finished)}"
        return f"{text} {printable(name)[:60]}"

    def __call__(self, name: str) -> None:
        self.done_bytes += self.current
        self.current = self.sizes.get(name, 0)
        self.count += 1
        now = self.clock()
        if self.tty:
            print(f"\r{self.line(name):<110}", end="", file=self.stream, flush=True)
            self.drawn = True
        elif now - self.last_line >= self.interval:
            print(self.line(name), file=self.stream, flush=True)
            self.last_line = now

    def step(self, step: int, total: int, name: str) -> None:
        """The ``progress(step, total, name)`` form (step counts from 0): item ``name`` of ``total`` starts."""
        self.total = max(total, self.total)
        self(name)

    def close(self) -> None:
        """End the redrawn line (a TTY) so the summary starts on its own line."""
        if self.drawn:
            print(file=self.stream, flush=True)
            self.drawn = False


@contextlib.contextmanager
def progress_line(progress: Progress | None) -> Iterator[Progress | None]:
    """The progress line is ended before anything else is printed, whether the work succeeds or not."""
    try:
        yield progress
    finally:
        if progress is not None:
            progress.close()
