"""caired.png: the common-case decoder gives OpenCV's pixels, takes what OpenCV writes, and hands on the rest."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from unittest.mock import patch

import cv2
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from caired import frames, png, spng

CHANNELS = {0: 1, 2: 3, 6: 4}
SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def filtered_rows(pixels: np.ndarray, filters: list[int]) -> bytes:
    """Scanlines of 8-bit ``pixels`` (H x W x channels), row y filtered with ``filters[y]``, as the PNG spec says."""
    height, width, bpp = pixels.shape
    rows = pixels.reshape(height, width * bpp).astype(np.int64)
    out = bytearray()
    for y, kind in enumerate(filters):
        row, above = rows[y], rows[y - 1] if y else np.zeros_like(rows[y])
        line = bytearray([kind])
        for i in range(len(row)):
            a = int(row[i - bpp]) if i >= bpp else 0
            b, c = int(above[i]), int(above[i - bpp]) if i >= bpp else 0
            predictor = [0, a, b, (a + b) // 2, _paeth(a, b, c)][kind]
            line.append((int(row[i]) - predictor) % 256)
        out += line
    return bytes(out)


def make_png(pixels: np.ndarray, colour: int, filters: list[int], *, idat: bytes | None = None,
             before_idat: bytes = b"", after_idat: bytes = b"", depth: int = 8, interlace: int = 0,
             end: bool = True) -> bytes:
    height, width = pixels.shape[:2]
    head = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace))
    data = idat if idat is not None else zlib.compress(filtered_rows(pixels, filters), 6)
    body = SIGNATURE + head + before_idat + chunk(b"IDAT", data) + after_idat
    return body + chunk(b"IEND", b"") if end else body


def bgr(pixels: png.Pixels) -> np.ndarray:
    """H x W x 3 BGR: what ``cv2.imdecode(data, cv2.IMREAD_COLOR)`` gives for the PNG these pixels came from."""
    return pixels.array if pixels.order == "BGR" else np.ascontiguousarray(pixels.array[:, :, 2::-1])


def opencv(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def pixels_for(colour: int, height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, CHANNELS[colour]), dtype=np.uint8)


def assert_decoded_as_opencv_does(decoded: png.Pixels | None, image: bytes) -> None:
    assert decoded is not None
    assert decoded.array.dtype == np.uint8 and decoded.array.flags.c_contiguous
    assert decoded.array.shape[2] == len(decoded.order)  # what the JPEG encoder reads as its channels
    assert np.array_equal(bgr(decoded), opencv(image))


needs_libspng = pytest.mark.skipif(not spng.available(), reason="pyspng (libspng) is not installed")


@needs_libspng
@settings(max_examples=80, deadline=None)
@given(st.sampled_from(sorted(CHANNELS)), st.integers(1, 40), st.integers(1, 40), st.data())
def test_rows_filtered_with_any_filter_decode_here_as_opencv_decodes_them(colour: int, height: int, width: int,
                                                                           data: st.DataObject) -> None:
    filters = data.draw(st.lists(st.integers(0, 4), min_size=height, max_size=height))
    image = make_png(pixels_for(colour, height, width, seed=height * 41 + width), colour, filters)
    with patch.object(png, "_undo_sub", side_effect=AssertionError("numpy unfiltered with libspng there")):
        decoded = png.decode_common(image)
    assert_decoded_as_opencv_does(decoded, image)


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(sorted(CHANNELS)), st.integers(1, 40), st.integers(1, 40), st.data())
def test_without_libspng_rows_filtered_with_none_or_sub_decode_here_as_opencv_decodes_them(
        colour: int, height: int, width: int, data: st.DataObject) -> None:
    filters = data.draw(st.lists(st.sampled_from([0, 1]), min_size=height, max_size=height))
    image = make_png(pixels_for(colour, height, width, seed=height * 41 + width), colour, filters)
    block_bytes = data.draw(st.sampled_from([1, 100, png._BLOCK_BYTES]), label="rows unfiltered together, in bytes")
    with patch.object(png, "_BLOCK_BYTES", block_bytes), patch.object(spng, "available", return_value=False):
        decoded = png.decode_common(image)
    assert_decoded_as_opencv_does(decoded, image)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(CHANNELS)), st.integers(1, 24), st.integers(1, 24), st.data())
def test_without_libspng_any_other_filter_is_handed_on_and_still_decodes_as_opencv_does(
        colour: int, height: int, width: int, data: st.DataObject) -> None:
    filters = data.draw(st.lists(st.integers(0, 4), min_size=height, max_size=height))
    image = make_png(pixels_for(colour, height, width, seed=height * 13 + width), colour, filters)
    with patch.object(spng, "available", return_value=False):
        assert (png.decode_common(image) is None) == (max(filters) > 1)
        assert np.array_equal(bgr(frames.decode_png("f.png", image)), opencv(image))


UNFILTERERS = [pytest.param(True, id="libspng", marks=needs_libspng), pytest.param(False, id="numpy")]


@pytest.mark.parametrize("libspng", UNFILTERERS)
def test_a_filter_byte_past_paeth_is_handed_on_and_refused_as_opencv_refuses_it(libspng: bool) -> None:
    pixels = pixels_for(2, 6, 7, seed=3)
    rows = bytearray(filtered_rows(pixels, [1] * 6))
    rows[4 * (1 + 7 * 3)] = 5  # the fifth row's filter byte
    image = make_png(pixels, 2, [1] * 6, idat=zlib.compress(bytes(rows)))
    assert cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR) is None
    with patch.object(spng, "available", return_value=libspng):
        assert png.decode_common(image) is None
        with pytest.raises(frames.FrameError):
            frames.decode_png("f.png", image)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(spng.CHANNELS)), st.integers(1, 3), st.integers(1, 40_000), st.data())
@example(colour=0, height=1, width=65_534, data=None)  # one row filling one stored block exactly
@example(colour=0, height=2, width=65_534, data=None)  # two blocks exactly
@example(colour=0, height=1, width=65_535, data=None)  # one byte into a second block
def test_scanlines_are_wrapped_as_a_png_of_stored_deflate_blocks(colour: int, height: int, width: int,
                                                               data: st.DataObject | None) -> None:
    channels = spng.CHANNELS[colour]
    seed = data.draw(st.integers(0, 2**32 - 1)) if data is not None else 0
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 256, height * (1 + width * channels), dtype=np.uint8)
    rows[:: 1 + width * channels] = rng.integers(0, 5, height, dtype=np.uint8)  # filter bytes
    wrapped = spng.wrap_scanlines(rows.tobytes(), width, height, colour)
    body = wrapped.png
    assert body.startswith(SIGNATURE)
    assert png.read_header(body[: png.IHDR_END][:29] + struct.pack(">I", zlib.crc32(body[12:29]))) == \
        png.Header(width, height, 8, colour, 0)
    found = list(png.chunks(body))
    assert [c.kind for c in found] == [b"IDAT", b"IEND"] and all(c.whole for c in found)
    assert found[1].at + 12 == len(body)  # nothing after IEND
    stream = body[found[0].at + 8 : found[0].at + 8 + found[0].length]
    assert stream[:2] == b"\x78\x01"
    inflater = zlib.decompressobj(-15)  # raw deflate: the Adler-32 is not checked
    assert inflater.decompress(stream[2:]) == rows.tobytes()
    assert inflater.eof and inflater.unused_data == b"\0\0\0\0"  # the Adler-32, left as zeros
    if colour != 4 and spng.available():  # libspng unfilters what OpenCV does, across the blocks
        real = make_png(np.zeros((height, width, channels), np.uint8), colour, [], idat=zlib.compress(rows.tobytes()))
        assert np.array_equal(bgr(png._colour(spng.unfilter(wrapped), colour)), opencv(real))


@needs_libspng
def test_libspng_undoes_every_filter_of_wrapped_scanlines() -> None:
    pixels = pixels_for(6, 5, 9, seed=11)
    rows = filtered_rows(pixels, [0, 1, 2, 3, 4])
    assert np.array_equal(spng.unfilter(spng.wrap_scanlines(rows, 9, 5, 6)), pixels)


@needs_libspng
def test_scanlines_past_one_chunk_are_handed_on() -> None:
    image = make_png(pixels_for(2, 20, 30, seed=4), 2, [1] * 20)
    with patch.object(spng, "_U31", 1000):  # as if the image data passed 2 GB
        with pytest.raises(spng.SpngError, match="do not fit one IDAT chunk"):
            spng.wrap_scanlines(bytes(20 * 91), 30, 20, 2)
        assert png.decode_common(image) is None


@pytest.mark.parametrize("libspng", UNFILTERERS)
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_what_opencv_writes_takes_the_common_path(channels: int, libspng: bool) -> None:
    """OpenCV's PNG writer filters every row with Sub: a frame it wrote is never handed on."""
    rng = np.random.default_rng(channels)
    image = np.clip(rng.normal(120, 30, (480, 640, channels)), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".png", image)
    assert ok
    with patch.object(spng, "available", return_value=libspng):
        decoded = png.decode_common(buf.tobytes())
    assert_decoded_as_opencv_does(decoded, buf.tobytes())


def _damaged(kind: str) -> bytes:
    pixels = pixels_for(2, 12, 9, seed=5)
    rows = filtered_rows(pixels, [1] * 12)
    good = make_png(pixels, 2, [1] * 12)
    at = good.index(b"IDAT")
    text = chunk(b"tEXt", b"k\0v")
    match kind:
        case "idat crc":  # the data intact, its stored CRC one bit off
            crc_at = at + 4 + struct.unpack(">I", good[at - 4 : at])[0]
            return good[:crc_at] + bytes([good[crc_at] ^ 1]) + good[crc_at + 1 :]
        case "short stream":
            return make_png(pixels, 2, [1] * 12, idat=zlib.compress(rows[:-1]))
        case "long stream":
            return make_png(pixels, 2, [1] * 12, idat=zlib.compress(rows + b"\0"))
        case "data after the stream":
            return make_png(pixels, 2, [1] * 12, idat=zlib.compress(rows) + b"junk")
        case "stream cut short":
            return make_png(pixels, 2, [1] * 12, idat=zlib.compress(rows)[:-9])
        case "not zlib":
            return make_png(pixels, 2, [1] * 12, idat=bytes(64))
        case "two runs of IDAT":
            compressed = zlib.compress(rows)
            second = text + chunk(b"IDAT", compressed[20:])
            return make_png(pixels, 2, [1] * 12, idat=compressed[:20], after_idat=second)
        case "unknown critical chunk":
            return make_png(pixels, 2, [1] * 12, before_idat=chunk(b"ABCD", b"x"))
        case "palette in grey":
            return make_png(pixels[..., :1], 0, [1] * 12, before_idat=chunk(b"PLTE", bytes(6)))
        case "no IEND":
            return make_png(pixels, 2, [1] * 12, end=False)
        case "16-bit":
            return make_png(pixels, 2, [1] * 12, depth=16)
        case "interlaced":
            return make_png(pixels, 2, [1] * 12, interlace=1)
        case "palette":
            return make_png(pixels[..., :1], 3, [1] * 12, before_idat=chunk(b"PLTE", bytes(768)))
        case "IHDR crc":
            return good[:29] + bytes([good[29] ^ 1]) + good[30:]
        case "eXIf":  # OpenCV turns the image by its orientation: not inert
            exif = b"MM\0*\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0\x03\0\0\0\0\0\0"
            return make_png(pixels, 2, [1] * 12, before_idat=chunk(b"eXIf", exif))
        case "acTL":
            return make_png(pixels, 2, [1] * 12, before_idat=chunk(b"acTL", bytes(8)))
        case "a chunk name libpng refuses":
            return make_png(pixels, 2, [1] * 12, before_idat=chunk(b"a1b2", b"x"))
        case "text over libpng's limit":
            return make_png(pixels, 2, [1] * 12, before_idat=chunk(b"tEXt", b"k\0" + bytes(8_000_000)))
        case "zlib window over 32 KB":
            stream = zlib.compress(rows)
            return make_png(pixels, 2, [1] * 12, idat=bytes([0x88]) + bytes([(31 - (0x88 * 256) % 31) % 31])
                            + stream[2:])
        case "zlib window smaller than the image":
            packer = zlib.compressobj(6, zlib.DEFLATED, 9)  # a 512-byte window
            big = pixels_for(2, 40, 40, seed=6)
            return make_png(big, 2, [1] * 40, idat=packer.compress(filtered_rows(big, [1] * 40)) + packer.flush())
        case "wider than libpng allows":
            head = bytearray(good[8:33])
            head[8:12] = struct.pack(">I", 1_000_001)
            return good[:8] + chunk(b"IHDR", bytes(head[8:-4])) + good[33:]
        case "not a PNG signature":
            return b"\x89PNG\r\n\x1a\x00" + good[8:]
        case "more chunks than a frame has":
            return make_png(pixels, 2, [1] * 12, before_idat=chunk(b"tEXt", b"k\0v") * 10_001)
        case "filter method 1":
            head = bytearray(good[8:33])
            head[-6] = 1  # IHDR's filter method byte
            return good[:8] + chunk(b"IHDR", bytes(head[8:-4])) + good[33:]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["idat crc", "short stream", "long stream", "data after the stream",
                                  "stream cut short", "not zlib", "two runs of IDAT", "unknown critical chunk",
                                  "palette in grey", "no IEND", "16-bit", "interlaced", "palette",
                                  "IHDR crc", "filter method 1", "eXIf", "acTL", "a chunk name libpng refuses",
                                  "text over libpng's limit", "zlib window over 32 KB",
                                  "zlib window smaller than the image", "wider than libpng allows",
                                  "not a PNG signature", "more chunks than a frame has"])
def test_a_png_not_taken_exactly_as_written_is_handed_on(kind: str) -> None:
    assert png.decode_common(_damaged(kind)) is None


def test_a_turned_frame_decodes_turned_as_opencv_turns_it() -> None:
    pixels = pixels_for(2, 4, 5, seed=8)
    exif = b"MM\0*\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0\x06\0\0\0\0\0\0"  # orientation 6
    image = make_png(pixels, 2, [1] * 4, before_idat=chunk(b"eXIf", exif))
    assert png.decode_common(image) is None
    assert np.array_equal(bgr(frames.decode_png("f.png", image)), opencv(image))
    assert opencv(image).shape == (5, 4, 3)


def test_ancillary_chunks_and_a_palette_in_rgb_are_ignored_as_opencv_ignores_them() -> None:
    pixels = pixels_for(2, 10, 10, seed=9)
    extra = chunk(b"gAMA", struct.pack(">I", 45455)) + chunk(b"PLTE", bytes(range(12)))
    image = make_png(pixels, 2, [1] * 10, before_idat=extra, after_idat=chunk(b"tEXt", b"k\0v"))
    assert_decoded_as_opencv_does(png.decode_common(image), image)


def test_image_data_that_inflates_without_end_is_cut_off_at_the_image_size() -> None:
    """A 1x1 frame whose IDAT inflates to 256 MiB: the decoder stops one byte past 4, holding no more."""
    bomb = zlib.compress(bytes(256 * 1024 * 1024), 9)
    image = make_png(np.zeros((1, 1, 3), np.uint8), 2, [0], idat=bomb)
    tracemalloc.start()
    try:
        assert png.decode_common(image) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=3 * png._CRC_PIECE + 7) | st.integers(0, 3 * png._CRC_PIECE + 7).map(bytes))
def test_chunk_crcs_taken_in_pieces_are_the_whole_chunks_crcs(data: bytes) -> None:
    # Pieces of at most 5 KB: python-isal's crc32 lets go of the GIL only above 5 * 1024 bytes (isal_zlib.c).
    assert png._CRC_PIECE <= 5 * 1024
    assert png._crc32(memoryview(data)) == zlib.crc32(data)
