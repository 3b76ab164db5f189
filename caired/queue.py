"""The operator's view of the spool, and the operator's hand on it (``caired queue``,
``requeue``, ``hold``, ``release``, ``delete``, ``retry-now``).

Reading (``entries``) opens every folder relative to its room's descriptor and reads its
control files with the spool's own caps; it takes no lock, so it is safe while daemons
run, on one machine or on many sharing the spool. Whether a folder of ``active/`` is being
streamed is ``fsops.lock_is_held`` (``F_OFD_GETLK`` on a read-only descriptor, which takes
nothing). Which process holds it is found in ``/proc``: OFD locks carry no pid, so the
holder is the process with a descriptor of the lock file whose ``fdinfo`` lists the lock;
another machine's daemon, or another user's process, shows as unknown.

Acting follows the daemon's rules. A folder is opened, its lock file opened (created if
need be) relative to it and locked with ``F_OFD_SETLK`` without waiting; a lock someone
holds means the folder is busy and the action is refused. Under the lock the name is
checked to still be the folder locked, then the folder is changed and moved by one
``rename`` that never replaces (``fsops.move_unique``), and the lock is let go: an
operator command never keeps a lock, and never moves a folder that a process holds.

* ``hold`` writes ``.caired-hold`` into a folder of ``incoming/`` under its lock; the
  spool's ``scan`` skips such a folder and ``claim`` checks the marker under the same
  lock, so a hold and a claim never cross. ``release`` removes it.
* ``requeue`` moves a ``failed/`` folder back to ``incoming/`` (marked ``.ready``) under its
  own datapt_id: ``error.json`` becomes ``error.previous.json`` and the crash count starts
  over (a quarantined folder would otherwise be quarantined again at once). A ``done/``
  folder goes back only as a new datapoint (``new_datapoint``): a fresh datapt_id, its
  result kept beside it as ``result.<old datapt_id>.json``.
* ``delete`` renames the folder out of its room into ``tmp/`` first (one atomic step, so
  nothing ever sees half a folder), then removes it there. Should the command die midway,
  the daemon's recovery removes the rest, as it does the staging of a dead recording.
* ``retry_now`` writes the control file ``incoming/.caired-retry-now``; every daemon on the
  spool sees its change within a second and ends its current backoff wait.

Names are bytes until shown: a NAME on the command line is matched as given (a name that
is not UTF-8 arrives with its bytes intact) or as ``caired queue`` shows it (``\\xNN``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import socket
import stat
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import attrs

from caired import fsops
from caired.errors import CairedError, SpoolError
from caired.fsops import GONE, shown
from caired.settle import READY_MARKER, Settler
from caired.spool import (
    CONTROL_FILE_CAP,
    ERROR_FILE,
    FRAME_SUFFIXES,
    HOLD_MARKER,
    LOCK_FILE,
    NEW_PREFIX,  # a folder being deleted is staged like a recording being built: recovery cleans both
    PREVIOUS_ERROR_FILE,
    RESULT_FILE,
    SESSION_FILE,
    Claim,
    validate_session,
)

ROOMS: Final = ("incoming", "active", "done", "failed")
STATES: Final = ("ready", "settling", "held", "active", "orphaned", "done", "failed")
RETRY_FILE: Final = ".caired-retry-now"  # in incoming/: its change ends every daemon's backoff wait
_POKE_PREFIX: Final = ".caired-poke-"

# Exit codes of the acting commands (sysexits.h).
EX_DATAERR: Final = 65  # the folder is in a state the action does not apply to
EX_NOINPUT: Final = 66  # no such folder
EX_CANTCREAT: Final = 73  # the spool cannot be written
EX_TEMPFAIL: Final = 75  # a process holds the folder: try again later


class Refused(CairedError):
    """An operator action refused for one folder; ``status`` is the exit code it means."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------
# Reading


@attrs.frozen(kw_only=True)
class Entry:
    """One folder of the spool as ``caired queue`` shows it (``as_json`` documents the fields)."""

    room: str
    name: str  # as on disk (str with surrogates when not UTF-8)
    state: str
    changed_at: float  # the folder's ctime: when it arrived in its room or was last written
    frames: int
    datapt_id: str | None = None
    attempts: int | None = None
    crashes: int | None = None
    source: str | None = None
    first_claimed_at: str | None = None
    hr: float | None = None
    reason: str | None = None
    error_type: str | None = None
    close_code: int | None = None
    holder_pid: int | None = None
    problem: str | None = None  # why some of it could not be read

    def as_json(self, now: float) -> dict[str, Any]:
        raw = os.fsencode(self.name)
        record: dict[str, Any] = {
            "name": shown(self.name),
            "name_hex": raw.hex() if shown(self.name).encode() != raw else None,
            "room": self.room,
            "state": self.state,
            "since": datetime.fromtimestamp(self.changed_at, UTC).isoformat(timespec="seconds").replace(
                "+00:00", "Z"),
            "age_seconds": round(max(0.0, now - self.changed_at), 1),
            "frames": self.frames,
            "attempts": self.attempts,
            "crashes": self.crashes,
            "datapt_id": self.datapt_id,
            "source": self.source,
            "first_claimed_at": self.first_claimed_at or None,
            "hr": self.hr,
            "reason": self.reason,
            "error_type": self.error_type,
            "close_code": self.close_code,
            "holder_pid": self.holder_pid,
            "problem": self.problem,
        }
        return record


def entries(root: Path, *, settle_seconds: float = 5.0, states: Iterable[str] = (),
            now: float | None = None) -> list[Entry]:
    """Every folder of the spool's rooms, oldest change first within each room; only ``states``
    when given. Takes no lock; a folder that vanishes while it is looked at is left out."""
    wanted = set(states) or set(STATES)
    now = time.time() if now is None else now
    settler = Settler(settle_seconds, lambda: now)
    holders: dict[tuple[int, int], int] | None = None
    found: list[Entry] = []
    for room in ROOMS:
        if room == "incoming" and not wanted & {"ready", "settling", "held"}:
            continue
        if room == "active" and not wanted & {"active", "orphaned"}:
            continue
        if room in ("done", "failed") and room not in wanted:
            continue
        try:
            room_fd = fsops.open_dir(root / room)
        except OSError as exc:
            raise SpoolError(f"cannot read {root / room}: {exc.strerror or exc}; is {root} a caired spool "
                             "(set [spool] dir or --spool)?", path=root / room, code=exc.errno) from None
        try:
            listed = sorted(os.scandir(room_fd), key=lambda e: e.name)
            for dirent in listed:
                if dirent.name.startswith(".") or not dirent.is_dir(follow_symlinks=False):
                    continue
                if room == "active" and holders is None:
                    holders = lock_holders()
                entry = _look(room_fd, room, dirent.name, settler, holders or {})
                if entry is not None and entry.state in wanted:
                    found.append(entry)
        finally:
            os.close(room_fd)
    order = {room: i for i, room in enumerate(ROOMS)}
    found.sort(key=lambda e: (order[e.room], e.changed_at, e.name))
    return found


def _look(room_fd: int, room: str, name: str, settler: Settler, holders: dict[tuple[int, int], int]) -> Entry | None:
    try:
        folder = fsops.open_dir(name, dir_fd=room_fd)
    except OSError as exc:
        if exc.errno in GONE or exc.errno == errno.ELOOP:
            return None
        return Entry(room=room, name=name, state=_room_state(room), changed_at=0.0, frames=0,
                     problem=f"cannot be read: {exc.strerror or exc}")
    try:
        st = os.fstat(folder)
        fields: dict[str, Any] = {}
        problems: list[str] = []
        frames = 0
        try:
            frames = _count_frames(folder)
        except OSError as exc:
            problems.append(f"cannot list it: {exc.strerror or exc}")
        session = _read_json(folder, SESSION_FILE, problems)
        if session is not None:
            try:
                valid = validate_session(session, name)
            except ValueError as exc:
                problems.append(f"{SESSION_FILE} is invalid: {exc}")
            else:
                fields.update({k: valid[k] for k in ("datapt_id", "attempts", "crashes", "source", "first_claimed_at")})
        if room == "done":
            result = _read_json(folder, RESULT_FILE, problems)
            if isinstance(result, dict):
                hr = result.get("hr")
                fields["hr"] = float(hr) if isinstance(hr, int | float) and not isinstance(hr, bool) else None
        if room == "failed":
            error = _read_json(folder, ERROR_FILE, problems)
            if isinstance(error, dict):
                fields["reason"] = _text(error.get("reason"))
                fields["error_type"] = _text(error.get("error_type"))
                code = error.get("close_code")
                fields["close_code"] = code if isinstance(code, int) and not isinstance(code, bool) else None
        state = _room_state(room)
        if room == "incoming":
            if fsops.lexists(folder, HOLD_MARKER):
                state = "held"
            else:
                try:
                    state = "ready" if settler.wait(folder, name) <= 0 else "settling"
                except OSError:
                    state = "settling"
        elif room == "active":
            if fsops.lock_is_held(folder, LOCK_FILE):
                state = "active"
                with contextlib.suppress(OSError):
                    lock = os.stat(LOCK_FILE, dir_fd=folder, follow_symlinks=False)
                    fields["holder_pid"] = holders.get((lock.st_dev, lock.st_ino))
            else:
                state = "orphaned"
        return Entry(room=room, name=name, state=state, changed_at=st.st_ctime, frames=frames,
                     problem="; ".join(problems) or None, **fields)
    finally:
        os.close(folder)


def _room_state(room: str) -> str:
    return {"incoming": "settling", "active": "active", "done": "done", "failed": "failed"}[room]


def _text(value: Any) -> str | None:
    return value[:500] if isinstance(value, str) else None


def _count_frames(folder: int) -> int:
    count = 0
    for dirent in os.scandir(folder):
        if dirent.name.lower().endswith(FRAME_SUFFIXES) and dirent.is_file(follow_symlinks=False):
            count += 1
    return count


def _read_json(folder: int, name: str, problems: list[str]) -> Any:
    try:
        return json.loads(fsops.read_regular(folder, name, CONTROL_FILE_CAP))
    except FileNotFoundError:
        return None
    except OSError as exc:
        problems.append(f"{name}: {exc.strerror or exc}")
    except (ValueError, RecursionError):
        problems.append(f"{name} is not valid JSON")
    return None


def lock_holders(proc: Path = Path("/proc")) -> dict[tuple[int, int], int]:
    """``{(device, inode): pid}`` of every file on which a process of this machine, visible to
    this user, holds an OFD lock through one of its descriptors (``/proc/PID/fdinfo`` lists
    the locks held through each descriptor)."""
    found: dict[tuple[int, int], int] = {}
    try:
        pids = [int(p) for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            fds = os.listdir(proc / str(pid) / "fdinfo")
        except OSError:
            continue
        for fd in fds:
            try:
                info = (proc / str(pid) / "fdinfo" / fd).read_bytes()
                if b"OFDLCK" not in info:
                    continue
                st = os.stat(proc / str(pid) / "fd" / fd)
            except OSError:
                continue
            found[(st.st_dev, st.st_ino)] = pid
    return found


# ---------------------------------------------------------------------------------------------
# Finding a folder by the name the operator gave


@attrs.frozen
class Where:
    room: str
    name: str


def locate(root: Path, given: str, rooms: Iterable[str] = ROOMS) -> Where:
    """The one folder ``given`` names: ``NAME`` or ``ROOM/NAME``, as on disk or as shown.

    Refused (66) when there is none; refused (65) when the name is in several rooms.
    """
    room_given, _, rest = given.partition("/")
    if rest and room_given in ROOMS:
        rooms, given = (room_given,), rest
    matches: list[Where] = []
    for room in rooms:
        try:
            names = os.listdir(os.fsencode(root / room))
        except OSError as exc:
            raise SpoolError(f"cannot read {root / room}: {exc.strerror or exc}; is {root} a caired spool?",
                             path=root / room, code=exc.errno) from None
        decoded = [os.fsdecode(n) for n in names if not n.startswith(b".")]
        exact = [n for n in decoded if n == given]
        hits = exact or [n for n in decoded if shown(n) == given]
        matches.extend(Where(room, n) for n in hits)
    if not matches:
        raise Refused(f"{shown(given)}: no such folder in {', '.join(r + '/' for r in rooms)}", EX_NOINPUT)
    if len(matches) > 1:
        places = ", ".join(f"{m.room}/{shown(m.name)}" for m in matches)
        raise Refused(f"{shown(given)} is in several places ({places}): name one as ROOM/NAME", EX_DATAERR)
    return matches[0]


# ---------------------------------------------------------------------------------------------
# Acting: the lock, taken and let go


@attrs.define
class _Locked:
    room_fd: int
    folder_fd: int
    lock_fd: int


@contextlib.contextmanager
def _locked(root: Path, where: Where) -> Iterator[_Locked]:
    """The folder open and locked for the length of the block; Refused (75) when a process
    holds it, (66) when it is gone. The lock is let go when the block ends."""
    label = f"{where.room}/{shown(where.name)}"
    room_fd = fsops.open_dir(root / where.room)
    try:
        try:
            folder_fd = fsops.open_dir(where.name, dir_fd=room_fd)
        except OSError as exc:
            if exc.errno in GONE or exc.errno == errno.ELOOP:
                raise Refused(f"{label}: no such folder (it was just moved)", EX_NOINPUT) from None
            raise _spool_error(label, exc) from None
        try:
            try:
                lock_fd = fsops.open_lock_file(folder_fd, LOCK_FILE)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                    raise Refused(f"{label}/{LOCK_FILE} is not a regular file; remove it first", EX_DATAERR) from None
                raise _spool_error(label, exc) from None
            try:
                if not stat.S_ISREG(os.fstat(lock_fd).st_mode):
                    raise Refused(f"{label}/{LOCK_FILE} is not a regular file; remove it first", EX_DATAERR)
                if not fsops.try_lock(lock_fd):
                    busy = "being streamed" if where.room == "active" else "being worked on"
                    raise Refused(f"{label} is {busy} by another process; try again later", EX_TEMPFAIL)
                if not (fsops.same_inode(folder_fd, where.name, dir_fd=room_fd)
                        and fsops.same_inode(lock_fd, LOCK_FILE, dir_fd=folder_fd)):
                    raise Refused(f"{label} was moved or replaced meanwhile; look again with caired queue",
                                  EX_TEMPFAIL)
                yield _Locked(room_fd, folder_fd, lock_fd)
            finally:
                os.close(lock_fd)  # its only descriptor: closing it lets the lock go
        finally:
            os.close(folder_fd)
    finally:
        os.close(room_fd)


def _spool_error(label: str, exc: OSError) -> SpoolError:
    return SpoolError(f"{label}: {exc.strerror or exc}; check the spool's permissions", code=exc.errno)


def _holder_note(root: Path, where: Where) -> str:
    """`` (pid N)`` for the process holding a folder of active/, when this machine can tell."""
    try:
        st = os.stat(root / where.room / where.name / LOCK_FILE, follow_symlinks=False)
    except OSError:
        return ""
    pid = lock_holders().get((st.st_dev, st.st_ino))
    return f" (pid {pid})" if pid is not None else ""


def _refuse_active(root: Path, where: Where, action: str) -> Refused:
    label = f"active/{shown(where.name)}"
    try:
        with fsops.opened_dir(root / "active") as room, fsops.opened_dir(where.name, dir_fd=room) as folder:
            held = fsops.lock_is_held(folder, LOCK_FILE)
    except OSError:
        held = False
    if held:
        return Refused(f"{label} is being streamed{_holder_note(root, where)}; {action} it once it is filed",
                       EX_TEMPFAIL)
    return Refused(f"{label} is not held by any process here: its daemon died, and the next rescan of a daemon "
                   "gives it back to incoming/", EX_TEMPFAIL)


def _poke(root: Path) -> None:
    """Wake the daemons watching incoming/: a dot-file created and removed at once (inotify
    sees it; scans skip dot-names). Best effort: the periodic rescan finds the change anyway."""
    name = f"{_POKE_PREFIX}{secrets.token_hex(4)}"
    with contextlib.suppress(OSError), fsops.opened_dir(root / "incoming") as incoming:
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o660,
                         dir_fd=incoming))
        os.unlink(name, dir_fd=incoming)


def hold(root: Path, given: str) -> str:
    """Put a folder of incoming/ on hold. Returns what was done, in a few words."""
    where = locate(root, given)
    label = f"{where.room}/{shown(where.name)}"
    if where.room == "active":
        raise _refuse_active(root, where, "hold")
    if where.room != "incoming":
        raise Refused(f"{label} is already filed; only a folder of incoming/ can be held", EX_DATAERR)
    with _locked(root, where) as held:
        if fsops.lexists(held.folder_fd, HOLD_MARKER):
            return f"{label} was already held"
        stamp = {"held_at": _iso(time.time()), "by": _who()}
        try:
            fsops.write_atomic(held.folder_fd, HOLD_MARKER, fsops.json_bytes(stamp))
        except OSError as exc:
            raise _spool_error(label, exc) from None
    return f"held {label}"


def release(root: Path, given: str) -> str:
    """Take a folder of incoming/ off hold; the daemons are woken to look at it."""
    where = locate(root, given)
    label = f"{where.room}/{shown(where.name)}"
    if where.room != "incoming":
        raise Refused(f"{label} is not on hold (only a folder of incoming/ can be)", EX_DATAERR)
    with _locked(root, where) as held:
        if not fsops.lexists(held.folder_fd, HOLD_MARKER):
            return f"{label} was not held"
        try:
            os.unlink(HOLD_MARKER, dir_fd=held.folder_fd)
        except OSError as exc:
            raise _spool_error(label, exc) from None
    _poke(root)
    return f"released {label}"


def requeue(root: Path, given: str, *, new_datapoint: bool = False) -> str:
    """Move a failed/ folder (or, as a new datapoint, a done/ one) back to incoming/."""
    where = locate(root, given)
    label = f"{where.room}/{shown(where.name)}"
    if where.room == "active":
        raise _refuse_active(root, where, "requeue")
    if where.room == "incoming":
        raise Refused(f"{label} is already waiting in incoming/", EX_DATAERR)
    if where.room == "done" and not new_datapoint:
        raise Refused(f"{label} was streamed and has its result; requeue it as a new datapoint with "
                      "--new-datapoint", EX_DATAERR)
    with _locked(root, where) as held:
        folder = held.folder_fd
        if _count_frames(folder) == 0:
            raise Refused(f"{label} has no frames left to stream (deleted after it was done: keep_frames = false)",
                          EX_DATAERR)
        problems: list[str] = []
        data = _read_json(folder, SESSION_FILE, problems)
        session: dict[str, Any] | None = None
        if data is not None:
            with contextlib.suppress(ValueError):
                session = validate_session(data, where.name)
        name = session["name"] if session is not None else where.name
        try:
            old_id = session["datapt_id"] if session is not None else None
            if where.room == "done":
                aside = f"result.{old_id or 'previous'}.json"
                fsops.move_unique(folder, RESULT_FILE, folder, aside)
            if where.room == "failed" and fsops.lexists(folder, ERROR_FILE):
                os.replace(ERROR_FILE, PREVIOUS_ERROR_FILE, src_dir_fd=folder, dst_dir_fd=folder)
            datapt_id = old_id
            if new_datapoint or session is None:
                datapt_id = str(uuid.uuid4())
                fresh = Claim(name=name, root=root, folder=where.name, datapt_id=datapt_id,
                              source=session["source"] if session is not None else "drop")
            else:
                assert session is not None
                fresh = Claim(name=name, root=root, folder=where.name, datapt_id=session["datapt_id"],
                              attempts=session["attempts"], source=session["source"],
                              first_claimed_at=session["first_claimed_at"])  # crashes start over
            fsops.write_atomic(folder, SESSION_FILE, fsops.json_bytes(fresh.session()))
            with contextlib.suppress(OSError):
                os.close(os.open(READY_MARKER, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                                 0o660, dir_fd=folder))
            with fsops.opened_dir(root / "incoming") as incoming:
                moved = fsops.move_unique(held.room_fd, where.name, incoming, name)
                fsops.fsync_dirs_quietly(incoming, held.room_fd)
        except OSError as exc:
            raise _spool_error(label, exc) from None
    note = f"a new datapoint {datapt_id}" if datapt_id != old_id else f"datapt_id {datapt_id}"
    return f"requeued {label} -> incoming/{shown(moved)} ({note})"


def delete(root: Path, given: str, *, force: bool = False) -> str:
    """Remove a folder of done/ or failed/; with ``force`` also one of incoming/ (never streamed)
    or an orphan of active/. A folder a process holds is never touched."""
    where = locate(root, given)
    label = f"{where.room}/{shown(where.name)}"
    if where.room in ("incoming", "active") and not force:
        what = "has not been streamed yet" if where.room == "incoming" else "is in active/"
        raise Refused(f"{label} {what}; add --force to delete it all the same", EX_DATAERR)
    with _locked(root, where) as held:
        staging = f"{NEW_PREFIX}deleted-{uuid.uuid4().hex}"
        try:
            with fsops.opened_dir(root / "tmp") as tmp:
                fsops.rename_noreplace(held.room_fd, where.name, tmp, staging)
                fsops.fsync_dirs_quietly(held.room_fd)
                for child in os.scandir(held.folder_fd):
                    if child.name == LOCK_FILE:
                        continue
                    if child.is_dir(follow_symlinks=False):
                        fsops.remove_tree(held.folder_fd, child.name)
                    else:
                        os.unlink(child.name, dir_fd=held.folder_fd)
        except OSError as exc:
            raise _spool_error(label, exc) from None
    with contextlib.suppress(OSError), fsops.opened_dir(root / "tmp") as tmp:  # the lock is let go: now the rest
        with fsops.opened_dir(staging, dir_fd=tmp) as folder:
            os.unlink(LOCK_FILE, dir_fd=folder)
        os.rmdir(staging, dir_fd=tmp)
    return f"deleted {label}"


def retry_now(root: Path) -> str:
    """Ask every daemon on the spool to end its backoff wait and try the backend at once."""
    try:
        with fsops.opened_dir(root / "incoming") as incoming:
            fsops.write_atomic(incoming, RETRY_FILE, fsops.json_bytes({"requested_at": _iso(time.time()),
                                                                        "by": _who()}))
    except OSError as exc:
        raise SpoolError(f"cannot write {root / 'incoming' / RETRY_FILE}: {exc.strerror or exc}; run it as a user "
                         "of caired's group", path=root / "incoming", code=exc.errno) from None
    return "asked the daemons on this spool to try the backend now"


def _iso(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _who() -> str:
    try:
        user = os.getlogin()
    except OSError:
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"



def count_held(root: Path) -> int:
    """Folders of incoming/ on hold (for the metrics); 0 when incoming/ cannot be read."""
    held = 0
    try:
        with fsops.opened_dir(root / "incoming") as incoming:
            for dirent in os.scandir(incoming):
                if dirent.name.startswith(".") or not dirent.is_dir(follow_symlinks=False):
                    continue
                with contextlib.suppress(OSError), fsops.opened_dir(dirent.name, dir_fd=incoming) as folder:
                    held += fsops.lexists(folder, HOLD_MARKER)
    except OSError:
        return 0
    return held
