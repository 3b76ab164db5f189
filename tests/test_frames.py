"""Listing, ordering, reading and encoding frames; the bounded pipeline; what a hostile file cannot do."""

from __future__ import annotations

import base64
import gc
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import cv2
import numpy as np
import pytest
import simplejpeg
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caired import fsops, png, spng
from caired.config import DECODER_PIXEL_LIMIT
from caired.errors import FrameError, NoFramesError
from caired.frames import (
    EncodedFrame,
    FrameFolder,
    FrameLimits,
    FrameRef,
    check_png,
    encode_jpeg,
    encode_pipeline,
    encode_workers,
    encoder,
    folder_batch,
    frame_stem,
    list_frames,
    png_size,
    read_jpeg,
    read_raw,
    sort_frames,
)
from caired.fsops import shown

LIMITS = FrameLimits()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def ihdr(width: int, height: int, depth: int = 8, colour: int = 2, *, tail: bytes = b"\0\0\0") -> bytes:
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBB", width, height, depth, colour) + tail)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG file whose header claims ``width`` x ``height``: the issue's 68-byte bomb."""
    return ihdr(width, height) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def read(directory: Path, name: str, *, max_bytes: int = LIMITS.max_bytes, follow_symlinks: bool = True) -> bytes:
    with FrameFolder.open(directory, follow_symlinks=follow_symlinks) as folder:
        return folder.read(name, max_bytes)


@pytest.fixture
def no_decoder(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every decoder (the common path, libspng, cv2.imdecode) replaced by a call counter that decodes nothing:
    proves a frame was refused before it."""
    calls: list[int] = []

    def imdecode(*args: object) -> None:
        calls.append(1)
        return None

    def decode_rgb(*args: object) -> None:
        calls.append(1)
        raise spng.SpngError("counted")

    def decode_common(*args: object) -> None:
        calls.append(1)

    monkeypatch.setattr(cv2, "imdecode", imdecode)
    monkeypatch.setattr(spng, "decode_rgb", decode_rgb)
    monkeypatch.setattr(png, "decode_common", decode_common)
    yield calls


# --- names and listing ------------------------------------------------------------------------------------------


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


def test_names_with_the_same_stem_come_in_one_order_whatever_the_folders(tmp_path: Path) -> None:
    names = [b"7.PNG", b"7.png", b"7.pNg", b"07.png", b"7.0.png"]
    expected = sort_frames(names)
    assert [ref.name for ref in expected.frames] == ["07.png", "7.PNG", "7.pNg", "7.png", "7.0.png"]
    assert sort_frames(reversed(names)) == expected


def test_names_that_are_not_utf8_are_ignored_counted_and_shown_escaped(tmp_path: Path) -> None:
    base = os.fsencode(tmp_path)
    for name in [b"\xff\xfe.png", b"1\xff.png", b"\xc0\x80", b"7.png", b".\xff-hidden"]:
        with open(os.path.join(base, name), "wb"):
            pass
    listing = list_frames(tmp_path)
    assert [f.name for f in listing.frames] == ["7.png"]
    assert listing.ignored == 3
    assert sorted(listing.examples) == sorted(["\\xff\\xfe.png", "1\\xff.png", "\\xc0\\x80"])
    assert all(e.encode("utf-8") for e in listing.examples)  # fit a UTF-8 log line


def test_a_missing_folder_is_a_no_frames_error(tmp_path: Path) -> None:
    with pytest.raises(NoFramesError, match="no such folder"):
        list_frames(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NoFramesError, match="not a folder"):
        list_frames(tmp_path / "file")


def test_a_linked_folder_is_followed_only_when_links_are(frames: Callable[..., Path], tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(frames(2))
    assert len(list_frames(link).frames) == 2
    with pytest.raises(NoFramesError, match="symbolic link"):
        list_frames(link, follow_symlinks=False)


def test_a_folder_whose_name_is_not_utf8_is_listed_and_its_errors_are_printable(tmp_path: Path) -> None:
    odd = Path(os.fsdecode(os.fsencode(tmp_path) + b"/\xffsession"))
    os.mkdir(odd)
    (odd / "1.png").write_bytes(b"")
    assert [f.timestamp for f in list_frames(odd).frames] == ["1"]
    with pytest.raises(NoFramesError) as caught:
        list_frames(odd / "missing")
    assert "\\xffsession" in str(caught.value)
    str(caught.value).encode("utf-8")


def test_a_closed_folder_reads_nothing(frames: Callable[..., Path]) -> None:
    folder = FrameFolder.open(frames(1))
    [ref] = folder.list().frames
    folder.close()
    folder.close()  # idempotent
    with pytest.raises(FrameError, match="closed"):
        folder.read(ref.name, 1000)
    with pytest.raises(NoFramesError, match="closed"):
        folder.list()


# --- reading: regular files only, up to a cap ------------------------------------------------------------------


def test_a_frame_is_read_relative_to_the_folder_held_not_by_its_path(
    frames: Callable[..., Path], tmp_path: Path
) -> None:
    directory = frames(1)
    [ref] = list_frames(directory).frames
    original = ref.path.read_bytes()
    with FrameFolder.open(directory) as folder:
        directory.rename(tmp_path / "moved")
        (tmp_path / "decoy").mkdir()
        (tmp_path / "decoy" / ref.name).write_bytes(b"decoy")
        directory.symlink_to(tmp_path / "decoy")
        assert folder.read(ref.name, LIMITS.max_bytes) == original


async def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "1.png")
    with trio.fail_after(5), pytest.raises(FrameError, match="is a FIFO, not a regular file"):
        # O_NONBLOCK: no writer needed. A blocking open would wait for one; the thread is let go so the test fails.
        await trio.to_thread.run_sync(read, tmp_path, "1.png", abandon_on_cancel=True)


def test_a_folder_named_like_a_frame_is_refused(tmp_path: Path) -> None:
    (tmp_path / "1.png").mkdir()
    with pytest.raises(FrameError, match="is a folder, not a regular file"):
        read(tmp_path, "1.png")


def test_a_link_to_a_device_is_refused_whether_links_are_followed_or_not(tmp_path: Path) -> None:
    (tmp_path / "1.png").symlink_to("/dev/zero")
    with pytest.raises(FrameError, match="is a character device, not a regular file"):
        read(tmp_path, "1.png", follow_symlinks=True)
    with pytest.raises(FrameError, match="is a symbolic link, which is not followed here"):
        read(tmp_path, "1.png", follow_symlinks=False)


def test_a_link_to_a_good_frame_is_read_only_when_links_are_followed(
    frames: Callable[..., Path], tmp_path: Path
) -> None:
    [good] = list_frames(frames(1)).frames
    (tmp_path / "1.png").symlink_to(good.path)
    assert read(tmp_path, "1.png", follow_symlinks=True) == good.path.read_bytes()
    with pytest.raises(FrameError, match="symbolic link"):
        read(tmp_path, "1.png", follow_symlinks=False)


def test_a_frame_over_the_cap_is_refused_before_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "1.png", "wb") as fh:
        fh.truncate(2 * 1024**3)  # sparse 2 GB: the OOM
    reads: list[int] = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    with pytest.raises(FrameError, match=r"is 2147483648 bytes, more than stream.max_frame_bytes \(33554432\)"):
        read(tmp_path, "1.png")
    assert reads == []
    (tmp_path / "2.png").write_bytes(b"x" * 101)
    with pytest.raises(FrameError, match="101 bytes"):
        read(tmp_path, "2.png", max_bytes=100)
    assert read(tmp_path, "2.png", max_bytes=101) == b"x" * 101


def test_a_vanished_frame_is_a_frame_error(tmp_path: Path) -> None:
    (tmp_path / "1.png").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FrameError, match="cannot be read: No such file or directory"):
        read(tmp_path, "1.png")
    with pytest.raises(FrameError, match="cannot be read: No such file or directory"):
        read(tmp_path, "2.png")


def test_a_file_that_says_less_than_it_holds_is_still_capped() -> None:
    """/proc files say 0 bytes and a file may grow while read: the cap holds on what is read, not on fstat."""
    rfd, wfd = os.pipe()
    try:
        os.write(wfd, b"y" * 20)
        os.close(wfd)
        assert fsops._read_capped(rfd, 0, 19) is None
    finally:
        os.close(rfd)
    rfd, wfd = os.pipe()
    try:
        os.write(wfd, b"y" * 20)
        os.close(wfd)
        assert fsops._read_capped(rfd, 3, 20) == b"y" * 20
    finally:
        os.close(rfd)


def test_a_proc_file_behind_a_link_is_capped(tmp_path: Path) -> None:
    (tmp_path / "1.png").symlink_to("/proc/self/status")  # a regular file of size 0 that holds ~1 KB
    assert os.stat(tmp_path / "1.png").st_size == 0
    with pytest.raises(FrameError, match=r"grew past stream\.max_frame_bytes"):
        read(tmp_path, "1.png", max_bytes=100)


# --- the PNG header, before any decoder ------------------------------------------------------------------------


def test_raw_sends_the_file_untouched(frames: Callable[..., Path]) -> None:
    directory = frames(1)
    with FrameFolder.open(directory) as folder:
        [ref] = folder.list().frames
        assert base64.b64decode(read_raw(ref, folder, LIMITS).data) == ref.path.read_bytes()


def test_raw_rejects_what_is_not_a_whole_png(frames: Callable[..., Path]) -> None:
    directory = frames(1)
    with FrameFolder.open(directory) as folder:
        [ref] = folder.list().frames
        data = ref.path.read_bytes()
        ref.path.write_bytes(data[: len(data) // 2])
        with pytest.raises(FrameError, match=r"truncated|runs past the end"):
            read_raw(ref, folder, LIMITS)
        ref.path.write_bytes(b"GIF89a" + data)
        with pytest.raises(FrameError, match="not a PNG"):
            read_raw(ref, folder, LIMITS)
        ref.path.write_bytes(b"")
        with pytest.raises(FrameError, match="is empty"):
            read_raw(ref, folder, LIMITS)


def test_jpeg_reencodes_at_the_quality_asked(frames: Callable[..., Path]) -> None:
    with FrameFolder.open(frames(1, size=(64, 48))) as folder:
        [ref] = folder.list().frames
        high = base64.b64decode(read_jpeg(ref, folder, 95, LIMITS).data)
        low = base64.b64decode(read_jpeg(ref, folder, 10, LIMITS).data)
    assert high[:3] == b"\xff\xd8\xff" and len(low) < len(high)
    decoded = cv2.imdecode(np.frombuffer(high, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (48, 64, 3)


def test_an_undecodable_frame_is_a_frame_error(tmp_path: Path) -> None:
    (tmp_path / "1.png").write_bytes(ihdr(8, 8) + b"rubbish")
    with FrameFolder.open(tmp_path) as folder, pytest.raises(FrameError, match="cannot be decoded"):
        read_jpeg(folder.list().frames[0], folder, 90, LIMITS)


@pytest.mark.parametrize("fmt", ["jpeg", "raw"])
def test_a_header_claiming_too_many_pixels_is_refused_before_any_decoder(
    tmp_path: Path, no_decoder: list[int], fmt: str
) -> None:
    (tmp_path / "1.png").write_bytes(png_claiming(50000, 50000))
    assert (tmp_path / "1.png").stat().st_size < 70
    with FrameFolder.open(tmp_path) as folder:
        [ref] = folder.list().frames
        encode = encoder(fmt, 90, folder, LIMITS)  # type: ignore[arg-type]
        with pytest.raises(FrameError, match=r"50000x50000 pixels, more than stream.max_frame_pixels \(16000000\)"):
            encode(ref)
        (tmp_path / "1.png").write_bytes(png_claiming(4000, 4000))
        with pytest.raises(FrameError, match="4000x4000"):
            encoder(fmt, 90, folder, FrameLimits(max_pixels=4000 * 4000 - 1))(ref)  # type: ignore[arg-type]
    assert no_decoder == []


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (ihdr(8, 8)[:20], "truncated PNG"),
        (b"\x89PNG", "truncated PNG"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 40, "not a PNG file"),
        (ihdr(8, 8)[:29] + b"\0\0\0\0", "checksum is wrong"),
        (ihdr(0, 8), "says 0x8 pixels"),
        (ihdr(2**31, 1), "says 2147483648x1 pixels"),
        (ihdr(8, 8, depth=3), "bit depth 3 with colour type 2"),
        (ihdr(8, 8, colour=5), "bit depth 8 with colour type 5"),
        (ihdr(8, 8, tail=b"\1\0\0"), "unknown compression"),
        (ihdr(8, 8, tail=b"\0\0\2"), "interlace"),
        (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDX", b"\0" * 13), "not a 13-byte IHDR"),
        (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", b"\0" * 14), "not a 13-byte IHDR"),
    ],
)
def test_a_malformed_header_is_refused_before_any_decoder(
    tmp_path: Path, no_decoder: list[int], data: bytes, problem: str
) -> None:
    (tmp_path / "1.png").write_bytes(data)
    with FrameFolder.open(tmp_path) as folder:
        [ref] = folder.list().frames
        for fmt in ("jpeg", "raw"):
            with pytest.raises(FrameError, match=problem):
                encoder(fmt, 90, folder, LIMITS)(ref)  # type: ignore[arg-type]
    assert no_decoder == []


def test_png_size_reads_what_opencv_writes() -> None:
    for width, height in [(1, 1), (64, 48), (3, 700)]:
        ok, buf = cv2.imencode(".png", np.zeros((height, width, 3), np.uint8))
        assert ok and png_size(buf.tobytes()[:33]) == (width, height)
        assert check_png("x", buf.tobytes(), width * height) == (width, height)


@pytest.mark.parametrize("decoder", ["common", "libspng", "opencv"])
@pytest.mark.parametrize("error", [cv2.error("codec gave up"), MemoryError(), ValueError("odd")])
def test_any_exception_from_the_decoder_is_that_frames_error(
    frames: Callable[..., Path], monkeypatch: pytest.MonkeyPatch, error: Exception, decoder: str
) -> None:
    def decode(*args: object) -> None:
        raise error

    if decoder == "common":
        monkeypatch.setattr(png, "decode_common", decode)
    else:
        monkeypatch.setattr(png, "decode_common", lambda data: None)  # as for a PNG it does not take
        monkeypatch.setattr(spng, "available", lambda: decoder == "libspng")
        monkeypatch.setattr(spng if decoder == "libspng" else cv2, "decode_rgb" if decoder == "libspng" else "imdecode",
                            decode)
    with FrameFolder.open(frames(1)) as folder:
        [ref] = folder.list().frames
        with pytest.raises(FrameError, match=f"cannot be decoded: {type(error).__name__}"):
            read_jpeg(ref, folder, 90, LIMITS)


def test_any_exception_from_the_encoder_is_that_frames_error(
    frames: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def encode(*args: object, **kwargs: object) -> None:
        raise MemoryError

    monkeypatch.setattr(simplejpeg, "encode_jpeg", encode)
    with FrameFolder.open(frames(1)) as folder:
        [ref] = folder.list().frames
        with pytest.raises(FrameError, match="JPEG encoding failed: MemoryError"):
            read_jpeg(ref, folder, 90, LIMITS)


def test_an_image_past_jpegs_sides_is_that_frames_error() -> None:
    with pytest.raises(FrameError, match=r"wide\.png: JPEG encoding failed: ValueError"):
        encode_jpeg(np.zeros((1, 70_000, 3), np.uint8), 90, name="wide.png", order="BGR")


def _markers(jpeg: bytes) -> list[bytes]:
    """The JPEG's marker segments up to its scan: quantisation and Huffman tables, sampling, sides."""
    segments, at = [], 2
    while jpeg[at + 1] != 0xDA:
        length = int.from_bytes(jpeg[at + 2 : at + 4], "big")
        segments.append(jpeg[at : at + 2 + length])
        at += 2 + length
    return segments


def _psnr(jpeg: bytes, image: np.ndarray) -> float:
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).astype(float)
    return float(10 * np.log10(255**2 / max(((decoded - image) ** 2).mean(), 1e-9)))


@pytest.mark.parametrize("quality", [1, 60, 90, 100])
def test_jpegs_are_encoded_with_opencvs_settings(quality: int) -> None:
    """Baseline, 4:2:0, the same quantisation and Huffman tables as ``cv2.imencode`` at that quality,
    and as close to the picture, so a backend receives what it did when OpenCV encoded the frames."""
    rng = np.random.default_rng(quality)
    ramp = np.linspace(40, 200, 64)[None, :, None] + np.linspace(0, 40, 48)[:, None, None]
    image = np.clip(ramp + rng.normal(0, 12, (48, 64, 3)), 0, 255).astype(np.uint8)
    ok, theirs = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    assert ok
    ours = encode_jpeg(image, quality, name="f", order="BGR")
    assert _markers(ours) == _markers(theirs.tobytes())
    assert _psnr(ours, image) > _psnr(theirs.tobytes(), image) - 0.25  # dB; q85 instead of q90 loses ~1.5


def test_jpegs_read_the_channels_in_the_order_they_are_given() -> None:
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    rgba = np.dstack([rgb, rng.integers(0, 256, (16, 24, 1), dtype=np.uint8)])  # alpha dropped, never composited
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    as_bgr = encode_jpeg(bgr, 90, name="f", order="BGR")
    assert encode_jpeg(rgb, 90, name="f", order="RGB") == as_bgr
    assert encode_jpeg(rgba, 90, name="f", order="RGBA") == as_bgr
    assert encode_jpeg(rgb, 90, name="f", order="BGR") != as_bgr  # red and blue swapped: the order tells them apart
    assert encode_jpeg(bgr[:, ::2], 90, name="f", order="BGR") == encode_jpeg(bgr[:, ::2].copy(), 90, name="f",
                                                                               order="BGR")


@pytest.mark.parametrize("shape", [(16, 24), (16, 24, 1), (16, 24, 4)])
def test_grey_and_four_channel_arrays_encode_as_opencv_encodes_them(shape: tuple[int, ...]) -> None:
    """A camera or video backend that hands over grey or BGRA frames still gets its frames sent."""
    image = np.random.default_rng(len(shape)).integers(0, 256, shape, dtype=np.uint8)
    ok, theirs = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), 90])
    assert ok
    ours = encode_jpeg(image, 90, name="f", order="BGR")
    assert _markers(ours) == _markers(theirs.tobytes())  # one component for grey, three for BGRA


@pytest.mark.parametrize("colour", [2, 6])  # RGB, RGBA
def test_a_red_frame_is_sent_red(tmp_path: Path, colour: int) -> None:
    """Through the whole jpeg path (read, check, decode, encode): the PNG's channel order reaches the encoder."""
    red = np.zeros((16, 16, 3 if colour == 2 else 4), np.uint8)
    red[..., 0] = 230  # red, in the PNG's RGB order
    if colour == 6:
        red[..., 3] = 255
    rows = b"".join(b"\0" + row.tobytes() for row in red)
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, colour, 0, 0, 0))
    (tmp_path / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(rows))
                                     + chunk(b"IEND", b""))
    with FrameFolder.open(tmp_path) as folder:
        [ref] = folder.list().frames
        frame = encoder("jpeg", 90, folder, LIMITS)(ref)
    sent = cv2.imdecode(np.frombuffer(base64.b64decode(frame.data), np.uint8), cv2.IMREAD_COLOR)
    blue, green, red_channel = (float(sent[..., c].mean()) for c in range(3))
    assert red_channel > 200 and blue < 30 and green < 30


def test_a_folder_of_pngs_streams_as_jpeg_without_loading_opencv(frames: Callable[..., Path]) -> None:
    """OpenCV costs a process 16 MB of RSS and 0.12 CPU s to load: the PNGs caired meets most never need it."""
    directory = frames(3)
    code = (
        "import sys\n"
        "from caired.frames import FrameFolder, FrameLimits, encoder\n"
        f"with FrameFolder.open({str(directory)!r}) as folder:\n"
        "    for ref in folder.list().frames:\n"
        "        assert encoder('jpeg', 90, folder, FrameLimits())(ref).data\n"
        "print('cv2' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert run.stdout.split() == ["False"]


def test_opencv_refuses_huge_images_itself_as_a_second_line() -> None:
    """caired sets OPENCV_IO_MAX_IMAGE_PIXELS before cv2 loads; one already set is kept."""
    code = (
        "import os, sys, numpy as np\n"
        "import caired.frames, cv2\n"
        "print(os.environ['OPENCV_IO_MAX_IMAGE_PIXELS'])\n"
        "try:\n"
        "    cv2.imdecode(np.frombuffer(sys.stdin.buffer.read(), np.uint8), cv2.IMREAD_COLOR)\n"
        "except cv2.error as exc:\n"
        "    print('refused' if 'CV_IO_MAX_IMAGE_PIXELS' in str(exc) else exc)\n"
    )
    bomb = png_claiming(20000, 20000)  # 4e8 pixels: under OpenCV's default 2**30, over caired's limit
    assert DECODER_PIXEL_LIMIT < 20000 * 20000
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    done = subprocess.run([sys.executable, "-c", code], input=bomb, capture_output=True, env=env, timeout=60)
    assert done.stdout.decode().split() == [str(DECODER_PIXEL_LIMIT), "refused"], done.stderr
    done = subprocess.run([sys.executable, "-c", code], input=png_claiming(10, 10), capture_output=True,
                          env={**env, "OPENCV_IO_MAX_IMAGE_PIXELS": "50"}, timeout=60)
    assert done.stdout.decode().split() == ["50", "refused"], done.stderr


def test_opencv_runs_each_call_on_one_thread_unless_told_otherwise() -> None:
    """caired's workers parallelise across frames; OpenCV's own pool (spinning between calls) is off."""
    code = "import os, cv2, caired.frames\nprint(os.environ['OPENCV_FOR_THREADS_NUM'], cv2.getNumThreads())\n"
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_FOR_THREADS_NUM"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=60)
    assert done.stdout.decode().split() == ["1", "1"], done.stderr
    done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          env={**env, "OPENCV_FOR_THREADS_NUM": "2"}, timeout=60)
    assert done.stdout.decode().split() == ["2", "2"], done.stderr


# --- the pipeline ---------------------------------------------------------------------------------------------


async def test_pipeline_keeps_order_and_passes_errors_through(frames: Callable[..., Path]) -> None:
    directory = frames(20)
    with FrameFolder.open(directory) as folder:
        refs = folder.list().frames
        refs[5].path.write_bytes(b"broken")
        limiter = trio.CapacityLimiter(2)
        seen: list[str] = []
        async with encode_pipeline(refs, encoder("raw", 90, folder, LIMITS), depth=4, limiter=limiter) as results:
            async for result in results:
                seen.append(result.timestamp if isinstance(result, EncodedFrame) else f"error:{result.name}")
    assert seen[5] == f"error:{refs[5].name}"
    assert [s for i, s in enumerate(seen) if i != 5] == [r.timestamp for i, r in enumerate(refs) if i != 5]


async def test_whatever_an_encoder_raises_comes_out_as_that_items_frame_error() -> None:
    refs = [FrameRef(f"{i}.png", str(i)) for i in range(4)]

    def encode(ref: FrameRef) -> EncodedFrame:
        if ref.timestamp == "1":
            raise RuntimeError("a bug in a codec\nsecond line")
        if ref.timestamp == "2":
            raise MemoryError
        return EncodedFrame(ref.timestamp, b"")

    seen: list[object] = []
    async with encode_pipeline(refs, encode, depth=2, limiter=trio.CapacityLimiter(2), batch=2) as results:
        async for result in results:
            seen.append(result.timestamp if isinstance(result, EncodedFrame) else (result.name, result.problem))
    assert seen == ["0", ("1.png", "cannot be encoded: RuntimeError: second line"),
                    ("2.png", "cannot be encoded: MemoryError"), "3"]


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
    directory = frames(10)
    with FrameFolder.open(directory) as folder:
        refs = folder.list().frames
        refs[6].path.write_bytes(b"broken")
        hops: list[object] = []
        run_sync = trio.to_thread.run_sync

        async def counting(fn: Callable[..., object], *args: object, **kwargs: object) -> object:
            hops.append(args)
            return await run_sync(fn, *args, **kwargs)

        monkeypatch.setattr(trio.to_thread, "run_sync", counting)
        seen: list[str] = []
        encode = encoder("raw", 90, folder, LIMITS)
        async with encode_pipeline(refs, encode, depth=8, limiter=trio.CapacityLimiter(2), batch=4) as chan:
            async for result in chan:
                seen.append(result.timestamp if isinstance(result, EncodedFrame) else f"error:{result.name}")
    assert seen == [f"error:{r.name}" if i == 6 else r.timestamp for i, r in enumerate(refs)]
    assert len(hops) == 4  # the first alone, then 4 + 4 + 1


async def test_a_batch_under_way_stops_when_the_pipeline_is_left() -> None:
    started: list[int] = []

    def encode(index: int) -> EncodedFrame:
        started.append(index)
        if index == 1:  # the first of a batch of four: hold it until the pipeline is left
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    trio.from_thread.check_cancelled()
                except trio.Cancelled:
                    break
                time.sleep(0.001)
        return EncodedFrame(str(index), b"")

    async with encode_pipeline(range(9), encode, depth=8, limiter=trio.CapacityLimiter(1), batch=4) as results:
        assert (await results.receive()).timestamp == "0"  # the first frame came alone
        with trio.fail_after(10):
            while 1 not in started:  # noqa: ASYNC110 - a worker thread's progress: no event to wait on
                await trio.sleep(0.001)
    assert started == [0, 1]  # 2, 3 and 4 of that batch were not encoded for nobody


async def test_frames_from_an_async_source_are_not_held_back_to_fill_a_batch() -> None:
    """Live frames go one by one: the first is encoded before the second exists."""
    send, receive = trio.open_memory_channel[str](10)

    def encode(stamp: str) -> EncodedFrame:
        return EncodedFrame(stamp, b"")

    async with send, encode_pipeline(receive, encode, depth=8, limiter=trio.CapacityLimiter(2), batch=4) as chan:
        await send.send("1")
        with trio.fail_after(5):
            assert (await chan.receive()).timestamp == "1"


@pytest.mark.parametrize("workers", [2, 3, 5, 9])
async def test_a_folder_batch_leaves_no_worker_idle(workers: int) -> None:
    """jpeg frames of a folder go in batches, but never so large that fewer batches are in
    flight than there are workers: the first batch of each worker waits for all the others."""
    depth = 8
    batch = folder_batch("jpeg", depth, workers)
    everyone = threading.Barrier(workers, timeout=10)
    threads: set[int] = set()
    lock = threading.Lock()

    def encode(index: int) -> EncodedFrame:
        with lock:
            new_thread = threading.get_ident() not in threads
            threads.add(threading.get_ident())
        if new_thread and not everyone.broken and len(threads) <= workers:
            everyone.wait()  # broken (an error for that frame) if the others never get there
        return EncodedFrame(str(index), b"")

    async with encode_pipeline(range(60), encode, depth=depth, limiter=trio.CapacityLimiter(workers),
                               batch=batch) as results:
        seen = [result async for result in results]
    assert [r.timestamp if isinstance(r, EncodedFrame) else r.problem for r in seen] == [str(i) for i in range(60)]
    assert batch == {2: 4, 3: 4, 5: 2, 9: 1}[workers]
    assert folder_batch("raw", depth, workers) == 4  # a raw frame costs less than the hop: one worker keeps up


def test_encode_workers_follow_the_cpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """A container pinned to 1 CPU of 64 gets 2 workers unpaced (one to fill a waiting one's gap), not 65;
    paced, as many as its CPUs."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert encode_workers(paced=False) == 2
    assert encode_workers(paced=True) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 7})
    assert (encode_workers(paced=False), encode_workers(paced=True)) == (4, 3)


# --- fuzz: names, listings and headers from anywhere ----------------------------------------------------------

FRAMEISH = st.from_regex(rb"\A[0-9]{1,12}(\.[0-9]{1,8})?\.(png|PNG|pNg)\Z")
NAMES = st.one_of(FRAMEISH, st.binary(min_size=1, max_size=40))


@given(st.lists(NAMES, max_size=30))
def test_any_byte_names_sort_or_are_counted_never_crash(names: list[bytes]) -> None:
    listing = sort_frames(names)
    matching = [n for n in names if frame_stem(n) is not None]
    assert len(listing.frames) == len(matching)
    assert listing.ignored == sum(1 for n in names if frame_stem(n) is None and not n.startswith(b"."))
    stamps = [Decimal(ref.timestamp) for ref in listing.frames]
    assert stamps == sorted(stamps)
    for ref in listing.frames:
        assert ref.name.isascii() and ref.name.lower().endswith(".png")
        assert ref.name[: -len(".png")] == ref.timestamp
    for example in listing.examples:
        example.encode("utf-8")  # always printable in a UTF-8 log line


FILE_NAMES = st.binary(min_size=1, max_size=60).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b"..")
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(FRAMEISH, FILE_NAMES), max_size=12, unique=True))
def test_any_folder_lists_from_its_descriptor(names: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            with open(os.path.join(os.fsencode(tmp), name), "wb"):
                pass
        listing = list_frames(Path(tmp), follow_symlinks=False)
    assert sorted(ref.name.encode() for ref in listing.frames) == sorted(n for n in names if frame_stem(n))
    expected = sort_frames(names, Path(tmp))
    assert (listing.frames, listing.ignored) == (expected.frames, expected.ignored)
    assert len(listing.examples) == len(expected.examples)  # which ones depends on the folder's order
    assert set(listing.examples) <= {shown(n) for n in names}


@given(st.binary(max_size=80))
def test_any_bytes_make_a_size_or_a_value_error(data: bytes) -> None:
    try:
        width, height = png_size(data)
    except ValueError as exc:
        assert str(exc)
    else:
        assert 0 < width < 2**31 and 0 < height < 2**31
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 33


@given(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1),
       st.sampled_from([(0, 1), (0, 16), (2, 8), (2, 16), (3, 1), (3, 8), (4, 8), (6, 16)]), st.booleans())
def test_every_sound_header_gives_its_size(width: int, height: int, kind: tuple[int, int], interlaced: bool) -> None:
    colour, depth = kind
    head = ihdr(width, height, depth, colour, tail=b"\0\0" + bytes([interlaced]))
    assert png_size(head) == (width, height)
    flipped = bytearray(head)
    flipped[16 + (width % 13)] ^= 0x40  # one bit of the IHDR data changed: the CRC no longer matches
    with pytest.raises(ValueError, match="checksum"):
        png_size(bytes(flipped))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 64), st.integers(1, 64), st.binary(max_size=300))
def test_any_body_behind_a_sound_header_decodes_or_is_a_frame_error(width: int, height: int, body: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "1.png").write_bytes(ihdr(width, height) + body)
        with FrameFolder.open(Path(tmp)) as folder:
            [ref] = folder.list().frames
            for fmt in ("jpeg", "raw"):
                try:
                    frame = encoder(fmt, 90, folder, LIMITS)(ref)  # type: ignore[arg-type]
                except FrameError as exc:
                    assert exc.name == "1.png" and exc.problem
                else:
                    assert frame.timestamp == "1"


def test_a_folder_nobody_closed_gives_its_descriptor_back_when_collected(frames: Callable[..., Path]) -> None:
    folder = FrameFolder.open(frames(1))
    fd = folder.fileno()
    with pytest.warns(ResourceWarning, match="unclosed frame folder"):
        del folder
        gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)
