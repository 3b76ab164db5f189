"""An independent backend for the benchmarks: a plain ``websockets`` asyncio server, answering every frame.

    python benchmarks/ws_backend.py --port 8003 [--answer-every 1]

It shares no code with caired (caired's own backend is built on the same trio-websocket and
wsproto as the client, so a cost or a shortcut on one side could hide on the other). Per
connection, as the protocol describes the real backend:

- the path must be ``/ws/`` (else a close with 1008);
- each text message is parsed as JSON (the standard library's parser, as a plain server
  would); a ``stream`` message is answered with a small ``ok`` every ``--answer-every``
  frames (1: every frame), and the ``end`` message with ``finished``, after which the
  server closes the connection (1000);
- no message size limit, no compression.

It prints ``listening <port>`` once it accepts connections, and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import uuid
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed


def answer(state: str, socket_id: str, datapt_id: Any, hr: int) -> str:
    return json.dumps({"state": state, "socket_id": socket_id, "datapt_id": datapt_id, "inference": {"hr": hr},
                       "advanced": None, "confidence": {}, "feedback": None, "model_version": "HR"})


async def session(ws: ServerConnection, every: int) -> None:
    if ws.request is None or ws.request.path.split("?", 1)[0] != "/ws/":
        await ws.close(1008, "Invalid path")
        return
    socket_id = uuid.uuid4().hex[:8]
    frames = 0
    try:
        async for message in ws:
            if not isinstance(message, str):
                continue
            body = json.loads(message)
            if body.get("state") == "end":
                await ws.send(answer("finished", socket_id, body.get("datapt_id"), 65))
                await ws.close(1000)
                return
            frames += 1
            if frames % every == 0:
                await ws.send(answer("ok", socket_id, body.get("datapt_id"), -1 if frames < 150 else 66))
    except ConnectionClosed:
        pass


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8003)
    parser.add_argument("--answer-every", type=int, default=1, metavar="N", help="answer every Nth frame (1: all)")
    args = parser.parse_args()
    every = max(1, args.answer_every)
    stop = asyncio.get_running_loop().create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set_result, None)
    async with serve(lambda ws: session(ws, every), args.host, args.port, max_size=None, compression=None):
        print(f"listening {args.port}", flush=True)
        await stop
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
