"""``caired stream [DIR]``: stream one folder of frames as one session, then exit.

Ctrl-C and SIGTERM end the session the same way: the signal cancels it, the connection
closes with 1001 (going away), ``session_cancelled`` is logged with the frames sent, one
line on stderr says so, and the exit code is 128 + the signal (130, 143).
"""

from __future__ import annotations

import argparse
import signal
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import attrs
import structlog
import trio

from caired._trio import open_nursery
from caired.attempt import Tally
from caired.cli import add_bool, add_common, command
from caired.config import Config
from caired.errors import ExitCode
from caired.frames import encode_workers
from caired.fsops import shown
from caired.progress import progress_line, render
from caired.protocol import new_datapt_id
from caired.session import Limits, deliver
from caired.sources import FolderSource
from caired.uplink import Gate

log = structlog.get_logger()

EXIT_CODES: Final = """\
exit codes:
  0    the backend answered 'finished'
  1    the session failed: closed early, or no 'finished' within --finish-timeout
  2    a bad command-line flag
  65   no usable frames: a missing folder, or none readable
  69   the backend was unreachable after --retries attempts
  77   the key or the URL path was rejected (HTTP 401/403, close 1008)
  78   a configuration error
  130  stopped by Ctrl-C (SIGINT)
  143  stopped by SIGTERM"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = command(
        sub,
        "stream",
        _main,
        help="stream one folder of frames (or a video, or a dataset's session) as one session and exit",
        description="""
            Stream one folder of <timestamp>.png or .jpg frames, one video file (or a folder holding
            one), or a UBFC-rPPG or PURE session to the backend as one session: the frames
            leave in timestamp order at --fps, the last is sent again as the end message, and the
            command waits for the 'finished' answer, then exits. Every answer is logged whole, as
            a JSON line on stdout (a readable form and a progress line on a terminal). A dropped
            connection is retried from the first frame with the same datapt_id. Ctrl-C or SIGTERM
            closes the connection with 1001 (going away) and exits 130 or 143.
        """,
        examples=[
            "caired stream recordings/2025-05-13 --url wss://backend.example:8003/ws/ --api-key-file ~/.caire-key",
            "caired stream images --fps 0 --format raw",
            "caired stream clip.mp4 --start-time 2025-05-13T16:39:40Z --fps 0",
            "caired stream UBFC/subject1 --fps 0",
        ],
        notes=EXIT_CODES,
    )
    p.add_argument("dir", nargs="?", help="folder of <timestamp>.png/.jpg frames, a video, or a dataset's session "
                   "(default: IMAGES_DIR, or ./images)")
    p.add_argument("--start-time", dest="start_time", metavar="TIME",
                   help="a video's first frame, UNIX seconds or ISO 8601 with a zone (default: the container's "
                   "creation time, else the file's modification time minus its duration)")
    add_backend_options(p)
    add_stream_options(p)
    p.add_argument("--retries", dest="retry.attempts", type=int, metavar="N",
                   help="connection attempts before giving up, with backoff (0 = no limit; default 5)")
    add_common(p)


def add_backend_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", dest="backend.url", metavar="URL", help="backend WebSocket URL (BACKEND_WS_BASE)")
    p.add_argument("--api-key", dest="backend.api_key", metavar="KEY", help="API key (API_KEY; prefer a key file)")
    p.add_argument("--api-key-file", dest="backend.api_key_file", metavar="PATH", help="read the API key from PATH")
    p.add_argument("--auth", dest="backend.auth", choices=["query", "header"], help="how the key is sent")
    p.add_argument("--connect-timeout", dest="backend.connect_timeout", type=float, metavar="S")
    p.add_argument("--finish-timeout", dest="backend.finish_timeout", type=float, metavar="S",
                   help="seconds to wait for 'finished' after the end message (default 30)")


def add_stream_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fps", dest="stream.fps", type=float, metavar="N", help="frames per second (0 = unpaced)")
    p.add_argument("--format", dest="stream.format", choices=["jpeg", "raw"], help="jpeg re-encodes; raw sends the PNG")
    p.add_argument("--jpeg-quality", dest="stream.jpeg_quality", type=int, metavar="Q")
    add_bool(p, "advanced", "stream.advanced", "ask for the continuous rPPG signal (default on)")


@attrs.frozen
class Stopped:
    """A session a signal ended: which signal, and how far it had got."""

    signal: signal.Signals
    datapt_id: str
    sent: int
    total: int | None

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signal)  # what a shell reports for a process a signal ended

    def line(self) -> str:
        if self.total is None:
            return f"stopped by {self.signal.name} before the session started (datapt_id {self.datapt_id})"
        return (f"stopped by {self.signal.name} after sending {self.sent} of {self.total} frames; "
                f"the connection was closed as going away (datapt_id {self.datapt_id})")


def _main(cfg: Config, args: argparse.Namespace) -> int:
    from caired.video import parse_start

    directory = Path(args.dir if args.dir else cfg.stream.images_dir)
    try:
        start_time = parse_start(args.start_time) if args.start_time is not None else None
    except ValueError as exc:
        print(f"caired stream: --start-time: {exc}", file=sys.stderr)
        return int(ExitCode.USAGE)
    stopped = trio.run(stream_until_signalled, cfg, directory, start_time)
    if stopped is None:
        return 0
    print(f"caired stream: {stopped.line()}", file=sys.stderr)
    return stopped.exit_code


async def stream_until_signalled(cfg: Config, directory: Path, start_time: Decimal | None = None) -> Stopped | None:
    """Stream ``directory``; SIGINT or SIGTERM cancels the session. Returns how a signal stopped it, or None."""
    datapt_id = new_datapt_id()
    tally = Tally()
    received: list[signal.Signals] = []
    finished = False
    # Opened before the session starts, so no signal arrives unhandled once streaming could begin.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    received.append(signal.Signals(signum))
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(watch)
            await stream_folder(cfg, directory, datapt_id=datapt_id, tally=tally, start_time=start_time)
            finished = True
            nursery.cancel_scope.cancel()
    if finished or not received:
        return None
    return Stopped(signal=received[0], datapt_id=datapt_id, sent=tally.sent, total=tally.total)


async def stream_folder(
    cfg: Config, directory: Path, *, datapt_id: str | None = None, tally: Tally | None = None,
    start_time: Decimal | None = None,
) -> dict[str, Any]:
    """One session of ``directory``'s frames; ``tally`` shows how far it got, also when it is cancelled.

    Returns what the daemon's result.json would hold, the reference HR included.
    """
    limiter = trio.CapacityLimiter(encode_workers(paced=cfg.stream.fps > 0))
    datapt_id = datapt_id or new_datapt_id()
    tally = tally if tally is not None else Tally()
    with structlog.contextvars.bound_contextvars(source="cli", session=shown(directory.name), datapt_id=datapt_id):
        try:
            # A user's own folder: links are followed.
            async with FolderSource(directory, cfg, limiter, start_time=start_time) as source:
                await source.prepare()
                async with progress_line(lambda now: render(tally, now)):
                    gate = Gate(cfg.retry, probing=False)  # one session: a rejected key ends it, nothing is probed
                    delivered = await deliver(source, cfg=cfg, gate=gate, name=shown(directory.name),
                                              datapt_id=datapt_id, limits=Limits(attempts=cfg.retry.attempts or None),
                                              tally=tally)
                return delivered.result(source="cli", **source.reference_fields(delivered.finished.hr))
        except trio.Cancelled:
            log.warning("session_cancelled", frames_sent=tally.sent, frames_total=tally.total)
            raise
