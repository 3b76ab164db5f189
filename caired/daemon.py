"""The daemon: owns the root nursery and wires sources -> sessions -> the log.

Tasks, one owner each, all in one nursery:

* the spool watcher pokes the dispatcher whenever incoming/ may hold a ready folder;
* the dispatcher claims ready folders, oldest first, only when one of the
  ``max_sessions`` slots is free (a folder can wait: until then it stays in incoming/,
  where another caired sharing the spool may take it), and starts a session task;
* each session task streams its folder through ``deliver()`` with unlimited retries
  and one datapt_id, then files it in done/ or failed/;
* the camera source (when enabled) runs live sessions that are recorded into the spool
  as they are captured (store-and-forward);
* the signal task turns SIGTERM/SIGINT into cancelling the root scope, and SIGHUP into
  reopening the log file;
* the status task keeps systemd's STATUS= current; the watchdog task pets systemd.

Shutdown is cancellation: sessions in flight close their sockets with 1001 and their
folders go back to incoming/, each in a shielded ``finally`` with a deadline.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import time
from typing import Any, Final

import attrs
import structlog
import trio

from caired import logging as clog
from caired.config import Config
from caired.errors import NoFramesError, SessionError
from caired.frames import encode_workers
from caired.session import deliver
from caired.sources import FolderSource
from caired.spool import Claim, Spool, SpoolError, watch
from caired.systemd import Notifier, serve_watchdog
from caired.uplink import Gate

log = structlog.get_logger()

CLEANUP_DEADLINE: Final = 5.0  # seconds a session has to put its folder back on shutdown
STATUS_EVERY: Final = 30.0
SPOOL_RETRY: Final = 10.0  # a spool that could not be written: try the folder again after this


@attrs.define
class Daemon:
    """What the daemon's tasks share; created and owned by ``serve``."""

    cfg: Config
    spool: Spool
    gate: Gate
    notifier: Notifier
    limiter: trio.CapacityLimiter
    slots: trio.Semaphore
    status_changed: trio.Event = attrs.field(factory=trio.Event)
    finished: int = 0
    failed: int = 0
    in_flight: set[Claim] = attrs.field(factory=set)  # claims are compared by identity
    # Folders of incoming/ (by name; "" is the scan itself) not to touch before a trio time.
    _held_back: dict[str, float] = attrs.field(factory=dict, init=False)

    def changed(self) -> None:
        self.status_changed.set()

    def hold_back(self, name: str) -> None:
        """A spool error on this folder: leave it alone for SPOOL_RETRY seconds."""
        self._held_back[name] = trio.current_time() + SPOOL_RETRY

    def held_back(self, name: str) -> bool:
        return self._held_back.get(name, -math.inf) > trio.current_time()

    def forget_held_back(self, *, keep: list[str]) -> None:
        """Drop the entries whose time is up, unless the folder is still there to be tried."""
        now = trio.current_time()
        present = set(keep)
        self._held_back = {n: t for n, t in self._held_back.items() if t > now or n in present}

    def next_look(self) -> float:
        """When a held-back folder may be tried again without a poke (inf: none is held back)."""
        now = trio.current_time()
        return min((t for t in self._held_back.values() if t > now), default=math.inf)


async def serve(
    cfg: Config,
    *,
    notifier: Notifier | None = None,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until cancelled (or SIGTERM/SIGINT); READY=1 once the spool is recovered and watched."""
    notifier = notifier or Notifier.from_env()
    spool = Spool.from_config(cfg.spool)
    await trio.to_thread.run_sync(spool.prepare)
    recovered = await trio.to_thread.run_sync(spool.recover)
    daemon = Daemon(
        cfg=cfg,
        spool=spool,
        gate=Gate(cfg.retry),
        notifier=notifier,
        limiter=trio.CapacityLimiter(encode_workers()),
        slots=trio.Semaphore(cfg.spool.max_sessions),
    )
    log.info("daemon_starting", spool=str(spool.root), recovered=len(recovered), max_sessions=cfg.spool.max_sessions,
             camera=cfg.camera.enabled, pid=os.getpid())
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_signals, nursery.cancel_scope, notifier)
            await nursery.start(serve_watchdog, notifier)
            pokes_send, pokes_receive = trio.open_memory_channel[None](1)
            await nursery.start(lambda task_status: watch(spool, pokes_send, rescan_seconds=cfg.spool.rescan_seconds,
                                                          task_status=task_status))
            nursery.start_soon(_dispatch, daemon, nursery, pokes_receive)
            if cfg.camera.enabled:
                from caired.live import serve_camera

                await nursery.start(serve_camera, daemon, nursery)
            nursery.start_soon(_status, daemon)
            notifier.ready()
            log.info("daemon_ready", spool=str(spool.root))
            task_status.started(daemon)
    finally:
        notifier.stopping()
        log.info("daemon_stopped", finished=daemon.finished, failed=daemon.failed)


async def _signals(scope: trio.CancelScope, notifier: Notifier) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                notifier.reloading()
                clog.reopen()
                log.info("log_reopened")
                notifier.ready()
                continue
            log.info("daemon_stopping", signal=signal.Signals(signum).name)
            notifier.stopping()
            scope.cancel()
            return


async def _dispatch(daemon: Daemon, nursery: trio.Nursery, pokes: trio.MemoryReceiveChannel[None]) -> None:
    """Claim ready folders, oldest first, whenever a session slot is free."""
    async with pokes:
        while True:
            await daemon.slots.acquire()
            while (claim := await _claim_oldest(daemon)) is None:
                with trio.move_on_at(daemon.next_look()):
                    await pokes.receive()  # the watcher says when to look again
            daemon.in_flight.add(claim)
            daemon.changed()
            nursery.start_soon(_session_task, daemon, claim)


async def _claim_oldest(daemon: Daemon) -> Claim | None:
    """Claim the oldest ready folder not held back; None when there is none.

    A spool error concerns one folder (unreadable, cannot be moved) or the scan: it is
    logged and that folder (or the scan) tried again after SPOOL_RETRY, so one bad drop
    neither stops the daemon nor keeps it busy.
    """
    spool = daemon.spool
    try:
        names, _ = await trio.to_thread.run_sync(spool.ready)
    except SpoolError as err:
        log.error("spool_scan_failed", problem=str(err), retry_seconds=SPOOL_RETRY)
        daemon.hold_back("")
        return None
    daemon.forget_held_back(keep=names)
    for name in names:
        if daemon.held_back(name):
            continue
        try:
            claim = await trio.to_thread.run_sync(functools.partial(spool.claim, name, source="drop"))
        except SpoolError as err:
            log.error("folder_claim_failed", session=name, problem=str(err), retry_seconds=SPOOL_RETRY)
            daemon.hold_back(name)
            continue
        if claim is not None:
            return claim
    return None


async def _session_task(daemon: Daemon, claim: Claim) -> None:
    try:
        await run_folder_session(daemon, claim)
    finally:
        daemon.in_flight.discard(claim)
        daemon.slots.release()
        daemon.changed()


async def run_folder_session(daemon: Daemon, claim: Claim, *, source_name: str = "drop") -> None:
    """Stream one claimed folder to its end: done/, failed/, or (on shutdown) back to incoming/."""
    cfg, spool = daemon.cfg, daemon.spool
    with structlog.contextvars.bound_contextvars(source=claim.source or source_name, session=claim.name,
                                                 datapt_id=claim.datapt_id):
        filed = False
        try:
            source = FolderSource(claim.path, cfg, daemon.limiter)
            try:
                await source.prepare()
                delivered = await deliver(
                    source,
                    cfg=cfg,
                    gate=daemon.gate,
                    name=claim.name,
                    datapt_id=claim.datapt_id,
                    attempts=0,
                    first_attempt=claim.attempts + 1,
                    on_attempt=lambda _n: claim.record_attempt(),
                    reject_is_final=False,
                )
            except (NoFramesError, SessionError) as err:
                error = _error_record(claim, err)
                with _last_attempt(claim):
                    await trio.to_thread.run_sync(lambda: spool.fail(claim, error))
                filed = True
                daemon.failed += 1
                return
            result = delivered.result(source=claim.source, frames_ignored=source.ignored,
                                      frames_unreadable=sorted(source.skipped))
            with _last_attempt(claim):
                await trio.to_thread.run_sync(lambda: spool.finish(claim, result))
            filed = True
            daemon.finished += 1
        except SpoolError as err:
            log.error("spool_write_failed", problem=str(err), retry_seconds=SPOOL_RETRY, attempt=claim.attempts)
            daemon.hold_back(claim.name)  # given back below; streaming it again at once would fail alike
        finally:
            if not filed and claim.held:
                with trio.move_on_after(CLEANUP_DEADLINE, shield=True), _last_attempt(claim):
                    await trio.to_thread.run_sync(_release_quietly, spool, claim)


def _last_attempt(claim: Claim) -> contextlib.AbstractContextManager[Any]:
    """Tag the folder's outcome lines (done, failed, released) with its last attempt, like the session's."""
    return structlog.contextvars.bound_contextvars(attempt=claim.attempts)


def _release_quietly(spool: Spool, claim: Claim) -> None:
    try:
        spool.release(claim)
    except SpoolError as err:
        log.error("folder_release_failed", problem=str(err))


def _error_record(claim: Claim, err: NoFramesError | SessionError) -> dict[str, Any]:
    return {
        "session": claim.name,
        "datapt_id": claim.datapt_id,
        "reason": str(err),
        "close_code": getattr(err, "close_code", None),
        "attempts": claim.attempts,
        "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


async def _status(daemon: Daemon) -> None:
    """Keep STATUS= current: folder counts and the backend's state."""
    while True:
        daemon.status_changed = trio.Event()  # before counting: a change from now on is seen next round
        counts = await trio.to_thread.run_sync(daemon.spool.counts)
        daemon.notifier.status(status_line(counts, daemon.gate.state, streaming=len(daemon.in_flight)))
        with trio.move_on_after(STATUS_EVERY):
            await daemon.status_changed.wait()
        await trio.sleep(0.5)  # coalesce bursts of changes


def status_line(counts: dict[str, int], backend: str, *, streaming: int) -> str:
    return (f"streaming {streaming} · incoming {counts.get('incoming', 0)} · done {counts.get('done', 0)} · "
            f"failed {counts.get('failed', 0)} · backend {backend}")
