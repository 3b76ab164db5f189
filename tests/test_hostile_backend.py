"""A hostile backend cannot take a session down: each fault of the local backend, against a real session.

Each test streams a folder with ``caired.session.deliver`` against the local backend on
127.0.0.1 with one fault switched on, and checks the outcome the protocol's table asks
for: the attempt survives what it can record (deep nesting, huge messages, floods,
binary, ``finished`` twice), or ends with a SessionError, retried or not as the close
code says; never with any other exception.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from structlog.testing import capture_logs

from caired import attempt, uplink
from caired.config import Config
from caired.emulator.server import BackendState, Faults
from caired.errors import SessionError
from caired.protocol import new_datapt_id
from caired.session import Delivered, Limits, deliver
from caired.sources import FolderSource
from caired.uplink import Gate
from tests.conftest import BackendFactory, make_config

FRAMES = 8


async def deliver_folder(cfg: Config, directory: Path, *, attempts: int = 3) -> Delivered:
    async with FolderSource(directory, cfg, trio.CapacityLimiter(2), follow_symlinks=False) as source:
        await source.prepare()
        with trio.fail_after(60):
            return await deliver(source, cfg=cfg, gate=Gate(cfg.retry), name=directory.name,
                                 datapt_id=new_datapt_id(), limits=Limits(attempts=attempts))


async def run(backend: BackendFactory, directory: Path, faults: Faults, *, attempts: int = 3,
              **env: str) -> tuple[BackendState, Delivered | SessionError, list[dict[str, Any]]]:
    """One session against a backend with ``faults``; the outcome (a result or its SessionError) and the log."""
    state = await backend(faults=faults, estimate=False, ok_every=3)
    cfg = make_config(state.port, FPS="0", **env)
    outcome: Delivered | SessionError
    with capture_logs() as logs:
        try:
            outcome = await deliver_folder(cfg, directory, attempts=attempts)
        except SessionError as err:  # anything else fails the test
            outcome = err
    return state, outcome, logs


def responses(logs: list[dict[str, Any]], kind: str | None = None) -> list[Any]:
    return [e["response"] for e in logs if e["event"] == "response" and kind in (None, e["response_kind"])]


def assert_finished_first_time(state: BackendState, outcome: Delivered | SessionError, fault: str) -> Delivered:
    assert isinstance(outcome, Delivered), outcome
    assert outcome.attempts == 1 and len(state.sessions) == 1
    assert state.sessions[0].finished and state.violations == []
    assert fault in state.sessions[0].hostile  # the fault did fire
    assert outcome.finished.sent == FRAMES
    return outcome


async def test_a_message_nested_5000_deep_is_recorded_and_the_session_goes_on(
    backend: BackendFactory, frames: Callable[..., Path]
) -> None:
    state, outcome, logs = await run(backend, frames(FRAMES), Faults(deep_nesting=5000))
    assert_finished_first_time(state, outcome, "deep_nesting")
    [deep] = responses(logs, "invalid")
    assert deep["invalid"] == "nested deeper than 64 levels" and deep["chars"] > 10000


async def test_a_large_message_within_bounds_is_logged_whole_and_the_session_goes_on(
    backend: BackendFactory, frames: Callable[..., Path]
) -> None:
    """Within the one bound (MAX_ANSWER) every answer is parsed and logged whole: a large
    'finished' must never be missed; past it, the connection refuses it (1009, below)."""
    state, outcome, logs = await run(backend, frames(FRAMES), Faults(huge_message=3 * 1024 * 1024))
    assert_finished_first_time(state, outcome, "huge_message")
    [huge] = [r for r in responses(logs, "json") if "padding" in r]
    assert len(huge["padding"]) == 3 * 1024 * 1024 and huge["state"] == "ok"


async def test_a_burst_of_messages_within_bounds_is_drained_and_logged_and_the_session_goes_on(
    backend: BackendFactory, frames: Callable[..., Path]
) -> None:
    state, outcome, logs = await run(backend, frames(FRAMES), Faults(flood=1000))
    delivered = assert_finished_first_time(state, outcome, "flood")
    oks = [r for r in responses(logs, "json") if r["state"] == "ok"]
    assert len(oks) == 1000 + FRAMES // 3  # every one recorded: the burst and the regular answers
    assert delivered.finished.answers == len(responses(logs))


async def test_a_flood_past_the_bound_ends_the_attempt_with_1008(
    backend: BackendFactory, frames: Callable[..., Path]
) -> None:
    bound = attempt.ANSWER_ALLOWANCE + attempt.ANSWERS_PER_FRAME * FRAMES
    state, outcome, logs = await run(backend, frames(FRAMES), Faults(flood=3000), attempts=2)
    assert isinstance(outcome, Delivered) and outcome.attempts == 2  # the flood was the first connection's
    assert [s.close_code for s in state.sessions] == [1008, 1000]  # told why, as the protocol says
    [retry] = [e for e in logs if e["event"] == "session_retry"]
    assert f"more than {bound} messages" in retry["reason"]
    assert len(responses(logs)) <= bound + 1 + FRAMES  # what the flood could cost is bounded


async def test_binary_messages_are_recorded_by_length(backend: BackendFactory, frames: Callable[..., Path]) -> None:
    state, outcome, logs = await run(backend, frames(FRAMES), Faults(binary_every=2))
    assert_finished_first_time(state, outcome, "binary_every")
    assert responses(logs, "binary") == [{"binary_bytes": 256}] * (FRAMES // 2)


async def test_finished_twice_is_harmless(backend: BackendFactory, frames: Callable[..., Path]) -> None:
    state, outcome, logs = await run(backend, frames(FRAMES), Faults(finished_twice=True))
    delivered = assert_finished_first_time(state, outcome, "finished_twice")
    assert delivered.finished.message == state.sessions[0].answers[-1]
    assert [e["event"] for e in logs].count("session_finished") == 1


async def test_invalid_utf8_fails_that_connection_and_the_session_is_retried(
    backend: BackendFactory, frames: Callable[..., Path]
) -> None:
    """RFC 6455 8.1: text that is not UTF-8 fails the connection (wsproto sends 1007); the next one is clean.

    Garbage from a backend that accepted the session is retried (issue 11, item 3), like 1011.
    """
    state, outcome, logs = await run(backend, frames(FRAMES), Faults(invalid_utf8=True, hostile_times=1))
    assert isinstance(outcome, Delivered), outcome
    assert outcome.attempts == 2 and len(state.sessions) == 2
    assert state.sessions[0].hostile == ["invalid_utf8"] and not state.sessions[0].finished
    assert state.sessions[1].finished
    [retry] = [e for e in logs if e["event"] == "session_retry"]
    assert retry["close_code"] in (1006, 1007)


async def test_invalid_utf8_on_every_connection_ends_with_a_session_error(
    backend: BackendFactory, frames: Callable[..., Path]
) -> None:
    state, outcome, _ = await run(backend, frames(FRAMES), Faults(invalid_utf8=True, hostile_times=99), attempts=2)
    assert isinstance(outcome, SessionError), outcome
    assert state.sessions and not any(s.finished for s in state.sessions)
    assert all(s.hostile == ["invalid_utf8"] for s in state.sessions)


async def test_close_1009_fails_the_session_at_once_without_retrying(
    backend: BackendFactory, frames: Callable[..., Path]
) -> None:
    state, outcome, logs = await run(backend, frames(FRAMES), Faults(close_after=3, close_code=1009, close_times=9),
                                     attempts=5)
    assert isinstance(outcome, SessionError), outcome
    assert outcome.permanent and outcome.close_code == 1009
    assert len(state.sessions) == 1
    assert not [e for e in logs if e["event"] == "session_retry"]
    [failed] = [e for e in logs if e["event"] == "session_failed"]
    assert failed["close_code"] == 1009 and failed["attempts"] == 1


@pytest.mark.parametrize("code", [4000, 4321, 4999])
async def test_an_application_close_code_is_retried(
    backend: BackendFactory, frames: Callable[..., Path], code: int
) -> None:
    state, outcome, logs = await run(backend, frames(FRAMES), Faults(close_after=3, close_code=code, close_times=1))
    assert isinstance(outcome, Delivered), outcome
    assert outcome.attempts == 2 and len(state.sessions) == 2
    assert state.sessions[0].close_code == code and state.sessions[1].finished
    [retry] = [e for e in logs if e["event"] == "session_retry"]
    assert retry["close_code"] == code


async def test_an_application_close_code_every_time_ends_with_a_session_error(
    backend: BackendFactory, frames: Callable[..., Path]
) -> None:
    state, outcome, _ = await run(backend, frames(FRAMES), Faults(close_after=3, close_code=4000, close_times=9),
                                  attempts=3)
    assert isinstance(outcome, SessionError) and not outcome.permanent and outcome.close_code == 4000
    assert len(state.sessions) == 3


async def test_a_message_over_the_clients_limit_ends_the_attempt_and_does_not_blame_our_frames(
    backend: BackendFactory, frames: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``max_message_size`` trio-websocket closes with 1009 itself: the backend's message is too big, not ours."""
    monkeypatch.setattr(uplink, "MAX_MESSAGE", 1024 * 1024)
    _, outcome, _ = await run(backend, frames(FRAMES), Faults(huge_message=2 * 1024 * 1024, hostile_times=9),
                                  attempts=2)
    assert isinstance(outcome, SessionError), outcome
    assert outcome.close_code == 1009
    assert "frame" not in outcome.reason, outcome.reason


def test_caired_backend_takes_every_hostile_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from caired import cli
    from caired.emulator import server

    seen: list[Faults] = []
    kept: list[int | None] = []

    async def serve(options: Any, **kwargs: Any) -> None:
        seen.append(options.faults)
        kept.append(kwargs["state"].keep)

    monkeypatch.setattr(server, "serve_backend", serve)
    code = cli.main(["backend", "--deep-nesting", "5000", "--huge-message", "9000000", "--flood", "100",
                     "--invalid-utf8", "--binary-every", "4", "--finished-twice", "--hostile-after", "3",
                     "--hostile-times", "2", "--close-after", "5", "--close-code", "4321", "--log-format", "json"])
    assert code == 0
    assert seen == [Faults(deep_nesting=5000, huge_message=9000000, flood=100, invalid_utf8=True, binary_every=4,
                           finished_twice=True, hostile_after=3, hostile_times=2, close_after=5, close_code=4321)]
    assert kept == [server.KEEP_SESSIONS]  # a backend left running does not remember every connection


@pytest.mark.parametrize("code", ["1005", "1006", "1015", "999", "5000", "abc"])
def test_caired_backend_refuses_a_close_code_no_close_frame_may_carry(
    code: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from caired import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(["backend", "--close-code", code])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --close-code" in err and len(err.strip().splitlines()) == 1
