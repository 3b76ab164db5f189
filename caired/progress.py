"""The live progress line on a terminal, for ``caired stream`` and ``caired demo``.

It is drawn on stderr, only when stderr is a terminal, and redrawn a few times a
second from a function of the time; log lines printed meanwhile clear it first, so the
two never share a line. ``render`` is stream's line: frames sent of total, rate, latest
HR, and the signal's quality as the backend reports it (warm-up answers without an HR
yet, the last ``confidence`` and ``feedback``).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final, TextIO

import trio

from caired import logging as clog
from caired._trio import open_nursery
from caired.attempt import Tally
from caired.protocol import shown_signal

REDRAW: Final = 0.25
CLEAR: Final = "\r\x1b[K"


def render(tally: Tally, now: float) -> str:
    total = f"/{tally.total}" if tally.total is not None else ""
    elapsed = now - tally.started if tally.started else 0.0
    rate = f"{tally.sent / elapsed:5.1f} fps" if elapsed > 0 and tally.sent else "  ... fps"
    if tally.hr is not None:
        hr = f"{tally.hr:.0f} bpm"
    elif tally.warmup:
        hr = f"warming up ({tally.warmup} answer{'s' if tally.warmup != 1 else ''} without HR)"
    else:
        hr = "warming up"
    skipped = f" · {tally.skipped} skipped" if tally.skipped else ""
    confidence = f" · confidence {shown_signal(tally.confidence)}" if tally.confidence is not None else ""
    feedback = f" · feedback {shown_signal(tally.feedback)}" if tally.feedback is not None else ""
    return f"sent {tally.sent}{total} frames · {rate} · HR {hr}{confidence}{feedback}{skipped}"


@asynccontextmanager
async def progress_line(line: Callable[[float], str], *, out: TextIO | None = None) -> AsyncIterator[None]:
    """Keep ``line(trio.current_time())`` drawn on ``out`` (stderr) while the block runs."""
    out = out or sys.stderr
    if not _isatty(out):
        yield
        return

    def clear() -> None:  # called by the log sink, under its lock
        out.write(CLEAR)
        out.flush()

    async def draw() -> None:
        while True:
            clog.console_write(out, CLEAR + line(trio.current_time()))
            await trio.sleep(REDRAW)

    clog.set_before_console_line(clear)
    try:
        async with open_nursery() as nursery:
            nursery.start_soon(draw)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()
    finally:
        clog.set_before_console_line(None)
        clear()


def _isatty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (ValueError, OSError):
        return False
