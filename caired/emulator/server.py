"""The local backend: speaks the protocol faithfully, checks every message strictly.

For development, tests and the demo. It checks the path (close 1008 "Invalid path")
and, when it has a key, the key (HTTP 403); it validates every message against
../shared/protocol.md and answers a violation with a close code and reason; it
answers ``ok`` every ``ok_every`` frames (with ``advanced`` arrays when asked) and
``finished`` after ``end``. The heart rate comes from a real rPPG estimate over the
frames it receives (decoded off the event loop), or is a constant with
``estimate=False``. ``Faults`` switch on the misbehaviour tests need.

Everything it saw is kept in a ``BackendState`` that tests read; ``caired backend`` keeps
the last ``KEEP_SESSIONS`` connections, so that one left running for days stays small as
long as its connections are short (each still keeps a line per frame it received: an
hour of camera at 30 fps is ~100,000 of them).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from collections import deque
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import attrs
import structlog
import trio
import trio_websocket

from caired.emulator import masker
from caired.protocol import PAYLOAD_KEYS, TIMESTAMP_RE, UUID4_RE

log = structlog.get_logger()

MAX_MESSAGE: Final = 64 * 1024 * 1024
RECEIVE_BUFFER: Final = 1024 * 1024  # trio-websocket reads 4 KiB at a time by default: 200 reads per raw frame
JPEG_MAGIC: Final = b"\xff\xd8\xff"
PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
CONSTANT_HR: Final = 72
KEEP_SESSIONS: Final = 100  # connections ``caired backend`` remembers (~6 KB each with 20 frames)
FIN_TEXT: Final = 0x81  # a final text frame, as a server writes it (no mask)
VIOLATION: Final = 1007  # "invalid frame payload data": the message breaks the protocol
# The light parser's view of a message, with or without spaces after ':' (json.dumps and orjson alike)
_LIGHT_STATE: Final = re.compile(r'"state":\s*"(\w+)"')
_LIGHT_STAMP: Final = re.compile(r'"timestamp":\s*"([^"]*)"')
_LIGHT_ID: Final = re.compile(r'"datapt_id":\s*"([^"]*)"')


@attrs.frozen(kw_only=True)
class Faults:
    """Misbehaviour on demand. Counts apply to the first N connections or handshakes."""

    refuse_handshakes: int = 0  # the first N handshakes get HTTP `refuse_status`
    refuse_status: int = 503
    drop_after: int = 0  # drop the TCP connection (no close frame) after N frames ...
    drop_times: int = 1  # ... on this many connections
    close_after: int = 0  # close with `close_code` after N frames ...
    close_code: int = 1011
    close_times: int = 1
    withhold_finished: int = 0  # the first N sessions never get `finished`
    garbage_every: int = 0  # interleave a non-JSON text and a binary message every N frames
    stall: bool = False  # accept, then never read again (a half-open peer)
    slow: float = 0.0  # seconds spent on every frame (a backend that cannot keep up)
    accept_delay: float = 0.0  # seconds before a handshake is answered (a backend slow to take a session)
    # A hostile backend: the messages below go out once, after `hostile_after` frames, on the first
    # `hostile_times` connections (binary_every and finished_twice on every connection).
    hostile_after: int = 1
    hostile_times: int = 1
    deep_nesting: int = 0  # an 'ok' message with a value nested this many arrays deep
    huge_message: int = 0  # an 'ok' message padded to about this many bytes
    flood: int = 0  # this many 'ok' messages in one burst
    invalid_utf8: bool = False  # a text frame whose payload is not UTF-8 (written raw: wsproto refuses to)
    binary_every: int = 0  # a binary message every N frames
    finished_twice: bool = False  # 'finished' sent twice before the close


@attrs.frozen(kw_only=True)
class BackendOptions:
    api_key: str = ""
    ok_every: int = 15
    estimate: bool = True
    validate: bool = True  # decode and check every frame (off only for throughput benchmarks)
    model_version: str = "HR"
    faults: Faults = attrs.field(factory=Faults)


@attrs.define
class FrameSeen:
    timestamp: str
    digest: str  # sha256 of the decoded frame bytes
    size: int
    kind: str  # "jpeg" | "png"


@attrs.define
class SessionSeen:
    """One connection, as the backend saw it."""

    socket_id: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    datapt_id: str | None = None
    advanced: bool | None = None
    frames: list[FrameSeen] = attrs.field(factory=list)
    end: FrameSeen | None = None
    answers: list[dict[str, Any]] = attrs.field(factory=list)
    violations: list[str] = attrs.field(factory=list)
    close_code: int | None = None
    finished: bool = False
    hr: float | None = None
    hostile: list[str] = attrs.field(factory=list)  # the hostile messages sent, by Faults name


@attrs.define
class BackendState:
    """What the backend saw: every connection, or the last ``keep`` of them (a backend that runs for days)."""

    handshakes: int = 0
    rejected: int = 0
    keep: int | None = None
    sessions: deque[SessionSeen] = attrs.field(init=False)
    connections: int = 0  # accepted since the start, whether kept or not: what Faults count
    port: int = 0

    def __attrs_post_init__(self) -> None:
        self.sessions = deque(maxlen=self.keep)

    def add(self, seen: SessionSeen) -> int:
        """Keep ``seen``; its number, from 1, among the connections accepted."""
        self.sessions.append(seen)
        self.connections += 1
        return self.connections

    @property
    def violations(self) -> list[str]:
        return [v for s in self.sessions for v in s.violations]

    def finished_sessions(self) -> list[SessionSeen]:
        return [s for s in self.sessions if s.finished]


class _Violation(Exception):
    pass


def _estimator() -> tuple[Callable[[bytes], Any], Any] | None:
    try:
        from caired.emulator.rppg import PulseEstimator, frame_rgb
    except ImportError:  # pragma: no cover - the estimator ships with caired
        return None
    return frame_rgb, PulseEstimator()


async def serve_backend(
    options: BackendOptions,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    state: BackendState | None = None,
    task_status: trio.TaskStatus[BackendState] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; ``task_status.started`` gets the state, its ``port`` set."""
    state = state if state is not None else BackendState()
    limiter = trio.CapacityLimiter(2)
    masker.install()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        await _handle(request, options, state, limiter)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: trio_websocket.serve_websocket(
                handler, host, port, ssl_context=None, max_message_size=MAX_MESSAGE,
                receive_buffer_size=RECEIVE_BUFFER, task_status=task_status,
            )
        )
        state.port = server.port
        log.info("backend_listening", url=f"ws://{host}:{server.port}/ws/", key_required=bool(options.api_key))
        task_status.started(state)


async def _handle(
    request: trio_websocket.WebSocketRequest,
    options: BackendOptions,
    state: BackendState,
    limiter: trio.CapacityLimiter,
) -> None:
    state.handshakes += 1
    faults = options.faults
    parts = urlsplit(request.path)
    query = parse_qs(parts.query)
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
    if state.handshakes <= faults.refuse_handshakes:
        state.rejected += 1
        await request.reject(faults.refuse_status, body=b"try again later")
        return
    if options.api_key:
        given = query.get("api_key", [""])[-1]
        auth = headers.get("authorization", "")
        if auth.startswith("Bearer "):
            given = auth[len("Bearer "):]
        if not secrets.compare_digest(given.encode(), options.api_key.encode()):
            state.rejected += 1
            await request.reject(403, body=b"invalid api key")
            return
    if faults.accept_delay:
        await trio.sleep(faults.accept_delay)
    ws = await request.accept()
    seen = SessionSeen(socket_id=secrets.token_hex(4), path=parts.path, query=query, headers=headers)
    index = state.add(seen)
    if parts.path.rstrip("/") != "/ws":
        seen.close_code = 1008
        await ws.aclose(1008, "Invalid path")
        return
    if faults.stall:
        await trio.sleep_forever()
    try:
        await _serve_session(ws, seen, index, options, limiter)
    except _Violation as exc:
        seen.violations.append(str(exc))
        seen.close_code = VIOLATION
        log.warning("backend_violation", socket_id=seen.socket_id, problem=str(exc))
        await ws.aclose(VIOLATION, str(exc)[:120])
    except trio_websocket.ConnectionClosed as exc:
        seen.close_code = getattr(exc.reason, "code", None)


async def _serve_session(
    ws: trio_websocket.WebSocketConnection,
    seen: SessionSeen,
    index: int,
    options: BackendOptions,
    limiter: trio.CapacityLimiter,
) -> None:
    faults = options.faults
    estimator = _estimator() if options.estimate else None
    while True:
        message = await ws.get_message()
        payload = _check_message(message, seen) if options.validate else _light(message, seen)
        frame_bytes = payload.pop("_frame")
        frame = FrameSeen(
            timestamp=payload["timestamp"],
            digest=hashlib.sha256(frame_bytes).hexdigest() if options.validate else "",
            size=len(frame_bytes),
            kind="png" if frame_bytes.startswith(PNG_MAGIC) else "jpeg",
        )
        if payload["state"] == "end":
            _check_end(frame, seen)
            seen.end = frame
            if index <= faults.withhold_finished:
                continue  # never answer: the client's finish timeout is on trial
            hr = await _final_hr(estimator, limiter)
            answer = _answer("finished", seen, options, hr=hr, advanced=None)
            seen.hr = hr
            await ws.send_message(json.dumps(answer))
            seen.answers.append(answer)
            if faults.finished_twice:
                await ws.send_message(json.dumps(answer))
                seen.hostile.append("finished_twice")
            seen.finished = True
            seen.close_code = 1000
            await ws.aclose(1000)
            return
        _check_order(frame, seen)
        seen.frames.append(frame)
        if faults.slow:
            await trio.sleep(faults.slow)
        count = len(seen.frames)
        if estimator is not None:
            frame_rgb, pulse = estimator
            rgb = await trio.to_thread.run_sync(frame_rgb, frame_bytes, limiter=limiter)
            if rgb is not None:
                pulse.add(float(frame.timestamp), rgb)
        if faults.drop_after and count == faults.drop_after and index <= faults.drop_times:
            await _drop(ws)
            return
        if faults.close_after and count == faults.close_after and index <= faults.close_times:
            seen.close_code = faults.close_code
            await ws.aclose(faults.close_code, "injected fault")
            return
        if faults.garbage_every and count % faults.garbage_every == 0:
            await ws.send_message("this is not JSON {")
            await ws.send_message(b"\x00\x01binary\xff")
        if faults.binary_every and count % faults.binary_every == 0:
            await ws.send_message(bytes(range(256)))
            seen.hostile.append("binary_every")
        if count == faults.hostile_after and index <= faults.hostile_times:
            await _misbehave(ws, seen, options)
        if options.ok_every and count % options.ok_every == 0:
            hr, advanced = await _progress(estimator, limiter, seen)
            answer = _answer("ok", seen, options, hr=hr, advanced=advanced)
            await ws.send_message(json.dumps(answer))
            seen.answers.append(answer)


def _light(message: str | bytes, seen: SessionSeen) -> dict[str, Any]:
    """Just enough parsing to play along, for benchmarks that measure the client alone."""
    if isinstance(message, bytes):
        raise _Violation("binary message: the protocol sends JSON text")
    head, tail = message[:160], message[-160:]  # frame_data is the one long value; the keys sit either side
    state = _LIGHT_STATE.search(head) or _LIGHT_STATE.search(tail)
    stamp = _LIGHT_STAMP.search(tail) or _LIGHT_STAMP.search(head)
    if seen.datapt_id is None and (datapt_id := _LIGHT_ID.search(head) or _LIGHT_ID.search(tail)):
        seen.datapt_id = datapt_id.group(1)
    return {"state": state.group(1) if state else "stream", "timestamp": stamp.group(1) if stamp else "0",
            "_frame": b""}


def _check_message(message: str | bytes, seen: SessionSeen) -> dict[str, Any]:
    if isinstance(message, bytes):
        raise _Violation("binary message: the protocol sends JSON text")
    try:
        payload = json.loads(message)
    except ValueError:
        raise _Violation("message is not JSON") from None
    if not isinstance(payload, dict):
        raise _Violation("message is not a JSON object")
    keys = set(payload)
    if keys != PAYLOAD_KEYS:
        missing, extra = sorted(PAYLOAD_KEYS - keys), sorted(keys - PAYLOAD_KEYS)
        raise _Violation(f"wrong keys: missing {missing}, unexpected {extra}")
    datapt_id = payload["datapt_id"]
    if not isinstance(datapt_id, str) or not UUID4_RE.match(datapt_id):
        raise _Violation(f"datapt_id is not a canonical lowercase UUIDv4: {datapt_id!r}")
    if seen.datapt_id is None:
        seen.datapt_id = datapt_id
    elif datapt_id != seen.datapt_id:
        raise _Violation("datapt_id changed within the session")
    if payload["state"] not in ("stream", "end"):
        raise _Violation(f"state must be 'stream' or 'end', got {payload['state']!r}")
    if seen.end is not None:
        raise _Violation("message after 'end'")
    advanced = payload["advanced"]
    if not isinstance(advanced, bool):
        raise _Violation("advanced must be a boolean")
    if seen.advanced is None:
        seen.advanced = advanced
    elif advanced != seen.advanced:
        raise _Violation("advanced changed within the session")
    stamp = payload["timestamp"]
    if not isinstance(stamp, str) or not TIMESTAMP_RE.match(stamp):
        raise _Violation(f"timestamp must be UNIX seconds as a string, got {stamp!r}")
    data = payload["frame_data"]
    if not isinstance(data, str) or not data:
        raise _Violation("frame_data must be a non-empty base64 string")
    if data.startswith("data:"):
        raise _Violation("frame_data carries a data: URL prefix")
    try:
        frame = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _Violation("frame_data is not standard base64 (no line breaks, no URL-safe alphabet)") from None
    if not (frame.startswith(JPEG_MAGIC) or frame.startswith(PNG_MAGIC)):
        raise _Violation("frame_data is neither a JPEG nor a PNG")
    payload["_frame"] = frame
    return payload


def _check_order(frame: FrameSeen, seen: SessionSeen) -> None:
    if seen.frames and float(frame.timestamp) <= float(seen.frames[-1].timestamp):
        raise _Violation(f"timestamps must ascend: {frame.timestamp} after {seen.frames[-1].timestamp}")


def _check_end(frame: FrameSeen, seen: SessionSeen) -> None:
    if not seen.frames:
        raise _Violation("'end' before any frame")
    last = seen.frames[-1]
    if frame.timestamp != last.timestamp or frame.digest != last.digest:
        raise _Violation("'end' must repeat the last frame (same frame_data and timestamp)")


async def _progress(
    estimator: tuple[Callable[[bytes], Any], Any] | None, limiter: trio.CapacityLimiter, seen: SessionSeen
) -> tuple[float, dict[str, Any] | None]:
    if estimator is None:
        hr: float = CONSTANT_HR
        stamps = [float(f.timestamp) for f in seen.frames[-90:]]
        values = [0.0 for _ in stamps]
    else:
        pulse = estimator[1]
        hr, (values, stamps) = await trio.to_thread.run_sync(lambda: (pulse.hr(), pulse.signal()), limiter=limiter)
    advanced = {"rppg": values, "rppg_timestamps": stamps} if seen.advanced else None
    return hr, advanced


async def _final_hr(estimator: tuple[Callable[[bytes], Any], Any] | None, limiter: trio.CapacityLimiter) -> float:
    if estimator is None:
        return CONSTANT_HR
    pulse = estimator[1]
    hr: float = await trio.to_thread.run_sync(pulse.final_hr, limiter=limiter)
    return hr


def _answer(
    state: str, seen: SessionSeen, options: BackendOptions, *, hr: float, advanced: dict[str, Any] | None
) -> dict[str, Any]:
    rounded: float | int = round(hr) if hr >= 0 else -1
    return {
        "state": state,
        "socket_id": seen.socket_id,
        "datapt_id": seen.datapt_id,
        "inference": {"hr": rounded},
        "advanced": advanced,
        "confidence": {},
        "feedback": None,
        "model_version": options.model_version,
    }


async def _misbehave(ws: trio_websocket.WebSocketConnection, seen: SessionSeen, options: BackendOptions) -> None:
    """The one-shot hostile messages ``options.faults`` asks for."""
    faults = options.faults
    ok = _answer("ok", seen, options, hr=-1, advanced=None)
    if faults.deep_nesting:
        depth = faults.deep_nesting
        await ws.send_message(json.dumps(ok)[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}")
        seen.hostile.append("deep_nesting")
    if faults.huge_message:
        await ws.send_message(json.dumps({**ok, "padding": "x" * faults.huge_message}))
        seen.hostile.append("huge_message")
    if faults.flood:
        text = json.dumps(ok)
        for _ in range(faults.flood):
            await ws.send_message(text)
        seen.hostile.append("flood")
    if faults.invalid_utf8:
        await _send_raw_text(ws, b'{"state": "ok", "text": "\xff\xfe\xc0\x80"}')
        seen.hostile.append("invalid_utf8")


async def _send_raw_text(ws: trio_websocket.WebSocketConnection, payload: bytes) -> None:
    """One unmasked text frame carrying ``payload`` as it is, under trio-websocket's own send lock."""
    assert len(payload) <= 125
    async with ws._stream_lock:
        await ws._stream.send_all(bytes([FIN_TEXT, len(payload)]) + payload)


async def _drop(ws: trio_websocket.WebSocketConnection) -> None:
    """Cut the TCP connection without a close frame: the client sees 1006."""
    stream = ws._stream  # trio-websocket exposes no abort; closing the stream is the drop
    await stream.aclose()
