"""One session's life in the daemon, the same for a dropped folder and a camera recording:
claimed -> streamed -> its outcome filed; and the error boundary around it.

``run_session`` owns a claimed folder from the moment it is held until it has left
``active/``: ``done/`` with result.json, ``failed/`` with error.json, or (on shutdown, or
when the spool cannot be written) back to ``incoming/``. Whatever goes wrong inside a
session — any exception but cancellation — ends that session only: it is filed in
``failed/`` with its reason and exception type, one ``internal_error`` line carries the
traceback as a bug report, and the daemon goes on. Type-based ``except`` clauses below
decide *which* outcome, never *whether* the daemon survives.

``Sessions`` is the one place that counts sessions and knows which are in flight; only
``run_session`` changes it, and the daemon's status task reads it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Literal

import attrs
import structlog
import trio

from caired import logging as clog
from caired.config import Config
from caired.errors import NoFramesError, SessionError, SpoolError
from caired.reload import Settings
from caired.retention import Disk
from caired.spool import Claim, Spool, error_record
from caired.stats import Stats
from caired.uplink import Gate

log = structlog.get_logger()

CLEANUP_DEADLINE: Final = 5.0  # seconds a session has to put its folder back on shutdown
SPOOL_RETRY: Final = 10.0  # a folder the spool could not write is left alone this long


@attrs.define
class Sessions:
    """Sessions finished and failed so far, and the claims streaming now."""

    finished: int = 0
    failed: int = 0
    stored: int = 0  # camera recordings handed to incoming/ to be streamed later
    in_flight: set[Claim] = attrs.field(factory=set)  # claims are compared by identity
    _changed: trio.Event = attrs.field(factory=trio.Event)

    async def wait_changed(self) -> None:
        """Until a session started or ended (since the last wait returned)."""
        await self._changed.wait()
        self._changed = trio.Event()

    def _started(self, claim: Claim) -> None:
        self.in_flight.add(claim)
        self._changed.set()

    def _ended(self, claim: Claim, outcome: str | None) -> None:
        self.in_flight.discard(claim)
        if outcome == "done":
            self.finished += 1
        elif outcome == "failed":
            self.failed += 1
        elif outcome == "stored":
            self.stored += 1
        self._changed.set()


@attrs.frozen
class Context:
    """What every session of the daemon shares, created by the daemon. ``cfg`` is the
    configuration now (a reload may change it): a session reads it once, when it starts."""

    settings: Settings
    spool: Spool
    gate: Gate
    limiter: trio.CapacityLimiter
    sessions: Sessions
    # Called with the folder's name in incoming/ when the spool could not file it: try it later.
    hold_back: Callable[[str], None] = lambda _name: None
    stats: Stats = attrs.field(factory=Stats)
    disk: Disk | None = None  # the spool's filesystem against the free-space floor

    @property
    def cfg(self) -> Config:
        return self.settings.cfg


@attrs.frozen
class Done:
    """The session succeeded: result.json holds ``result``."""

    result: dict[str, Any]


@attrs.frozen
class Store:
    """Keep the folder to stream later (a camera recording whose live stream did not finish)."""


Outcome = Done | Store
AfterShutdown = Literal["release", "handoff"]


async def run_session(
    ctx: Context,
    claim: Claim,
    stream: Callable[[], Awaitable[Outcome]],
    *,
    on_shutdown: AfterShutdown = "release",
) -> None:
    """Stream a held folder with ``stream`` and file the outcome; never raises but Cancelled."""
    spool = ctx.spool
    with structlog.contextvars.bound_contextvars(source=claim.source, session=claim.shown,
                                                 datapt_id=claim.datapt_id):
        ctx.sessions._started(claim)
        outcome: str | None = None
        error_type: str | None = None
        started = time.monotonic()
        try:
            try:
                result = await stream()
            except (NoFramesError, SessionError) as err:
                error_type = type(err).__name__
                outcome = await _file_failure(spool, claim, err, bug=False)
                return
            except SpoolError:
                raise
            except Exception as err:
                error_type = type(err).__name__
                outcome = await _file_failure(spool, claim, err, bug=True)
                return
            with _last_attempt(claim):
                if isinstance(result, Done):
                    await trio.to_thread.run_sync(spool.finish, claim, result.result)
                    outcome = "done"
                else:
                    await trio.to_thread.run_sync(spool.handoff, claim)
                    outcome = "stored"
        except SpoolError as err:
            log.error("spool_write_failed", reason=str(err), attempt=claim.attempts)
        except Exception as err:  # filing itself failed in a way nobody foresaw: a bug, never the daemon's end
            log.error("internal_error", where="filing a session", error_type=type(err).__name__, reason=str(err),
                      exc_info=True)
        finally:
            ctx.sessions._ended(claim, outcome)
            ctx.stats.session_ended(outcome, error_type=error_type, seconds=time.monotonic() - started)
            if claim.held:  # not filed: shutdown, or the spool could not be written
                with trio.move_on_after(CLEANUP_DEADLINE, shield=True), _last_attempt(claim):
                    await trio.to_thread.run_sync(_put_back, spool, claim, on_shutdown, abandon_on_cancel=True)
                if claim.where == "incoming" and outcome is None:
                    ctx.hold_back(claim.folder)


async def _file_failure(spool: Spool, claim: Claim, err: Exception, *, bug: bool) -> str:
    """File the folder in failed/ with error.json; returns the outcome."""
    if bug:
        log.error("internal_error", where="session", error_type=type(err).__name__, reason=str(err), exc_info=True)
    record = _error_record(claim, err)
    with _last_attempt(claim):
        await trio.to_thread.run_sync(spool.fail, claim, record)
    return "failed"


def _error_record(claim: Claim, err: BaseException) -> dict[str, Any]:
    """error.json for a session that ended in ``err``. The reason is redacted like a log line:
    failed/ is readable by the folder's dropper, and a bug's message may hold anything."""
    reason = clog.redact(str(err) or type(err).__name__)
    return error_record(claim, reason, error_type=type(err).__name__, close_code=getattr(err, "close_code", None))


def _last_attempt(claim: Claim) -> Any:
    """Tag the folder's outcome lines (done, failed, released) with its last attempt, like the session's."""
    return structlog.contextvars.bound_contextvars(attempt=claim.attempts)


def _put_back(spool: Spool, claim: Claim, how: AfterShutdown) -> None:
    try:
        if how == "handoff":
            spool.handoff(claim)
        else:
            spool.release(claim)
    except Exception as err:
        # Neither filed nor given back: let go of it where it is, so that the next rescan's
        # recovery (or the next start's) moves it on, instead of holding it until the end.
        log.error("folder_release_failed", reason=str(err), error_type=type(err).__name__)
        spool.let_go(claim)
