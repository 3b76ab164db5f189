"""Retention: a disk budget for what is already delivered, and low disk as a state.

What may be deleted
    Only ``done/``: its folders were delivered (result.json says what the backend answered).
    ``incoming/`` and ``active/`` hold what is not delivered yet and are never touched;
    ``failed/`` is kept for a person to look at and only reported (count and size, in the
    log and in ``STATUS=``). In ``done/``, a folder whose lock is held (another process is
    still filing it) is skipped.

When, and in which order
    Every ``CHECK_SECONDS`` the task compares ``done/`` with ``[retention] done_max_bytes``
    (bytes, or a share of the filesystem) and the filesystem's free space with
    ``free_space_floor``. Past either, the frames of ``done/`` folders are deleted, oldest
    folder first, until ``done/`` is back under ``LOW_WATER`` of its budget and free space a
    margin above the floor. Oldest is by the folder's mtime: the spool sets it as the folder
    enters ``done/``, while it still holds the folder, so a folder whose outcome was written
    before another's but that entered ``done/`` after it still comes after what a pass has
    seen. Deleting frames puts it back, where caired may set a folder's times: a folder a
    dropper owns (``deploy``'s shared group) cannot be, unless the service has CAP_FOWNER,
    and is then dated at the deletion, for its order and ``folders_max_days``. Only when no
    folder of ``done/`` has frames left (but those another process still holds) are whole
    folders, result.json included, deleted, oldest first. On a much longer clock, folders
    older than ``folders_max_days`` go whole, and frames older than ``frames_max_days`` go.

    Every deletion is one ``retention_deleted`` line: what (``frames`` or ``folder``), the
    path, the files and bytes freed, and why (the key that asked for it).

How
    Relative to descriptors, never following a symlink: a folder is opened with
    ``O_NOFOLLOW``, its frames unlinked relative to it (regular files only). A whole folder
    is first renamed out of ``done/`` into ``tmp/`` (``.caired-deleted-<hex>``), so it is
    never half there, then removed with ``shutil.rmtree`` on the tmp/ descriptor (which
    walks by descriptors); a leftover of a crash is removed at the next pass.

What it costs
    ``done/`` bytes are measured once at start (a walk, in a worker thread, after READY),
    then kept: this process's outcomes add to them (``Spool.tally``), deletions take away,
    and a recount every ``RECOUNT_SECONDS`` picks up what other daemons sharing the spool
    filed. The order of ``done/`` is kept in memory too (``done_order.py``, up to 32,768
    folders; past that, each pass lists ``done/`` as it used to): the spool tells it each
    folder it files, and ``done/`` is listed (an ``lstat`` per folder) only at the first
    pass and every ``done_order.RESCAN_SECONDS`` after, for what others filed or removed.
    A pass that listed ``done/`` each time took seconds under load, and at ~55
    sessions/s fell behind what was filed. Frames already deleted are skipped by their
    folders' order, so a pass does not look into them again: the frames walk keeps its
    place between passes, but never past a folder another process still held (the next
    pass looks at it again), and a folder that comes into the order behind that place
    moves it back (``done_order.py`` says how late ones are caught).

Low disk
    ``Disk`` is the filesystem's state against the floor. Below it, camera sessions still
    stream live but are not recorded (``live.py`` asks ``Disk.check`` before each frame);
    dropped folders are still taken, result and session files still written. The state is
    left by itself once free space is back a margin above the floor; each change is one
    log line (``disk_low`` / ``disk_ok``) and shows in ``STATUS=``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from typing import Final

import attrs
import structlog
import trio

from caired import fsops
from caired.config import Amount, RetentionConfig
from caired.done_order import FIRST, Key
from caired.fsops import shown
from caired.spool import FRAME_SUFFIXES, LOCK_FILE, Spool, delete_frames, usage

log = structlog.get_logger()

CHECK_SECONDS: Final = 5.0  # how often the budget and the floor are compared
AGE_SECONDS: Final = 3600.0  # how often folders and frames are checked for age
RECOUNT_SECONDS: Final = 6 * 3600.0  # how often done/ and failed/ are measured again
LOW_WATER: Final = 0.9  # a pass over the budget deletes down to this share of it
FLOOR_MARGIN: Final = 0.05  # and frees this share of the floor above it (also to leave the low state)
DAY: Final = 86400.0
DELETED_PREFIX: Final = ".caired-deleted-"  # whole folders being removed, in tmp/


# ---------------------------------------------------------------------------------------------
# The filesystem's state


@attrs.frozen
class Space:
    free: int  # bytes an unprivileged writer may still use
    total: int
    floor: int  # the floor in bytes, on this filesystem


class Disk:
    """Free space on the spool's filesystem against ``free_space_floor``; ``low`` is a state,
    entered below the floor and left a margin above it (so it does not flap). Thread-safe:
    camera writers call ``check`` from worker threads."""

    def __init__(self, path: os.PathLike[str] | str, floor: Amount,
                 *, statvfs: Callable[[str], os.statvfs_result] = os.statvfs) -> None:
        self.path = os.fspath(path)
        self.floor = floor
        self._statvfs = statvfs
        self._lock = threading.Lock()
        self.low = False
        self.space: Space | None = None
        self._changed: trio.Event | None = None

    def notify(self) -> None:
        """Wake ``wait_changed`` (from the trio thread: the retention task saw the state change)."""
        if self._changed is not None:
            self._changed.set()

    async def wait_changed(self) -> None:
        self._changed = trio.Event()
        await self._changed.wait()

    def check(self) -> bool:
        """Look at the filesystem now; True when below the floor (the low state)."""
        try:
            st = self._statvfs(self.path)
        except OSError as exc:
            log.warning("disk_unknown", path=self.path, reason=exc.strerror or str(exc))
            return self.low
        total = st.f_blocks * st.f_frsize
        space = Space(free=st.f_bavail * st.f_frsize, total=total, floor=self.floor.resolve(total))
        with self._lock:
            self.space = space
            was = self.low
            if space.floor <= 0:
                self.low = False
            elif was:
                self.low = space.free < space.floor + int(space.floor * FLOOR_MARGIN)
            else:
                self.low = space.free < space.floor
            now = self.low
        if now and not was:
            log.warning("disk_low", path=self.path, free=space.free, floor=space.floor,
                        then="camera sessions stream live without being recorded; retention deletes done/ frames")
        elif was and not now:
            log.info("disk_ok", path=self.path, free=space.free, floor=space.floor,
                     then="camera sessions recorded again")
        return now


# ---------------------------------------------------------------------------------------------
# Retention


@attrs.define
class _Want:
    """What one pass has to free, and why."""

    done_bytes: int = 0  # to bring done/ under its low water
    free_bytes: int = 0  # to bring free space a margin above the floor
    frames_before: float | None = None  # delete frames of folders filed before this time
    folders_before: float | None = None  # delete folders filed before this time

    @property
    def pressed(self) -> bool:
        return self.done_bytes > 0 or self.free_bytes > 0

    def took(self, freed: int) -> None:
        self.done_bytes -= freed
        self.free_bytes -= freed

    def why(self, cfg: RetentionConfig) -> str:
        if self.free_bytes > 0:
            return f"retention.free_space_floor = {cfg.free_space_floor}"
        return f"retention.done_max_bytes = {cfg.done_max_bytes}"


class Retention:
    """The budget of done/, one pass at a time (``run_pass``, blocking: call it in a thread)."""

    def __init__(self, spool: Spool, cfg: RetentionConfig, disk: Disk, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.cfg = cfg
        self.disk = disk
        self._clock = clock
        self._exhausted = False
        self._failed_reported: tuple[int, int] | None = None
        self.next_age_check = 0.0
        self.next_recount = 0.0

    # -- measuring ---------------------------------------------------------------------------------

    def measure(self) -> None:
        """Count the folders and measure the bytes of done/ and failed/ (a walk), then report
        failed/: it is never deleted, so a person has to know."""
        self.spool.count_folders()
        sizes = [self._measure(which) for which in ("done", "failed")]
        self.spool.set_bytes(done=sizes[0], failed=sizes[1])
        self.spool.done_order.frames_gone_to = FIRST  # frames that could not be deleted are tried again
        self.report_failed()

    def _measure(self, which: str) -> int:
        total = 0
        try:
            with fsops.opened_dir(self.spool.root / which) as parent:
                for entry in os.scandir(parent):
                    try:
                        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                            continue
                        with fsops.opened_dir(entry.name, dir_fd=parent) as folder:
                            total += usage(folder)
                    except OSError:
                        continue
        except OSError as exc:
            log.warning("retention_measure_failed", folder=which, reason=exc.strerror or str(exc))
        return total

    def report_failed(self) -> None:
        """One line whenever what failed/ holds changed (and it holds something, or held)."""
        tally = self.spool.tally()
        now = (tally.failed, tally.failed_bytes)
        before = self._failed_reported
        self._failed_reported = now
        if now != before and (now[0] > 0 or (before is not None and before[0] > 0)):
            log.info("failed_kept", folders=tally.failed, bytes=tally.failed_bytes, path=str(self.spool.failed),
                     then="never deleted by caired; look at each error.json, then remove or move them")

    # -- a pass ------------------------------------------------------------------------------------

    def run_pass(self) -> int:
        """Compare with the budget and the floor, and delete what they ask for; returns bytes freed."""
        now = self._clock()
        self._remove_leftovers()
        self.spool.done_order.take_in()
        self.disk.check()
        space = self.disk.space
        want = _Want()
        tally = self.spool.tally()
        if space is not None:
            budget = self.cfg.done_max_bytes.resolve(space.total)
            if budget > 0 and tally.done_bytes > budget:
                want.done_bytes = tally.done_bytes - int(budget * LOW_WATER)
            if space.floor > 0 and space.free < space.floor:
                want.free_bytes = space.floor + int(space.floor * FLOOR_MARGIN) - space.free
        if now >= self.next_age_check:
            self.next_age_check = now + AGE_SECONDS
            if self.cfg.frames_max_days > 0:
                want.frames_before = now - self.cfg.frames_max_days * DAY
                self.spool.done_order.frames_gone_to = FIRST  # an age check looks at every folder once
            if self.cfg.folders_max_days > 0:
                want.folders_before = now - self.cfg.folders_max_days * DAY
        freed = 0
        if want.folders_before is not None:
            freed += self._delete_old_folders(want.folders_before)
        if want.pressed or want.frames_before is not None:
            freed += self._delete_frames(want)
        if want.pressed:
            freed += self._delete_folders(want)
        if want.pressed and not self._exhausted:
            self._exhausted = True
            tally = self.spool.tally()
            log.warning("retention_exhausted", done_folders=tally.done, done_bytes=tally.done_bytes,
                        failed_folders=tally.failed, failed_bytes=tally.failed_bytes,
                        still_wanted=max(want.done_bytes, want.free_bytes),
                        reason="nothing left in done/ to delete; incoming/, active/ and failed/ are never deleted")
        elif not want.pressed:
            self._exhausted = False
        self.report_failed()
        return freed

    def _delete_frames(self, want: _Want) -> int:
        """Frames of done/ folders, oldest first, while the budget or the floor (or their age) asks."""
        order = self.spool.done_order
        freed = 0
        passed_over = False
        for key, settled in order.walk(order.frames_gone_to):
            mtime_ns = key[0]
            aged = want.frames_before is not None and mtime_ns / 1e9 < want.frames_before
            if not (want.pressed or aged):
                return freed
            why = (want.why(self.cfg) if want.pressed
                   else f"retention.frames_max_days = {self.cfg.frames_max_days:g}")
            gone = self._delete_frames_of(key, why)
            if gone is None:  # held by another process (not filed yet), or re-dated: a later pass starts here again
                passed_over = True
                continue
            freed += gone
            want.took(gone)
            passed_over = passed_over or not settled  # it may have come in late: the next pass looks again
            if not passed_over:
                order.frames_gone_to = key
        return freed

    def _delete_frames_of(self, key: Key, why: str) -> int | None:
        name = key[1]
        try:
            with fsops.opened_dir(self.spool.done) as done, fsops.opened_dir(name, dir_fd=done) as folder:
                if fsops.lock_is_held(folder, LOCK_FILE):
                    return None
                if not self._in_its_place(folder, key):
                    return None  # the walk's place stays before it: it may now be dated earlier
                files, freed = delete_frames(folder)
                mtime_ns = os.fstat(folder).st_mtime_ns if files else key[0]
        except OSError as exc:
            if exc.errno in fsops.GONE:
                self.spool.done_order.forget(key)
            else:
                log.warning("retention_failed", what="frames", path=shown(str(self.spool.done / name)),
                            reason=exc.strerror or str(exc))
            return 0
        if mtime_ns != key[0]:  # a dropper's folder, whose time caired may not put back
            self.spool.done_order.redate(key, mtime_ns, has_frames=False)
        if files:
            self.spool.adjust_tally(done_bytes=-freed)
            log.info("retention_deleted", what="frames", path=shown(str(self.spool.done / name)), files=files,
                     bytes=freed, why=why)
        return freed

    def _in_its_place(self, folder: int, key: Key) -> bool:
        """Whether the folder is dated as its key says; if not (listed as it was being filed, or
        touched since), it is put in its true place, where a later walk meets it."""
        dated_ns = os.fstat(folder).st_mtime_ns
        if dated_ns == key[0]:
            return True
        self.spool.done_order.redate(key, dated_ns, has_frames=True)
        return False

    def _delete_folders(self, want: _Want) -> int:
        """Whole folders of done/, oldest first, while the budget or the floor still asks."""
        freed = 0
        for key, _settled in self.spool.done_order.walk():
            if not want.pressed:
                return freed
            gone = self._delete_folder(key, want.why(self.cfg))
            if gone is not None:  # None: held by another process, or it could not go; the next pass tries again
                freed += gone
                want.took(gone)
        return freed

    def _delete_old_folders(self, before: float) -> int:
        freed = 0
        why = f"retention.folders_max_days = {self.cfg.folders_max_days:g}"
        for key, _settled in self.spool.done_order.walk():
            if key[0] / 1e9 >= before:
                return freed
            freed += self._delete_folder(key, why) or 0
        return freed

    def _delete_folder(self, key: Key, why: str) -> int | None:
        """Move done/<name> to tmp/ and remove it there; bytes freed, None when it was not deleted."""
        name = key[1]
        staging = f"{DELETED_PREFIX}{secrets.token_hex(8)}"
        path = shown(str(self.spool.done / name))
        try:
            with fsops.opened_dir(self.spool.done) as done, fsops.opened_dir(self.spool.tmp) as tmp:
                with fsops.opened_dir(name, dir_fd=done) as folder:
                    if fsops.lock_is_held(folder, LOCK_FILE):
                        return None
                    if not self._in_its_place(folder, key):
                        return None
                    size = usage(folder)
                    frames = sum(1 for e in os.scandir(folder) if e.name.lower().endswith(FRAME_SUFFIXES))
                    if not fsops.same_inode(folder, name, dir_fd=done):
                        return None
                    fsops.rename_noreplace(done, name, tmp, staging)
                self.spool.done_order.forget(key)
                self.spool.adjust_tally(done=-1, done_bytes=-size)
                shutil.rmtree(staging, dir_fd=tmp, ignore_errors=True)
        except OSError as exc:
            if exc.errno in fsops.GONE:
                self.spool.done_order.forget(key)
            else:
                log.warning("retention_failed", what="folder", path=path, reason=exc.strerror or str(exc))
            return None
        log.info("retention_deleted", what="folder", path=path, files=frames, bytes=size, why=why)
        return size

    def _remove_leftovers(self) -> None:
        """Folders a crash left half removed in tmp/."""
        with contextlib.suppress(OSError), fsops.opened_dir(self.spool.tmp) as tmp:
            for entry in os.scandir(tmp):
                if entry.name.startswith(DELETED_PREFIX) and entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.name, dir_fd=tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The task


async def serve_retention(
    retention: Retention,
    *,
    changed: Callable[[], None] = lambda: None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Measure done/ and failed/ once, then keep the budget and the floor for as long as the
    daemon runs. ``changed`` is called (in the trio thread) when the low state changed.

    A pass that fails in a way nobody foresaw is logged as a bug and tried again at the next
    check: retention never takes the daemon down.
    """
    task_status.started()
    await trio.to_thread.run_sync(retention.measure, abandon_on_cancel=True)
    retention.next_recount = trio.current_time() + RECOUNT_SECONDS
    low = retention.disk.low
    while True:
        try:
            if trio.current_time() >= retention.next_recount:
                retention.next_recount = trio.current_time() + RECOUNT_SECONDS
                await trio.to_thread.run_sync(retention.measure, abandon_on_cancel=True)
            await trio.to_thread.run_sync(retention.run_pass, abandon_on_cancel=True)
        except Exception as exc:
            log.error("internal_error", where="retention", error_type=type(exc).__name__, reason=str(exc),
                      exc_info=True)
        if retention.disk.low != low:
            low = retention.disk.low
            changed()
        await trio.sleep(CHECK_SECONDS)
