"""A claimed folder and its session file: what a claim holds, and what the file may say.

``.caired-session.json`` travels inside the folder: ``datapt_id`` (a canonical UUIDv4, the
same for every attempt, across releases and restarts), ``attempts``, ``crashes``,
``in_attempt``, ``first_claimed_at``, ``source`` and the folder's ``name`` as dropped
(escaped when it is not UTF-8, with ``name_hex`` holding its bytes). Everything in it may
come from a dropper, so ``validate_session`` checks each field before anything uses it.
The spool (``caired.spool``) makes and moves claims; a claim writes only into its own folder,
through the descriptor it holds.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import attrs
import structlog

from caired import __version__, fsops
from caired.errors import SpoolError
from caired.fsops import shown
from caired.protocol import UUID4_RE

log = structlog.get_logger()

SESSION_FILE: Final = ".caired-session.json"
SOURCES: Final = frozenset({"drop", "camera", "record"})
MAX_ATTEMPTS_RECORDED: Final = 10**9


def spool_error(
    action: str, path: Path | str, exc: BaseException, advice: str, *, kind: type[SpoolError] = SpoolError
) -> SpoolError:
    reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
    return kind(f"cannot {action} {shown(str(path))}: {reason}; {advice}", path=Path(path),
                code=getattr(exc, "errno", None))


def check_name(name: str) -> None:
    """ValueError unless ``name`` can be a folder of the spool (no path, no dot-name, fits)."""
    if not name or name.startswith(".") or "/" in name or "\0" in name or len(os.fsencode(name)) > fsops.NAME_MAX:
        raise ValueError(f"not a spool folder name: {shown(name)!r}")


def now_iso(clock: Callable[[], float]) -> str:
    return datetime.fromtimestamp(clock(), UTC).isoformat()


def validate_session(data: Any, folder_name: str) -> dict[str, Any]:
    """The session file's content, checked field by field; ValueError says what is wrong.

    Everything in it may come from a dropper: the datapt_id must be a canonical UUIDv4 (it
    goes on the wire), counts small non-negative integers, the source a known one, the name
    a valid folder name (else the folder's own name is used).
    """
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    datapt_id = data.get("datapt_id")
    if not isinstance(datapt_id, str) or not UUID4_RE.match(datapt_id):
        raise ValueError("datapt_id is not a canonical UUIDv4")
    counts = {}
    for key in ("attempts", "crashes"):
        value = data.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ATTEMPTS_RECORDED:
            raise ValueError(f"{key} is not a count")
        counts[key] = value
    in_attempt = data.get("in_attempt", False)
    if not isinstance(in_attempt, bool):
        raise ValueError("in_attempt is not true or false")
    source = data.get("source", "drop")
    if not isinstance(source, str) or source not in SOURCES:  # a list or an object cannot even be looked up
        raise ValueError(f"source is not one of {', '.join(sorted(SOURCES))}")
    first = data.get("first_claimed_at", "")
    if not isinstance(first, str) or len(first) > 64:
        raise ValueError("first_claimed_at is not a time")
    name = _stored_name(data) or folder_name
    return {"datapt_id": datapt_id, **counts, "in_attempt": in_attempt, "source": source,
            "first_claimed_at": first, "name": name}


def _stored_name(data: dict[str, Any]) -> str | None:
    raw: bytes | None = None
    if isinstance(data.get("name_hex"), str):
        with contextlib.suppress(ValueError):
            raw = bytes.fromhex(data["name_hex"])
    elif isinstance(data.get("name"), str):
        raw = data["name"].encode("utf-8", "surrogatepass")
    if raw is None:
        return None
    name = os.fsdecode(raw)
    try:
        check_name(name)
    except ValueError:
        return None
    return name


@attrs.define(eq=False)
class Claim:
    """One folder held by this process until finished, failed or released.

    ``name`` is the folder's name as dropped; ``folder`` its name inside the spool folder
    ``where`` (``active`` while held; then ``done``, ``failed`` or ``incoming``). The claim
    keeps the folder itself open (every write into it goes through that descriptor) and its
    lock file open and locked; ``key`` is the folder's (device, inode), which ``recover`` skips.
    """

    name: str
    root: Path
    folder: str
    datapt_id: str
    attempts: int = 0
    source: str = "drop"
    first_claimed_at: str = ""
    crashes: int = 0
    in_attempt: bool = False
    where: str = "active"
    _dir_fd: int | None = attrs.field(default=None, repr=False, alias="dir_fd")
    _lock_fd: int | None = attrs.field(default=None, repr=False, alias="lock_fd")
    _key: tuple[int, int] = attrs.field(default=(0, 0), repr=False, alias="key")

    @property
    def path(self) -> Path:
        """Where the folder is now (for messages and for readers that take a path)."""
        return self.root / self.where / self.folder

    @property
    def shown(self) -> str:
        """The name as dropped, fit for a log line."""
        return shown(self.name)

    @property
    def held(self) -> bool:
        """True while the folder is in active/ and locked by this claim."""
        return self._lock_fd is not None

    @property
    def dir_fd(self) -> int:
        self._check_held()
        assert self._dir_fd is not None
        return self._dir_fd

    def session(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "datapt_id": self.datapt_id,
            "attempts": self.attempts,
            "crashes": self.crashes,
            "in_attempt": self.in_attempt,
            "first_claimed_at": self.first_claimed_at,
            "source": self.source,
            "name": self.shown,
        }
        raw = os.fsencode(self.name)
        if raw.decode("utf-8", "replace").encode() != raw:
            data["name_hex"] = raw.hex()
        return data

    def begin_attempt(self) -> int:
        """Count one more streaming attempt, marked as under way, and make it durable before
        streaming: if the process dies during the attempt, recovery sees it. Returns the count.
        SpoolError (nothing changed) if it cannot be written."""
        self._check_held()
        before = (self.attempts, self.in_attempt)
        self.attempts += 1
        self.in_attempt = True
        try:
            self._write_session()
        except SpoolError:
            self.attempts, self.in_attempt = before
            raise
        return self.attempts

    def end_attempt(self) -> None:
        """The attempt ended (well or not) without killing the process. Best effort: a failure
        is logged, and at worst counts one crash too many."""
        if not self.in_attempt or not self.held:
            return
        self.in_attempt = False
        try:
            self._write_session()
        except SpoolError as err:
            log.warning("session_file_not_written", reason=str(err))

    def _write_session(self) -> None:
        try:
            fsops.write_atomic(self.dir_fd, SESSION_FILE, fsops.json_bytes(self.session()))
        except OSError as exc:
            raise spool_error("write", self.path / SESSION_FILE, exc,
                               "free space on the spool's filesystem or fix its permissions") from exc

    def _check_held(self) -> None:
        if self._lock_fd is None:
            raise RuntimeError(f"the claim on {self.shown} is no longer held (it moved to {self.path})")

    def _close(self) -> None:
        fds, self._lock_fd, self._dir_fd = (self._lock_fd, self._dir_fd), None, None
        for fd in fds:  # the lock's only descriptor: closing it releases the lock
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)



def error_record(claim: Claim, reason: str, *, error_type: str, close_code: int | None = None) -> dict[str, Any]:
    """What error.json says: enough for a person to act without the log."""
    return {
        "session": claim.shown,
        "datapt_id": claim.datapt_id,
        "reason": reason,
        "error_type": error_type,
        "close_code": close_code,
        "attempts": claim.attempts,
        "crashes": claim.crashes,
        "failed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "caired_version": __version__,
    }
