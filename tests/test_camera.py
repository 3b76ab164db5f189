"""The camera source, with a video file (or a fake capture object) as the camera, on trio's MockClock.

Every test runs in virtual time (the ``virtual`` fixture): the device's reads and opens run
inline instead of in worker threads, and a frame's capture time is read from the MockClock,
so the schedule is exact: frame counts, capture times 1/fps apart, durations.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, MutableMapping
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog
import trio
import trio.testing
from structlog.testing import capture_logs

from caired import camera
from caired.camera import CapturedFrame, CaptureStats, capture, is_video_file, open_device, run_camera, session_name
from caired.config import CameraConfig
from caired.errors import DeviceError
from tests.conftest import write_video

T0_NS = 1747154380 * 10**9
TIMESTAMP = re.compile(r"^\d+\.\d{7}$")


class VirtualWallClock:
    """The camera module's ``time``, except that ``time_ns`` (a frame's capture time) reads the MockClock."""

    def __init__(self, clock: trio.testing.MockClock) -> None:
        self._clock = clock

    def time_ns(self) -> int:
        return T0_NS + round(self._clock.current_time() * 1e9)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def virtual(autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch) -> trio.testing.MockClock:
    """Virtual time for every test here: device calls inline (a worker thread would let the
    clock jump past a pending deadline while it runs), capture times from the MockClock."""

    async def inline(fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", inline)
    monkeypatch.setattr(camera, "time", VirtualWallClock(autojump_clock))
    return autojump_clock
SESSION = re.compile(r"^cam-\d{8}T\d{6}-\d{3}$")


class FakeCapture:
    """A cv2.VideoCapture stand-in: ``frames`` good reads, then read() fails."""

    def __init__(self, frames: int) -> None:
        self.left = frames
        self.released = False
        self.reads = 0

    def read(self) -> tuple[bool, Any]:
        self.reads += 1
        if self.left <= 0:
            return False, None
        self.left -= 1
        return True, np.full((48, 64, 3), self.left % 256, np.uint8)

    def get(self, prop: int) -> float:
        return 0.0

    def release(self) -> None:
        self.released = True


def seconds(frame: CapturedFrame) -> float:
    return float(frame.timestamp)


async def collect(receive: trio.MemoryReceiveChannel[CapturedFrame]) -> list[CapturedFrame]:
    async with receive:
        return [frame async for frame in receive]


def test_is_video_file() -> None:
    assert not is_video_file("0")
    assert not is_video_file("12")
    assert not is_video_file("/dev/video2")
    assert is_video_file("clip.avi")
    assert is_video_file("/srv/videos/face.mp4")


def test_open_device_errors_are_one_actionable_line(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match=r"video file .*missing\.avi does not exist"):
        open_device(str(tmp_path / "missing.avi"), 64, 48, 20)
    garbage = tmp_path / "garbage.avi"
    garbage.write_text("not a video")
    with pytest.raises(DeviceError, match="could not be opened"):
        open_device(str(garbage), 64, 48, 20)
    with pytest.raises(DeviceError, match=r"^camera 9 could not be opened") as caught:
        open_device("9", 64, 48, 20)
    assert "\n" not in str(caught.value)
    assert caught.value.exit_code == 74
    with pytest.raises(DeviceError, match=r"camera /dev/video77 does not exist"):
        open_device("/dev/video77", 64, 48, 20)


def test_session_name() -> None:
    assert session_name(1747154380.5511632) == "cam-20250513T163940-551"
    assert SESSION.match(session_name(1747154380.0))


async def test_capture_is_paced_with_increasing_timestamps(virtual: trio.testing.MockClock, tmp_path: Path) -> None:
    video = write_video(tmp_path / "cam.avi")
    cfg = CameraConfig(device=str(video), fps=20)
    send, receive = trio.open_memory_channel[CapturedFrame](64)
    stats = CaptureStats()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(capture, cfg, send, seconds=1.0, stats=stats))
        frames = await collect(receive)
    assert len(frames) == 20  # one per 1/20 s slot of the second
    assert stats.captured == stats.sent == len(frames)
    assert stats.dropped == stats.late == 0
    assert all(TIMESTAMP.match(f.timestamp) for f in frames)
    ticks = [int(f.timestamp.replace(".", "")) for f in frames]  # 100 ns ticks, as named
    assert [b - a for a, b in pairwise(ticks)] == [500_000] * 19  # exactly 1/20 s apart
    assert frames[0].image.shape == (48, 64, 3) and frames[0].image.dtype == np.uint8
    assert stats.seconds == pytest.approx(1.0, abs=1e-9)


async def test_video_file_replays_at_its_end(virtual: trio.testing.MockClock, tmp_path: Path) -> None:
    video = write_video(tmp_path / "short.avi", frames=8)
    cfg = CameraConfig(device=str(video), fps=30)
    send, receive = trio.open_memory_channel[CapturedFrame](64)
    stats = CaptureStats()
    received: list[CapturedFrame] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect_into, receive, received)
        await capture(cfg, send, seconds=0.8, stats=stats)
    assert len(received) == 24  # 0.8 s at 30 fps: three times the file's 8 frames
    assert stats.restarts == 2
    means = [round(float(f.image.mean())) for f in received[:8]]
    assert len(set(means)) > 4  # the frames differ: it is the video, not one frame repeated


async def collect_into(receive: trio.MemoryReceiveChannel[CapturedFrame], into: list[CapturedFrame]) -> None:
    into.extend(await collect(receive))


async def test_full_channel_drops_frames_and_counts_them(virtual: trio.testing.MockClock, tmp_path: Path) -> None:
    video = write_video(tmp_path / "cam.avi")
    cfg = CameraConfig(device=str(video), fps=20)
    send, receive = trio.open_memory_channel[CapturedFrame](1)
    stats = CaptureStats()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(capture, cfg, send, seconds=0.6, stats=stats))
        await trio.sleep(0.8)  # nobody reads: the channel holds one frame, the rest are dropped
        frames = await collect(receive)
    assert len(frames) == 1
    assert stats.captured == 12  # 0.6 s at 20 fps
    assert stats.dropped == 11


async def test_camera_that_stops_delivering_raises_and_closes_channel(
    virtual: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeCapture(frames=5)
    monkeypatch.setattr(camera, "open_device", lambda *args: fake)
    send, receive = trio.open_memory_channel[CapturedFrame](64)
    stats = CaptureStats()
    failures: list[DeviceError] = []

    async def run() -> None:
        try:
            await capture(CameraConfig(device="0", fps=20), send, seconds=5.0, stats=stats)
        except DeviceError as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        received = await collect(receive)  # ends on EndOfChannel: the failed capture closed it
        stalled_at = trio.current_time()
    assert len(failures) == 1
    assert stalled_at == pytest.approx(0.2 + camera.STALL_SECONDS, abs=0.051)  # last frame at 0.2 s
    assert str(failures[0]).startswith("camera 0 stopped delivering frames")
    assert len(received) == 5  # the consumer got every frame, then EndOfChannel
    assert stats.read_failures == pytest.approx(camera.STALL_SECONDS * 20, abs=1)  # every slot since
    assert fake.released


async def test_deleted_video_file_fails_at_its_end(virtual: trio.testing.MockClock, tmp_path: Path) -> None:
    video = write_video(tmp_path / "gone.avi", frames=6)
    send, receive = trio.open_memory_channel[CapturedFrame](64)
    received: list[CapturedFrame] = []

    async def consume() -> None:
        async with receive:
            async for frame in receive:
                received.append(frame)
                video.unlink(missing_ok=True)

    with pytest.RaisesGroup(pytest.RaisesExc(DeviceError, match="ended and could not be opened again")):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            await capture(CameraConfig(device=str(video), fps=30), send, seconds=5.0)
    assert len(received) == 6


async def test_cancelled_capture_releases_device_and_closes_channel(
    virtual: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeCapture(frames=10_000)
    monkeypatch.setattr(camera, "open_device", lambda *args: fake)
    send, receive = trio.open_memory_channel[CapturedFrame](64)
    with trio.move_on_after(0.29):
        await capture(CameraConfig(device="0", fps=20), send, seconds=None)
    assert fake.released
    assert len(await collect(receive)) == 6  # 0, 0.05 ... 0.25 s; then EndOfChannel: the channel was closed


def _events(logs: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


async def test_sessions_in_one_millisecond_or_after_the_clock_steps_back_get_names_of_their_own(
    virtual: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    video = write_video(tmp_path / "cam.avi")
    wall = iter([1747154380.5511, 1747154380.5511, 1747154370.0, 1747154390.25])  # same ms, then back 10 s
    monkeypatch.setattr(camera.time, "time", lambda: next(wall, 1747154400.0))
    cfg = CameraConfig(device=str(video), fps=20, session_seconds=0.1, interval_seconds=0)
    names: list[str] = []
    done = trio.Event()

    async def on_session(name: str, receive: trio.MemoryReceiveChannel[CapturedFrame]) -> None:
        await collect(receive)
        names.append(name)
        if len(names) == 4:
            done.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(run_camera, cfg, on_session)
        await done.wait()
        nursery.cancel_scope.cancel()
    assert names == ["cam-20250513T163940-551", "cam-20250513T163940-552", "cam-20250513T163940-553",
                     "cam-20250513T163950-250"]


async def test_run_camera_back_to_back_sessions_keep_device_open(virtual: trio.testing.MockClock,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    video = write_video(tmp_path / "cam.avi")
    opened: list[str] = []
    real_open = camera.open_device

    def counting_open(*args: Any) -> Any:
        opened.append(args[0])
        return real_open(*args)

    monkeypatch.setattr(camera, "open_device", counting_open)
    cfg = CameraConfig(device=str(video), fps=20, session_seconds=0.4, interval_seconds=0)
    sessions: list[tuple[str, list[CapturedFrame]]] = []
    done = trio.Event()

    async def on_session(name: str, receive: trio.MemoryReceiveChannel[CapturedFrame]) -> None:
        frames = await collect(receive)
        assert structlog.contextvars.get_contextvars() == {"source": "camera", "session": name}
        sessions.append((name, frames))
        if len(sessions) == 3:
            done.set()

    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_camera, cfg, on_session)
            await done.wait()
            nursery.cancel_scope.cancel()

    assert len(opened) == 1  # no interval: the device stayed open between sessions
    names = [name for name, _ in sessions]
    assert all(SESSION.match(name) for name in names) and len(set(names)) == 3
    assert [len(frames) for _, frames in sessions] == [8, 8, 8]  # 0.4 s at 20 fps each
    stamps = [seconds(f) for _, frames in sessions for f in frames]
    assert all(a < b for a, b in pairwise(stamps))
    captured = _events(logs, "camera_session_captured")
    # a session's line is logged also when cancelled: the fourth, cut short, may be there too
    assert [entry["session"] for entry in captured][:3] == names
    assert [entry["captured"] for entry in captured][:3] == [len(frames) for _, frames in sessions]
    assert all(entry["complete"] and entry["dropped"] == 0 for entry in captured[:3])
    assert len(_events(logs, "camera_available")) == 1
    assert not _events(logs, "camera_frames_dropped")


async def test_run_camera_waits_for_a_missing_device(virtual: trio.testing.MockClock, tmp_path: Path) -> None:
    video = tmp_path / "later.avi"
    cfg = CameraConfig(device=str(video), fps=20, session_seconds=0.3)
    sessions: list[list[CapturedFrame]] = []
    done = trio.Event()

    async def on_session(name: str, receive: trio.MemoryReceiveChannel[CapturedFrame]) -> None:
        sessions.append(await collect(receive))
        done.set()

    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with trio.open_nursery() as nursery:
            # started() comes after the first attempt, even though the device is missing
            await nursery.start(lambda task_status: run_camera(
                cfg, on_session, retry_initial=0.1, retry_max=0.2, task_status=task_status))
            await trio.sleep(0.5)  # several attempts fail meanwhile
            write_video(tmp_path / "writing.avi").rename(video)
            await done.wait()
            nursery.cancel_scope.cancel()

    unavailable = _events(logs, "camera_unavailable")
    assert len(unavailable) == 1  # logged once per change of state, not once per attempt
    assert "does not exist" in unavailable[0]["reason"]
    assert len(_events(logs, "camera_available")) == 1
    assert logs.index(unavailable[0]) < logs.index(_events(logs, "camera_available")[0])
    assert len(sessions[0]) == 6  # 0.3 s at 20 fps


async def test_run_camera_device_failure_ends_session_and_reopens(
    virtual: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fakes = [FakeCapture(frames=3), FakeCapture(frames=10_000)]
    monkeypatch.setattr(camera, "open_device", lambda *args: fakes.pop(0))
    # Sessions longer than the stall: the first one ends when its device stops delivering.
    cfg = CameraConfig(device="0", fps=20, session_seconds=camera.STALL_SECONDS + 1)
    sessions: list[list[CapturedFrame]] = []
    done = trio.Event()

    async def on_session(name: str, receive: trio.MemoryReceiveChannel[CapturedFrame]) -> None:
        sessions.append(await collect(receive))  # ends on EndOfChannel, also when the device fails
        if len(sessions) == 2:
            done.set()

    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_camera(cfg, on_session, retry_initial=0.05))
            await done.wait()
            nursery.cancel_scope.cancel()

    assert len(sessions[0]) == 3
    assert len(sessions[1]) == cfg.session_seconds * 20  # a whole session on the reopened device
    assert [e["event"] for e in logs if e["event"].startswith("camera_")][:5] == [
        "camera_available", "camera_session_captured", "camera_unavailable", "camera_available",
        "camera_session_captured",
    ]
    assert "stopped delivering frames" in _events(logs, "camera_unavailable")[0]["reason"]
    assert _events(logs, "camera_session_captured")[0]["complete"] is False


async def test_run_camera_logs_drops_per_session_and_releases_during_interval(virtual: trio.testing.MockClock,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    video = write_video(tmp_path / "cam.avi")
    opened = 0
    real_open = camera.open_device

    def counting_open(*args: Any) -> Any:
        nonlocal opened
        opened += 1
        return real_open(*args)

    monkeypatch.setattr(camera, "open_device", counting_open)
    cfg = CameraConfig(device=str(video), fps=20, session_seconds=0.3, interval_seconds=0.1)
    sessions = 0
    done = trio.Event()

    async def slow_consumer(name: str, receive: trio.MemoryReceiveChannel[CapturedFrame]) -> None:
        nonlocal sessions
        await trio.sleep(0.5)  # reads nothing until the capture is over
        await collect(receive)
        sessions += 1
        if sessions == 2:
            done.set()

    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_camera(cfg, slow_consumer, channel_size=2))
            await done.wait()
            nursery.cancel_scope.cancel()

    assert opened == 2  # with an interval, the device is released between sessions
    dropped = _events(logs, "camera_frames_dropped")[:2]
    captured = _events(logs, "camera_session_captured")[:2]
    assert [d["count"] for d in dropped] == [c["dropped"] for c in captured]
    assert [c["captured"] - c["dropped"] for c in captured] == [2, 2]  # what the channel held
    assert [c["captured"] for c in captured] == [6, 6]  # 0.3 s at 20 fps
    assert dropped[0]["session"] == captured[0]["session"] != captured[1]["session"]


async def test_a_driver_error_from_a_read_is_a_device_failure_and_the_camera_reopens(
    virtual: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Crashing(FakeCapture):
        def read(self) -> tuple[bool, Any]:
            raise RuntimeError("cv2.error: (-215:Assertion failed) in a driver")

    fakes: list[FakeCapture] = [Crashing(frames=0), FakeCapture(frames=10_000)]
    monkeypatch.setattr(camera, "open_device", lambda *args: fakes.pop(0))
    cfg = CameraConfig(device="0", fps=20, session_seconds=0.5)
    sessions: list[list[CapturedFrame]] = []
    done = trio.Event()

    async def on_session(name: str, receive: trio.MemoryReceiveChannel[CapturedFrame]) -> None:
        sessions.append(await collect(receive))
        if len(sessions) == 2:
            done.set()

    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: run_camera(cfg, on_session, retry_initial=0.05))
            await done.wait()
            nursery.cancel_scope.cancel()
    assert [len(s) for s in sessions] == [0, 10]
    assert "failed to deliver a frame" in _events(logs, "camera_unavailable")[0]["reason"]
