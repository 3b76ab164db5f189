"""Watching incoming/: inotify events and timers become scans, and scans become the ready queue.

One task owns the looking: after each batch of inotify events on incoming/ (grouped over
up to a second), every ``rescan_seconds`` (lost events, network filesystems, orphans of
dead processes: ``Spool.recover`` runs first), when a folder still settling may have
become ready, and every 2 s when inotify cannot be used, it scans incoming/ once in a
worker thread and hands the result to ``Ready``. The dispatcher takes names from
``Ready`` without scanning again: one scan per poke. When it has taken every name of a
scan, it pokes the watcher itself rather than wait out the grouping of events. While
``DEEP_QUEUE`` or more folders wait in ``Ready``, events are looked at no more often than
every ``DEEP_QUEUE_GAP`` seconds: with thousands waiting, every claim is an event, and
what a new scan would add comes after what is queued (oldest first) all the same. A scan trusts what the spool found
ready before (``Spool.scan``: an ``lstat`` per waiting folder, not a look into it); the
periodic rescan looks into every folder again.

The watcher thread of watchfiles polls a stop flag every 0.2 s, so cancellation ends it
within that; idle cost is a thread waking 5 times a second.
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final, cast

import attrs
import structlog
import trio
import watchfiles

from caired.spool import Scan, Spool

log = structlog.get_logger()

WATCH_STEP_MS: Final = 200  # watcher thread wake-up: latency of events and of cancellation
WATCH_DEBOUNCE_MS: Final = 1_000  # longest a stream of changes is grouped before a poke
POLL_SECONDS: Final = 2.0  # look this often when inotify cannot be used
SETTLE_SLACK: Final = 0.05  # wake a little after a folder may become ready, not just before
SCAN_RETRY: Final = 10.0  # a scan that failed is tried again after this, if nothing else wakes us
DEEP_QUEUE: Final = 64  # with this many folders ready and not yet taken...
DEEP_QUEUE_GAP: Final = 5.0  # ...events wait this long after the last scan: what they add comes after them


class Ready:
    """The folders the last scan found ready, oldest first, for the dispatcher to claim.

    The watcher replaces the queue after each scan; the dispatcher takes names one by one.
    A name whose claim failed on a spool error is held back for a while (one bad folder must
    neither stop the daemon nor keep it busy). Lives in the trio thread; no locks.
    """

    def __init__(self) -> None:
        self._names: collections.deque[str] = collections.deque()
        self._held_back: dict[str, float] = {}
        self._changed = trio.Event()
        self._fed = False  # the last scan found something, and the queue has not run dry since
        self.on_drained: Callable[[], None] = lambda: None  # the watcher's: look again now
        self.scans = 0

    def update(self, names: list[str]) -> None:
        present = set(names)
        now = trio.current_time()
        self._held_back = {n: t for n, t in self._held_back.items() if t > now and n in present}
        self._names = collections.deque(names)
        self._fed = bool(names)
        self.scans += 1
        self._changed.set()

    def take(self) -> str | None:
        """The oldest ready name not held back, removed from the queue; None when there is none.

        A queue that a non-empty scan filled and that has now run dry asks the watcher for a
        scan at once (``on_drained``): more may have been dropped meanwhile, and the events
        that say so are still being grouped. A scan that finds nothing asks for nothing.
        """
        now = trio.current_time()
        for _ in range(len(self._names)):
            name = self._names.popleft()
            if self._held_back.get(name, -math.inf) <= now:
                return name
            self._names.append(name)  # held back: keep it for when its time is up
        if not self._names and self._fed:
            self._fed = False
            self.on_drained()
        return None

    def hold_back(self, name: str, seconds: float) -> None:
        self._held_back[name] = trio.current_time() + seconds
        self._names.append(name)

    def __len__(self) -> int:
        return len(self._names)

    async def wait(self) -> None:
        """Until a new scan came in, or a held-back name may be tried again."""
        self._changed = trio.Event()
        now = trio.current_time()
        deadline = min((t for n, t in self._held_back.items() if t > now and n in self._names), default=math.inf)
        with trio.move_on_at(deadline):
            await self._changed.wait()


class _StopFlag:
    """The ``stop_event`` handed to watchfiles: a thread-safe flag its thread polls every step.

    The first poll also tells us the inotify watch is in place (watchfiles sets it up before
    it starts polling), which is when ``watch`` reports itself started.
    """

    def __init__(self, established: trio.Event) -> None:
        self._stop = threading.Event()
        self._established = established
        self._token = trio.lowlevel.current_trio_token()
        self._reported = False

    def is_set(self) -> bool:
        if not self._reported:
            self._reported = True
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._established.set)
        return self._stop.is_set()

    def set(self) -> None:
        self._stop.set()


@attrs.define
class _Events:
    """How the inotify task talks to the main loop of ``watch``."""

    wake: trio.MemorySendChannel[None]
    established: trio.Event = attrs.field(factory=trio.Event)
    polling: bool = False


def _nudge(channel: trio.MemorySendChannel[None]) -> None:
    with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        channel.send_nowait(None)  # one pending nudge is enough: they coalesce


async def _follow_events(incoming: Path, flag: _StopFlag, events: _Events) -> None:
    """Nudge the main loop on every batch of changes under incoming/; fall back to polling."""
    try:
        async for _changes in watchfiles.awatch(
            incoming,
            watch_filter=None,
            stop_event=cast(trio.Event, flag),  # watchfiles only calls is_set()
            rust_timeout=0,  # no periodic timeout: the stop flag is polled every step anyway
            debounce=WATCH_DEBOUNCE_MS,
            step=WATCH_STEP_MS,
            recursive=False,  # incoming/ itself: inside a folder, the settle timer looks again
            force_polling=False,
        ):
            _nudge(events.wake)
    except Exception as exc:  # inotify unusable: watch limit, no inotify, a name it cannot decode, a watcher bug
        reason = str(exc) or type(exc).__name__
        log.warning("spool_watch_polling", path=str(incoming), every=POLL_SECONDS, reason=reason)
        events.polling = True
        events.established.set()
        _nudge(events.wake)


async def watch(
    spool: Spool,
    ready: Ready,
    *,
    rescan_seconds: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep ``ready`` current with the folders of incoming/ that are complete; runs until cancelled.

    ``task_status.started()`` once the inotify watch is in place; a first rescan (with
    recovery) follows at once.
    """
    wake_send, wake_recv = trio.open_memory_channel[None](1)
    events = _Events(wake_send)
    ready.on_drained = lambda: _nudge(wake_send)
    flag = _StopFlag(events.established)
    async with trio.open_nursery() as nursery:
        try:
            nursery.start_soon(_follow_events, spool.incoming, flag, events)
            await events.established.wait()
            task_status.started()
            rescan = True
            next_rescan = trio.current_time() + rescan_seconds
            while True:
                scan = await _look(spool, recover=rescan)
                now = last_scan = trio.current_time()
                deadline = next_rescan
                if scan is None:
                    deadline = min(deadline, now + SCAN_RETRY)
                else:
                    ready.update(scan.ready)
                    if scan.settle_in is not None:
                        deadline = min(deadline, now + scan.settle_in + SETTLE_SLACK)
                if events.polling:
                    deadline = min(deadline, now + POLL_SECONDS)
                with trio.move_on_at(deadline):
                    await wake_recv.receive()
                    if len(ready) >= DEEP_QUEUE:  # a backlog: what events add waits its turn anyway
                        await trio.sleep_until(last_scan + DEEP_QUEUE_GAP)
                        with contextlib.suppress(trio.WouldBlock):
                            wake_recv.receive_nowait()  # events meanwhile: the scan about to run sees them
                rescan = trio.current_time() >= next_rescan
                if rescan:
                    next_rescan = trio.current_time() + rescan_seconds
        finally:
            flag.set()  # the watcher thread sees it within one step; then the nursery can close


async def _look(spool: Spool, *, recover: bool) -> Scan | None:
    """One scan in a worker thread; a failing scan is logged and tried again later.

    Anything a scan raises concerns the spool, never the daemon: it is logged (the traceback
    too, when it is not an OSError: that is a bug) and the watcher goes on.
    """
    try:
        if recover:
            await trio.to_thread.run_sync(spool.recover, abandon_on_cancel=True)
            spool.forget_readiness()  # the rescan looks into every folder again
        return await trio.to_thread.run_sync(spool.scan, abandon_on_cancel=True)
    except OSError as exc:
        log.warning("spool_scan_failed", reason=str(exc), retry_seconds=SCAN_RETRY)
    except Exception as exc:
        log.error("internal_error", where="spool scan", error_type=type(exc).__name__, reason=str(exc),
                  exc_info=True)
    return None
