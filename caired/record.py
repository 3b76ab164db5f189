"""Recording a camera into a folder of PNGs named by capture time (``caired record``).

Each frame becomes ``<UNIX seconds>.png`` (``1747154380.5511632.png``), the stem being the
timestamp ``caired stream`` sends. A file appears whole: it is written under a hidden
temporary name in the same folder and renamed. Capture runs on an absolute schedule;
PNG encoding and writing run in worker threads behind a small bounded queue, and a frame
that finds the queue full is dropped and counted rather than held in memory.

Into a spool: with ``--to-spool``, or a DIR inside a folder named ``incoming``, the recording
is a session of the spool, made as the daemon's camera sessions are (``Spool.create_active``):
a folder of ``active/``, locked by this process while frames are written into it, handed to
``incoming/`` (marked ready, ``name.1`` if the name is taken) when the capture ends. The daemon
never sees a half-written recording, and if this process dies, the daemon's recovery gives
what was recorded to ``incoming/`` (a folder still being made in ``tmp/`` is cleaned up).

Ctrl-C (or SIGTERM) stops the capture, writes the frames already in hand and keeps the
recording (moved into the spool too); a second one stops at once. The exit code is then
128 + the signal (130 for Ctrl-C, 143 for SIGTERM), as for any command a signal ended. A
camera that cannot be opened exits 74 with one line; one that stops delivering frames exits
74 too, keeping (and publishing) what was recorded.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Final

import attrs
import cv2
import structlog
import trio

from caired import camera, fsops
from caired.camera import CapturedFrame, CaptureStats, Image
from caired.config import Config
from caired.errors import CairedError, DeviceError, ExitCode, OutputError
from caired.spool import Claim, Spool, check_name

log = structlog.get_logger()

# Frames held between the capture and the PNG writers; past this, frames are dropped.
QUEUE_SIZE: Final = 16
# PNG encoders running at once (each in its own worker thread).
WRITERS: Final = 2
PREVIEW_WINDOW: Final = "caired record (q to stop)"

_BUILT_WITHOUT_GUI: Final = re.compile(r"^\s*GUI:\s*NONE\s*$", re.MULTILINE)


@attrs.frozen(kw_only=True)
class Plan:
    """Where a recording goes: written into ``directory``; in spool mode, a session of that spool."""

    directory: Path  # the folder asked for, or the session's name inside the spool
    spool: Path | None = None  # spool mode: recorded in <spool>/active/, handed to <spool>/incoming/ at the end

    @property
    def name(self) -> str:
        return self.directory.name


def plan(cfg: Config, directory: str | None, *, to_spool: bool, now: float) -> Plan:
    """Decide where frames go: a plain folder, or a session of the spool."""
    if to_spool:
        name = Path(directory).name if directory else time.strftime("rec-%Y%m%dT%H%M%SZ", time.gmtime(now))
        return Plan(directory=Path(cfg.spool.dir) / "incoming" / name, spool=Path(cfg.spool.dir))
    target = Path(directory or cfg.stream.images_dir).absolute()
    if target.parent.name == "incoming":
        return Plan(directory=target, spool=target.parent.parent)
    return Plan(directory=target)


@attrs.define
class _Recording:
    """Where frames go, and what the writers and the signal watcher found; read once everything has stopped.

    In spool mode the session folder is made when the first frame comes (``claim``), so a
    camera that delivers nothing leaves nothing behind.
    """

    name: str
    folder: Path | None  # where frames are written; None in spool mode until the first frame
    created: bool = False
    spool: Spool | None = None
    claim: Claim | None = None
    opening: trio.Lock = attrs.field(factory=trio.Lock)
    written: int = 0
    error: CairedError | None = None
    stopped_by: signal.Signals | None = None  # the signal that stopped the capture early
    stopped_from_preview: bool = False

    @property
    def interrupted(self) -> bool:
        return self.stopped_by is not None

    async def folder_for(self) -> Path:
        """The folder to write into; in spool mode the first call makes the session folder."""
        async with self.opening:
            if self.folder is None:
                spool, name = self.spool, self.name
                assert spool is not None
                self.claim = await trio.to_thread.run_sync(lambda: spool.create_active(name, source="record"))
                self.folder = self.claim.path
        return self.folder


def _prepare(target: Plan) -> _Recording:
    """Create the folder frames are written into, or open the spool and check the session's name."""
    if target.spool is not None:
        try:
            check_name(target.name)
        except ValueError as exc:
            raise OutputError(f"{exc}; give the recording another name") from None
        spool = Spool(target.spool)
        try:
            spool.prepare()  # SpoolError (exit 73) says what is wrong with the spool
        except BaseException:
            spool.close()
            raise
        return _Recording(name=target.name, folder=None, spool=spool)
    try:
        existed = target.directory.is_dir()
        target.directory.mkdir(parents=True, exist_ok=True)
        if existed and any(True for _ in os.scandir(target.directory)):
            log.warning("record_dir_not_empty", dir=str(target.directory),
                        hint="frames of this recording are added to what is there")
        return _Recording(name=target.name, folder=target.directory, created=not existed)
    except OSError as exc:
        where = exc.filename or target.directory
        raise OutputError(f"cannot create {where}: {exc.strerror or exc}; choose another DIR or spool.dir") from None


def write_frame(folder: Path, frame: CapturedFrame) -> None:
    """Write ``frame`` into ``folder`` as ``<timestamp>.png``; blocking, so run it in a worker thread.

    The file appears whole (fsops.write_bytes_atomic: a hidden temporary name, which frame
    listers ignore, fsync, rename); on any failure the temporary file is removed.
    Raises OSError (OutputError when the frame cannot be encoded).
    """
    ok, data = cv2.imencode(".png", frame.image)
    if not ok:
        raise OutputError(f"frame {frame.timestamp} could not be encoded as PNG")
    fsops.write_bytes_atomic(folder / f"{frame.timestamp}.png", data.data)


def write_encoded(folder: Path, timestamp: str, jpeg: bytes | memoryview) -> None:
    """Write a frame already encoded as JPEG into ``folder`` as ``<timestamp>.jpg``, byte for byte; blocking.

    The daemon's camera sessions record the JPEG they stream live, so the recording, streamed
    later, sends exactly what the live session sent. Appears whole, as ``write_frame``'s PNGs.
    """
    fsops.write_bytes_atomic(folder / f"{timestamp}.jpg", jpeg)


def _finish(recording: _Recording) -> Path | None:
    """Hand a spool session over to incoming/, or tidy up; returns where the frames are, None when there are none."""
    if recording.spool is None:
        assert recording.folder is not None
        if recording.written == 0:
            if recording.created:
                with suppress(OSError):
                    recording.folder.rmdir()  # only if empty: nothing of anyone else's goes
            return None
        return recording.folder
    try:
        if recording.claim is None:
            return None  # not one frame came: no session folder was made
        if recording.written == 0:  # the first frames could not be written: filed with the reason
            reason = str(recording.error) if recording.error is not None else "no frame was recorded"
            recording.spool.fail(recording.claim, {"reason": reason, "source": "camera"})
            return None
        return recording.spool.handoff(recording.claim)  # marked .ready: the daemon takes it at once
    finally:
        recording.spool.close()


async def _writer(
    receive: trio.MemoryReceiveChannel[CapturedFrame],
    recording: _Recording,
    preview: _Preview | None,
    stop_capture: Callable[[], None],
) -> None:
    async with receive:
        async for frame in receive:
            if preview is not None:
                preview.offer(frame.image)
            try:
                folder = await recording.folder_for()
                # Not abandoned on cancel: a started write always ends renamed or removed.
                await trio.to_thread.run_sync(write_frame, folder, frame)
            except OSError as exc:
                if recording.error is None:
                    recording.error = (
                        exc if isinstance(exc, CairedError)
                        else OutputError(f"cannot write {exc.filename or recording.folder}: {exc.strerror or exc}")
                    )
                stop_capture()
                return
            recording.written += 1


class _Preview:
    """A window showing the newest frame; its own thread owns every GUI call."""

    def __init__(self) -> None:
        self._latest: Image | None = None
        self._new = threading.Event()
        self._stop = threading.Event()

    @staticmethod
    def problem() -> str | None:
        """Why no preview can be shown here, or None."""
        if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            return "no display ($DISPLAY and $WAYLAND_DISPLAY are unset)"
        if _BUILT_WITHOUT_GUI.search(cv2.getBuildInformation()):
            return "OpenCV has no GUI support (opencv-python-headless); install opencv-python for a preview"
        return None

    def offer(self, image: Image) -> None:
        self._latest = image
        self._new.set()

    async def run(self, stop_capture: Callable[[], None], recording: _Recording) -> None:
        try:
            outcome = await trio.to_thread.run_sync(self._show, abandon_on_cancel=True)
        finally:
            self._stop.set()
        if outcome == "q":
            log.info("record_stopped_from_preview")
            recording.stopped_from_preview = True
            stop_capture()
        elif outcome:
            log.info("preview_skipped", reason=outcome)

    def _show(self) -> str | None:
        try:
            cv2.namedWindow(PREVIEW_WINDOW, cv2.WINDOW_AUTOSIZE)
        except cv2.error as exc:
            return f"OpenCV cannot open a window: {str(exc).strip().splitlines()[-1]}"
        try:
            while not self._stop.is_set():
                if self._new.wait(0.03):
                    self._new.clear()
                    if self._latest is not None:
                        cv2.imshow(PREVIEW_WINDOW, self._latest)
                if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                    return "q"
            return None
        except cv2.error as exc:
            return f"OpenCV cannot show the preview: {str(exc).strip().splitlines()[-1]}"
        finally:
            with suppress(cv2.error):
                cv2.destroyWindow(PREVIEW_WINDOW)
                cv2.waitKey(1)


async def _watch_signals(stop_capture: Callable[[], None], stop_all: Callable[[], None], recording: _Recording) -> None:
    """First Ctrl-C (or SIGTERM): stop capturing, keep the frames in hand. Second: stop at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if recording.interrupted:
                stop_all()
                return
            recording.stopped_by = signal.Signals(signum)
            log.info("record_interrupted", signal=recording.stopped_by.name,
                     hint="writing the frames in hand; press Ctrl-C again to stop at once")
            stop_capture()


async def record(cfg: Config, target: Plan) -> int:
    """Record ``cfg.record.duration`` seconds into ``target``; returns the exit code."""
    recording = await trio.to_thread.run_sync(_prepare, target)
    stats = CaptureStats()
    device_error: DeviceError | None = None
    capture_scope = trio.CancelScope()
    preview: _Preview | None = None
    if cfg.record.preview:
        if (problem := _Preview.problem()) is None:
            preview = _Preview()
        else:
            log.info("preview_skipped", reason=problem)
    send, receive = trio.open_memory_channel[CapturedFrame](QUEUE_SIZE)
    try:
        async with trio.open_nursery() as outer:
            if threading.current_thread() is threading.main_thread():
                outer.start_soon(_watch_signals, capture_scope.cancel, outer.cancel_scope.cancel, recording)
            if preview is not None:
                outer.start_soon(preview.run, capture_scope.cancel, recording)
            async with trio.open_nursery() as writers:
                async with receive:
                    for _ in range(WRITERS):
                        writers.start_soon(_writer, receive.clone(), recording, preview, capture_scope.cancel)
                with capture_scope:
                    try:
                        await camera.capture(cfg.camera, send, seconds=cfg.record.duration, stats=stats)
                    except DeviceError as exc:
                        device_error = exc
                send.close()  # the writers finish the frames in hand, then stop
            outer.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            where = await trio.to_thread.run_sync(_finish, recording)
    if device_error is not None and stats.captured == 0:
        raise device_error  # never opened, or not one frame: nothing to report but the reason
    _summary(recording, stats, where, partial=device_error is not None)
    if recording.error is not None:
        raise recording.error
    if device_error is not None:
        raise device_error
    if recording.stopped_by is not None:
        return 128 + int(recording.stopped_by)  # what a shell reports for a command a signal ended
    return ExitCode.OK


def _summary(recording: _Recording, stats: CaptureStats, where: Path | None, *, partial: bool) -> None:
    if stats.dropped:
        log.warning("record_frames_dropped", count=stats.dropped,
                    hint="the disk or CPU could not keep up; lower --fps or the resolution")
    seconds = stats.seconds
    log.info(
        "record_finished",
        frames=recording.written,
        captured=stats.captured,
        dropped=stats.dropped,
        seconds=round(seconds, 2),
        fps=round(recording.written / seconds, 2) if seconds > 0 else 0.0,
        dir=str(where) if where is not None else None,
        partial=partial,
        interrupted=recording.interrupted,
    )
