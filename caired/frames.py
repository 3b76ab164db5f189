"""Frames: listing a folder, ordering, reading, encoding; and the bounded encode pipeline.

A folder is held by its descriptor (``FrameFolder``): its frames are listed from that
descriptor with names as bytes, and each frame is opened relative to it with
``O_NOFOLLOW | O_NONBLOCK`` (``O_NOFOLLOW`` only where symbolic links are refused),
checked with ``fstat`` to be a regular file, and read up to ``max_frame_bytes``. Before
any decoder sees a frame, its PNG header (IHDR) is checked and its width x height held
against ``max_frame_pixels``. A FIFO, a device, a folder, a link where links are refused,
an oversized or unreadable file, or a header that lies: each becomes that frame's
FrameError, and so does any exception a decoder or encoder raises. Nothing a file holds
leaves the pipeline as anything else.

The per-frame functions are pure and thread-safe: PNG decoding (``caired.png``: ISA-L and
numpy, libspng or OpenCV), JPEG encoding (libjpeg-turbo) and base64 run in worker threads, mostly with the GIL released,
so both cores work while the event loop only sends. Raw mode never decodes an image: it checks the PNG
header and trailer and sends the file's bytes untouched.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import stat
import warnings
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, TypeVar

import attrs
import numpy as np
import pybase64
import simplejpeg
import trio

from caired import fsops, png
from caired._trio import open_nursery
from caired.config import StreamConfig
from caired.errors import FrameError, NoFramesError
from caired.fsops import shown
from caired.png import IHDR_END as IHDR_END
from caired.png import PNG_SIGNATURE as PNG_SIGNATURE
from caired.png import PNG_TRAILER as PNG_TRAILER
from caired.png import ChannelOrder
from caired.png import png_size as png_size

FRAME_NAME: Final = re.compile(rb"^([0-9]+(?:\.[0-9]+)?)\.(?:png|jpe?g)\Z", re.IGNORECASE)
JPEG_SUFFIXES: Final = (".jpg", ".jpeg")
IGNORED_EXAMPLES: Final = 3  # names of ignored files shown in the log

_OPEN_FOLDER: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_FRAME: Final = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC

Format = Literal["jpeg", "raw"]
T = TypeVar("T")

# Frames of a folder go to a worker thread in fours (see folder_batch). A hop to a worker
# and back (a task, the thread's wake-up, the event loop's) costs more than reading and
# base64-ing a raw frame (~0.06 ms); in jpeg mode, with three workers and the event loop on
# two cores, the GIL changed hands around each hop: 24 context switches a frame one by one,
# 10 in fours, and 0.91x the CPU a frame (428.7 against 354.7 frames/s, 1,000 640x480
# frames, medians of 7, interleaved).
FOLDER_BATCH: Final = 4


def folder_batch(fmt: Format, depth: int, workers: int) -> int:
    """How many frames of a folder a worker thread takes at once, for ``encode_pipeline``.

    ``FOLDER_BATCH``; in jpeg mode fewer when that many would leave a worker idle: up to
    ``ceil(depth / batch) + 1`` batches are in flight, and every worker should have one (2 CPUs,
    3 workers and a send_queue of 8: fours; 4 CPUs: twos; 8 CPUs: one by one). Raw frames
    cost less to read than the hop, so one worker keeps up with them.
    """
    if fmt == "raw":
        return FOLDER_BATCH
    return max(1, min(FOLDER_BATCH, depth // max(1, workers - 1)))


def encode_workers(*, paced: bool) -> int:
    """Worker threads for encoding: as many as the CPUs this process may use, and one more
    unless ``paced`` (one paced stream alone: ``caired stream`` at fps > 0).

    A worker waiting for the GIL or for a file leaves its CPU idle; the extra one fills
    that gap (jpeg unpaced on 2 cores: ~418 -> ~435 frames/s, medians of 4, with OpenCV's
    decoder). One paced stream's workers only need to stay ahead of the clock, and each
    one decoding holds a frame's buffers: at 30 fps on 2 cores, 1.0-3.1 MB less peak RSS
    with two workers than with three (runs of one afternoon), and no more CPU per frame.
    The daemon, whose workers also wait on fsync for the camera, always has the extra one.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return cpus if paced else cpus + 1


@attrs.frozen(kw_only=True)
class FrameLimits:
    """What one frame may cost: bytes read from disk, pixels handed to a decoder."""

    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 16_000_000

    @classmethod
    def from_config(cls, stream: StreamConfig) -> FrameLimits:
        return cls(max_bytes=stream.max_frame_bytes, max_pixels=stream.max_frame_pixels)


@attrs.frozen
class FrameRef:
    """A frame file: its name in its folder (ASCII by construction) and its stem, character for character."""

    name: str
    timestamp: str
    directory: Path = attrs.field(default=Path(), eq=False)

    @property
    def is_jpeg(self) -> bool:
        """A ``.jpg`` / ``.jpeg`` frame: sent as it is in jpeg mode, never decoded."""
        return self.name.lower().endswith(JPEG_SUFFIXES)

    @property
    def path(self) -> Path:
        """For display and tests; frames are read relative to their folder's descriptor, never by this path."""
        return self.directory / self.name


@attrs.frozen
class Listing:
    frames: tuple[FrameRef, ...]
    ignored: int  # files in the folder that are not <number>.png / .jpg / .jpeg (hidden ones aside)
    examples: tuple[str, ...] = ()  # a few of the ignored names, shown escaped


@attrs.frozen
class EncodedFrame:
    """A frame ready for the wire: its timestamp and its base64 ``frame_data`` (ASCII bytes)."""

    timestamp: str
    data: bytes


def frame_stem(name: bytes) -> str | None:
    """The timestamp a file name carries (``1747154380.5511632.png`` -> ``"1747154380.5511632"``), or None."""
    match = FRAME_NAME.match(name)
    return match.group(1).decode("ascii") if match is not None else None


def sort_frames(names: Iterable[bytes], directory: Path = Path()) -> Listing:
    """The ``<number>.png`` (``.jpg``, ``.jpeg``) names among ``names``, in ascending numeric order of their stems.

    Any other name (not UTF-8, not a frame name) is counted as ignored, unless it is
    hidden: names starting with '.' are caired's own markers and state.
    """
    frames: list[tuple[Decimal, FrameRef]] = []
    ignored = 0
    examples: list[str] = []
    for name in names:
        stem = frame_stem(name)
        if stem is None:
            if not name.startswith(b"."):
                ignored += 1
                if len(examples) < IGNORED_EXAMPLES:
                    examples.append(shown(name))
            continue
        frames.append((Decimal(stem), FrameRef(name.decode("ascii"), stem, directory)))
    frames.sort(key=lambda pair: (pair[0], pair[1].timestamp, pair[1].name))  # the same order whatever the folder's
    return Listing(tuple(ref for _, ref in frames), ignored, tuple(examples))


class FrameFolder:
    """A folder of frames held open by its descriptor; every frame is opened relative to it.

    ``follow_symlinks=False`` (the daemon's spool) refuses a link as the folder itself and
    as any frame; ``True`` (a user's own folder, ``caired stream DIR``) follows them.
    """

    def __init__(self, path: Path, fd: int, *, follow_symlinks: bool, label: str = "") -> None:
        self.path = path
        self.follow_symlinks = follow_symlinks
        self.label = label or shown(os.fspath(path))  # how messages name the folder
        self._fd = fd

    @classmethod
    def open(
        cls, path: Path, *, follow_symlinks: bool = True, dir_fd: int | None = None, label: str = ""
    ) -> FrameFolder:
        """Open ``path`` (relative to ``dir_fd`` when given); NoFramesError says why it cannot be."""
        flags = _OPEN_FOLDER if follow_symlinks else _OPEN_FOLDER | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags, dir_fd=dir_fd)
        except OSError as exc:
            link = not follow_symlinks and exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(path, dir_fd)
            problem = "is a symbolic link, which is not followed here" if link else _folder_problem(exc)
            raise NoFramesError(f"{label or shown(os.fspath(path))}: {problem}") from None
        return cls(path, fd, follow_symlinks=follow_symlinks, label=label)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        return self._fd

    def list(self) -> Listing:
        """The folder's frames, listed from its descriptor (names as bytes)."""
        if self.closed:
            raise NoFramesError(f"{self.label}: the folder was closed")
        try:
            names = os.listdir(self._fd)  # str with surrogate escapes; fsencode gives back the bytes
        except OSError as exc:
            raise NoFramesError(f"{self.label}: cannot be listed: {exc.strerror or exc}") from None
        return sort_frames((os.fsencode(name) for name in names), self.path)

    def read(self, name: str, max_bytes: int) -> bytes:
        """The frame file ``name``: a regular file of at most ``max_bytes``, else its FrameError."""
        if self.closed:
            raise FrameError(name, "cannot be read: the folder was closed")
        return read_at(self._fd, name, max_bytes=max_bytes, follow_symlinks=self.follow_symlinks)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:  # a folder nobody closed: do not leak its descriptor
            warnings.warn(f"unclosed frame folder {self.label}", ResourceWarning, stacklevel=1)
            self.close()

    def __enter__(self) -> FrameFolder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _is_link(path: Path, dir_fd: int | None) -> bool:
    """``O_NOFOLLOW | O_DIRECTORY`` on a link fails with ENOTDIR: tell that apart from a file."""
    try:
        return stat.S_ISLNK(os.lstat(path, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _folder_problem(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "no such folder"
    if exc.errno == errno.ENOTDIR:
        return "not a folder"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "cannot be read (permission denied)"
    return f"cannot be opened: {exc.strerror or exc}"


def read_at(dir_fd: int, name: str | bytes, *, max_bytes: int, follow_symlinks: bool) -> bytes:
    """The regular file ``name`` in the folder ``dir_fd``, read whole if it has at most ``max_bytes``.

    ``fsops.read_regular``: a FIFO does not hold the thread, a link is not followed unless
    links are, and anything but a regular file, or a file over the cap, is refused before a
    byte of it is read; each becomes this frame's FrameError.
    """
    label = shown(name)
    try:
        return fsops.read_regular(dir_fd, name, max_bytes, follow_symlinks=follow_symlinks)
    except fsops.NotRegular as exc:
        raise FrameError(label, f"is {exc.kind}" + ("" if "symbolic link" in exc.kind else ", not a regular file")) \
            from None
    except fsops.TooBig as exc:
        if exc.size is None:
            raise FrameError(label, f"grew past stream.max_frame_bytes ({max_bytes}) while it was read") from None
        raise FrameError(label, f"is {exc.size} bytes, more than stream.max_frame_bytes ({max_bytes})") from None
    except OSError as exc:
        raise FrameError(label, f"cannot be read: {exc.strerror or exc}") from None


def check_png(name: str, data: bytes, max_pixels: int) -> tuple[int, int]:
    """The PNG's size, if its header is sound and it has at most ``max_pixels``; else its FrameError."""
    try:
        width, height = png_size(data[:IHDR_END])
    except ValueError as exc:
        raise FrameError(name, str(exc)) from None
    if width * height > max_pixels:
        raise FrameError(name, f"is {width}x{height} pixels, more than stream.max_frame_pixels ({max_pixels})")
    # Every chunk must fit in the file: a decoder reserves what a chunk's length says (an IDAT
    # claiming 2 GiB in a 100-byte file made OpenCV allocate 2.1 GiB).
    for chunk in png.chunks(data, first=8):
        if not chunk.whole:
            raise FrameError(name, f"malformed PNG: a chunk of {chunk.length} bytes runs past the end of the file")
    return width, height


JPEG_SOI: Final = b"\xff\xd8"
JPEG_EOI: Final = b"\xff\xd9"
# Start-of-frame markers (baseline, progressive, lossless, arithmetic...): the ones that carry the image size.
_JPEG_SOF: Final = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_STANDALONE: Final = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field


def jpeg_size(data: bytes) -> tuple[int, int]:
    """Width and height from a JPEG's start-of-frame segment; ValueError says what is wrong.

    Walks the segments before the scan (APPn such as EXIF, quantisation and Huffman
    tables), each by its length field, bounded by the data: a length that points past the
    end, a scan before any frame header, or a zero side is refused before a decoder sees it.
    """
    if not data:
        raise ValueError("is empty")
    if not data.startswith(JPEG_SOI):
        raise ValueError("not a JPEG file")
    pos = 2
    while True:
        while pos < len(data) and data[pos] == 0xFF and pos + 1 < len(data) and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos + 2 > len(data):
            raise ValueError("truncated JPEG (no frame header)")
        if data[pos] != 0xFF:
            raise ValueError("malformed JPEG: a segment does not start with a marker")
        marker = data[pos + 1]
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):
            raise ValueError("malformed JPEG: no frame header before the image data")
        if pos + 4 > len(data):
            raise ValueError("truncated JPEG (no frame header)")
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > len(data):
            raise ValueError("truncated JPEG (a segment runs past the end)")
        if marker in _JPEG_SOF:
            if length < 8:
                raise ValueError("malformed JPEG: a frame header too short")
            height = int.from_bytes(data[pos + 5:pos + 7], "big")
            width = int.from_bytes(data[pos + 7:pos + 9], "big")
            if width == 0 or height == 0:
                raise ValueError(f"malformed JPEG: the header says {width}x{height} pixels")
            return width, height
        pos += 2 + length


def read_jpeg_file(ref: FrameRef, folder: FrameFolder, limits: FrameLimits) -> EncodedFrame:
    """A ``.jpg`` frame's bytes exactly as they are on disk, base64: header and end checked, never decoded."""
    data = folder.read(ref.name, limits.max_bytes)
    try:
        width, height = jpeg_size(data)
    except ValueError as exc:
        raise FrameError(ref.name, str(exc)) from None
    if width * height > limits.max_pixels:
        raise FrameError(ref.name,
                         f"is {width}x{height} pixels, more than stream.max_frame_pixels ({limits.max_pixels})")
    if not data.rstrip(b"\x00").endswith(JPEG_EOI):
        raise FrameError(ref.name, "truncated JPEG (no end-of-image marker)")
    return EncodedFrame(ref.timestamp, pybase64.b64encode(data))


def read_raw(ref: FrameRef, folder: FrameFolder, limits: FrameLimits) -> EncodedFrame:
    """The PNG file's bytes, base64: its header and trailer checked, never decoded."""
    data = folder.read(ref.name, limits.max_bytes)
    check_png(ref.name, data, limits.max_pixels)
    if not data.rstrip(b"\x00").endswith(PNG_TRAILER):
        raise FrameError(ref.name, "truncated PNG (no IEND chunk)")
    return EncodedFrame(ref.timestamp, pybase64.b64encode(data))


def read_jpeg(ref: FrameRef, folder: FrameFolder, quality: int, limits: FrameLimits) -> EncodedFrame:
    """The frame decoded and re-encoded as JPEG at ``quality``, base64; its header checked first."""
    data = folder.read(ref.name, limits.max_bytes)
    check_png(ref.name, data, limits.max_pixels)
    pixels = decode_png(ref.name, data)
    del data  # not held through the encode: each worker decoding holds a frame's buffers
    return encode_image(pixels.array, ref.timestamp, quality, order=pixels.order, name=ref.name)


def decode_png(name: str, data: bytes) -> png.Pixels:
    """A PNG whose header was checked: the pixels ``cv2.imdecode(data, IMREAD_COLOR)`` gives, in their decoder's order.

    ``caired.png`` chooses the decoder: ISA-L and libspng's unfilter for 8-bit PNGs, libspng or OpenCV for the rest.
    """
    try:
        decoded = png.decode(data)
    except Exception as exc:  # SpngError, cv2.error, MemoryError: this frame's problem, not the session's
        raise FrameError(name, f"cannot be decoded: {describe(exc)}") from None
    if decoded is None:
        raise FrameError(name, "cannot be decoded as an image")
    return decoded


def encode_image(image: np.ndarray, timestamp: str, quality: int, *, order: ChannelOrder,
                 name: str = "") -> EncodedFrame:
    """An 8-bit image (``order``: its channels) as a JPEG at ``quality``, base64."""
    return EncodedFrame(timestamp, pybase64.b64encode(encode_jpeg(image, quality, name=name or timestamp,
                                                                  order=order)))


def encode_jpeg(image: np.ndarray, quality: int, *, name: str, order: ChannelOrder) -> bytes:
    """An 8-bit image as baseline JPEG bytes at ``quality``, chroma 4:2:0; FrameError names ``name``.

    ``order`` names the image's channels: BGR for OpenCV's arrays, RGB or RGBA as PNGs hold
    them. As with OpenCV's ``imencode``, a fourth channel is ignored (never composited) and a
    one-channel image makes a grey JPEG. libjpeg-turbo through simplejpeg, which lets go of the
    GIL while it works and reads any of these orders, so no pass reorders the pixels first:
    0.75-0.86 CPU ms a 640x480 frame at q90, as OpenCV's (the same headers and tables; the bytes
    differ, sizes within 1.5%).
    """
    colorspace: str = order
    subsampling = "420"
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        image, colorspace, subsampling = image.reshape(image.shape[0], image.shape[1], 1), "GRAY", "Gray"
    elif image.ndim == 3 and image.shape[2] == 4 and order == "BGR":
        colorspace = "BGRA"
    try:
        data: bytes = simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=int(quality),
                                             colorspace=colorspace, colorsubsampling=subsampling, fastdct=False)
    except Exception as exc:  # ValueError: a side over 65,500 pixels, a shape or type it cannot take, libjpeg-turbo's
        raise FrameError(name, f"JPEG encoding failed: {describe(exc)}") from None
    return data


def encoder(fmt: Format, quality: int, folder: FrameFolder, limits: FrameLimits) -> Callable[[FrameRef], EncodedFrame]:
    """The function that turns one frame of ``folder`` into its ``frame_data``."""
    if fmt == "raw":
        return lambda ref: read_raw(ref, folder, limits)
    return lambda ref: read_jpeg(ref, folder, quality, limits)


def describe(exc: BaseException) -> str:
    """One short line for an exception: its type and the last line of its message (cv2's are long)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def list_frames(directory: Path, *, follow_symlinks: bool = True) -> Listing:
    """The frames of ``directory``, listed from a descriptor opened and closed here."""
    with FrameFolder.open(directory, follow_symlinks=follow_symlinks) as folder:
        return folder.list()


def _label(item: object) -> str:
    """What a FrameError calls an item that raised: its name (a frame file) or its timestamp (a capture)."""
    for attribute in ("name", "timestamp"):
        value = getattr(item, attribute, None)
        if isinstance(value, str):
            return value
    return type(item).__name__


Result = EncodedFrame | FrameError


@asynccontextmanager
async def encode_pipeline(
    items: AsyncIterable[T] | Iterable[T],
    encode: Callable[[T], EncodedFrame],
    *,
    depth: int,
    limiter: trio.CapacityLimiter,
    batch: int = 1,
) -> AsyncIterator[trio.MemoryReceiveChannel[Result]]:
    """Encode ``items`` in worker threads, in parallel, delivering results in order.

    About ``depth`` results wait ahead of the consumer (at most ``depth`` + 2 ``batch``),
    so memory does not grow with the folder's length. A frame that cannot be encoded
    arrives as its FrameError, whatever ``encode`` raised for it. Leaving the block
    cancels whatever is still in flight.

    ``batch`` items of a listing go to a worker thread together (``folder_batch``: a hop
    costs more than a raw frame, and in jpeg mode the GIL changed hands around each), but
    the first goes alone, so that it is not kept waiting for the others; a worker checks
    between items whether the pipeline was left. Items from an async source always go one
    by one, so none waits for the next to arrive.
    """
    batch = max(1, min(batch, depth))  # a small queue is not overrun by one big batch
    send, receive = trio.open_memory_channel[Result](0)
    ahead = max(1, -(-depth // batch))
    slots_send, slots_receive = trio.open_memory_channel[trio.MemoryReceiveChannel[list[Result]]](ahead - 1)

    def encode_all(group: list[T]) -> list[Result]:
        results: list[Result] = []
        for item in group:
            if results:
                trio.from_thread.check_cancelled()  # left while this batch was under way: the rest is not wanted
            try:
                results.append(encode(item))
            except FrameError as exc:
                results.append(exc)
            except Exception as exc:  # one frame's problem, whatever its type: never the session's
                results.append(FrameError(_label(item), f"cannot be encoded: {describe(exc)}"))
        return results

    async def work(group: list[T], out: trio.MemorySendChannel[list[Result]]) -> None:
        async with out:
            out.send_nowait(await trio.to_thread.run_sync(encode_all, group, limiter=limiter))

    async def produce(nursery: trio.Nursery) -> None:
        async with slots_send:
            async for group in _groups(items, batch):
                out, slot = trio.open_memory_channel[list[Result]](1)
                nursery.start_soon(work, group, out)
                await slots_send.send(slot)

    async def deliver() -> None:
        async with send, slots_receive:
            async for slot in slots_receive:
                async with slot:
                    results = await slot.receive()
                results.reverse()
                while results:  # popped as they go: a sent frame is not kept here
                    await send.send(results.pop())

    async with open_nursery() as nursery:
        nursery.start_soon(produce, nursery)
        nursery.start_soon(deliver)
        try:
            yield receive
        finally:
            nursery.cancel_scope.cancel()


async def _groups(items: AsyncIterable[T] | Iterable[T], size: int) -> AsyncIterator[list[T]]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield [item]
        return
    iterator = iter(items)
    first = list(itertools.islice(iterator, 1))  # alone: the first frame is wanted as soon as it can be had
    if first:
        yield first
    while group := list(itertools.islice(iterator, size)):
        yield group
        await trio.lowlevel.checkpoint()
