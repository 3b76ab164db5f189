"""The live capture source: a camera (or a video file standing in for one) as a stream of frames.

cv2 blocks, so every call into it runs in a worker thread; a lock per device keeps those
calls one at a time even when a read was abandoned by a cancellation. Frames are read on
an absolute schedule (frame i at ``t0 + i / fps``) and handed on with ``send_nowait``: a
camera cannot wait for a slow consumer, so a frame that finds the channel full is dropped
and counted, never queued without bound.

A video file used as the device is read at the configured rate and starts over at its end,
so it replays forever; that is how the tests (and demos) stand in for a camera.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs
import cv2
import numpy as np
import numpy.typing as npt
import structlog
import trio

from caired.config import CameraConfig
from caired.errors import DeviceError

log = structlog.get_logger()

# A camera that delivers no frame for this long has stopped (unplugged, driver wedged).
# Read at call time, so a test can shorten it.
STALL_SECONDS: float = 2.0
# Releasing a capture can block on a read still in flight; wait this long, then let it finish alone.
RELEASE_TIMEOUT: Final = 5.0
# Backoff while the camera is missing: 1 s, 2 s, 4 s ... 30 s.
RETRY_INITIAL: Final = 1.0
RETRY_MAX: Final = 30.0

# Timestamps are counted in units of 100 ns: 7 decimals, like repr(time.time()).
_TICKS_PER_SECOND: Final = 10_000_000

Image = npt.NDArray[np.uint8]


@attrs.frozen
class CapturedFrame:
    """One frame and its capture time: UNIX seconds as text, 7 decimals (``"1747154380.5511632"``)."""

    timestamp: str
    image: Image = attrs.field(eq=False, repr=lambda image: f"<{'x'.join(map(str, image.shape))}>")


@attrs.define
class CaptureStats:
    """What a capture did; the caller may pass one in to watch it live."""

    captured: int = 0  # frames read from the device
    sent: int = 0  # frames the consumer's channel took
    dropped: int = 0  # frames read but dropped because the channel was full
    read_failures: int = 0  # reads that returned no frame
    late: int = 0  # schedule slots skipped because a read ran past them
    restarts: int = 0  # times a video file started over at its end
    seconds: float = 0.0  # time from the first scheduled read to the end of the capture
    consumer_closed: bool = False  # the capture ended early because the consumer closed its end

    @property
    def fps(self) -> float:
        return self.captured / self.seconds if self.seconds > 0 else 0.0

    def as_log(self) -> dict[str, Any]:
        return {
            "captured": self.captured,
            "sent": self.sent,
            "dropped": self.dropped,
            "read_failures": self.read_failures,
            "late": self.late,
            "restarts": self.restarts,
            "seconds": round(self.seconds, 3),
            "fps": round(self.fps, 2),
        }


def is_video_file(device: str) -> bool:
    """True when ``device`` names a video file rather than a camera (an index or a /dev/ node)."""
    text = device.strip()
    return not (text.isdigit() or text.startswith("/dev/"))


def open_device(device: str, width: int, height: int, fps: float) -> Any:
    """Open a camera index ("0"), a device node ("/dev/video2") or a video file; blocking.

    The requested size and rate are asked of a camera (it may pick the nearest it supports);
    a video file delivers its own. Raises DeviceError with a line a user can act on.
    """
    _quiet_opencv()
    text = device.strip()
    if is_video_file(text):
        if not os.path.isfile(text):
            raise DeviceError(f"video file {text} does not exist; set camera.device (CAMERA_INDEX) to a camera or file")
        cap = cv2.VideoCapture(text)
        if not cap.isOpened():
            cap.release()
            raise DeviceError(f"video file {text} could not be opened: not a video OpenCV can read")
        return cap
    if text.startswith("/dev/") and not os.path.exists(text):
        raise DeviceError(f"camera {text} does not exist; is it plugged in? (`ls /dev/video*` lists cameras)")
    backend = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
    cap = cv2.VideoCapture(int(text) if text.isdigit() else text, backend)
    if not cap.isOpened():
        cap.release()
        raise DeviceError(
            f"camera {text} could not be opened: missing, busy in another program, or not permitted "
            "(is the user in the 'video' group?); set camera.device (CAMERA_INDEX) to another index or /dev/videoN"
        )
    cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
    cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
    cap.set(cv2.CAP_PROP_FPS, fps)
    cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not one queued in the driver
    return cap


def _quiet_opencv() -> None:
    # OpenCV prints its own warnings to stderr when a device is missing; ours say it once, better.
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


class Camera:
    """An open device. ``read`` and ``aclose`` are async; the cv2 calls run in worker threads."""

    def __init__(self, cap: Any, cfg: CameraConfig) -> None:
        self._cap: Any = cap
        self._cfg = cfg
        self._lock = threading.Lock()  # one cv2 call at a time, even past an abandoned read
        self._last_tick = 0
        self._closed = False
        self.device = cfg.device
        self.is_file = is_video_file(cfg.device)
        self.restarts = 0

    def describe(self) -> dict[str, Any]:
        """The device's actual size and rate, for the log."""
        with self._lock:
            cap = self._cap
            if cap is None:
                return {"device": self.device}
            return {
                "device": self.device,
                "video_file": self.is_file,
                "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0),
                "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0),
                "device_fps": round(float(cap.get(cv2.CAP_PROP_FPS) or 0.0), 2),
            }

    def read_blocking(self) -> CapturedFrame | None:
        """One frame, stamped when the read returned; None when the camera gave none."""
        with self._lock:
            if self._closed or self._cap is None:
                return None
            try:
                ok, image = self._cap.read()
            except Exception as exc:  # cv2.error from a driver or a codec: the device failed, not the daemon
                raise DeviceError(f"camera {self.device} failed to deliver a frame: {exc}") from None
            if not (ok and image is not None) and self.is_file:
                ok, image = self._restart_file()
            if not ok or image is None:
                return None
            return CapturedFrame(timestamp=self._stamp(), image=image)

    def _restart_file(self) -> tuple[bool, Any]:
        # A video file at its end starts over, so it stands in for a camera that never stops.
        self._cap.release()
        self._cap = None
        try:
            self._cap = open_device(self.device, self._cfg.width, self._cfg.height, self._cfg.fps)
        except DeviceError:
            raise DeviceError(
                f"video file {self.device} ended and could not be opened again (removed or changed while in use)"
            ) from None
        self.restarts += 1
        ok, image = self._cap.read()
        if not ok or image is None:
            raise DeviceError(f"video file {self.device} holds no frame OpenCV can decode")
        return ok, image

    def _stamp(self) -> str:
        # Wall-clock capture time, strictly increasing even if the clock stands still or steps back.
        tick = max(time.time_ns() // 100, self._last_tick + 1)
        self._last_tick = tick
        seconds, fraction = divmod(tick, _TICKS_PER_SECOND)
        return f"{seconds}.{fraction:07d}"

    async def read(self) -> CapturedFrame | None:
        # Abandoned on cancel: a stalled camera must not hold up shutdown. The lock keeps the
        # release that follows from racing the read still running in its thread.
        return await trio.to_thread.run_sync(self.read_blocking, abandon_on_cancel=True)

    def release_blocking(self) -> None:
        with self._lock:
            self._closed = True
            cap, self._cap = self._cap, None
            if cap is not None:
                cap.release()

    async def aclose(self) -> None:
        """Release the device; runs even when cancelled, waiting at most RELEASE_TIMEOUT."""
        with trio.move_on_after(RELEASE_TIMEOUT, shield=True):
            await trio.to_thread.run_sync(self.release_blocking, abandon_on_cancel=True)


@asynccontextmanager
async def opened_camera(cfg: CameraConfig) -> AsyncIterator[Camera]:
    """The device, open for the block and released after it (also on cancellation)."""
    # Not abandoned on cancel: the capture object must come back so it can be released.
    cap = await trio.to_thread.run_sync(open_device, cfg.device, cfg.width, cfg.height, cfg.fps)
    camera = Camera(cap, cfg)
    try:
        yield camera
    finally:
        await camera.aclose()


async def capture_from(
    camera: Camera,
    fps: float,
    send: trio.MemorySendChannel[CapturedFrame],
    *,
    seconds: float | None,
    stats: CaptureStats | None = None,
) -> CaptureStats:
    """Read ``camera`` on an absolute schedule for ``seconds`` (None: forever) into ``send``.

    ``send`` is not closed here. Ends early when the consumer closes its end; raises
    DeviceError when a camera delivers no frame for STALL_SECONDS.
    """
    stats = stats if stats is not None else CaptureStats()
    period = 1.0 / fps
    restarts_before = camera.restarts
    t0 = trio.current_time()
    end = math.inf if seconds is None else t0 + seconds
    last_frame = t0
    slot = 0
    try:
        while (deadline := t0 + slot * period) < end:
            await trio.sleep_until(deadline)
            frame = await camera.read()
            now = trio.current_time()
            if frame is None:
                stats.read_failures += 1
                if now - last_frame > STALL_SECONDS:
                    raise DeviceError(
                        f"camera {camera.device} stopped delivering frames (none for {now - last_frame:.1f} s); "
                        "check its cable and that no other program took it"
                    )
            else:
                last_frame = now
                stats.captured += 1
                try:
                    send.send_nowait(frame)
                except trio.WouldBlock:
                    stats.dropped += 1
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    stats.consumer_closed = True
                    break
                else:
                    stats.sent += 1
            slot += 1
            # A read that ran past the next slot: skip to the newest slot due instead of bursting.
            due = math.floor((now - t0) / period)
            if due > slot:
                stats.late += due - slot
                slot = due
        else:
            await trio.sleep_until(end)  # the last frame's period is part of the capture
    finally:
        stats.seconds = trio.current_time() - t0
        stats.restarts += camera.restarts - restarts_before
    return stats


async def capture(
    cfg: CameraConfig,
    send: trio.MemorySendChannel[CapturedFrame],
    *,
    seconds: float | None,
    stats: CaptureStats | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> CaptureStats:
    """Open ``cfg.device``, report started, capture for ``seconds`` (None: forever), release it.

    ``send`` is closed when the capture ends, however it ends: the consumer sees EndOfChannel.
    Raises DeviceError when the device cannot be opened or stops delivering frames.
    """
    stats = stats if stats is not None else CaptureStats()
    async with send, opened_camera(cfg) as camera:
        log.debug("camera_opened", **camera.describe())
        task_status.started()
        return await capture_from(camera, cfg.fps, send, seconds=seconds, stats=stats)


def session_name(now: float) -> str:
    """``cam-20250513T164620-551``: UTC time of the session's start, to the millisecond."""
    return _name(int(now * 1000))


def _name(millis: int) -> str:
    seconds, millis = divmod(millis, 1000)
    return f"cam-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(seconds))}-{millis:03d}"


OnSession = Callable[[str, trio.MemoryReceiveChannel[CapturedFrame]], Awaitable[None]]


async def run_camera(
    cfg: CameraConfig,
    on_session: OnSession,
    *,
    channel_size: int = 8,
    retry_initial: float = RETRY_INITIAL,
    retry_max: float = RETRY_MAX,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Capture back-to-back sessions of ``cfg.session_seconds`` forever, each handed to ``on_session``.

    For each session a bounded channel is made and ``on_session(name, receive)`` runs while the
    capture fills it; the channel closes when the session's time is up (or the device fails), so
    the consumer ends on EndOfChannel. The next session starts when ``on_session`` has returned
    and ``cfg.interval_seconds`` have passed; with no interval the device stays open in between.
    A consumer that returns early closes the channel: the capture stops and the session's time
    runs out before the next one starts. A device missing or failing is reopened with backoff
    (``retry_initial`` doubling to ``retry_max``), logged once per change of state. Exceptions
    from ``on_session`` propagate (inside the ExceptionGroup of the session's nursery).
    Reports started after the first attempt to open the device, whether or not it opened, so a
    missing camera does not hold up the daemon's readiness.
    """
    available: bool | None = None
    delay = 0.0
    backoff = retry_initial
    # Each session's name is a millisecond later than the last: two sessions in one millisecond,
    # or a wall clock stepped back (NTP), still get names, and log lines, of their own, in order.
    last_millis = 0
    while True:
        if delay:
            await trio.sleep(delay)
        try:
            async with opened_camera(cfg) as camera:
                if available is not True:
                    log.info("camera_available", source="camera", **camera.describe())
                available = True
                backoff = retry_initial
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
                while True:
                    last_millis = max(int(time.time() * 1000), last_millis + 1)
                    await _camera_session(camera, _name(last_millis), cfg, on_session, channel_size)
                    if cfg.interval_seconds > 0:
                        break  # release the camera during the pause
            delay = cfg.interval_seconds
        except DeviceError as exc:
            if available is not False:
                log.warning("camera_unavailable", source="camera", device=cfg.device, reason=str(exc),
                            retry_seconds=backoff)
            available = False
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            delay, backoff = backoff, min(backoff * 2, retry_max)


async def _camera_session(camera: Camera, name: str, cfg: CameraConfig, on_session: OnSession,
                          channel_size: int) -> None:
    send, receive = trio.open_memory_channel[CapturedFrame](channel_size)
    stats = CaptureStats()
    failure: DeviceError | None = None
    complete = False
    started = trio.current_time()

    async def run_capture() -> None:
        nonlocal failure, complete
        async with send:
            try:
                await capture_from(camera, cfg.fps, send, seconds=cfg.session_seconds, stats=stats)
            except DeviceError as exc:
                failure = exc
            else:
                complete = not stats.consumer_closed

    async def run_consumer() -> None:
        async with receive:
            await on_session(name, receive)

    with structlog.contextvars.bound_contextvars(source="camera", session=name):
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_capture)
                nursery.start_soon(run_consumer)
        finally:  # also when cancelled: every session has its line
            if stats.dropped:
                log.warning("camera_frames_dropped", count=stats.dropped, channel_size=channel_size)
            log.info("camera_session_captured", complete=complete, **stats.as_log())
    if failure is not None:
        raise failure
    if stats.consumer_closed:
        # The consumer gave up early: keep the session's time box so a failing consumer is not
        # handed a new session many times a second.
        await trio.sleep_until(started + cfg.session_seconds)
