"""Where a session's frames come from: a folder read again on every attempt, or a live feed.

A source lists its frames once and, for each attempt, ``open()`` starts a ``Feed``: the
encoded frames in order, read and encoded in worker threads ahead of the sender, with the
frames that could not be read reported (once per session) and skipped.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import attrs
import structlog
import trio

from caired.config import Config
from caired.errors import FrameError, NoFramesError, Retry, SessionError
from caired.frames import RAW_BATCH, EncodedFrame, FrameRef, Result, encode_pipeline, encoder, list_frames

log = structlog.get_logger()


@attrs.define
class Feed:
    """The encoded frames of one attempt, with the first usable one looked at early."""

    channel: trio.MemoryReceiveChannel[Result]
    on_skip: Callable[[FrameError], None]
    skipped: int = 0
    _pending: list[EncodedFrame] = attrs.field(factory=list)

    async def first(self) -> EncodedFrame | None:
        """The first usable frame (kept for ``next``), or None when there is none."""
        frame = await self.next()
        if frame is not None:
            self._pending.insert(0, frame)
        return frame

    async def next(self) -> EncodedFrame | None:
        if self._pending:
            return self._pending.pop(0)
        async for result in self.channel:
            if isinstance(result, FrameError):
                self.skipped += 1
                self.on_skip(result)
                continue
            return result
        return None



class FrameSource(Protocol):
    """Where a session's frames come from; ``open()`` starts one attempt's feed."""

    @property
    def total(self) -> int | None: ...

    def open(self) -> AbstractAsyncContextManager[Feed]: ...


@attrs.define
class FolderSource:
    """A folder of ``<timestamp>.png`` frames, listed once, re-read on every attempt."""

    directory: Path
    cfg: Config
    limiter: trio.CapacityLimiter
    frames: tuple[FrameRef, ...] = ()
    ignored: int = 0
    skipped: set[str] = attrs.field(factory=set)

    @property
    def total(self) -> int | None:
        return len(self.frames)

    async def prepare(self) -> None:
        """List the folder; NoFramesError when it is missing or has no frame file."""
        listing = await trio.to_thread.run_sync(list_frames, self.directory)
        self.frames, self.ignored = listing.frames, listing.ignored
        if listing.ignored:
            log.info("files_ignored", count=listing.ignored, reason="not named <timestamp>.png")
        if not listing.frames:
            raise NoFramesError(f"{self.directory}: no frames (expected files named like 1747154380.5511632.png)")

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Feed]:
        stream_cfg = self.cfg.stream
        encode = encoder(stream_cfg.format, stream_cfg.jpeg_quality)
        batch = RAW_BATCH if stream_cfg.format == "raw" else 1
        async with encode_pipeline(
            self.frames, encode, depth=stream_cfg.send_queue, limiter=self.limiter, batch=batch
        ) as chan:
            yield Feed(chan, self._skip)

    def _skip(self, error: FrameError) -> None:
        if error.name not in self.skipped:  # once per session, not once per attempt
            self.skipped.add(error.name)
            log.warning("frame_skipped", frame=error.name, problem=error.problem)


@attrs.define
class LiveSource:
    """Frames arriving as they are captured; one attempt only (store-and-forward covers the rest)."""

    channel: trio.MemoryReceiveChannel[Any]
    encode: Callable[[Any], EncodedFrame]
    cfg: Config
    limiter: trio.CapacityLimiter
    skipped: int = 0
    _used: bool = False

    @property
    def total(self) -> int | None:
        return None

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Feed]:
        if self._used:
            raise SessionError("a live session cannot be streamed twice", retry=Retry.NEVER)
        self._used = True
        depth = self.cfg.stream.send_queue
        async with encode_pipeline(self.channel, self.encode, depth=depth, limiter=self.limiter) as chan:
            yield Feed(chan, self._skip)

    def _skip(self, error: FrameError) -> None:
        self.skipped += 1
        log.warning("frame_skipped", frame=error.name, problem=error.problem)
