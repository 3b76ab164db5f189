"""The daemon end to end against the strict local backend on 127.0.0.1, and the backoff under MockClock.

Most scenarios run ``serve`` in-process (fast, inspectable); signals, kill -9, two daemons on
one spool, log rotation and systemd notifications run ``python -m caired run`` as a child.
Waits poll the spool with short sleeps under overall deadlines; nothing here asserts how
fast anything is, except the required "SIGTERM exits within 10 s".
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from caired import logging as clog
from caired.config import Config, RetryConfig
from caired.daemon import serve, status_line
from caired.emulator.server import BackendOptions, BackendState, Faults, SessionSeen, serve_backend
from caired.errors import BackendUnavailable, KeyRejected, Retry, SessionError, SpoolError
from caired.lifecycle import Context
from caired.protocol import UUID4_RE
from caired.spool import Spool
from caired.systemd import Notifier
from caired.uplink import Gate
from tests.conftest import SECRET_KEY, T0, BackendFactory, cli_env, make_config, write_frames

# --- helpers --------------------------------------------------------------------------------------------------


def stems(index: int, count: int) -> list[str]:
    """The frame timestamps of folder ``index``: distinct per folder, so backend sessions map to folders."""
    return [f"{T0 + 1000 * index + i / 30:.7f}" for i in range(count)]


def make_folder(where: Path, index: int, count: int, *, age: float | None = 3600.0) -> Path:
    """A folder of ``count`` frames; with ``age``, every mtime that far back (a folder written earlier)."""
    write_frames(where, count, start=T0 + 1000 * index, seed=index)
    if age is not None:
        past = time.time() - age
        for path in [*where.iterdir(), where]:
            os.utime(path, (past, past))
    return where


def drop(spool: Path, name: str, index: int, count: int = 8, *, age: float | None = 3600.0) -> Path:
    """Drop a folder the recommended way: written beside the spool, then ``mv`` (one rename) into incoming/."""
    staging = make_folder(spool.parent / "staging" / name, index, count, age=age)
    (spool / "incoming").mkdir(parents=True, exist_ok=True)
    return staging.rename(spool / "incoming" / name)


def names_in(spool: Path, where: str) -> list[str]:
    folder = spool / where
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


def sessions_of(state: BackendState, index: int) -> list[SessionSeen]:
    first = stems(index, 1)[0]
    return [s for s in state.sessions if s.frames and s.frames[0].timestamp == first]


def check_done(spool: Path, name: str, index: int, count: int, state: BackendState) -> dict[str, Any]:
    """done/<name> holds a whole result.json that agrees with what the strict backend saw."""
    folder = spool / "done" / name
    result: dict[str, Any] = json.loads((folder / "result.json").read_text())
    session = json.loads((folder / ".caired-session.json").read_text())
    assert result["session"] == name
    assert UUID4_RE.match(result["datapt_id"]) and result["datapt_id"] == session["datapt_id"]
    assert result["attempts"] >= 1 and result["attempts"] == session["attempts"]
    assert result["frames_sent"] == count and result["frames_skipped"] == 0
    assert result["started_at"].endswith("Z") and result["started_at"] <= result["ended_at"]
    assert result["finished"]["state"] == "finished"
    hr = result["finished"]["inference"]["hr"]
    assert result["hr"] == (float(hr) if hr >= 0 else None)
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".caired-tmp")]
    seen = sessions_of(state, index)
    assert seen, f"the backend never saw {name}"
    assert {s.datapt_id for s in seen} == {result["datapt_id"]}  # one datapt_id across every attempt
    assert state.violations == []
    finished = [s for s in seen if s.finished]
    assert finished and finished[-1].answers[-1] == result["finished"]  # the final message, entire
    assert [f.timestamp for f in finished[-1].frames] == stems(index, count)  # the whole folder, in order
    return result


def log_lines(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a JSON-lines log (each must parse: none half-written or interleaved)."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def check_log(lines: list[dict[str, Any]], state: BackendState) -> None:
    """Each line is complete and tagged; every answer the backend sent is logged whole under its session."""
    for line in lines:
        assert {"timestamp", "level", "event"} <= set(line), line
        if line["event"] in ("response", "session_started", "session_retry", "session_finished", "folder_done",
                             "folder_failed", "folder_released"):
            assert line["source"] == "drop" and UUID4_RE.match(line["datapt_id"]) and line["session"], line
            assert isinstance(line["attempt"], int) and line["attempt"] >= 1, line
    logged = [(line["datapt_id"], line["response"]) for line in lines if line["event"] == "response"]
    for seen in state.sessions:
        for answer in seen.answers:
            assert (seen.datapt_id, answer) in logged, answer
    assert SECRET_KEY not in json.dumps(lines)


async def until(predicate: Callable[[], Any], what: str, within: float = 30.0) -> None:
    """Poll ``predicate`` until it holds; fail after ``within`` seconds saying what did not happen."""
    try:
        with trio.fail_after(within):
            while True:
                if predicate():
                    return
                await trio.sleep(0.05)
    except trio.TooSlowError:
        raise AssertionError(f"timed out after {within:g} s waiting for {what}") from None


def spool_env(spool: Path, **extra: str) -> dict[str, str]:
    env = {
        "CAIRED_SPOOL_DIR": str(spool),
        "CAIRED_SPOOL_SETTLE_SECONDS": "0.3",
        "CAIRED_SPOOL_RESCAN_SECONDS": "1",
        "FPS": "0",
        "API_KEY": SECRET_KEY,
    }
    env.update(extra)
    return env


def daemon_config(port: int, spool: Path, **extra: str) -> Config:
    return make_config(port, **spool_env(spool, **extra))


@asynccontextmanager
async def running(cfg: Config, **options: Any) -> AsyncIterator[Context]:
    """The daemon in this process, logging to ``cfg.log.file``; cancelled (like SIGTERM) on exit."""
    clog.configure(cfg)
    async with trio.open_nursery() as nursery:
        daemon: Context = await nursery.start(partial(serve, cfg, notifier=Notifier(None), **options))
        try:
            yield daemon
        finally:
            nursery.cancel_scope.cancel()


def child_env(port: int, spool: Path, **extra: str) -> dict[str, str]:
    return cli_env(
        BACKEND_WS_BASE=f"ws://127.0.0.1:{port}/ws/",
        CAIRED_RETRY_INITIAL="0.05",
        CAIRED_RETRY_MAX="0.2",
        CAIRED_LOG_FORMAT="json",
        **spool_env(spool, **extra),
    )


@asynccontextmanager
async def child(env: dict[str, str], out: Path) -> AsyncIterator[trio.Process]:
    """``python -m caired run`` with stdout appended to ``out`` (stderr beside it); killed if still running."""
    with out.open("ab") as stdout, out.with_suffix(".stderr").open("ab") as stderr:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "caired", "run"], env=env, stdout=stdout, stderr=stderr
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.move_on_after(10, shield=True):
            await proc.wait()


async def ready(out: Path, proc: trio.Process, *, count: int = 1) -> None:
    def seen() -> bool:
        assert proc.returncode is None, out.with_suffix(".stderr").read_text()
        return sum(line["event"] == "daemon_ready" for line in log_lines(out)) >= count

    await until(seen, "daemon_ready")


async def stop(proc: trio.Process, signum: int = signal.SIGTERM) -> tuple[int, float]:
    """Signal the child; its exit code and how long it took to exit."""
    started = time.monotonic()
    proc.send_signal(signum)
    with trio.fail_after(30):
        code = await proc.wait()
    return code, time.monotonic() - started


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


# --- dropping, readiness, outcomes ------------------------------------------------------------------------------


async def test_folders_dropped_three_ways_are_streamed_whole_and_every_answer_is_logged(
    backend: BackendFactory, spool: Path, tmp_path: Path
) -> None:
    state = await backend(api_key=SECRET_KEY, ok_every=3)
    log = tmp_path / "caired.log"
    cfg = daemon_config(state.port, spool, CAIRED_SPOOL_SETTLE_SECONDS="1", CAIRED_LOG_FILE=str(log))
    async with running(cfg):
        # 1. mv of a folder written earlier
        drop(spool, "moved", 0, 8)
        # 2. written in place, then the .ready marker
        marked = make_folder(spool / "incoming" / "marked", 1, 8, age=None)
        (marked / ".ready").touch()
        # 3. a slow copy (cp -a style: old mtimes, fresh ctimes) taking longer than a rescan (1 s),
        #    one file every 0.25 s, well within settle_seconds / 2
        source = make_folder(tmp_path / "camera" / "copied", 2, 14)
        target = spool / "incoming" / "copied"
        target.mkdir()
        for frame in sorted(source.iterdir()):
            shutil.copy2(frame, target / frame.name)
            await trio.sleep(0.25)
        await until(lambda: len(names_in(spool, "done")) == 3, "three folders in done/")
    assert names_in(spool, "done") == ["copied", "marked", "moved"]
    assert names_in(spool, "incoming") == names_in(spool, "active") == names_in(spool, "failed") == []
    for name, index, count in (("moved", 0, 8), ("marked", 1, 8), ("copied", 2, 14)):
        result = check_done(spool, name, index, count, state)
        assert result["attempts"] == 1
        assert len(sessions_of(state, index)) == 1  # never streamed half-way, then again
    assert len(state.sessions) == 3 and all(s.finished and s.close_code == 1000 for s in state.sessions)
    lines = log_lines(log)
    check_log(lines, state)
    assert sum(len(s.answers) for s in state.sessions) == sum(line["event"] == "response" for line in lines)
    events = [line["event"] for line in lines]
    for event in ("daemon_ready", "folder_claimed", "session_started", "session_finished", "folder_done"):
        assert event in events


async def test_the_marker_makes_a_folder_ready_and_an_unmarked_fresh_folder_waits(
    backend: BackendFactory, spool: Path
) -> None:
    state = await backend(api_key=SECRET_KEY)
    cfg = daemon_config(state.port, spool, CAIRED_SPOOL_SETTLE_SECONDS="60")
    async with running(cfg):
        make_folder(spool / "incoming" / "unmarked", 0, 5, age=None)
        (make_folder(spool / "incoming" / "marked", 1, 5, age=None) / ".ready").touch()
        await until(lambda: names_in(spool, "done") == ["marked"], "the marked folder in done/")
        await trio.sleep(1.5)  # past a rescan: the unmarked folder, written seconds ago, is not complete yet
        assert names_in(spool, "incoming") == ["unmarked"]
    assert len(state.sessions) == 1
    check_done(spool, "marked", 1, 5, state)


async def test_at_most_max_sessions_stream_at_once_oldest_first(
    backend: BackendFactory, spool: Path, tmp_path: Path
) -> None:
    state = await backend(api_key=SECRET_KEY)
    ages = {"e": 500.0, "c": 400.0, "a": 300.0, "d": 200.0, "b": 100.0}  # not alphabetical
    for index, (name, age) in enumerate(ages.items()):
        drop(spool, name, index, 10, age=age)
    log = tmp_path / "caired.log"
    cfg = daemon_config(state.port, spool, FPS="40", CAIRED_SPOOL_MAX_SESSIONS="2", CAIRED_LOG_FILE=str(log))
    most_streaming = most_open = 0
    async with running(cfg) as daemon:
        with trio.fail_after(30):
            while len(names_in(spool, "done")) < 5:
                most_streaming = max(most_streaming, len(daemon.sessions.in_flight))
                most_open = max(most_open, sum(s.close_code is None for s in state.sessions))
                await trio.sleep(0.01)
    assert most_streaming == 2 and most_open <= 2
    claimed = [line["session"] for line in log_lines(log) if line["event"] == "folder_claimed"]
    assert claimed == list(ages)  # oldest first
    for index, name in enumerate(ages):
        check_done(spool, name, index, 10, state)


@pytest.mark.parametrize(("code", "reason"), [(1009, "too big"), (1007, "refused our messages")])
async def test_permanent_failures_go_to_failed_and_the_daemon_goes_on(
    backend: BackendFactory, spool: Path, code: int, reason: str
) -> None:
    state = await backend(api_key=SECRET_KEY, faults=Faults(close_after=3, close_code=code, close_times=1))
    junk = spool / "incoming" / "junk"
    junk.mkdir(parents=True)
    for stem in stems(9, 2):
        (junk / f"{stem}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    past = time.time() - 900
    os.utime(junk, (past, past))
    drop(spool, "big", 0, 8, age=600)
    drop(spool, "good", 1, 8, age=300)
    log = spool.parent / "caired.log"
    cfg = daemon_config(state.port, spool, CAIRED_SPOOL_MAX_SESSIONS="1", CAIRED_SPOOL_KEEP_FRAMES="false",
                        CAIRED_LOG_FILE=str(log))
    async with running(cfg) as daemon:
        await until(lambda: names_in(spool, "done") == ["good"], "the good folder in done/")
        # The folder lands in done/ a moment before its session counts itself finished.
        await until(lambda: daemon.sessions.finished == 1, "the session counted")
        assert daemon.sessions.failed == 2 and daemon.sessions.finished == 1
    assert names_in(spool, "failed") == ["big", "junk"]
    big = json.loads((spool / "failed" / "big" / "error.json").read_text())
    assert big["close_code"] == code and reason in big["reason"] and big["attempts"] == 1
    assert big["session"] == "big" and big["datapt_id"] == sessions_of(state, 0)[0].datapt_id
    assert len(list((spool / "failed" / "big").glob("*.png"))) == 8  # a failed folder keeps its frames
    no_frames = json.loads((spool / "failed" / "junk" / "error.json").read_text())
    assert "no usable frame" in no_frames["reason"] and no_frames["close_code"] is None
    assert len(state.sessions) == 2  # junk never connected; big was not retried
    check_done(spool, "good", 1, 8, state)
    done = spool / "done" / "good"
    assert not list(done.glob("*.png")) and (done / "result.json").exists()  # keep_frames = false
    lines = log_lines(log)
    check_log(lines, state)
    failed = [line for line in lines if line["event"] == "session_failed"]
    assert [(line["session"], line["close_code"]) for line in failed] == [("big", code)]
    assert sorted(line["session"] for line in lines if line["event"] == "folder_failed") == ["big", "junk"]


async def test_a_folder_the_spool_cannot_claim_does_not_stop_the_daemon(
    backend: BackendFactory, spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = await backend(api_key=SECRET_KEY)
    real_claim = Spool.claim
    refusals: list[str] = []

    def flaky_claim(self: Spool, name: str, *, source: str = "drop") -> Any:
        if name == "stuck" and len(refusals) < 2:
            refusals.append(name)
            raise SpoolError(f"cannot claim {name}: Permission denied; check the spool's permissions")
        return real_claim(self, name, source=source)

    monkeypatch.setattr(Spool, "claim", flaky_claim)
    drop(spool, "stuck", 0, 5, age=600)
    drop(spool, "fine", 1, 5, age=300)
    async with running(daemon_config(state.port, spool), spool_retry=0.5):
        await until(lambda: names_in(spool, "done") == ["fine", "stuck"], "both folders in done/")
    assert len(refusals) == 2
    check_done(spool, "stuck", 0, 5, state)
    check_done(spool, "fine", 1, 5, state)


async def test_a_result_that_cannot_be_written_gives_the_folder_back_without_hammering(
    backend: BackendFactory, spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = await backend(api_key=SECRET_KEY)
    real_finish = Spool.finish
    refused_at: list[float] = []

    def finish(self: Spool, claim: Any, result: Any) -> Any:
        if len(refused_at) < 3:  # the disk is full for three tries
            refused_at.append(time.monotonic())
            raise SpoolError("cannot write result.json: No space left on device; free space")
        return real_finish(self, claim, result)

    monkeypatch.setattr(Spool, "finish", finish)
    drop(spool, "full", 0, 5)
    async with running(daemon_config(state.port, spool), spool_retry=0.5):
        await until(lambda: names_in(spool, "done") == ["full"], "the folder in done/")
    # Given back and left alone for spool_retry each time, not streamed again at once.
    gaps = [b - a for a, b in itertools.pairwise(refused_at)]
    assert len(gaps) == 2 and min(gaps) >= 0.5
    result = check_done(spool, "full", 0, 5, state)
    assert result["attempts"] == len(state.sessions) == 4


# --- the backend misbehaving -------------------------------------------------------------------------------------


async def test_outage_refusals_drops_and_garbage_end_with_every_folder_done_once(
    nursery: trio.Nursery, spool: Path, tmp_path: Path, unused_port: int
) -> None:
    log = tmp_path / "caired.log"
    cfg = daemon_config(unused_port, spool, CAIRED_SPOOL_MAX_SESSIONS="2", CAIRED_LOG_FILE=str(log))
    names = ["p", "q", "r", "s"]
    async with running(cfg) as daemon:
        for index, name in enumerate(names):
            drop(spool, name, index, 9)
        await until(lambda: len(names_in(spool, "active")) == 2, "two claimed folders")
        await until(lambda: daemon.gate.handshakes >= 4, "the backend tried while down")  # retried, never failed
        outage_handshakes = daemon.gate.handshakes
        assert daemon.gate.state == "down" and names_in(spool, "failed") == []
        assert len(names_in(spool, "active")) == 2
        faults = Faults(refuse_handshakes=2, drop_after=3, drop_times=2, garbage_every=4)
        options = BackendOptions(api_key=SECRET_KEY, faults=faults)
        state: BackendState = await nursery.start(partial(serve_backend, options, port=unused_port))
        await until(lambda: len(names_in(spool, "done")) == 4, "every folder in done/", within=40)
    assert outage_handshakes >= 4
    assert names_in(spool, "done") == names and names_in(spool, "failed") == []
    for index, name in enumerate(names):
        check_done(spool, name, index, 9, state)
        assert sum(s.finished for s in sessions_of(state, index)) == 1
    # 2 refused + 4 sessions + 2 dropped connections: nothing wasted beyond the faults
    assert state.handshakes == 8
    assert len({s.datapt_id for s in state.sessions}) == 4
    lines = log_lines(log)
    check_log(lines, state)
    kinds = [line["response_kind"] for line in lines if line["event"] == "response"]
    assert kinds.count("text") == kinds.count("binary") >= 4  # garbage recorded, not fatal
    retried = [line for line in lines if line["event"] == "session_retry"]
    assert retried and all(line["session"] in names for line in retried)
    last_attempts = {line["session"]: line["attempt"] for line in lines if line["event"] == "response"}
    for name in names:
        result = json.loads((spool / "done" / name / "result.json").read_text())
        assert last_attempts[name] == result["attempts"]


async def test_a_finished_that_never_comes_is_a_failed_attempt_then_retried(
    backend: BackendFactory, spool: Path
) -> None:
    state = await backend(api_key=SECRET_KEY, faults=Faults(withhold_finished=1))
    drop(spool, "late", 0, 6)
    async with running(daemon_config(state.port, spool, CAIRED_BACKEND_FINISH_TIMEOUT="0.5")):
        await until(lambda: names_in(spool, "done") == ["late"], "the folder in done/")
    result = check_done(spool, "late", 0, 6, state)
    assert result["attempts"] == 2
    first, second = state.sessions
    assert first.end is not None and not first.finished and second.finished


@pytest.mark.parametrize("wrong", ["key", "path"])
async def test_a_rejected_key_is_probed_rarely_and_keeps_the_folders(
    backend: BackendFactory, spool: Path, tmp_path: Path, wrong: str
) -> None:
    state = await backend(api_key=SECRET_KEY)
    log = tmp_path / "caired.log"
    overrides = {"API_KEY": "wrong-key-0123"} if wrong == "key" else {
        "BACKEND_WS_BASE": f"ws://127.0.0.1:{state.port}/wrong/"}
    cfg = daemon_config(state.port, spool, CAIRED_RETRY_REJECTED_PROBE="1", CAIRED_LOG_FILE=str(log),
                        CAIRED_SPOOL_MAX_SESSIONS="1", **overrides)
    drop(spool, "one", 0, 5)
    drop(spool, "two", 1, 5)
    async with running(cfg) as daemon:
        await until(lambda: state.handshakes >= 3, "three probes of the rejected key")
        rejected = state.handshakes
        assert daemon.gate.state == "rejected"
        assert names_in(spool, "active") == ["one"] and names_in(spool, "incoming") == ["two"]
        claimed = json.loads((spool / "active" / "one" / ".caired-session.json").read_text())
    assert names_in(spool, "failed") == names_in(spool, "done") == []
    assert names_in(spool, "incoming") == ["one", "two"]  # given back on shutdown, datapt_id kept
    session = json.loads((spool / "incoming" / "one" / ".caired-session.json").read_text())
    assert session["datapt_id"] == claimed["datapt_id"] and session["attempts"] >= rejected
    lines = log_lines(log)
    # It keeps probing, but only every rejected_probe (1 s), never at once.
    retried = [datetime.fromisoformat(line["timestamp"]) for line in lines if line["event"] == "session_retry"]
    assert len(retried) >= 2
    assert all((b - a).total_seconds() >= 0.95 for a, b in itertools.pairwise(retried))
    # A wrong path is told apart from a wrong key: the fixes differ.
    expected = "backend_rejected_key" if wrong == "key" else "backend_wrong_path"
    loud = [line for line in lines if line["event"] in ("backend_rejected_key", "backend_wrong_path")]
    assert loud and loud[0]["event"] == expected and loud[0]["level"] == "error"
    assert "wrong-key-0123" not in log.read_text()


# --- signals, crashes, several daemons (python -m caired run) --------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_stop_signal_closes_with_1001_gives_the_folder_back_and_exits_0(
    backend: BackendFactory, spool: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    state = await backend(api_key=SECRET_KEY)
    drop(spool, "slow", 0, 60)
    out = tmp_path / "out.jsonl"
    async with child(child_env(state.port, spool, FPS="20"), out) as proc:
        await until(lambda: state.sessions and len(state.sessions[0].frames) >= 5, "a session under way")
        code, seconds = await stop(proc, signum)
    print(f"{signum.name}: exit {code} after {seconds:.2f} s")
    assert code == 0 and seconds < 10
    first = state.sessions[0]
    await until(lambda: first.close_code is not None, "the backend to see the close")
    assert first.close_code == 1001 and not first.finished
    back = spool / "incoming" / "slow"
    session = json.loads((back / ".caired-session.json").read_text())
    assert session["datapt_id"] == first.datapt_id and session["attempts"] == 1
    assert (back / ".ready").exists()
    assert names_in(spool, "active") == names_in(spool, "done") == []
    events = [line["event"] for line in log_lines(out)]
    assert events.index("daemon_stopping") < events.index("folder_released") < events.index("daemon_stopped")
    assert not out.with_suffix(".stderr").read_text()

    async with child(child_env(state.port, spool), out) as proc:
        await until(lambda: names_in(spool, "done") == ["slow"], "the folder in done/ after the restart")
        assert (await stop(proc))[0] == 0
    result = check_done(spool, "slow", 0, 60, state)
    assert result["datapt_id"] == first.datapt_id and result["attempts"] == 2
    assert len(state.sessions) == 2
    check_log(log_lines(out), state)


async def test_kill_9_at_random_moments_loses_and_duplicates_nothing(
    backend: BackendFactory, spool: Path, tmp_path: Path
) -> None:
    state = await backend(api_key=SECRET_KEY)
    names = [f"k{i}" for i in range(8)]
    for index, name in enumerate(names):
        drop(spool, name, index, 16)
    out = tmp_path / "out.jsonl"
    # The kills here are the test's, not the folders' doing: a folder cut off three times
    # would otherwise be quarantined as a crash loop (test_a_folder_that_keeps_killing_caired_is_quarantined).
    env = child_env(state.port, spool, FPS="25", CAIRED_SPOOL_MAX_SESSIONS="2", CAIRED_SPOOL_MAX_CRASHES="0")
    rng = random.Random(9)
    rounds = []
    for round_ in range(8):
        async with child(env, out) as proc:
            await ready(out, proc, count=round_ + 1)
            await trio.sleep(rng.uniform(0.0, 1.2))
            proc.kill()
            await proc.wait()
        rounds.append((len(names_in(spool, "done")), len(state.sessions)))
    async with child(env, out) as proc:
        await until(lambda: len(names_in(spool, "done")) == 8, "every folder in done/", within=40)
        assert (await stop(proc))[0] == 0
    cut = sum(1 for s in state.sessions if not s.finished)
    print(f"kill -9 rounds (done, backend sessions): {rounds}; {cut} sessions cut off mid-stream")
    assert names_in(spool, "done") == names  # each exactly once: no k0.1
    assert names_in(spool, "incoming") == names_in(spool, "active") == names_in(spool, "failed") == []
    ids = set()
    for index, name in enumerate(names):
        ids.add(check_done(spool, name, index, 16, state)["datapt_id"])
    assert len(ids) == 8
    assert {s.datapt_id for s in state.sessions if s.datapt_id} == ids


async def test_two_daemons_on_one_spool_stream_each_folder_once(
    backend: BackendFactory, spool: Path, tmp_path: Path
) -> None:
    state = await backend(api_key=SECRET_KEY)
    outs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    async with child(child_env(state.port, spool, FPS="30"), outs[0]) as one, \
            child(child_env(state.port, spool, FPS="30"), outs[1]) as two:
        await ready(outs[0], one)
        await ready(outs[1], two)
        names = [f"t{i:02d}" for i in range(16)]
        for index, name in enumerate(names):
            drop(spool, name, index, 8)
        await until(lambda: len(names_in(spool, "done")) == 16, "every folder in done/", within=40)
        assert (await stop(one))[0] == 0 and (await stop(two))[0] == 0
    assert names_in(spool, "done") == names
    assert len(state.sessions) == 16 and len(state.finished_sessions()) == 16
    assert len({s.datapt_id for s in state.sessions}) == 16
    for index, name in enumerate(names):
        check_done(spool, name, index, 8, state)
    claims = [[line["session"] for line in log_lines(out) if line["event"] == "folder_claimed"] for out in outs]
    print(f"two daemons: {len(claims[0])} + {len(claims[1])} claims")
    assert sorted(claims[0] + claims[1]) == names and claims[0] and claims[1]


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGHUP])  # logrotate's; a reload's
async def test_log_rotation_loses_no_line(
    backend: BackendFactory, spool: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    state = await backend(api_key=SECRET_KEY, ok_every=3)
    log, rotated, out = tmp_path / "caired.log", tmp_path / "caired.log.1", tmp_path / "out.jsonl"
    for index, name in enumerate(["r0", "r1", "r2"]):
        drop(spool, name, index, 30, age=900 - 100 * index)
    env = child_env(state.port, spool, FPS="30", CAIRED_SPOOL_MAX_SESSIONS="1", CAIRED_LOG_FILE=str(log))
    async with child(env, out) as proc:
        await until(lambda: state.sessions and len(state.sessions[0].answers) >= 3, "answers arriving")
        log.rename(rotated)  # what logrotate does, then it sends SIGUSR2
        proc.send_signal(signum)
        await until(lambda: any(line["event"] == "log_reopened" for line in log_lines(log)), "the new log file")
        await until(lambda: len(names_in(spool, "done")) == 3, "every folder in done/")
        assert (await stop(proc))[0] == 0
    old, new = log_lines(rotated), log_lines(log)
    assert old + new == log_lines(out)  # stdout got every line: the two files hold them all, once, whole
    assert any(line["event"] == "response" for line in old) and any(line["event"] == "response" for line in new)
    check_log(old + new, state)
    assert sum(len(s.answers) for s in state.sessions) == sum(line["event"] == "response" for line in old + new)


def received(sock: socket.socket) -> list[tuple[float, str]]:
    out = []
    while True:
        try:
            out.append((time.monotonic(), sock.recv(4096).decode()))
        except BlockingIOError:
            return out


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    assert len(path) < 100, path  # sun_path limit
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    yield sock, path
    sock.close()


async def test_systemd_ready_status_watchdog_stopping(
    backend: BackendFactory, spool: Path, tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    state = await backend(api_key=SECRET_KEY)
    # Two folders whose daemon died: one mid-stream, one after writing result.json but before the move.
    for name, index in (("orphan", 0), ("finished", 1)):
        folder = make_folder(spool / "active" / name, index, 6)
        (folder / ".caired-session.json").write_text(json.dumps(
            {"datapt_id": f"2a0c4c2e-6b1f-4f7e-9d3a-00000000000{index}", "attempts": 1,
             "first_claimed_at": "", "source": "drop", "name": name}))
    (spool / "active" / "finished" / "result.json").write_text('{"session": "finished"}')
    out = tmp_path / "out.jsonl"
    messages: list[tuple[float, str]] = []

    async def collect() -> None:  # stamp each datagram as it arrives
        while True:
            await trio.lowlevel.wait_readable(sock)
            messages.extend(received(sock))

    def sent() -> list[str]:
        return [m for _, m in messages]

    env = child_env(state.port, spool, NOTIFY_SOCKET=path, WATCHDOG_USEC="2000000")
    async with trio.open_nursery() as nursery, child(env, out) as proc:
        nursery.start_soon(collect)
        await until(lambda: "READY=1\n" in sent(), "READY=1", within=30)
        at_ready = {where: names_in(spool, where) for where in ("active", "done")}
        drop(spool, "new", 2, 6)
        await until(lambda: any("done 3" in m and "incoming 0" in m and "streaming 0" in m for m in sent()),
                    "STATUS= with three folders done")
        await trio.sleep(max(0.0, 4.5 - (time.monotonic() - messages[0][0])))  # a few watchdog periods
        code, _ = await stop(proc)
        await until(lambda: "STOPPING=1\n" in sent(), "STOPPING=1")
        nursery.cancel_scope.cancel()
    assert code == 0
    texts = sent()
    # READY=1 only after recovery: the finished orphan had already been filed in done/
    assert "finished" in at_ready["done"] and "finished" not in at_ready["active"]
    assert texts.index("READY=1\n") < texts.index("STOPPING=1\n")
    statuses = [m for m in texts if m.startswith("STATUS=")]
    assert len(set(statuses)) >= 2 and "backend up" in statuses[-1]
    pings = [t for t, m in messages if m == "WATCHDOG=1\n"]
    assert len(pings) >= 4
    assert max(b - a for a, b in itertools.pairwise(pings)) < 2.0  # within WATCHDOG_USEC
    assert texts.index("STOPPING=1\n") > texts.index(next(m for m in texts if "done 3" in m))
    assert names_in(spool, "done") == ["finished", "new", "orphan"]
    orphan = check_done(spool, "orphan", 0, 6, state)
    assert orphan["datapt_id"] == "2a0c4c2e-6b1f-4f7e-9d3a-000000000000" and orphan["attempts"] == 2
    recovered = next(line for line in log_lines(out) if line["event"] == "daemon_starting")["recovered"]
    assert recovered == 2


def test_status_line_counts_folders_and_the_backend() -> None:
    line = status_line({"incoming": 3, "active": 1, "done": 7, "failed": 2}, "rejected", streaming=1)
    assert line == "streaming 1 · incoming 3 · done 7 · failed 2 · backend rejected"


# --- the backoff, under MockClock -------------------------------------------------------------------------------


def gate(rng: Callable[[], float] = lambda: 1.0, **retry: float) -> Gate:
    config = {"initial": 1.0, "max": 60.0, "multiplier": 2.0, "rejected_probe": 300.0, **retry}
    return Gate(RetryConfig(**config), rng=rng)  # type: ignore[arg-type]


def unavailable() -> BackendUnavailable:
    return BackendUnavailable("refused", connected=False)


def test_delay_grows_exponentially_up_to_the_cap() -> None:
    assert [gate().delay(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert [gate(initial=0.5, multiplier=3, max=10).delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.5, 4.5, 10]


def test_delay_is_full_jitter_between_zero_and_the_ceiling() -> None:
    assert gate(lambda: 0.0).delay(5) == 0.0
    assert gate(lambda: 0.25).delay(3) == 1.0
    rng = random.Random(7)
    samples = [gate(rng.random).delay(3) for _ in range(2000)]
    assert all(0.0 <= s <= 4.0 for s in samples)
    assert min(samples) < 0.1 and max(samples) > 3.9 and 1.8 < sum(samples) / len(samples) < 2.2


def test_slow_factor_for_servers_asking_for_time() -> None:
    assert gate().delay(1, slow=True) == 4.0
    assert gate().delay(10, slow=True) == 240.0  # the cap grows by the same factor


async def test_failed_attempts_back_off_and_a_success_resets(autojump_clock: trio.testing.MockClock) -> None:
    g = gate()
    delays = []
    for _ in range(4):
        delays.append(g.failed(unavailable()))
        assert g.state == "down" and g.next_attempt == trio.current_time() + delays[-1]
        async with g.attempt():
            assert trio.current_time() == g.next_attempt
    assert delays == [1, 2, 4, 8]
    g.succeeded()
    assert (g.failures, g.next_attempt, g.state) == (0, 0.0, "up")
    assert g.failed(SessionError("closed with 1011", close_code=1011)) == 1  # from the start again
    assert g.state == "up"  # it was connected: the backend is not down
    assert g.failed(SessionError("closed with 1013", close_code=1013, retry=Retry.SLOW)) == 8  # 2 * 4


async def test_a_rejected_key_is_probed_only_every_rejected_probe(autojump_clock: trio.testing.MockClock) -> None:
    g = gate(rejected_probe=300.0)
    start = trio.current_time()
    with capture_logs() as logs:
        for n in range(1, 4):
            assert g.failed(KeyRejected("HTTP 403", connected=False)) == 300.0
            async with g.attempt():
                assert trio.current_time() == start + 300.0 * n
    assert g.state == "rejected" and g.failures == 0
    assert [e["log_level"] for e in logs if e["event"] == "backend_rejected_key"] == ["error"]  # once, loudly


@pytest.mark.parametrize(("state", "most"), [("down", 1), ("unknown", 1), ("up", 3)])
async def test_one_prober_at_a_time_while_the_backend_is_not_up(
    autojump_clock: trio.testing.MockClock, state: str, most: int
) -> None:
    g = gate()
    g.state = state  # type: ignore[assignment]
    inside = highest = 0

    async def session() -> None:
        nonlocal inside, highest
        async with g.attempt():
            inside += 1
            highest = max(highest, inside)
            await trio.sleep(1)
            inside -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(session)
    assert highest == most and g.handshakes == 3
    assert trio.current_time() == (3.0 if most == 1 else 1.0)


async def two_sessions_probing(g: Gate, *, before_failing: float) -> list[float]:
    """Two sessions, three attempts each, every attempt rejected ``before_failing`` s in; their probe times."""
    probes: list[float] = []

    async def session() -> None:
        for _ in range(3):
            try:
                async with g.attempt():
                    probes.append(trio.current_time())
                    await trio.sleep(before_failing)
                    raise KeyRejected("rejected", close_code=1008 if before_failing else None,
                                      connected=bool(before_failing))
            except KeyRejected:
                await trio.lowlevel.checkpoint()  # deliver() then closes the attempt's frame pipeline

    async with trio.open_nursery() as nursery:
        nursery.start_soon(session)
        nursery.start_soon(session)
    return probes


async def test_the_next_prober_waits_for_the_backoff_of_the_failed_probe(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two sessions whose handshakes are refused (HTTP 403): each failure is recorded before the other goes."""
    probes = await two_sessions_probing(gate(rejected_probe=10.0), before_failing=0.0)
    assert len(probes) == 6 and all(b - a >= 10.0 for a, b in itertools.pairwise(probes))


async def test_a_key_rejected_after_the_handshake_is_probed_by_one_session_at_a_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """close 1008 right after the handshake, before any answer (a wrong path, or a backend checking the key late)."""
    probes = await two_sessions_probing(gate(rejected_probe=10.0), before_failing=0.01)
    assert len(probes) == 6 and all(b - a >= 10.0 for a, b in itertools.pairwise(probes))


async def test_once_the_backend_answers_the_other_sessions_go_at_once(autojump_clock: trio.testing.MockClock) -> None:
    g = gate()
    entered: list[float] = []

    async def session() -> None:
        async with g.attempt() as turn:
            entered.append(trio.current_time())
            await trio.sleep(0.5)
            turn.admitted()  # the first answer
            await trio.sleep(10)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(session)
    assert entered == [0.0, 0.5, 0.5] and g.state == "up"


async def test_a_permanent_failure_does_not_back_off(autojump_clock: trio.testing.MockClock) -> None:
    g = gate()
    with pytest.raises(SessionError):
        async with g.attempt():
            raise SessionError("closed with 1009", close_code=1009, retry=Retry.NEVER)
    assert (g.failures, g.next_attempt, g.last_delay) == (0, 0.0, 0.0)
