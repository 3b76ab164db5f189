"""The folders of done/, oldest filed first, known without listing done/ at every look.

Retention deletes from done/ oldest first, and a listing of done/ costs an ``lstat`` per
folder: under load each one waits for the GIL behind the encode workers and the event
loop, so a pass that listed done/ (thousands of folders) took seconds, and at ~55
sessions/s retention fell behind what was filed. ``DoneOrder`` keeps the order instead:

* **This process's filings** come from the spool as it files each folder (``filed``, from
  any thread), with the mtime the spool has just set; retention takes them in (``take_in``)
  at the start of each pass.
* **Everything else** (what was there at start, what other daemons sharing the spool file,
  what a person removes) comes from a listing: the first at the first pass, then one
  every ``RESCAN_SECONDS`` (``rescan``), merged with what is known. A listing that fails
  is tried again at the next pass; nothing filed meanwhile is lost.
* **Memory is bounded**: at most ``KEPT`` folders. When done/ holds more, the order keeps
  the oldest (where whole folders are deleted) and the newest (where the frames walk
  works) and leaves a gap between them; a walk lists the gap in batches (from ``BATCH``
  to ``MAX_BATCH``, each starting after the last folder seen), and when deletions have
  used up the oldest, the next ones are listed from the gap in one go.

The order is (mtime_ns, name). It also keeps the frames walk's place (``frames_gone_to``:
no folder up to it has frames): a folder that comes in behind that place (filed late by
this process, or found new by a rescan) moves the place back before it, so its frames are
never skipped. One limit: a folder another process files with an mtime that falls in the
gap is listed by walks, but the rescan cannot tell it is new; if the walk's place is
already past it, its frames wait for the place to be reset (``Retention.measure``, every
6 hours).

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
BATCH: Final = 64  # folders of the gap held by a walk's first listing of it
MAX_BATCH: Final = 4096  # and by any later one (~0.5 MB)
RESCAN_SECONDS: Final = 600.0  # how often done/ is listed again, for what others filed or removed


class DoneOrder:
    def __init__(self, done: Path | str, *, kept: int = KEPT, clock: Callable[[], float] = time.time) -> None:
        if kept < 2:
            raise ValueError("a done/ order keeps at least 2 folders")
        self.done = Path(done)
        self.kept = kept
        self._clock = clock
        self._keys: list[Key] = []  # oldest first
        # None: every folder of done/ is in _keys. (lo, hi): those up to lo and from hi on are;
        # those strictly between are not.
        self._gap: tuple[Key, Key] | None = None
        self.frames_gone_to: Key = FIRST  # no folder up to this key has frames
        self.listed_at: float | None = None  # when the last listing of all done/ began (None: never)
        self._lock = threading.Lock()
        self._news: collections.deque[Key] = collections.deque(maxlen=kept)
        self._news_lost = False  # more were filed than kept between two passes: list again
        self._news_earliest: Key | None = None  # the oldest filed since the last take_in, kept or not

    def __len__(self) -> int:
        return len(self._keys)

    # -- the spool's side --------------------------------------------------------------------------

    def filed(self, mtime_ns: int, name: str) -> None:
        """This process filed ``name`` in done/ (any thread)."""
        with self._lock:
            if len(self._news) == self._news.maxlen:
                self._news_lost = True
            self._news.append((mtime_ns, name))
            if self._news_earliest is None or (mtime_ns, name) < self._news_earliest:
                self._news_earliest = (mtime_ns, name)

    # -- retention's side --------------------------------------------------------------------------

    def take_in(self) -> None:
        """Put this process's filings in order; list done/ when it is due (never listed, or
        ``RESCAN_SECONDS`` since, or more were filed than could be kept meanwhile)."""
        with self._lock:
            news, lost, earliest = list(self._news), self._news_lost, self._news_earliest
            self._news.clear()
            self._news_lost, self._news_earliest = False, None
        if earliest is not None and earliest <= self.frames_gone_to:  # filed late, kept or not
            self._move_place_before(earliest)
        due = lost or self.listed_at is None or self._clock() - self.listed_at >= RESCAN_SECONDS
        if due and self.rescan():
            return  # what was filed before the listing began is in it (or in its gap)
        if due:
            with self._lock:
                self._news_lost = self._news_lost or lost  # still to be listed, at the next pass
        for key in news:
            self._insert(key)
        self._trim()
        self._fill_oldest()

    def rescan(self) -> bool:
        """List done/ and make the order what it found; a folder new to it that comes before the
        frames walk's place moves that place back. False if done/ could not be listed."""
        started = self._clock()
        found = self._list(FIRST, self.kept + 1)
        gap: tuple[Key, Key] | None = None
        if found is not None and len(found) > self.kept:
            half = self.kept // 2
            newest = self._list_newest(self.kept - half)
            if newest is None:
                found = None
            elif newest[0] > found[half - 1]:
                found, gap = found[:half] + newest, (found[half - 1], newest[0])
            else:  # done/ shrank between the two listings: together they hold all of it
                found = sorted(set(found) | set(newest))
        if found is None:
            return False
        known, known_gap = set(self._keys), self._gap
        self._keys, self._gap, self.listed_at = found, gap, started
        new_behind = [key for key in found if key <= self.frames_gone_to and key not in known
                      and not (known_gap is not None and known_gap[0] < key < known_gap[1])]
        if new_behind:
            self._move_place_before(new_behind[0])
        return True

    def forget(self, key: Key) -> None:
        """The folder is gone from done/."""
        i = bisect.bisect_left(self._keys, key)
        if i < len(self._keys) and self._keys[i] == key:
            del self._keys[i]

    def redate(self, key: Key, mtime_ns: int) -> None:
        """The folder's frames were deleted and its mtime could not be put back: it is dated now
        (without frames, so the walk's place stays). A walk may be going on, so the order is
        not trimmed here but at the next ``take_in``: until then it may hold a pass's worth
        of such folders more than ``kept``."""
        self.forget(key)
        self._insert((mtime_ns, key[1]), trim=False)

    def walk(self, after: Key = FIRST) -> Iterator[Key]:
        """The folders of done/ after ``after``, oldest first: those kept, and listings of the gap
        between them. What the caller does to the order as it goes (``forget``, ``redate``)
        does not disturb the walk: the gap moves only in ``take_in``."""
        gap = self._gap
        if gap is None:
            yield from self._kept_after(after)
            return
        lo, hi = gap
        yield from self._kept_after(after, upto=lo)
        last = max(after, lo)
        if last < hi:
            size = BATCH
            while True:
                batch = self._list(last, size, below=hi) or []
                yield from batch
                if len(batch) < size:  # the rest of the gap: no listing after it
                    break
                last = batch[-1]
                size = min(size * 2, MAX_BATCH)
        yield from self._kept_after(max(after, lo))

    # -- inside ------------------------------------------------------------------------------------

    def _kept_after(self, after: Key, *, upto: Key | None = None) -> Iterator[Key]:
        last = after
        while True:
            i = bisect.bisect_right(self._keys, last)
            if i >= len(self._keys) or (upto is not None and self._keys[i] > upto):
                return
            last = self._keys[i]
            yield last

    def _insert(self, key: Key, *, trim: bool = True) -> None:
        if self._gap is not None and self._gap[0] < key < self._gap[1]:
            return  # in the gap: a walk lists it
        i = bisect.bisect_left(self._keys, key)
        if i < len(self._keys) and self._keys[i] == key:
            return
        self._keys.insert(i, key)
        if trim:
            self._trim()

    def _trim(self) -> None:
        """Past ``kept``: without a gap, the middle goes; with one, the oldest of the newest do."""
        excess = len(self._keys) - self.kept
        if excess <= 0:
            return
        if self._gap is None:
            half = self.kept // 2
            self._gap = (self._keys[half - 1], self._keys[half + excess])
            del self._keys[half : half + excess]
            return
        lo, hi = self._gap
        i = bisect.bisect_right(self._keys, lo)  # where the newest begin
        newest = min(excess, max(0, len(self._keys) - i - 1))
        if newest:
            hi = self._keys[i + newest]
            del self._keys[i : i + newest]
        oldest = excess - newest
        if oldest:  # the oldest took the room (folders dated long ago): their newest go too
            lo = self._keys[i - oldest - 1]
            del self._keys[i - oldest : i]
        self._gap = (lo, hi)

    def _fill_oldest(self) -> None:
        """When deletions have used up most of the oldest kept, list the next ones from the gap."""
        if self._gap is None:
            return
        lo, hi = self._gap
        i = bisect.bisect_right(self._keys, lo)
        half = self.kept // 2
        if i >= half // 4:
            return
        newest = len(self._keys) - i
        if newest > self.kept - half:  # room for them: the oldest of the newest join the gap
            drop = newest - (self.kept - half)
            hi = self._keys[i + drop]
            del self._keys[i : i + drop]
            self._gap = (lo, hi)
        found = self._list(lo, half - i, below=hi)
        if found is None:
            return
        self._keys[i:i] = found
        self._gap = None if len(found) < half - i else (found[-1], hi)

    def _move_place_before(self, key: Key) -> None:
        """Folders of the same mtime are looked at again: a folder without frames costs a listing."""
        self.frames_gone_to = min(self.frames_gone_to, (key[0], ""))

    def _candidates(self, done: int, after: Key, below: Key | None) -> Iterator[Key]:
        for entry in os.scandir(done):
            if entry.name.startswith("."):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            key = (st.st_mtime_ns, entry.name)
            if stat.S_ISDIR(st.st_mode) and key > after and (below is None or key < below):
                yield key

    def _list(self, after: Key, size: int, *, below: Key | None = None) -> list[Key] | None:
        """The ``size`` oldest folders of done/ after ``after`` (and before ``below``), in one
        listing; None if done/ cannot be listed."""
        try:
            with fsops.opened_dir(self.done) as done:
                return heapq.nsmallest(size, self._candidates(done, after, below))
        except OSError as exc:
            log.warning("retention_scan_failed", path=str(self.done), reason=exc.strerror or str(exc))
            return None

    def _list_newest(self, size: int) -> list[Key] | None:
        try:
            with fsops.opened_dir(self.done) as done:
                return sorted(heapq.nlargest(size, self._candidates(done, FIRST, None)))
        except OSError as exc:
            log.warning("retention_scan_failed", path=str(self.done), reason=exc.strerror or str(exc))
            return None
