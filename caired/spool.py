"""The drop-folder spool: ``incoming/`` -> ``active/`` -> ``done/`` | ``failed/``.

Layout of ``[spool] dir`` (all on one filesystem, so every move is one atomic ``rename``)::

    incoming/   users drop folders of frames here (names starting with '.' are ignored)
    active/     folders being streamed; each one's lock file is locked by the process streaming it
    done/       finished sessions, each with result.json
    failed/     permanent failures, each with error.json
    tmp/        staging area for recordings and droppers; never scanned

When is a dropped folder complete?
    A folder still being written must never be streamed half-way, so a folder in
    ``incoming/`` is *ready* when one of these holds:

    1. it holds the marker file ``.ready`` (the writer says so);
    2. it has been quiet for ``settle_seconds``. "Quiet since" is the newest of: the
       folder's own mtime, and the mtime and ctime of every entry below it (recursively,
       symlinks not followed). When this process has looked at the folder before and its
       signature (names, sizes, mtimes, ctimes of the entries, and the folder's mtime)
       changed since, the change we saw ourselves counts too: quiet since the look that
       saw it. So the rule is ``now - quiet_since >= settle_seconds``.

    Why this is safe for the usual ways of dropping a folder:

    * ``mv`` of a folder written earlier (the recommended way: write beside, in ``tmp/``
      or a dot-name, then ``mv``): the rename changes only the folder's ctime, which is
      not used for the folder itself; its mtime and its entries' times are old, so it is
      ready at first sight.
    * ``cp -r`` / a program writing frames: every file created updates the folder's
      mtime, and a file being written has a recent mtime, so the folder settles
      ``settle_seconds`` after the last write.
    * ``cp -a`` / ``rsync -a`` / ``tar x`` restore old mtimes, on each file after writing
      it and on the folder last of all. The folder's mtime stays recent until the very
      end, and ``utime`` sets an entry's ctime to now (ctime cannot be forged), so the
      entries' ctimes keep the folder busy until ``settle_seconds`` after the copy ended.
      Without ctimes there would be a window between restoring one long file's mtime and
      creating the next file where the folder looks old.
    * A folder whose mtimes lie in the future (a camera with a wrong clock): quiet-since
      never counts later than this process's first look at that exact signature.

    Limits: a writer that pauses longer than ``settle_seconds`` between two files gets its
    folder streamed half-way; such writers must use ``mv`` or ``.ready``. The memory of
    earlier looks is lost on restart, which only removes the extra evidence, never the
    mtime/ctime rule. On network filesystems the times come from the server's clock.

Claiming (Maildir's way)
    Several caired processes may share one spool, on one machine or on several machines
    mounting it over NFS. Ownership of a folder is a lock on its lock file ``.caired-lock``
    (hidden, inside the folder, so it travels with every rename). ``claim`` opens the folder
    in ``incoming/``, opens (creating it if need be) the lock file relative to the folder's
    descriptor, and takes a whole-file write lock on it with ``F_OFD_SETLK`` without waiting.
    It then checks that the path still names the locked folder and that the folder's lock
    file is still the file locked (a lock on a lock file unlinked meanwhile would guard
    nothing), and renames the folder to ``active/``. A process that loses the lock race or
    finds the folder gone gets ``None``. The lock is held until the folder leaves
    ``active/``; ``recover`` treats a folder of ``active/`` whose lock it can take as
    orphaned (its owner died) and moves it on.

    Why open file description (OFD) locks: like flock they belong to the open file
    description, not to the process, so a second open of the lock file in this process
    conflicts with a held claim (this process's own claims look alive to itself) and
    closing some other descriptor of the file releases nothing, which traditional POSIX
    record locks would do. Unlike flock on a folder, Linux maps them onto NFS byte-range
    locks (NLM for NFSv3, NFSv4 locks), which the server arbitrates between machines; that
    needs a regular file open for writing, hence the lock file. A filesystem that refuses
    even these locks (ENOLCK, EOPNOTSUPP..., or EACCES while nobody holds the lock) makes
    ``claim`` and ``recover`` fail with a SpoolError that says so. NFS mounted with
    ``nolock`` or ``local_lock=posix|all`` refuses nothing: it keeps the locks on the client,
    where other machines never see them, so ``prepare`` looks the spool's mount up in
    ``/proc/self/mountinfo`` and refuses such a mount.

    The lock goes with its holder: kill -9 or a crash closes the descriptor and frees it at
    once on a local filesystem. On NFS the server frees the locks of a machine that died
    when its lease expires (NFSv4: 90 s by default, ``/proc/fs/nfsd/nfsv4leasetime``), so
    that machine's folders are recovered by the first rescan after that; with NFSv3 (NLM)
    only when the dead machine boots again and its statd tells the server, so prefer NFSv4.
    A live machine cut off from the server for longer than the lease loses its locks the
    same way, and its folders may be streamed again elsewhere. The checks by name go through
    the NFS client's lookup cache, which may lag the server by up to ``acdirmax`` (60 s)
    after a name comes to mean another folder, while renames go by name on the server. So
    once a folder has been claimed and finished and another is dropped under its name, a
    machine whose cache still shows the first folder may, in ``claim``, lock that one and
    move the new one; and, in ``recover``, find the first folder's lock free under the
    name in ``active/`` and move back to ``incoming/`` the folder another machine is
    streaming under that name now, which then gets streamed twice. Mount the spool with
    ``lookupcache=none`` (every name checked with the server) whenever droppers may reuse
    folder names.

    The lock file of a session folder is never deleted, also not in ``done/`` and
    ``failed/``: it is empty and hidden, another process may have just opened it, and
    deleting an open file on NFS leaves a ``.nfs...`` file behind. Frame deletion
    (``keep_frames = false``) deletes PNG frames only; only the staging folders of dead
    ``create_active`` calls are removed whole. A folder in ``active/`` without a
    lock file was left by an older caired that locked the folder itself with flock:
    ``recover`` creates the lock file, takes the lock and moves the folder on like any
    orphan. Older caired versions do not see these locks (nor this one theirs), so stop
    every older caired on a spool before starting this one.

The datapoint session file
    ``.caired-session.json`` travels inside the folder: ``datapt_id`` (a uuid4, the same
    for every attempt, across releases and restarts), ``attempts``, ``first_claimed_at``,
    ``source`` and the folder's ``name`` in incoming/ when it was claimed. It stays in done/
    and failed/ folders.

Crash safety (kill -9, power loss, full disk)
    Every JSON file is written to a temporary name in the same folder, fsynced, renamed
    over the final name, and the folder fsynced: a reader sees the old file or the whole
    new one. A folder moves only by ``rename`` (never copied), so it is always in exactly
    one place. ``finish`` writes ``result.json`` *before* the move to ``done/``; a folder
    in ``active/`` holding ``result.json`` is finished, so ``recover`` (and ``claim``,
    ``release``) move it to ``done/`` and never stream it again; likewise ``error.json``
    -> ``failed/``. Moves into ``incoming/``, ``done/`` and ``failed/`` never replace an
    existing folder (``renameat2(RENAME_NOREPLACE)``; ``X.1``, ``X.2``... on a clash).
    NFS has no ``RENAME_NOREPLACE``, so there the name is checked, then renamed, and an
    *empty* folder made under that name in between (or hidden from the check by the lookup
    cache) is replaced; a folder with anything in it never is.
    Frames of done sessions are deleted (``keep_frames = false``) only after the move, so
    a crash leaves a done folder with its frames, never a half folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import math
import os
import re
import secrets
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, cast

import attrs
import structlog
import trio
import watchfiles

from caired.config import SpoolConfig
from caired.errors import CairedError, ExitCode

log = structlog.get_logger()

SESSION_FILE: Final = ".caired-session.json"
RESULT_FILE: Final = "result.json"
ERROR_FILE: Final = "error.json"
PREVIOUS_ERROR_FILE: Final = "error.previous.json"
READY_MARKER: Final = ".ready"
LOCK_FILE: Final = ".caired-lock"  # its OFD lock says which process owns the folder
FOLDERS: Final = ("incoming", "active", "done", "failed", "tmp")

_TMP_SUFFIX: Final = ".caired-tmp"  # atomic-write temporaries; recover() removes leftovers
_NEW_PREFIX: Final = ".caired-new-"  # create_active() staging folders in tmp/
_STAGING_GRACE: Final = 60.0  # seconds a staging folder is left alone: its builder locks it in microseconds
_MAX_SUFFIX: Final = 10_000
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# Read-write: NFS grants a write lock only on a file open for writing. No symlinks followed.
_LOCK_FILE_FLAGS: Final = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_NO_LOCKS_ADVICE: Final = (
    "the spool must be on a filesystem that grants open file description locks "
    "(a local one, or NFS whose lock service works: NFSv4, or NFSv3 with rpc.statd running)"
)
_LOCKS_REFUSED_ADVICE: Final = (
    "nobody holds that lock, so the filesystem or a security module (SELinux, AppArmor) refuses it; "
    + _NO_LOCKS_ADVICE
)
MOUNTINFO: Final = Path("/proc/self/mountinfo")
_LOCAL_ONLY_LOCKS: Final = frozenset({"nolock", "local_lock=posix", "local_lock=all"})  # NFS options
# A path lookup failing so means the folder or file is no longer there (ESTALE: removed on the NFS server).
_GONE: Final = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ESTALE})

WATCH_STEP_MS: Final = 200  # watcher thread wake-up: latency of events and of cancellation
WATCH_DEBOUNCE_MS: Final = 1_000  # longest a stream of changes is grouped before a poke
POLL_SECONDS: Final = 2.0  # look this often when inotify cannot be used
_SETTLE_SLACK: Final = 0.05  # wake a little after a folder may become ready, not just before


class SpoolError(CairedError, OSError):
    """The spool cannot be created or written; the message says which path and what to do."""

    exit_code = ExitCode.CANT_CREATE

    def __init__(self, message: str, *, path: Path | None = None, code: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = code


class _LocksRefused(SpoolError):
    """The filesystem refuses the lock itself (not: someone holds it). That is the same for every
    folder of the spool, so ``recover`` lets it end the recovery instead of skipping the folder."""


def _spool_error(
    action: str, path: Path, exc: OSError, advice: str, *, kind: type[SpoolError] = SpoolError
) -> SpoolError:
    reason = exc.strerror or str(exc)
    return kind(f"cannot {action} {path}: {reason}; {advice}", path=path, code=exc.errno)


# ---------------------------------------------------------------------------------------------
# Small filesystem helpers


def _json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null (an HR the backend could not estimate)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, _DIR_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` so that a reader sees the old file or the whole new one.

    Temporary file in the same folder, fsync, ``os.replace``, fsync of the folder. On any
    OS error (a full disk: ENOSPC) the temporary file is removed and SpoolError raised.
    """
    payload = (json.dumps(_json_safe(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o660)
        try:
            _write_all(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _spool_error("write", path, exc, "free space on the spool's filesystem or fix its permissions") from exc


_AT_FDCWD: Final = -100
_RENAME_NOREPLACE: Final = 1
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2: Any = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    _renameat2.restype = ctypes.c_int


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists. Never replaces it where the
    filesystem has ``RENAME_NOREPLACE``; elsewhere (NFS) an empty folder created at ``dst``
    just now may be replaced."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not: the filesystem lacks the flag
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
    # Fallback (e.g. some network filesystems): renaming a folder onto a non-empty folder
    # fails anyway; the check narrows the remaining case to an empty folder created just now.
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _move_unique(src: Path, parent: Path, name: str) -> Path:
    """Move ``src`` into ``parent`` as ``name``, or ``name.1``, ``name.2``... if taken. Never replaces."""
    for n in range(_MAX_SUFFIX):
        dst = parent / (name if n == 0 else f"{name}.{n}")
        try:
            _rename_noreplace(src, dst)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                continue
            raise
        return dst
    raise FileExistsError(errno.EEXIST, f"{name}.1 to {name}.{_MAX_SUFFIX - 1} all exist", str(parent / name))


class _Flock(ctypes.Structure):
    """The C ``struct flock`` that ``F_OFD_SETLK`` reads. CPython is built with large-file
    support, so its ``fcntl()`` takes the 64-bit ``off_t`` layout on every Linux platform;
    ctypes adds the platform's padding."""

    _fields_ = (
        ("l_type", ctypes.c_short),
        ("l_whence", ctypes.c_short),
        ("l_start", ctypes.c_int64),
        ("l_len", ctypes.c_int64),  # 0: up to the end of the file, however long it grows
        ("l_pid", ctypes.c_int),  # must be 0 for OFD locks
    )


_WHOLE_FILE_WRITE_LOCK: Final = bytes(_Flock(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))


def _try_lock(fd: int) -> bool:
    """Take a whole-file OFD write lock on ``fd`` without waiting; False when another open file
    description holds a lock on the file (in this process or any other, on any NFS client).

    A conflict is EAGAIN on Linux. POSIX also allows EACCES for it, but EACCES (or EPERM) may
    instead mean that the filesystem or a security module refuses the lock, which would make
    every folder look owned forever. So after EACCES or EPERM, ``F_OFD_GETLK`` asks whether
    anyone holds a conflicting lock: if so it is held; if not, the lock is tried once more (the
    holder may have let go just then) and then the PermissionError raised. Any other OSError
    is raised as well.
    """
    try:
        return _set_lock(fd)
    except PermissionError:
        if _lock_held_elsewhere(fd):
            return False
    try:
        return _set_lock(fd)
    except PermissionError:
        if _lock_held_elsewhere(fd):
            return False
        raise


def _set_lock(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _WHOLE_FILE_WRITE_LOCK)
    except BlockingIOError:  # EAGAIN: held
        return False
    return True


def _lock_held_elsewhere(fd: int) -> bool:
    """Does another open file description hold a lock that conflicts with a whole-file write lock?"""
    answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _WHOLE_FILE_WRITE_LOCK)
    return bool(_Flock.from_buffer_copy(answer).l_type != fcntl.F_UNLCK)


def _same_inode(fd: int, path: Path | str, *, dir_fd: int | None = None) -> bool:
    """Does ``path`` (relative to ``dir_fd`` if given) still name the file open as ``fd``?
    Someone may have moved or replaced it meanwhile."""
    try:
        st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _GONE:
            return False
        raise
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _not_a_lock_file(lock_path: Path, code: int | None = None) -> SpoolError:
    return SpoolError(f"{lock_path} is not a regular file; remove it", path=lock_path, code=code)


def _lock_folder(dir_fd: int, path: Path) -> int | None:
    """Lock the folder open as ``dir_fd`` (found at ``path``) through its lock file.

    Returns the lock file's descriptor, whose closing releases the lock; None when another
    open file description holds the lock, when the folder has been removed, or when
    ``path`` no longer names this folder or the folder's lock file is no longer the file
    locked. SpoolError when the lock file cannot be opened (or is not a regular file), its
    subclass _LocksRefused when the filesystem refuses the lock.
    """
    lock_path = path / LOCK_FILE
    try:
        fd = os.open(LOCK_FILE, _LOCK_FILE_FLAGS, 0o660, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESTALE):  # the folder was removed (on NFS: by another machine)
            return None
        if exc.errno in (errno.ELOOP, errno.EISDIR):
            raise _not_a_lock_file(lock_path, exc.errno) from exc
        raise _spool_error("open", lock_path, exc, "let caired's group write dropped folders") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _not_a_lock_file(lock_path)
        try:
            locked = _try_lock(fd)
        except PermissionError as exc:  # EACCES, EPERM, and nobody holds the lock
            raise _spool_error("lock", lock_path, exc, _LOCKS_REFUSED_ADVICE, kind=_LocksRefused) from exc
        except OSError as exc:  # ENOLCK, EINVAL, EOPNOTSUPP...: no such locks on this filesystem
            raise _spool_error("lock", lock_path, exc, _NO_LOCKS_ADVICE, kind=_LocksRefused) from exc
        if locked and _same_inode(dir_fd, path) and _same_inode(fd, LOCK_FILE, dir_fd=dir_fd):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def _mount_of(path: Path, mountinfo: Path) -> tuple[str, str, frozenset[str]] | None:
    """The mount that holds ``path`` (resolved): its mount point, filesystem type, and mount and
    super options, as ``mountinfo`` (the format of /proc/self/mountinfo) lists it. None when the
    table cannot be read (no /proc) or lists no mount above ``path``."""
    try:
        lines = mountinfo.read_bytes().splitlines()
    except OSError:
        return None
    target = os.fsencode(path.resolve())
    found: tuple[bytes, bytes, bytes, bytes] | None = None
    for line in lines:
        # id parent major:minor root mount-point mount-options [optional...] - fstype source super-options
        fields = line.split(b" ")
        try:
            dash = fields.index(b"-", 6)
            escaped, options, fstype, super_options = fields[4], fields[5], fields[dash + 1], fields[dash + 3]
        except (ValueError, IndexError):
            continue
        point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), escaped)  # \040 is a space
        if target != point and not target.startswith(point.rstrip(b"/") + b"/"):
            continue
        if found is None or len(point) >= len(found[0]):  # the deepest; of equal ones the last, on top
            found = (point, options, fstype, super_options)
    if found is None:
        return None
    point, options, fstype, super_options = found
    names = frozenset(os.fsdecode(o) for o in (*options.split(b","), *super_options.split(b",")))
    return os.fsdecode(point), os.fsdecode(fstype), names


def check_shared_locks(root: Path, mountinfo: Path = MOUNTINFO) -> None:
    """SpoolError if ``root`` is on an NFS mount whose byte-range locks stay on this machine.

    NFS mounted with ``nolock`` or ``local_lock=posix|all`` does not refuse locks: it grants
    them locally and never asks the server, so two machines would both hold a folder's lock
    and stream it twice. Nothing in the locks themselves shows it; the mount options do.
    """
    mount = _mount_of(root, mountinfo)
    if mount is None:
        return
    point, fstype, options = mount
    local = sorted(options & _LOCAL_ONLY_LOCKS)
    if fstype in ("nfs", "nfs4") and local:
        raise SpoolError(
            f"the spool {root} is on an NFS mount ({point}, {','.join(local)}) whose locks only this machine "
            "sees, so other machines would stream the same folders; remount it without nolock and local_lock",
            path=root,
            code=errno.ENOLCK,
        )


def _remove_all_but_the_lock_file(folder: Path) -> None:
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def _mark_ready(folder: Path) -> None:
    """Put the ``.ready`` marker in a folder known to be complete. Best effort: without it the
    folder is still taken, after settle_seconds."""
    with contextlib.suppress(OSError):
        os.close(os.open(folder / READY_MARKER, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o660))


def _fsync_dirs(*paths: Path) -> None:
    """Make renames durable. After a rename has happened a failure here is only logged: if the
    rename is lost with the power, recover() finds the folder where it was and moves it again."""
    for path in paths:
        try:
            _fsync_dir(path)
        except OSError as exc:
            log.warning("spool_fsync_failed", path=str(path), error=exc.strerror or str(exc))


def _is_frame(name: str) -> bool:
    return name.lower().endswith(".png")


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or "\0" in name:
        raise ValueError(f"not a spool folder name: {name!r}")


def _walk_stats(path: Path, prefix: str = "") -> Iterator[tuple[str, os.stat_result]]:
    with os.scandir(path) as entries:
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield prefix + entry.name, st
            if stat.S_ISDIR(st.st_mode):
                yield from _walk_stats(Path(entry.path), f"{prefix}{entry.name}/")


# ---------------------------------------------------------------------------------------------
# Claims and the spool

Signature = tuple[int, tuple[tuple[str, int, int, int], ...]]


@attrs.define
class _Look:
    """What this process saw of one folder in incoming/: its signature and since when."""

    signature: Signature
    seen_at: float  # when this exact signature was first seen
    changed: bool  # the signature differs from an earlier look (a change we saw ourselves)


@attrs.define(eq=False)
class Claim:
    """One folder in active/, held by this process until finished, failed or released.

    ``name`` is the folder's name as dropped; ``path`` is where the folder is now (it
    follows the folder to done/, failed/ or incoming/). The claim keeps the folder's lock
    file open and locked; ``key`` is the folder's (device, inode), which ``recover`` skips.
    """

    name: str
    path: Path
    datapt_id: str
    attempts: int
    source: str
    first_claimed_at: str
    _fd: int | None = attrs.field(default=None, repr=False, alias="fd")
    _key: tuple[int, int] = attrs.field(default=(0, 0), repr=False, alias="key")

    @property
    def held(self) -> bool:
        """True while the folder is in active/ and locked by this claim."""
        return self._fd is not None

    def session(self) -> dict[str, Any]:
        return {
            "datapt_id": self.datapt_id,
            "attempts": self.attempts,
            "first_claimed_at": self.first_claimed_at,
            "source": self.source,
            "name": self.name,
        }

    def record_attempt(self) -> int:
        """Count one more streaming attempt and make it durable; returns the new count.

        Call it before each attempt. SpoolError (count unchanged) if it cannot be written.
        """
        self._check_held()
        self.attempts += 1
        try:
            write_json_atomic(self.path / SESSION_FILE, self.session())
        except SpoolError:
            self.attempts -= 1
            raise
        return self.attempts

    def _check_held(self) -> None:
        if self._fd is None:
            raise RuntimeError(f"the claim on {self.name} is no longer held (it moved to {self.path})")

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the only descriptor of its open file description: releases the lock
            self._fd = None


def _load_session(folder: Path) -> dict[str, Any] | None:
    """The session file's content when it is present and valid; None otherwise."""
    path = folder / SESSION_FILE
    try:
        data = json.loads(path.read_bytes())
        datapt_id = str(uuid.UUID(str(data["datapt_id"])))
        attempts = int(data.get("attempts", 0))
        if attempts < 0:
            raise ValueError("negative attempts")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("session_file_invalid", path=str(path), error=str(exc))
        return None
    name = str(data.get("name", folder.name))
    try:
        _check_name(name)
    except ValueError:
        name = folder.name
    return {
        "datapt_id": datapt_id,
        "attempts": attempts,
        "first_claimed_at": str(data.get("first_claimed_at", "")),
        "source": str(data.get("source", "drop")),
        "name": name,
    }


class Spool:
    """The spool folders of one process. Methods block on the filesystem: call them in a thread.

    Thread-safe: the daemon's session workers and the watcher may call it at once.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        settle_seconds: float = 5.0,
        keep_frames: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.active = self.root / "active"
        self.done = self.root / "done"
        self.failed = self.root / "failed"
        self.tmp = self.root / "tmp"
        self.settle_seconds = settle_seconds
        self.keep_frames = keep_frames
        self._clock = clock
        self._lock = threading.Lock()
        self._looks: dict[str, _Look] = {}
        self._ignored: set[str] = set()
        self._held: set[tuple[int, int]] = set()  # inodes of this process's claims
        self._unrecovered: dict[str, str] = {}  # folders of active/ recover() could not move: why

    @classmethod
    def from_config(cls, cfg: SpoolConfig) -> Spool:
        return cls(cfg.dir, settle_seconds=cfg.settle_seconds, keep_frames=cfg.keep_frames)

    def __repr__(self) -> str:
        return f"Spool({str(self.root)!r})"

    # -- setting up ------------------------------------------------------------------------------

    def prepare(self, *, mountinfo: Path | str = MOUNTINFO) -> None:
        """Create the spool folders (mode 0o770 less the umask; setgid on incoming/ and tmp/).

        SpoolError (exit code 73) with a one-line message if they cannot be created or written,
        or if the spool is on an NFS mount whose locks only this machine sees (``mountinfo``:
        the mount table to look in).
        """
        advice = "create it writable for caired's user, or set [spool] dir to a writable folder"
        for path in (self.root, *(self.root / name for name in FOLDERS)):
            try:
                path.mkdir(mode=0o770, parents=True, exist_ok=True)
                st = path.stat()
            except OSError as exc:
                raise _spool_error("create the spool folder", path, exc, advice) from exc
            if not stat.S_ISDIR(st.st_mode):
                raise SpoolError(f"{path} is not a folder; move it away or set [spool] dir elsewhere", path=path)
            if path.name in ("incoming", "tmp") and path.parent == self.root and not st.st_mode & stat.S_ISGID:
                # Dropped folders inherit the spool's group, so caired can move and delete them.
                with contextlib.suppress(OSError):
                    os.chmod(path, stat.S_IMODE(st.st_mode) | stat.S_ISGID)
        devices = set()
        for name in FOLDERS:
            path = self.root / name
            if not os.access(path, os.W_OK | os.X_OK):
                raise SpoolError(f"cannot write the spool folder {path}; {advice}", path=path, code=errno.EACCES)
            devices.add(path.stat().st_dev)
        if len(devices) > 1:
            raise SpoolError(
                f"the spool folders under {self.root} are on different filesystems; moves must be renames, "
                "so keep incoming/ active/ done/ failed/ tmp/ on one filesystem",
                path=self.root,
                code=errno.EXDEV,
            )
        check_shared_locks(self.root, Path(mountinfo))

    # -- incoming/ -------------------------------------------------------------------------------

    def ready(self) -> tuple[list[str], float | None]:
        """Folders of incoming/ that are complete, oldest first; and the seconds until the next
        folder still settling may become ready (None when none is settling)."""
        now = self._clock()
        found: list[tuple[float, str]] = []
        waits: list[float] = []
        present: set[str] = set()
        try:
            entries = list(os.scandir(self.incoming))
        except OSError as exc:
            raise _spool_error(
                "read", self.incoming, exc, "check that the spool exists (caired run creates it)"
            ) from exc
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            present.add(name)
            try:
                if not entry.is_dir(follow_symlinks=False):
                    self._ignore_once(name, "not a folder")
                    continue
                wait = self._settle_wait(Path(entry.path), name, now)
                if wait > 0:
                    waits.append(wait)
                else:
                    found.append((entry.stat(follow_symlinks=False).st_mtime, name))
            except FileNotFoundError:  # claimed by another process while we looked
                continue
            except PermissionError:
                self._ignore_once(name, "cannot be read by caired (permission denied)")
                continue
        with self._lock:
            for gone in self._looks.keys() - present:
                del self._looks[gone]
            self._ignored &= present
        found.sort()
        return [name for _, name in found], (min(waits) + _SETTLE_SLACK if waits else None)

    def _ignore_once(self, name: str, reason: str) -> None:
        with self._lock:
            if name in self._ignored:
                return
            self._ignored.add(name)
        log.info("incoming_ignored", name=name, reason=reason)

    def _settle_wait(self, folder: Path, name: str, now: float) -> float:
        """Seconds until ``folder`` counts as complete (0 or less: it is)."""
        if os.path.lexists(folder / READY_MARKER):
            return 0.0
        own = folder.stat(follow_symlinks=False)
        newest = own.st_mtime
        items: list[tuple[str, int, int, int]] = []
        for rel, st in _walk_stats(folder):
            newest = max(newest, st.st_mtime, st.st_ctime)
            items.append((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        signature: Signature = (own.st_mtime_ns, tuple(sorted(items)))
        with self._lock:
            look = self._looks.get(name)
            if look is None:
                look = self._looks[name] = _Look(signature, now, changed=False)
            elif look.signature != signature:
                look = self._looks[name] = _Look(signature, now, changed=True)
        quiet_since = look.seen_at if look.changed else min(newest, look.seen_at)
        return quiet_since + self.settle_seconds - now

    # -- claiming --------------------------------------------------------------------------------

    def claim(self, name: str, *, source: str = "drop") -> Claim | None:
        """Take incoming/<name> for streaming: lock it, move it to active/, load or create its
        session file. None if another process took it first (or it is gone).

        A folder that already holds result.json is finished: it goes to done/ (None). One that
        holds error.json is a failed folder dropped again for a retry: error.json is kept as
        error.previous.json.
        """
        _check_name(name)
        src = self.incoming / name
        try:
            dir_fd = os.open(src, _DIR_FLAGS)
        except OSError as exc:
            if exc.errno in _GONE:  # taken or removed meanwhile (ESTALE: by another machine, on NFS)
                return None
            raise _spool_error("open", src, exc, "let caired's group read dropped folders") from exc
        fd: int | None = None
        try:
            st = os.fstat(dir_fd)
            fd = _lock_folder(dir_fd, src)
            if fd is None:
                return None
            path = _move_unique(src, self.active, name)
        except OSError as exc:
            if fd is not None:
                os.close(fd)
            if exc.errno in _GONE:  # moved away by someone else after our check
                return None
            if isinstance(exc, SpoolError):
                raise
            raise _spool_error("claim", src, exc, "check the spool's permissions") from exc
        finally:
            os.close(dir_fd)
        key = (st.st_dev, st.st_ino)
        with self._lock:
            self._held.add(key)
        session = _load_session(path)
        fresh = session is None
        if session is None:
            session = {
                "datapt_id": str(uuid.uuid4()),
                "attempts": 0,
                "first_claimed_at": datetime.fromtimestamp(self._clock(), UTC).isoformat(),
                "source": source,
                "name": name,
            }
        claim = Claim(
            name=name,  # as dropped (or released) this time; the session file says it from now on
            path=path,
            datapt_id=session["datapt_id"],
            attempts=session["attempts"],
            source=session["source"],
            first_claimed_at=session["first_claimed_at"],
            fd=fd,
            key=key,
        )
        try:
            if (path / RESULT_FILE).exists():
                self._retire_finished(claim, origin="incoming")
                return None
            if (path / ERROR_FILE).exists():
                os.replace(path / ERROR_FILE, path / PREVIOUS_ERROR_FILE)
            if fresh:
                write_json_atomic(path / SESSION_FILE, claim.session())
        except OSError as exc:
            try:
                self._move_back(claim, event="folder_released")
            except OSError:
                self._drop(claim)  # unlocked in active/: the next recover() gives it back
            if isinstance(exc, SpoolError):
                raise
            raise _spool_error("claim", path, exc, "check the spool's permissions") from exc
        log.info(
            "folder_claimed",
            session=claim.name,
            datapt_id=claim.datapt_id,
            attempts=claim.attempts,
            source=claim.source,
            path=str(path),
        )
        return claim

    def create_active(self, name: str, *, source: str) -> Claim:
        """A new, locked session folder active/<name> (or <name>.1...) with its session file,
        for frames written as they are captured. Built in tmp/, its lock file locked, and
        renamed in, so no other process ever sees it in active/ unlocked."""
        _check_name(name)
        staging = self.tmp / f"{_NEW_PREFIX}{uuid.uuid4().hex}"
        fd: int | None = None
        try:
            staging.mkdir(mode=0o770)
            dir_fd = os.open(staging, _DIR_FLAGS)
            try:
                st = os.fstat(dir_fd)
                fd = _lock_folder(dir_fd, staging)
            finally:
                os.close(dir_fd)
            if fd is None:  # a staging cleaner took it (a clock far off from the file server's)
                raise FileNotFoundError(errno.ENOENT, "removed while being created", str(staging))
            claim = Claim(
                name=name,
                path=staging,
                datapt_id=str(uuid.uuid4()),
                attempts=0,
                source=source,
                first_claimed_at=datetime.fromtimestamp(self._clock(), UTC).isoformat(),
                fd=fd,
                key=(st.st_dev, st.st_ino),
            )
            write_json_atomic(staging / SESSION_FILE, claim.session())
            claim.path = _move_unique(staging, self.active, name)
        except OSError as exc:
            if fd is not None:
                os.close(fd)
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, SpoolError):
                raise
            raise _spool_error("create a session folder in", self.active, exc, "check the spool") from exc
        with self._lock:
            self._held.add(claim._key)
        log.info("folder_created", session=name, datapt_id=claim.datapt_id, source=source, path=str(claim.path))
        return claim

    # -- outcomes --------------------------------------------------------------------------------

    def finish(self, claim: Claim, result: Mapping[str, Any]) -> Path:
        """Success: write result.json durably, then move the folder to done/ (done/X.1... on a clash).

        With keep_frames off, the PNG frames are deleted after the move. SpoolError if
        result.json cannot be written: the folder stays in active/, held, without result.json.
        """
        claim._check_held()
        write_json_atomic(claim.path / RESULT_FILE, result)
        return self._retire(claim, self.done, "folder_done")

    def fail(self, claim: Claim, error: Mapping[str, Any]) -> Path:
        """Permanent failure: write error.json durably, then move the folder to failed/."""
        claim._check_held()
        write_json_atomic(claim.path / ERROR_FILE, error)
        return self._retire(claim, self.failed, "folder_failed")

    def release(self, claim: Claim) -> Path:
        """Give the folder back to incoming/ (shutdown, or try later), keeping its datapt_id.

        It is marked ``.ready`` (it was complete when claimed). A folder that already holds
        result.json or error.json goes to done/ or failed/ instead: it is never streamed twice.
        """
        claim._check_held()
        if (claim.path / RESULT_FILE).exists() or (claim.path / ERROR_FILE).exists():
            return self._retire_finished(claim, origin="active")
        return self._move_back(claim, event="folder_released")

    def handoff(self, claim: Claim) -> Path:
        """Hand a folder written in active/ (camera store-and-forward) to incoming/, marked
        ``.ready``, to be claimed and streamed later like a dropped folder."""
        claim._check_held()
        return self._move_back(claim, event="folder_handed_off")

    def _move_back(self, claim: Claim, *, event: str) -> Path:
        origin = claim.path.parent
        _mark_ready(claim.path)
        try:
            dest = _move_unique(claim.path, self.incoming, claim.name)
        except OSError as exc:
            raise _spool_error("move back to incoming/", claim.path, exc, "check the spool's permissions") from exc
        claim.path = dest
        _fsync_dirs(self.incoming, origin)
        self._drop(claim)
        log.info(event, session=claim.name, datapt_id=claim.datapt_id, path=str(dest))
        return dest

    def _retire(self, claim: Claim, parent: Path, event: str) -> Path:
        """Move a held folder whose result.json or error.json is durable to done/ or failed/."""
        origin = claim.path.parent
        try:
            dest = _move_unique(claim.path, parent, claim.path.name)
        except OSError as exc:
            raise _spool_error(f"move into {parent.name}/", claim.path, exc, "check the spool's permissions") from exc
        claim.path = dest
        self._drop(claim)
        _fsync_dirs(parent, origin)
        deleted = self._delete_frames(dest) if parent == self.done and not self.keep_frames else 0
        log.info(event, session=claim.name, datapt_id=claim.datapt_id, path=str(dest), frames_deleted=deleted)
        return dest

    def _retire_finished(self, claim: Claim, *, origin: str) -> Path:
        parent, to = (self.done, "done") if (claim.path / RESULT_FILE).exists() else (self.failed, "failed")
        dest = self._retire(claim, parent, "folder_done" if to == "done" else "folder_failed")
        log.info("folder_recovered", session=claim.name, datapt_id=claim.datapt_id, **{"from": origin, "to": to})
        return dest

    def _drop(self, claim: Claim) -> None:
        with self._lock:
            self._held.discard(claim._key)
        claim._close()

    def _delete_frames(self, folder: Path) -> int:
        deleted = 0
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if _is_frame(entry.name) and entry.is_file(follow_symlinks=False):
                        os.unlink(entry.path)
                        deleted += 1
        except OSError as exc:
            log.warning("frames_not_deleted", path=str(folder), error=str(exc))
        return deleted

    # -- recovery --------------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Move on every folder of active/ whose owner died (nobody holds its lock): to done/
        if it holds result.json, to failed/ if error.json, else back to incoming/ (marked
        ``.ready``, session file kept). Also removes leftover staging of create_active.
        Returns the names moved.

        A folder that cannot be recovered (its lock file is a folder or a symlink or cannot be
        opened, it cannot be moved...) is left in active/ with a warning ``folder_not_recovered``
        (logged once while the reason stays the same), and the others are recovered all the same:
        one bad folder must not keep the rest from being streamed, nor the daemon from starting.
        SpoolError only for what is the same for every folder, so that skipping would only hide
        it: active/ cannot be read, or the filesystem refuses the locks themselves (then no
        folder can ever be claimed either, and the daemon had better stop and say so).
        """
        moved: list[str] = []
        failures: dict[str, str] = {}
        try:
            entries = list(os.scandir(self.active))
        except OSError as exc:
            raise _spool_error("read", self.active, exc, "check that the spool exists") from exc
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                continue
            with self._lock:
                if (st.st_dev, st.st_ino) in self._held:  # ours: alive, and never reopened here
                    continue
            try:
                if self._recover_one(Path(entry.path)):
                    moved.append(entry.name)
            except _LocksRefused:
                raise
            except OSError as exc:
                failures[entry.name] = str(exc) if isinstance(exc, SpoolError) else exc.strerror or str(exc)
        self._report_unrecovered(failures)
        self._clean_staging()
        return moved

    def _report_unrecovered(self, failures: dict[str, str]) -> None:
        """Warn about each folder of active/ that could not be recovered, once for as long as
        it fails for the same reason: every periodic rescan would repeat it otherwise."""
        with self._lock:
            new = {name: reason for name, reason in failures.items() if self._unrecovered.get(name) != reason}
            self._unrecovered = failures
        for name, reason in new.items():
            log.warning("folder_not_recovered", path=str(self.active / name), reason=reason)

    def _recover_one(self, path: Path) -> bool:
        """Move on the folder ``path`` of active/ if nobody holds its lock. A folder without a
        lock file (left by an older caired) gets one here, locked like any other."""
        try:
            dir_fd = os.open(path, _DIR_FLAGS)
        except OSError as exc:
            if exc.errno in _GONE:  # moved on by another process meanwhile
                return False
            raise
        try:
            st = os.fstat(dir_fd)
            fd = _lock_folder(dir_fd, path)
        finally:
            os.close(dir_fd)
        if fd is None:  # alive, or moved on by another process meanwhile
            return False
        session = _load_session(path) or {}
        claim = Claim(
            name=session.get("name", path.name),
            path=path,
            datapt_id=session.get("datapt_id", ""),
            attempts=session.get("attempts", 0),
            source=session.get("source", "drop"),
            first_claimed_at=session.get("first_claimed_at", ""),
            fd=fd,
            key=(st.st_dev, st.st_ino),
        )
        try:
            self._remove_temporaries(path)
            if (path / RESULT_FILE).exists() or (path / ERROR_FILE).exists():
                self._retire_finished(claim, origin="active")
                return True
            _mark_ready(path)
            claim.path = _move_unique(path, self.incoming, claim.name)
        except SpoolError:
            raise
        except OSError as exc:
            raise _spool_error("move back to incoming/", path, exc, "check the spool's permissions") from exc
        finally:
            claim._close()
        _fsync_dirs(self.incoming, self.active)
        log.info(
            "folder_recovered",
            session=claim.name,
            datapt_id=claim.datapt_id,
            path=str(claim.path),
            **{"from": "active", "to": "incoming"},
        )
        return True

    def _remove_temporaries(self, folder: Path) -> None:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") and entry.name.endswith(_TMP_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)

    def _clean_staging(self) -> None:
        """Remove the staging folders of create_active whose creator died (nobody holds their lock).

        A staging folder younger than ``_STAGING_GRACE`` is left alone: between its ``mkdir``
        and its lock, its builder does not hold it yet, and taking it then would break that
        builder's create_active.
        Everything but the lock file goes while the lock is held; the lock file and the folder
        only after it is closed: NFS keeps an unlinked file that is still open as a ``.nfs...``
        file, which would keep the folder from ever being removed. Best effort: what is left
        is tried again at the next recover.
        """
        try:
            entries = [e for e in os.scandir(self.tmp) if e.name.startswith(_NEW_PREFIX)]
        except OSError:
            return
        now = self._clock()
        for entry in entries:
            path = Path(entry.path)
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime < _STAGING_GRACE:
                    continue
                dir_fd = os.open(path, _DIR_FLAGS)
            except OSError:
                continue
            try:
                fd = _lock_folder(dir_fd, path)
                if fd is None:
                    continue
                try:
                    _remove_all_but_the_lock_file(path)
                finally:
                    os.close(fd)
                os.unlink(path / LOCK_FILE)
                os.rmdir(path)
            except OSError:
                pass
            finally:
                os.close(dir_fd)

    # -- status ----------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Folders in incoming/, active/, done/ and failed/ (dot-names not counted)."""
        result: dict[str, int] = {}
        for name in ("incoming", "active", "done", "failed"):
            try:
                with os.scandir(self.root / name) as entries:
                    result[name] = sum(
                        1 for e in entries if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)
                    )
            except OSError:
                result[name] = 0
        return result


# ---------------------------------------------------------------------------------------------
# Watching incoming/


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
            recursive=True,
            force_polling=False,
        ):
            _nudge(events.wake)
    except (OSError, RuntimeError) as exc:  # inotify unusable: watch limit, no inotify, watcher error
        log.warning("spool_watch_polling", path=str(incoming), every=POLL_SECONDS, error=str(exc))
        events.polling = True
        events.established.set()
        _nudge(events.wake)


def _poke_function(notify: trio.MemorySendChannel[None] | Callable[[], None]) -> Callable[[], bool]:
    """A function that pokes the consumer; it returns False when the consumer has gone."""
    if isinstance(notify, trio.MemorySendChannel):
        channel = notify

        def poke() -> bool:
            try:
                channel.send_nowait(None)
            except trio.WouldBlock:  # a poke is pending already
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return False
            return True

        return poke

    function = notify

    def call() -> bool:
        function()
        return True

    return call


async def watch(
    spool: Spool,
    notify: trio.MemorySendChannel[None] | Callable[[], None],
    *,
    rescan_seconds: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Poke ``notify`` whenever incoming/ may hold a folder ready to claim; runs until cancelled.

    A poke is ``send_nowait(None)`` on a channel (give it a buffer of 1: pokes coalesce) or
    a call. The consumer then calls ``spool.ready()`` and claims. Pokes come:

    * after each batch of changes under incoming/ (inotify, grouped over up to 1 s);
    * every ``rescan_seconds`` (lost events, network filesystems), after ``spool.recover()``;
    * when a folder still settling may have become ready (and is ready);
    * every 2 s when the folder is polled because inotify cannot be used.

    ``task_status.started()`` once the inotify watch is in place; a first rescan and poke
    follow at once. Returns when the consumer closes the channel. Cancellation stops the
    watcher thread within about 0.2 s. Idle cost: a thread waking 5 times a second.
    """
    poke = _poke_function(notify)
    wake_send, wake_recv = trio.open_memory_channel[None](1)
    events = _Events(wake_send)
    flag = _StopFlag(events.established)
    async with trio.open_nursery() as nursery:
        try:
            nursery.start_soon(_follow_events, spool.incoming, flag, events)
            await events.established.wait()
            task_status.started()
            reason = "rescan"
            next_rescan = trio.current_time() + rescan_seconds
            while True:
                names, settle_in = await _look(spool, recover=reason == "rescan")
                # Events and rescans always poke; timers (settling, polling) only when a folder is ready.
                if (reason != "timer" or names) and not poke():
                    return
                now = trio.current_time()
                deadline = next_rescan
                if settle_in is not None:
                    deadline = min(deadline, now + settle_in)
                if events.polling:
                    deadline = min(deadline, now + POLL_SECONDS)
                reason = "timer"
                with trio.move_on_at(deadline):
                    await wake_recv.receive()
                    reason = "event"
                if trio.current_time() >= next_rescan:
                    reason = "rescan"
                    next_rescan = trio.current_time() + rescan_seconds
        finally:
            flag.set()  # the watcher thread sees it within one step; then the nursery can close


async def _look(spool: Spool, *, recover: bool) -> tuple[list[str], float | None]:
    """One scan in a worker thread; a failing scan is logged and retried at the next wake."""
    try:
        if recover:
            await trio.to_thread.run_sync(spool.recover)
        return await trio.to_thread.run_sync(spool.ready)
    except OSError as exc:
        log.warning("spool_scan_failed", error=str(exc))
        return [], None
