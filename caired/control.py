"""The daemon's side of ``caired retry-now``: the control file ``incoming/.caired-retry-now``.

``caired retry-now`` rewrites the file (a new inode each time); each daemon on the spool
looks at it every ``CONTROL_POLL`` seconds and, when it changed since its last look, ends
the current backoff wait of every session (``Gate.retry_now``). A file that was there
before the daemon started asks nothing. Polling, not inotify: it reaches every machine of
a shared spool, and one ``fstatat`` a second costs nothing. SIGUSR1 does the same for one
daemon (``systemctl kill -s SIGUSR1 caired``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import structlog
import trio

from caired.queue import RETRY_FILE
from caired.uplink import Gate

log = structlog.get_logger()

CONTROL_POLL: Final = 1.0

Stamp = tuple[int, int] | None  # (inode, mtime in ns) of the control file; None when there is none


class RetryFile:
    """What this process last saw of the control file."""

    def __init__(self, incoming: Path) -> None:
        self.path = incoming / RETRY_FILE
        self._seen: Stamp = self._stamp()

    def _stamp(self) -> Stamp:
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return None
        if st.st_uid not in (0, os.geteuid()):
            # incoming/ is writable by every dropper: only the service's user (or root, sudo
            # caired retry-now) may end the backoff, or any dropper could hammer the backend.
            return None
        return (st.st_ino, st.st_mtime_ns)

    def changed(self) -> bool:
        """Was the file written since the last look? (Blocks on the filesystem: call it in a thread.)"""
        now = self._stamp()
        changed = now is not None and now != self._seen
        self._seen = now
        return changed


async def serve_retry_requests(
    incoming: Path, gate: Gate, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Turn every change of the control file into ``gate.retry_now()``; runs until cancelled."""
    requests = await trio.to_thread.run_sync(RetryFile, incoming)
    task_status.started()
    while True:
        await trio.sleep(CONTROL_POLL)
        if await trio.to_thread.run_sync(requests.changed, abandon_on_cancel=True):
            retry_now(gate, "caired retry-now")


def retry_now(gate: Gate, by: str) -> None:
    log.info("backend_retry_now", by=by, backend=gate.state, failures=gate.failures)
    gate.retry_now()
