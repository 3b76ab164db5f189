"""Listing, ordering, reading and encoding frames; the bounded pipeline."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import trio

from caired.errors import FrameError, NoFramesError
from caired.frames import EncodedFrame, encode_pipeline, encode_workers, encoder, list_frames, read_jpeg, read_raw


def test_frames_are_ordered_by_the_numeric_value_of_their_stem(tmp_path: Path) -> None:
    for name in ["10.5.png", "9.75.png", "100.png", "9.8.png", "1747154380.5511632.png", "readme.txt",
                 "abc.png", "1.2.3.png", ".ready", "12.PNG"]:
        (tmp_path / name).write_bytes(b"")
    listing = list_frames(tmp_path)
    assert [f.timestamp for f in listing.frames] == ["9.75", "9.8", "10.5", "12", "100", "1747154380.5511632"]
    assert listing.ignored == 3  # readme.txt, abc.png, 1.2.3.png; .ready is ours


def test_only_ascii_digits_make_a_frame_name(tmp_path: Path) -> None:
    """``\\d`` would take Arabic-Indic digits and ``$`` a trailing newline: neither is a UNIX time."""
    for name in ["1.5.png", "\u0661\u0662.png", "12.png\n", "\uff11\uff12.png"]:
        (tmp_path / name).write_bytes(b"")
    listing = list_frames(tmp_path)
    assert [f.timestamp for f in listing.frames] == ["1.5"]
    assert listing.ignored == 3


def test_a_missing_folder_is_a_no_frames_error(tmp_path: Path) -> None:
    with pytest.raises(NoFramesError, match="no such folder"):
        list_frames(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NoFramesError, match="not a folder"):
        list_frames(tmp_path / "file")


def test_raw_sends_the_file_untouched(frames: Callable[..., Path]) -> None:
    ref = list_frames(frames(1)).frames[0]
    assert base64.b64decode(read_raw(ref).data) == ref.path.read_bytes()


def test_raw_rejects_what_is_not_a_whole_png(tmp_path: Path, frames: Callable[..., Path]) -> None:
    ref = list_frames(frames(1)).frames[0]
    data = ref.path.read_bytes()
    ref.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FrameError, match="truncated"):
        read_raw(ref)
    ref.path.write_bytes(b"GIF89a" + data)
    with pytest.raises(FrameError, match="not a PNG"):
        read_raw(ref)


def test_jpeg_reencodes_at_the_quality_asked(frames: Callable[..., Path]) -> None:
    ref = list_frames(frames(1, size=(64, 48))).frames[0]
    high = base64.b64decode(read_jpeg(ref, 95).data)
    low = base64.b64decode(read_jpeg(ref, 10).data)
    assert high[:3] == b"\xff\xd8\xff" and len(low) < len(high)
    decoded = cv2.imdecode(np.frombuffer(high, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (48, 64, 3)


def test_an_undecodable_frame_is_a_frame_error(tmp_path: Path) -> None:
    (tmp_path / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nrubbish")
    with pytest.raises(FrameError, match="cannot be decoded"):
        read_jpeg(list_frames(tmp_path).frames[0], 90)


async def test_pipeline_keeps_order_and_passes_errors_through(frames: Callable[..., Path]) -> None:
    directory = frames(20)
    refs = list_frames(directory).frames
    refs[5].path.write_bytes(b"broken")
    limiter = trio.CapacityLimiter(2)
    seen: list[str] = []
    async with encode_pipeline(refs, encoder("raw", 90), depth=4, limiter=limiter) as results:
        async for result in results:
            seen.append(result.timestamp if isinstance(result, EncodedFrame) else f"error:{result.name}")
    assert seen[5] == f"error:{refs[5].path.name}"
    assert [s for i, s in enumerate(seen) if i != 5] == [r.timestamp for i, r in enumerate(refs) if i != 5]


@pytest.mark.parametrize(("depth", "batch"), [(4, 1), (8, 4), (2, 4), (1, 4)])
async def test_pipeline_holds_about_depth_frames_ahead(frames: Callable[..., Path], depth: int, batch: int) -> None:
    refs = list_frames(frames(60)).frames
    started: list[int] = []

    def encode(ref: object) -> EncodedFrame:
        started.append(1)
        return EncodedFrame("1", b"")

    async with encode_pipeline(refs, encode, depth=depth, limiter=trio.CapacityLimiter(2), batch=batch) as results:
        await results.receive()
        await trio.sleep(0.2)  # let the producer run as far ahead as it may
        # the batch being handed over, the queued ones, and one more being produced
        assert len(started) <= depth + 2 * min(batch, depth)


async def test_a_batched_pipeline_keeps_order_and_errors_and_hops_once_per_batch(
    frames: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    refs = list_frames(frames(10)).frames
    refs[6].path.write_bytes(b"broken")
    hops: list[object] = []
    run_sync = trio.to_thread.run_sync

    async def counting(fn: Callable[..., object], *args: object, **kwargs: object) -> object:
        hops.append(args)
        return await run_sync(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counting)
    seen: list[str] = []
    async with encode_pipeline(refs, encoder("raw", 90), depth=8, limiter=trio.CapacityLimiter(2), batch=4) as chan:
        async for result in chan:
            seen.append(result.timestamp if isinstance(result, EncodedFrame) else f"error:{result.name}")
    assert seen == [f"error:{r.path.name}" if i == 6 else r.timestamp for i, r in enumerate(refs)]
    assert len(hops) == 3  # 4 + 4 + 2


async def test_frames_from_an_async_source_are_not_held_back_to_fill_a_batch() -> None:
    """Live frames go one by one: the first is encoded before the second exists."""
    send, receive = trio.open_memory_channel[str](10)

    def encode(stamp: str) -> EncodedFrame:
        return EncodedFrame(stamp, b"")

    async with send, encode_pipeline(receive, encode, depth=8, limiter=trio.CapacityLimiter(2), batch=4) as chan:
        await send.send("1")
        with trio.fail_after(5):
            assert (await chan.receive()).timestamp == "1"


def test_encode_workers_follow_the_cpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """A container pinned to 1 CPU of 64 gets 2 workers, not 65."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert encode_workers() == 2
