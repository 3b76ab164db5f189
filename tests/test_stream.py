"""``caired stream`` against the strict local backend on 127.0.0.1: the protocol on the wire, exit codes."""

from __future__ import annotations

import functools
import hashlib
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from caired.commands.stream import stream_folder
from caired.emulator.server import BackendOptions, BackendState, Faults, serve_backend
from caired.errors import BackendUnavailable, KeyRejected, NoFramesError, SessionError
from caired.frames import list_frames
from caired.protocol import UUID4_RE
from tests.conftest import SECRET_KEY, BackendFactory, cli_env, make_config, run_cli


def assert_valid_session(state: BackendState, directory: Path, *, connections: int = 1) -> None:
    """What an independent strict backend would check: everything it saw was by the rules."""
    assert state.violations == []
    assert len(state.sessions) == connections
    last = state.sessions[-1]
    assert last.finished and last.close_code == 1000
    assert UUID4_RE.match(last.datapt_id or "")
    stems = [ref.timestamp for ref in list_frames(directory).frames]
    assert [f.timestamp for f in last.frames] == stems
    assert last.end is not None and last.end.timestamp == stems[-1]
    assert last.end.digest == last.frames[-1].digest


async def test_jpeg_session_passes_the_strict_backend(backend: BackendFactory, frames: Callable[..., Path]) -> None:
    directory = frames(20)
    state = await backend(api_key=SECRET_KEY)
    cfg = make_config(state.port, API_KEY=SECRET_KEY, FPS="0")
    await stream_folder(cfg, directory)
    assert_valid_session(state, directory)
    assert {f.kind for f in state.sessions[0].frames} == {"jpeg"}
    assert state.sessions[0].query["client"] == ["caired"]
    assert state.sessions[0].advanced is True


@pytest.mark.parametrize(("fps", "paced"), [("0", False), ("60", True)])
async def test_a_paced_stream_takes_no_spare_encode_worker(backend: BackendFactory, frames: Callable[..., Path],
                                                           monkeypatch: pytest.MonkeyPatch, fps: str,
                                                           paced: bool) -> None:
    """Unpaced, one worker more than the CPUs fills a waiting one's gap; paced, each one only holds buffers."""
    from caired.commands import stream as stream_command
    from caired.frames import encode_workers

    asked: list[bool] = []

    def recorded(*, paced: bool) -> int:
        asked.append(paced)
        return encode_workers(paced=paced)

    monkeypatch.setattr(stream_command, "encode_workers", recorded)
    directory = frames(3)
    state = await backend()
    await stream_folder(make_config(state.port, FPS=fps), directory)
    assert_valid_session(state, directory)
    assert asked == [paced]


async def test_raw_frames_arrive_byte_identical(backend: BackendFactory, frames: Callable[..., Path]) -> None:
    directory = frames(15)
    state = await backend()
    await stream_folder(make_config(state.port, FRAME_FORMAT="raw", FPS="0"), directory)
    assert_valid_session(state, directory)
    on_disk = [hashlib.sha256(ref.path.read_bytes()).hexdigest() for ref in list_frames(directory).frames]
    assert [f.digest for f in state.sessions[0].frames] == on_disk


async def test_jpeg_quality_is_the_one_asked_for(backend: BackendFactory, frames: Callable[..., Path]) -> None:
    directory = frames(3, size=(160, 120))
    state = await backend()
    await stream_folder(make_config(state.port, FPS="0", JPEG_QUALITY="20"), directory)
    low = state.sessions[0].frames[0].size
    await stream_folder(make_config(state.port, FPS="0", JPEG_QUALITY="95"), directory)
    assert state.sessions[1].frames[0].size > 2 * low


async def test_header_auth_sends_the_key_only_in_the_header(
    backend: BackendFactory, frames: Callable[..., Path]
) -> None:
    directory = frames(5)
    state = await backend(api_key=SECRET_KEY)
    await stream_folder(make_config(state.port, API_KEY=SECRET_KEY, CAIRED_BACKEND_AUTH="header", FPS="0"), directory)
    assert_valid_session(state, directory)
    seen = state.sessions[0]
    assert seen.headers["authorization"] == f"Bearer {SECRET_KEY}"
    assert "api_key" not in seen.query


async def test_a_dropped_connection_restarts_from_the_first_frame_with_the_same_datapt_id(
    backend: BackendFactory, frames: Callable[..., Path]
) -> None:
    directory = frames(12)
    state = await backend(faults=Faults(drop_after=5, close_after=0))
    await stream_folder(make_config(state.port, FPS="0"), directory)
    assert_valid_session(state, directory, connections=2)
    first, second = state.sessions
    assert len(first.frames) == 5 and not first.finished
    assert first.datapt_id == second.datapt_id


async def test_garbage_answers_are_recorded_not_fatal(backend: BackendFactory, frames: Callable[..., Path]) -> None:
    from structlog.testing import capture_logs

    directory = frames(12)
    state = await backend(faults=Faults(garbage_every=4))
    with capture_logs() as logs:
        await stream_folder(make_config(state.port, FPS="0"), directory)
    assert_valid_session(state, directory)
    kinds = [e["response_kind"] for e in logs if e["event"] == "response"]
    assert kinds.count("text") == 3 and kinds.count("binary") == 3


async def test_unreadable_frames_are_skipped_and_the_session_goes_on(
    backend: BackendFactory, frames: Callable[..., Path]
) -> None:
    from structlog.testing import capture_logs

    directory = frames(8)
    broken = list_frames(directory).frames[3].path
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (directory / "notes.txt").write_text("ignored")
    state = await backend()
    with capture_logs() as logs:
        await stream_folder(make_config(state.port, FPS="0"), directory)
    assert len(state.sessions[0].frames) == 7 and state.sessions[0].finished
    assert [e["frame"] for e in logs if e["event"] == "frame_skipped"] == [broken.name]
    assert [e["count"] for e in logs if e["event"] == "files_ignored"] == [1]


async def test_no_usable_frames_is_an_error_before_any_connection(
    backend: BackendFactory, tmp_path: Path
) -> None:
    state = await backend()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "1.png").write_bytes(b"not a png")
    (tmp_path / "junk" / "readme.txt").write_text("x")
    for directory in (tmp_path / "junk", tmp_path / "missing"):
        with pytest.raises(NoFramesError):
            await stream_folder(make_config(state.port, FPS="0"), directory)
    assert state.handshakes == 0


async def test_a_rejected_key_is_never_retried(backend: BackendFactory, frames: Callable[..., Path]) -> None:
    state = await backend(api_key=SECRET_KEY)
    with pytest.raises(KeyRejected):
        await stream_folder(make_config(state.port, API_KEY="wrong", CAIRED_RETRY_ATTEMPTS="5"), frames(3))
    assert state.handshakes == 1


async def test_a_wrong_path_is_a_configuration_error(backend: BackendFactory, frames: Callable[..., Path]) -> None:
    state = await backend()
    cfg = make_config(state.port, BACKEND_WS_BASE=f"ws://127.0.0.1:{state.port}/wrong/")
    with pytest.raises(KeyRejected, match="1008"):
        await stream_folder(cfg, frames(3))
    assert state.handshakes == 1


async def test_refused_handshakes_are_retried_with_backoff(
    backend: BackendFactory, frames: Callable[..., Path]
) -> None:
    directory = frames(5)
    state = await backend(faults=Faults(refuse_handshakes=2))
    await stream_folder(make_config(state.port, FPS="0", CAIRED_RETRY_ATTEMPTS="3"), directory)
    assert state.handshakes == 3
    assert_valid_session(state, directory)


async def test_giving_up_on_an_unreachable_backend(frames: Callable[..., Path], unused_port: int) -> None:
    with pytest.raises(BackendUnavailable, match="gave up after 2 attempts"):
        await stream_folder(make_config(unused_port, CAIRED_RETRY_ATTEMPTS="2"), frames(3))


async def test_a_withheld_finished_fails_after_the_finish_timeout(
    backend: BackendFactory, frames: Callable[..., Path]
) -> None:
    state = await backend(faults=Faults(withhold_finished=5))
    cfg = make_config(state.port, FPS="0", CAIRED_BACKEND_FINISH_TIMEOUT="0.5", CAIRED_RETRY_ATTEMPTS="2")
    with pytest.raises(SessionError, match=r"no 'finished' within 0\.5 s"):
        await stream_folder(cfg, frames(4))
    assert len(state.sessions) == 2 and all(s.end is not None for s in state.sessions)


async def test_a_backend_keeping_one_session_still_counts_its_faults_by_connection(
    nursery: trio.Nursery, frames: Callable[..., Path]
) -> None:
    """``caired backend`` remembers only its last connections; the first N still means the first N accepted."""
    state = BackendState(keep=1)
    await nursery.start(functools.partial(serve_backend, BackendOptions(faults=Faults(withhold_finished=1)),
                                          state=state))
    cfg = make_config(state.port, FPS="0", CAIRED_BACKEND_FINISH_TIMEOUT="0.5", CAIRED_RETRY_ATTEMPTS="2")
    await stream_folder(cfg, frames(3))  # the first connection's finished is withheld, the second's is not
    assert state.connections == 2 and len(state.sessions) == 1 and state.sessions[0].finished


# --- the command line: exit codes, one-line errors, no key anywhere --------------------------------------------


def one_line_error(stderr: bytes) -> str:
    text = stderr.decode()
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


async def test_cli_env_only_session_exits_0_and_logs_json_lines(
    backend: BackendFactory, frames: Callable[..., Path]
) -> None:
    directory = frames(10)
    state = await backend(api_key=SECRET_KEY)
    env = cli_env(BACKEND_WS_BASE=f"ws://127.0.0.1:{state.port}/ws/", API_KEY=SECRET_KEY, IMAGES_DIR=str(directory),
                  FPS="0", FRAME_FORMAT="raw", ADVANCED="0", CAIRED_LOG_LEVEL="debug")
    done = await run_cli("stream", env=env)
    assert done.returncode == 0, done.stderr
    assert_valid_session(state, directory)
    assert state.sessions[0].advanced is False
    assert SECRET_KEY not in done.stdout.decode() + done.stderr.decode()
    lines = [json.loads(line) for line in done.stdout.decode().splitlines()]
    for line in lines:
        assert {"timestamp", "level", "event"} <= set(line)
        assert line["timestamp"].endswith("Z")
    responses = [line for line in lines if line["event"] == "response"]
    assert responses and all(r["datapt_id"] == state.sessions[0].datapt_id for r in responses)
    assert responses[-1]["response"] == state.sessions[0].answers[-1]  # whole, unfiltered
    events = [line["event"] for line in lines]
    assert "session_started" in events and events[-1] == "session_finished"
    assert "api_key=***" in next(line["url"] for line in lines if line["event"] == "session_started")


@pytest.mark.parametrize(
    ("setup", "args", "code", "message"),
    [
        ("bad-key", [], 77, "rejected the connection (HTTP 403)"),
        ("junk", [], 65, "no frames"),
        ("missing", [], 65, "no such folder"),
        ("ok", ["--fps", "fast"], 2, "argument --fps: invalid float value"),
        ("ok", ["--format", "png"], 2, "invalid choice"),
        ("bad-env", [], 78, "stream.fps (from env FPS): must be a number (got 'fast')"),
        ("unreachable", ["--retries", "2"], 69, "gave up after 2 attempts"),
        ("withheld", ["--finish-timeout", "0.5", "--retries", "1"], 1, "no 'finished' within 0.5 s"),
    ],
)
async def test_cli_failures_are_one_line_with_the_right_exit_code(
    backend: BackendFactory, frames: Callable[..., Path], tmp_path: Path, unused_port: int,
    setup: str, args: list[str], code: int, message: str,
) -> None:
    state = await backend(api_key=SECRET_KEY, faults=Faults(withhold_finished=9))
    port = unused_port if setup == "unreachable" else state.port
    key = "wrong-key" if setup == "bad-key" else SECRET_KEY
    env = cli_env(BACKEND_WS_BASE=f"ws://127.0.0.1:{port}/ws/", API_KEY=key, CAIRED_RETRY_INITIAL="0.05", FPS="0")
    directory = frames(3)
    if setup == "junk":
        directory = tmp_path / "junk"
        directory.mkdir()
        (directory / "x.txt").write_text("x")
    elif setup == "missing":
        directory = tmp_path / "missing"
    elif setup == "bad-env":
        env["FPS"] = "fast"
    done = await run_cli("stream", str(directory), *args, env=env)
    assert done.returncode == code, done.stderr
    assert message in one_line_error(done.stderr)
    assert SECRET_KEY not in done.stdout.decode() + done.stderr.decode()


async def test_cli_key_never_appears_even_at_debug_level(backend: BackendFactory, frames: Callable[..., Path]) -> None:
    state = await backend(api_key=SECRET_KEY)
    env = cli_env(BACKEND_WS_BASE=f"ws://127.0.0.1:{state.port}/ws/", FPS="0")
    done = await run_cli("stream", str(frames(4)), "--api-key", SECRET_KEY, "--log-level", "debug", env=env)
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode() + done.stderr.decode()
    assert SECRET_KEY not in out and "api_key=***" in out


class Lines:
    """The JSON lines a child writes on a pipe, read as they come."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""
        self.seen: list[dict[str, Any]] = []

    async def until(self, event: str) -> dict[str, Any]:
        """Read up to the first line of ``event``; fail if the pipe ends first."""
        while True:
            for record in self.seen:
                if record["event"] == event:
                    return record
            if not await self._read():
                raise AssertionError(f"no {event!r} line before the end: {[r['event'] for r in self.seen]}")

    async def rest(self) -> list[dict[str, Any]]:
        while await self._read():
            pass
        return self.seen

    async def _read(self) -> bool:
        chunk = await self._stream.receive_some()
        self._buffer += chunk
        *complete, self._buffer = self._buffer.split(b"\n")
        self.seen.extend(json.loads(line) for line in complete if line.strip())
        return bool(chunk)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["INT", "TERM"])
async def test_cli_stopped_by_a_signal_closes_with_1001_logs_and_says_one_line(
    backend: BackendFactory, frames: Callable[..., Path], signum: signal.Signals, code: int
) -> None:
    state = await backend(ok_every=2)
    env = cli_env(BACKEND_WS_BASE=f"ws://127.0.0.1:{state.port}/ws/", FPS="10", CAIRED_LOG_FORMAT="json")
    with trio.fail_after(30):
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "caired", "stream", str(frames(40))],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        try:
            out = Lines(proc.stdout)
            await out.until("response")  # streaming, 4 s of frames to go
            proc.send_signal(signum)
            lines = await out.rest()
            err = b""
            while chunk := await proc.stderr.receive_some():
                err += chunk
            assert await proc.wait() == code
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await trio.testing.wait_all_tasks_blocked()  # the backend has read all the child sent before exiting
    seen = state.sessions[0]
    assert seen.close_code == 1001 and seen.end is None and not seen.finished
    [cancelled] = [line for line in lines if line["event"] == "session_cancelled"]
    assert cancelled["level"] == "warning"
    assert cancelled["datapt_id"] == seen.datapt_id
    assert cancelled["frames_sent"] == len(seen.frames) < 40 and cancelled["frames_total"] == 40
    assert lines[-1] == cancelled
    assert one_line_error(err) == (
        f"caired stream: stopped by {signum.name} after sending {len(seen.frames)} of 40 frames; "
        f"the connection was closed as going away (datapt_id {seen.datapt_id})"
    )
