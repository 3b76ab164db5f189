"""Speed for large WebSocket messages, staying on trio-websocket: ``install()`` once per process.

Profiling a raw-mode stream (0.4-1 MB per message) showed two costs outside caired:

- wsproto masks every client frame in pure Python (four strided slices, four
  ``translate`` calls and four slice assignments per message, plus copies), and the
  server unmasks every received chunk the same way. ``NumpyMasker`` does the same
  XOR over a ``uint32`` view of the data in one pass; the output is byte for byte
  what wsproto's ``XorMaskerSimple`` gives, including the key rotation between calls.
- glibc serves allocations of more than 128 KiB with ``mmap`` and gives them back to
  the OS when they are freed, so every frame pays page faults for each of its
  megabyte buffers. Raising ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` keeps freed
  buffers in the heap for the next frame. (Linux with glibc only; a no-op elsewhere.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Final

import numpy as np
from wsproto import frame_protocol

SMALL: Final = 512  # below this many bytes wsproto's own masker is as fast
M_TRIM_THRESHOLD: Final = -1  # <malloc.h>
M_MMAP_THRESHOLD: Final = -3
MMAP_THRESHOLD: Final = 32 * 1024 * 1024  # glibc's ceiling on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD: Final = 64 * 1024 * 1024

_ORIGINAL_MASKER: Final = frame_protocol.XorMaskerSimple


class NumpyMasker:
    """wsproto's ``XorMaskerSimple``, XOR-ing four bytes at a time in numpy."""

    def __init__(self, masking_key: bytearray | bytes) -> None:
        self._masking_key = bytes(masking_key)

    def process(self, data: bytes | bytearray | memoryview) -> bytearray:
        size = len(data)
        if size < SMALL:
            small = _ORIGINAL_MASKER(self._masking_key)
            out: bytearray = small.process(bytearray(data))
            self._masking_key = bytes(small._masking_key)
            return out
        key = self._masking_key
        whole = size - size % 4
        out = bytearray(size)
        src = np.frombuffer(data, dtype=np.uint8, count=whole).view(np.uint32)
        dst = np.frombuffer(out, dtype=np.uint8, count=whole).view(np.uint32)
        np.bitwise_xor(src, np.frombuffer(key, dtype=np.uint32)[0], out=dst)
        for i in range(whole, size):
            out[i] = data[i] ^ key[i - whole]
        rotation = size % 4
        self._masking_key = key[rotation:] + key[:rotation]
        return out


def install() -> None:
    """Use ``NumpyMasker`` in wsproto and keep big buffers in the heap; safe to call again."""
    setattr(frame_protocol, "XorMaskerSimple", NumpyMasker)  # noqa: B010 - wsproto types it as its own class
    _keep_big_buffers()


def installed() -> bool:
    return getattr(frame_protocol, "XorMaskerSimple", None) is NumpyMasker


def _keep_big_buffers() -> None:
    if not sys.platform.startswith("linux"):
        return
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
