"""Frames: listing a folder, ordering, reading, encoding; and the bounded encode pipeline.

The per-frame functions are pure and thread-safe: PNG decoding, JPEG encoding and
base64 run in worker threads (cv2 releases the GIL), so both cores work
while the event loop only sends. Raw mode never decodes an image: it checks the PNG
signature and trailer and sends the file's bytes untouched.
"""

from __future__ import annotations

import itertools
import os
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

# Reading a raw frame and base64-ing it takes ~0.06 ms; a hop to a worker thread and back
# costs the event loop more than that, so raw frames of a folder travel in fours.
RAW_BATCH: Final = 4


def encode_workers() -> int:
    """Worker threads for encoding: one more than the CPUs this process may use.

    A worker waiting for the GIL or for a file leaves its CPU idle; the extra one fills
    that gap (jpeg on 2 cores: ~418 -> ~435 frames/s, medians of 4).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    return cpus + 1


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
    """A frame ready for the wire: its timestamp and its base64 ``frame_data`` (ASCII bytes)."""

    timestamp: str
    data: bytes


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
    return EncodedFrame(ref.timestamp, pybase64.b64encode(data))


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
    return EncodedFrame(timestamp, pybase64.b64encode(buf.data))


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
    batch: int = 1,
) -> AsyncIterator[trio.MemoryReceiveChannel[Result]]:
    """Encode ``items`` in worker threads, in parallel, delivering results in order.

    About ``depth`` results wait ahead of the consumer (at most ``depth`` + 2 ``batch``),
    so memory does not grow with the folder's length. A frame that cannot be encoded
    arrives as its FrameError. Leaving the block cancels whatever is still in flight.

    ``batch`` items of a listing go to a worker thread together, for frames that cost
    less to encode than a thread hop (raw); items from an async source always go one by
    one, so none waits for the next to arrive.
    """
    batch = max(1, min(batch, depth))  # a small queue is not overrun by one big batch
    send, receive = trio.open_memory_channel[Result](0)
    ahead = max(1, -(-depth // batch))
    slots_send, slots_receive = trio.open_memory_channel[trio.MemoryReceiveChannel[list[Result]]](ahead - 1)

    def encode_all(group: list[T]) -> list[Result]:
        results: list[Result] = []
        for item in group:
            try:
                results.append(encode(item))
            except FrameError as exc:
                results.append(exc)
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
    while group := list(itertools.islice(iterator, size)):
        yield group
        await trio.lowlevel.checkpoint()
