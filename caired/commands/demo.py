"""``caired demo``: the whole loop on this machine, with no network and no camera.

A local backend on a free loopback port; a temporary spool; the daemon (the same
machinery ``caired run`` uses); a synthesized face whose skin pulses at a random
heart rate, dropped into the spool the recommended way (written beside, then
renamed in). On a terminal it shows progress as the backend receives the frames,
with the log above it; its stdout ends with the heart rate the backend estimated
beside the truth. When stdout is not a terminal, it carries that summary only and
the log goes to the demo's log file.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs
import structlog
import trio

from caired import logging as clog
from caired.cli import add_common, command
from caired.config import Config
from caired.errors import DemoFailed
from caired.progress import progress_line

if TYPE_CHECKING:
    from caired.emulator.server import BackendState

log = structlog.get_logger()

DEADLINE: Final = 120.0  # the demo gives up on a session this late
FPS: Final = 30.0  # the synthetic clip's frame rate


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = command(
        sub,
        "demo",
        _main,
        help="run backend, daemon and a synthetic session end to end, offline",
        description="""
            Run the whole loop on this machine, with no network and no camera: a local backend on a
            free loopback port, the daemon on a temporary spool, and a synthetic face whose skin
            pulses at a random (or --bpm) heart rate, dropped into the spool. On a terminal, a
            progress line shows the frames the backend received and its latest heart rate, below
            the log. The demo ends by printing the backend's estimate beside the truth on stdout;
            when stdout is not a terminal, that summary is all it carries, and the log goes to the
            demo's log file, kept with --keep.
        """,
        examples=[
            "caired demo",
            "caired demo --bpm 64 --seconds 30 --keep",
            "caired demo --fps 0 --format raw --dir demo-run",
        ],
    )
    p.add_argument("--bpm", type=float, default=None, help="the true heart rate (default: random, 55-100)")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the session (default 20)")
    p.add_argument("--fps", dest="stream.fps", type=float, metavar="N",
                   help="frames per second on the wire (default 30; 0 = as fast as possible)")
    p.add_argument("--format", dest="stream.format", choices=["jpeg", "raw"], help="frame format (default jpeg)")
    p.add_argument("--keep", action="store_true", help="keep the spool, log and result.json afterwards")
    p.add_argument("--dir", type=Path, default=None, help="work in DIR instead of a temporary folder (implies --keep)")
    add_common(p)


def _main(cfg: Config, args: argparse.Namespace) -> int:
    bpm = args.bpm if args.bpm is not None else round(random.uniform(55, 100), 1)
    if not 40 <= bpm <= 200:
        raise DemoFailed("--bpm must be between 40 and 200")
    if not 6 <= args.seconds <= 120:
        raise DemoFailed("--seconds must be between 6 and 120 (the estimate needs 5 s of frames)")
    keep = args.keep or args.dir is not None
    work = args.dir or Path(tempfile.mkdtemp(prefix="caired-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        outcome = trio.run(_demo, cfg, work, bpm, args.seconds)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    summary = report(outcome, bpm, work if keep else None)
    print(("\n" if _isatty(sys.stdout) else "") + summary)  # on a terminal, apart from the log above
    return 0


@attrs.frozen
class Outcome:
    result: dict[str, Any]
    log_file: Path
    result_file: Path
    seconds: float


async def _demo(cfg: Config, work: Path, bpm: float, seconds: float) -> Outcome:
    from caired.daemon import serve
    from caired.emulator.server import BackendOptions, serve_backend
    from caired.synth import synthesize
    from caired.systemd import Notifier

    began = time.monotonic()
    spool, log_file = work / "spool", work / "caired.jsonl"
    cfg = attrs.evolve(cfg, log=attrs.evolve(cfg.log, file=str(log_file)))
    # Off a terminal, stdout is the summary's alone; the log file has every line.
    clog.configure(cfg, stdout=None if _isatty(sys.stdout) else _Discard())
    async with trio.open_nursery() as nursery:
        state: BackendState = await nursery.start(serve_backend, BackendOptions())
        cfg = attrs.evolve(
            cfg,
            backend=attrs.evolve(cfg.backend, url=f"ws://127.0.0.1:{state.port}/ws/", finish_timeout=60.0),
            spool=attrs.evolve(cfg.spool, dir=str(spool), settle_seconds=1.0, rescan_seconds=5.0),
        )
        await nursery.start(lambda task_status: serve(cfg, notifier=Notifier(None), task_status=task_status))
        name = f"demo-{time.strftime('%Y%m%dT%H%M%S')}"
        staging = spool / "tmp" / name
        log.info("demo_synthesizing", bpm=bpm, seconds=seconds, folder=str(staging))
        await trio.to_thread.run_sync(lambda: synthesize(staging, bpm=bpm, seconds=seconds, fps=FPS))
        await trio.to_thread.run_sync(staging.rename, spool / "incoming" / name)
        log.info("demo_dropped", folder=str(spool / "incoming" / name))
        total = round(seconds * FPS)
        async with progress_line(lambda _now: progress(state, total)):
            result_file = await _wait_for_result(spool, name)
        nursery.cancel_scope.cancel()
    result = json.loads(await trio.to_thread.run_sync(result_file.read_text))
    return Outcome(result=result, log_file=log_file, result_file=result_file, seconds=time.monotonic() - began)


def progress(state: BackendState, total: int) -> str:
    """The demo's progress line: what the backend received so far, and its latest heart rate."""
    if not state.sessions:
        return f"backend received 0/{total} frames · waiting for the daemon"
    seen = state.sessions[-1]
    hr = next((a["inference"].get("hr") for a in reversed(seen.answers) if isinstance(a.get("inference"), dict)),
              None)
    shown = "warming up" if hr is None or hr < 0 else f"{hr} bpm"
    return f"backend received {len(seen.frames)}/{total} frames · HR {shown}"


def _outcome(spool: Path, name: str) -> tuple[Path | None, str | None]:
    """(result.json, None) once done; (None, reason) once failed; (None, None) meanwhile."""
    done = spool / "done" / name / "result.json"
    if done.exists():
        return done, None
    failed = spool / "failed" / name / "error.json"
    if failed.exists():
        return None, str(json.loads(failed.read_text()).get("reason", "unknown"))
    return None, None


async def _wait_for_result(spool: Path, name: str) -> Path:
    with trio.move_on_after(DEADLINE):
        while True:
            done, failure = await trio.to_thread.run_sync(_outcome, spool, name)
            if done is not None:
                return done
            if failure is not None:
                raise DemoFailed(f"the demo session failed: {failure}")
            await trio.sleep(0.2)
    raise DemoFailed(f"no result within {DEADLINE:g} s")


def report(outcome: Outcome, bpm: float, kept: Path | None) -> str:
    """The summary the demo ends with, on stdout."""
    hr = outcome.result.get("hr")
    error = f"{hr - bpm:+.1f}" if isinstance(hr, int | float) else "n/a"
    lines = [
        f"  heart rate estimated by the backend : {hr} bpm",
        f"  true heart rate of the synthetic face: {bpm} bpm   (error {error} bpm)",
        f"  frames sent: {outcome.result.get('frames_sent')}   attempts: {outcome.result.get('attempts')}   "
        f"took {outcome.seconds:.1f} s",
    ]
    if kept is not None:
        lines += [f"  log:         {outcome.log_file}", f"  result.json: {outcome.result_file}"]
    else:
        lines += ["  (the temporary spool, log and result.json were removed; --keep keeps them)"]
    return "\n".join(lines)


class _Discard(io.StringIO):
    """A text stream that keeps nothing: the log's stdout when the demo's stdout is not a terminal."""

    def write(self, text: str) -> int:
        return len(text)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (ValueError, OSError):
        return False
