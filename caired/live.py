"""Live camera sessions in the daemon, with store-and-forward.

Each camera session is two things at once. Each frame is encoded once, as the JPEG the
backend is sent (``stream.jpeg_quality``), and those very bytes are both written to the
spool (``active/cam-<time>/<timestamp>.jpg``, each written whole) and streamed live
(timestamps are the capture times; no pacing, the camera paces). A recording streamed
later therefore sends exactly what the live session sent, byte for byte. (It used to be
a PNG per frame: ~9 CPU ms of encoding at 640x480, more than everything else a frame needs.)
A live stream cannot wait: a frame that finds the live queue full is dropped from
the stream and counted, never queued without bound, but it is still recorded.

When the live stream finishes, the recording is filed in ``done/`` like any other
session. When it fails — backend down, connection lost, key rejected — or is skipped
because the backend is known to be down, the recording moves to ``incoming/`` when
capture ends and is streamed later like a dropped folder, under the same datapt_id:
no camera session is lost to an outage.

Low disk: below ``[retention] free_space_floor`` (``retention.Disk``, looked at before
each frame) frames stream live but are not written, said once per session
(``camera_not_recorded``) and in ``STATUS=``; the session folder and its result.json
are still written (they are small). A full disk (ENOSPC) at a frame ends the recording
of that session the same way, not one error per frame. A session recorded only in part
whose live stream failed is kept and streamed later with the frames it has; one with no
frame recorded and no live stream is filed in ``failed/`` saying why.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Final

import attrs
import pybase64
import structlog
import trio

from caired._trio import open_nursery
from caired.camera import CapturedFrame, run_camera
from caired.errors import CairedError, NoFramesError, Retry, SessionError, SpoolError
from caired.frames import EncodedFrame, encode_jpeg
from caired.lifecycle import Context, Done, Outcome, Store, run_session
from caired.record import write_encoded
from caired.retention import Disk
from caired.session import Delivered, Limits, deliver
from caired.sources import LiveSource
from caired.spool import Claim

log = structlog.get_logger()

WRITERS: Final = 2  # frame files being written (and fsynced) at once per camera session
_DISK_FULL: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


async def serve_camera(ctx: Context, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Back-to-back camera sessions for as long as the daemon runs."""

    async def on_session(name: str, frames: trio.MemoryReceiveChannel[CapturedFrame]) -> None:
        await camera_session(ctx, name, frames)

    await run_camera(ctx.cfg.camera, on_session, channel_size=ctx.cfg.stream.send_queue, task_status=task_status)


@attrs.define
class _Counts:
    captured: int = 0
    recorded: int = 0
    live_dropped: int = 0
    not_recorded: int = 0  # frames the disk had no room for
    stopped: str | None = None  # why recording stopped (low disk, full disk)


async def camera_session(ctx: Context, name: str, frames: trio.MemoryReceiveChannel[CapturedFrame]) -> None:
    """One camera session: recorded into a new folder of active/ while it streams live, then
    filed through the same lifecycle as a dropped folder."""
    try:
        claim = await trio.to_thread.run_sync(lambda: ctx.spool.create_active(name, source="camera"))
    except Exception as err:  # a spool error, or a bug: this session is lost, never the daemon
        if not isinstance(err, SpoolError):
            log.error("internal_error", where="camera session folder", error_type=type(err).__name__,
                      reason=str(err), exc_info=True)
        log.error("camera_session_not_recorded", session=name, reason=str(err))
        async with frames:
            pass  # closing our end ends the capture: nothing can be kept
        return

    async def stream() -> Outcome:
        counts = _Counts()
        delivered: Delivered | None = None
        # What waits for the sender: the send queue, and as much again, which an encode pipeline
        # between the two held before the frames came to the sender straight.
        live_send, live_receive = trio.open_memory_channel[EncodedFrame](2 * ctx.cfg.stream.send_queue)
        go_live = ctx.gate.state in ("up", "unknown")
        if not go_live:
            log.info("camera_live_skipped", reason=f"backend {ctx.gate.state}", then="store and forward")
            live_send.close()
        async with open_nursery() as nursery:
            nursery.start_soon(_record, claim, frames, live_send if go_live else None, counts, ctx.limiter,
                               ctx.cfg.stream.jpeg_quality, ctx.disk)
            if go_live:
                delivered = await _stream_live(ctx, claim, live_receive)
        ctx.stats.live_dropped += counts.live_dropped
        log.info("camera_session_recorded", frames=counts.recorded, live_dropped=counts.live_dropped,
                 not_recorded=counts.not_recorded, streamed_live=delivered is not None)
        if counts.captured == 0:
            raise NoFramesError("the camera delivered no frame")
        if delivered is None:
            if counts.recorded == 0:
                raise NoFramesError(f"no frame was recorded ({counts.stopped}) and the live stream did not finish: "
                                    "this session is lost; free space on the spool's filesystem")
            log.info("camera_session_stored", frames=counts.recorded, then="streamed from incoming/",
                     **({"incomplete": counts.stopped} if counts.stopped else {}))
            return Store()
        return Done(delivered.result(source="camera", frames_recorded=counts.recorded,
                                     frames_dropped_live=counts.live_dropped,
                                     frames_not_recorded=counts.not_recorded))

    await run_session(ctx, claim, stream, on_shutdown="handoff")


@attrs.frozen
class _Encoded:
    """A captured frame encoded once: the JPEG bytes written to disk, and the same as base64 for the wire."""

    jpeg: bytes
    frame: EncodedFrame


def _encode(frame: CapturedFrame, quality: int) -> _Encoded:
    jpeg = encode_jpeg(frame.image, quality, name=frame.timestamp, order="BGR")
    return _Encoded(jpeg, EncodedFrame(frame.timestamp, pybase64.b64encode(jpeg)))


async def _record(
    claim: Claim,
    frames: trio.MemoryReceiveChannel[CapturedFrame],
    live: trio.MemorySendChannel[EncodedFrame] | None,
    counts: _Counts,
    limiter: trio.CapacityLimiter,
    quality: int,
    disk: Disk | None = None,
) -> None:
    """Encode every captured frame once, in order; write each into the session folder while
    the disk has room, and offer it to the live stream.

    Encoding keeps the capture's order (the live stream's order); the writes, which wait
    for the disk, run beside it, at most WRITERS at a time.
    """
    writers = trio.Semaphore(WRITERS)

    def stop(why: str) -> None:
        if counts.stopped is None:
            counts.stopped = why
            log.warning("camera_not_recorded", reason=why, then="streamed live only")

    def keep(folder: Path, encoded: _Encoded) -> bool:
        """Write the frame into ``folder`` if the disk has room; False if it has not. Blocking: one
        thread hop a frame for both (a hop each cost 1-1.6% of a core more at 30 fps, 640x480)."""
        if disk is not None and disk.check():
            return False
        write_encoded(folder, encoded.frame.timestamp, encoded.jpeg)
        return True

    async def write(encoded: _Encoded) -> None:
        frame = encoded.frame
        try:
            if counts.stopped is None and await trio.to_thread.run_sync(keep, claim.path, encoded, limiter=limiter):
                counts.recorded += 1
                return
            if counts.stopped is None:
                stop("the spool's filesystem is below retention.free_space_floor")
            counts.not_recorded += 1
        except (OSError, CairedError) as err:
            if isinstance(err, OSError) and err.errno in _DISK_FULL:
                stop(f"the spool's filesystem is full ({err.strerror})")
                counts.not_recorded += 1
            else:
                log.error("camera_frame_not_recorded", frame=frame.timestamp, reason=str(err))
        finally:
            writers.release()

    async with frames, open_nursery() as nursery:
        try:
            async for captured in frames:
                counts.captured += 1
                try:
                    encoded = await trio.to_thread.run_sync(_encode, captured, quality, limiter=limiter)
                except CairedError as err:  # FrameError: this frame cannot be encoded, neither kept nor sent
                    log.error("camera_frame_not_recorded", frame=captured.timestamp, reason=str(err))
                    continue
                del captured  # the image (0.9-2.7 MB) is not kept while the frame waits to be written
                await writers.acquire()  # the capture's own channel absorbs (and counts) what cannot wait
                nursery.start_soon(write, encoded)
                if live is not None:
                    try:
                        live.send_nowait(encoded.frame)
                    except trio.WouldBlock:
                        counts.live_dropped += 1
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        live = None  # the live stream ended early; keep recording
        finally:
            if live is not None:
                live.close()


async def _stream_live(
    ctx: Context, claim: Claim, frames: trio.MemoryReceiveChannel[EncodedFrame]
) -> Delivered | None:
    cfg = attrs.evolve(ctx.cfg, stream=attrs.evolve(ctx.cfg.stream, fps=0.0))  # the camera paces

    async with frames:
        source = LiveSource(frames)  # encoded once, by _record, for the disk and the wire alike
        try:
            return await deliver(source, cfg=cfg, gate=ctx.gate, name=claim.shown, datapt_id=claim.datapt_id,
                                 limits=Limits(attempts=1), first_attempt=claim.attempts + 1,
                                 on_attempt=lambda _n: claim.begin_attempt(), on_attempt_end=claim.end_attempt,
                                 stats=ctx.stats)
        except (SessionError, NoFramesError) as err:
            if isinstance(err, SessionError) and err.retry is Retry.NEVER and err.close_code is not None:
                raise  # the backend refused this session's frames: streaming the recording again sends the same
            log.warning("camera_live_failed", reason=str(err), then="store and forward")
            return None
