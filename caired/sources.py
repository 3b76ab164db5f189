"""Where a session's frames come from: a folder (frames, a video, a dataset's session) read again on every
attempt, or a live feed.

A source lists its frames once and, for each attempt, ``open()`` starts a ``Feed``: the
encoded frames in order, read and encoded in worker threads ahead of the sender (a live
feed's frames come encoded already), with the frames that could not be read reported (once
per session) and skipped.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import attrs
import pybase64
import structlog
import trio

from caired import fsops, video
from caired.config import Config
from caired.errors import FrameError, GroundTruthError, LayoutError, NoFramesError, Retry, SessionError
from caired.frames import (
    EncodedFrame,
    FrameFolder,
    FrameLimits,
    FrameRef,
    Result,
    encode_image,
    encode_pipeline,
    encoder,
    folder_batch,
    read_jpeg_file,
)
from caired.fsops import shown
from caired.layouts import EXPECTED, MAX_REFERENCE_BYTES, Entry, Layout, classify, pure_frames, single_video
from caired.reference import Estimate, Reference, hr_series, parse_csv, parse_pure, parse_ubfc, window_hr

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
    """A folder of frames, a video, or a dataset's session, recognised by its layout; re-read on every attempt.

    The folder is opened once, by ``prepare()``, and its descriptor kept until
    ``aclose()``: every frame of every attempt (and the video, the reference file, PURE's
    frame folder) is opened relative to it, so a folder renamed or swapped for a link
    meanwhile changes nothing. Use it as ``async with FolderSource(...) as source:``,
    which closes it. ``follow_symlinks=False`` (the daemon's spool) refuses the folder or
    any file in it that is a symbolic link; ``dir_fd`` opens ``directory`` relative to a
    folder the caller holds (``Path(".")`` with a held folder's descriptor opens that very
    folder), and ``label`` names it in messages when ``directory`` alone would not.
    ``directory`` may also be a video file (``caired stream clip.mp4``).

    What the folder holds is decided by ``layouts.classify`` and logged as
    ``source_layout``. A reference (``reference.csv``, UBFC's ``ground_truth.txt``,
    PURE's JSON) is read then, and once a whole attempt's frames have been produced the
    reference HR over their time span is logged as ``reference_hr``; ``reference_fields()``
    gives it for ``result.json``.
    """

    directory: Path
    cfg: Config
    limiter: trio.CapacityLimiter
    follow_symlinks: bool = True
    dir_fd: int | None = None
    label: str = ""
    start_time: Decimal | None = None  # a video's first frame, UNIX seconds (--start-time)
    frames: tuple[FrameRef, ...] = ()
    ignored: int = 0
    skipped: set[str] = attrs.field(factory=set)
    layout: Layout | None = None
    reference: Reference | None = None
    estimate: Estimate | None = None
    reference_problem: str | None = None
    _folder: FrameFolder | None = attrs.field(default=None, init=False)
    _images: FrameFolder | None = attrs.field(default=None, init=False)  # PURE's subfolder
    _only: str | None = attrs.field(default=None, init=False)  # the video file ``directory`` names
    _video_fd: int = attrs.field(default=-1, init=False)
    _video_start: Decimal = attrs.field(default=Decimal(0), init=False)
    _video_frames: int = attrs.field(default=0, init=False)
    _reported: bool = attrs.field(default=False, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    @property
    def total(self) -> int | None:
        if self.layout is not None and self.layout.video is not None:
            return self._video_frames or None
        return len(self.frames)

    @property
    def _shown(self) -> str:
        return self.label or shown(os.fspath(self.directory))

    async def __aenter__(self) -> FolderSource:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def prepare(self) -> None:
        """Open the folder, recognise its layout, read its reference; NoFramesError (or LayoutError) says why not.

        The worker thread is let go on cancel (a folder on a hung mount cannot hold up a
        shutdown); a descriptor it opens after that is closed by the thread itself.
        """
        prepared = await trio.to_thread.run_sync(self._open_and_detect, abandon_on_cancel=True)
        layout = self.layout = prepared.layout
        self.frames, self.ignored, self.reference = layout.frames, layout.ignored, prepared.reference
        extra: dict[str, Any] = {}
        if layout.video is not None:
            self._video_start, self._video_frames = prepared.start, prepared.video_frames
            extra = {"video": layout.video, "start_time": str(prepared.start), "start_from": prepared.start_from,
                     "video_fps": prepared.fps}
        else:
            extra = {"frames": len(layout.frames)}
        log.info("source_layout", layout=layout.kind, explanation=layout.explanation,
                 reference=self.reference.origin if self.reference is not None else None, **extra)
        if layout.ignored:
            log.info("files_ignored", count=layout.ignored, examples=list(layout.examples),
                     reason=f"not part of the {layout.kind} layout")
        if layout.video is None and not layout.frames:
            raise NoFramesError(f"{self._shown}: no frames ({EXPECTED})")

    def _open_and_detect(self) -> _Prepared:
        # Opened outside the lock: on a hung mount the open may take forever in this (let go)
        # thread, and aclose() takes the lock on the event loop.
        opened = None if self._folder is not None else self._open()
        with self._lock:
            if opened is not None and (self._closed or self._folder is not None):
                stale, opened = opened, None  # closed (or opened) meanwhile: this one is not needed
            else:
                stale = None
            if opened is not None:
                self._folder, self._only = opened
            folder = self._folder
        if stale is not None:
            stale[0].close()
        if folder is None:
            raise NoFramesError(f"{self._shown}: the source was closed")
        try:
            prepared = self._detect(folder)
        except GroundTruthError as err:
            raise LayoutError(f"{self._shown}: {err}") from None
        with self._lock:
            closed = self._closed
        if closed:  # closed while this thread was let go: what it opened is closed here
            self._close_opened()
            raise NoFramesError(f"{self._shown}: the source was closed")
        return prepared

    def _close_opened(self) -> None:
        with self._lock:
            images, self._images = self._images, None
            fd, self._video_fd = self._video_fd, -1
        if images is not None:
            images.close()
        if fd >= 0:
            os.close(fd)

    def _open(self) -> tuple[FrameFolder, str | None]:
        """The folder, or (``caired stream FILE``) the folder holding the file, and the file's name."""
        try:
            return FrameFolder.open(self.directory, follow_symlinks=self.follow_symlinks, dir_fd=self.dir_fd,
                                    label=self._shown), None
        except NoFramesError:
            if self.dir_fd is not None or not self.directory.is_file():
                raise
            return FrameFolder.open(self.directory.parent, follow_symlinks=True, label=self._shown), \
                self.directory.name

    def _detect(self, folder: FrameFolder) -> _Prepared:
        if self._only is not None:
            layout = single_video(self._only, self._shown)
        else:
            try:
                entries = [Entry(os.fsencode(e.name), e.is_dir(follow_symlinks=False))
                           for e in os.scandir(folder.fileno())]
            except OSError as exc:
                raise NoFramesError(f"{self._shown}: cannot be listed: {exc.strerror or exc}") from None
            layout = classify(entries, self._shown)
        if layout.images is not None:  # PURE as it ships: the frames in a subfolder
            self._images = FrameFolder.open(Path(layout.images), follow_symlinks=self.follow_symlinks,
                                            dir_fd=folder.fileno(), label=f"{self._shown}/{shown(layout.images)}")
            names = [os.fsencode(name) for name in os.listdir(self._images.fileno())]
            frames = pure_frames(names)
            if not frames:
                raise LayoutError(f"{self._shown}: {shown(layout.images)}/ holds no Image<ns>.png frames")
            layout = attrs.evolve(layout, frames=frames)
        prepared = _Prepared(layout)
        if layout.video is not None:
            self._video_fd = video.open_video(folder.fileno(), layout.video, follow_symlinks=self.follow_symlinks)
            info = video.probe(self._video_fd, layout.video, f"{self._shown}: {shown(layout.video)}",
                               max_pixels=self.cfg.stream.max_frame_pixels)
            prepared.start, prepared.start_from = video.start_time(self._video_fd, info, self.start_time)
            prepared.video_frames, prepared.fps = info.frames, round(info.fps, 3)
        if layout.reference is not None:
            prepared.reference = self._read_reference(folder, layout, prepared.start)
        return prepared

    def _read_reference(self, folder: FrameFolder, layout: Layout, start: Decimal) -> Reference:
        name = layout.reference or ""
        try:
            data = fsops.read_regular(folder.fileno(), name, MAX_REFERENCE_BYTES, follow_symlinks=self.follow_symlinks)
        except OSError as exc:
            raise LayoutError(f"{self._shown}: {shown(name)}: cannot be read: {exc.strerror or exc}") from None
        first = float(layout.frames[0].timestamp) if layout.frames else float(start)
        if layout.reference_kind == "ubfc":
            return parse_ubfc(data, start=float(start), origin=name)
        if layout.reference_kind == "pure":
            ref, stamps = parse_pure(data, origin=name)
            named = {int(Decimal(f.timestamp).scaleb(9)) for f in layout.frames}
            if stamps and not named & set(stamps):
                raise LayoutError(f"{self._shown}: {shown(name)}: its /Image timestamps match none of the frames")
            return ref
        return parse_csv(data, first_frame=first, origin=name)

    async def aclose(self) -> None:
        """Close the folder's descriptors; the source cannot be opened again. Idempotent."""
        with self._lock:
            self._closed = True
            folder, self._folder = self._folder, None
        if folder is not None:
            folder.close()
        self._close_opened()
        await trio.lowlevel.checkpoint()

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Feed]:
        folder = self._images or self._folder
        if folder is None or self.layout is None:
            raise NoFramesError(f"{self._shown}: not prepared, or already closed")
        stream_cfg = self.cfg.stream
        window = _Window()
        reader: video.VideoReader | None = None
        if self.layout.video is not None:
            label = f"{self._shown}: {shown(self.layout.video)}"
            reader = await trio.to_thread.run_sync(functools.partial(
                video.VideoReader, self._video_fd, label, self._video_start, max_pixels=stream_cfg.max_frame_pixels))
            decoded = video.frames(reader, self.limiter)
            items: Any = window.watch_async(decoded)
            encode: Callable[[Any], EncodedFrame] = functools.partial(
                _encode_video_frame, fmt=stream_cfg.format, quality=stream_cfg.jpeg_quality)
            batch = 1
        else:
            limits = FrameLimits.from_config(stream_cfg)
            encode_other = encoder(stream_cfg.format, stream_cfg.jpeg_quality, folder, limits)

            def encode(ref: FrameRef) -> EncodedFrame:  # a JPEG frame goes as it is, in either format
                return read_jpeg_file(ref, folder, limits) if ref.is_jpeg else encode_other(ref)

            items = window.watch(self.frames)
            batch = folder_batch(stream_cfg.format, stream_cfg.send_queue, int(self.limiter.total_tokens))
        try:
            async with encode_pipeline(items, encode, depth=stream_cfg.send_queue, limiter=self.limiter,
                                       batch=batch) as chan:
                yield Feed(chan, self._skip)
        finally:
            if reader is not None:  # the decoder goes now, not when the generators are collected
                with trio.CancelScope(shield=True):
                    await items.aclose()
                    await decoded.aclose()
                reader.close()
        if window.complete and reader is not None and window.count < self._video_frames and not self._reported:
            # A truncated file or a decoder error ends a video where it happened: say so, once.
            log.warning("video_ended_early", frames=window.count, container_frames=self._video_frames,
                        video=self.layout.video)
        if window.complete and window.first is not None and window.last is not None:
            self._report(window.first, window.last)

    def _report(self, first: float, last: float) -> None:
        """Once per session: the reference HR over the frames' time span, logged."""
        if self._reported or self.reference is None:
            return
        self._reported = True
        self.estimate = window_hr(self.reference, first, last)
        if self.estimate is None:
            self.reference_problem = (f"{self.reference.origin} gives no HR over the frames' {last - first:.1f} s "
                                      "(no sample inside it, or under 5 s of PPG)")
            log.warning("reference_hr", reference_hr=None, reference_source=self.reference.origin,
                        problem=self.reference_problem, window=[round(first, 6), round(last, 6)])
            return
        times, hrs = hr_series(self.reference, first, last)
        log.info("reference_hr", reference_hr=self.estimate.hr, reference_method=self.estimate.method,
                 reference_source=self.reference.origin, window=[round(first, 6), round(last, 6)],
                 series_t=times, series_hr=hrs)

    def reference_fields(self, hr: float | None) -> dict[str, Any]:
        """For result.json: the reference HR beside the backend's, and how it was derived (empty: no reference)."""
        if self.reference is None:
            return {}
        if self.estimate is None:
            return {"reference_hr": None, "reference_source": self.reference.origin,
                    "reference_problem": self.reference_problem}
        error = round(hr - self.estimate.hr, 2) if isinstance(hr, int | float) and hr > 0 else None
        return {"reference_hr": self.estimate.hr, "error_bpm": error, "reference_method": self.estimate.method,
                "reference_source": self.reference.origin,
                "reference_window": [round(self.estimate.start, 6), round(self.estimate.end, 6)]}

    def _skip(self, error: FrameError) -> None:
        if error.name not in self.skipped:  # once per session, not once per attempt
            self.skipped.add(error.name)
            log.warning("frame_skipped", frame=error.name, problem=error.problem)


@attrs.define
class _Prepared:
    layout: Layout
    reference: Reference | None = None
    start: Decimal = Decimal(0)
    start_from: str = ""
    video_frames: int = 0
    fps: float = 0.0


@attrs.define
class _Window:
    """The first and last timestamps an attempt's producer handed out, and whether it got to the end."""

    first: float | None = None
    last: float | None = None
    complete: bool = False
    count: int = 0

    def _saw(self, timestamp: str) -> None:
        self.count += 1
        value = float(timestamp)
        self.first = value if self.first is None else self.first
        self.last = value

    def watch(self, refs: Iterable[FrameRef]) -> Iterator[FrameRef]:
        for ref in refs:
            self._saw(ref.timestamp)
            yield ref
        self.complete = True

    async def watch_async(self, items: AsyncIterator[Any]) -> AsyncGenerator[Any, None]:
        async for item in items:
            if isinstance(item, video.VideoFrame):
                self._saw(item.timestamp)
            yield item
        self.complete = True


def _encode_video_frame(item: video.VideoFrame | FrameError, *, fmt: str, quality: int) -> EncodedFrame:
    """A decoded video frame as JPEG (jpeg format) or lossless PNG (raw: a video has no file per frame)."""
    if isinstance(item, FrameError):
        raise item
    if fmt == "raw":
        import cv2

        ok, png = cv2.imencode(".png", item.image)
        if not ok:
            raise FrameError(item.timestamp, "PNG encoding failed")
        return EncodedFrame(item.timestamp, pybase64.b64encode(png.data))
    return encode_image(item.image, item.timestamp, quality, order="BGR")


@attrs.define
class LiveSource:
    """Frames as they are captured, already encoded (a camera session encodes each frame once, for
    the disk and the wire); one attempt only (store-and-forward covers the rest).

    The frames go to the sender as they come: no worker thread, where ``encode_pipeline``
    would hop to one and back for each frame to do nothing.
    """

    channel: trio.MemoryReceiveChannel[EncodedFrame]
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
        yield Feed(self.channel, self._skip)

    def _skip(self, error: FrameError) -> None:
        self.skipped += 1
        log.warning("frame_skipped", frame=error.name, problem=error.problem)
