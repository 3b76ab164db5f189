"""The local backend's unmasking of client frames, in numpy: ``install()`` once per process.

wsproto unmasks every received chunk in pure Python (four strided slices, four
``translate`` calls and four slice assignments, plus copies), which made the local
backend, not caired, the bottleneck of raw-mode benchmarks. ``NumpyMasker`` does the
same XOR over a ``uint32`` view in one pass; its output is byte for byte what wsproto's
``XorMaskerSimple`` gives, including the key rotation between calls. Only the emulator
installs it: caired's own client frames are masked by ``caired.wire.text_frame``.
"""

from __future__ import annotations

from typing import Final

import numpy as np
from wsproto import frame_protocol

from caired.wire import xor_into

SMALL: Final = 512  # below this many bytes wsproto's own masker is as fast
ORIGINAL_MASKER: Final = frame_protocol.XorMaskerSimple


class NumpyMasker:
    """wsproto's ``XorMaskerSimple``, XOR-ing four bytes at a time in numpy."""

    def __init__(self, masking_key: bytearray | bytes) -> None:
        self._masking_key = bytes(masking_key)

    def process(self, data: bytes | bytearray | memoryview) -> bytearray:
        size = len(data)
        if size < SMALL:
            small = ORIGINAL_MASKER(self._masking_key)
            out: bytearray = small.process(bytearray(data))
            self._masking_key = bytes(small._masking_key)
            return out
        key = self._masking_key
        out = bytearray(size)
        xor_into(np.frombuffer(out, dtype=np.uint8), 0, data, key, 0)
        rotation = size % 4
        self._masking_key = key[rotation:] + key[:rotation]
        return out


def install() -> None:
    """Use ``NumpyMasker`` in wsproto for this process; safe to call again."""
    setattr(frame_protocol, "XorMaskerSimple", NumpyMasker)  # noqa: B010 - wsproto types it as its own class


def installed() -> bool:
    return getattr(frame_protocol, "XorMaskerSimple", None) is NumpyMasker
