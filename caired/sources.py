"""Where a session's frames come from: a folder read again on every attempt, or a live feed.

A source lists its frames once and, for each attempt, ``open()`` starts a ``Feed``: the
encoded frames in order, read and encoded in worker threads ahead of the sender, with the
frames that could not be read reported (once per session) and skipped.
"""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import attrs
import structlog
import trio

from caired.config import Config
from caired.errors import FrameError, NoFramesError, Retry, SessionError
from caired.frames import (
    RAW_BATCH,
    EncodedFrame,
    FrameFolder,
    FrameLimits,
    FrameRef,
    Listing,
    Result,
    encode_pipeline,
    encoder,
)
from caired.fsops import shown

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
    """A folder of ``<timestamp>.png`` frames, listed once, re-read on every attempt.

    The folder is opened once, by ``prepare()``, and its descriptor kept until
    ``aclose()``: every frame of every attempt is opened relative to it, so a folder
    renamed or swapped for a link meanwhile changes nothing. Use it as ``async with
    FolderSource(...) as source:``, which closes it. ``follow_symlinks=False`` (the
    daemon's spool) refuses the folder or any frame that is a symbolic link;
    ``dir_fd`` opens ``directory`` relative to a folder the caller holds (``Path(".")``
    with a held folder's descriptor opens that very folder), and ``label`` names it in
    messages when ``directory`` alone would not.
    """

    directory: Path
    cfg: Config
    limiter: trio.CapacityLimiter
    follow_symlinks: bool = True
    dir_fd: int | None = None
    label: str = ""
    frames: tuple[FrameRef, ...] = ()
    ignored: int = 0
    skipped: set[str] = attrs.field(factory=set)
    _folder: FrameFolder | None = attrs.field(default=None, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    @property
    def total(self) -> int | None:
        return len(self.frames)

    @property
    def _shown(self) -> str:
        return self.label or shown(os.fspath(self.directory))

    async def __aenter__(self) -> FolderSource:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def prepare(self) -> None:
        """Open and list the folder; NoFramesError when it cannot be read or has no frame file.

        The worker thread is let go on cancel (a folder on a hung mount cannot hold up a
        shutdown); a descriptor it opens after that is closed by the thread itself.
        """
        listing = await trio.to_thread.run_sync(self._open_and_list, abandon_on_cancel=True)
        self.frames, self.ignored = listing.frames, listing.ignored
        if listing.ignored:
            log.info("files_ignored", count=listing.ignored, examples=list(listing.examples),
                     reason="not named <timestamp>.png")
        if not listing.frames:
            raise NoFramesError(
                f"{self._shown}: no frames (expected files named like 1747154380.5511632.png)"
            )

    def _open_and_list(self) -> Listing:
        # Opened outside the lock: on a hung mount the open may take forever in this (let go)
        # thread, and aclose() takes the lock on the event loop.
        opened = None if self._folder is not None else FrameFolder.open(
            self.directory, follow_symlinks=self.follow_symlinks, dir_fd=self.dir_fd, label=self._shown)
        with self._lock:
            if opened is not None and (self._closed or self._folder is not None):
                stale, opened = opened, None  # closed (or opened) meanwhile: this one is not needed
            else:
                stale = None
            if opened is not None:
                self._folder = opened
            folder = self._folder
        if stale is not None:
            stale.close()
        if folder is None:
            raise NoFramesError(f"{self._shown}: the source was closed")
        return folder.list()

    async def aclose(self) -> None:
        """Close the folder's descriptor; the source cannot be opened again. Idempotent."""
        with self._lock:
            self._closed = True
            folder, self._folder = self._folder, None
        if folder is not None:
            folder.close()
        await trio.lowlevel.checkpoint()

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Feed]:
        folder = self._folder
        if folder is None:
            raise NoFramesError(f"{self._shown}: not prepared, or already closed")
        stream_cfg = self.cfg.stream
        encode = encoder(stream_cfg.format, stream_cfg.jpeg_quality, folder, FrameLimits.from_config(stream_cfg))
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
