"""When is a dropped folder complete? The settle rule, and what this process remembers of it.

A folder still being written must never be streamed half-way, so a folder in
``incoming/`` is *ready* when one of these holds:

1. it holds the marker ``.ready`` (the writer says so);
2. it has been quiet for ``settle_seconds``. "Quiet since" is the newest of: the folder's
   own mtime, and the mtime and ctime of every entry in it (symlinks not followed,
   subfolders looked at but not into: frames are never in subfolders). When this process
   has looked at the folder before and its signature (names, sizes, mtimes, ctimes of the
   entries, and the folder's mtime) changed since, the change we saw ourselves counts
   too: quiet since the look that saw it. So the rule is ``now - quiet_since >= settle_seconds``.

Why this is safe for the usual ways of dropping a folder:

* ``mv`` of a folder written earlier (the recommended way: write beside, in ``tmp/`` or a
  dot-name, then ``mv``): the rename changes only the folder's ctime, which is not used for
  the folder itself; its mtime and its entries' times are old, so it is ready at first sight.
* ``cp -r`` / a program writing frames: every file created updates the folder's mtime, and
  a file being written has a recent mtime, so the folder settles ``settle_seconds`` after
  the last write.
* ``cp -a`` / ``rsync -a`` / ``tar x`` restore old mtimes, on each file after writing it and
  on the folder last of all. The folder's mtime stays recent until the very end, and
  ``utime`` sets an entry's ctime to now (ctime cannot be forged), so the entries' ctimes
  keep the folder busy until ``settle_seconds`` after the copy ended.
* A folder whose mtimes lie in the future (a camera with a wrong clock): quiet-since never
  counts later than this process's first look at that exact signature.

Limits: a writer that pauses longer than ``settle_seconds`` between two files gets its
folder streamed half-way; such writers must use ``mv`` or ``.ready``. The memory of earlier
looks is lost on restart, which only removes the extra evidence, never the mtime/ctime rule.
On network filesystems the times come from the server's clock.

``Readiness`` keeps what the looks learn across scans of ``incoming/``: a folder found ready
(its mtime then at least ``_TRUSTED_AGE`` old) whose inode and own mtime are unchanged is
ready again without being opened, so a backlog of thousands of waiting folders costs a
listing and an ``lstat`` each, not a look into each.

A look reads one folder (one ``scandir`` of its descriptor, ``fstatat`` per entry), never
deeper, so a dropped tree of any depth costs what its top level costs.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterable
from typing import Final

import attrs
import structlog

from caired import fsops
from caired.claim import check_name
from caired.fsops import GONE, shown

log = structlog.get_logger()

READY_MARKER: Final = ".ready"
HOLD_MARKER: Final = ".caired-hold"  # an operator's hold (caired hold): the folder is never claimed
# A ready folder's verdict is kept only once its mtime is this old: file times tick coarsely
# (a few ms), so a change in the same tick as the look would leave the mtime as it was.
_TRUSTED_AGE: Final = 1.0
_MASK: Final = (1 << 64) - 1

@attrs.define
class _Look:
    """What this process saw of one folder: its signature (hashed: a folder of thousands of
    frames costs a few bytes to remember, not its listing) and since when."""

    signature: int
    seen_at: float  # when this exact signature was first seen
    changed: bool  # the signature differs from an earlier look (a change we saw ourselves)


class Settler:
    """The settle rule with this process's memory of earlier looks, one entry per folder
    present in incoming/ (``forget_all_but`` drops the rest). Thread-safe."""

    def __init__(self, settle_seconds: float, clock: Callable[[], float]) -> None:
        self.settle_seconds = settle_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._looks: dict[str, _Look] = {}

    def wait(self, folder_fd: int, name: str, now: float | None = None) -> float:
        """Seconds until the folder open as ``folder_fd`` counts as complete (0 or less: it is)."""
        now = self._clock() if now is None else now
        try:
            os.stat(READY_MARKER, dir_fd=folder_fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            return 0.0
        own = os.fstat(folder_fd)
        newest = own.st_mtime
        # The signature is summed entry by entry (in any order, as scandir gives them), so a
        # folder of a million files costs a million stats but no list of them in memory.
        combined = 0
        for entry in os.scandir(folder_fd):
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            newest = max(newest, st.st_mtime, st.st_ctime)
            size = 0 if stat.S_ISDIR(st.st_mode) else st.st_size
            combined = (combined + hash((entry.name, size, st.st_mtime_ns, st.st_ctime_ns))) & _MASK
        signature = hash((own.st_mtime_ns, combined))
        with self._lock:
            look = self._looks.get(name)
            if look is None:
                look = self._looks[name] = _Look(signature, now, changed=False)
            elif look.signature != signature:
                look = self._looks[name] = _Look(signature, now, changed=True)
        quiet_since = look.seen_at if look.changed else min(newest, look.seen_at)
        return quiet_since + self.settle_seconds - now

    def forget(self, name: str) -> None:
        with self._lock:
            self._looks.pop(name, None)

    def forget_all_but(self, present: Iterable[str]) -> None:
        keep = set(present)
        with self._lock:
            for gone in self._looks.keys() - keep:
                del self._looks[gone]

    def __len__(self) -> int:
        return len(self._looks)


@attrs.frozen
class Scan:
    """One look at incoming/: the folders ready to claim, oldest first, and the seconds until
    the next one still settling may be ready (None when none is settling)."""

    ready: list[str]
    settle_in: float | None
    waiting: int = 0  # folders present but not ready
    held: int = 0  # folders an operator holds (HOLD_MARKER)
    folders: int = 0  # folders present, ready or not


class Readiness:
    """Which folders of incoming/ are complete, scan after scan; what it remembers is bounded
    by the folders present at the last scan. Thread-safe."""

    def __init__(self, settle_seconds: float, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._settler = Settler(settle_seconds, clock)
        self._lock = threading.Lock()
        self._verdicts: dict[str, tuple[int, int]] = {}  # ready folders: (inode, mtime_ns) then
        self._ignored: set[str] = set()  # names already logged as not folders, unreadable...

    @property
    def settle_seconds(self) -> float:
        return self._settler.settle_seconds

    def remembered(self) -> tuple[int, int]:
        """How many folders it remembers: as ready, and as settling."""
        with self._lock:
            return len(self._verdicts), len(self._settler)

    def look(self, incoming: int, entries: Iterable[os.DirEntry[str]]) -> Scan:
        """Look at the listing ``entries`` of incoming/ (open as ``incoming``).

        A folder not yet ready (or held) is looked into every time. ``forget`` (the periodic
        rescan) makes the next look open every folder again: a change inside a ready folder
        that leaves the folder's own mtime alone (a file rewritten in place) is seen there.
        """
        now = self._clock()
        found: list[tuple[float, str]] = []
        waits: list[float] = []
        held = folders = 0
        present: set[str] = set()
        with self._lock:
            verdicts = dict(self._verdicts)
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            present.add(name)
            try:
                if not entry.is_dir(follow_symlinks=False):
                    self._ignore_once(name, "not a folder")
                    continue
                folders += 1
                seen = verdicts.get(name)
                if seen is not None:
                    st = entry.stat(follow_symlinks=False)
                    if (st.st_ino, st.st_mtime_ns) == seen:
                        found.append((st.st_mtime, name))
                        continue
                    del verdicts[name]
                check_name(name)
                with fsops.opened_dir(name, dir_fd=incoming) as folder:
                    st = os.fstat(folder)  # before the look: a change during it makes the next scan look again
                    if fsops.lexists(folder, HOLD_MARKER):  # held: never remembered as ready
                        held += 1
                        continue
                    wait = self._settler.wait(folder, name, now)
                if wait > 0:
                    waits.append(wait)
                else:
                    found.append((st.st_mtime, name))
                    if now - st.st_mtime >= _TRUSTED_AGE:
                        verdicts[name] = (st.st_ino, st.st_mtime_ns)
            except ValueError:
                self._ignore_once(name, "its name is longer than the filesystem allows")
            except OSError as exc:
                verdicts.pop(name, None)
                if exc.errno in GONE:  # claimed by another process while we looked
                    continue
                if isinstance(exc, PermissionError):
                    self._ignore_once(name, "cannot be read by caired (permission denied)")
                else:
                    self._ignore_once(name, f"cannot be read: {exc.strerror or exc}")
        self._settler.forget_all_but(present)
        with self._lock:
            self._ignored &= present
            self._verdicts = {name: key for name, key in verdicts.items() if name in present}
        found.sort()
        return Scan([name for _, name in found], min(waits) if waits else None, waiting=len(waits), held=held,
                    folders=folders)

    def forget(self) -> None:
        """Make the next look open every folder again."""
        with self._lock:
            self._verdicts = {}

    def _ignore_once(self, name: str, reason: str) -> None:
        with self._lock:
            if name in self._ignored:
                return
            self._ignored.add(name)
        log.info("incoming_ignored", name=shown(name), reason=reason)
