"""The daemon: owns the root nursery and wires sources -> sessions -> the log.

Tasks, one owner each, all in one nursery:

* the watcher (``watch.py``) scans incoming/ on inotify events and timers and keeps the
  ready queue (``watch.Ready``) current: one scan per poke;
* the dispatcher takes ready folders, oldest first, only when one of the ``max_sessions``
  slots is free (a folder can wait: until then it stays in incoming/, where another
  caired sharing the spool may take it), claims each and starts its session;
* each session runs through ``lifecycle.run_session``: streamed with one datapt_id,
  retried as ``[retry]`` says, then filed in done/ or failed/; whatever goes wrong in it
  ends that session only;
* the camera source (when enabled, ``live.py``) runs live sessions that are recorded
  into the spool as they are captured (store-and-forward), through the same lifecycle;
* the signal task turns SIGTERM/SIGINT into cancelling the root scope, SIGHUP into
  reloading the configuration (``reload.py``) and reopening the log file, and SIGUSR1
  into ending the backoff wait (``caired retry-now`` does that through a control file,
  ``control.py``);
* the metrics task writes the Prometheus text file and serves /metrics and /health
  (``metrics.py``), when ``[metrics]`` asks for them;
* the retention task (``retention.py``) keeps done/ within its disk budget and free
  space above the floor, deleting delivered frames (then folders) oldest first, and
  tells when the disk is low (camera sessions then stream without being recorded);
* the status task keeps systemd's STATUS= current; the watchdog task pets systemd.

Shutdown is cancellation: sessions in flight close their sockets with 1001 and their
folders go back to incoming/, each in a shielded ``finally`` with a deadline.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Final

import structlog
import trio

from caired import logging as clog
from caired.config import Config
from caired.control import retry_now, serve_retry_requests
from caired.errors import CairedError, SpoolError
from caired.frames import encode_workers
from caired.fsops import shown
from caired.lifecycle import SPOOL_RETRY, Context, Done, Sessions, run_session
from caired.metrics import open_metrics_listeners, serve_metrics
from caired.reload import Settings
from caired.reload import reload as reload_settings
from caired.retention import Disk, Retention, serve_retention
from caired.session import Limits, deliver
from caired.sources import FolderSource
from caired.spool import Claim, Spool
from caired.systemd import Notifier, serve_watchdog
from caired.uplink import Gate
from caired.watch import Ready, watch

log = structlog.get_logger()

STATUS_EVERY: Final = 30.0


async def serve(
    cfg: Config,
    *,
    notifier: Notifier | None = None,
    spool_retry: float = SPOOL_RETRY,
    reload: Callable[[], Config] | None = None,
    task_status: trio.TaskStatus[Context] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until cancelled (or SIGTERM/SIGINT); READY=1 once the spool is recovered and watched.

    ``spool_retry``: how long a folder the spool could not claim or file is left alone.
    ``reload`` loads the configuration again as it was loaded at start (SIGHUP); without it,
    SIGHUP only reopens the log file.
    """
    notifier = notifier or Notifier.from_env()
    spool = Spool.from_config(cfg.spool, keep_camera_frames=cfg.camera.keep_frames)
    await trio.to_thread.run_sync(spool.prepare)
    recovered = await trio.to_thread.run_sync(spool.recover)
    await trio.to_thread.run_sync(spool.count_folders)  # a listing each; STATUS= never walks again
    disk = Disk(spool.root, cfg.retention.free_space_floor)
    await trio.to_thread.run_sync(disk.check)
    ready = Ready()
    ctx = Context(
        settings=Settings(cfg),
        spool=spool,
        gate=Gate(cfg.retry),
        # One limiter for every session, the camera's encoding and its fsyncing writes: a worker waiting on a
        # file is common here, so it always gets the one worker more (encode_workers).
        limiter=trio.CapacityLimiter(encode_workers(paced=False)),
        sessions=Sessions(),
        hold_back=functools.partial(ready.hold_back, seconds=spool_retry),
        disk=disk,
    )
    log.info("daemon_starting", spool=str(spool.root), recovered=len(recovered), max_sessions=cfg.spool.max_sessions,
             camera=cfg.camera.enabled, pid=os.getpid())
    listeners = await open_metrics_listeners(cfg.metrics)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_signals, nursery.cancel_scope, notifier, ctx, reload)
            await nursery.start(serve_watchdog, notifier)
            await nursery.start(serve_metrics, ctx, listeners)
            await nursery.start(serve_retry_requests, spool.incoming, ctx.gate)
            await nursery.start(functools.partial(watch, spool, ready, rescan_seconds=cfg.spool.rescan_seconds))
            nursery.start_soon(_dispatch, ctx, ready, nursery, spool_retry)
            await nursery.start(functools.partial(serve_retention, Retention(spool, cfg.retention, disk),
                                                  changed=disk.notify))
            if cfg.camera.enabled:
                from caired.live import serve_camera  # cv2's capture only when a camera is used

                await nursery.start(serve_camera, ctx)
            nursery.start_soon(_status, ctx, notifier)
            notifier.ready()
            log.info("daemon_ready", spool=str(spool.root))
            task_status.started(ctx)
    finally:
        notifier.stopping()
        spool.close()
        log.info("daemon_stopped", finished=ctx.sessions.finished, failed=ctx.sessions.failed)


async def _signals(
    scope: trio.CancelScope, notifier: Notifier, ctx: Context, reload: Callable[[], Config] | None
) -> None:
    wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
    with trio.open_signal_receiver(*wanted) as signals:
        async for signum in signals:
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("daemon_stopping", signal=signal.Signals(signum).name)
                notifier.stopping()
                scope.cancel()
                return
            try:  # what a signal asks for may fail; it never ends the daemon
                await _on_signal(signum, notifier, ctx, reload)
            except Exception as err:
                log.error("internal_error", where=f"handling {signal.Signals(signum).name}",
                          error_type=type(err).__name__, reason=str(err), exc_info=True)


async def _on_signal(signum: int, notifier: Notifier, ctx: Context, reload: Callable[[], Config] | None) -> None:
    """SIGUSR1: retry now. SIGUSR2 (logrotate): reopen the log file. SIGHUP (systemctl reload):
    reload the configuration, which reopens the log file too."""
    if signum == signal.SIGUSR1:
        retry_now(ctx.gate, "SIGUSR1")
        return
    if signum == signal.SIGUSR2 or reload is None:
        try:
            clog.reopen()
        except CairedError as err:  # the old file stays open: nothing is lost
            log.error("log_reopen_failed", reason=str(err))
            return
        log.info("log_reopened")
        return
    notifier.reloading()
    try:
        applied = await reload_settings(ctx.settings, reload)
        if applied is None:
            try:
                clog.reopen()
            except CairedError as err:
                log.error("log_reopen_failed", reason=str(err))
        else:
            ctx.gate.retry = ctx.cfg.retry
        log.info("log_reopened")
        ctx.stats.reloaded(applied is not None)
    finally:
        notifier.ready()


async def _dispatch(ctx: Context, ready: Ready, nursery: trio.Nursery, spool_retry: float) -> None:
    """Claim ready folders, oldest first, whenever a session slot is free."""
    slots = trio.Semaphore(ctx.cfg.spool.max_sessions)
    while True:
        await slots.acquire()
        while (claim := await _claim_next(ctx, ready, spool_retry)) is None:
            await ready.wait()  # the watcher says when to look again
        nursery.start_soon(_session_task, ctx, claim, slots)


async def _claim_next(ctx: Context, ready: Ready, spool_retry: float) -> Claim | None:
    """Claim the oldest ready folder; None when there is none left to try now.

    A spool error concerns one folder (unreadable, cannot be moved): it is logged and that
    folder held back for ``spool_retry`` seconds, so one bad drop neither stops the daemon nor keeps it
    busy. Anything else a claim raises is a bug, reported as such, and held back alike.
    """
    while (name := ready.take()) is not None:
        try:
            # Abandoned on cancel (shutdown): a claim that completes after that is recovered at the next start.
            claim = await trio.to_thread.run_sync(functools.partial(ctx.spool.claim, name, source="drop"),
                                                  abandon_on_cancel=True)
        except SpoolError as err:
            log.error("folder_claim_failed", session=shown(name), reason=str(err), retry_seconds=spool_retry)
            ready.hold_back(name, spool_retry)
            continue
        except Exception as err:
            log.error("internal_error", where="claim", session=shown(name), error_type=type(err).__name__,
                      reason=str(err), exc_info=True)
            ready.hold_back(name, spool_retry)
            continue
        if claim is not None:
            return claim
    return None


async def _session_task(ctx: Context, claim: Claim, slots: trio.Semaphore) -> None:
    try:
        await run_folder_session(ctx, claim)
    finally:
        slots.release()


async def run_folder_session(ctx: Context, claim: Claim) -> None:
    """Stream one claimed folder to its end: done/, failed/, or (on shutdown) back to incoming/."""
    cfg = ctx.cfg

    async def stream() -> Done:
        # The very folder the claim holds, through its descriptor; no symlink in the spool is followed.
        async with FolderSource(Path("."), cfg, ctx.limiter, follow_symlinks=False, dir_fd=claim.dir_fd,
                                label=claim.shown) as source:
            await source.prepare()
            limits = Limits(accepted_failures=cfg.retry.session_attempts or None, reject_is_final=False)
            delivered = await deliver(source, cfg=cfg, gate=ctx.gate, name=claim.shown, datapt_id=claim.datapt_id,
                                      limits=limits, first_attempt=claim.attempts + 1,
                                      on_attempt=lambda _n: claim.begin_attempt(), on_attempt_end=claim.end_attempt,
                                      stats=ctx.stats, backend=lambda: ctx.cfg.backend)
        return Done(delivered.result(source=claim.source, frames_ignored=source.ignored,
                                     frames_unreadable=sorted(source.skipped),
                                     **source.reference_fields(delivered.finished.hr)))

    await run_session(ctx, claim, stream)


async def _status(ctx: Context, notifier: Notifier) -> None:
    """Keep STATUS= current: folder counts and the backend's state."""
    while True:
        counts = await trio.to_thread.run_sync(ctx.spool.counts, abandon_on_cancel=True)
        streaming = len(ctx.sessions.in_flight)
        line = status_line(counts, ctx.gate.state, streaming=streaming)
        notifier.status(line + disk_status(ctx))
        async with trio.open_nursery() as nursery:  # whichever comes first: a session or the backend changed
            async def changed(wait: Callable[[], Awaitable[None]]) -> None:
                await wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(changed, ctx.sessions.wait_changed)
            nursery.start_soon(changed, ctx.gate.wait_state_changed)
            if ctx.disk is not None:
                nursery.start_soon(changed, ctx.disk.wait_changed)
            nursery.start_soon(changed, partial(trio.sleep, STATUS_EVERY))
        await trio.sleep(0.5)  # coalesce bursts of changes


def status_line(counts: dict[str, int], backend: str, *, streaming: int) -> str:
    return (f"streaming {streaming} · incoming {counts.get('incoming', 0)} · done {counts.get('done', 0)} · "
            f"failed {counts.get('failed', 0)} · backend {backend}")


def disk_status(ctx: Context) -> str:
    """What STATUS= adds about the disk: failed/'s size, and the low-disk state, loudly."""
    tally = ctx.spool.tally()
    parts = [f" · failed/ {_size(tally.failed_bytes)}"] if tally.bytes_counted and tally.failed else []
    space = ctx.disk.space if ctx.disk is not None else None
    if ctx.disk is not None and ctx.disk.low and space is not None:
        parts.append(f" · DISK LOW: {_size(space.free)} free, floor {_size(space.floor)}: camera not recorded")
    return "".join(parts)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
