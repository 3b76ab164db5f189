"""The folders of done/, oldest filed first, known without listing done/ at every look.

Retention deletes from done/ oldest first, and a listing of done/ costs an ``lstat`` per
folder: under load each one waits for the GIL behind the encode workers and the event
loop, so a pass that listed done/ (thousands of folders) took seconds, and at ~55
sessions/s retention fell behind what was filed. ``DoneOrder`` keeps the order instead:

* **This process's filings** come from the spool as it files each folder (``filed``, from
  any thread), with the mtime the spool has just set; retention takes them in (``take_in``)
  at the start of each pass.
* **Everything else** (what was there at start, what other daemons sharing the spool file,
  what a person removes) comes from a listing: the first one at the first pass, then one
  every ``RESCAN_SECONDS`` (``rescan``), merged with what is known.
* **Memory is bounded**: at most ``KEPT`` folders, the oldest; past that the order is
  known up to its newest kept folder and a walk goes on past it by listings, as before
  (in batches from ``BATCH`` to ``MAX_BATCH``, each starting after the last folder seen).

The order is (mtime_ns, name). It also keeps the frames walk's place (``frames_gone_to``:
no folder up to it has frames): a folder that comes in behind that place (filed late, or
by another daemon) moves the place back before it, so its frames are never skipped.

Not thread-safe but for ``filed``: everything else belongs to the retention thread.
"""

from __future__ import annotations

import bisect
import collections
import heapq
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import structlog

from caired import fsops

log = structlog.get_logger()

Key = tuple[int, str]  # (mtime_ns, name) of a folder of done/

FIRST: Final[Key] = (-1, "")  # before every folder
KEPT: Final = 16384  # folders of done/ kept in order (~2.5 MB)
BATCH: Final = 64  # past them, folders held by a walk's first listing
MAX_BATCH: Final = 4096  # and by any later one (~0.5 MB)
RESCAN_SECONDS: Final = 600.0  # how often done/ is listed again, for what others filed or removed


class DoneOrder:
    def __init__(self, done: Path | str, *, kept: int = KEPT, clock: Callable[[], float] = time.time) -> None:
        self.done = Path(done)
        self.kept = kept
        self._clock = clock
        self._keys: list[Key] = []  # oldest first
        self._upto: Key | None = None  # None: every folder of done/ is in _keys; else those up to this key
        self.frames_gone_to: Key = FIRST  # no folder up to this key has frames
        self.listed_at: float | None = None  # when the last full listing began (None: never listed)
        self._lock = threading.Lock()
        self._news: collections.deque[Key] = collections.deque(maxlen=kept)
        self._news_lost = False  # more were filed than kept between two passes: list again

    def __len__(self) -> int:
        return len(self._keys)

    # -- the spool's side --------------------------------------------------------------------------

    def filed(self, mtime_ns: int, name: str) -> None:
        """This process filed ``name`` in done/ (any thread)."""
        with self._lock:
            if len(self._news) == self._news.maxlen:
                self._news_lost = True
            self._news.append((mtime_ns, name))

    # -- retention's side --------------------------------------------------------------------------

    def take_in(self) -> None:
        """Put this process's filings in order; list done/ when it is due (or was never listed,
        or more were filed than could be kept meanwhile)."""
        with self._lock:
            news, lost = list(self._news), self._news_lost
            self._news.clear()
            self._news_lost = False
        due = self.listed_at is None or self._clock() - self.listed_at >= RESCAN_SECONDS
        if lost or due:
            self.rescan()
        else:
            for key in news:
                self._insert(key)

    def rescan(self) -> None:
        """List done/ and make the order what it found; a folder new to it that comes before the
        frames walk's place moves that place back."""
        self.listed_at = self._clock()
        with self._lock:  # filed before the listing began: it finds them; after: the next take_in
            self._news.clear()
            self._news_lost = False
        found = self._list(FIRST, self.kept)
        if found is None:
            return
        known, known_upto = set(self._keys), self._upto
        self._keys = found
        self._upto = found[-1] if len(found) >= self.kept else None
        new_behind = [key for key in found if key <= self.frames_gone_to and key not in known
                      and (known_upto is None or key <= known_upto)]
        if new_behind:
            self._move_place_before(new_behind[0])

    def forget(self, key: Key) -> None:
        """The folder is gone from done/."""
        i = bisect.bisect_left(self._keys, key)
        if i < len(self._keys) and self._keys[i] == key:
            del self._keys[i]

    def walk(self, after: Key = FIRST) -> Iterator[Key]:
        """The folders of done/ after ``after``, oldest first: those kept, then (when done/
        holds more) listings past them. What the caller does to the order as it goes
        (``forget``) does not disturb the walk."""
        last = after
        while True:
            i = bisect.bisect_right(self._keys, last)
            if i >= len(self._keys):
                break
            last = self._keys[i]
            yield last
        if self._upto is None:
            return
        last = max(last, self._upto)
        size = BATCH
        while True:
            batch = self._list(last, size) or []
            yield from batch
            if len(batch) < size:  # the rest of done/: no listing after it
                return
            last = batch[-1]
            size = min(size * 2, MAX_BATCH)

    # -- inside ------------------------------------------------------------------------------------

    def _insert(self, key: Key) -> None:
        if key <= self.frames_gone_to:
            self._move_place_before(key)
        if self._upto is not None and key > self._upto:
            return  # past what is kept: a walk's listing finds it
        i = bisect.bisect_left(self._keys, key)
        if i < len(self._keys) and self._keys[i] == key:
            return
        self._keys.insert(i, key)
        if len(self._keys) > self.kept:
            del self._keys[self.kept:]
            self._upto = self._keys[-1]

    def _move_place_before(self, key: Key) -> None:
        """Folders of the same mtime are looked at again: a folder without frames costs a listing."""
        self.frames_gone_to = min(self.frames_gone_to, (key[0], ""))

    def _list(self, after: Key, size: int) -> list[Key] | None:
        """The ``size`` oldest folders of done/ after ``after`` (one listing); None if done/
        cannot be listed."""
        try:
            with fsops.opened_dir(self.done) as done:
                candidates = (
                    (st.st_mtime_ns, e.name)
                    for e in os.scandir(done)
                    if not e.name.startswith(".")
                    for st in _lstat(e)
                    if stat.S_ISDIR(st.st_mode) and (st.st_mtime_ns, e.name) > after
                )
                return heapq.nsmallest(size, candidates)
        except OSError as exc:
            log.warning("retention_scan_failed", path=str(self.done), reason=exc.strerror or str(exc))
            return None


def _lstat(entry: os.DirEntry[str]) -> tuple[os.stat_result, ...]:
    try:
        return (entry.stat(follow_symlinks=False),)
    except OSError:
        return ()
