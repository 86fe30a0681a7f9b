"""Progress bars for every stage: tqdm's bar on a terminal, and a plain line every few
seconds where output goes to a file or a pipe (a log), so a redirected run writes a
readable log instead of thousands of carriage-return frames."""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from tqdm.std import tqdm as _tqdm

LOG_INTERVAL = 5.0  # seconds between two progress lines when output is not a terminal


def is_terminal(stream: Any) -> bool:
    """Whether `stream` is an interactive terminal (False for files, pipes, captures)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineWriter:
    """A file for tqdm that turns each redrawn frame into one line, at most one per
    `interval` seconds (the first and the last frame of a bar are always written)."""

    def __init__(self, stream: IO[str], interval: float = LOG_INTERVAL) -> None:
        self.stream, self.interval = stream, interval
        self.last = -float("inf")
        self.pending = ""  # the newest frame not yet written
        self.written = ""  # the last line written (a closing bar redraws it once more)

    def write(self, text: str) -> int:
        """Keep the newest frame; write it as a line once `interval` has passed."""
        frame = text.replace("\r", "").strip()
        if frame:
            self.pending = frame
            if time.monotonic() - self.last >= self.interval:
                self.flush_line()
        elif "\n" in text:  # tqdm closes a bar with a newline: its last frame is due now
            self.flush_line()
        return len(text)

    def flush_line(self) -> None:
        """Write the pending frame as one line."""
        if self.pending and self.pending != self.written:
            self.stream.write(self.pending + "\n")
            self.stream.flush()
            self.written = self.pending
            self.last = time.monotonic()
        self.pending = ""

    def flush(self) -> None:
        """tqdm flushes after every frame: nothing to do until a line is due."""

    def isatty(self) -> bool:
        return False


class tqdm(_tqdm):  # a drop-in for tqdm.auto.tqdm (same name, same arguments)
    """tqdm, writing one line every LOG_INTERVAL seconds when its stream (stderr by
    default) is not a terminal."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        stream = kwargs.get("file") or sys.stderr
        if not is_terminal(stream) and not kwargs.get("disable"):
            kwargs["file"] = LineWriter(stream)
            kwargs.setdefault("mininterval", LOG_INTERVAL)
            kwargs["dynamic_ncols"] = False
            kwargs.setdefault("ncols", 100)
        super().__init__(*args, **kwargs)
