"""Stream one session over one connection: pacing, the listener, end, finished.

Three tasks share the connection. The sender sends frame i at ``t0 + i / fps`` on an
absolute schedule (no drift), then the ``end`` message repeating the last frame. The
listener drains every server message as it arrives — trio-websocket stops reading the
socket while its message queue is full — and logs each one whole. The heartbeat pings
while the session waits, so a half-open connection is noticed. The attempt ends when
``finished`` arrives (then we close promptly with 1000), when the connection closes, or
when ``finished`` does not come within ``finish_timeout``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Final, Protocol

import attrs
import structlog
import trio
import trio_websocket

from caired._trio import open_nursery
from caired.errors import FinishTimeout, NoFramesError, Retry, SessionError
from caired.frames import EncodedFrame
from caired.protocol import STATE_END, STATE_STREAM, Answer, message_parts, parse_answer
from caired.sources import Feed
from caired.stats import Stats
from caired.uplink import classify_closed
from caired.wire import send_text

log = structlog.get_logger()

CLOSE_TIMEOUT: Final = 2.0
# Closing an attempt that did not finish: after a cancellation nobody reads the server's close
# reply, so waiting for it would only delay shutdown; the close frame itself leaves at once.
ABANDON_TIMEOUT: Final = 0.5
GOING_AWAY: Final = 1001
POLICY_VIOLATION: Final = 1008
# Answers an attempt takes before it calls them a flood: a generous allowance, plus a few per frame sent.
ANSWER_ALLOWANCE: Final = 1024
ANSWERS_PER_FRAME: Final = 8
ANSWER_BYTES_ALLOWANCE: Final = 64 * 1024 * 1024  # and bytes: a few maximal answers, plus some per frame
ANSWER_BYTES_PER_FRAME: Final = 64 * 1024


class Socket(Protocol):
    """What a session needs of a connection; trio-websocket's WebSocketConnection fits."""

    async def send_message(self, message: str | bytes) -> None: ...
    async def get_message(self) -> str | bytes: ...
    async def ping(self, payload: bytes | None = None) -> None: ...
    async def aclose(self, code: int = 1000, reason: str | None = None) -> None: ...


@attrs.define
class Tally:
    """What one attempt did so far; the progress line and the result read it."""

    total: int | None = None
    sent: int = 0
    skipped: int = 0
    answers: int = 0
    hr: float | None = None
    started: float = 0.0
    with_hr: int = 0  # answers that carried a heart rate
    warmup: int = 0  # answers without one yet (hr -1 or missing): the model warming up
    confidence: Any = None  # the last confidence / feedback an answer carried
    feedback: Any = None

    def count(self, answer: Answer) -> None:
        self.answers += 1
        if answer.hr is not None:
            self.hr = answer.hr
            self.with_hr += 1
        elif answer.warming_up:
            self.warmup += 1
        if answer.confidence is not None:
            self.confidence = answer.confidence
        if answer.feedback is not None:
            self.feedback = answer.feedback

    def signal(self) -> dict[str, Any]:
        """The signal quality summary result.json keeps."""
        return {"answers_with_hr": self.with_hr, "warmup_answers": self.warmup,
                "last_confidence": self.confidence, "last_feedback": self.feedback}


@attrs.frozen
class Finished:
    message: Any  # the whole ``finished`` answer
    hr: float | None
    sent: int
    skipped: int
    answers: int
    signal: dict[str, Any] = attrs.field(factory=dict)  # Tally.signal()


@attrs.define
class _Shared:
    """The attempt's outcome; whichever comes first ends the attempt's tasks."""

    scope: trio.CancelScope
    finished: Answer | None = None
    failure: SessionError | None = None
    close_with: tuple[int, str] = (GOING_AWAY, "going away")  # how we close when it did not finish

    @property
    def over(self) -> bool:
        return self.finished is not None or self.failure is not None

    def finish(self, answer: Answer) -> None:
        if not self.over:
            self.finished = answer
        self.scope.cancel()

    def fail(self, error: SessionError, *, close_with: tuple[int, str] | None = None) -> None:
        if not self.over:
            self.failure = error
            if close_with is not None:
                self.close_with = close_with
        self.scope.cancel()


async def stream(
    ws: Socket,
    feed: Feed,
    *,
    datapt_id: str,
    fps: float,
    advanced: bool,
    prefill: int = 1,
    finish_timeout: float,
    heartbeat: float = 0.0,
    tally: Tally | None = None,
    on_answer: Callable[[Answer], None] | None = None,
    stats: Stats | None = None,
) -> Finished:
    """Send every frame of ``feed`` and wait for ``finished``; raise a SessionError otherwise.

    ``stats``, when given, counts frames, bytes and answers as they go (the process's metrics).
    """
    tally = tally if tally is not None else Tally()
    closing: tuple[int, str | None] = (GOING_AWAY, "going away")
    stats = stats if stats is not None else Stats()
    try:
        async with open_nursery() as nursery:
            shared = _Shared(nursery.cancel_scope)
            nursery.start_soon(_listen, ws, shared, tally, on_answer, stats)
            if heartbeat > 0:
                nursery.start_soon(_heartbeat, ws, shared, heartbeat)
            await _send(ws, feed, shared, tally, stats, datapt_id=datapt_id, fps=fps, advanced=advanced,
                        prefill=prefill)
            await trio.sleep(finish_timeout)  # ended early by finish() or fail()
            shared.fail(FinishTimeout(f"no 'finished' within {finish_timeout:g} s after the end message"))
        if shared.finished is not None:
            closing = (1000, None)
            return Finished(
                message=shared.finished.body,
                hr=shared.finished.hr,
                sent=tally.sent,
                skipped=feed.skipped,
                answers=tally.answers,
                signal=tally.signal(),
            )
        assert shared.failure is not None
        closing = shared.close_with
        raise shared.failure
    finally:
        stats.frames_skipped += feed.skipped
        with trio.move_on_after(CLOSE_TIMEOUT if closing[0] == 1000 else ABANDON_TIMEOUT, shield=True):
            with contextlib.suppress(trio_websocket.ConnectionClosed, trio.BrokenResourceError, OSError):
                await ws.aclose(*closing)


async def _send(
    ws: Socket,
    feed: Feed,
    shared: _Shared,
    tally: Tally,
    stats: Stats,
    *,
    datapt_id: str,
    fps: float,
    advanced: bool,
    prefill: int,
) -> None:
    """The sender: every frame on schedule, then the end message."""
    ready: list[EncodedFrame] = []
    while len(ready) < max(1, prefill):
        frame = await feed.next()
        if frame is None:
            break
        ready.append(frame)
    if not ready:
        raise NoFramesError("no usable frame left to send")

    t0 = tally.started = trio.current_time()
    last: EncodedFrame | None = None
    index = 0
    while True:
        frame = ready.pop(0) if ready else await feed.next()
        if frame is None:
            break
        message = message_parts(datapt_id, STATE_STREAM, frame.data, frame.timestamp, advanced)  # before the wait
        if fps > 0:
            await trio.sleep_until(t0 + index / fps)
        await _send_one(ws, shared, message)
        last = frame
        index += 1
        tally.sent, tally.skipped = index, feed.skipped
        stats.frames_sent += 1
        stats.bytes_sent += sum(map(len, message))
    assert last is not None
    message = message_parts(datapt_id, STATE_END, last.data, last.timestamp, advanced)
    if fps > 0:
        await trio.sleep_until(t0 + index / fps)
    await _send_one(ws, shared, message)
    stats.bytes_sent += sum(map(len, message))


async def _send_one(ws: Socket, shared: _Shared, message: tuple[bytes, bytes, bytes]) -> None:
    try:
        await send_text(ws, message)
    except trio_websocket.ConnectionClosed as exc:
        shared.fail(classify_closed(exc.reason))
        await trio.lowlevel.checkpoint()  # the attempt is over: this raises Cancelled


async def _listen(
    ws: Socket, shared: _Shared, tally: Tally, on_answer: Callable[[Answer], None] | None, stats: Stats
) -> None:
    received = 0
    while True:
        try:
            message = await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            shared.fail(classify_closed(exc.reason))
            return
        answer = parse_answer(message)
        tally.count(answer)
        stats.answers += 1
        received += len(message)
        allowed = ANSWER_ALLOWANCE + ANSWERS_PER_FRAME * tally.sent
        allowed_bytes = ANSWER_BYTES_ALLOWANCE + ANSWER_BYTES_PER_FRAME * tally.sent
        if tally.answers > allowed or received > allowed_bytes:
            # A backend that answers far more than it is sent is flooding: each answer costs a log
            # line and a parse. The attempt ends as a policy violation (1008), and is retried.
            what = f"{allowed} messages" if tally.answers > allowed else f"{allowed_bytes} bytes"
            shared.fail(SessionError(f"the backend sent more than {what} for {tally.sent} frames",
                                     retry=Retry.SESSION), close_with=(POLICY_VIOLATION, "too many messages"))
            return
        if answer.hr is not None:
            stats.answers_with_hr += 1
        elif answer.warming_up:
            stats.answers_warmup += 1
        log.info("response", response_kind=answer.kind, response=answer.for_log())
        if on_answer is not None:
            on_answer(answer)
        if answer.state == "finished":
            shared.finish(answer)


async def _heartbeat(ws: Socket, shared: _Shared, interval: float) -> None:
    """Ping every ``interval``; no pong within ``max(2 * interval, 10 s)`` means half-open."""
    patience = max(2 * interval, 10.0)
    while True:
        await trio.sleep(interval)
        with trio.move_on_after(patience) as scope:
            try:
                await ws.ping()
            except (trio_websocket.ConnectionClosed, trio.BrokenResourceError):
                return  # the listener reports the close
        if scope.cancelled_caught:
            shared.fail(SessionError(f"no pong within {patience:g} s: the connection is half-open"))
            return
