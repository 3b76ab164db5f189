"""One attempt over one connection, against an in-memory socket under trio's MockClock."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from trio_websocket import CloseReason, ConnectionClosed

from caired.attempt import Tally, stream
from caired.errors import FinishTimeout, FrameError, KeyRejected, SessionError
from caired.frames import EncodedFrame, Result
from caired.sources import Feed

DATAPT = "ed21c799-9edd-4706-9256-0324a7697adb"


class FakeSocket:
    """Records what is sent and when; answers as a scripted backend would."""

    def __init__(self, *, finish: bool = True, pong: bool = True, close_after: int | None = None,
                 close_code: int = 1011, ok_every: int = 0) -> None:
        self.sent: list[tuple[float, dict[str, Any]]] = []
        self.finish, self.pong, self.close_after, self.close_code = finish, pong, close_after, close_code
        self.ok_every = ok_every
        self.inbox_send, self.inbox = trio.open_memory_channel[str | bytes | CloseReason](100)
        self.closed_with: int | None = None
        self._closed: CloseReason | None = None

    async def send_message(self, message: str | bytes) -> None:
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        assert isinstance(message, str)
        payload = json.loads(message)
        self.sent.append((trio.current_time(), payload))
        frames = sum(1 for _, p in self.sent if p["state"] == "stream")
        if self.close_after is not None and frames == self.close_after:
            self._closed = CloseReason(self.close_code, "injected")
            self.inbox_send.send_nowait(self._closed)
        elif payload["state"] == "end" and self.finish:
            self.inbox_send.send_nowait(json.dumps({"state": "finished", "inference": {"hr": 65}, "advanced": None}))
        elif self.ok_every and payload["state"] == "stream" and frames % self.ok_every == 0:
            self.inbox_send.send_nowait(json.dumps({"state": "ok", "inference": {"hr": 60 + frames}}))
            self.inbox_send.send_nowait("not json")
            self.inbox_send.send_nowait(b"\x00\x01\x02")

    async def get_message(self) -> str | bytes:
        item = await self.inbox.receive()
        if isinstance(item, CloseReason):
            raise ConnectionClosed(item)
        return item

    async def ping(self, payload: bytes | None = None) -> None:
        if not self.pong:
            await trio.sleep_forever()

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        if self.closed_with is None:
            self.closed_with = code


def feed_of(items: list[Result]) -> Feed:
    send, receive = trio.open_memory_channel[Result](len(items) + 1)
    for item in items:
        send.send_nowait(item)
    send.close()
    skipped: list[FrameError] = []
    return Feed(receive, skipped.append)


def frames(n: int) -> list[Result]:
    return [EncodedFrame(f"{1747154380.5 + i / 30:.7f}", f"ZnJhbWU{i:03d}".encode()) for i in range(n)]


async def test_frames_leave_on_an_absolute_schedule(autojump_clock: trio.testing.MockClock) -> None:
    ws = FakeSocket()
    result = await stream(ws, feed_of(frames(10)), datapt_id=DATAPT, fps=30.0, advanced=True, finish_timeout=5)
    times = [t for t, _ in ws.sent]
    t0 = times[0]
    # frame i at t0 + i/30 exactly, and the end message at the next slot
    assert times == pytest.approx([t0 + i / 30 for i in range(11)], abs=1e-9)
    assert result.sent == 10 and result.hr == 65
    assert ws.closed_with == 1000


async def test_slow_frames_do_not_shift_the_schedule(autojump_clock: trio.testing.MockClock) -> None:
    """A frame that is late leaves at once; the ones after it keep their own slots (no drift)."""
    send, receive = trio.open_memory_channel[Result](0)
    ws = FakeSocket()

    async def produce() -> None:
        async with send:
            for i, frame in enumerate(frames(6)):
                if i == 2:
                    await trio.sleep(0.1)  # three slots late
                await send.send(frame)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce)
        await stream(ws, Feed(receive, lambda e: None), datapt_id=DATAPT, fps=30.0, advanced=True,
                     finish_timeout=5)
    times = [t - ws.sent[0][0] for t, _ in ws.sent]
    assert times[2] == pytest.approx(0.1, abs=1e-9)  # late: leaves as soon as it is ready
    assert times[3] == pytest.approx(3 / 30, abs=1e-9)  # its own slot, not 0.1 + 1/30
    assert times[4] == pytest.approx(4 / 30, abs=1e-9)
    assert times[5] == pytest.approx(5 / 30, abs=1e-9)


async def test_unpaced_sends_without_waiting(autojump_clock: trio.testing.MockClock) -> None:
    ws = FakeSocket()
    await stream(ws, feed_of(frames(20)), datapt_id=DATAPT, fps=0, advanced=False, finish_timeout=5)
    assert {t for t, _ in ws.sent} == {ws.sent[0][0]}


async def test_messages_follow_the_protocol(autojump_clock: trio.testing.MockClock) -> None:
    ws = FakeSocket()
    items = frames(5)
    await stream(ws, feed_of(items), datapt_id=DATAPT, fps=30, advanced=False, finish_timeout=5)
    payloads = [p for _, p in ws.sent]
    assert all(list(p) == ["datapt_id", "state", "frame_data", "timestamp", "advanced"] for p in payloads)
    assert {p["datapt_id"] for p in payloads} == {DATAPT}
    assert [p["state"] for p in payloads] == ["stream"] * 5 + ["end"]
    assert all(p["advanced"] is False for p in payloads)
    last = items[-1]
    assert isinstance(last, EncodedFrame)
    assert payloads[-1]["frame_data"] == last.data.decode() and payloads[-1]["timestamp"] == last.timestamp


async def test_unreadable_frames_are_skipped_and_counted(autojump_clock: trio.testing.MockClock) -> None:
    items: list[Result] = frames(4)
    items.insert(2, FrameError("bad.png", "cannot be decoded"))
    ws = FakeSocket()
    result = await stream(ws, feed_of(items), datapt_id=DATAPT, fps=30, advanced=True, finish_timeout=5)
    assert result.sent == 4 and result.skipped == 1
    assert len(ws.sent) == 5


async def test_every_answer_is_drained_and_logged(autojump_clock: trio.testing.MockClock) -> None:
    from structlog.testing import capture_logs

    ws = FakeSocket(ok_every=2)
    tally = Tally()
    with capture_logs() as logs:
        result = await stream(ws, feed_of(frames(6)), datapt_id=DATAPT, fps=30, advanced=True, finish_timeout=5,
                              tally=tally)
    responses = [e for e in logs if e["event"] == "response"]
    kinds = [e["response_kind"] for e in responses]
    assert kinds.count("json") == 4  # three ok + finished
    assert kinds.count("text") == 3 and kinds.count("binary") == 3
    assert {"binary_bytes": 3} in [e["response"] for e in responses]
    assert responses[-1]["response"]["state"] == "finished"
    assert result.answers == 10
    assert tally.hr == 65


async def test_no_finished_is_a_finish_timeout(autojump_clock: trio.testing.MockClock) -> None:
    ws = FakeSocket(finish=False)
    start = trio.current_time()
    with pytest.raises(FinishTimeout):
        await stream(ws, feed_of(frames(3)), datapt_id=DATAPT, fps=30, advanced=True, finish_timeout=7)
    assert trio.current_time() - start == pytest.approx(3 / 30 + 7, abs=1e-6)
    assert ws.closed_with == 1001


@pytest.mark.parametrize(
    ("code", "error", "permanent"),
    [(1011, SessionError, False), (1009, SessionError, True), (1008, KeyRejected, False), (1007, SessionError, True)],
)
async def test_a_close_mid_session_is_classified(
    autojump_clock: trio.testing.MockClock, code: int, error: type[SessionError], permanent: bool
) -> None:
    ws = FakeSocket(close_after=3, close_code=code)
    with pytest.raises(error) as caught:
        await stream(ws, feed_of(frames(10)), datapt_id=DATAPT, fps=30, advanced=True, finish_timeout=5)
    assert caught.value.close_code == code
    assert caught.value.permanent is permanent
    assert len(ws.sent) == 3  # the sender stopped at the close


async def test_a_half_open_connection_is_noticed(autojump_clock: trio.testing.MockClock) -> None:
    ws = FakeSocket(finish=False, pong=False)
    start = trio.current_time()
    with pytest.raises(SessionError, match="half-open"):
        await stream(ws, feed_of(frames(3)), datapt_id=DATAPT, fps=30, advanced=True, finish_timeout=60,
                     heartbeat=5)
    # first ping at 5 s, no pong within max(2*5, 10) = 10 s
    assert trio.current_time() - start == pytest.approx(15, abs=1e-6)
