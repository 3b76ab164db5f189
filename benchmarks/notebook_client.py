"""The original notebook client, re-created as the benchmark's baseline.

Its design, as it was:

- asyncio and the ``websockets`` library (compression off, 4 MiB message limit);
  numpy, cv2, websockets and orjson imported up front, whatever the format;
- the first frame decoded once to learn the image size, raw mode included;
- a thread pool as wide as the machine, used one frame at a time (each frame's encoding
  is awaited before the next one starts), feeding a queue of up to 512 encoded frames;
  raw frames read with ``numpy.fromfile`` and base64-encoded;
- after connecting, a prefill: ``int(FPS * 0.5)`` frames (half a second's worth) taken
  off the queue and held before the first send;
- one dict per message, serialised with orjson, with a new ``datapt_id`` per message;
- pacing on ``start + sent / FPS`` after each send (``FPS`` has no "off": 0 divides by
  zero, so the only way to go fast is a high FPS, and then the prefill holds more);
- a listener that parses and prints every message; an ``end`` message; up to 20 s for
  the listener to end.

Two deliberate differences, neither of which makes it slower: when the prefill reaches
the end of the folder (``FPS * 0.5 >= frames``) the original waits forever for the end
of its queue; here it stops. And it prints ``connected <unix time>`` and ``closed <unix
time>`` so the benchmark can time the streaming part the same way for both clients.

Environment: BACKEND_WS_BASE, API_KEY, IMAGES_DIR, FPS, FRAME_FORMAT (jpeg|raw),
JPEG_QUALITY (75 unless set), ENC_WORKERS, QUEUE_MAXSIZE.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import cv2
import numpy as np
import orjson
import websockets

BACKEND_WS_BASE = os.environ.get("BACKEND_WS_BASE", "ws://localhost:8003/ws/")
API_KEY = os.environ.get("API_KEY", "")
IMAGES_DIR = os.environ.get("IMAGES_DIR", "images")
FPS = float(os.environ.get("FPS", "30"))
FRAME_FORMAT = os.environ.get("FRAME_FORMAT", "jpeg").lower()
JPEG_QUALITY = int(os.environ.get("JPEG_QUALITY", "75"))
ENC_WORKERS = int(os.environ.get("ENC_WORKERS", str(os.cpu_count() or 4)))
QUEUE_MAXSIZE = int(os.environ.get("QUEUE_MAXSIZE", "512"))
MAX_SIZE = 4 * 1024 * 1024
PREFILL_SECONDS = 0.5

Item = tuple[str, str]  # (timestamp, base64 frame)


def frame_paths(directory: str) -> list[Path]:
    return sorted(Path(directory).glob("*.png"), key=lambda p: float(p.stem))


def image_size(path: Path) -> tuple[int, int]:
    image = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_COLOR)
    height, width = image.shape[:2]
    return width, height


def encode_raw(path: Path) -> str:
    return base64.b64encode(np.fromfile(str(path), dtype=np.uint8).tobytes()).decode("ascii")


def encode_jpeg(path: Path) -> str:
    image = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_COLOR)
    ok, buf = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"cannot encode {path}")
    return base64.b64encode(buf.tobytes()).decode("ascii")


async def encoder(paths: list[Path], queue: asyncio.Queue[Item | None]) -> None:
    loop = asyncio.get_running_loop()
    encode = encode_raw if FRAME_FORMAT == "raw" else encode_jpeg
    with ThreadPoolExecutor(max_workers=ENC_WORKERS) as pool:
        for path in paths:
            data = await loop.run_in_executor(pool, encode, path)
            await queue.put((path.stem, data))
    await queue.put(None)


async def listener(ws: Any) -> None:
    try:
        async for message in ws:
            try:
                print("<< " + orjson.dumps(orjson.loads(message)).decode(), flush=True)
            except orjson.JSONDecodeError:
                print(f"<< {message!r}", flush=True)
    except websockets.ConnectionClosed:
        pass


def url() -> str:
    return f"{BACKEND_WS_BASE.rstrip('/')}/?{urlencode({'api_key': API_KEY, 'client': 'pythonClient'})}"


def message(state: str, item: Item) -> str:
    stamp, data = item
    return orjson.dumps(
        {"datapt_id": str(uuid.uuid4()), "state": state, "advanced": True, "timestamp": stamp, "frame_data": data}
    ).decode()


async def main() -> None:
    paths = frame_paths(IMAGES_DIR)
    image_size(paths[0])
    async with websockets.connect(url(), max_size=MAX_SIZE, compression=None) as ws:
        print(f"connected {time.time():.6f}", flush=True)
        listen_task = asyncio.create_task(listener(ws))
        queue: asyncio.Queue[Item | None] = asyncio.Queue(maxsize=QUEUE_MAXSIZE)
        encode_task = asyncio.create_task(encoder(paths, queue))

        held: list[Item] = []
        ended = False
        while len(held) < max(1, int(FPS * PREFILL_SECONDS)):
            item = await queue.get()
            if item is None:
                ended = True
                break
            held.append(item)

        start = time.perf_counter()
        sent = 0
        last: Item | None = None

        async def send(item: Item) -> None:
            nonlocal sent, last
            await ws.send(message("stream", item))
            sent += 1
            last = item
            delay = start + sent / FPS - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)

        for item in held:  # held until the session ends, as it was
            await send(item)
        while not ended:
            item = await queue.get()
            if item is None:
                break
            await send(item)
        if last is not None:
            await ws.send(message("end", last))
        try:
            await asyncio.wait_for(listen_task, 20)
        except TimeoutError:
            listen_task.cancel()
        await encode_task
    print(f"closed {time.time():.6f} sent {sent}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
