"""Filesystem idioms, one copy each: atomic writes, moves that never replace, OFD locks,
safe reads, the mount table.

Everything works relative to a directory descriptor the caller holds, never by a path
someone else could change under it, and no symlink is ever followed (style.md, habits
15-17): a name is opened with ``O_NOFOLLOW | O_NONBLOCK``, checked with ``fstat`` to be a
regular file and read up to a cap, so a symlink, a FIFO, a device or a 2 GB sparse file
is an error for that one file, never a hang or an out-of-memory. Path-taking forms
(``write_bytes_atomic(path, ...)``) open the parent folder themselves, for callers that
own their folder (``caired record``, ``plot``, ``synth``).

Functions block on the filesystem: async callers run them in a worker thread.
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
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import structlog

log = structlog.get_logger()

TMP_SUFFIX: Final = ".caired-tmp"  # atomic-write temporaries: ".<name>.<random>.caired-tmp"
NAME_MAX: Final = 255  # bytes in one file name on every Linux filesystem caired supports
MAX_SUFFIX: Final = 10_000
DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
READ_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# A path lookup failing so means the entry is no longer there (ESTALE: removed on the NFS server).
GONE: Final = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ESTALE})


class NotRegular(OSError):
    """The name is a symlink (not followed), a folder, a FIFO, a device...: not a regular file."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(errno.EINVAL, f"{kind}, not a regular file", name)
        self.kind = kind


class TooBig(OSError):
    """The file is larger than the caller's cap (``size``: what fstat said; None: it grew while read)."""

    def __init__(self, size: int | None, cap: int, name: str) -> None:
        what = f"{size} bytes, more than the {cap} allowed" if size is not None else f"grew past {cap} bytes"
        super().__init__(errno.EFBIG, what, name)
        self.size = size
        self.cap = cap


def shown(name: str | bytes) -> str:
    """A file name fit for a log line or JSON: bytes that are not UTF-8 as ``\\xNN`` escapes.

    Names are bytes on Linux; Python hands them over as ``str`` with the undecodable bytes
    as lone surrogates (``os.fsdecode``), which no UTF-8 writer accepts.
    """
    raw = name if isinstance(name, bytes) else os.fsencode(name)
    return raw.decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------------------------------------
# Folders


def open_dir(name: str | Path, *, dir_fd: int | None = None) -> int:
    """Open a folder (relative to ``dir_fd`` if given) without following a symlink at its name."""
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


@contextlib.contextmanager
def opened_dir(name: str | Path, *, dir_fd: int | None = None) -> Iterator[int]:
    fd = open_dir(name, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)




def fsync_dirs_quietly(*fds: int) -> None:
    """Make renames durable. After a rename has happened a failure here is only logged: if the
    rename is lost with the power, recovery finds the folder where it was and moves it again."""
    for fd in fds:
        try:
            os.fsync(fd)
        except OSError as exc:
            log.warning("spool_fsync_failed", error=exc.strerror or str(exc))




def lexists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return True


def same_inode(fd: int, name: str | Path, *, dir_fd: int | None = None) -> bool:
    """Does ``name`` (relative to ``dir_fd`` if given) still name the file open as ``fd``?
    Someone may have moved or replaced it meanwhile."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in GONE:
            return False
        raise
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


# ---------------------------------------------------------------------------------------------
# Reading


def read_regular(dir_fd: int | None, name: str | bytes | Path, cap: int, *, follow_symlinks: bool = False) -> bytes:
    """The bytes of the regular file ``name`` (relative to ``dir_fd``), at most ``cap`` of them.

    Never blocks on a FIFO (``O_NONBLOCK``) and, unless told to, never follows a symlink at
    ``name``: NotRegular for anything but a regular file, TooBig past ``cap`` (refused before a
    byte is read when fstat says so), FileNotFoundError when it is not there, OSError else.
    """
    flags = READ_FLAGS if not follow_symlinks else READ_FLAGS & ~os.O_NOFOLLOW
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise NotRegular("a symbolic link, which is not followed here", shown(os.fsencode(name))) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(file_kind(st.st_mode), shown(os.fsencode(name)))
        if st.st_size > cap:
            raise TooBig(st.st_size, cap, shown(os.fsencode(name)))
        data = _read_capped(fd, st.st_size, cap)
        if data is None:
            raise TooBig(None, cap, shown(os.fsencode(name)))
        return data
    finally:
        os.close(fd)


_READ_MORE: Final = 1024 * 1024  # after a short first read (a file that grew), read on in pieces this big


def _read_capped(fd: int, size: int, cap: int) -> bytes | None:
    """What is left to read of ``fd``, if that is at most ``cap`` bytes; None if there is more.

    Two reads for a file whose size ``fstat`` gave right: the whole of it, then the end.
    A file that grows while it is read (or that ``fstat`` calls empty, like /proc's) is
    read on in pieces, up to the cap and one byte beyond.
    """
    chunks: list[bytes] = []
    total = 0
    want = min(size, cap) + 1
    while chunk := os.read(fd, want):
        chunks.append(chunk)
        total += len(chunk)
        if total > cap:
            return None
        want = min(_READ_MORE, cap + 1 - total)
    return b"".join(chunks)


def file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return kind
    return "a special file"


# ---------------------------------------------------------------------------------------------
# Writing


def json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: they become null (an HR the backend could not estimate)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def json_bytes(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(json_safe(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_atomic(dir_fd: int, name: str, data: bytes | memoryview, *, mode: int | None = None) -> None:
    """Write ``data`` to ``name`` in the folder ``dir_fd`` so that a reader sees the old file or
    the whole new one: a temporary name in the same folder, fsync, rename over ``name``, fsync
    of the folder. On any OSError (a full disk: ENOSPC) the temporary file is removed and the
    error raised. A symlink at ``name`` is replaced, never followed. ``mode``: exactly these
    permissions, whatever the umask (None: 0o660 less the umask)."""
    tmp = f".{name}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    if len(os.fsencode(tmp)) > NAME_MAX:
        tmp = f".{secrets.token_hex(8)}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o660 if mode is None else mode, dir_fd=dir_fd)
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def write_bytes_atomic(path: Path, data: bytes | memoryview, *, mode: int | None = None) -> None:
    """``write_atomic`` by path, for a folder the caller owns."""
    with opened_dir(path.parent) as dir_fd:
        write_atomic(dir_fd, path.name, data, mode=mode)


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """``data`` as indented UTF-8 JSON (NaN as null), written atomically by path."""
    write_bytes_atomic(path, json_bytes(data))


def remove_tree(parent_fd: int, name: str) -> None:
    """Remove the folder ``name`` of ``parent_fd`` with all it holds, at any depth.

    Iterative (``shutil.rmtree`` recurses, past Python's limit on a tree 1,000 deep), holding
    one descriptor at a time, never following a link: it goes down through ``O_NOFOLLOW``
    opens and back up through ``..``, removing each folder once it is empty.
    """
    fd = open_dir(name, dir_fd=parent_fd)
    depth = 0
    try:
        while True:
            sub = None
            for entry in os.scandir(fd):
                if entry.is_dir(follow_symlinks=False):
                    sub = entry.name
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.name, dir_fd=fd)
            if sub is not None:
                inner = open_dir(sub, dir_fd=fd)
                os.close(fd)
                fd, depth = inner, depth + 1
                continue
            if depth == 0:
                break
            up = open_dir("..", dir_fd=fd)  # the real parent: '..' is never a link
            inode = os.fstat(fd).st_ino
            os.close(fd)
            fd, depth = up, depth - 1
            for entry in os.scandir(fd):
                if entry.inode() == inode and entry.is_dir(follow_symlinks=False):
                    os.rmdir(entry.name, dir_fd=fd)
                    break
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def remove_temporaries(dir_fd: int) -> None:
    """Remove leftovers of interrupted atomic writes in a folder: regular files only, as
    ``write_atomic`` makes them (a folder a dropper named so is not ours to remove)."""
    for entry in os.scandir(dir_fd):
        if entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.name, dir_fd=dir_fd)


# ---------------------------------------------------------------------------------------------
# Moving


_RENAME_NOREPLACE: Final = 1
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2: Any = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    _renameat2.restype = ctypes.c_int


def rename_noreplace(src_dir: int, src: str, dst_dir: int, dst: str) -> None:
    """Rename ``src`` (in ``src_dir``) to ``dst`` (in ``dst_dir``); FileExistsError if ``dst``
    exists. Never replaces it where the filesystem has ``RENAME_NOREPLACE``; elsewhere (NFS)
    an empty folder created at ``dst`` just now may be replaced."""
    if _renameat2 is not None:
        if _renameat2(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not: the filesystem lacks the flag
            raise OSError(code, os.strerror(code), shown(src), None, shown(dst))
    # Fallback (e.g. some network filesystems): renaming a folder onto a non-empty folder
    # fails anyway; the check narrows the remaining case to an empty folder created just now.
    if lexists(dst_dir, dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), shown(dst))
    os.rename(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir)


def candidate_names(name: str) -> Iterator[str]:
    """``name``, ``name.1``, ``name.2``...: each fits in NAME_MAX bytes (a long name is cut, at a
    character boundary where it can be, to make room for its suffix)."""
    raw = os.fsencode(name)
    for n in range(MAX_SUFFIX):
        suffix = b"" if n == 0 else b".%d" % n
        base = raw[: NAME_MAX - len(suffix)]
        if base != raw:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                pass  # not UTF-8: bytes are all there is to cut
            else:
                base = base.decode("utf-8", "ignore").encode("utf-8")  # drops a character cut in two
        yield os.fsdecode(base + suffix)


def move_unique(src_dir: int, src: str, dst_dir: int, name: str) -> str:
    """Move ``src`` into ``dst_dir`` as ``name``, or ``name.1``, ``name.2``... if taken (a name
    too long for the suffix is shortened). Never replaces. Returns the name it got."""
    for candidate in candidate_names(name):
        try:
            rename_noreplace(src_dir, src, dst_dir, candidate)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno == errno.ENOTEMPTY:
                continue
            raise
        return candidate
    raise FileExistsError(errno.EEXIST, f"{shown(name)}.1 to .{MAX_SUFFIX - 1} all exist", shown(name))


# ---------------------------------------------------------------------------------------------
# Open file description locks


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


WHOLE_FILE_WRITE_LOCK: Final = bytes(_Flock(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))


def try_lock(fd: int) -> bool:
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
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, WHOLE_FILE_WRITE_LOCK)
    except BlockingIOError:  # EAGAIN: held
        return False
    return True


def _lock_held_elsewhere(fd: int) -> bool:
    """Does another open file description hold a lock that conflicts with a whole-file write lock?"""
    answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, WHOLE_FILE_WRITE_LOCK)
    return bool(_Flock.from_buffer_copy(answer).l_type != fcntl.F_UNLCK)


LOCK_FLAGS: Final = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NFS locks need write access
LOCK_MODE: Final = 0o660


def open_lock_file(dir_fd: int, name: str) -> int:
    """Open (creating it if need be) the lock file ``name`` in ``dir_fd`` for an OFD lock.

    Never follows a link or waits on a FIFO. A file created here gets exactly ``LOCK_MODE``
    whatever the umask: the service and an operator (``sudo caired hold``) must both be able
    to open it for writing later, which a root-owned 0640 file would forbid to the service.
    """
    try:
        fd = os.open(name, LOCK_FLAGS | os.O_CREAT | os.O_EXCL, LOCK_MODE, dir_fd=dir_fd)
    except FileExistsError:
        return os.open(name, LOCK_FLAGS, dir_fd=dir_fd)
    try:
        os.fchmod(fd, LOCK_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def lock_is_held(dir_fd: int, name: str) -> bool:
    """Does some process hold the lock on the regular file ``name``? Takes no lock and keeps
    nothing open (``F_OFD_GETLK`` on a read-only descriptor)."""
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        return _lock_held_elsewhere(fd)
    except OSError:
        return False
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# The mount table


def mount_of(path: Path, mountinfo: Path) -> tuple[str, str, frozenset[str]] | None:
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
