"""Retention and low disk: what is deleted, in which order, what never is; the low-disk state;
a full disk at every write the spool makes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from caired import fsops
from caired import retention as retention_module
from caired.config import Amount, RetentionConfig
from caired.daemon import disk_status, serve
from caired.done_order import RESCAN_SECONDS, DoneOrder, Key
from caired.errors import SpoolError
from caired.lifecycle import Context
from caired.retention import DELETED_PREFIX, Disk, Retention, serve_retention
from caired.spool import LOCK_FILE, RESULT_FILE, SESSION_FILE, Spool, usage
from caired.systemd import Notifier
from tests.conftest import BackendFactory, make_config, write_frames, write_video
from tests.test_spool import drop, listing, lock_elsewhere

FRAME = b"\x89PNG" + bytes(8188)  # two 4 KiB blocks on most filesystems
DAY = 86400.0


class FakeFs:
    """statvfs of a filesystem of ``total`` bytes whose free space is ``free`` minus what the
    spool's frames take (so deleting frames frees space, as on a real disk)."""

    def __init__(self, root: Path, total: int, free: int) -> None:
        self.root, self.total, self.free = root, total, free

    def frames_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*.png") if not p.is_symlink())

    def __call__(self, _path: str) -> Any:
        free = self.free - self.frames_bytes()
        return SimpleNamespace(f_blocks=self.total, f_frsize=1, f_bavail=max(0, free))


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", settle_seconds=0.0)
    s.prepare()
    yield s
    s.close()


def filed(spool: Spool, name: str, *, frames: int = 4, age_days: float = 1.0, where: str = "done") -> Path:
    """A folder filed ``age_days`` ago in done/ (or failed/, incoming/, active/) with frames."""
    folder = spool.root / where / name
    folder.mkdir()
    for i in range(frames):
        (folder / f"{1747154380 + i / 30:.7f}.png").write_bytes(FRAME)
    (folder / RESULT_FILE if where == "done" else folder / "error.json").write_text('{"hr": 60}')
    (folder / LOCK_FILE).touch()
    when = time.time() - age_days * DAY
    os.utime(folder, (when, when))
    return folder


async def until(predicate: Callable[[], bool], deadline: float = 20.0) -> None:
    with trio.fail_after(deadline):
        while not predicate():  # noqa: ASYNC110 - polling the filesystem: there is no event to wait on
            await trio.sleep(0.02)


def pngs(folder: Path) -> int:
    return len(list(folder.glob("*.png")))


def make_retention(spool: Spool, fs: FakeFs | None = None, **cfg: Any) -> Retention:
    settings = {"done_max_bytes": "0", "free_space_floor": "0", "folders_max_days": 0.0, **cfg}
    config = RetentionConfig(**settings)
    disk = Disk(spool.root, config.free_space_floor, statvfs=fs or FakeFs(spool.root, 10**12, 10**12))
    retention = Retention(spool, config, disk)
    retention.measure()
    return retention


def deletions(logs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(Path(e["path"]).name, e["what"], e["why"].split(" =")[0]) for e in logs
            if e["event"] == "retention_deleted"]


# --- order -------------------------------------------------------------------------------------------------------


def test_over_the_budget_the_oldest_frames_go_first(spool: Spool) -> None:
    folders = [filed(spool, f"s{i}", age_days=10 - i) for i in range(5)]  # s0 oldest
    per_folder = 4 * 8192
    retention = make_retention(spool, done_max_bytes=str(int(per_folder * 3.2) + 5 * 4 * 4096))
    assert retention.spool.tally().done_bytes > 0
    with capture_logs() as logs:
        freed = retention.run_pass()
    # down to 90% of the budget: the two oldest folders lose their frames, nothing else does
    assert [pngs(f) for f in folders] == [0, 0, 4, 4, 4]
    assert all((f / RESULT_FILE).exists() and (f / LOCK_FILE).exists() for f in folders)
    assert deletions(logs) == [("s0", "frames", "retention.done_max_bytes"),
                               ("s1", "frames", "retention.done_max_bytes")]
    assert freed == sum(e["bytes"] for e in logs if e["event"] == "retention_deleted") >= 2 * per_folder
    # deleting frames keeps the folders' place in the order
    assert [f.stat().st_mtime for f in folders] == sorted(f.stat().st_mtime for f in folders)
    with capture_logs() as logs:
        assert retention.run_pass() == 0  # under the budget now: nothing more
    assert deletions(logs) == []


def test_whole_folders_go_only_when_no_frames_are_left(spool: Spool) -> None:
    folders = [filed(spool, f"s{i}", age_days=10 - i) for i in range(3)]
    retention = make_retention(spool, done_max_bytes="1")  # nothing fits
    with capture_logs() as logs:
        retention.run_pass()
    assert deletions(logs) == [("s0", "frames", "retention.done_max_bytes"),
                               ("s1", "frames", "retention.done_max_bytes"),
                               ("s2", "frames", "retention.done_max_bytes"),
                               ("s0", "folder", "retention.done_max_bytes"),
                               ("s1", "folder", "retention.done_max_bytes"),
                               ("s2", "folder", "retention.done_max_bytes")]
    assert not any(f.exists() for f in folders)
    assert listing(spool.tmp) == [] and listing(spool.done) == []
    assert spool.counts()["done"] == 0 and spool.tally().done_bytes == 0


def test_below_the_floor_frames_go_until_space_is_back_above_it(spool: Spool) -> None:
    folders = [filed(spool, f"s{i}", age_days=10 - i) for i in range(4)]
    fs = FakeFs(spool.root, total=10**9, free=200_000)  # 4 folders x 32 KiB of frames: 68,928 free
    retention = make_retention(spool, fs, free_space_floor="100000")
    assert retention.disk.check() is True
    with capture_logs() as logs:
        retention.run_pass()
        # 100,000 + 5% = 105,000 free wanted: two folders' frames (65,536 bytes) are enough
        assert [pngs(f) for f in folders] == [0, 0, 4, 4]
        assert retention.disk.check() is False
    assert {why for _, _, why in deletions(logs)} == {"retention.free_space_floor"}
    assert [e["event"] for e in logs].count("disk_ok") == 1


def test_frames_and_folders_past_their_age_go_on_the_long_clock(spool: Spool) -> None:
    ancient = filed(spool, "ancient", age_days=40)
    old = filed(spool, "old", age_days=10)
    recent = filed(spool, "recent", age_days=1)
    retention = make_retention(spool, frames_max_days=7.0, folders_max_days=30.0)
    with capture_logs() as logs:
        retention.run_pass()
    assert not ancient.exists()
    assert pngs(old) == 0 and (old / RESULT_FILE).exists()
    assert pngs(recent) == 4
    assert deletions(logs) == [("ancient", "folder", "retention.folders_max_days"),
                               ("old", "frames", "retention.frames_max_days")]
    filed(spool, "older still", age_days=50)
    with capture_logs() as logs:
        retention.run_pass()  # within the hour: ages are not looked at again
    assert deletions(logs) == []


# --- safety ------------------------------------------------------------------------------------------------------


def test_nothing_undelivered_or_failed_is_ever_deleted(spool: Spool) -> None:
    waiting = filed(spool, "waiting", where="incoming")
    orphan = filed(spool, "orphan", where="active")
    failed = filed(spool, "failed-one", where="failed")
    drop(spool, "streaming")
    claim = spool.claim("streaming")
    assert claim is not None
    done = filed(spool, "delivered")
    fs = FakeFs(spool.root, total=10**9, free=0)  # below any floor, for ever
    with capture_logs() as logs:
        retention = make_retention(spool, fs, done_max_bytes="1", free_space_floor="50%", frames_max_days=0.001,
                                   folders_max_days=0.001)
        retention.run_pass()
        retention.run_pass()
    assert not done.exists()
    assert pngs(waiting) == pngs(orphan) == pngs(failed) == 4 and pngs(claim.path) == 3
    assert [e["event"] for e in logs].count("retention_exhausted") == 1  # said once, not every pass
    [kept] = [e for e in logs if e["event"] == "failed_kept"]
    assert kept["folders"] == 1 and kept["bytes"] >= 4 * 8192
    spool.finish(claim, {"hr": 60.0})


@pytest.mark.parametrize("busy_is", ["oldest", "newest"])
def test_a_done_folder_still_locked_is_left_alone(spool: Spool, monkeypatch: pytest.MonkeyPatch, busy_is: str) -> None:
    busy = filed(spool, "busy", age_days=5 if busy_is == "oldest" else 3)
    other = filed(spool, "other", age_days=4)
    fd = lock_elsewhere(busy)  # another process is still filing it
    listings = count_listings(monkeypatch, give_up_after=50)  # newest: the pass once listed done/ again, forever
    try:
        retention = make_retention(spool, done_max_bytes="1")
        retention.run_pass()
        assert pngs(busy) == 4 and busy.exists()
        assert not other.exists()
    finally:
        os.close(fd)
    assert listings == ["done/"]  # the pass's one listing: the first, done/ as it is
    retention.run_pass()
    assert not busy.exists()  # let go: the next pass takes it


def test_a_folder_passed_over_while_held_keeps_its_place_in_the_order(spool: Spool) -> None:
    older = filed(spool, "older", age_days=6)
    busy = filed(spool, "busy", age_days=5)
    newer = filed(spool, "newer", age_days=4)
    fd = lock_elsewhere(busy)
    try:
        retention = make_retention(spool, done_max_bytes="1")
        retention.run_pass()
    finally:
        os.close(fd)
    assert not older.exists() and not newer.exists() and pngs(busy) == 4
    with capture_logs() as logs:
        retention.run_pass()
    # its frames first, as for any folder, not the whole folder at once because a newer one's frames went
    assert deletions(logs) == [("busy", "frames", "retention.done_max_bytes"),
                               ("busy", "folder", "retention.done_max_bytes")]


def test_a_folder_filed_late_behind_a_newer_one_still_loses_its_frames(spool: Spool) -> None:
    """Two sessions end together: the one dated first enters done/'s order second, and a pass
    runs between the two. The walk's place must go back before the late one."""
    newer = filed(spool, "newer", age_days=0.5 / DAY)  # filed half a second ago
    for frame in newer.glob("*.png"):
        frame.write_bytes(FRAME * 128)  # 1 MiB: one folder's frames are what a pass has to free
    total = make_retention(spool).spool.tally().done_bytes
    retention = make_retention(spool, done_max_bytes=str(total - 1))
    with capture_logs() as logs:
        retention.run_pass()
    assert deletions(logs) == [("newer", "frames", "retention.done_max_bytes")]
    late = filed(spool, "late")  # dated before newer, but it comes in now
    for frame in late.glob("*.png"):
        frame.write_bytes(FRAME * 128)
    older_ns = newer.stat().st_mtime_ns - 500_000_000
    os.utime(late, ns=(older_ns, older_ns))
    with fsops.opened_dir(late) as folder:
        spool.adjust_tally(done=1, done_bytes=usage(folder))
    spool.done_order.filed(older_ns, "late")  # as the spool tells it
    with capture_logs() as logs:
        retention.run_pass()
    assert deletions(logs) == [("late", "frames", "retention.done_max_bytes")]  # not the whole folder, unlooked at


def test_what_this_process_files_is_deleted_in_order_without_listing_done_again(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    retention = make_retention(spool, done_max_bytes="1")
    retention.run_pass()  # the first pass lists done/ (empty)
    listings = count_listings(monkeypatch)
    for name in ("first", "second", "third"):
        drop(spool, name)
        claim = spool.claim(name)
        assert claim is not None
        spool.finish(claim, {"hr": 60.0})
    with capture_logs() as logs:
        retention.run_pass()
    assert listings == []
    assert deletions(logs) == [(name, what, "retention.done_max_bytes")
                               for what in ("frames", "folder") for name in ("first", "second", "third")]
    assert listing(spool.done) == [] and len(spool.done_order) == 0


def test_what_others_file_or_remove_is_seen_at_the_next_listing(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [time.time()]
    order = spool.done_order = DoneOrder(spool.done, clock=lambda: now[0])
    gone = filed(spool, "removed-by-a-person", age_days=2)
    ours = filed(spool, "ours", age_days=-1 / DAY)  # dated a second from now
    retention = make_retention(spool, done_max_bytes="1000000000")
    retention.run_pass()
    assert [key for key, _ in order.walk()] == [(gone.stat().st_mtime_ns, gone.name),
                                                (ours.stat().st_mtime_ns, ours.name)]
    order.frames_gone_to = (ours.stat().st_mtime_ns, ours.name)  # as if a pass had deleted their frames
    shutil.rmtree(gone)
    filed(spool, "theirs", age_days=0)  # another daemon files a folder dated before ours, with frames
    listings = count_listings(monkeypatch)
    now[0] += retention_module.CHECK_SECONDS
    retention.run_pass()
    assert listings == [] and [key[1] for key, _ in order.walk()] == ["removed-by-a-person", "ours"]
    now[0] += RESCAN_SECONDS
    retention.run_pass()
    assert listings == ["done/"]
    assert [key[1] for key, _ in order.walk()] == ["theirs", "ours"]
    retention.cfg = attrs.evolve(retention.cfg, done_max_bytes="1")
    with capture_logs() as logs:
        retention.run_pass()
    # the walk's place went back before it: its frames first, as for any folder
    assert deletions(logs)[0] == ("theirs", "frames", "retention.done_max_bytes")


def test_past_what_the_order_keeps_each_pass_lists_done_in_growing_batches(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    # After a restart the first pass walks from the oldest folder: here 1,500 whose frames went
    # long ago, more than an order of 100 takes up.
    spool.done_order = DoneOrder(spool.done, kept=100)
    for i in range(1500):
        folder = spool.done / f"old{i:04d}"
        folder.mkdir()
        (folder / RESULT_FILE).write_text("{}")
        os.utime(folder, (time.time() - 10 * DAY + i, time.time() - 10 * DAY + i))
    newest = [filed(spool, f"new{i}", age_days=1 - i / 10) for i in range(3)]
    for folder in newest:  # frames that make up most of done/'s bytes, so that the frames of one folder are enough
        for frame in folder.glob("*.png"):
            frame.write_bytes(FRAME * 128)  # 1 MiB
    total = make_retention(spool).spool.tally().done_bytes
    retention = make_retention(spool, done_max_bytes=str(total - 1))  # 10% of it to go: 2.5 of a folder's 4 MiB
    listings = count_listings(monkeypatch)
    retention.run_pass()
    assert [pngs(f) for f in newest] == [0, 4, 4]  # only the oldest frames went, and no folder
    assert spool.counts()["done"] == 1503
    assert not spool.done_order.kept_in_memory
    # done/ (more than the order keeps), then batches of 64 to 1,024 reach the first folder with frames
    assert listings == ["done/", 64, 128, 256, 512, 1024]


def test_the_order_is_bounded_however_much_is_filed_and_comes_back_below_half(tmp_path: Path) -> None:
    now = [1000.0]
    order = DoneOrder(tmp_path, kept=50, clock=lambda: now[0])
    order.take_in()  # listed: done/ is empty

    def file(names: list[str]) -> None:
        for name in names:
            (tmp_path / name).mkdir()
            os.utime(tmp_path / name, ns=(int(now[0] * 1e9), int(now[0] * 1e9)))
            order.filed(int(now[0] * 1e9), name)
            now[0] += 1

    names = [f"f{i:03d}" for i in range(100)]
    file(names[:40])
    order.take_in()
    assert len(order) == 40 and [key[1] for key, _ in order.walk()] == names[:40]
    file(names[40:])
    order.take_in()
    assert not order.kept_in_memory and len(order) == 0
    assert [key[1] for key, _ in order.walk()] == names  # listed
    for name in names[:70]:
        (tmp_path / name).rmdir()
    now[0] += RESCAN_SECONDS
    order.take_in()
    assert not order.kept_in_memory  # 30 folders: not under half of what it keeps
    for name in names[70:75]:
        (tmp_path / name).rmdir()
    now[0] += RESCAN_SECONDS
    order.take_in()
    assert order.kept_in_memory and [key[1] for key, _ in order.walk()] == names[75:]  # 25: taken up again
    more = [f"g{i:03d}" for i in range(21)]
    file(more)
    order.take_in()
    assert len(order) == 46  # within the bound
    now[0] += RESCAN_SECONDS
    order.take_in()
    assert not order.kept_in_memory  # but past 90% of it at a rescan: it steps aside rather than flap


@pytest.mark.parametrize("what", ["frames", "folder"])
def test_a_folder_listed_before_the_spool_dated_it_keeps_its_true_place(spool: Spool, what: str) -> None:
    older = filed(spool, "older", frames=4 if what == "frames" else 0, age_days=1)
    caught = filed(spool, "caught", frames=4 if what == "frames" else 0, age_days=5)  # as dropped, days ago
    retention = make_retention(spool, done_max_bytes="1000000000")
    retention.run_pass()  # the listing catches it between the spool's rename and its dating
    os.utime(caught)
    spool.done_order.filed(caught.stat().st_mtime_ns, caught.name)
    if what == "folder":  # no frames left: the walk of whole folders meets it first
        spool.done_order.frames_gone_to = (caught.stat().st_mtime_ns, caught.name)
    frames = usage_of(older) - usage_of(older, frames=False) if what == "frames" else 0
    budget = spool.tally().done_bytes - frames // 2 if what == "frames" else 1  # frames: one folder's go
    retention.cfg = attrs.evolve(retention.cfg, done_max_bytes=str(int(budget / 0.9)) if what == "frames" else "1")
    with capture_logs() as logs:
        retention.run_pass()
    if what == "frames":
        assert deletions(logs) == [("older", "frames", "retention.done_max_bytes")]
    else:
        assert deletions(logs) == [("older", "folder", "retention.done_max_bytes"),
                                   ("caught", "folder", "retention.done_max_bytes")]


def test_a_folder_dated_back_while_in_order_still_loses_its_frames(spool: Spool) -> None:
    filed(spool, "a", frames=0, age_days=3)
    touched = filed(spool, "touched", age_days=2)
    c, d = filed(spool, "c", age_days=1), filed(spool, "d", age_days=0.5)
    retention = make_retention(spool, done_max_bytes="1000000000")
    retention.run_pass()  # in order
    back = time.time() - 2.5 * DAY
    os.utime(touched, (back, back))  # cp -p, rsync -t, touch -d into done/
    frames = usage_of(c) - usage_of(c, frames=False)

    def one_folders_frames_to_go() -> None:
        budget = (spool.tally().done_bytes - frames // 2) / 0.9
        retention.cfg = attrs.evolve(retention.cfg, done_max_bytes=str(int(budget)))

    one_folders_frames_to_go()
    retention.run_pass()
    assert pngs(touched) == 4 and pngs(c) == 0  # passed over as it was re-dated, not passed
    one_folders_frames_to_go()
    retention.run_pass()
    assert pngs(touched) == 0 and pngs(d) == 4


def usage_of(folder: Path, *, frames: bool = True) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.iterdir() if frames or p.suffix != ".png")


def test_a_folder_re_dated_before_the_walks_place_with_frames_moves_the_place_back(tmp_path: Path) -> None:
    order = DoneOrder(tmp_path)
    order.take_in()
    order.frames_gone_to = (5_000, "b")
    order.redate((1_000, "a"), 3_000, has_frames=False)
    assert order.frames_gone_to == (5_000, "b")
    order.redate((1_000, "c"), 4_000, has_frames=True)
    assert order.frames_gone_to == (4_000, "")


def test_past_the_bound_with_done_unlistable_the_order_steps_aside(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    order = DoneOrder(tmp_path, kept=4, clock=lambda: now[0])
    order.take_in()
    for i in range(3):
        order.filed(int(now[0] * 1e9) + i, f"f{i}")
    order.take_in()
    assert len(order) == 3
    order.frames_gone_to = (int(now[0] * 1e9) + 10, "z")

    def unlistable(_done: int, _after: Key) -> Iterator[Key]:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(DoneOrder, "_candidates", staticmethod(unlistable))
    now[0] += RESCAN_SECONDS
    for i in range(3, 5):
        order.filed(int(now[0] * 1e9) + i, f"f{i}")  # past the bound
    with capture_logs() as logs:
        order.take_in()
    assert not order.kept_in_memory and len(order) == 0  # nothing grows while done/ cannot be listed
    assert order.frames_gone_to <= (int((1000.0 - 2.0) * 1e9), "")  # back before what others may have filed
    assert [e["event"] for e in logs] == ["retention_scan_failed"] * 2  # the rescan due, then at the bound


class _Done:
    """done/ on disk, what this process and others file in it, and what retention's walks do,
    against a DoneOrder that keeps a few folders. Folders are dated by a clock that ticks half
    a second a step; a filing may be dated up to 1.5 s late, as when two sessions end together."""

    def __init__(self, done: Path, kept: int) -> None:
        self.done = done
        self.now = 10_000.0
        self.order = DoneOrder(done, kept=kept, clock=lambda: self.now)
        self.frames: dict[Key, bool] = {}  # every folder on disk: whether its frames are still there
        self.unlisted: set[Key] = set()  # filed by another process since the last rescan
        self.untaken: set[Key] = set()  # filed by this process since the last take_in
        self.made = 0

    def file(self, late: int, *, ours: bool) -> None:
        self.now += 0.5
        key = (int((self.now - late * 0.5) * 1e9), f"f{self.made:04d}")
        self.made += 1
        (self.done / key[1]).mkdir()
        os.utime(self.done / key[1], ns=(key[0], key[0]))
        self.frames[key] = True
        if ours:
            self.order.filed(*key)
            self.untaken.add(key)
        else:
            self.unlisted.add(key)

    def removed_by_a_person(self, which: int) -> None:
        if self.frames:
            key = sorted(self.frames)[which % len(self.frames)]
            (self.done / key[1]).rmdir()
            del self.frames[key]
            self.unlisted.discard(key)
            self.untaken.discard(key)

    def take_in(self) -> None:
        listed_before = self.order.listed_at
        self.order.take_in()
        self.untaken.clear()
        if self.order.listed_at != listed_before:
            self.unlisted.clear()

    def frames_pass(self, steps: int, redated: bool) -> None:
        """Delete the frames of up to ``steps`` folders from the walk's place, as retention does
        (a dropper's folder, ``redated``, is dated at the deletion)."""
        self.now += 0.5
        self.take_in()
        passed_over = False
        walk = self.order.walk(self.order.frames_gone_to)
        seen = set()
        for (key, settled), _ in zip(walk, range(steps), strict=False):
            assert key[1] not in seen  # once, even re-dated as it goes
            seen.add(key[1])
            if key not in self.frames:
                self.order.forget(key)
                continue
            if self.frames[key] and redated:
                new = (int(self.now * 1e9), key[1])
                os.utime(self.done / key[1], ns=(new[0], new[0]))
                del self.frames[key]
                self.frames[new] = False
                self.order.redate(key, new[0], has_frames=False)
            else:
                self.frames[key] = False
            passed_over = passed_over or not settled
            if not passed_over:
                self.order.frames_gone_to = key

    def folders_pass(self, count: int) -> None:
        """Delete up to ``count`` whole folders, oldest first."""
        self.now += 0.5
        self.take_in()
        for (key, _), _ in zip(self.order.walk(), range(count), strict=False):
            if key in self.frames:
                (self.done / key[1]).rmdir()
                del self.frames[key]
                self.unlisted.discard(key)
            self.order.forget(key)

    def check(self) -> None:
        walked = [key for key, _ in self.order.walk()]
        assert walked == sorted(set(walked))  # oldest first, each once
        assert len(self.order) <= self.order.kept
        told = {key for key in self.frames if key not in self.untaken
                and (key not in self.unlisted or not self.order.kept_in_memory)}  # walks that list see all
        assert told <= set(walked)
        # the walk's place is never past a folder with frames that the order was told of
        assert all(key > self.order.frames_gone_to for key in told if self.frames[key])


_STEPS = st.lists(st.one_of(
    st.tuples(st.just("ours"), st.integers(0, 3)),
    st.tuples(st.just("theirs"), st.integers(0, 3)),
    st.tuples(st.just("removed"), st.integers(0, 100)),
    st.tuples(st.just("frames"), st.integers(1, 8)),
    st.tuples(st.just("frames, redated"), st.integers(1, 8)),
    st.tuples(st.just("folders"), st.integers(1, 4)),
    st.tuples(st.just("rescan due"), st.just(0)),
), max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(kept=4, steps=[("ours", 0), ("ours", 0), ("frames", 2), ("ours", 3), ("frames", 1)])  # late, kept
@example(kept=4, steps=[("ours", 0), ("ours", 0), ("frames", 2), ("theirs", 3), ("rescan due", 0),
                        ("frames", 1)])  # another's, late: found by the rescan
@example(kept=2, steps=[("ours", 0), ("ours", 0), ("ours", 0), ("frames", 3), ("ours", 3), ("ours", 3),
                        ("ours", 3), ("frames", 1)])  # more filed than the news keep, late, past the bound
@example(kept=4, steps=[("ours", 0), ("ours", 0), ("frames", 2), ("ours", 0), ("ours", 0), ("ours", 0),
                        ("frames", 1)])  # past the bound by filings alone
@example(kept=4, steps=[("ours", 0), ("ours", 0), ("frames", 2), ("theirs", 3), ("ours", 0), ("ours", 0),
                        ("ours", 0), ("frames", 8)])  # another's, late, as the order steps aside
@example(kept=1, steps=[("ours", 0), ("ours", 0), ("frames", 2), ("theirs", 3), ("frames", 8)])  # listed walks
@example(kept=8, steps=[("ours", 0), ("ours", 0), ("frames, redated", 3)])  # re-dated as the walk goes
@given(kept=st.integers(1, 8), steps=_STEPS)
def test_the_order_walks_every_folder_once_oldest_first_and_never_skips_frames(
        tmp_path: Path, kept: int, steps: list[tuple[str, int]]) -> None:
    model = _Done(Path(tempfile.mkdtemp(dir=tmp_path)), kept)
    for op, arg in steps:
        if op in ("ours", "theirs"):
            model.file(arg, ours=op == "ours")
        elif op == "removed":
            model.removed_by_a_person(arg)
        elif op.startswith("frames"):
            model.frames_pass(arg, redated=op.endswith("redated"))
        elif op == "folders":
            model.folders_pass(arg)
        else:
            model.now += RESCAN_SECONDS
        model.check()
    model.now += RESCAN_SECONDS
    model.take_in()
    assert [key for key, _ in model.order.walk()] == sorted(model.frames)  # a listing finds done/ as it is


def count_listings(monkeypatch: pytest.MonkeyPatch, *, give_up_after: int = 1000) -> list[object]:
    """Each listing of done/ from now on: "done/" for a rescan, the size asked of a walk's
    (failing past ``give_up_after``)."""
    listings: list[object] = []
    rescan, list_some = DoneOrder.rescan, DoneOrder._list

    def rescanned(self: DoneOrder) -> bool:
        listings.append("done/")
        return rescan(self)

    def listed(self: DoneOrder, after: Key, size: int) -> list[Key]:
        listings.append(size)
        assert len(listings) <= give_up_after, "the pass keeps listing done/"
        return list_some(self, after, size)

    monkeypatch.setattr(DoneOrder, "rescan", rescanned)
    monkeypatch.setattr(DoneOrder, "_list", listed)
    return listings


def test_no_symlink_is_followed(spool: Spool, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.png").write_bytes(FRAME)
    folder = filed(spool, "tricky", age_days=3)
    (folder / "link.png").symlink_to(outside / "precious.png")
    (spool.done / "linked-folder").symlink_to(outside)
    retention = make_retention(spool, done_max_bytes="1")
    retention.run_pass()
    assert not folder.exists()
    assert (spool.done / "linked-folder").is_symlink()
    assert listing(outside) == ["precious.png"] and (outside / "precious.png").read_bytes() == FRAME


def test_a_folder_half_removed_by_a_crash_is_removed_at_the_next_pass(spool: Spool) -> None:
    leftover = spool.tmp / f"{DELETED_PREFIX}0123"
    leftover.mkdir()
    (leftover / "a.png").write_bytes(FRAME)
    (spool.tmp / "a-recording").mkdir()
    make_retention(spool).run_pass()
    assert listing(spool.tmp) == ["a-recording"]


def test_the_tally_follows_deletions_without_walking_again(spool: Spool) -> None:
    for i in range(3):
        filed(spool, f"s{i}", age_days=3 - i)
    retention = make_retention(spool, done_max_bytes="1")
    before = spool.tally().done_bytes
    freed = retention.run_pass()
    assert spool.tally().done_bytes == before - freed == 0


# --- the low-disk state ------------------------------------------------------------------------------------------


def test_low_disk_is_entered_below_the_floor_and_left_a_margin_above_it(tmp_path: Path) -> None:
    fs = FakeFs(tmp_path, total=1000, free=1000)
    disk = Disk(tmp_path, Amount("10%"), statvfs=fs)
    with capture_logs() as logs:
        fs.free = 150
        assert disk.check() is False
        fs.free = 99
        assert disk.check() is True and disk.check() is True
        fs.free = 102  # above the floor, not yet above the margin: no flapping
        assert disk.check() is True
        fs.free = 105
        assert disk.check() is False
    assert [e["event"] for e in logs] == ["disk_low", "disk_ok"]
    assert disk.space is not None and disk.space.floor == 100


def test_a_floor_of_zero_is_never_low(tmp_path: Path) -> None:
    disk = Disk(tmp_path, Amount("0"), statvfs=FakeFs(tmp_path, total=1000, free=0))
    assert disk.check() is False


async def test_the_task_tells_when_the_state_changes(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retention_module, "CHECK_SECONDS", 0.01)
    filed(spool, "s0")
    fs = FakeFs(spool.root, total=10**9, free=0)
    retention = make_retention(spool, fs, free_space_floor="1000")
    changes: list[bool] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: serve_retention(
            retention, changed=lambda: changes.append(retention.disk.low), task_status=task_status))
        await until(lambda: changes == [True], 5)
        fs.free = 10**6
        await until(lambda: changes == [True, False], 5)
        nursery.cancel_scope.cancel()
    assert pngs(spool.done / "s0") == 0  # it deleted frames meanwhile


# --- a full disk at every write the spool makes --------------------------------------------------------------------


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    real = os.write

    def set_full(full: bool) -> None:
        def no_space(fd: int, data: Any) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "write", no_space if full else real)

    return set_full


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_full_disk_at_each_write_loses_no_folder(spool: Spool, full_disk: Callable[[bool], None]) -> None:
    fds = open_fds()
    drop(spool, "a")
    full_disk(True)
    with pytest.raises(SpoolError):  # the session file of a first claim
        spool.claim("a")
    assert listing(spool.incoming) == ["a"] and listing(spool.active) == []
    with pytest.raises(SpoolError):  # a camera session's folder
        spool.create_active("cam", source="camera")
    assert listing(spool.active) == [] and listing(spool.tmp) == []
    full_disk(False)
    claim = spool.claim("a")
    assert claim is not None
    full_disk(True)
    with pytest.raises(SpoolError):
        claim.begin_attempt()
    assert claim.attempts == 0 and not claim.in_attempt
    with pytest.raises(SpoolError):
        spool.finish(claim, {"hr": 60.0})
    with pytest.raises(SpoolError):
        spool.fail(claim, {"reason": "x"})
    assert listing(claim.path).count(RESULT_FILE) == 0 and claim.held
    assert spool.release(claim) == spool.incoming / "a"  # the end_attempt write fails quietly; the move needs none
    assert open_fds() == fds
    full_disk(False)
    again = spool.claim("a")
    assert again is not None and again.datapt_id == claim.datapt_id
    spool.finish(again, {"hr": 60.0})
    assert listing(spool.done) == ["a"]


def test_a_folder_that_cannot_be_moved_back_is_let_go_for_recovery(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    fds = open_fds()
    drop(spool, "a")
    claim = spool.claim("a")
    assert claim is not None

    def no_room(*args: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsops, "rename_noreplace", no_room)  # incoming/ cannot grow
    with capture_logs() as logs, pytest.raises(SpoolError):
        spool.release(claim)
    assert not claim.held and open_fds() == fds  # no descriptor kept for it
    assert "folder_left_for_recovery" in [e["event"] for e in logs]
    monkeypatch.undo()
    assert listing(spool.active) == ["a"]
    assert spool.recover() == ["a"]  # the next rescan moves it on
    assert listing(spool.incoming) == ["a"]


async def test_the_daemon_rides_out_a_full_disk(
    backend: BackendFactory, tmp_path: Path, nursery: trio.Nursery, full_disk: Callable[[bool], None]
) -> None:
    state = await backend()
    cfg = make_config(state.port, CAIRED_SPOOL_DIR=str(tmp_path / "spool"), CAIRED_SPOOL_SETTLE_SECONDS="0",
                      CAIRED_SPOOL_RESCAN_SECONDS="0.5", CAIRED_STREAM_FPS="0",
                      CAIRED_RETENTION_FREE_SPACE_FLOOR="0")
    spool = Spool(cfg.spool.dir)
    spool.prepare()
    with capture_logs(processors=[merge_contextvars]) as logs:
        full_disk(True)
        await nursery.start(lambda task_status: serve(cfg, notifier=Notifier(None), spool_retry=0.2,
                                                      task_status=task_status))
        write_frames(spool.tmp / "s1", 5)
        (spool.tmp / "s1" / ".ready").touch()
        os.rename(spool.tmp / "s1", spool.incoming / "s1")
        await until(lambda: sum(e["event"] == "folder_claim_failed" for e in logs) >= 3, 10)
        full_disk(False)
        await until((spool.done / "s1" / RESULT_FILE).exists)
    assert listing(spool.incoming) == listing(spool.active) == []
    assert json.loads((spool.done / "s1" / RESULT_FILE).read_text())["frames_sent"] == 5
    assert not [e for e in logs if e["event"] == "internal_error"]
    spool.close()


# --- camera sessions on a low disk ---------------------------------------------------------------------------------


async def test_below_the_floor_the_camera_streams_live_unrecorded_and_records_again_when_space_returns(
    backend: BackendFactory, tmp_path: Path, nursery: trio.Nursery
) -> None:
    state = await backend()
    video = write_video(tmp_path / "camera.avi", frames=40)
    cfg = make_config(state.port, CAIRED_SPOOL_DIR=str(tmp_path / "spool"), CAIRED_SPOOL_SETTLE_SECONDS="0",
                      CAIRED_SPOOL_RESCAN_SECONDS="0.5", CAIRED_STREAM_FPS="0", CAIRED_CAMERA_ENABLED="true",
                      CAIRED_CAMERA_DEVICE=str(video), CAIRED_CAMERA_SESSION_SECONDS="1", CAIRED_CAMERA_FPS="10",
                      CAIRED_BACKEND_HEARTBEAT="0", CAIRED_CAMERA_KEEP_FRAMES="true",
                      CAIRED_RETENTION_FREE_SPACE_FLOOR="100%", CAIRED_RETENTION_DONE_MAX_BYTES="0")
    spool = Path(cfg.spool.dir)

    def results() -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted((spool / "done").glob("*/result.json"))]

    with capture_logs(processors=[merge_contextvars]) as logs:
        ctx: Context = await nursery.start(lambda task_status: serve(cfg, notifier=Notifier(None),
                                                                     task_status=task_status))
        assert ctx.disk is not None and ctx.disk.low
        assert "DISK LOW" in disk_status(ctx) and "camera not recorded" in disk_status(ctx)
        (spool / "tmp" / "dropped").mkdir()
        write_frames(spool / "tmp" / "dropped", 4)
        os.rename(spool / "tmp" / "dropped", spool / "incoming" / "dropped")
        await until(lambda: any(r["source"] == "camera" for r in results())
                    and any(r["session"] == "dropped" for r in results()))
        low = next(r for r in results() if r["source"] == "camera")
        assert low["frames_recorded"] == 0 and low["frames_not_recorded"] > 0 and low["frames_sent"] > 0
        assert pngs(spool / "done" / low["session"]) == 0
        assert pngs(spool / "done" / "dropped") == 4  # dropped folders are still taken
        ctx.disk.floor = Amount("0")  # space is back
        await until(lambda: any(r["source"] == "camera" and r["frames_recorded"] > 0 for r in results()))
        assert disk_status(ctx) == ""
    events = [e["event"] for e in logs]
    assert events.count("disk_low") == 1 and events.count("disk_ok") == 1
    unrecorded = [e for e in logs if e["event"] == "camera_not_recorded"]
    assert unrecorded and all(e["session"].startswith("cam-") for e in unrecorded)
    assert len({e["session"] for e in unrecorded}) == len(unrecorded)  # one line per session, not per frame


async def test_a_full_disk_stops_a_recording_once_and_the_live_stream_goes_on(
    backend: BackendFactory, tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(folder: Path, timestamp: str, jpeg: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("caired.live.write_encoded", no_space)
    state = await backend()
    video = write_video(tmp_path / "camera.avi", frames=40)
    cfg = make_config(state.port, CAIRED_SPOOL_DIR=str(tmp_path / "spool"), CAIRED_STREAM_FPS="0",
                      CAIRED_CAMERA_ENABLED="true", CAIRED_CAMERA_DEVICE=str(video),
                      CAIRED_CAMERA_SESSION_SECONDS="1", CAIRED_CAMERA_FPS="10", CAIRED_BACKEND_HEARTBEAT="0",
                      CAIRED_RETENTION_FREE_SPACE_FLOOR="0")
    spool = Path(cfg.spool.dir)
    with capture_logs(processors=[merge_contextvars]) as logs:
        await nursery.start(lambda task_status: serve(cfg, notifier=Notifier(None), task_status=task_status))
        await until(lambda: bool(list((spool / "done").glob("*/result.json"))))
    result = json.loads(next((spool / "done").glob("*/result.json")).read_text())
    assert result["frames_recorded"] == 0 and result["frames_sent"] == result["frames_not_recorded"] > 5
    first = [e for e in logs if e.get("session") == result["session"]]
    assert [e["event"] for e in first].count("camera_not_recorded") == 1
    assert not [e for e in first if e["event"] == "camera_frame_not_recorded"]
    assert (spool / "done" / result["session"] / SESSION_FILE).exists()
