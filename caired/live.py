"""Live camera sessions in the daemon, with store-and-forward.

Each camera session is two things at once. Its frames are written to the spool as
they are captured (``active/cam-<time>/``, each PNG written whole), and they stream
live to the backend (timestamps are the capture times; no pacing, the camera paces).
A live stream cannot wait: a frame that finds the live queue full is dropped from
the stream and counted, never queued without bound, but it is still recorded.

When the live stream finishes, the recording is filed in ``done/`` like any other
session. When it fails — backend down, connection lost, key rejected — or is skipped
because the backend is known to be down, the recording moves to ``incoming/`` when
capture ends and is streamed later like a dropped folder, under the same datapt_id:
no camera session is lost to an outage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import attrs
import structlog
import trio

from caired._trio import open_nursery
from caired.camera import CapturedFrame, run_camera
from caired.errors import CairedError, NoFramesError, SessionError
from caired.frames import EncodedFrame, encode_image
from caired.record import write_frame
from caired.session import Delivered, deliver
from caired.sources import LiveSource
from caired.spool import Claim, Spool, SpoolError

if TYPE_CHECKING:
    from caired.daemon import Daemon

log = structlog.get_logger()

WRITERS: Final = 2  # PNG encodes in flight per camera session
CLEANUP_DEADLINE: Final = 5.0


async def serve_camera(
    daemon: Daemon, nursery: trio.Nursery, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Back-to-back camera sessions for as long as the daemon runs."""

    async def on_session(name: str, frames: trio.MemoryReceiveChannel[CapturedFrame]) -> None:
        await camera_session(daemon, name, frames)

    await run_camera(daemon.cfg.camera, on_session, channel_size=daemon.cfg.stream.send_queue,
                     task_status=task_status)


@attrs.define
class _Counts:
    recorded: int = 0
    live_dropped: int = 0


async def camera_session(daemon: Daemon, name: str, frames: trio.MemoryReceiveChannel[CapturedFrame]) -> None:
    spool, cfg = daemon.spool, daemon.cfg
    try:
        claim = await trio.to_thread.run_sync(lambda: spool.create_active(name, source="camera"))
    except SpoolError as err:
        log.error("camera_session_not_recorded", session=name, problem=str(err))
        async with frames:
            pass  # closing our end ends the capture: nothing can be kept
        return
    with structlog.contextvars.bound_contextvars(source="camera", session=claim.name, datapt_id=claim.datapt_id):
        daemon.in_flight.add(claim)
        daemon.changed()
        counts = _Counts()
        delivered: Delivered | None = None
        filed = False
        try:
            live_send, live_receive = trio.open_memory_channel[CapturedFrame](cfg.stream.send_queue)
            go_live = daemon.gate.state in ("up", "unknown")
            if not go_live:
                log.info("camera_live_skipped", reason=f"backend {daemon.gate.state}", then="store and forward")
                live_send.close()
            async with open_nursery() as nursery:
                nursery.start_soon(_record, claim, frames, live_send if go_live else None, counts, daemon.limiter)
                if go_live:
                    delivered = await _stream_live(daemon, claim, live_receive)
            log.info("camera_session_captured", frames=counts.recorded, live_dropped=counts.live_dropped)
            if counts.recorded == 0:
                await trio.to_thread.run_sync(lambda: spool.fail(claim, {"session": claim.name,
                                                                         "reason": "the camera delivered no frame"}))
            elif delivered is not None:
                result = delivered.result(source="camera", frames_recorded=counts.recorded,
                                          frames_dropped_live=counts.live_dropped)
                await trio.to_thread.run_sync(lambda: spool.finish(claim, result))
                daemon.finished += 1
            else:
                await trio.to_thread.run_sync(lambda: spool.handoff(claim))
                log.info("camera_session_stored", frames=counts.recorded, then="streamed from incoming/")
            filed = True
        except SpoolError as err:
            log.error("spool_write_failed", problem=str(err))
        finally:
            daemon.in_flight.discard(claim)
            daemon.changed()
            if not filed and claim.held:
                with trio.move_on_after(CLEANUP_DEADLINE, shield=True):
                    await trio.to_thread.run_sync(_handoff_quietly, spool, claim)


async def _record(
    claim: Claim,
    frames: trio.MemoryReceiveChannel[CapturedFrame],
    live: trio.MemorySendChannel[CapturedFrame] | None,
    counts: _Counts,
    limiter: trio.CapacityLimiter,
) -> None:
    """Write every captured frame into the session folder; offer each to the live stream."""
    writers = trio.Semaphore(WRITERS)

    async def write(frame: CapturedFrame) -> None:
        try:
            await trio.to_thread.run_sync(write_frame, claim.path, frame, limiter=limiter)
            counts.recorded += 1
        except (OSError, CairedError) as err:
            log.error("camera_frame_not_recorded", frame=frame.timestamp, problem=str(err))
        finally:
            writers.release()

    async with frames, open_nursery() as nursery:
        try:
            async for frame in frames:
                await writers.acquire()  # the capture's own channel absorbs (and counts) what cannot wait
                nursery.start_soon(write, frame)
                if live is not None:
                    try:
                        live.send_nowait(frame)
                    except trio.WouldBlock:
                        counts.live_dropped += 1
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        live = None  # the live stream ended early; keep recording
        finally:
            if live is not None:
                live.close()


async def _stream_live(
    daemon: Daemon, claim: Claim, frames: trio.MemoryReceiveChannel[CapturedFrame]
) -> Delivered | None:
    cfg = attrs.evolve(daemon.cfg, stream=attrs.evolve(daemon.cfg.stream, fps=0.0))  # the camera paces
    quality = cfg.stream.jpeg_quality

    def encode(frame: CapturedFrame) -> EncodedFrame:
        return encode_image(frame.image, frame.timestamp, quality)

    async with frames:
        source = LiveSource(frames, encode, cfg, daemon.limiter)
        try:
            return await deliver(source, cfg=cfg, gate=daemon.gate, name=claim.name, datapt_id=claim.datapt_id,
                                 attempts=1, first_attempt=claim.attempts + 1,
                                 on_attempt=lambda _n: claim.record_attempt())
        except (SessionError, NoFramesError) as err:
            log.warning("camera_live_failed", reason=str(err), then="store and forward")
            return None


def _handoff_quietly(spool: Spool, claim: Claim) -> None:
    try:
        spool.handoff(claim)
    except SpoolError as err:
        log.error("camera_handoff_failed", problem=str(err))
