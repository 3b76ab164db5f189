"""``caired stream`` with the moment each message starts to leave recorded (pacing jitter),
and the process's CPU time then (CPU per frame while streaming, without start-up and exit).

Usage: ``python benchmarks/traced_stream.py OUT.json STREAM-ARGS...``. The stamps go
into two arrays of doubles (one ``perf_counter`` and one ``process_time`` per message, ~1 us
together; 16 bytes a message, grown as they fill), written out at exit, so the sender's
hot path gains two calls and two appends.
"""

from __future__ import annotations

import array
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from caired import attempt
from caired.cli import main


def run(out: str, argv: list[str]) -> int:
    stamps = array.array("d")
    cpu = array.array("d")
    first_wall = 0.0
    original = attempt.send_text  # every client message leaves through it

    async def send_text(ws: Any, parts: Sequence[bytes]) -> None:
        nonlocal first_wall
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())  # every thread of the process
        if len(stamps) == 1:
            first_wall = time.time()
        await original(ws, parts)

    attempt.send_text = send_text
    code = main(["stream", *argv])
    with open(out, "w") as f:
        json.dump({"sends": stamps.tolist(), "cpu": cpu.tolist(), "first_send_unix": first_wall}, f)
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2:]))
