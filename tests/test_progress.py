"""The progress line: drawn only on a terminal, never sharing a screen line with a log line."""

from __future__ import annotations

import io
import re

import pytest
import structlog
import trio

from caired import logging as clog
from caired.attempt import Tally
from caired.config import Config
from caired.progress import CLEAR, REDRAW, progress_line, render


class Terminal(io.StringIO):
    """What a terminal was sent; ``screen()`` is what it shows."""

    def isatty(self) -> bool:
        return True

    def screen(self) -> list[str]:
        """Each line as shown: CLEAR (carriage return, erase line) wipes what the line held so far."""
        return [line.rsplit(CLEAR, 1)[-1] for line in self.getvalue().split("\n")]


def test_render_shows_frames_rate_and_heart_rate() -> None:
    tally = Tally(total=300, sent=60, skipped=2, hr=71.6, started=10.0)
    assert render(tally, 12.0) == "sent 60/300 frames ·  30.0 fps · HR 72 bpm · 2 skipped"
    assert render(Tally(), 0.0) == "sent 0 frames ·   ... fps · HR warming up"


async def test_log_lines_clear_the_progress_line_so_no_screen_line_holds_both(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    terminal = Terminal()
    clog.configure(Config.load(env={"CAIRED_LOG_FORMAT": "console"}), stdout=terminal)
    log = structlog.get_logger()
    async with progress_line(lambda now: f"progress at {now:.2f} s", out=terminal):
        for n in range(3):
            await trio.sleep(REDRAW * 1.2)  # the line is drawn, then a log line comes
            log.info("something_happened", n=n)
        await trio.sleep(REDRAW * 1.2)
    shown = [line for line in terminal.screen() if line]
    assert [line for line in shown if line.startswith("progress")] == []  # cleared at the end
    assert [re.sub(r"^\S+ \[info\s*\] ", "", line).split() for line in shown] == [
        ["something_happened", f"n={n}"] for n in range(3)
    ]
    drawn = re.findall(r"progress at (\S+) s", terminal.getvalue())
    assert drawn == ["0.00", "0.25", "0.50", "0.75", "1.00"]  # redrawn all along, until the end at 1.2 s
    assert terminal.getvalue().endswith(CLEAR)


async def test_nothing_is_drawn_off_a_terminal(autojump_clock: trio.abc.Clock) -> None:
    out = io.StringIO()
    async with progress_line(lambda now: "progress", out=out):
        await trio.sleep(1)
    assert out.getvalue() == ""
