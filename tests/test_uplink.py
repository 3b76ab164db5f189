"""Connecting: handshake outcomes as caired's errors, and the close race with a ping."""

from __future__ import annotations

import json
from pathlib import Path

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from caired.config import Config
from caired.session import Limits, deliver
from caired.sources import FolderSource
from caired.uplink import Gate
from tests.conftest import write_frames

PING_FRAME = b"\x89\x00"  # FIN, opcode 9 (ping), unmasked, empty: what a server's heartbeat sends


async def _ping_after_close_server(listeners: list[trio.SocketListener], seen: list[str]) -> None:
    """A backend that answers ``finished`` and then, once the client's close frame has arrived,
    pings before it replies to the close: the race of trio-websocket issue #184."""
    stream = await listeners[0].accept()
    ws = WSConnection(ConnectionType.SERVER)
    async with stream:
        while True:
            data = await stream.receive_some(1 << 20)
            if not data:
                return
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, Request):
                    await stream.send_all(ws.send(AcceptConnection()))
                elif isinstance(event, TextMessage):
                    message = json.loads(event.data)
                    seen.append(message["state"])
                    if message["state"] == "end":
                        answer = {"state": "finished", "datapt_id": message["datapt_id"], "inference": {"hr": 70}}
                        await stream.send_all(ws.send(TextMessage(json.dumps(answer))))
                elif isinstance(event, CloseConnection):
                    seen.append("close")
                    await stream.send_all(PING_FRAME)
                    await trio.sleep(0.2)  # the client reads the ping before the close reply
                    await stream.send_all(ws.send(event.response()))
                    return


async def test_a_ping_racing_our_close_does_not_undo_a_finished_session(tmp_path: Path) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    seen: list[str] = []
    write_frames(tmp_path / "s", 3)
    cfg = Config.load(env={"BACKEND_WS_BASE": f"ws://127.0.0.1:{port}/ws/", "CAIRED_STREAM_FPS": "0"})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_ping_after_close_server, listeners, seen)
        source = FolderSource(tmp_path / "s", cfg, trio.CapacityLimiter(2))
        await source.prepare()
        with trio.fail_after(10):
            delivered = await deliver(source, cfg=cfg, gate=Gate(cfg.retry), name="s",
                                      datapt_id="0e06d32c-1afb-43de-994a-8293d96d5e05", limits=Limits(attempts=1))
    assert delivered.finished.hr == 70 and delivered.attempts == 1
    assert seen == ["stream", "stream", "stream", "end", "close"]
