"""Connecting to the backend: the handshake, failure classification, and backoff.

``connect()`` opens one WebSocket with compression off and a receive limit far above
trio-websocket's 1 MiB default, and turns every way a handshake can fail into a
SessionError subclass (rejected key, unavailable backend). ``classify_closed()`` does
the same for a connection that closes mid-session.

``Gate`` is the one backoff state a process shares between its sessions: exponential
with full jitter, reset after a success; while the backend is not known to be up,
only one session at a time probes it, so an outage costs few handshakes; after a
rejected key it probes only every ``rejected_probe`` seconds.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, Literal

import attrs
import structlog
import trio
import trio_websocket
from wsproto.utilities import LocalProtocolError

from caired.config import BackendConfig, RetryConfig
from caired.errors import BackendUnavailable, CairedError, KeyRejected, Retry, SessionError, WrongPath
from caired.protocol import MAX_ANSWER, CloseKind, auth_headers, build_url, classify_close, classify_status, redact_url

log = structlog.get_logger()

# What one connection may make us hold: answers are small (an advanced one with its rPPG
# window is tens of KB), but no side may keep a 1 MiB limit. A bigger message closes with
# 1009; at most MESSAGE_QUEUE whole ones wait while the listener logs (it drains continuously).
MAX_MESSAGE: Final = MAX_ANSWER
MESSAGE_QUEUE: Final = 16
CLOSE_TIMEOUT: Final = 2.0
SLOW_FACTOR: Final = 4.0  # 1012/1013/429: the server asked for time


@attrs.frozen
class Endpoint:
    url: str  # with the key when auth is "query": for the wire only
    shown: str  # redacted, for logs and errors
    headers: list[tuple[bytes, bytes]] = attrs.field(repr=False)


def endpoint(cfg: BackendConfig) -> Endpoint:
    key = cfg.api_key.reveal()
    url = build_url(cfg.url, api_key=key, auth=cfg.auth, client=cfg.client)
    return Endpoint(url=url, shown=redact_url(url), headers=auth_headers(api_key=key, auth=cfg.auth))


@asynccontextmanager
async def connect(cfg: BackendConfig) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """One connection; handshake failures come out as caired errors.

    Errors raised by the block itself pass through untouched.
    """
    target = endpoint(cfg)
    opened = done = False
    try:
        async with trio_websocket.open_websocket_url(
            target.url,
            extra_headers=target.headers,
            message_queue_size=MESSAGE_QUEUE,
            max_message_size=MAX_MESSAGE,
            connect_timeout=cfg.connect_timeout,
            disconnect_timeout=CLOSE_TIMEOUT,
        ) as ws:
            opened = True
            yield ws
            done = True
    except LocalProtocolError as exc:
        # A ping that arrives after our close frame left: trio-websocket answers it with a pong
        # that wsproto refuses in LOCAL_CLOSING (trio-websocket issue #184). The connection was
        # closing anyway: after a finished session that is harmless, before it a lost connection.
        if done:
            log.debug("close_race_ignored", reason=str(exc))
            return
        raise SessionError(f"the connection broke while closing: {exc}") from None
    except CairedError:
        raise  # the block's own errors pass through
    except trio_websocket.ConnectionRejected as exc:
        status = int(exc.status_code)
        kind = classify_status(status)
        if status == 404:
            raise WrongPath(
                f"the backend has no WebSocket at {target.shown} (HTTP 404): check the URL's path "
                "(the backend's is /ws/)",
                connected=False,
            ) from None
        if kind is CloseKind.REJECTED:
            sent = "check the API key" if cfg.api_key.reveal() else "no API key was sent: set one (api_key_file)"
            raise KeyRejected(
                f"the backend rejected the connection (HTTP {status}) at {target.shown}: {sent}",
                connected=False,
            ) from None
        raise BackendUnavailable(
            f"the backend refused the handshake (HTTP {status})",
            connected=False,
            retry=Retry.SLOW if kind is CloseKind.RETRY_SLOW else Retry.BACKOFF,
        ) from None
    except trio_websocket.ConnectionTimeout:
        raise BackendUnavailable(
            f"no answer from {target.shown} within {cfg.connect_timeout:g} s", connected=False
        ) from None
    except trio_websocket.DisconnectionTimeout:
        if not opened:
            raise
        raise SessionError("the connection did not close in time") from None
    except trio_websocket.HandshakeError as exc:
        cause = exc.__cause__ or exc.__context__
        reason = _describe(cause) if cause is not None else "the WebSocket handshake failed"
        raise BackendUnavailable(f"cannot reach {target.shown}: {reason}", connected=False) from None
    except trio_websocket.ConnectionClosed as exc:
        raise classify_closed(exc.reason) from None
    except (OSError, trio.BrokenResourceError) as exc:
        if opened:
            raise SessionError(f"connection lost: {_describe(exc)}") from None
        raise BackendUnavailable(f"cannot reach {target.shown}: {_describe(exc)}", connected=False) from None


def classify_closed(reason: Any) -> SessionError:
    """The error for a connection that closed before ``finished``."""
    code: int | None = getattr(reason, "code", None)
    text = getattr(reason, "reason", None) or ""
    described = f"closed with {code}" + (f" ({text})" if text else "") if code is not None else "connection lost"
    # trio-websocket reports the closes it makes itself (a message of ours it refused to
    # receive) like the backend's: those are the backend's fault, not our payload's.
    if code == 1009 and str(text).startswith("Exceeded maximum message size"):
        return SessionError(f"the backend sent a message over {MAX_MESSAGE} bytes (closed with 1009)",
                            close_code=code, retry=Retry.SESSION)
    if code == 1007 and "codec can't decode" in str(text):
        return SessionError("the backend sent text that is not UTF-8 (closed with 1007)", close_code=code,
                            retry=Retry.SESSION)
    kind = classify_close(code)
    if kind is CloseKind.REJECTED:
        if "path" in str(text).lower():
            return WrongPath(f"the backend {described}: check the URL's path (the backend's is /ws/)", close_code=code)
        return KeyRejected(f"the backend {described}: check the API key", close_code=code)
    if kind is CloseKind.TOO_BIG:
        return SessionError(f"the backend {described}: a frame is too big", close_code=code, retry=Retry.NEVER)
    if kind is CloseKind.PROTOCOL:
        return SessionError(f"the backend {described}: it refused our messages", close_code=code, retry=Retry.NEVER)
    if kind is CloseKind.SUCCESS:
        return SessionError(f"the backend {described} before 'finished'", close_code=code, retry=Retry.SESSION)
    if kind is CloseKind.SESSION:
        return SessionError(f"the backend {described}", close_code=code, retry=Retry.SESSION)
    return SessionError(f"the backend {described}", close_code=code,
                        retry=Retry.SLOW if kind is CloseKind.RETRY_SLOW else Retry.BACKOFF)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


GateState = Literal["unknown", "up", "down", "rejected"]


@attrs.define(eq=False)
class Turn:
    """One session's attempt inside the gate."""

    _gate: Gate
    _holding: bool = False

    def admitted(self, *_: Any) -> None:
        """The backend answered this session: it is up, and the other sessions may go."""
        gate = self._gate
        if gate.state != "up":
            if gate.state in ("down", "rejected"):
                log.info("backend_up", after_failures=gate.failures)
            gate.set_state("up")
        self._let_go()

    def _let_go(self) -> None:
        if self._holding:
            self._holding = False
            self._gate._probe.release()


@attrs.define
class Gate:
    """Backoff shared by every session of a process; see the module docstring."""

    retry: RetryConfig
    rng: Callable[[], float] = random.random
    state: GateState = "unknown"
    failures: int = 0
    next_attempt: float = 0.0
    handshakes: int = 0
    last_delay: float = 0.0
    probing: bool = True  # the daemon probes a rejected key again; a one-shot command does not
    # A semaphore, not a lock: the listener task lets the others go when the first answer arrives.
    _probe: trio.Semaphore = attrs.field(factory=lambda: trio.Semaphore(1))
    _state_changed: trio.Event = attrs.field(factory=trio.Event)
    _retry_now: trio.Event = attrs.field(factory=trio.Event)

    def retry_now(self) -> None:
        """End every backoff wait at once: the next attempt goes now (``caired retry-now``).

        The failure count is kept, so a backend still down backs off as before after this try.
        """
        self.next_attempt = 0.0
        event, self._retry_now = self._retry_now, trio.Event()
        event.set()

    async def backoff(self, until: float) -> None:
        """Sleep until ``until`` (trio time), or until ``retry_now()``, whichever comes first."""
        with trio.move_on_at(until):
            await self._retry_now.wait()

    def set_state(self, state: GateState) -> None:
        if state != self.state:
            self.state = state
            self._state_changed.set()

    async def wait_state_changed(self) -> None:
        """Until the backend's state changes (since the last wait returned): STATUS= follows it."""
        await self._state_changed.wait()
        self._state_changed = trio.Event()

    def is_up(self) -> bool:
        return self.state == "up"

    def delay(self, failures: int, *, slow: bool = False) -> float:
        """Full jitter: uniform in [0, min(max, initial * multiplier**(failures - 1)) * (4 if slow)]."""
        ceiling = min(self.retry.max, self.retry.initial * self.retry.multiplier ** max(0, failures - 1))
        if slow:
            ceiling = min(self.retry.max * SLOW_FACTOR, ceiling * SLOW_FACTOR)
        return self.rng() * ceiling

    @asynccontextmanager
    async def attempt(self) -> AsyncIterator[Turn]:
        """One attempt, from waiting for its turn to its end.

        While the backend is not known to be up, one session at a time is inside, until the
        backend answers it (``Turn.admitted``). A SessionError leaving the block is recorded
        (``failed``) before the next session is let in, so it waits for the new backoff.
        """
        turn = Turn(self)
        if self.state != "up":
            await self._probe.acquire()
            turn._holding = True
            if self.is_up():  # it came up while we waited: nothing to hold the others for
                turn._let_go()
        try:
            await self.backoff(self.next_attempt)
            self.handshakes += 1
            yield turn
        except SessionError as err:
            self.last_delay = self.failed(err)
            raise
        finally:
            turn._let_go()

    def succeeded(self) -> None:
        """A session finished: the backend is up and the backoff starts over."""
        if self.state in ("down", "rejected"):
            log.info("backend_up", after_failures=self.failures)
        self.failures = 0
        self.next_attempt = 0.0
        self.set_state("up")

    def failed(self, error: SessionError) -> float:
        """Record a failed attempt; returns the delay before the next one."""
        if error.retry in (Retry.NEVER, Retry.SESSION):
            return 0.0  # this session is the problem, not the backend: the session keeps its own backoff
        now = trio.current_time()
        if isinstance(error, KeyRejected):
            if self.state != "rejected":
                event = "backend_wrong_path" if isinstance(error, WrongPath) else "backend_rejected_key"
                if self.probing:
                    log.error(event, reason=error.reason, probe_seconds=self.retry.rejected_probe)
                else:
                    log.error(event, reason=error.reason)
            self.set_state("rejected")
            delay = self.retry.rejected_probe
        else:
            self.failures += 1
            if not error.connected:
                self.set_state("down")
            delay = self.delay(self.failures, slow=error.retry is Retry.SLOW)
        self.next_attempt = max(self.next_attempt, now + delay)
        return delay
