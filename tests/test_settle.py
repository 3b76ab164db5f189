"""What a scan remembers: ready folders are not looked into again while unchanged, and the
tally of folders follows this process's moves instead of walking the spool."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caired import fsops
from caired import spool as spool_module
from caired.settle import READY_MARKER, Settler
from caired.spool import Spool
from tests.conftest import FakeClock
from tests.test_spool import drop, make_folder


@pytest.fixture
def looks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the folders a scan looks into (opens)."""
    seen: list[str] = []
    real = fsops.opened_dir

    def counting(name: str | Path, *, dir_fd: int | None = None) -> Iterator[int]:
        seen.append(str(name))
        return real(name, dir_fd=dir_fd)

    monkeypatch.setattr(spool_module.fsops, "opened_dir", counting)
    return seen


def test_a_ready_folder_is_not_looked_into_again_while_unchanged(
    spool: Spool, clock: FakeClock, looks: list[str]
) -> None:
    for name in ("a", "b", "c"):
        drop(spool, name)
    clock.advance(2)  # the folders' mtimes are a tick older than the look
    first = spool.scan().ready
    assert sorted(looks) == ["a", "b", "c"]
    looks.clear()
    for _ in range(3):
        assert spool.scan().ready == first  # same order: oldest first
    assert looks == []


def test_a_folder_judged_in_the_tick_it_changed_is_looked_into_again(
    spool: Spool, looks: list[str]
) -> None:
    drop(spool, "fresh")  # mtime: now
    assert spool.scan().ready == ["fresh"]
    assert spool.scan().ready == ["fresh"]
    assert looks == ["fresh", "fresh"]  # not trusted yet: a change in the same tick would not show


def test_a_ready_folder_that_changes_is_looked_into_again(spool: Spool, clock: FakeClock, looks: list[str]) -> None:
    folder = drop(spool, "x")
    (folder / READY_MARKER).unlink()
    clock.advance(60)
    assert spool.scan().ready == ["x"]  # quiet for a minute
    looks.clear()
    (folder / "late.png").write_bytes(b"a frame written after all")  # the folder's mtime moves
    clock.advance(1)
    scan = spool.scan()
    assert looks == ["x"]
    assert scan.ready == [] and scan.settle_in == pytest.approx(5.0)  # quiet since this look saw the change


def test_a_folder_replaced_under_the_same_name_is_looked_into_again(
    spool: Spool, clock: FakeClock, looks: list[str]
) -> None:
    drop(spool, "x")
    clock.advance(2)
    assert spool.scan().ready == ["x"]
    os.rename(spool.incoming / "x", spool.tmp / "old-x")
    folder = make_folder(spool.incoming / "x")  # another folder, still being written
    old = os.stat(spool.tmp / "old-x").st_mtime_ns
    os.utime(folder, ns=(old, old))  # even with the same mtime: another inode
    looks.clear()
    scan = spool.scan()
    assert looks == ["x"] and scan.ready == []


def test_the_rescan_looks_into_every_folder_again(spool: Spool, clock: FakeClock, looks: list[str]) -> None:
    drop(spool, "a")
    drop(spool, "b")
    clock.advance(2)
    spool.scan()
    looks.clear()
    spool.forget_readiness()
    assert spool.scan().ready == ["a", "b"]
    assert sorted(looks) == ["a", "b"]


def test_what_a_scan_remembers_is_bounded_by_the_folders_present(spool: Spool, clock: FakeClock) -> None:
    for i in range(20):
        drop(spool, f"f{i}")
    make_folder(spool.incoming / "settling")
    clock.advance(2)
    spool.scan()
    assert spool._readiness.remembered() == (20, 1)
    for i in range(20):
        claim = spool.claim(f"f{i}")
        assert claim is not None
        spool.finish(claim, {"hr": 60.0})
    os.rename(spool.incoming / "settling", spool.tmp / "settling")
    spool.scan()
    assert spool._readiness.remembered() == (0, 0)


def test_a_cached_name_another_daemon_claimed_is_a_lost_race(spool: Spool, clock: FakeClock) -> None:
    drop(spool, "shared")
    clock.advance(2)
    assert spool.scan().ready == ["shared"]
    assert spool.scan().ready == ["shared"]  # now from what the scan remembers
    other = Spool(spool.root)
    taken = other.claim("shared")
    assert taken is not None
    assert spool.claim("shared") is None  # no error: the other daemon was first
    assert spool.scan().ready == []
    assert spool._readiness.remembered() == (0, 0)
    other.finish(taken, {"hr": 61.0})


def test_the_settler_remembers_a_digest_not_the_listing(tmp_path: Path) -> None:
    folder = make_folder(tmp_path / "big", frames=200)
    settler = Settler(5.0, clock=lambda: 0.0)
    with fsops.opened_dir(folder) as fd:
        settler.wait(fd, "big")
    [look] = settler._looks.values()
    assert isinstance(look.signature, int)


# --- the same verdicts as a fresh look, whatever happens in between -----------------------------------------------

_OPS = st.lists(
    st.tuples(st.sampled_from(["drop_ready", "drop_unready", "mark", "unmark", "add_frame", "remove", "replace",
                               "claim", "rescan"]),
              st.integers(0, 3)),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_remembered_verdicts_match_a_fresh_look(tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]
                                                ) -> None:
    """Readiness here comes from the marker only (settling takes a day), so a spool that
    remembers nothing says exactly which folders are ready. Each change is given a new mtime
    a second later, as a change on a real clock would."""
    root = tmp_path_factory.mktemp("spool")
    clock = FakeClock(offset=10_000)
    spool = Spool(root, settle_seconds=86_400, clock=clock)
    spool.prepare()
    tick = [int((clock.now - 5_000) * 1e9)]

    def touched(folder: Path) -> None:
        tick[0] += 1_000_000_000
        os.utime(folder, ns=(tick[0], tick[0]))

    serial = 0
    for op, i in ops:
        name = f"f{i}"
        folder = spool.incoming / name
        exists = folder.is_dir()
        if op in ("drop_ready", "drop_unready") and not exists:
            make_folder(folder, frames=2)
            if op == "drop_ready":
                (folder / READY_MARKER).touch()
            touched(folder)
        elif op == "mark" and exists:
            (folder / READY_MARKER).touch()
            touched(folder)
        elif op == "unmark" and exists and (folder / READY_MARKER).exists():
            (folder / READY_MARKER).unlink()
            touched(folder)
        elif op == "add_frame" and exists:
            (folder / f"{serial}.png").write_bytes(b"frame")
            serial += 1
            touched(folder)
        elif op == "remove" and exists:
            serial += 1
            os.rename(folder, spool.tmp / f"gone-{serial}")
        elif op == "replace" and exists:
            serial += 1
            before = folder.stat().st_mtime_ns
            os.rename(folder, spool.tmp / f"gone-{serial}")
            make_folder(folder, frames=1)
            os.utime(folder, ns=(before, before))  # same name, same mtime, another folder
        elif op == "claim" and exists:
            claim = Spool(root).claim(name)
            if claim is not None:
                claim._close()
                os.rename(root / "active" / claim.folder, spool.tmp / f"claimed-{serial}")
                serial += 1
        elif op == "rescan":
            spool.forget_readiness()
        fresh = Spool(root, settle_seconds=86_400, clock=clock)
        assert sorted(spool.scan().ready) == sorted(fresh.scan().ready)
        fresh.close()
    spool.close()


# --- the tally ---------------------------------------------------------------------------------------------------


def test_counts_follow_this_process_without_walking_the_spool(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    drop(spool, "a")
    drop(spool, "b")
    drop(spool, "c")
    assert spool.counts() == {"incoming": 3, "active": 0, "done": 0, "failed": 0}
    walked: list[object] = []
    real = os.scandir

    def scandir(path: object = ".") -> object:
        walked.append(path)
        return real(path)  # type: ignore[call-overload]

    monkeypatch.setattr(spool_module.os, "scandir", scandir)
    a, b, c = (spool.claim(n) for n in "abc")
    assert a is not None and b is not None and c is not None
    assert spool.counts() == {"incoming": 0, "active": 3, "done": 0, "failed": 0}
    spool.finish(a, {"hr": 60.0})
    spool.fail(b, {"reason": "no face"})
    spool.release(c)
    walked.clear()
    assert spool.counts() == {"incoming": 1, "active": 0, "done": 1, "failed": 1}
    assert walked == []
    tally = spool.tally()
    assert tally.done_bytes > 0 and tally.failed_bytes > 0


def test_scans_and_rescans_refresh_incoming_and_active(spool: Spool) -> None:
    assert spool.counts()["incoming"] == 0
    drop(spool, "late")  # a dropper: no move of ours
    spool.scan()
    assert spool.counts()["incoming"] == 1
    claim = Spool(spool.root).claim("late")  # another daemon
    assert claim is not None
    spool.recover()  # alive elsewhere: nothing moved, but counted
    spool.scan()
    assert spool.counts() == {"incoming": 0, "active": 1, "done": 0, "failed": 0}


# --- the ready queue asks for a scan when a scan's names are all taken ---------------------------------------------


async def test_a_drained_queue_asks_the_watcher_to_look_again_once(autojump_clock: object) -> None:
    from caired.watch import Ready

    asked: list[int] = []
    ready = Ready()
    ready.on_drained = lambda: asked.append(1)
    ready.update(["a", "b"])
    assert [ready.take(), ready.take()] == ["a", "b"] and asked == []
    assert ready.take() is None and asked == [1]  # ran dry: more may have come meanwhile
    assert ready.take() is None and asked == [1]  # asked once, not on every look
    ready.update([])
    assert ready.take() is None and asked == [1]  # an empty scan asks for nothing: no busy loop
    ready.update(["c"])
    ready.hold_back(ready.take() or "", 10.0)
    assert ready.take() is None and asked == [1]  # a name held back is not a dry queue


async def _watch_with_fake_events(
    monkeypatch: pytest.MonkeyPatch, waiting: int, event_times: list[float], until: float
) -> list[float]:
    """Run the watcher on virtual time with inotify events at ``event_times`` and every scan
    finding ``waiting`` folders ready; returns the times of the scans."""
    import functools
    from types import SimpleNamespace

    import trio
    import watchfiles

    from caired import watch as watch_module
    from caired.spool import Scan
    from caired.watch import Ready, watch

    send, receive = trio.open_memory_channel[None](0)

    def fake_awatch(*args: object, stop_event: object, **kwargs: object) -> object:
        async def changes() -> object:
            stop_event.is_set()  # type: ignore[attr-defined]  # established
            async for _ in receive:
                yield {(watchfiles.Change.added, "x")}

        return changes()

    scans: list[float] = []

    async def look(spool: object, *, recover: bool) -> Scan:
        scans.append(trio.current_time())
        return Scan([f"f{i}" for i in range(waiting)], None)

    monkeypatch.setattr(watchfiles, "awatch", fake_awatch)
    monkeypatch.setattr(watch_module, "_look", look)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(watch, SimpleNamespace(incoming=Path("/nowhere")), Ready(),
                                              rescan_seconds=1000.0))
        for at in event_times:
            await trio.sleep_until(start + at)
            await send.send(None)
        await trio.sleep_until(start + until)
        nursery.cancel_scope.cancel()
    return [t - start for t in scans]


async def test_with_a_backlog_events_wait_for_the_gap_after_the_last_scan(
    autojump_clock: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from caired.watch import DEEP_QUEUE, DEEP_QUEUE_GAP

    assert DEEP_QUEUE_GAP == 5.0
    scans = await _watch_with_fake_events(monkeypatch, DEEP_QUEUE, [1.0, 2.0, 3.0, 7.0], until=20.0)
    assert scans == [0.0, 5.0, 10.0]  # three events grouped into one scan; the next waits for its gap


async def test_with_few_waiting_an_event_is_scanned_at_once(
    autojump_clock: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from caired.watch import DEEP_QUEUE

    scans = await _watch_with_fake_events(monkeypatch, DEEP_QUEUE - 1, [1.0, 2.0, 3.0], until=20.0)
    assert scans == [0.0, 1.0, 2.0, 3.0]
