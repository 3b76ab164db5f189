"""Video files as sessions: each frame at its presentation time, from a start time the file tells.

A video is opened like a frame (relative to its folder's descriptor, no link followed
where links are refused, a regular file or nothing) and the decoder reads it through
``/proc/self/fd``, so a file renamed or swapped meanwhile changes nothing. OpenCV's
FFmpeg backend gives each decoded frame's presentation time (``CAP_PROP_POS_MSEC``,
measured equal to the container's PTS for variable frame rate Matroska, MP4 and MOV);
a frame's timestamp is the start time plus that, to the microsecond.

The start time is, in this order: the one the user gives (``--start-time``), the
container's creation time (MP4/MOV ``mvhd``, Matroska ``DateUTC``; AVI has none), or
the file's modification time minus the video's duration (a recording ends when its
file was last written).

Decoding is sequential by nature: one worker thread at a time reads a few frames ahead,
and the encode pipeline's threads encode them. Anything a file does wrong becomes a
VideoError (the session's) or a FrameError (that frame's), one line each.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
from collections.abc import AsyncGenerator, Iterator
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final

import attrs
import numpy as np
import trio

from caired.errors import FrameError, VideoError
from caired.fsops import shown

VIDEO_SUFFIXES: Final = (".avi", ".mp4", ".mkv", ".mov")
MICROSECOND: Final = Decimal("0.000001")
READ_AHEAD: Final = 4  # frames decoded per worker-thread hop
_MP4_EPOCH: Final = 2082844800  # 1904-01-01 -> 1970-01-01, seconds
_MKV_EPOCH: Final = 978307200  # 2001-01-01 -> 1970-01-01, seconds
_MAX_BOXES: Final = 10_000  # boxes or elements looked at while searching for a creation time


def is_video(name: bytes | str) -> bool:
    text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
    return text.lower().endswith(VIDEO_SUFFIXES)


def parse_start(text: str) -> Decimal:
    """``--start-time``: UNIX seconds (``1747154380.25``) or ISO 8601 with a zone (``2025-05-13T16:39:40Z``)."""
    try:
        value = Decimal(text)
        if value.is_finite() and value >= 0:
            return value.quantize(MICROSECOND)
    except InvalidOperation:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither UNIX seconds nor an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone (add Z or +02:00)")
    return Decimal(repr(moment.timestamp())).quantize(MICROSECOND)


def open_video(dir_fd: int, name: str, *, follow_symlinks: bool) -> int:
    """A descriptor of the regular file ``name`` in ``dir_fd``; VideoError otherwise."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise VideoError(f"{shown(name)}: is a symbolic link, which is not followed here") from None
        raise VideoError(f"{shown(name)}: cannot be opened: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise VideoError(f"{shown(name)}: not a regular file")
    return fd


def _pread(fd: int, size: int, offset: int) -> bytes:
    return os.pread(fd, size, offset) if size > 0 else b""


def mp4_creation_time(fd: int) -> Decimal | None:
    """The ``mvhd`` creation time of an MP4/MOV file (seconds since 1904), as UNIX seconds; None if unset."""
    end = os.fstat(fd).st_size

    def boxes(start: int, stop: int) -> Iterator[tuple[bytes, int, int]]:
        pos, seen = start, 0
        while pos + 8 <= stop and seen < _MAX_BOXES:
            seen += 1
            size, kind = struct.unpack(">I4s", _pread(fd, 8, pos))
            header = 8
            if size == 1:
                size = struct.unpack(">Q", _pread(fd, 8, pos + 8))[0]
                header = 16
            elif size == 0:
                size = stop - pos
            if size < header or pos + size > stop:
                return
            yield kind, pos + header, pos + size
            pos += size

    for kind, body, stop in boxes(0, end):
        if kind != b"moov":
            continue
        for inner, ibody, istop in boxes(body, stop):
            if inner != b"mvhd" or istop - ibody < 20:
                continue
            head = _pread(fd, 12, ibody)
            seconds = struct.unpack(">Q", head[4:12])[0] if head[0] == 1 else struct.unpack(">I", head[4:8])[0]
            return Decimal(seconds - _MP4_EPOCH) if seconds > _MP4_EPOCH else None
    return None


def _vint(fd: int, pos: int, *, keep_marker: bool) -> tuple[int, int, bool]:
    """An EBML variable-length integer at ``pos``: (value, its length, all ones = unknown size)."""
    first = _pread(fd, 1, pos)
    if not first or first[0] == 0:
        raise ValueError("bad EBML integer")
    length = 8 - first[0].bit_length() + 1
    raw = _pread(fd, length, pos)
    if len(raw) < length:
        raise ValueError("truncated EBML integer")
    value = int.from_bytes(raw, "big")
    if not keep_marker:
        value &= (1 << (7 * length)) - 1
    unknown = not keep_marker and value == (1 << (7 * length)) - 1
    return value, length, unknown


def mkv_creation_time(fd: int) -> Decimal | None:
    """Matroska's ``Segment/Info/DateUTC`` (nanoseconds since 2001) as UNIX seconds; None if absent."""
    end = os.fstat(fd).st_size
    try:
        pos, seen = 0, 0
        targets = (0x18538067, 0x1549A966)  # Segment, then Info inside it
        depth = 0
        stop = end
        while pos < stop and seen < _MAX_BOXES:
            seen += 1
            ident, id_len, _ = _vint(fd, pos, keep_marker=True)
            size, size_len, unknown = _vint(fd, pos + id_len, keep_marker=False)
            body = pos + id_len + size_len
            size = stop - body if unknown else size
            if depth < 2 and ident == targets[depth]:
                depth, pos, stop = depth + 1, body, min(stop, body + size)
                continue
            if depth == 2 and ident == 0x4461 and size == 8:
                ns = struct.unpack(">q", _pread(fd, 8, body))[0]
                return (Decimal(ns).scaleb(-9) + _MKV_EPOCH).quantize(MICROSECOND)
            if unknown:
                return None
            pos = body + size
    except (ValueError, struct.error, OSError):
        return None
    return None


def creation_time(fd: int, name: str) -> Decimal | None:
    """The container's creation time, where the format records one (MP4, MOV, Matroska)."""
    lower = name.lower()
    try:
        if lower.endswith((".mp4", ".mov")):
            return mp4_creation_time(fd)
        if lower.endswith(".mkv"):
            return mkv_creation_time(fd)
    except (struct.error, OSError):
        return None
    return None


@attrs.frozen
class VideoFrame:
    timestamp: str
    image: np.ndarray = attrs.field(eq=False, repr=False)


@attrs.frozen
class VideoInfo:
    width: int
    height: int
    fps: float
    frames: int  # as the container says; 0 when it does not know
    duration: Decimal
    created: Decimal | None


def _capture(fd: int, label: str) -> Any:
    import cv2

    capture = cv2.VideoCapture(f"/proc/self/fd/{fd}", cv2.CAP_FFMPEG)
    if not capture.isOpened():
        capture.release()
        raise VideoError(f"{label}: cannot be read as a video (no stream FFmpeg can decode)")
    return capture


_MP4_FIRST_BOXES: Final = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot")


def check_container(fd: int, label: str) -> None:
    """VideoError unless the file starts as an AVI, MP4/MOV or Matroska file does.

    FFmpeg picks a demuxer by content, not by name: a text file named ``.mp4`` that is an
    HLS playlist or a concat list would make it open other files or URLs. Only the three
    containers caired reads go to the decoder.
    """
    head = _pread(fd, 12, 0)
    if head[:4] == b"RIFF" and head[8:12] in (b"AVI ", b"AVIX"):
        return
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return
    if len(head) >= 8 and head[4:8] in _MP4_FIRST_BOXES:
        return
    raise VideoError(f"{label}: not an AVI, MP4, MOV or Matroska file (its first bytes say otherwise)")


def probe(fd: int, name: str, label: str, *, max_pixels: int) -> VideoInfo:
    """Size, rate, duration and creation time; VideoError when it is no video or too big a picture."""
    import cv2

    check_container(fd, label)
    capture = _capture(fd, label)
    try:
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        capture.release()
    if width <= 0 or height <= 0:
        raise VideoError(f"{label}: has no video picture size")
    if width * height > max_pixels:
        raise VideoError(f"{label}: is {width}x{height} pixels, more than stream.max_frame_pixels ({max_pixels})")
    duration = Decimal(count) / Decimal(repr(fps)) if fps > 0 and count > 0 else Decimal(0)
    # Matroska keeps no frame count: FFmpeg's is its duration times a nominal rate (19970 for 600
    # frames of a variable-rate clip), right for the duration, wrong as a count.
    frames = 0 if name.lower().endswith(".mkv") else max(count, 0)
    return VideoInfo(width, height, fps, frames, duration.quantize(MICROSECOND), creation_time(fd, name))


def start_time(fd: int, info: VideoInfo, given: Decimal | None) -> tuple[Decimal, str]:
    """The first frame's UNIX time and where it came from."""
    if given is not None:
        return given, "--start-time"
    if info.created is not None:
        return info.created, "the container's creation time"
    mtime = Decimal(os.fstat(fd).st_mtime_ns).scaleb(-9)
    return (mtime - info.duration).quantize(MICROSECOND), "the file's modification time minus its duration"


def stamp(start: Decimal, position_ms: float) -> str:
    """``start`` plus a presentation time in milliseconds, to the microsecond, as the wire's timestamp."""
    return str((start + Decimal(round(position_ms * 1000)).scaleb(-6)).quantize(MICROSECOND))


class VideoReader:
    """One pass over a video's frames, decoded in whichever worker thread calls ``read``."""

    def __init__(self, fd: int, label: str, start: Decimal, *, max_pixels: int) -> None:
        self._capture = _capture(fd, label)
        self._start = start
        self._label = label
        self._max_pixels = max_pixels
        self._last = -1.0
        self._index = 0
        self._lock = threading.Lock()
        self.done = False

    def read(self, count: int = READ_AHEAD) -> list[VideoFrame | FrameError]:
        """Up to ``count`` frames (a frame out of time order as its FrameError); empty at the end."""
        import cv2

        out: list[VideoFrame | FrameError] = []
        with self._lock:
            while len(out) < count and not self.done:
                try:
                    ok, image = self._capture.read()
                except Exception:  # a decoder failing mid-file ends the video where it failed
                    ok, image = False, None
                if not ok or image is None:
                    self.done = True
                    break
                self._index += 1
                position = float(self._capture.get(cv2.CAP_PROP_POS_MSEC))
                name = f"{self._label} frame {self._index}"
                if image.shape[0] * image.shape[1] > self._max_pixels:
                    out.append(FrameError(name, "more pixels than stream.max_frame_pixels"))
                elif not position > self._last and self._index > 1:
                    out.append(FrameError(name, f"presentation time {position:.3f} ms is not after the previous"))
                else:
                    self._last = position
                    out.append(VideoFrame(stamp(self._start, position), image))
        return out

    def close(self) -> None:
        with self._lock:
            self._capture.release()


async def frames(
    reader: VideoReader, limiter: trio.CapacityLimiter
) -> AsyncGenerator[VideoFrame | FrameError, None]:
    """The reader's frames, decoded a few at a time in a worker thread."""
    try:
        while True:
            batch = await trio.to_thread.run_sync(reader.read, READ_AHEAD, limiter=limiter)
            if not batch:
                return
            for item in batch:
                yield item
    finally:
        reader.close()  # no read is in flight: a worker thread is waited for before a cancel lands
