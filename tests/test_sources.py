"""FolderSource: one descriptor per session, frames read through it, hostile files skipped with their reason."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from structlog.testing import capture_logs

from caired.errors import NoFramesError, SessionError
from caired.frames import EncodedFrame, list_frames
from caired.sources import Feed, FolderSource, LiveSource
from tests.conftest import make_config
from tests.test_frames import png_claiming


def open_fds() -> set[int]:
    """This process's open descriptors (less the one that listed them, closed by now)."""
    listed = {int(fd) for fd in os.listdir("/proc/self/fd")}
    return {fd for fd in listed if _alive(fd)}


def _alive(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def sparse(path: Path) -> None:
    """A 2 GB file that takes no room: the issue's OOM."""
    with open(path, "wb") as fh:
        fh.truncate(2 * 1024**3)


async def drain(feed: Feed) -> list[str]:
    stamps: list[str] = []
    while (frame := await feed.next()) is not None:
        stamps.append(frame.timestamp)
    return stamps


def source(
    directory: Path, *, follow_symlinks: bool = True, fmt: str = "jpeg", dir_fd: int | None = None, label: str = ""
) -> FolderSource:
    cfg = make_config(1, FRAME_FORMAT=fmt, CAIRED_STREAM_MAX_FRAME_BYTES="200000")
    return FolderSource(directory, cfg, trio.CapacityLimiter(2), follow_symlinks=follow_symlinks, dir_fd=dir_fd,
                        label=label)


async def test_the_folder_is_held_by_one_descriptor_from_prepare_to_close(frames: Callable[..., Path]) -> None:
    directory = frames(4)
    before = open_fds()
    async with source(directory) as src:
        assert open_fds() == before  # nothing opened before prepare
        await src.prepare()
        held = open_fds() - before
        assert len(held) == 1
        [fd] = held
        assert os.fstat(fd).st_ino == directory.stat().st_ino
        for _ in range(2):  # two attempts, one descriptor
            async with src.open() as feed:
                assert len(await drain(feed)) == 4
            assert open_fds() - before == held
    assert open_fds() == before


async def test_aclose_is_idempotent_and_a_closed_source_opens_nothing(frames: Callable[..., Path]) -> None:
    src = source(frames(2))
    await src.prepare()
    await src.aclose()
    await src.aclose()
    with pytest.raises(NoFramesError, match="not prepared, or already closed"):
        async with src.open():
            pass
    with pytest.raises(NoFramesError, match="the source was closed"):
        await src.prepare()


async def test_a_folder_renamed_or_swapped_for_a_link_after_prepare_is_still_the_one_read(
    frames: Callable[..., Path], tmp_path: Path
) -> None:
    directory = frames(5)
    stamps = [ref.timestamp for ref in list_frames(directory).frames]
    decoy = frames(3, name="decoy", start=1.0)
    async with source(directory) as src:
        await src.prepare()
        directory.rename(tmp_path / "elsewhere")
        directory.symlink_to(decoy)
        async with src.open() as feed:
            assert await drain(feed) == stamps
    assert src.skipped == set()


async def test_a_spool_source_refuses_a_linked_folder(frames: Callable[..., Path], tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(frames(2))
    async with source(link, follow_symlinks=False) as src:
        with pytest.raises(NoFramesError, match="is a symbolic link, which is not followed here"):
            await src.prepare()
    async with source(link) as src:  # caired stream DIR: the user's own link is followed
        await src.prepare()
        assert src.total == 2


async def test_the_folder_can_be_opened_relative_to_a_descriptor_the_caller_holds(
    frames: Callable[..., Path], tmp_path: Path
) -> None:
    frames(3, name="inner")
    parent = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(tmp_path, tmp_path.with_name(tmp_path.name + "-moved"))
        async with source(Path("inner"), follow_symlinks=False, dir_fd=parent) as src:
            await src.prepare()
            async with src.open() as feed:
                assert len(await drain(feed)) == 3
    finally:
        os.close(parent)


async def test_a_held_folder_is_opened_through_its_own_descriptor_and_named_by_its_label(
    frames: Callable[..., Path], tmp_path: Path
) -> None:
    """The daemon's way: the claim holds active/NAME open; the source opens "." relative to it, no path."""
    directory = frames(3)
    held = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        directory.rename(tmp_path / "moved")
        async with source(Path("."), follow_symlinks=False, dir_fd=held, label="session-7") as src:
            await src.prepare()
            async with src.open() as feed:
                assert len(await drain(feed)) == 3
        for name in os.listdir(held):
            os.unlink(name, dir_fd=held)
        async with source(Path("."), follow_symlinks=False, dir_fd=held, label="session-7") as src:
            with pytest.raises(NoFramesError, match=r"^session-7: no frames"):
                await src.prepare()
    finally:
        os.close(held)


@pytest.mark.parametrize("follow_symlinks", [True, False])
@pytest.mark.parametrize("fmt", ["jpeg", "raw"])
async def test_hostile_frames_are_skipped_with_their_reason_and_never_hold_the_session(
    frames: Callable[..., Path], tmp_path: Path, follow_symlinks: bool, fmt: str
) -> None:
    directory = frames(6)
    good = list_frames(directory).frames
    outside = tmp_path / "outside.png"
    outside.write_bytes(good[0].path.read_bytes())
    hostile = {
        "1.png": lambda p: os.mkfifo(p),
        "2.png": lambda p: p.symlink_to("/dev/zero"),
        "3.png": lambda p: p.mkdir(),
        "4.png": lambda p: p.write_bytes(png_claiming(50000, 50000)),
        "5.png": lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 300),
        "6.png": lambda p: p.write_bytes(b"x" * 200001),
        "7.png": lambda p: p.symlink_to(outside),
        "8.png": sparse,
    }
    for name, make in hostile.items():
        make(directory / name)
    with open(os.path.join(os.fsencode(directory), b"\xff\xfe.png"), "wb"):
        pass
    expected = {
        "1.png": "is a FIFO, not a regular file",
        "2.png": "is a character device" if follow_symlinks else "is a symbolic link",
        "3.png": "is a folder, not a regular file",
        "4.png": "is 50000x50000 pixels, more than stream.max_frame_pixels (16000000)",
        "5.png": "malformed PNG: the first chunk is not a 13-byte IHDR",
        "6.png": "is 200001 bytes, more than stream.max_frame_bytes (200000)",
        "8.png": "is 2147483648 bytes, more than stream.max_frame_bytes (200000)",
    }
    if not follow_symlinks:
        expected["7.png"] = "is a symbolic link, which is not followed here"
    with capture_logs() as logs, trio.fail_after(20):
        async with source(directory, follow_symlinks=follow_symlinks, fmt=fmt) as src:
            await src.prepare()
            assert src.ignored == 1
            for _ in range(2):
                async with src.open() as feed:
                    sent = await drain(feed)
    survivors = [str(i) for i in range(1, 9) if f"{i}.png" not in expected]
    assert survivors == (["7"] if follow_symlinks else [])
    assert sent == survivors + [ref.timestamp for ref in good]
    skipped = {e["frame"]: e["problem"] for e in logs if e["event"] == "frame_skipped"}
    assert skipped.keys() == expected.keys()
    for name, problem in expected.items():
        assert problem in skipped[name], (name, skipped[name])
    assert len([e for e in logs if e["event"] == "frame_skipped"]) == len(expected)  # once per session
    [ignored] = [e for e in logs if e["event"] == "files_ignored"]
    assert ignored["count"] == 1 and ignored["examples"] == ["\\xff\\xfe.png"]


async def test_a_folder_of_nothing_but_hostile_frames_yields_no_frame(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "1.png")
    (tmp_path / "2.png").symlink_to("/dev/zero")
    async with source(tmp_path, follow_symlinks=False) as src:
        await src.prepare()
        with trio.fail_after(10):
            async with src.open() as feed:
                assert await feed.first() is None
                assert feed.skipped == 2


async def test_frames_are_encoded_as_the_config_says(frames: Callable[..., Path]) -> None:
    directory = frames(2)
    for fmt, magic in (("jpeg", b"/9j/"), ("raw", b"iVBORw0KGgo")):
        async with source(directory, fmt=fmt) as src:
            await src.prepare()
            async with src.open() as feed:
                first = await feed.next()
        assert isinstance(first, EncodedFrame) and first.data.startswith(magic)


async def test_live_frames_reach_the_sender_in_order_without_a_worker_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A camera session's frames are encoded already: a hop to a worker thread and back would do nothing, at a cost."""

    async def no_thread(*args: object, **kwargs: object) -> None:
        raise AssertionError("a live frame went to a worker thread")

    monkeypatch.setattr(trio.to_thread, "run_sync", no_thread)
    send, receive = trio.open_memory_channel[EncodedFrame](4)
    frames = [EncodedFrame(f"{i}.0", b"AAAA") for i in range(3)]
    source = LiveSource(receive)
    async with send:
        for frame in frames:
            send.send_nowait(frame)
    async with source.open() as feed:
        assert await feed.first() == frames[0]
        assert [await feed.next() for _ in range(4)] == [*frames, None]
    with pytest.raises(SessionError, match="cannot be streamed twice"):
        async with source.open():
            pass
