"""The original notebook client, re-created as the benchmark's baseline.

Its design, as it was: asyncio and the ``websockets`` library; a thread pool as wide
as the machine, used one frame at a time (each frame's encoding is awaited before
the next one starts); up to 512 encoded frames queued; ~0.5 s of frames prefilled;
one dict serialised per frame; sleeps between sends for pacing; a listener printing
every message; an ``end`` message; then up to 20 s for the listener to end.

One deliberate difference: one ``datapt_id`` for the whole session (the original made
a new one per message), so the same strict local backend accepts both clients. And
``FPS=0`` means unpaced.

Environment: BACKEND_WS_BASE, API_KEY, IMAGES_DIR, FPS, FRAME_FORMAT (jpeg|raw),
JPEG_QUALITY. It also prints ``connected <unix time>`` and ``closed <unix time>`` so
the benchmark can time the streaming part.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import websockets

try:
    import orjson

    def dumps(obj: Any) -> str:
        return orjson.dumps(obj).decode()
except ImportError:  # pragma: no cover - orjson is optional
    dumps = json.dumps

BACKEND_WS_BASE = os.environ.get("BACKEND_WS_BASE", "ws://localhost:8003/ws/")
API_KEY = os.environ.get("API_KEY", "")
IMAGES_DIR = os.environ.get("IMAGES_DIR", "images")
FPS = float(os.environ.get("FPS", "30"))
FRAME_FORMAT = os.environ.get("FRAME_FORMAT", "jpeg")
JPEG_QUALITY = int(os.environ.get("JPEG_QUALITY", "75"))
MAX_SIZE = 4 * 1024 * 1024
QUEUE_MAXSIZE = 512
PREFILL_SECONDS = 0.5


def encode_jpeg(path: Path) -> tuple[str, str]:
    image = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_COLOR)
    ok, buf = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"cannot encode {path}")
    return path.stem, base64.b64encode(buf.tobytes()).decode("ascii")


def encode_raw(path: Path) -> tuple[str, str]:
    return path.stem, base64.b64encode(path.read_bytes()).decode("ascii")


def frame_paths(directory: str) -> list[Path]:
    return sorted(Path(directory).glob("*.png"), key=lambda p: float(p.stem))


async def encoder(paths: list[Path], queue: asyncio.Queue[tuple[str, str] | None]) -> None:
    loop = asyncio.get_running_loop()
    fn: Callable[[Path], tuple[str, str]] = encode_raw if FRAME_FORMAT == "raw" else encode_jpeg
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        for path in paths:
            item = await loop.run_in_executor(pool, fn, path)
            await queue.put(item)
    await queue.put(None)


async def listener(ws: Any) -> None:
    async for message in ws:
        print(message, flush=True)


def url() -> str:
    sep = "&" if "?" in BACKEND_WS_BASE else "?"
    return f"{BACKEND_WS_BASE}{sep}api_key={API_KEY}" if API_KEY else BACKEND_WS_BASE


async def main() -> None:
    paths = frame_paths(IMAGES_DIR)
    datapt_id = str(uuid.uuid4())
    async with websockets.connect(url(), max_size=MAX_SIZE, compression=None) as ws:
        print(f"connected {time.time():.6f}", flush=True)
        queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(maxsize=QUEUE_MAXSIZE)
        encode_task = asyncio.create_task(encoder(paths, queue))
        listen_task = asyncio.create_task(listener(ws))
        prefill = max(1, int(PREFILL_SECONDS * (FPS if FPS > 0 else 30)))
        while queue.qsize() < min(prefill, len(paths)) and not encode_task.done():  # noqa: ASYNC110 - as it was
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        last: tuple[str, str] | None = None
        while True:
            item = await queue.get()
            if item is None:
                break
            stamp, data = item
            message = {"datapt_id": datapt_id, "state": "stream", "frame_data": data,
                       "timestamp": stamp, "advanced": True}
            await ws.send(dumps(message))
            last = item
            sent += 1
            if FPS > 0:
                delay = start + sent / FPS - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
        if last is not None:
            end = {"datapt_id": datapt_id, "state": "end", "frame_data": last[1], "timestamp": last[0],
                   "advanced": True}
            await ws.send(dumps(end))
        try:
            await asyncio.wait_for(listen_task, 20)
        except TimeoutError:
            print("listener timed out", flush=True)
        await encode_task
    print(f"closed {time.time():.6f} sent {sent}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
