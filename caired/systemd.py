"""sd_notify without libsystemd: READY / STOPPING / RELOADING / STATUS / WATCHDOG.

systemd hands a ``Type=notify`` service the address of a datagram socket in
``$NOTIFY_SOCKET`` (a path, or an abstract name written ``@name``); each notification
is one datagram of ``KEY=value`` lines. Outside systemd the variable is unset and the
``Notifier`` does nothing, so the daemon calls it unconditionally.

A notification must never stop the daemon: a failed send is logged once (until a
send succeeds again) and otherwise ignored.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog
import trio

log = structlog.get_logger()


class Notifier:
    """Talks to the service manager over ``$NOTIFY_SOCKET``; a no-op when there is none."""

    def __init__(self, address: str | None = None, *, watchdog_usec: int | None = None) -> None:
        """``address`` is a socket path or ``@abstract-name`` (None: disabled)."""
        self._address = _socket_address(address) if address else None
        self._sock: socket.socket | None = None
        self._failing = False
        self._last_status: str | None = None
        if self._address is not None:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            except OSError as exc:
                log.warning("sd_notify_failed", error=exc.strerror or repr(exc))
            else:
                self._sock.setblocking(False)
        self.enabled: bool = self._sock is not None
        # Pet the watchdog twice per period, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval: float | None = watchdog_usec / 2 / 1_000_000 if self.enabled and watchdog_usec else None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (default: os.environ)."""
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        if address and not address.startswith(("/", "@")):
            log.warning("notify_socket_unsupported", notify_socket=address)
            address = ""
        return cls(address or None, watchdog_usec=_watchdog_usec(env))

    def notify(self, **fields: str) -> None:
        """Send ``KEY=value`` lines as one datagram; never raises."""
        self._send(fields)

    def ready(self) -> None:
        self._send({"READY": "1"})

    def stopping(self) -> None:
        self._send({"STOPPING": "1"})

    def reloading(self) -> None:
        """Tell systemd a reload began; send ``ready()`` again when it is done."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send({"RELOADING": "1", "MONOTONIC_USEC": str(now_usec)})

    def status(self, text: str) -> None:
        """One line for ``systemctl status``; sent only when it differs from the last one sent."""
        line = " ".join(text.split())
        if not self.enabled or line == self._last_status:
            return
        if self._send({"STATUS": line}):
            self._last_status = line

    def watchdog(self) -> None:
        self._send({"WATCHDOG": "1"})

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self.enabled = False
        self.watchdog_interval = None
        if sock is not None:
            sock.close()

    def _send(self, fields: Mapping[str, str]) -> bool:
        if self._sock is None or self._address is None:
            return False
        # A newline inside a value would start a new assignment: keep each on its line.
        message = "".join(f"{key}={' '.join(str(value).splitlines())}\n" for key, value in fields.items())
        try:
            self._sock.sendto(message.encode("utf-8"), self._address)
        except OSError as exc:
            if not self._failing:
                self._failing = True
                log.warning("sd_notify_failed", fields=sorted(fields), error=exc.strerror or repr(exc))
            return False
        self._failing = False
        return True


async def serve_watchdog(notifier: Notifier, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Send WATCHDOG=1 every ``watchdog_interval`` from the event loop, forever.

    The pings come from a trio task, not a thread, so an event loop that stops
    turning stops them and systemd restarts the service. Returns at once (after
    ``started()``) when systemd asked for no watchdog.
    """
    interval = notifier.watchdog_interval
    task_status.started()
    if not interval:
        return
    deadline = trio.current_time()
    while True:
        notifier.watchdog()
        # Keep the beat on a fixed grid; after a stall, start a new grid from now.
        deadline = max(deadline + interval, trio.current_time())
        await trio.sleep_until(deadline)


def _socket_address(address: str) -> str:
    return "\0" + address[1:] if address.startswith("@") else address


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC when it is meant for this process (WATCHDOG_PID unset or ours)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec
