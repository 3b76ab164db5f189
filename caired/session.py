"""One datapoint session end to end: its frames, its attempts, its outcome.

``deliver()`` is the one session implementation behind ``caired stream`` and the
daemon. Every attempt starts encoding before it connects (the first frame leaves as
soon as the connection opens), restarts from the first frame on a new connection,
and keeps the session's one ``datapt_id``. Failures are retried through the shared
``Gate``; failures after the backend took the session are retried a limited number of
times with the session's own backoff; permanent ones (payload too big, protocol
rejection, no frames) are not retried.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final

import attrs
import structlog
import trio

from caired.attempt import Finished, Tally, stream
from caired.config import BackendConfig, Config
from caired.errors import BackendUnavailable, KeyRejected, NoFramesError, Retry, SessionError
from caired.protocol import Answer
from caired.sources import FrameSource
from caired.stats import Stats
from caired.uplink import Gate, connect, endpoint

log = structlog.get_logger()

ATTEMPT_END_DEADLINE: Final = 5.0  # seconds to mark an attempt ended in the session file


@attrs.frozen
class Delivered:
    """A finished session, as ``result.json`` records it."""

    name: str
    datapt_id: str
    attempts: int
    finished: Finished
    started_at: float
    ended_at: float

    def result(self, **extra: Any) -> dict[str, Any]:
        return {
            "session": self.name,
            "datapt_id": self.datapt_id,
            "attempts": self.attempts,
            "frames_sent": self.finished.sent,
            "frames_skipped": self.finished.skipped,
            "answers": self.finished.answers,
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at),
            "hr": self.finished.hr,
            "signal": self.finished.signal,
            "finished": self.finished.message,
            **extra,
        }


def _iso(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@attrs.frozen(kw_only=True)
class Limits:
    """How often a session is tried. None: without limit.

    ``attempts`` bounds every attempt (``caired stream --retries``, a live camera session);
    ``accepted_failures`` only the failures after the backend took the session (1011, no
    ``finished``, application close codes), which the daemon retries a few times and then
    files: connection failures (refused, down, timeouts, 1001, 1006, 1012, 1013) never count.
    """

    attempts: int | None = None
    accepted_failures: int | None = None
    reject_is_final: bool = True  # a rejected key (or path) ends the session at once


async def deliver(
    source: FrameSource,
    *,
    cfg: Config,
    gate: Gate,
    name: str,
    datapt_id: str,
    limits: Limits = Limits(),
    first_attempt: int = 1,
    on_attempt: Callable[[int], Any] | None = None,
    on_attempt_end: Callable[[], Any] | None = None,
    tally: Tally | None = None,
    on_answer: Callable[[Answer], None] | None = None,
    stats: Stats | None = None,
    backend: Callable[[], BackendConfig] | None = None,
) -> Delivered:
    """Stream ``source`` until ``finished``, trying again as ``limits`` allow.

    ``on_attempt(n)`` runs (in a worker thread) before attempt ``n``, ``on_attempt_end()``
    after it, however it ended short of the process dying. Raises the last SessionError
    when it cannot succeed by trying again or the limits are reached; NoFramesError when
    nothing is left to send. ``stats`` counts attempts, failures and traffic. ``backend``
    gives the backend settings each new connection uses (the daemon's, which a reload may
    change); by default ``cfg.backend``. A connection keeps what it opened with.
    """
    started = time.time()
    stats = stats if stats is not None else Stats()
    current_backend = backend if backend is not None else (lambda: cfg.backend)
    connected_ever = False
    accepted_failures = 0
    attempt = first_attempt - 1
    while True:
        attempt += 1
        if on_attempt is not None:
            await trio.to_thread.run_sync(on_attempt, attempt)
        with structlog.contextvars.bound_contextvars(attempt=attempt):
            try:
                finished = await _attempt(source, cfg=cfg, backend=current_backend(), gate=gate, datapt_id=datapt_id,
                                          tally=tally, on_answer=on_answer, stats=stats)
            except SessionError as err:
                connected_ever = connected_ever or err.connected
                if err.retry is Retry.SESSION:
                    accepted_failures += 1
                final = err.retry is Retry.NEVER or (limits.reject_is_final and isinstance(err, KeyRejected))
                out_of_attempts = limits.attempts is not None and attempt - first_attempt + 1 >= limits.attempts
                out_of_accepted = limits.accepted_failures is not None and accepted_failures >= limits.accepted_failures
                stats.attempt_failed(err, retried=not (final or out_of_attempts or out_of_accepted))
                if final or out_of_attempts or out_of_accepted:
                    log.error("session_failed", reason=err.reason, close_code=err.close_code, attempts=attempt)
                    if out_of_attempts and not final and not connected_ever:
                        raise BackendUnavailable(
                            f"{err.reason} (gave up after {attempt} attempts)", connected=False
                        ) from None
                    if out_of_accepted and not final:
                        raise SessionError(
                            f"{err.reason} (gave up after {accepted_failures} failures once the backend had "
                            "taken the session)", close_code=err.close_code, retry=Retry.NEVER
                        ) from None
                    raise
                if err.retry is Retry.SESSION:  # this session's own backoff: the others are not slowed down
                    delay = gate.delay(accepted_failures)
                    log.warning("session_retry", reason=err.reason, close_code=err.close_code, delay=round(delay, 3),
                                backoff=round(delay, 3), failures=accepted_failures)
                    await gate.backoff(trio.current_time() + delay)  # caired retry-now ends it early
                else:
                    log.warning("session_retry", reason=err.reason, close_code=err.close_code,
                                delay=round(max(0.0, gate.next_attempt - trio.current_time()), 3),
                                backoff=round(gate.last_delay, 3))
                continue
            finally:
                if on_attempt_end is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(ATTEMPT_END_DEADLINE):
                        # Let go after a while: a hung filesystem must not hold up a shutdown. An
                        # attempt not marked ended counts as one crash, which is safe.
                        await trio.to_thread.run_sync(on_attempt_end, abandon_on_cancel=True)
            gate.succeeded()
            stats.succeeded(finished.hr)
            log.info("session_finished", hr=finished.hr, frames_sent=finished.sent, frames_skipped=finished.skipped,
                     answers=finished.answers, attempts=attempt, seconds=round(time.time() - started, 3))
            return Delivered(name=name, datapt_id=datapt_id, attempts=attempt, finished=finished,
                             started_at=started, ended_at=time.time())


async def _attempt(
    source: FrameSource,
    *,
    cfg: Config,
    backend: BackendConfig,
    gate: Gate,
    datapt_id: str,
    tally: Tally | None,
    on_answer: Callable[[Answer], None] | None,
    stats: Stats,
) -> Finished:
    async with source.open() as feed:
        if await feed.first() is None:
            raise NoFramesError("no usable frame: every frame failed to read or decode")
        async with gate.attempt() as turn, connect(backend) as ws:
            if tally is not None:
                tally.total, tally.sent, tally.skipped = source.total, 0, 0
            log.info("session_started", url=endpoint(backend).shown, frames=source.total, format=cfg.stream.format,
                     fps=cfg.stream.fps, advanced=cfg.stream.advanced)

            def answered(answer: Answer) -> None:
                turn.admitted()
                if on_answer is not None:
                    on_answer(answer)

            return await stream(
                ws,
                feed,
                datapt_id=datapt_id,
                fps=cfg.stream.fps,
                advanced=cfg.stream.advanced,
                prefill=cfg.stream.prefill,
                finish_timeout=backend.finish_timeout,  # all of one connection from one configuration
                heartbeat=backend.heartbeat,
                tally=tally,
                on_answer=answered,
                stats=stats,
            )
