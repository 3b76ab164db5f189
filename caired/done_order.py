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
  every ``RESCAN_SECONDS`` (``rescan``). A listing that fails is tried again at the next
  pass; nothing filed meanwhile is lost.
* **Memory is bounded**: the order holds at most ``KEPT`` folders. When done/ holds more
  (or a rescan finds more than ``STAY`` of it), it steps aside, and each walk lists done/
  as retention did before it: in batches from ``BATCH`` to ``MAX_BATCH``, each starting
  after the last folder seen. A rescan that finds done/ back at or under half of ``KEPT``
  takes the order up again.

The order is (mtime_ns, name). It also keeps the frames walk's place (``frames_gone_to``:
no folder up to it has frames). A folder can come in behind that place: this process's,
filed a moment after another it dated later (two sessions ending together), or another
daemon's, which only a rescan brings in. The place then goes back before it, so its
frames are never skipped: before the earliest of this process's filings since the last
pass, and before the earliest folder a rescan finds that it did not know and that was
dated after the listing before it began (less ``SETTLE_SECONDS``). When walks list done/,
each listed folder says whether the place may pass it: not if it was dated less than
``SETTLE_SECONDS`` before the listing began, as it may have come in late (the next pass
looks at it again).

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
KEPT: Final = 32768  # folders of done/ held in order (~5 MB)
STAY: Final = 0.9  # a rescan that finds more than this share of KEPT steps aside
BATCH: Final = 64  # folders held by a walk's first listing of done/, when the order stands aside
MAX_BATCH: Final = 4096  # and by any later one (~0.5 MB)
RESCAN_SECONDS: Final = 600.0  # how often done/ is listed again, for what others filed or removed
# A folder dated this long before a listing began cannot have come in after it: the
# filesystem's clock is coarse, and on a network filesystem it is the server's.
SETTLE_SECONDS: Final = 2.0


class DoneOrder:
    def __init__(self, done: Path | str, *, kept: int = KEPT, clock: Callable[[], float] = time.time) -> None:
        self.done = Path(done)
        self.kept = kept
        self._clock = clock
        self._keys: list[Key] | None = None  # oldest first; None: not listed yet, or done/ holds too many
        self.frames_gone_to: Key = FIRST  # no folder up to this key has frames
        self.listed_at: float | None = None  # when the last rescan began (None: never)
        self._lock = threading.Lock()
        self._news: collections.deque[Key] = collections.deque(maxlen=max(1, kept))
        self._news_lost = False  # more were filed than kept between two passes: list again
        self._news_earliest: Key | None = None  # the oldest filed since the last take_in, kept or not

    def __len__(self) -> int:
        return len(self._keys or ())

    @property
    def kept_in_memory(self) -> bool:
        """False while walks list done/ (not listed yet, or it holds more than the order keeps)."""
        return self._keys is not None

    # -- the spool's side --------------------------------------------------------------------------

    def filed(self, mtime_ns: int, name: str) -> None:
        """This process filed ``name`` in done/ (any thread)."""
        key = (mtime_ns, name)
        with self._lock:
            if len(self._news) == self._news.maxlen:
                self._news_lost = True
            self._news.append(key)
            if self._news_earliest is None or key < self._news_earliest:
                self._news_earliest = key

    # -- retention's side --------------------------------------------------------------------------

    def take_in(self) -> None:
        """Put this process's filings in order; list done/ when it is due (never listed, or
        ``RESCAN_SECONDS`` since, or more were filed than could be kept meanwhile)."""
        with self._lock:
            news, lost, earliest = list(self._news), self._news_lost, self._news_earliest
            self._news.clear()
            self._news_lost, self._news_earliest = False, None
        if earliest is not None:  # filed late, kept or not
            self._move_place_before(earliest)
        due = lost or self.listed_at is None or self._clock() - self.listed_at >= RESCAN_SECONDS
        if due and self.rescan():
            return  # what was filed before the listing began is in it
        if due and lost:
            with self._lock:
                self._news_lost = True  # still to be listed, at the next pass
        if self._keys is None:
            return  # walks list done/: the news are there
        for key in news:
            self._insert(key)
        if len(self._keys) > self.kept and not self.rescan():  # a rescan judges what is new first
            self._step_aside()

    def rescan(self) -> bool:
        """List done/ and make the order what it found (or step aside if done/ holds too many);
        False if done/ could not be listed. A folder it did not know, dated after the listing
        before began, that comes before the frames walk's place moves that place back."""
        started = self._clock()
        known = set(self._keys) if self._keys is not None else None
        since_ns = int((self.listed_at - SETTLE_SECONDS) * 1e9) if self.listed_at is not None else None
        earliest_new: Key | None = None

        def looked_at(key: Key) -> None:
            nonlocal earliest_new
            if (known is not None and since_ns is not None and key[0] >= since_ns
                    and key <= self.frames_gone_to and key not in known
                    and (earliest_new is None or key < earliest_new)):
                earliest_new = key

        found = self._oldest(FIRST, self.kept + 1, looked_at)
        if found is None:
            return False
        if earliest_new is not None:
            self._move_place_before(earliest_new)
        # Taken up again under half the bound, kept up to 90% of it: it does not flap there.
        limit = int(self.kept * STAY) if self._keys is not None else self.kept // 2
        self._keys = found if len(found) <= limit else None
        self.listed_at = started
        return True

    def _step_aside(self) -> None:
        """Past the bound with no listing to judge what others filed since the last one: the
        walk's place goes back before all of it."""
        self._keys = None
        if self.listed_at is not None:
            self._move_place_before((int((self.listed_at - SETTLE_SECONDS) * 1e9), ""))

    def forget(self, key: Key) -> None:
        """The folder is gone from done/."""
        if self._keys is None:
            return
        i = bisect.bisect_left(self._keys, key)
        if i < len(self._keys) and self._keys[i] == key:
            del self._keys[i]

    def redate(self, key: Key, mtime_ns: int, *, has_frames: bool) -> None:
        """The folder is dated ``mtime_ns`` now: its frames were deleted and caired may not put
        its time back, or a listing caught it before the spool dated it as it filed it. Its
        frames, if it may have any, are not skipped. With the order full, the next rescan
        brings it in."""
        self.forget(key)
        new = (mtime_ns, key[1])
        if has_frames:
            self._move_place_before(new)
        if self._keys is not None and len(self._keys) < self.kept:
            self._insert(new)

    def walk(self, after: Key = FIRST) -> Iterator[tuple[Key, bool]]:
        """The folders of done/ after ``after``, oldest first, each with whether the frames walk's
        place may pass it. It ends at the newest folder in order when it starts: what the caller
        does as it goes (``forget``, ``redate``) does not disturb it, though a folder re-dated
        to before that end comes again under its new key."""
        keys = self._keys
        if keys is not None:
            if not keys:
                return
            last, end = after, keys[-1]
            while True:
                i = bisect.bisect_right(keys, last)
                if i >= len(keys) or keys[i] > end:
                    return
                last = keys[i]
                yield last, True
        size = BATCH
        while True:
            settled_ns = int((self._clock() - SETTLE_SECONDS) * 1e9)  # what this listing cannot have missed
            batch = self._list(after, size)
            for key in batch:
                yield key, key[0] <= settled_ns
            if len(batch) < size:  # the rest of done/: no listing after it
                return
            after = batch[-1]
            size = min(size * 2, MAX_BATCH)

    # -- inside ------------------------------------------------------------------------------------

    def _insert(self, key: Key) -> None:
        assert self._keys is not None
        i = bisect.bisect_left(self._keys, key)
        if i == len(self._keys) or self._keys[i] != key:
            self._keys.insert(i, key)

    def _move_place_before(self, key: Key) -> None:
        """Folders of the same mtime are looked at again: a folder without frames costs a listing."""
        self.frames_gone_to = min(self.frames_gone_to, (key[0], ""))

    @staticmethod
    def _candidates(done: int, after: Key) -> Iterator[Key]:
        for entry in os.scandir(done):
            if entry.name.startswith("."):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            key = (st.st_mtime_ns, entry.name)
            if stat.S_ISDIR(st.st_mode) and key > after:
                yield key

    def _list(self, after: Key, size: int) -> list[Key]:
        """The ``size`` oldest folders of done/ after ``after``, in one listing ([] if done/
        cannot be listed)."""
        return self._oldest(after, size) or []

    def _oldest(self, after: Key, size: int, each: Callable[[Key], None] | None = None) -> list[Key] | None:
        """One listing of done/: its ``size`` oldest folders after ``after``, each folder it
        finds shown to ``each`` on the way; None (and a warning) if done/ cannot be listed."""
        def keys(done: int) -> Iterator[Key]:
            for key in self._candidates(done, after):
                if each is not None:
                    each(key)
                yield key

        try:
            with fsops.opened_dir(self.done) as done:
                return heapq.nsmallest(size, keys(done))
        except OSError as exc:
            log.warning("retention_scan_failed", path=str(self.done), reason=exc.strerror or str(exc))
            return None
