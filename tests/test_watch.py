"""The watcher: inotify events and timers become one scan each, and scans the ready queue."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing
import watchfiles

from caired import watch as watch_module
from caired.settle import READY_MARKER
from caired.spool import Spool
from caired.watch import Ready, watch
from tests.test_spool import _die_holding, make_folder


def drop(spool: Spool, name: str) -> None:
    staged = make_folder(spool.tmp / name, 3)
    (staged / READY_MARKER).touch()
    os.rename(staged, spool.incoming / name)


class CountingSpool(Spool):
    scans = 0

    def scan(self) -> Any:
        self.scans += 1
        return super().scan()


def spool_at(tmp_path: Path, settle: float = 0.0) -> CountingSpool:
    s = CountingSpool(tmp_path / "spool", settle_seconds=settle)
    s.prepare()
    return s


async def started(nursery: trio.Nursery, s: Spool, ready: Ready, rescan: float = 60) -> None:
    await nursery.start(lambda task_status: watch(s, ready, rescan_seconds=rescan, task_status=task_status))
    with trio.fail_after(2):
        while ready.scans == 0:
            await ready.wait()


async def next_ready(ready: Ready, within: float) -> str:
    with trio.fail_after(within):
        while (name := ready.take()) is None:
            await ready.wait()
    return name


# --- the ready queue, on virtual time -------------------------------------------------------------------------


async def test_ready_hands_out_names_oldest_first_and_each_once(autojump_clock: trio.testing.MockClock) -> None:
    ready = Ready()
    ready.update(["a", "b"])
    assert [ready.take(), ready.take(), ready.take()] == ["a", "b", None]
    ready.update(["c"])  # a new scan replaces the queue
    assert ready.take() == "c"


async def test_a_held_back_name_waits_its_time_and_wakes_the_waiter(autojump_clock: trio.testing.MockClock) -> None:
    ready = Ready()
    ready.update(["bad", "good"])
    assert ready.take() == "bad"
    ready.hold_back("bad", 10.0)
    assert ready.take() == "good"
    assert ready.take() is None
    start = trio.current_time()
    await ready.wait()  # nothing new: wakes when "bad" may be tried again
    assert trio.current_time() - start == 10.0
    assert ready.take() == "bad"


async def test_a_scan_forgets_held_back_names_that_are_gone(autojump_clock: trio.testing.MockClock) -> None:
    ready = Ready()
    ready.update(["bad"])
    ready.hold_back(ready.take() or "", 10.0)
    ready.update([])
    with trio.move_on_after(100) as scope:
        await ready.wait()
    assert scope.cancelled_caught  # no timer left for a folder that is no longer there


# --- the watcher, against the real filesystem and inotify -----------------------------------------------------


async def test_a_folder_moved_in_is_ready_after_one_scan(tmp_path: Path) -> None:
    s = spool_at(tmp_path)
    ready = Ready()
    async with trio.open_nursery() as nursery:
        await started(nursery, s, ready)
        before = s.scans
        drop(s, "new")
        assert await next_ready(ready, within=1.5) == "new"
        assert s.scans == before + 1  # one scan per poke: taking from the queue does not scan again
        nursery.cancel_scope.cancel()


async def test_watch_stops_promptly_when_cancelled(tmp_path: Path) -> None:
    s = spool_at(tmp_path)
    async with trio.open_nursery() as nursery:
        await started(nursery, s, Ready())
        await trio.sleep(0.3)  # the watcher thread is waiting for changes
        nursery.cancel_scope.cancel()
        cancelled_at = trio.current_time()
    assert trio.current_time() - cancelled_at < 1.0


def _quiet_awatch(*args: Any, stop_event: Any, **kwargs: Any) -> AsyncIterator[set[Any]]:
    """A watcher that is established and then sees nothing: only timers can scan."""

    async def generator() -> AsyncIterator[set[Any]]:
        stop_event.is_set()  # the first look at the flag says "established"
        await trio.to_thread.run_sync(stop_event._stop.wait)
        return
        yield set()

    return generator()


async def test_rescans_run_without_events(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watchfiles, "awatch", _quiet_awatch)
    s = spool_at(tmp_path)
    ready = Ready()
    async with trio.open_nursery() as nursery:
        await started(nursery, s, ready, rescan=0.2)
        drop(s, "unseen")  # no event will tell
        assert await next_ready(ready, within=2) == "unseen"
        nursery.cancel_scope.cancel()


async def test_rescan_recovers_orphans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watchfiles, "awatch", _quiet_awatch)
    s = spool_at(tmp_path)
    drop(s, "orphan")
    claim = Spool(s.root).claim("orphan")
    assert claim is not None
    _die_holding(s, claim)
    ready = Ready()
    async with trio.open_nursery() as nursery:
        await started(nursery, s, ready)
        assert ready.take() == "orphan"  # the first scan recovers first
        nursery.cancel_scope.cancel()


async def test_a_settling_folder_is_ready_once_settled(tmp_path: Path) -> None:
    s = spool_at(tmp_path, settle=0.5)
    ready = Ready()
    async with trio.open_nursery() as nursery:
        await started(nursery, s, ready)
        make_folder(s.incoming / "copied")  # written in place: must settle
        start = trio.current_time()
        assert await next_ready(ready, within=3) == "copied"
        assert trio.current_time() - start >= 0.45
        nursery.cancel_scope.cancel()


async def test_watch_falls_back_to_polling_without_inotify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> AsyncIterator[set[Any]]:
        async def generator() -> AsyncIterator[set[Any]]:
            raise OSError(errno.ENOSPC, "OS file watch limit reached")
            yield set()

        return generator()

    monkeypatch.setattr(watchfiles, "awatch", broken)
    monkeypatch.setattr(watch_module, "POLL_SECONDS", 0.1)
    s = spool_at(tmp_path)
    ready = Ready()
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await started(nursery, s, ready)
            drop(s, "late")
            assert await next_ready(ready, within=1) == "late"
            nursery.cancel_scope.cancel()
    assert [e["event"] for e in logs].count("spool_watch_polling") == 1


async def test_a_watcher_that_raises_anything_falls_back_to_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name watchfiles cannot decode (or a bug in it) must not end the daemon."""

    def undecodable(*args: Any, stop_event: Any, **kwargs: Any) -> AsyncIterator[set[Any]]:
        async def generator() -> AsyncIterator[set[Any]]:
            stop_event.is_set()
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
            yield set()

        return generator()

    monkeypatch.setattr(watchfiles, "awatch", undecodable)
    monkeypatch.setattr(watch_module, "POLL_SECONDS", 0.1)
    s = spool_at(tmp_path)
    ready = Ready()
    async with trio.open_nursery() as nursery:
        await started(nursery, s, ready)
        drop(s, "after")
        assert await next_ready(ready, within=1) == "after"
        nursery.cancel_scope.cancel()
