"""Progress where output is not a terminal: a line every few seconds, never frames."""

from __future__ import annotations

import io

import pytest

from coact import progress
from coact.progress import LineWriter, is_terminal, tqdm


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_line_writer_keeps_one_frame_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    out = io.StringIO()
    writer = LineWriter(out, interval=5.0)
    for step in range(20):  # a frame every second for 20 s
        clock.now = float(step)
        writer.write(f"\rframe {step}   ")
    writer.write("\n")  # the bar closes: its last frame is written
    writer.write("\rframe 19   ")  # and redrawn once more on closing: not repeated
    writer.write("\n")
    # frames at 0, 5, 10, 15 (each once the interval has passed), then the last one
    assert out.getvalue().splitlines() == ["frame 0", "frame 5", "frame 10", "frame 15", "frame 19"]
    assert "\r" not in out.getvalue()


def test_bar_to_a_file_writes_few_lines() -> None:
    out = io.StringIO()
    assert not is_terminal(out)
    for _ in tqdm(range(5000), desc="work", file=out):
        pass
    lines = out.getvalue().splitlines()
    # the first and the last frame, each a whole line: no carriage-return frames
    assert 2 <= len(lines) <= 3, lines
    assert lines[-1].startswith("work: 100%") and "5000/5000" in lines[-1]
    assert "\r" not in out.getvalue()


def test_bar_on_a_terminal_is_tqdms_own() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    for _ in tqdm(range(3), desc="tty", file=out, mininterval=0):
        pass
    assert "\r" in out.getvalue()  # frames redrawn in place
