"""Speed for large WebSocket messages, staying on trio-websocket.

Profiling a raw-mode stream (0.4-1 MB per message) showed three costs outside caired:

- wsproto masks every client frame in pure Python, and a server unmasks every received
  chunk the same way. The client's frames never go through wsproto's masker (below);
  the local backend's unmasking uses ``xor_into`` through ``caired.emulator.masker``.
- glibc serves allocations of more than 128 KiB with ``mmap`` and gives them back to
  the OS when they are freed, so every frame pays page faults for each of its
  megabyte buffers. Raising ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` keeps freed
  buffers in the heap for the next frame. Keeping them costs memory once per malloc
  arena, and glibc gives each worker thread its own, so frames read in worker threads
  and freed on the event loop held ~10 MB more; ``M_ARENA_MAX`` = 1 keeps one heap.
  (Linux with glibc only; a no-op elsewhere.) ``keep_big_buffers()`` once per process.
- sending a text message copies it four times on the event loop (``str.encode``,
  ``bytearray(payload)``, the masker's output, header + masked payload). ``send_text``
  builds the frame in one pass, XOR-ing the message's pieces straight into one buffer,
  and writes it under trio-websocket's own send lock, as its ``_send`` writes wsproto's
  frames. Only ``send_text`` reaches into trio-websocket (``_TRIO_WEBSOCKET_INTERNALS``,
  checked by a test against the installed release); anything it does not recognise gets
  ``send_message``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
import sys
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import trio
import trio_websocket
from wsproto.connection import ConnectionState

M_TRIM_THRESHOLD: Final = -1  # <malloc.h>
M_MMAP_THRESHOLD: Final = -3
M_ARENA_MAX: Final = -8
MMAP_THRESHOLD: Final = 32 * 1024 * 1024  # glibc's ceiling on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD: Final = 64 * 1024 * 1024

FIN_TEXT: Final = 0x81  # FIN bit, opcode 1 (text)
MASK_BIT: Final = 0x80
Buffer = bytes | bytearray | memoryview


def text_frame(parts: Sequence[Buffer], key: bytes) -> memoryview:
    """One final, masked client text frame carrying ``parts`` joined, masked with ``key``.

    Byte for byte what wsproto writes for the same payload and key, in one pass: each
    part is XOR-ed from where it lies straight into an uninitialised buffer, the longest
    part four bytes at a time from an 8-byte aligned place in it.
    """
    sizes = [len(part) for part in parts]
    size = sum(sizes)
    if size <= 125:
        header = struct.pack("!BB", FIN_TEXT, MASK_BIT | size)
    elif size <= 0xFFFF:
        header = struct.pack("!BBH", FIN_TEXT, MASK_BIT | 126, size)
    else:
        header = struct.pack("!BBQ", FIN_TEXT, MASK_BIT | 127, size)
    lead = header + key
    bulk = max(range(len(parts)), key=sizes.__getitem__, default=0)
    pad = -(len(lead) + sum(sizes[:bulk])) % 8  # puts the longest part on an 8-byte boundary
    frame = np.empty(pad + len(lead) + size, dtype=np.uint8)  # every byte is written below
    at = pad + len(lead)
    frame[pad:at] = np.frombuffer(lead, dtype=np.uint8)
    for part in parts:
        xor_into(frame, at, part, key, at - pad - len(lead))
        at += len(part)
    return frame.data[pad:]


def xor_into(frame: np.ndarray, at: int, part: Buffer, key: bytes, offset: int) -> None:
    """``frame[at:]`` = ``part`` XOR the mask, ``part`` starting ``offset`` bytes into the payload."""
    n = len(part)
    if not n:
        return
    shift = offset % 4
    rotated = key[shift:] + key[:shift]
    source = np.frombuffer(part, dtype=np.uint8)
    whole = n - n % 4 if at % 4 == 0 else 0
    if whole:
        np.bitwise_xor(
            source[:whole].view(np.uint32),
            np.frombuffer(rotated, dtype=np.uint32)[0],
            out=frame[at : at + whole].view(np.uint32),
        )
    if whole < n:
        rest = n - whole
        pattern = np.frombuffer((rotated * (rest // 4 + 1))[:rest], dtype=np.uint8)
        np.bitwise_xor(source[whole:], pattern, out=frame[at + whole : at + n])


async def send_text(ws: Any, parts: Sequence[Buffer]) -> None:
    """Send ``parts`` joined (UTF-8 together) as one text message on ``ws``.

    On an open trio-websocket client connection the frame is ``text_frame``'s, written
    the way trio-websocket writes its own (same lock, same handling of a broken stream),
    except that a write cancelled halfway closes the stream rather than leave it mid-frame.
    Anything else, including a connection that is closing, gets ``send_message``, which
    raises what trio-websocket raises.
    """
    if _open_client(ws):
        frame = text_frame(parts, os.urandom(4))  # a fresh key per frame, as RFC 6455 5.3 asks
        async with ws._stream_lock:
            await trio.lowlevel.checkpoint_if_cancelled()  # cancelled before a byte left: the stream is whole
            if not _open_client(ws):
                # A close frame went out while we waited for the lock: no data frame may follow it.
                raise trio_websocket.ConnectionClosed(ws._close_reason)
            try:
                await ws._stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await ws._abort_web_socket()
                raise trio_websocket.ConnectionClosed(ws._close_reason) from None
            except BaseException:
                # Cancelled mid-write: whatever follows (a close frame) would land inside this
                # frame's payload. Drop the connection instead; the peer sees it end (1006).
                await trio.aclose_forcefully(ws._stream)
                raise
        return
    await ws.send_message(b"".join(parts).decode("utf-8"))


def _open_client(ws: Any) -> bool:
    if not isinstance(ws, trio_websocket.WebSocketConnection) or not ws.is_client:
        return False
    if not all(hasattr(ws, name) for name in _TRIO_WEBSOCKET_INTERNALS):
        return False
    return ws._close_reason is None and ws._wsproto.state is ConnectionState.OPEN


_TRIO_WEBSOCKET_INTERNALS: Final = ("_stream_lock", "_stream", "_abort_web_socket", "_close_reason", "_wsproto")


def keep_big_buffers() -> None:
    """Keep freed megabyte buffers in the heap for the next frame (glibc only; safe to call again)."""
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
    mallopt(M_ARENA_MAX, 1)  # before the first worker thread: arenas are made on demand
