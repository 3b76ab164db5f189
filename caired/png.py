"""PNG files: their header and chunks read without trusting them, and a frame's pixels as
``cv2.imdecode(data, IMREAD_COLOR)`` gives them, at the least CPU measured, without OpenCV.

``read_header`` checks the signature and IHDR before any decoder allocates; ``chunks``
walks the chunks without reading past the end (``frames.check_png`` holds every chunk to
the file with it).

Three decoders, tried in turn:

1. ``decode_common`` takes the PNGs caired meets most: 8-bit grey, RGB or RGBA, not
   interlaced. That is what OpenCV writes (libpng told to use the Sub filter), so every
   frame ``caired record`` and ``caired synth`` made, and what most capture scripts made.
   Its image data is inflated by ISA-L (the ``isal`` package: 1.5 CPU ms for a 640x480
   webcam frame against zlib's 3.1; libspng's whole decode is 3.6-3.8), and the row
   filters are undone by libspng (``spng.unfilter``: 0.47 ms with the copy it needs, any of
   the five filters, the GIL let go once). Without libspng (a dependency on x86-64 and aarch64 Linux),
   rows filtered with None or Sub are undone in numpy by a prefix sum that doubles its reach
   each pass (log2 of the row's length vectorised adds: 0.8 ms, ~80 calls that each let go
   of the GIL), and other filters are handed on.
2. libspng (``caired.spng``), when pyspng is installed: any other PNG.
3. OpenCV otherwise.

Pixels come in the channel order their decoder gives (``Pixels``: RGB or RGBA from the
first two, BGR from OpenCV), which the JPEG encoder takes as it is (``frames.encode_jpeg``):
no pass to reorder them, and a folder of PNGs streams as JPEG without loading OpenCV (16 MB
of RSS and 0.12 CPU s at start-up here). Reversed, the first three channels are OpenCV's array.

The first never refuses a frame: a PNG it does not take exactly as written (another
format, a filter byte past 4, a critical chunk's CRC that fails, a chunk it does not know
or one OpenCV acts on such as eXIf's orientation, a side or a chunk over libpng's limits,
a zlib window libpng would refuse, a zlib stream that is damaged, short, long, or followed
by more data) goes whole to the next decoder, which decides as it always has. ISA-L's
inflate, libspng's unfiltering and numpy's passes let go of the GIL while they work; the
chunk CRCs keep it.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from typing import Final, Literal, NamedTuple, cast

import numpy as np
from isal import isal_zlib

from caired import spng
from caired.config import DECODER_PIXEL_LIMIT  # frames are held to max_frame_pixels, less, before any decoder

PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
PNG_TRAILER: Final = b"IEND\xaeB`\x82"
IHDR_END: Final = 33  # signature 8, length 4, type 4, IHDR data 13, CRC 4: where the second chunk starts
_IHDR: Final = struct.Struct(">8xI4sIIBBBBBI")  # signature, length, type, the 13 fields, CRC
_CHUNK_HEAD: Final = struct.Struct(">I4s")
_CRC: Final = struct.Struct(">I")
_PNG_MAX_SIDE: Final = 2**31 - 1
_BIT_DEPTHS: Final = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
# Colour types decode_common takes, at 8 bits: bytes per pixel, and the conversion OpenCV's
# IMREAD_COLOR amounts to (grey repeated; RGBA's alpha dropped, not composited).
_GREY, _RGB, _RGBA = 0, 2, 6
_BYTES_PER_PIXEL: Final = {colour: spng.CHANNELS[colour] for colour in (_GREY, _RGB, _RGBA)}
_NONE, _SUB = 0, 1
_INFLATE_ERROR = cast(type[Exception], isal_zlib.error)  # its stub declares an instance
_BLOCK_BYTES: Final = 256 * 1024  # rows unfiltered together, in the cache (see _undo_sub)
_CRC_PIECE: Final = 4096  # under the 5 KB past which ISA-L's crc32 lets go of the GIL (see _crc32)
# What libpng (OpenCV's decoder) refuses or acts on, and this decoder therefore hands on:
_MAX_SIDE: Final = 1_000_000  # libpng's user limit on width and height
_MAX_ANCILLARY_BYTES: Final = 8_000_000  # libpng's limit on a chunk it keeps in memory
_MAX_CHUNKS: Final = 10_000  # OpenCV writes 8 KB IDAT chunks: a 32 MB frame has 4,000
# Ancillary chunks whose presence leaves OpenCV's IMREAD_COLOR pixels as they are (each checked against it).
# Others may change them (eXIf turns the image; acTL/fcTL of an APNG are checked, and can fail it).
_CRITICAL: Final = frozenset({b"IHDR", b"PLTE", b"IDAT", b"IEND"})
_INERT: Final = frozenset({b"tEXt", b"zTXt", b"iTXt", b"gAMA", b"sRGB", b"iCCP", b"cHRM", b"sBIT", b"bKGD",
                           b"tRNS", b"pHYs", b"tIME"})


class Header(NamedTuple):
    width: int
    height: int
    depth: int
    colour: int
    interlace: int


ChannelOrder = Literal["RGB", "RGBA", "BGR"]  # as libjpeg-turbo (simplejpeg) names them


class Pixels(NamedTuple):
    """A decoded frame: H x W x channels of 8 bits, C-contiguous, and the order of its channels.

    ``order`` names it as the JPEG encoder does. RGBA's alpha is ignored there, as OpenCV's
    IMREAD_COLOR drops it (never composited).
    """

    array: np.ndarray
    order: ChannelOrder


class Chunk(NamedTuple):
    kind: bytes
    at: int  # where its length field starts
    length: int
    whole: bool  # its data and CRC lie within the file


def read_header(head: bytes) -> Header:
    """The IHDR of a PNG's first 33 bytes (signature and IHDR); ValueError says what is wrong.

    Checks what libpng would refuse anyway, before it allocates anything: the signature,
    a first chunk that is a 13-byte IHDR with a right CRC, sides of 1 to 2**31-1 pixels,
    a bit depth allowed for the colour type, and known compression, filter and interlace
    methods.
    """
    if not head:
        raise ValueError("is empty")
    if not head.startswith(PNG_SIGNATURE):
        if PNG_SIGNATURE.startswith(head):
            raise ValueError("truncated PNG (no IHDR header)")
        raise ValueError("not a PNG file")
    if len(head) < IHDR_END:
        raise ValueError("truncated PNG (no IHDR header)")
    length, kind, width, height, depth, colour, compression, filtering, interlace, crc = _IHDR.unpack_from(head)
    if length != 13 or kind != b"IHDR":
        raise ValueError("malformed PNG: the first chunk is not a 13-byte IHDR")
    if isal_zlib.crc32(memoryview(head)[12:29]) != crc:
        raise ValueError("malformed PNG: the IHDR checksum is wrong")
    if not (0 < width <= _PNG_MAX_SIDE and 0 < height <= _PNG_MAX_SIDE):
        raise ValueError(f"malformed PNG: the header says {width}x{height} pixels")
    if depth not in _BIT_DEPTHS.get(colour, ()):
        raise ValueError(f"malformed PNG: bit depth {depth} with colour type {colour}")
    if compression != 0 or filtering != 0 or interlace > 1:
        raise ValueError("malformed PNG: unknown compression, filter or interlace method")
    return Header(width, height, depth, colour, interlace)


def png_size(head: bytes) -> tuple[int, int]:
    """Width and height from a PNG's first 33 bytes; ValueError says what is wrong (``read_header``)."""
    header = read_header(head)
    return header.width, header.height


def chunks(data: bytes, *, first: int = IHDR_END) -> Iterator[Chunk]:
    """The chunks from offset ``first`` on whose 8-byte head lies in ``data``, in order, up to IEND.

    The walk ends after IEND, or after the first chunk that is not whole (its length runs
    past the end of ``data``); it never reads past the end.
    """
    at = first
    while at + 8 <= len(data):
        length, kind = _CHUNK_HEAD.unpack_from(data, at)
        whole = at + 12 + length <= len(data)
        yield Chunk(kind, at, length, whole)
        if not whole or kind == b"IEND":
            return
        at += 12 + length


def decode(data: bytes) -> Pixels | None:
    """A PNG whose header and chunk lengths were checked (``frames.check_png``): the pixels OpenCV's
    IMREAD_COLOR gives, in the order their decoder gives them.

    None when OpenCV cannot decode it; libspng's refusal raises ``spng.SpngError``, OpenCV's
    ``cv2.error``, and pixels that do not fit MemoryError. OpenCV is loaded only for a PNG
    that neither of the others takes.
    """
    pixels = decode_common(data)
    if pixels is not None:
        return pixels
    if spng.available() and _libspng_agrees(data):
        return Pixels(spng.decode_rgb(data), "RGB")
    import cv2

    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    return None if image is None else Pixels(image, "BGR")


def decode_common(data: bytes) -> Pixels | None:
    """The pixels of a PNG in the common case (see the module's docstring); None for any other PNG."""
    try:
        width, height, depth, colour, interlace = read_header(data[:IHDR_END])
    except ValueError:
        return None
    if depth != 8 or colour not in _BYTES_PER_PIXEL or interlace != 0 or width > _MAX_SIDE or height > _MAX_SIDE \
            or width * height > DECODER_PIXEL_LIMIT:
        return None
    compressed = _image_data(data, palette_allowed=colour != _GREY)
    if compressed is None:
        return None
    bpp = _BYTES_PER_PIXEL[colour]
    stride = 1 + width * bpp
    raw = _inflate_exactly(compressed, stride * height)
    del compressed  # each frame's buffers are let go as soon as they are used: 3 workers hold them at once
    if raw is None:
        return None
    if spng.available():
        try:
            scanlines = spng.wrap_scanlines(raw, width, height, colour)
            del raw  # the wrapped copy is all that is needed now
            pixels = spng.unfilter(scanlines)
            del scanlines
        except spng.SpngError:
            return None  # libspng refused the rows (a filter byte past 4): the next decoder reports it
        return _colour(pixels, colour)
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride)
    filters = rows[:, 0].copy()
    if int(filters.max()) > _SUB:
        return None
    pixels = _undo_sub(rows[:, 1:], bpp, filters)
    del rows, raw
    return _colour(pixels.reshape(height, width, bpp), colour)


def _libspng_agrees(data: bytes) -> bool:
    """Whether libspng gives OpenCV's pixels for this PNG: no chunk OpenCV acts on or refuses (eXIf's
    orientation, an APNG's frame control, a name or size past libpng's limits), no side over libpng's."""
    if len(data) < IHDR_END:
        return False
    width, height = _IHDR.unpack_from(data)[2:4]
    if not 0 < width <= _MAX_SIDE or not 0 < height <= _MAX_SIDE:
        return False
    for count, chunk in enumerate(chunks(data)):
        if count == _MAX_CHUNKS:
            return False
        if chunk.kind == b"IEND":
            return True
        if chunk.kind not in _CRITICAL and (chunk.kind not in _INERT or chunk.length > _MAX_ANCILLARY_BYTES):
            return False
    return True  # cut short: libspng reports it


def _image_data(data: bytes, *, palette_allowed: bool) -> bytes | None:
    """The IDAT chunks' contents joined, their CRCs checked; None for anything libpng might see otherwise.

    Chunk lengths were held to the file by ``frames.check_png``; they are checked again, as
    this must not read past the end whoever calls it.
    """
    view = memoryview(data)
    parts: list[memoryview] = []
    previous = b"IHDR"
    for count, (kind, at, length, whole) in enumerate(chunks(data)):
        if count == _MAX_CHUNKS or not whole:
            return None  # more chunks than a frame has, or a cut-off file: for the other decoders to judge
        if kind == b"IEND":
            return b"".join(parts) if parts else None
        end = at + 8 + length
        if kind == b"IDAT":
            if parts and previous != b"IDAT":
                return None  # image data in two runs: an error to libpng
            if length:
                parts.append(view[at + 8 : end])
        elif kind == b"PLTE":
            if not palette_allowed or parts:
                return None
        elif kind not in _INERT or length > _MAX_ANCILLARY_BYTES:
            return None  # a critical chunk this decoder does not know, or one OpenCV may act on or refuse
        if not kind[0] & 0x20 and _crc32(view[at + 4 : end]) != _CRC.unpack_from(data, end)[0]:
            return None  # libspng or OpenCV reports the damage
        previous = kind
    return None  # no IEND


def _crc32(data: memoryview) -> int:
    """The CRC-32 of ``data``, taken in ``_CRC_PIECE`` pieces, holding the GIL.

    ISA-L's crc32 lets go of the GIL for more than 5 KB (python-isal's isal_zlib.c: over
    5 * 1024 bytes), and OpenCV writes 8 KB IDAT chunks: a 640x480 frame's ~75 CRCs handed
    the GIL to another thread and back each time (~60 futex calls a frame). In pieces it
    keeps it: ~0.15 us a 4 KB piece.
    """
    crc = 0
    for at in range(0, len(data), _CRC_PIECE):
        crc = isal_zlib.crc32(data[at : at + _CRC_PIECE], crc)
    return crc


def _inflate_exactly(compressed: bytes, size: int) -> bytes | None:
    """The zlib stream inflated, if it is whole, holds exactly ``size`` bytes and nothing follows it.

    At most ``size + 1`` bytes are ever made, whatever the stream says: a zlib bomb stops there.
    """
    if len(compressed) < 2 or compressed[0] & 0x0F != 8:
        return None  # not deflate: libpng refuses it
    window = 1 << ((compressed[0] >> 4) + 8)
    if window > 32768 or window < min(size, 32768):
        return None  # zlib refuses a window over 32 KB, and back-references past a smaller one; ISA-L takes both
    inflater = isal_zlib.decompressobj()
    try:
        raw = inflater.decompress(compressed, size + 1)
    except _INFLATE_ERROR:
        return None
    if len(raw) != size or not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
        return None
    return raw


def _undo_sub(filtered: np.ndarray, bpp: int, filters: np.ndarray) -> np.ndarray:
    """Rows filtered with Sub (each byte stored minus the one ``bpp`` before it) back to their bytes.

    A row's byte i is then the sum, modulo 256, of the stored bytes i, i - bpp, i - 2 bpp...:
    a prefix sum taken ``bpp`` apart. Each pass adds the rows to themselves shifted by a reach
    that doubles (bpp, 2 bpp, 4 bpp...), so a 640-pixel row takes 10 vectorised passes rather
    than 1,920 dependent steps. The passes run over ``_BLOCK_BYTES`` of rows at a time, which
    stay in the CPU's cache between passes: 0.8 CPU ms a 640x480 frame against 1.7 for passes
    over the whole image, with the other core busy. Rows filtered with None are kept as stored.
    """
    height, length = filtered.shape
    out = np.empty((height, length), dtype=np.uint8)
    reaches = list(itertools.takewhile(lambda reach: reach < length, (bpp << k for k in itertools.count())))
    if not reaches or not filters.any():
        out[...] = filtered
        return out
    step = max(1, _BLOCK_BYTES // length)
    spare = np.empty((min(step, height), length), dtype=np.uint8)
    for top in range(0, height, step):
        block = out[top : top + step]
        scratch = spare[: len(block)]
        # The passes alternate between the two buffers; the last one writes into ``block``.
        source, target = filtered[top : top + step], (block if len(reaches) % 2 else scratch)
        for reach in reaches:
            np.add(source[:, reach:], source[:, :-reach], out=target[:, reach:])
            target[:, :reach] = source[:, :reach]
            source, target = target, (scratch if target is block else block)
    unfiltered = filters == _NONE
    if unfiltered.any():
        out[unfiltered] = filtered[unfiltered]
    return out


def _colour(pixels: np.ndarray, colour: int) -> Pixels:
    """Unfiltered 8-bit pixels (H x W x bytes per pixel) as ``Pixels``: grey made RGB, as OpenCV makes it BGR."""
    if colour == _RGB:
        return Pixels(pixels, "RGB")
    if colour == _RGBA:
        return Pixels(pixels, "RGBA")
    grey = pixels.reshape(pixels.shape[0], -1, 1)
    return Pixels(np.concatenate((grey, grey, grey), axis=2), "RGB")  # 0.26 ms a 640x480 frame; np.repeat 0.5
