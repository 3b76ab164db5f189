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

READY_MARKER: Final = ".ready"
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
