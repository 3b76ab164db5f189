"""Frames: listing a folder, ordering, reading, encoding; and the bounded encode pipeline.

The per-frame functions are pure and thread-safe: PNG decoding, JPEG encoding and
base64 run in worker threads (cv2 releases the GIL), so both cores work
while the event loop only sends. Raw mode never decodes an image: it checks the PNG
signature and trailer and sends the file's bytes untouched.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Final, Literal, TypeVar

import attrs
import numpy as np
import pybase64
import trio

from caired._trio import open_nursery
from caired.errors import FrameError, NoFramesError

FRAME_NAME: Final = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\.png\Z", re.IGNORECASE)
PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
PNG_TRAILER: Final = b"IEND\xaeB`\x82"

Format = Literal["jpeg", "raw"]
T = TypeVar("T")


@attrs.frozen
class FrameRef:
    """A frame file; ``timestamp`` is its stem, character for character."""

    path: Path
    timestamp: str


@attrs.frozen
class Listing:
    frames: tuple[FrameRef, ...]
    ignored: int  # files in the folder that are not <number>.png


@attrs.frozen
class EncodedFrame:
    """A frame ready for the wire: its timestamp and its base64 ``frame_data``."""

    timestamp: str
    data: str


def list_frames(directory: Path) -> Listing:
    """The folder's ``<number>.png`` frames in ascending numeric order of their stems."""
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        raise NoFramesError(f"{directory}: no such folder") from None
    except NotADirectoryError:
        raise NoFramesError(f"{directory}: not a folder") from None
    except PermissionError:
        raise NoFramesError(f"{directory}: cannot be read (permission denied)") from None
    frames: list[tuple[Decimal, FrameRef]] = []
    ignored = 0
    for entry in entries:
        match = FRAME_NAME.match(entry.name)
        if match is None:
            if not entry.name.startswith("."):  # hidden files (markers, state) are ours
                ignored += 1
            continue
        stem = match.group(1)
        frames.append((Decimal(stem), FrameRef(entry, stem)))
    frames.sort(key=lambda pair: (pair[0], pair[1].timestamp))
    return Listing(tuple(ref for _, ref in frames), ignored)


def read_raw(ref: FrameRef) -> EncodedFrame:
    """The PNG file's bytes, base64: checked for a PNG signature and trailer, never decoded."""
    data = _read(ref)
    if not data.startswith(PNG_SIGNATURE):
        raise FrameError(ref.path.name, "not a PNG file")
    if not data.rstrip(b"\x00").endswith(PNG_TRAILER):
        raise FrameError(ref.path.name, "truncated PNG (no IEND chunk)")
    return EncodedFrame(ref.timestamp, pybase64.b64encode_as_string(data))


def read_jpeg(ref: FrameRef, quality: int) -> EncodedFrame:
    """The frame decoded and re-encoded as JPEG at ``quality``, base64."""
    import cv2

    data = _read(ref)
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise FrameError(ref.path.name, "cannot be decoded as an image")
    return encode_image(image, ref.timestamp, quality, name=ref.path.name)


def encode_image(image: np.ndarray, timestamp: str, quality: int, *, name: str = "") -> EncodedFrame:
    """A BGR image as a JPEG at ``quality``, base64."""
    import cv2

    ok, buf = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise FrameError(name or timestamp, "JPEG encoding failed")
    return EncodedFrame(timestamp, pybase64.b64encode_as_string(buf))


def encoder(fmt: Format, quality: int) -> Callable[[FrameRef], EncodedFrame]:
    if fmt == "raw":
        return read_raw
    return lambda ref: read_jpeg(ref, quality)


def _read(ref: FrameRef) -> bytes:
    try:
        return ref.path.read_bytes()
    except OSError as exc:
        raise FrameError(ref.path.name, f"cannot be read: {exc.strerror or exc}") from None


Result = EncodedFrame | FrameError


@asynccontextmanager
async def encode_pipeline(
    items: AsyncIterable[T] | Iterable[T],
    encode: Callable[[T], EncodedFrame],
    *,
    depth: int,
    limiter: trio.CapacityLimiter,
) -> AsyncIterator[trio.MemoryReceiveChannel[Result]]:
    """Encode ``items`` in worker threads, in parallel, delivering results in order.

    At most ``depth`` results wait ahead of the consumer, so memory does not grow with
    the folder's length. A frame that cannot be encoded arrives as its FrameError.
    Leaving the block cancels whatever is still in flight.
    """
    send, receive = trio.open_memory_channel[Result](0)
    slots_send, slots_receive = trio.open_memory_channel[trio.MemoryReceiveChannel[Result]](max(0, depth - 1))

    async def work(item: T, out: trio.MemorySendChannel[Result]) -> None:
        async with out:
            try:
                result: Result = await trio.to_thread.run_sync(encode, item, limiter=limiter)
            except FrameError as exc:
                result = exc
            out.send_nowait(result)

    async def produce(nursery: trio.Nursery) -> None:
        async with slots_send:
            async for item in _aiter(items):
                out, slot = trio.open_memory_channel[Result](1)
                nursery.start_soon(work, item, out)
                await slots_send.send(slot)

    async def deliver() -> None:
        async with send, slots_receive:
            async for slot in slots_receive:
                async with slot:
                    result = await slot.receive()
                await send.send(result)

    async with open_nursery() as nursery:
        nursery.start_soon(produce, nursery)
        nursery.start_soon(deliver)
        try:
            yield receive
        finally:
            nursery.cancel_scope.cancel()


async def _aiter(items: AsyncIterable[T] | Iterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
            await trio.lowlevel.checkpoint()
