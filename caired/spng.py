"""PNG decoding with libspng, called through ctypes so the GIL is released while it works.

OpenCV's PNG decoder (libpng + zlib) was ~4.4-5 CPU ms of a 640x480 frame here; libspng
decodes the same frames in ~3 ms. The ``pyspng`` package ships libspng in its wheel
(x86-64 and aarch64 Linux) but its own ``load`` holds the GIL for the whole decode, so
two worker threads decode no faster than one, and the event loop waits behind each
decode. The library's C functions are exported by that same extension module, so they
are called here directly with ctypes, which lets go of the GIL for every foreign call:
frames decode on every core, and the event loop runs meanwhile.

Only what libspng's public API (``spng.h``, 0.7) promises is used: a context per image,
the PNG held in memory, the header, the decoded size, one decode into a buffer we own.
Chunk CRCs are checked here with zlib's CRC-32 before libspng sees the file (its own is
table-driven and was a quarter of its decode time): 5.5 -> 3.7 CPU ms per 640x480 frame.
The GIL is let go once per frame, for the decode, as OpenCV does.
``decode_rgb``'s output is 8-bit RGB whatever the PNG holds, with no gamma, no transparency and no
colour correction applied: what ``cv2.imdecode(..., IMREAD_COLOR)`` gives, channels in
RGB order (``tests/test_spng.py`` holds the two to the same pixels for every colour type,
bit depth and interlace a PNG may have). ``available()`` says whether libspng was found;
without it (pyspng is a dependency only where it has wheels: x86-64 and aarch64 Linux)
caired decodes with OpenCV.

``unfilter`` serves ``caired.png``'s common path: ISA-L inflates (faster than libspng's
zlib) and libspng undoes the row filters of the inflated data, handed to it as a PNG
whose deflate blocks are stored (``wrap_scanlines``).
"""

from __future__ import annotations

import binascii
import contextlib
import ctypes
import importlib.util
import struct
import threading
import types
from collections.abc import Iterator
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt

SPNG_FMT_RGB8: Final = 4  # enum spng_format
SPNG_FMT_PNG: Final = 256  # the PNG's own channels and depth
SPNG_CTX_IGNORE_ADLER32: Final = 1  # enum spng_ctx_flags
SPNG_OK: Final = 0
SPNG_CRC_USE: Final = 2  # enum spng_crc_action: do not check (check_crcs has, or the PNG is made here)
PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
_CHUNK_HEAD: Final = struct.Struct(">I4s")
_CRC: Final = struct.Struct(">I")
CHUNK_CACHE_LIMIT: Final = 4 * 1024 * 1024  # bytes of ancillary chunks (text, ICC profile, EXIF) held per image
_U31: Final = 2**31 - 1  # the longest chunk PNG allows
# The version whose exported functions were checked (pyspng 0.1.4 bundles libspng 0.7.x).
MODULE: Final = "pyspng._pyspng_c"


class _Ihdr(ctypes.Structure):
    _fields_ = [
        ("width", ctypes.c_uint32),
        ("height", ctypes.c_uint32),
        ("bit_depth", ctypes.c_uint8),
        ("color_type", ctypes.c_uint8),
        ("compression_method", ctypes.c_uint8),
        ("filter_method", ctypes.c_uint8),
        ("interlace_method", ctypes.c_uint8),
    ]


class SpngError(ValueError):
    """libspng refused the PNG (the message is libspng's own), or cannot be given it."""


_lock = threading.Lock()
_lib: Any = None
_loaded = False


def _load() -> Any:
    """libspng's functions from pyspng's extension module, typed; None when it is not installed."""
    global _lib, _loaded
    with _lock:
        if _loaded:
            return _lib
        _loaded = True
        spec = importlib.util.find_spec(MODULE)
        if spec is None or spec.origin is None:
            return None
        try:
            # Only the decode itself lets go of the GIL (CDLL): the other calls take microseconds,
            # and each hand-over of the GIL costs more than that when every core is busy (PyDLL).
            releasing, holding = ctypes.CDLL(spec.origin), ctypes.PyDLL(spec.origin)
            lib = types.SimpleNamespace()
            signatures: dict[str, tuple[Any, list[Any]]] = {
                "spng_ctx_new": (ctypes.c_void_p, [ctypes.c_int]),
                "spng_ctx_free": (None, [ctypes.c_void_p]),
                "spng_set_png_buffer": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]),
                "spng_set_chunk_limits": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]),
                "spng_set_crc_action": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]),
                "spng_get_ihdr": (ctypes.c_int, [ctypes.c_void_p, ctypes.POINTER(_Ihdr)]),
                "spng_decoded_image_size": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int,
                                                           ctypes.POINTER(ctypes.c_size_t)]),
                "spng_decode_image": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                                     ctypes.c_int, ctypes.c_int]),
                "spng_strerror": (ctypes.c_char_p, [ctypes.c_int]),
            }
            for name, (restype, argtypes) in signatures.items():
                function = getattr(releasing if name == "spng_decode_image" else holding, name)
                function.restype = restype
                function.argtypes = argtypes
                setattr(lib, name, function)
        except (OSError, AttributeError):  # a pyspng whose module no longer exports libspng
            return None
        _lib = lib
        return lib


def available() -> bool:
    """True when libspng can be called (pyspng installed, exporting libspng's functions)."""
    return _load() is not None


def decode_rgb(data: bytes) -> npt.NDArray[np.uint8]:
    """The PNG ``data`` as an H x W x 3 array of 8-bit RGB; SpngError when libspng refuses it.

    The caller checks the header and the pixel count first (``frames.check_png``); libspng
    checks everything else (chunk CRCs, the zlib stream, lengths), as libpng would.
    """
    check_crcs(data)  # faster than libspng's own, which the context leaves off
    with _context(0) as (lib, ctx):
        # No chunk is longer than the file; what is kept aside (text, profiles, decompressed) is at
        # most that, or CHUNK_CACHE_LIMIT (libspng wants the cache limit to hold one chunk).
        chunk_limit = min(len(data), _U31)
        _check(lib, lib.spng_set_chunk_limits(ctx, chunk_limit, max(chunk_limit, CHUNK_CACHE_LIMIT)))
        _check(lib, lib.spng_set_png_buffer(ctx, data, len(data)))
        ihdr = _Ihdr()
        _check(lib, lib.spng_get_ihdr(ctx, ctypes.byref(ihdr)))
        size = ctypes.c_size_t()
        _check(lib, lib.spng_decoded_image_size(ctx, SPNG_FMT_RGB8, ctypes.byref(size)))
        if size.value != ihdr.width * ihdr.height * 3:
            raise SpngError(f"libspng reports {size.value} bytes for {ihdr.width}x{ihdr.height} RGB")
        image = np.empty((ihdr.height, ihdr.width, 3), dtype=np.uint8)
        _check(lib, lib.spng_decode_image(ctx, image.ctypes.data, size.value, SPNG_FMT_RGB8, 0))
        return image


@contextlib.contextmanager
def _context(flags: int) -> Iterator[tuple[Any, int]]:
    """libspng and a decoding context made with ``flags`` for the block, chunk CRCs not checked.

    SpngError when libspng is not available."""
    lib = _load()
    if lib is None:
        raise SpngError("libspng is not available (pip install pyspng)")
    ctx = lib.spng_ctx_new(flags)
    if not ctx:
        raise MemoryError("libspng could not make a context")
    try:
        _check(lib, lib.spng_set_crc_action(ctx, SPNG_CRC_USE, SPNG_CRC_USE))
        yield lib, ctx
    finally:
        lib.spng_ctx_free(ctx)


class Scanlines(NamedTuple):
    """Inflated image data wrapped as a PNG whose deflate blocks are stored, for ``unfilter``."""

    png: bytes
    width: int
    height: int
    channels: int


CHANNELS: Final = {0: 1, 2: 3, 4: 2, 6: 4}  # per colour type: grey, RGB, grey + alpha, RGBA
_STORED_MAX: Final = 65535  # the most one stored deflate block holds
_STORED_HEAD: Final = struct.Struct("<BHH")  # BFINAL and BTYPE 00, LEN, NLEN
_ZLIB_HEAD: Final = b"\x78\x01"  # deflate with a 32 KB window, no dictionary (a multiple of 31)
_WRAPPED_IHDR: Final = struct.Struct(">8sI4sIIBBBBBI")  # signature, length, type, the 13 fields, CRC
_WRAPPED_END: Final = b"\0\0\0\0" * 2 + _CHUNK_HEAD.pack(0, b"IEND") + b"\0\0\0\0"  # Adler-32, CRC, IEND


def wrap_scanlines(rows: bytes, width: int, height: int, colour: int) -> Scanlines:
    """The inflated scanlines of an 8-bit, non-interlaced PNG (each a filter byte, then the row), as a PNG.

    libspng only takes a PNG, so the bytes are copied, once, into stored (uncompressed) deflate
    blocks of one IDAT chunk, whose inflating is a copy. The checksums are left as zeros: the
    stream is made here, from data whose own were checked, and ``unfilter`` checks none of
    them. SpngError for data that does not fit one chunk (2 GB, past anything
    ``DECODER_PIXEL_LIMIT`` lets through).
    """
    channels = CHANNELS[colour]
    if len(rows) != height * (1 + width * channels):
        raise ValueError(f"{len(rows)} bytes are not {height} rows of {width} pixels")
    blocks = -(-len(rows) // _STORED_MAX)
    stream = len(_ZLIB_HEAD) + blocks * _STORED_HEAD.size + len(rows) + 4
    if stream > _U31:
        raise SpngError(f"{len(rows)} bytes of scanlines do not fit one IDAT chunk")
    parts: list[bytes | memoryview] = [
        _WRAPPED_IHDR.pack(PNG_SIGNATURE, 13, b"IHDR", width, height, 8, colour, 0, 0, 0, 0),
        _CHUNK_HEAD.pack(stream, b"IDAT"), _ZLIB_HEAD]
    with memoryview(rows) as source:
        for start in range(0, len(rows), _STORED_MAX):
            piece = source[start : start + _STORED_MAX]
            parts += (_STORED_HEAD.pack(start + len(piece) == len(rows), len(piece), len(piece) ^ 0xFFFF), piece)
        parts.append(_WRAPPED_END)
        png = b"".join(parts)  # one copy, into memory never zeroed first
        del parts, piece
    return Scanlines(png, width, height, channels)


def unfilter(scanlines: Scanlines) -> npt.NDArray[np.uint8]:
    """The pixels of ``wrap_scanlines``' PNG, H x W x channels: libspng undoes the row filters, all five.

    One foreign call that lets go of the GIL once, where the same in numpy takes ~80 short
    calls a frame, each a chance for the GIL to change hands. Neither the chunks' CRCs nor
    the stream's Adler-32 is checked (zeros here; libspng then tells its zlib, 1.2.11 in
    pyspng 0.1.4, not to validate). SpngError when libspng refuses (a filter byte past 4)
    or is not available.
    """
    png, width, height, channels = scanlines
    with _context(SPNG_CTX_IGNORE_ADLER32) as (lib, ctx):
        _check(lib, lib.spng_set_png_buffer(ctx, png, len(png)))
        image = np.empty((height, width, channels), dtype=np.uint8)
        _check(lib, lib.spng_decode_image(ctx, image.ctypes.data, image.nbytes, SPNG_FMT_PNG, 0))
        return image


def check_crcs(data: bytes) -> None:
    """Refuse a PNG whose critical chunks up to its image data (IHDR, PLTE, IDAT) fail their CRC, as libpng does.

    zlib's CRC-32 over each chunk, through binascii, which keeps the GIL (zlib.crc32 lets go of
    it for every chunk over 5 KB, and OpenCV writes 8 KB chunks: 70 hand-overs per frame);
    libspng's own table-driven one cost ~0.9 ms of a 640x480 frame, this ~0.2. A damaged ancillary chunk is
    no error (libpng drops it; caired's decode never uses one). A chunk cut short is left for
    libspng to report.
    """
    view = memoryview(data)
    at = len(PNG_SIGNATURE)
    while at + 12 <= len(data):
        length, kind = _CHUNK_HEAD.unpack_from(data, at)
        end = at + 8 + length
        if end + 4 > len(data):
            return
        if not kind[0] & 0x20 and binascii.crc32(view[at + 4 : end]) != _CRC.unpack_from(data, end)[0]:
            raise SpngError(f"CRC mismatch in the {kind.decode('ascii', 'backslashreplace')} chunk")
        if kind == b"IDAT" and data[end + 8 : end + 12] != b"IDAT":
            return  # the image data ends here; libpng only warns about a bad IEND
        at = end + 4


def _check(lib: Any, code: int) -> None:
    if code != SPNG_OK:
        message = lib.spng_strerror(code)
        raise SpngError(message.decode("ascii", "replace") if message else f"libspng error {code}")
