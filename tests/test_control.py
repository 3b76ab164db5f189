"""caired retry-now: the Gate ends its backoff wait at once; the daemon hears the control file and SIGUSR1."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio
import trio.testing

from caired import queue
from caired.config import RetryConfig
from caired.control import RetryFile, serve_retry_requests
from caired.emulator.server import Faults
from caired.errors import BackendUnavailable, KeyRejected
from caired.uplink import Gate
from tests.conftest import SECRET_KEY, BackendFactory
from tests.test_daemon import child, child_env, drop, log_lines, ready, stop, until


def gate() -> Gate:
    return Gate(RetryConfig(initial=100.0, max=100.0, rejected_probe=300.0), rng=lambda: 1.0)


async def poke_at(g: Gate, when: float) -> None:
    await trio.sleep_until(when)
    g.retry_now()


async def test_retry_now_ends_the_gate_backoff_at_once(autojump_clock: trio.testing.MockClock) -> None:
    g = gate()
    start = trio.current_time()
    assert g.failed(BackendUnavailable("refused", connected=False)) == 100.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poke_at, g, start + 7.0)
        async with g.attempt():
            assert trio.current_time() == start + 7.0
    # The failure count is kept: the next failure backs off from where it was.
    assert g.failures == 1 and g.failed(BackendUnavailable("refused", connected=False)) == 100.0


async def test_retry_now_ends_the_wait_after_a_rejected_key(autojump_clock: trio.testing.MockClock) -> None:
    g = gate()
    start = trio.current_time()
    g.failed(KeyRejected("HTTP 403", connected=False))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poke_at, g, start + 30.0)
        async with g.attempt():
            assert trio.current_time() == start + 30.0


async def test_retry_now_ends_a_session_own_backoff(autojump_clock: trio.testing.MockClock) -> None:
    g = gate()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poke_at, g, start + 2.5)
        await g.backoff(start + 50.0)
        assert trio.current_time() == start + 2.5
    await g.backoff(start + 10.0)  # without a request, the wait is whole
    assert trio.current_time() == start + 10.0


async def test_a_cancelled_backoff_leaves_the_gate_as_it_was(autojump_clock: trio.testing.MockClock) -> None:
    g = gate()
    start = trio.current_time()
    g.failed(BackendUnavailable("refused", connected=False))
    with trio.move_on_after(5.0):
        async with g.attempt():
            raise AssertionError("the wait was cancelled first")
    assert g.next_attempt == start + 100.0
    async with g.attempt():  # the probe was let go: the next attempt waits its turn, then goes
        assert trio.current_time() == start + 100.0


def test_the_control_file_asks_once_per_write(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    queue.retry_now(tmp_path)  # there before the daemon started: asks nothing
    requests = RetryFile(incoming)
    assert not requests.changed()
    queue.retry_now(tmp_path)
    assert requests.changed()
    assert not requests.changed()
    queue.retry_now(tmp_path)
    assert requests.changed()
    (incoming / queue.RETRY_FILE).unlink()
    assert not requests.changed()
    queue.retry_now(tmp_path)
    assert requests.changed()


async def test_the_daemon_task_turns_a_write_into_retry_now(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    g = gate()
    g.failed(BackendUnavailable("refused", connected=False))
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_retry_requests, incoming, g)
        await trio.to_thread.run_sync(queue.retry_now, tmp_path)
        with trio.fail_after(10):
            async with g.attempt():
                pass
        nursery.cancel_scope.cancel()


async def test_caired_retry_now_and_sigusr1_reach_a_daemon_waiting_out_an_outage(
    backend: BackendFactory, tmp_path: Path
) -> None:
    state = await backend(api_key=SECRET_KEY, faults=Faults(refuse_handshakes=1000, refuse_status=503))
    spool, out = tmp_path / "spool", tmp_path / "out.jsonl"
    (spool / "incoming").mkdir(parents=True)
    drop(spool, "rec", 0, 4)
    # A backoff of 10 minutes: nothing but a request makes the daemon try again within the test.
    env = {**child_env(state.port, spool), "CAIRED_RETRY_INITIAL": "600", "CAIRED_RETRY_MAX": "600"}
    async with child(env, out) as proc:
        await ready(out, proc)

        def waiting(n: int) -> bool:  # the n-th refusal is logged: the daemon now waits out its backoff
            return sum(line["event"] == "session_retry" for line in log_lines(out)) >= n

        await until(lambda: waiting(1), "the first refused handshake")
        await trio.to_thread.run_sync(queue.retry_now, spool)
        await until(lambda: state.handshakes == 2, "a handshake at once after caired retry-now")
        await until(lambda: waiting(2), "the second refusal")  # a request during an attempt has nothing to end
        proc.send_signal(signal.SIGUSR1)
        await until(lambda: state.handshakes == 3, "a handshake at once after SIGUSR1")
        assert (await stop(proc))[0] == 0
    asked = [line["by"] for line in log_lines(out) if line["event"] == "backend_retry_now"]
    assert asked == ["caired retry-now", "SIGUSR1"]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_control_file_a_dropper_wrote_is_ignored(tmp_path: Path) -> None:

    requests = RetryFile(tmp_path)
    path = tmp_path / queue.RETRY_FILE
    path.write_text("now")
    os.chown(path, 54321, 54321)  # a dropper's, not the service's user nor root
    assert not requests.changed()
    os.chown(path, os.geteuid(), os.getegid())
    os.utime(path, ns=(1, 1))
    assert requests.changed()
