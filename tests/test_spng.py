"""libspng through ctypes: the same pixels as OpenCV for every PNG a frame may be, and its GIL let go."""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from caired import frames, spng
from caired.errors import FrameError
from tests.test_png import bgr

pytestmark = pytest.mark.skipif(not spng.available(), reason="pyspng (libspng) is not installed")

# (colour type, bit depth) pairs the PNG specification allows.
FORMATS = [(0, 1), (0, 2), (0, 4), (0, 8), (0, 16), (2, 8), (2, 16), (3, 1), (3, 2), (3, 4), (3, 8),
           (4, 8), (4, 16), (6, 8), (6, 16)]
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _rows(samples: np.ndarray, depth: int) -> bytes:
    """Scanlines, each with filter byte 0, samples packed as PNG packs them (big-endian, MSB first)."""
    out = bytearray()
    for row in samples:
        flat = row.reshape(-1)
        if depth == 16:
            packed = flat.astype(">u2").tobytes()
        elif depth == 8:
            packed = flat.astype(np.uint8).tobytes()
        else:
            per_byte = 8 // depth
            padded = np.zeros(-(-len(flat) // per_byte) * per_byte, dtype=np.uint8)
            padded[: len(flat)] = flat
            groups = padded.reshape(-1, per_byte)
            shifts = np.arange(per_byte - 1, -1, -1, dtype=np.uint8) * depth
            packed = np.bitwise_or.reduce(groups << shifts, axis=1).astype(np.uint8).tobytes()
        out += b"\0" + packed
    return bytes(out)


def make_png(samples: np.ndarray, colour: int, depth: int, *, interlace: bool = False,
             extra: bytes = b"") -> bytes:
    """A PNG of ``samples`` (H x W x channels), written the long way so every format can be made."""
    height, width = samples.shape[:2]
    if interlace:
        raw = b"".join(_rows(samples[y0::dy, x0::dx], depth) for x0, y0, dx, dy in ADAM7
                       if samples[y0::dy, x0::dx].size)
    else:
        raw = _rows(samples, depth)
    head = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, int(interlace))
    body = chunk(b"IHDR", head) + extra
    if colour == 3:
        palette = np.random.default_rng(depth).integers(0, 256, (2**depth, 3), dtype=np.uint8)
        body += chunk(b"PLTE", palette.tobytes())
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def samples_for(colour: int, depth: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    top = 2**depth
    return rng.integers(0, top, (height, width, CHANNELS[colour]), dtype=np.uint32)


def cv2_colour(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


@pytest.mark.parametrize("interlace", [False, True])
@pytest.mark.parametrize(("colour", "depth"), FORMATS)
def test_same_pixels_as_opencv_for_every_format(colour: int, depth: int, interlace: bool) -> None:
    data = make_png(samples_for(colour, depth, 37, 53, seed=colour * 100 + depth), colour, depth,
                    interlace=interlace)
    expected = cv2_colour(data)
    assert np.array_equal(bgr(frames.decode_png("f.png", data)), expected)
    assert np.array_equal(spng.decode_rgb(data), expected[..., ::-1])


@pytest.mark.parametrize(("colour", "depth", "trns"), [
    (0, 8, struct.pack(">H", 7)), (2, 8, struct.pack(">HHH", 1, 2, 3)), (3, 8, bytes(range(0, 256, 2))),
    (2, 16, struct.pack(">HHH", 100, 200, 300)),
])
def test_transparency_and_gamma_are_not_applied_as_opencv_does_not(colour: int, depth: int, trns: bytes) -> None:
    extra = chunk(b"gAMA", struct.pack(">I", 45455)) + chunk(b"sRGB", b"\0")
    data = make_png(samples_for(colour, depth, 16, 16, seed=3), colour, depth, extra=extra)
    with_trns = data.replace(b"IDAT", b"IDAT", 1)
    at = with_trns.index(b"IDAT") - 4
    with_trns = with_trns[:at] + chunk(b"tRNS", trns) + with_trns[at:]
    for png in (data, with_trns):
        assert np.array_equal(bgr(frames.decode_png("f.png", png)), cv2_colour(png))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(FORMATS), st.integers(1, 40), st.integers(1, 40), st.booleans(), st.integers(0, 2**32 - 1))
def test_any_size_any_format_decodes_like_opencv(fmt: tuple[int, int], height: int, width: int, interlace: bool,
                                                 seed: int) -> None:
    colour, depth = fmt
    data = make_png(samples_for(colour, depth, height, width, seed), colour, depth, interlace=interlace)
    assert np.array_equal(bgr(frames.decode_png("f.png", data)), cv2_colour(data))


def test_a_real_frame_decodes_like_opencv() -> None:
    rng = np.random.default_rng(16)
    image = np.clip(rng.normal(120, 30, (480, 640, 3)), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".png", image)
    assert ok
    assert np.array_equal(bgr(frames.decode_png("f.png", buf.tobytes())), image)


@pytest.mark.parametrize("damage", ["idat crc", "truncated", "zlib", "no idat"])
def test_a_damaged_png_is_that_frames_error(damage: str) -> None:
    data = make_png(samples_for(2, 8, 20, 20, seed=1), 2, 8)
    at = data.index(b"IDAT")
    if damage == "idat crc":
        bad = data[: at + 10] + bytes([data[at + 10] ^ 0xFF]) + data[at + 11 :]
    elif damage == "truncated":
        bad = data[: at + 30]
    elif damage == "zlib":
        length = struct.unpack(">I", data[at - 4 : at])[0]
        payload = bytes(length)  # not a zlib stream
        bad = data[: at - 4] + chunk(b"IDAT", payload) + chunk(b"IEND", b"")
    else:
        bad = data[: at - 4] + chunk(b"IEND", b"")
    with pytest.raises(spng.SpngError):
        spng.decode_rgb(bad)
    with pytest.raises(FrameError, match="cannot be decoded"):
        frames.decode_png("f.png", bad)


def test_the_gil_is_let_go_while_libspng_decodes() -> None:
    """The main thread runs while another thread is inside a decode (pyspng.load would stop it there)."""
    yy, xx = np.mgrid[0:3000, 0:3000]
    image = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1)
    data = make_png(image.astype(np.uint32), 2, 8)  # 27 MB of pixels, one IDAT chunk: tens of ms a decode
    inside = False
    done = threading.Event()

    def decode() -> None:
        nonlocal inside
        for _ in range(3):
            inside = True
            spng.decode_rgb(data)
            inside = False
        done.set()

    spng.decode_rgb(data)  # loaded and warm
    seen_inside = 0
    worker = threading.Thread(target=decode)
    worker.start()
    try:
        while not done.is_set():
            seen_inside += inside
            time.sleep(0)  # a turn for the other thread between bytecodes, not a wait
    finally:
        worker.join()
    # With the GIL held through each decode, this loop could see ``inside`` at most once per decode.
    assert seen_inside > 30


def test_a_text_chunk_that_inflates_to_512_mib_is_refused_without_the_memory() -> None:
    """libspng keeps decompressed text aside; its cache limit refuses a zTXt bomb instead of inflating it.

    The frame decoder takes such a PNG by the common path (``caired.png``), which never looks
    into an ancillary chunk: the pixels come back, and the memory stays where it was too.
    """
    code = (
        "import resource, sys, zlib\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from test_spng import chunk, make_png, samples_for\n"
        "from caired import frames, spng\n"
        "packer = zlib.compressobj(9)\n"
        "block = bytes(1 << 20)\n"
        "bomb = b''.join(packer.compress(block) for _ in range(512)) + packer.flush()\n"
        "data = make_png(samples_for(2, 8, 16, 16, 1), 2, 8, extra=chunk(b'zTXt', b'k\\0\\0' + bomb))\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(frames.decode_png('bomb.png', data).array.shape)\n"
        "try:\n"
        "    spng.decode_rgb(data)\n"
        "except spng.SpngError as exc:\n"
        "    print(exc)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                          timeout=120)
    shape, problem, grown_mb = done.stdout.splitlines()
    assert shape == "(16, 16, 3)", done.stderr
    assert problem.startswith("reached chunk/cache limits"), done.stderr
    assert int(grown_mb) < 64


def test_without_libspng_opencv_decodes_the_same_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_png(samples_for(6, 16, 30, 20, seed=5), 6, 16, interlace=True)
    with_libspng = bgr(frames.decode_png("f.png", data))
    monkeypatch.setattr(spng, "decode_rgb", lambda _data: pytest.fail("libspng used"))
    monkeypatch.setattr(spng, "available", lambda: False)
    assert np.array_equal(bgr(frames.decode_png("f.png", data)), with_libspng)


@pytest.mark.parametrize("kind", [b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tEXt", b"gAMA"])
def test_a_bad_crc_refuses_a_critical_chunk_and_is_ignored_on_an_ancillary_one_as_opencv_does(kind: bytes) -> None:
    extra = chunk(b"tEXt", b"Comment\0hello") + chunk(b"gAMA", struct.pack(">I", 45455))
    data = make_png(samples_for(3, 8, 9, 11, seed=2), 3, 8, extra=extra)
    at = data.index(kind) - 4
    (length,) = struct.unpack_from(">I", data, at)
    crc_at = at + 8 + length
    bad = data[:crc_at] + bytes([data[crc_at] ^ 0x01]) + data[crc_at + 1 :]
    opencv = cv2.imdecode(np.frombuffer(bad, np.uint8), cv2.IMREAD_COLOR)
    if kind[0] & 0x20 or kind == b"IEND":  # ancillary, or after the image data: libpng only warns
        assert np.array_equal(bgr(frames.decode_png("f.png", bad)), opencv)
    else:
        assert opencv is None
        with pytest.raises(spng.SpngError, match=f"CRC mismatch in the {kind.decode()} chunk"):
            spng.decode_rgb(bad)
