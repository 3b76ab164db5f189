"""caired.wire and the emulator's masker: byte for byte what wsproto writes; install() is idempotent."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import pytest
import simplejpeg
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto import frame_protocol as fp
from wsproto.events import AcceptConnection, Request, TextMessage

from caired import png, spng, wire
from caired.commands.stream import stream_folder
from caired.emulator import masker
from caired.frames import list_frames
from tests.conftest import BackendFactory, make_config

ORIGINAL = masker.ORIGINAL_MASKER
LENGTHS = [0, 1, 2, 3, 4, 5, 7, 8, 100, 511, 512, 513, 514, 515, 516, 1023, 4096, 4097, 65535, 65537, 730_001]


@pytest.fixture(autouse=True)
def _restore_wsproto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fp, "XorMaskerSimple", ORIGINAL)


@pytest.mark.parametrize("length", LENGTHS)
def test_numpy_masker_gives_wsprotos_bytes(length: int) -> None:
    rng = random.Random(length)
    for _ in range(3):
        key = bytes(rng.getrandbits(8) for _ in range(4))
        data = rng.randbytes(length)
        assert masker.NumpyMasker(key).process(data) == ORIGINAL(bytearray(key)).process(bytearray(data))


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_the_key_rotates_across_calls_as_wsprotos_does(kind: Callable[[bytes], object]) -> None:
    """A received frame arrives in chunks of any size; each call continues where the last ended."""
    rng = random.Random(7)
    key = rng.randbytes(4)
    ours, theirs = masker.NumpyMasker(key), ORIGINAL(bytearray(key))
    for length in [3, 513, 1, 2050, 6, 70_001, 0, 5, 600, 4097, 2, 1, 99_999]:
        chunk = rng.randbytes(length)
        assert ours.process(kind(chunk)) == theirs.process(bytearray(chunk)), length  # type: ignore[arg-type]


def test_masking_leaves_the_input_untouched() -> None:
    data = bytearray(os.urandom(5000))
    before = bytes(data)
    masker.NumpyMasker(b"\x01\x02\x03\x04").process(data)
    assert data == before


def test_install_is_idempotent_and_frames_still_round_trip() -> None:
    assert not masker.installed()
    masker.install()
    masker.install()
    assert masker.installed()
    assert fp.XorMaskerSimple is masker.NumpyMasker

    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="localhost", target="/ws/")))
    next(server.events())
    client.receive_data(server.send(AcceptConnection()))
    next(client.events())
    text = "".join(random.Random(1).choices("abcdefghijklmnopqrstuvwxyz0123456789+/=", k=300_003))
    wire_bytes = client.send(TextMessage(data=text))
    received = []
    for start in range(0, len(wire_bytes), 4093):  # the server unmasks chunk by chunk
        server.receive_data(wire_bytes[start:start + 4093])
        received.extend(event.data for event in server.events() if isinstance(event, TextMessage))
    assert "".join(received) == text


async def test_raw_stream_never_decodes_an_image(
    backend: BackendFactory, frames: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = frames(6)
    state = await backend(estimate=False)  # the emulator's estimate decodes frames itself

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("raw mode decoded or encoded an image")

    monkeypatch.setattr(cv2, "imdecode", refuse)
    monkeypatch.setattr(cv2, "imencode", refuse)
    monkeypatch.setattr(simplejpeg, "encode_jpeg", refuse)
    monkeypatch.setattr(spng, "decode_rgb", refuse)
    monkeypatch.setattr(png, "decode_common", refuse)
    await stream_folder(make_config(state.port, FRAME_FORMAT="raw", FPS="0"), directory)
    session = state.sessions[0]
    assert session.finished
    on_disk = [hashlib.sha256(ref.path.read_bytes()).hexdigest() for ref in list_frames(directory).frames]
    assert [f.digest for f in session.frames] == on_disk


def _wsprotos_frame(payload: bytes, key: bytes, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """wsproto's own frame, with its pure-Python masker, for ``key``."""
    with monkeypatch.context() as m:
        m.setattr(fp, "XorMaskerSimple", ORIGINAL)
        m.setattr(fp.os, "urandom", lambda n: key)
        return bytes(fp.FrameProtocol(client=True, extensions=[]).send_data(payload.decode("ascii")))


@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 70, 125, 126, 127, 4099, 65535, 65536, 65537, 730_003])
def test_text_frame_is_wsprotos_frame_for_the_same_key(length: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(length)
    payload = bytes(rng.choices(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", k=length))
    for _ in range(4):
        key = rng.randbytes(4)
        cuts = sorted(rng.randrange(length + 1) for _ in range(2))
        parts = [payload[: cuts[0]], bytearray(payload[cuts[0] : cuts[1]]), memoryview(payload[cuts[1] :])]
        expected = _wsprotos_frame(payload, key, monkeypatch)
        assert bytes(wire.text_frame(parts, key)) == expected
        assert bytes(wire.text_frame([payload], key)) == expected


def test_text_frame_leaves_its_parts_untouched() -> None:
    parts = [b"head", os.urandom(10_001), b"tail"]
    before = [bytes(p) for p in parts]
    wire.text_frame(parts, b"\x01\x02\x03\x04")
    assert parts == before


async def test_send_text_takes_the_one_copy_path_on_a_real_connection(
    backend: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If trio-websocket changes the internals send_text uses, this fails instead of slowing down."""
    state = await backend(validate=False)
    message = b'{"datapt_id": "x", "state": "stream", "frame_data": "' + b"QUJD" * 200_000
    async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{state.port}/ws/", max_message_size=2**24) as ws:
        assert wire._open_client(ws)

        def refuse(event: object) -> bytes:
            raise AssertionError("send_text went through wsproto")

        monkeypatch.setattr(ws._wsproto, "send", refuse)
        sent: list[int] = []
        send_all = ws._stream.send_all

        async def counting(data: memoryview) -> None:
            sent.append(len(data))
            await send_all(data)

        monkeypatch.setattr(ws._stream, "send_all", counting)
        await wire.send_text(ws, [message[:30], message[30:]])
        monkeypatch.undo()  # the close goes through wsproto, as it should
        assert sent == [len(message) + 2 + 8 + 4]  # one write: header, 64-bit length, key, payload
    assert not wire._open_client(ws)


async def test_send_text_on_a_closed_connection_raises_connection_closed(backend: BackendFactory) -> None:
    state = await backend()
    async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{state.port}/ws/") as ws:
        await ws.aclose()
        with pytest.raises(trio_websocket.ConnectionClosed):
            await wire.send_text(ws, [b"{}"])


async def test_send_text_falls_back_to_send_message_for_any_other_socket() -> None:
    got: list[str | bytes] = []

    class Other:
        async def send_message(self, message: str | bytes) -> None:
            got.append(message)

    await wire.send_text(Other(), [b'{"a": "', b"\xc3\xa9", b'"}'])
    assert got == ['{"a": "\u00e9"}']


async def test_a_broken_stream_mid_send_is_connection_closed(
    backend: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = await backend()
    async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{state.port}/ws/") as ws:
        stream = ws._stream

        async def broken(data: memoryview) -> None:
            await stream.aclose()  # the connection is gone for the reader too
            raise trio.BrokenResourceError("peer reset")

        monkeypatch.setattr(stream, "send_all", broken)
        with pytest.raises(trio_websocket.ConnectionClosed) as caught:
            await wire.send_text(ws, [b"{}"])
        assert caught.value.reason.code == 1006
        monkeypatch.undo()


async def test_a_write_cancelled_halfway_drops_the_connection_rather_than_corrupt_it(
    backend: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anything written after half a frame (the close frame) would be read as its payload."""
    state = await backend()
    with trio.fail_after(10):  # left mid-frame, the close handshake would wait out its 60 s timeout
        ws = await _halfway_cancelled(state.port, monkeypatch)
    assert ws.closed is not None and ws.closed.code == 1006


async def _halfway_cancelled(port: int, monkeypatch: pytest.MonkeyPatch) -> trio_websocket.WebSocketConnection:
    async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/ws/") as ws:
        stream = ws._stream
        send_all = stream.send_all

        async def stalls_halfway(data: memoryview) -> None:
            await send_all(data[: len(data) // 2])
            await trio.sleep_forever()

        monkeypatch.setattr(stream, "send_all", stalls_halfway)
        with trio.move_on_after(0.2) as scope:
            await wire.send_text(ws, [b'{"a": "', b"x" * 100_000, b'"}'])
        assert scope.cancelled_caught
        assert stream.socket.fileno() == -1  # closed: nothing more can be written into the frame
        monkeypatch.undo()
    return ws


async def test_a_send_cancelled_before_it_starts_leaves_the_connection_whole(backend: BackendFactory) -> None:
    state = await backend()
    async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{state.port}/ws/") as ws:
        with trio.CancelScope() as scope:
            scope.cancel()
            await wire.send_text(ws, [b"{}"])
        assert ws._stream.socket.fileno() != -1
        assert wire._open_client(ws)
    assert ws.closed is not None and ws.closed.code == 1000


def test_the_stream_command_does_not_import_cv2() -> None:
    """cv2 is ~15 MB of RSS; raw mode never needs it, so the stream path must not load it."""
    code = (
        "import sys\n"
        "from caired import cli\n"
        "parser = cli.build_parser(['stream', 'x'])\n"
        "import caired.wire; caired.wire.keep_big_buffers()\n"
        "print(sorted(m for m in ('cv2', 'caired.synth', 'caired.record') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
