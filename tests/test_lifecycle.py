"""One session's life in the daemon: the error boundary, and sessions that can never succeed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from caired.emulator.server import Faults
from caired.sources import FolderSource
from tests.conftest import BackendFactory
from tests.test_daemon import check_done, daemon_config, drop, log_lines, names_in, running, until


async def test_a_bug_in_one_session_fails_that_folder_only(
    backend: BackendFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = await backend()
    spool = tmp_path / "spool"
    log = tmp_path / "caired.log"
    real_prepare = FolderSource.prepare

    async def prepare(self: FolderSource) -> None:
        if self.label == "cursed":
            raise RuntimeError("a bug nobody foresaw")
        await real_prepare(self)

    monkeypatch.setattr(FolderSource, "prepare", prepare)
    drop(spool, "cursed", 0, 4)
    drop(spool, "good", 1, 4)
    async with running(daemon_config(state.port, spool, CAIRED_LOG_FILE=str(log))) as ctx:
        await until(lambda: names_in(spool, "failed") == ["cursed"] and names_in(spool, "done") == ["good"],
                    "one folder failed, the other done")
        drop(spool, "after", 2, 4)  # the daemon goes on
        await until(lambda: "after" in names_in(spool, "done"), "a folder dropped after the bug")
        await until(lambda: ctx.sessions.finished == 2, "its session counted")  # a moment after the move
        assert ctx.sessions.failed == 1 and ctx.sessions.finished == 2
    error = json.loads((spool / "failed" / "cursed" / "error.json").read_text())
    assert error["error_type"] == "RuntimeError" and error["reason"] == "a bug nobody foresaw"
    assert error["caired_version"] and error["attempts"] == 0
    check_done(spool, "good", 1, 4, state)
    [bug] = [line for line in log_lines(log) if line["event"] == "internal_error"]
    assert bug["level"] == "error" and "Traceback" in bug["exception"] and bug["session"] == "cursed"
    [failed] = [line for line in log_lines(log) if line["event"] == "folder_failed"]
    assert failed["level"] == "error" and failed["reason"] == "a bug nobody foresaw"


async def test_a_session_the_backend_keeps_failing_ends_in_failed_without_slowing_the_others(
    backend: BackendFactory, tmp_path: Path
) -> None:
    """1011 after the backend took the session: tried [retry] session_attempts times, then filed;
    the shared backoff (every other session's) does not grow for it."""
    state = await backend(faults=Faults(close_after=2, close_code=1011, close_times=3))
    spool = tmp_path / "spool"
    log = tmp_path / "caired.log"
    drop(spool, "poison", 0, 6)
    cfg = daemon_config(state.port, spool, CAIRED_LOG_FILE=str(log), CAIRED_RETRY_SESSION_ATTEMPTS="3",
                        CAIRED_SPOOL_MAX_SESSIONS="1")
    async with running(cfg) as ctx:
        await until(lambda: names_in(spool, "failed") == ["poison"], "the folder in failed/")
        assert ctx.gate.failures == 0  # the backend is up: nobody else waits for this folder
        drop(spool, "next", 1, 6)
        await until(lambda: names_in(spool, "done") == ["next"], "the next folder streamed")
    error = json.loads((spool / "failed" / "poison" / "error.json").read_text())
    assert error["attempts"] == 3 and "gave up after 3 failures" in error["reason"] and error["close_code"] == 1011
    session = json.loads((spool / "failed" / "poison" / ".caired-session.json").read_text())
    assert session["in_attempt"] is False and session["crashes"] == 0
    retries = [line for line in log_lines(log) if line["event"] == "session_retry"]
    assert len(retries) == 2 and all(line["level"] == "warning" for line in retries)


async def test_connection_failures_never_count_toward_session_attempts(
    backend: BackendFactory, tmp_path: Path
) -> None:
    state = await backend(faults=Faults(drop_after=2, drop_times=4))  # TCP dropped: 1006, the backend's side
    spool = tmp_path / "spool"
    drop(spool, "flaky", 0, 6)
    cfg = daemon_config(state.port, spool, CAIRED_RETRY_SESSION_ATTEMPTS="2")
    async with running(cfg):
        await until(lambda: names_in(spool, "done") == ["flaky"], "the folder done after 4 drops")
    assert json.loads((spool / "done" / "flaky" / "result.json").read_text())["attempts"] == 5
    await trio.lowlevel.checkpoint()
