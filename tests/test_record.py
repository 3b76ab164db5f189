"""``caired record``, run in-process through the CLI with a video file (or a fake capture) as the camera.

Every run is on trio's MockClock: the capture's schedule, its duration and the frames' capture
times are virtual, so frame counts and timestamps are exact.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np
import pytest
import trio
import trio.testing

from caired import camera, cli, fsops, record
from caired.camera import CapturedFrame
from caired.settle import READY_MARKER
from caired.spool import FOLDERS, LOCK_FILE, SESSION_FILE, Spool
from tests.conftest import cli_env, write_video

PNG = re.compile(r"^\d+\.\d+\.png$")
ENV_NAMES = ("FPS", "DURATION_SEC", "CAMERA_INDEX", "IMAGES_DIR", "RES_WIDTH", "RES_HEIGHT", "SHOW_PREVIEW",
             "DISPLAY", "WAYLAND_DISPLAY")
T0_TICKS: Final = 17471543800000000  # 1747154380.0000000 s in the 100 ns ticks of a frame's name
TICKS_PER_SECOND: Final = 10_000_000
SESSION_FILES: Final = frozenset({LOCK_FILE, SESSION_FILE, READY_MARKER})  # a spool session's own files


class FakeCapture:
    """A cv2.VideoCapture stand-in: ``frames`` good reads, then read() fails for good."""

    def __init__(self, frames: int) -> None:
        self.left = frames

    def read(self) -> tuple[bool, Any]:
        if self.left <= 0:
            return False, None
        self.left -= 1
        return True, np.full((48, 64, 3), self.left * 20 % 256, np.uint8)

    def get(self, prop: int) -> float:
        return 0.0

    def release(self) -> None:
        pass


class VirtualWallClock:
    """The camera module's ``time``, except that ``time_ns`` (a frame's capture time) reads the MockClock."""

    def __init__(self, clock: trio.testing.MockClock) -> None:
        self._clock = clock

    def time_ns(self) -> int:
        return T0_TICKS * 100 + round(self._clock.current_time() * 1e9)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


Run = Callable[..., int]


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, clock: trio.testing.MockClock) -> Run:
    """``run(*argv)``: ``caired ARGV`` in-process with only the record command, on virtual time; the exit code."""
    monkeypatch.setattr(cli, "COMMANDS", ("caired.commands.record",))
    for name in [*ENV_NAMES, *(n for n in os.environ if n.startswith("CAIRED_"))]:
        monkeypatch.delenv(name, raising=False)
    real_run = trio.run
    monkeypatch.setattr(trio, "run", lambda fn, *args: real_run(fn, *args, clock=clock))
    monkeypatch.setattr(camera, "time", VirtualWallClock(clock))

    def run(*argv: str) -> int:
        return cli.main(["record", *argv, "--log-format", "json"])

    return run


@pytest.fixture
def video(tmp_path: Path) -> Path:
    return write_video(tmp_path / "camera.avi")


def log_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def events(out: str, name: str) -> list[dict[str, Any]]:
    return [line for line in log_lines(out) if line["event"] == name]


def pngs(folder: Path) -> list[str]:
    """The frames in ``folder``, in order; nothing else is there but a spool session's own files."""
    names = sorted((n for n in os.listdir(folder) if n not in SESSION_FILES), key=lambda n: float(n[:-4]))
    assert all(PNG.match(name) for name in names), names  # nothing else: no temporary files
    return names


def spool_sessions(spool: Path) -> dict[str, list[str]]:
    """What each spool folder (incoming/, active/, ... tmp/) holds, for those that hold something."""
    return {where: names for where in FOLDERS if (names := sorted(os.listdir(spool / where)))}


def ticks(name: str) -> int:
    """A frame's capture time in 100 ns ticks, read exactly from its name."""
    seconds, fraction = name.removesuffix(".png").split(".")
    return int(seconds) * TICKS_PER_SECOND + int(fraction)


def on_schedule(names: list[str], fps: int) -> bool:
    """True when the frames were captured exactly ``1 / fps`` apart (fps dividing 10**7 keeps it exact)."""
    return [ticks(name) - ticks(names[0]) for name in names] == [i * TICKS_PER_SECOND // fps for i in range(len(names))]


def test_record_writes_whole_pngs_named_by_capture_time(
    run: Run, video: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run(str(out), "--camera", str(video), "--fps", "10", "--duration", "1", "--no-preview") == 0
    names = pngs(out)
    assert len(names) == 10
    assert on_schedule(names, 10)
    image = cv2.imread(str(out / names[0]))
    assert image is not None and image.shape == (48, 64, 3)
    [summary] = events(capsys.readouterr().out, "record_finished")
    assert summary["frames"] == summary["captured"] == len(names)
    assert summary["dropped"] == 0 and summary["partial"] is False and summary["interrupted"] is False
    assert summary["dir"] == str(out)
    assert summary["seconds"] == 1.0


def test_record_honours_the_original_environment_variables(
    run: Run, video: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    opened: list[tuple[Any, ...]] = []
    real_open = camera.open_device

    def spy(*args: Any) -> Any:
        opened.append(args)
        return real_open(*args)

    monkeypatch.setattr(camera, "open_device", spy)
    images = tmp_path / "from-env"
    monkeypatch.setenv("CAMERA_INDEX", str(video))
    monkeypatch.setenv("FPS", "10")
    monkeypatch.setenv("DURATION_SEC", "0.6")
    monkeypatch.setenv("IMAGES_DIR", str(images))
    monkeypatch.setenv("RES_WIDTH", "320")
    monkeypatch.setenv("RES_HEIGHT", "240")
    monkeypatch.setenv("SHOW_PREVIEW", "false")
    assert run() == 0
    assert opened[0] == (str(video), 320, 240, 10.0)
    names = pngs(images)
    assert len(names) == 6 and on_schedule(names, 10)
    out = capsys.readouterr().out
    assert not events(out, "preview_skipped")  # SHOW_PREVIEW=false: no preview, nothing to skip
    assert events(out, "record_finished")[0]["dir"] == str(images)


def test_flags_win_over_environment_variables(
    run: Run, video: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FPS", "40")
    monkeypatch.setenv("DURATION_SEC", "30")
    out = tmp_path / "out"
    assert run(str(out), "--camera", str(video), "--fps", "10", "--duration", "0.5", "--no-preview") == 0
    names = pngs(out)
    assert len(names) == 5 and on_schedule(names, 10)


@pytest.mark.parametrize(
    ("display", "reason"),
    [(None, "no display"), (":99", "no GUI support")],
    ids=["no-display", "headless-opencv"],
)
def test_preview_is_skipped_with_one_line_where_it_cannot_show(
    run: Run,
    video: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    display: str | None,
    reason: str,
) -> None:
    if display is not None:
        if not re.search(r"GUI:\s*NONE", cv2.getBuildInformation()):
            pytest.skip("this OpenCV has a GUI; a bogus DISPLAY would not be detected the same way")
        monkeypatch.setenv("DISPLAY", display)
    out = tmp_path / "out"
    assert run(str(out), "--camera", str(video), "--fps", "20", "--duration", "0.3", "--preview") == 0
    [skipped] = events(capsys.readouterr().out, "preview_skipped")
    assert reason in skipped["reason"]
    assert len(pngs(out)) == 6


def test_to_spool_publishes_exactly_one_folder(
    run: Run, video: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    spool = tmp_path / "spool"
    monkeypatch.setenv("CAIRED_SPOOL_DIR", str(spool))
    assert run("--to-spool", "--camera", str(video), "--fps", "20", "--duration", "0.5", "--no-preview") == 0
    [name] = spool_sessions(spool)["incoming"]
    session = spool / "incoming" / name
    assert re.fullmatch(r"rec-\d{8}T\d{6}Z", name)
    assert len(pngs(session)) == 10
    assert (session / READY_MARKER).exists()  # complete: the daemon takes it without waiting for it to settle
    assert json.loads((session / SESSION_FILE).read_text())["source"] == "record"
    assert spool_sessions(spool) == {"incoming": [name]}
    assert events(capsys.readouterr().out, "record_finished")[0]["dir"] == str(session)


def test_dir_inside_incoming_is_recorded_as_a_locked_session_then_handed_over_in_one_piece(
    run: Run, video: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written_in: set[Path] = set()
    real_write = record.write_frame
    published_as = [""]

    def spy(folder: Path, frame: CapturedFrame) -> None:
        assert not (spool / "incoming" / published_as[0]).exists()  # nothing shows in incoming/ while recording
        with fsops.opened_dir(folder) as dir_fd:
            assert fsops.lock_is_held(dir_fd, LOCK_FILE)  # held by this recording, as the spool's convention has it
        assert daemon.recover() == []  # so a daemon on the spool leaves it alone
        written_in.add(folder)
        real_write(folder, frame)

    monkeypatch.setattr(record, "write_frame", spy)
    spool = tmp_path / "spool"
    daemon = Spool(spool)
    target = spool / "incoming" / "walk"
    for name in ("walk", "walk.1"):  # the second finds its name taken: the spool's suffix rule
        published_as[0] = name
        assert run(str(target), "--camera", str(video), "--fps", "20", "--duration", "0.3", "--no-preview") == 0
    assert written_in == {spool / "active" / "walk"}
    assert spool_sessions(spool) == {"incoming": ["walk", "walk.1"]}
    assert len(pngs(spool / "incoming" / "walk")) == len(pngs(spool / "incoming" / "walk.1")) == 6
    daemon.close()


def test_what_a_killed_recording_leaves_is_recovered_by_the_daemon(video: Path, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    argv = [sys.executable, "-m", "caired", "record", str(spool / "incoming" / "cut"), "--camera", str(video),
            "--fps", "20", "--duration", "30", "--no-preview", "--log-format", "json"]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, env=cli_env()) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # until the session folder exists: the first frame is in hand
            if json.loads(line)["event"] == "folder_created":
                break
        proc.kill()
    assert spool_sessions(spool) == {"active": ["cut"]}
    daemon = Spool(spool)
    try:
        daemon.prepare()
        assert daemon.recover() == ["cut"]  # its lock went with its process
    finally:
        daemon.close()
    assert spool_sessions(spool) == {"incoming": ["cut"]}
    assert (spool / "incoming" / "cut" / READY_MARKER).exists()
    pngs(spool / "incoming" / "cut")  # whatever frames were written are whole


@pytest.mark.parametrize("into_spool", [False, True], ids=["folder", "spool"])
@pytest.mark.parametrize(("device", "message"), [("9", "camera 9 could not be opened"),
                                                   ("missing.avi", "video file {dir}/missing.avi does not exist")])
def test_camera_that_cannot_be_opened_exits_74_with_one_line(
    run: Run, tmp_path: Path, capfd: pytest.CaptureFixture[str], device: str, message: str, into_spool: bool
) -> None:
    spool = tmp_path / "spool"
    out = spool / "incoming" / "out" if into_spool else tmp_path / "out"
    assert run(str(out), "--camera", str(tmp_path / device) if device.endswith(".avi") else device) == 74
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1, err  # OpenCV's own warnings are silenced too
    assert err.startswith("caired record: " + message.format(dir=tmp_path))
    assert "Traceback" not in err
    assert not out.exists()  # the folder made for it is removed again, empty
    if into_spool:
        assert spool_sessions(spool) == {}  # no session folder is made before a frame comes


@pytest.mark.parametrize("into_spool", [False, True], ids=["folder", "spool"])
def test_camera_that_stops_keeps_the_partial_recording(
    run: Run,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    into_spool: bool,
) -> None:
    monkeypatch.setattr(camera, "open_device", lambda *args: FakeCapture(frames=8))
    spool = tmp_path / "spool"
    out = spool / "incoming" / "cut" if into_spool else tmp_path / "cut"
    assert run(str(out), "--camera", "0", "--fps", "20", "--duration", "5", "--no-preview") == 74
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [captured.err.strip()]
    assert captured.err.startswith("caired record: camera 0 stopped delivering frames (none for 2.1 s)")
    assert len(pngs(out)) == 8
    [summary] = events(captured.out, "record_finished")
    assert summary["partial"] is True and summary["frames"] == 8 and summary["dir"] == str(out)
    # The last frame came at 0.35 s; the first read more than STALL_SECONDS later, at 2.4 s, gave up.
    assert summary["seconds"] == round(0.35 + camera.STALL_SECONDS + 0.05, 2)
    if into_spool:
        assert list((spool / "tmp").iterdir()) == []


def interrupt_on_read(monkeypatch: pytest.MonkeyPatch, nth: int, signum: signal.Signals) -> None:
    """Send ``signum`` to this process as the camera's ``nth`` read starts, as a user pressing Ctrl-C would."""
    real_read = camera.Camera.read
    reads = 0

    async def read(self: camera.Camera) -> CapturedFrame | None:
        nonlocal reads
        reads += 1
        if reads == nth:
            signal.raise_signal(signum)
            await trio.sleep_forever()  # a read in flight when the signal came: the capture abandons it
        return await real_read(self)

    monkeypatch.setattr(camera.Camera, "read", read)


@pytest.mark.parametrize("into_spool", [False, True], ids=["folder", "spool"])
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["INT", "TERM"])
def test_ctrl_c_stops_and_keeps_what_was_recorded(
    run: Run,
    video: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    into_spool: bool,
    signum: signal.Signals,
    code: int,
) -> None:
    spool = tmp_path / "spool"
    out = spool / "incoming" / "stopped" if into_spool else tmp_path / "stopped"
    interrupt_on_read(monkeypatch, 12, signum)
    assert run(str(out), "--camera", str(video), "--fps", "20", "--duration", "30", "--no-preview") == code
    names = pngs(out)
    assert len(names) == 11 and on_schedule(names, 20)  # the frames of 0.0 s to 0.5 s; the read at 0.55 s stopped
    log = capsys.readouterr().out
    [interrupted] = events(log, "record_interrupted")
    assert interrupted["signal"] == signum.name
    [summary] = events(log, "record_finished")
    assert summary["interrupted"] is True and summary["frames"] == len(names)
    assert summary["seconds"] == 0.55
    if into_spool:
        assert list((spool / "tmp").iterdir()) == []


def test_writer_falling_behind_drops_frames_and_says_so(
    run: Run, video: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    release = threading.Event()
    real_write = record.write_frame
    real_capture = camera.capture

    def stuck_until_released(folder: Path, frame: CapturedFrame) -> None:
        assert release.wait(10)
        real_write(folder, frame)

    async def capture_then_release(*args: Any, **kwargs: Any) -> camera.CaptureStats:
        try:
            return await real_capture(*args, **kwargs)
        finally:
            release.set()  # the writers are stuck for the whole capture

    monkeypatch.setattr(record, "write_frame", stuck_until_released)
    monkeypatch.setattr(camera, "capture", capture_then_release)
    out = tmp_path / "out"
    try:
        assert run(str(out), "--camera", str(video), "--fps", "30", "--duration", "1", "--no-preview") == 0
    finally:
        release.set()
    log = capsys.readouterr().out
    [summary] = events(log, "record_finished")
    # two frames in the writers' hands and a full queue are kept; the rest are dropped, not queued
    assert summary["frames"] == len(pngs(out)) == record.QUEUE_SIZE + record.WRITERS
    assert summary["captured"] == 30
    assert summary["dropped"] == 30 - record.QUEUE_SIZE - record.WRITERS
    assert events(log, "record_frames_dropped")[0]["count"] == summary["dropped"]


def test_a_frame_file_appears_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frame = CapturedFrame(timestamp="1747154380.5511632", image=np.full((48, 64, 3), 7, np.uint8))
    final = "1747154380.5511632.png"
    real_replace = os.replace

    def check_then_replace(src: str, dst: str, *, src_dir_fd: int, dst_dir_fd: int) -> None:
        assert dst == final and not (tmp_path / final).exists()  # the real name appears only by the rename
        assert src.startswith(".") and src_dir_fd == dst_dir_fd  # hidden, in the same folder
        staged = cv2.imread(str(tmp_path / src))
        assert staged is not None and (staged == 7).all()  # complete before it is renamed
        real_replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(os, "replace", check_then_replace)
    record.write_frame(tmp_path, frame)
    assert os.listdir(tmp_path) == [final]

    def failing_replace(src: str, dst: str, **_: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    (tmp_path / final).unlink()
    with pytest.raises(OSError, match="No space left"):
        record.write_frame(tmp_path, frame)
    assert os.listdir(tmp_path) == []  # no temporary file left behind


def test_folder_that_cannot_be_made_exits_73_with_one_line(
    run: Run, video: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("")
    assert run(str(tmp_path / "a-file" / "out"), "--camera", str(video), "--no-preview") == 73
    err = capsys.readouterr().err
    assert err.splitlines() == [f"caired record: cannot create {tmp_path / 'a-file' / 'out'}: Not a directory; "
                                "choose another DIR or spool.dir"]


def test_write_failure_stops_the_recording_with_exit_73(
    run: Run, video: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_write = record.write_frame
    calls = 0

    def disk_fills_up(folder: Path, frame: CapturedFrame) -> None:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise OSError(28, "No space left on device", str(folder / f"{frame.timestamp}.png"))
        real_write(folder, frame)

    monkeypatch.setattr(record, "write_frame", disk_fills_up)
    out = tmp_path / "out"
    assert run(str(out), "--camera", str(video), "--fps", "20", "--duration", "30", "--no-preview") == 73
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and "No space left on device" in captured.err
    assert len(pngs(out)) == 3
    [summary] = events(captured.out, "record_finished")
    assert summary["seconds"] < 30  # the capture stopped at the failed write, not at the end of its 30 s
