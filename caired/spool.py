"""The drop-folder spool: ``incoming/`` -> ``active/`` -> ``done/`` | ``failed/``.

Layout of ``[spool] dir`` (all on one filesystem, so every move is one atomic ``rename``)::

    incoming/   users drop folders of frames here (names starting with '.' are ignored)
    active/     folders being streamed; each one's lock file is locked by the process streaming it
    done/       finished sessions, each with result.json
    failed/     permanent failures, each with error.json
    tmp/        staging area for recordings and droppers; never scanned

When a folder of ``incoming/`` is complete is ``settle.py``'s question.

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
    for every attempt, across releases and restarts), ``attempts``, ``crashes``,
    ``in_attempt``, ``first_claimed_at``, ``source`` and the folder's ``name`` in incoming/
    when it was claimed (escaped when it is not UTF-8, with ``name_hex`` holding its bytes).
    It stays in done/ and failed/ folders.

What a dropper leaves in a folder is untrusted
    Everything in ``incoming/`` comes from droppers, so a claim trusts no control file it
    finds there: a session file is kept only when it is a regular file that validates
    (canonical UUIDv4, sane counts, a valid name and a known source) and is set aside as
    ``.caired-session.invalid.json`` otherwise; ``result.json`` and ``error.json`` are set
    aside as ``result.previous.json`` and ``error.previous.json`` (only caired writes them,
    in ``active/``, where droppers cannot); a ``.caired-lock`` that is not a regular file is
    set aside as ``.caired-lock.invalid``. Each is one ``control_file_set_aside`` line.
    Files are read relative to the folder's descriptor with ``O_NOFOLLOW | O_NONBLOCK``,
    checked to be regular and read up to a cap; folders are opened with ``O_NOFOLLOW``;
    every move and write is relative to a descriptor of the spool folder it happens in, so
    no symlink in the spool is ever followed. Names are bytes: one that is not UTF-8 is
    streamed and filed like any other and shown escaped.

A folder that kills the process is quarantined
    ``begin_attempt`` writes ``in_attempt: true`` (durably) before each attempt and
    ``end_attempt`` clears it after; a clean shutdown clears it on release. A folder found
    with ``in_attempt`` still set was being streamed when its process died (native crash,
    OOM killer, watchdog): ``crashes`` counts that, and once it reaches ``max_crashes``
    recovery files the folder in ``failed/`` saying so, so a crash loop ends by itself.

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
import errno
import json
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs
import structlog

from caired import fsops
from caired.claim import MAX_ATTEMPTS_RECORDED as MAX_ATTEMPTS_RECORDED
from caired.claim import SESSION_FILE as SESSION_FILE
from caired.claim import SOURCES as SOURCES
from caired.claim import Claim as Claim
from caired.claim import check_name as check_name
from caired.claim import error_record as error_record
from caired.claim import now_iso
from caired.claim import spool_error as _spool_error
from caired.claim import validate_session as validate_session
from caired.config import SpoolConfig
from caired.done_order import DoneOrder
from caired.errors import LocksRefused, SpoolError
from caired.fsops import GONE, shown
from caired.settle import HOLD_MARKER as HOLD_MARKER
from caired.settle import READY_MARKER, Readiness
from caired.settle import Scan as Scan

log = structlog.get_logger()

RESULT_FILE: Final = "result.json"
ERROR_FILE: Final = "error.json"
PREVIOUS_ERROR_FILE: Final = "error.previous.json"
PREVIOUS_RESULT_FILE: Final = "result.previous.json"
INVALID_SESSION_FILE: Final = ".caired-session.invalid.json"
LOCK_FILE: Final = ".caired-lock"  # its OFD lock says which process owns the folder
INVALID_LOCK_FILE: Final = ".caired-lock.invalid"
FOLDERS: Final = ("incoming", "active", "done", "failed", "tmp")
MOUNTINFO: Final = Path("/proc/self/mountinfo")

OUTCOME_MODE: Final = 0o644  # result.json, error.json
CONTROL_FILE_CAP: Final = 64 * 1024  # bytes a session, result or error file may have
NEW_PREFIX: Final = ".caired-new-"  # create_active() staging folders in tmp/
_STAGING_GRACE: Final = 60.0  # seconds a staging folder is left alone: its builder locks it in microseconds
_NO_LOCKS_ADVICE: Final = (
    "the spool must be on a filesystem that grants open file description locks "
    "(a local one, or NFS whose lock service works: NFSv4, or NFSv3 with rpc.statd running)"
)
_LOCKS_REFUSED_ADVICE: Final = (
    "nobody holds that lock, so the filesystem or a security module (SELinux, AppArmor) refuses it; "
    + _NO_LOCKS_ADVICE
)
_LOCAL_ONLY_LOCKS: Final = frozenset({"nolock", "local_lock=posix", "local_lock=all"})  # NFS options
# What keep_frames = false deletes and what queue counts: frames, and a video (a session's frames too).
FRAME_SUFFIXES: Final = (".png", ".jpg", ".jpeg", ".avi", ".mp4", ".mkv", ".mov")


def check_shared_locks(root: Path, mountinfo: Path = MOUNTINFO) -> None:
    """SpoolError if ``root`` is on an NFS mount whose byte-range locks stay on this machine.

    NFS mounted with ``nolock`` or ``local_lock=posix|all`` does not refuse locks: it grants
    them locally and never asks the server, so two machines would both hold a folder's lock
    and stream it twice. Nothing in the locks themselves shows it; the mount options do.
    """
    mount = fsops.mount_of(root, mountinfo)
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


def _is_frame(name: str) -> bool:
    return name.lower().endswith(FRAME_SUFFIXES)


class _CannotSetAside(OSError):
    """A control file caired did not write could not be moved out of the way."""


@attrs.define
class Tally:
    """Folders in each spool folder and the disk done/ and failed/ take, kept as this process
    moves folders rather than counted on every look (done/ grows without end).

    Counted once (``Spool.count_folders``; the bytes by retention's first pass), then moved
    by this process's own claims, outcomes and deletions; scans refresh ``incoming`` and
    rescans ``active``. Folders another process files in done/ or failed/ are seen at the
    next count (retention recounts on its long clock).
    """

    incoming: int = 0
    active: int = 0
    done: int = 0
    failed: int = 0
    done_bytes: int = 0  # blocks the files take, in bytes
    failed_bytes: int = 0
    folders_counted: bool = False
    bytes_counted: bool = False

    def move(self, origin: str, to: str) -> None:
        for which, step in ((origin, -1), (to, 1)):
            if which in _COUNTED:
                setattr(self, which, max(0, getattr(self, which) + step))


_COUNTED: Final = ("incoming", "active", "done", "failed")


def usage(dir_fd: int) -> int:
    """Bytes a folder takes on disk (its own blocks and its files', subfolders included), never
    following a symlink. Best effort: what cannot be looked at counts 0."""
    try:
        total = os.fstat(dir_fd).st_blocks * 512
        entries = list(os.scandir(dir_fd))
    except OSError:
        return 0
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                with fsops.opened_dir(entry.name, dir_fd=dir_fd) as sub:
                    total += usage(sub)
            else:
                total += st.st_blocks * 512
        except (OSError, RecursionError):
            continue
    return total


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
        keep_camera_frames: bool = True,
        max_crashes: int = 3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.active = self.root / "active"
        self.done = self.root / "done"
        self.failed = self.root / "failed"
        self.tmp = self.root / "tmp"
        self.keep_frames = keep_frames
        self.keep_camera_frames = keep_camera_frames
        self.max_crashes = max_crashes
        self._clock = clock
        self._readiness = Readiness(settle_seconds, clock)
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._held: set[tuple[int, int]] = set()  # inodes of this process's claims
        self._unrecovered: dict[str, str] = {}  # folders of active/ recover() could not move: why
        self._tally = Tally()
        self.done_order = DoneOrder(self.done, clock=clock)  # what this process files in done/, in order

    @classmethod
    def from_config(cls, cfg: SpoolConfig, *, keep_camera_frames: bool = True) -> Spool:
        return cls(cfg.dir, settle_seconds=cfg.settle_seconds, keep_frames=cfg.keep_frames,
                   keep_camera_frames=keep_camera_frames, max_crashes=cfg.max_crashes)

    @property
    def settle_seconds(self) -> float:
        return self._readiness.settle_seconds

    def __repr__(self) -> str:
        return f"Spool({str(self.root)!r})"

    def _dir(self, which: str) -> int:
        """A descriptor of one spool folder, opened (without following a symlink) once."""
        with self._lock:
            fd = self._fds.get(which)
            if fd is None:
                fd = self._fds[which] = fsops.open_dir(self.root / which)
            return fd

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    # -- setting up ------------------------------------------------------------------------------

    def prepare(self, *, mountinfo: Path | str = MOUNTINFO) -> None:
        """Create the spool folders that are missing, with the modes of the droppers' model
        (caired.permissions): the spool 0750; incoming/ and tmp/ 3777 (setgid: a folder a dropper
        makes there belongs to caired's group, so caired can move it and write in it; sticky:
        nobody renames or removes another's); active/ 0750; done/ and failed/ 0755. The modes are
        set with fchmod, so the umask does not narrow them. Folders that exist keep their modes
        (``caired check-config`` says when they differ from the model).

        SpoolError (exit code 73) with a one-line message if they cannot be created or written, if
        the setgid bit cannot be set (a unit with RestrictSUIDSGID=yes forbids it: create incoming/
        and tmp/ as root, as the README says), or if the spool is on an NFS mount whose locks only
        this machine sees (``mountinfo``: the mount table to look in).
        """
        from caired.permissions import FOLDER_MODES, ROOT_MODE, group_name, user_name

        advice = "create it writable for caired's user, or set [spool] dir to a writable folder"
        try:
            self.root.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            pass  # not a folder: making the spool in it says so (ENOTDIR)
        except OSError as exc:
            raise _spool_error("create the spool folder", self.root.parent, exc, advice) from exc
        for path, mode in ((self.root, ROOT_MODE), *((self.root / name, FOLDER_MODES[name]) for name in FOLDERS)):
            try:
                path.mkdir(mode=0o700)  # nobody else gets in before its mode is set
                created = True
            except FileExistsError:
                created = False
            except OSError as exc:
                raise _spool_error("create the spool folder", path, exc, advice) from exc
            try:
                fd = fsops.open_dir(path)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise SpoolError(
                        f"{shown(str(path))} is not a folder; move it away or set [spool] dir elsewhere", path=path
                    ) from exc
                raise _spool_error("open the spool folder", path, exc, advice) from exc
            try:
                if created:
                    os.fchmod(fd, mode)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.rmdir(path)  # empty and just made: the next start makes it again
                user, group = user_name(os.geteuid()), group_name(os.getegid())
                raise SpoolError(
                    f"cannot set the mode {mode:04o} of the new spool folder {shown(str(path))}: "
                    f"{exc.strerror or exc} (a unit with RestrictSUIDSGID=yes forbids the setgid bit); "
                    f"create it as root: install -d -o {user} -g {group} -m {mode:04o} {shown(str(path))}",
                    path=path,
                    code=exc.errno,
                ) from exc
            finally:
                os.close(fd)
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
        for name in FOLDERS:
            try:
                self._dir(name)
            except OSError as exc:
                raise _spool_error("open the spool folder", self.root / name, exc, advice) from exc

    # -- incoming/ -------------------------------------------------------------------------------

    def scan(self) -> Scan:
        """Look at incoming/ once: which folders are complete, and when to look again (``settle.Readiness``)."""
        try:
            incoming = self._dir("incoming")
            entries = list(os.scandir(incoming))
        except OSError as exc:
            raise _spool_error(
                "read", self.incoming, exc, "check that the spool exists (caired run creates it)"
            ) from exc
        scan = self._readiness.look(incoming, entries)
        with self._lock:
            self._tally.incoming = scan.folders
        return scan

    def forget_readiness(self) -> None:
        """Make the next scan look into every folder of incoming/ again (the periodic rescan)."""
        self._readiness.forget()

    # -- claiming --------------------------------------------------------------------------------

    def claim(self, name: str, *, source: str = "drop") -> Claim | None:
        """Take incoming/<name> for streaming: lock it, move it to active/, load or create its
        session file. None if another process took it first (or it is gone).

        Control files a dropper left in it are validated or set aside (see the module's
        docstring): the folder is then streamed like any other. A folder whose session file
        says it was being streamed when its process died counts one more crash, and with
        ``max_crashes`` of them it is filed in failed/ (None), and so is a folder whose control
        files meet a bug here (an exception that is no OSError). A folder an operator holds
        (``HOLD_MARKER``, checked under the lock, so ``caired hold`` and a claim never cross) is
        left where it is (None); ``scan`` does not offer it either.
        """
        check_name(name)
        incoming, active = self._dir("incoming"), self._dir("active")
        src = self.incoming / name
        try:
            dir_fd = fsops.open_dir(name, dir_fd=incoming)
        except OSError as exc:
            if exc.errno in GONE:  # taken or removed meanwhile (ESTALE: by another machine, on NFS)
                return None
            if exc.errno == errno.ELOOP:  # replaced by a symlink meanwhile: not ours to follow
                return None
            raise _spool_error("open", src, exc, "let caired's group read dropped folders") from exc
        lock_fd: int | None = None
        try:
            st = os.fstat(dir_fd)
            lock_fd = self._lock_folder(dir_fd, incoming, name, set_aside=True)
            if lock_fd is None:
                os.close(dir_fd)
                return None
            if fsops.lexists(dir_fd, HOLD_MARKER):  # put on hold since the scan: not ours to take
                os.close(lock_fd)
                os.close(dir_fd)
                return None
            folder = fsops.move_unique(incoming, name, active, name)
            if not fsops.same_inode(dir_fd, folder, dir_fd=active):
                # Its owner renamed it between our lock and our rename, which then moved whatever
                # had taken the name: put that back where it was, untouched, and let this one go.
                fsops.move_unique(active, folder, incoming, name)
                raise FileNotFoundError(errno.ENOENT, "renamed by its owner while being claimed", shown(name))
        except BaseException as exc:
            if lock_fd is not None:
                os.close(lock_fd)
            os.close(dir_fd)
            if isinstance(exc, OSError) and not isinstance(exc, SpoolError):
                if exc.errno in GONE:  # moved away by someone else after our check
                    return None
                raise _spool_error("claim", src, exc, "check the spool's permissions") from exc
            raise
        key = (st.st_dev, st.st_ino)
        with self._lock:
            self._held.add(key)
            self._tally.move("incoming", "active")
        claim = Claim(name=name, root=self.root, folder=folder, datapt_id="", source=source,
                      dir_fd=dir_fd, lock_fd=lock_fd, key=key)
        try:
            session = self._load_session(dir_fd, claim.path)
            fresh = session is None
            if session is None:
                session = {"datapt_id": str(uuid.uuid4()), "attempts": 0, "crashes": 0, "in_attempt": False,
                           "first_claimed_at": now_iso(self._clock), "source": source}
            claim.datapt_id, claim.source = session["datapt_id"], session["source"]
            claim.attempts, claim.crashes = session["attempts"], session["crashes"]
            claim.first_claimed_at = session["first_claimed_at"]
            died = session["in_attempt"]
            for found, aside in ((RESULT_FILE, PREVIOUS_RESULT_FILE), (ERROR_FILE, PREVIOUS_ERROR_FILE)):
                if fsops.lexists(dir_fd, found):
                    self._set_aside(dir_fd, claim.shown, found, aside, "only caired writes it, in active/")
            if died:
                claim.crashes += 1
            if fresh or died:
                claim._write_session()
        except _CannotSetAside as exc:
            # What a dropper planted cannot even be moved aside: never to be trusted, never to be
            # streamed. Filed with the reason, rather than given back to be claimed forever.
            claim.datapt_id = claim.datapt_id or str(uuid.uuid4())
            try:
                self.fail(claim, error_record(claim, f"a file caired did not write cannot be set aside: {exc}",
                                              error_type="UntrustedControlFile"))
            except SpoolError:
                self._move_back_or_drop(claim)
                raise
            return None
        except BaseException as exc:
            if isinstance(exc, Exception) and not isinstance(exc, OSError) and self._file_unclaimable(claim, exc):
                return None
            self._move_back_or_drop(claim)
            if isinstance(exc, OSError) and not isinstance(exc, SpoolError):
                raise _spool_error("claim", claim.path, exc, "check the spool's permissions") from exc
            raise
        if self._quarantine_if_crashed(claim):
            return None
        log.info("folder_claimed", session=claim.shown, datapt_id=claim.datapt_id, attempts=claim.attempts,
                 source=claim.source, path=shown(str(claim.path)))
        return claim

    def _file_unclaimable(self, claim: Claim, exc: Exception) -> bool:
        """Called while ``claim`` handles an exception that is not the spool's trouble (an
        OSError) but a bug met in what the dropper left: file the folder in failed/ with that
        reason rather than give it back, where every claim would meet it again, for ever.
        False when even that cannot be written: then it goes back like any claim that failed."""
        log.error("internal_error", where="claim", session=claim.shown, error_type=type(exc).__name__,
                  reason=str(exc), exc_info=True)
        claim.datapt_id = claim.datapt_id or str(uuid.uuid4())
        reason = f"caired could not take this folder ({type(exc).__name__}: {exc}); see the journal"
        try:
            self.fail(claim, error_record(claim, reason, error_type=type(exc).__name__))
        except SpoolError:
            return False
        return True

    def create_active(self, name: str, *, source: str) -> Claim:
        """A new, locked session folder active/<name> (or <name>.1...) with its session file,
        for frames written as they are captured. Built in tmp/, its lock file locked, and
        renamed in, so no other process ever sees it in active/ unlocked."""
        check_name(name)
        tmp, active = self._dir("tmp"), self._dir("active")
        staging = f"{NEW_PREFIX}{uuid.uuid4().hex}"
        dir_fd: int | None = None
        lock_fd: int | None = None
        try:
            os.mkdir(staging, 0o770, dir_fd=tmp)
            dir_fd = fsops.open_dir(staging, dir_fd=tmp)
            st = os.fstat(dir_fd)
            lock_fd = self._lock_folder(dir_fd, tmp, staging, set_aside=False)
            if lock_fd is None:  # a staging cleaner took it (a clock far off from the file server's)
                raise FileNotFoundError(errno.ENOENT, "removed while being created", str(self.tmp / staging))
            claim = Claim(name=name, root=self.root, folder=staging, where="tmp", datapt_id=str(uuid.uuid4()),
                          source=source, first_claimed_at=now_iso(self._clock), dir_fd=dir_fd, lock_fd=lock_fd,
                          key=(st.st_dev, st.st_ino))
            claim._write_session()
            claim.folder = fsops.move_unique(tmp, staging, active, name)
            claim.where = "active"
        except OSError as exc:
            for fd in (lock_fd, dir_fd):
                if fd is not None:
                    os.close(fd)
            with contextlib.suppress(OSError):
                fsops.remove_tree(tmp, staging)
            if isinstance(exc, SpoolError):
                raise
            raise _spool_error("create a session folder in", self.active, exc, "check the spool") from exc
        with self._lock:
            self._held.add(claim._key)
            self._tally.move("tmp", "active")
        log.info("folder_created", session=claim.shown, datapt_id=claim.datapt_id, source=source,
                 path=shown(str(claim.path)))
        return claim

    def _lock_folder(self, dir_fd: int, parent_fd: int, name: str, *, set_aside: bool) -> int | None:
        """Lock the folder open as ``dir_fd`` (named ``name`` in ``parent_fd``) through its lock file.

        Returns the lock file's descriptor, whose closing releases the lock; None when another
        open file description holds the lock, when the folder has been removed, or when ``name``
        no longer names this folder or the folder's lock file is no longer the file locked.
        A lock file that is not a regular file is set aside (``set_aside``: a dropped folder)
        or a SpoolError; LocksRefused when the filesystem refuses the lock.
        """
        lock_path = self.root / "?" / name / LOCK_FILE
        for _ in range(2):
            try:
                fd = fsops.open_lock_file(dir_fd, LOCK_FILE)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ESTALE):  # the folder was removed (on NFS: by another machine)
                    return None
                if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO) and set_aside:
                    self._set_lock_file_aside(dir_fd, name)
                    continue
                if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                    raise SpoolError(f"{shown(name)}/{LOCK_FILE} is not a regular file; remove it",
                                     path=lock_path, code=exc.errno) from exc
                raise _spool_error("open", f"{shown(name)}/{LOCK_FILE}", exc,
                                   "let caired's group write dropped folders") from exc
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    if set_aside:
                        os.close(fd)
                        self._set_lock_file_aside(dir_fd, name)
                        continue
                    raise SpoolError(f"{shown(name)}/{LOCK_FILE} is not a regular file; remove it", path=lock_path)
                try:
                    locked = fsops.try_lock(fd)
                except PermissionError as exc:  # EACCES, EPERM, and nobody holds the lock
                    raise _spool_error("lock", f"{shown(name)}/{LOCK_FILE}", exc, _LOCKS_REFUSED_ADVICE,
                                       kind=LocksRefused) from exc
                except OSError as exc:  # ENOLCK, EINVAL, EOPNOTSUPP...: no such locks on this filesystem
                    raise _spool_error("lock", f"{shown(name)}/{LOCK_FILE}", exc, _NO_LOCKS_ADVICE,
                                       kind=LocksRefused) from exc
                if (locked and fsops.same_inode(dir_fd, name, dir_fd=parent_fd)
                        and fsops.same_inode(fd, LOCK_FILE, dir_fd=dir_fd)):
                    return fd
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            os.close(fd)
            return None
        return None

    def _set_lock_file_aside(self, dir_fd: int, name: str) -> None:
        try:
            fsops.rename_noreplace(dir_fd, LOCK_FILE, dir_fd, INVALID_LOCK_FILE)
        except FileExistsError:
            # An earlier one is already set aside: this one goes under a unique name.
            fsops.move_unique(dir_fd, LOCK_FILE, dir_fd, INVALID_LOCK_FILE)
        log.warning("control_file_set_aside", session=shown(name), file=LOCK_FILE, to=INVALID_LOCK_FILE,
                    reason="not a regular file")

    def _load_session(self, dir_fd: int, where: Path) -> dict[str, Any] | None:
        """The folder's session file when it is present and valid; None otherwise (an invalid
        one is set aside, with a warning)."""
        try:
            data = fsops.read_regular(dir_fd, SESSION_FILE, CONTROL_FILE_CAP)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._set_session_aside(dir_fd, where, exc.strerror or str(exc))
            return None
        try:
            return validate_session(json.loads(data), where.name)
        except (ValueError, RecursionError) as exc:
            self._set_session_aside(dir_fd, where, str(exc) or type(exc).__name__)
            return None

    def _set_session_aside(self, dir_fd: int, where: Path, reason: str) -> None:
        self._set_aside(dir_fd, shown(where.name), SESSION_FILE, INVALID_SESSION_FILE, reason)

    @staticmethod
    def _set_aside(dir_fd: int, session: str, found: str, aside: str, reason: str) -> None:
        """Move a control file caired did not write out of the way (under ``aside``, or
        ``aside.1``... if taken); _CannotSetAside when even that fails."""
        try:
            to = fsops.move_unique(dir_fd, found, dir_fd, aside)
        except OSError as exc:
            raise _CannotSetAside(f"{found}: {exc.strerror or exc}") from exc
        log.warning("control_file_set_aside", session=session, file=found, to=to, reason=reason)

    def _move_back_or_drop(self, claim: Claim) -> None:
        try:
            self._move_back(claim, event="folder_released")
        except OSError:
            self._drop(claim)  # unlocked in active/: the next recover() gives it back

    def _quarantine_if_crashed(self, claim: Claim) -> bool:
        """File a folder that was being streamed when its process died ``max_crashes`` times."""
        if self.max_crashes <= 0 or claim.crashes < self.max_crashes:
            return False
        reason = (f"quarantined: caired died {claim.crashes} times while streaming this folder "
                  "(a native crash, the OOM killer or the watchdog); see the journal")
        error = error_record(claim, reason, error_type="Quarantined")
        try:
            self.fail(claim, error)
        except SpoolError as err:
            log.error("folder_not_quarantined", session=claim.shown, reason=str(err))
            self._drop(claim)
            return True
        log.error("folder_quarantined", session=claim.shown, datapt_id=claim.datapt_id, crashes=claim.crashes,
                  reason=reason)
        return True

    # -- outcomes --------------------------------------------------------------------------------

    def finish(self, claim: Claim, result: Mapping[str, Any]) -> Path:
        """Success: write result.json durably, then move the folder to done/ (done/X.1... on a clash).

        With keep_frames off, the frames are deleted after the move. SpoolError if
        result.json cannot be written: the folder stays in active/, held, without result.json.
        """
        self._write_outcome(claim, RESULT_FILE, result)
        return self._retire(claim, "done", "folder_done")

    def fail(self, claim: Claim, error: Mapping[str, Any]) -> Path:
        """Permanent failure: write error.json durably, then move the folder to failed/."""
        self._write_outcome(claim, ERROR_FILE, error)
        reason = error.get("reason")
        return self._retire(claim, "failed", "folder_failed", reason=str(reason) if reason is not None else None)

    def _write_outcome(self, claim: Claim, name: str, data: Mapping[str, Any]) -> None:
        claim._check_held()
        claim.in_attempt = False
        try:
            # Readable by all who may enter the folder: its dropper reads her result (README, deploy).
            fsops.write_atomic(claim.dir_fd, name, fsops.json_bytes(data), mode=OUTCOME_MODE)
        except OSError as exc:
            raise _spool_error("write", claim.path / name, exc,
                               "free space on the spool's filesystem or fix its permissions") from exc

    def release(self, claim: Claim) -> Path:
        """Give the folder back to incoming/ (shutdown, or try later), keeping its datapt_id.

        It is marked ``.ready`` (it was complete when claimed). A folder that already holds
        result.json or error.json goes to done/ or failed/ instead: it is never streamed twice.
        An attempt still marked under way is marked ended first: a release is no crash.
        """
        claim._check_held()
        try:
            if self._finished_outcome(claim.dir_fd) is not None:
                return self._retire_finished(claim, origin="active")
            claim.end_attempt()
            return self._move_back(claim, event="folder_released")
        except SpoolError:
            self.let_go(claim)
            raise

    def handoff(self, claim: Claim) -> Path:
        """Hand a folder written in active/ (camera store-and-forward) to incoming/, marked
        ``.ready``, to be claimed and streamed later like a dropped folder."""
        claim._check_held()
        claim.end_attempt()
        try:
            return self._move_back(claim, event="folder_handed_off")
        except SpoolError:
            self.let_go(claim)
            raise

    @staticmethod
    def _finished_outcome(dir_fd: int) -> str | None:
        if fsops.lexists(dir_fd, RESULT_FILE):
            return "done"
        if fsops.lexists(dir_fd, ERROR_FILE):
            return "failed"
        return None

    def _move_back(self, claim: Claim, *, event: str, **fields: Any) -> Path:
        origin = self._dir(claim.where)
        _mark_ready(claim.dir_fd)
        try:
            self._check_in_place(claim)
            claim.folder = fsops.move_unique(origin, claim.folder, self._dir("incoming"), claim.name)
        except OSError as exc:
            raise _spool_error("move back to incoming/", claim.path, exc, "check the spool's permissions") from exc
        with self._lock:
            self._tally.move(claim.where, "incoming")
        claim.where = "incoming"
        fsops.fsync_dirs_quietly(self._dir("incoming"), origin)
        self._drop(claim)
        log.info(event, session=claim.shown, datapt_id=claim.datapt_id, path=shown(str(claim.path)), **fields)
        return claim.path

    def _check_in_place(self, claim: Claim) -> None:
        """The held folder must still be the one under its name: a rename by name would
        otherwise move whatever was put there instead."""
        if not fsops.same_inode(claim.dir_fd, claim.folder, dir_fd=self._dir(claim.where)):
            raise SpoolError(f"{shown(str(claim.path))} is no longer the folder claimed; it was moved or replaced",
                             path=claim.path, code=errno.ESTALE)

    def _retire(self, claim: Claim, to: str, event: str, *, reason: str | None = None) -> Path:
        """Move a held folder whose result.json or error.json is durable to done/ or failed/."""
        origin = self._dir(claim.where)
        try:
            self._check_in_place(claim)
            folder = fsops.move_unique(origin, claim.folder, self._dir(to), claim.folder)
        except OSError as exc:
            raise _spool_error(f"move into {to}/", claim.path, exc, "check the spool's permissions") from exc
        with self._lock:
            self._tally.move(claim.where, to)
        claim.folder, claim.where = folder, to
        fsops.fsync_dirs_quietly(self._dir(to), origin)
        deleted = 0
        if to == "done":
            with contextlib.suppress(OSError):  # filed now: retention's order is the folders' mtime (see there)
                os.utime(claim.dir_fd)
            if not self._keeps_frames(claim):
                deleted = self._delete_frames(claim)
            with contextlib.suppress(OSError):
                self.done_order.filed(os.fstat(claim.dir_fd).st_mtime_ns, claim.folder)
        size = usage(claim.dir_fd)
        with self._lock:
            if to == "done":
                self._tally.done_bytes += size
            else:
                self._tally.failed_bytes += size
        if to == "failed" and reason is None:
            reason = _stored_reason(claim.dir_fd)
        self._drop(claim)
        if to == "failed":
            log.error(event, session=claim.shown, datapt_id=claim.datapt_id, path=shown(str(claim.path)),
                      reason=reason)
        else:
            log.info(event, session=claim.shown, datapt_id=claim.datapt_id, path=shown(str(claim.path)),
                     frames_deleted=deleted)
        return claim.path

    def _retire_finished(self, claim: Claim, *, origin: str) -> Path:
        to = self._finished_outcome(claim.dir_fd) or "failed"
        dest = self._retire(claim, to, "folder_done" if to == "done" else "folder_failed")
        log.info("folder_recovered", session=claim.shown, datapt_id=claim.datapt_id, **{"from": origin, "to": to})
        return dest

    def let_go(self, claim: Claim) -> None:
        """A held folder that cannot be moved (a full disk, permissions) is let go where it is,
        in active/ and unlocked: no descriptor stays open for it, and the next rescan's recovery
        moves it on like an orphan (to done/ when it holds result.json)."""
        if claim.held:
            log.warning("folder_left_for_recovery", session=claim.shown, path=shown(str(claim.path)))
            self._drop(claim)

    def _drop(self, claim: Claim) -> None:
        with self._lock:
            self._held.discard(claim._key)
        claim._close()

    def _keeps_frames(self, claim: Claim) -> bool:
        return self.keep_camera_frames if claim.source == "camera" else self.keep_frames

    def _delete_frames(self, claim: Claim) -> int:
        why = "camera.keep_frames = false" if claim.source == "camera" else "spool.keep_frames = false"
        try:
            deleted, freed = delete_frames(claim.dir_fd)
        except OSError as exc:
            log.warning("frames_not_deleted", path=shown(str(claim.path)), reason=exc.strerror or str(exc))
            return 0
        if deleted:
            log.info("retention_deleted", what="frames", path=shown(str(claim.path)), files=deleted, bytes=freed,
                     why=why)
        return deleted

    # -- recovery --------------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Move on every folder of active/ whose owner died (nobody holds its lock): to done/
        if it holds result.json, to failed/ if error.json, to failed/ if it has now killed
        ``max_crashes`` processes, else back to incoming/ (marked ``.ready``, session file kept).
        Also removes leftover staging of create_active. Returns the names moved.

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
            active = self._dir("active")
            entries = list(os.scandir(active))
        except OSError as exc:
            raise _spool_error("read", self.active, exc, "check that the spool exists") from exc
        folders = 0
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                continue
            folders += not entry.name.startswith(".")
            with self._lock:
                if (st.st_dev, st.st_ino) in self._held:  # ours: alive, and never reopened here
                    continue
            try:
                if self._recover_one(active, entry.name):
                    moved.append(entry.name)
            except LocksRefused:
                raise
            except (OSError, ValueError) as exc:
                failures[entry.name] = str(exc) if isinstance(exc, SpoolError) else getattr(exc, "strerror", None) \
                    or str(exc)
        with self._lock:
            self._tally.active = max(0, folders - len(moved))
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
            log.warning("folder_not_recovered", path=shown(str(self.active / name)), reason=reason)

    def _recover_one(self, active: int, name: str) -> bool:
        """Move on the folder ``name`` of active/ if nobody holds its lock. A folder without a
        lock file (left by an older caired) gets one here, locked like any other."""
        try:
            dir_fd = fsops.open_dir(name, dir_fd=active)
        except OSError as exc:
            if exc.errno in GONE:  # moved on by another process meanwhile
                return False
            raise
        try:
            st = os.fstat(dir_fd)
            lock_fd = self._lock_folder(dir_fd, active, name, set_aside=False)
        except BaseException:
            os.close(dir_fd)
            raise
        if lock_fd is None:  # alive, or moved on by another process meanwhile
            os.close(dir_fd)
            return False
        claim = Claim(name=name, root=self.root, folder=name, datapt_id="", dir_fd=dir_fd, lock_fd=lock_fd,
                      key=(st.st_dev, st.st_ino))
        try:
            session = self._load_session(dir_fd, claim.path) or {}
            claim.name = session.get("name", name)
            claim.datapt_id = session.get("datapt_id", "")
            claim.attempts, claim.crashes = session.get("attempts", 0), session.get("crashes", 0)
            claim.source, claim.first_claimed_at = session.get("source", "drop"), session.get("first_claimed_at", "")
            fsops.remove_temporaries(dir_fd)
            if self._finished_outcome(dir_fd) is not None:
                self._retire_finished(claim, origin="active")
                return True
            if session.get("in_attempt"):
                claim.crashes += 1
                claim._write_session()
                if self._quarantine_if_crashed(claim):
                    return True
            self._move_back(claim, event="folder_recovered", **{"from": "active", "to": "incoming"})
        except SpoolError:
            raise
        except OSError as exc:
            raise _spool_error("move back to incoming/", claim.path, exc, "check the spool's permissions") from exc
        finally:
            self._drop(claim)
        return True

    def _clean_staging(self) -> None:
        """Remove the staging folders of create_active whose creator died (nobody holds their lock).

        A staging folder younger than ``_STAGING_GRACE`` is left alone: between its ``mkdir``
        and its lock, its builder does not hold it yet, and taking it then would break that
        builder's create_active.
        Everything but the lock file goes while the lock is held; the lock file and the folder
        only after it is closed: NFS keeps an unlinked file that is still open as a ``.nfs...``
        file, which would keep the folder from ever being removed. Best effort: what is left
        (including anything a dropper planted under that prefix that cannot be removed) is
        tried again at the next recover.
        """
        try:
            tmp = self._dir("tmp")
            entries = [e for e in os.scandir(tmp) if e.name.startswith(NEW_PREFIX)]
        except OSError:
            return
        now = self._clock()
        uid = os.geteuid()
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
                deleted = entry.name.startswith(f"{NEW_PREFIX}deleted-")  # caired delete's, a dropper's folder
                if (st.st_uid != uid and not deleted) or now - st.st_mtime < _STAGING_GRACE:
                    continue  # another user's (a dropper's name in tmp/), or still being built
                dir_fd = fsops.open_dir(entry.name, dir_fd=tmp)
            except OSError:
                continue
            try:
                fd = self._lock_folder(dir_fd, tmp, entry.name, set_aside=False)
                if fd is None:
                    continue
                try:
                    for child in os.scandir(dir_fd):
                        if child.name == LOCK_FILE:
                            continue
                        if child.is_dir(follow_symlinks=False):
                            fsops.remove_tree(dir_fd, child.name)
                        else:
                            os.unlink(child.name, dir_fd=dir_fd)
                finally:
                    os.close(fd)
                os.unlink(LOCK_FILE, dir_fd=dir_fd)
                os.rmdir(entry.name, dir_fd=tmp)
            except OSError:
                pass
            finally:
                os.close(dir_fd)

    # -- status ----------------------------------------------------------------------------------

    def count_folders(self) -> None:
        """Count the folders of incoming/, active/, done/ and failed/ once (a listing each, no
        look inside); from then on ``counts`` follows this process's moves."""
        found: dict[str, int] = {}
        for name in _COUNTED:
            try:
                with os.scandir(self._dir(name)) as entries:
                    found[name] = sum(1 for e in entries
                                      if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))
            except OSError:
                found[name] = 0
        with self._lock:
            for name, count in found.items():
                setattr(self._tally, name, count)
            self._tally.folders_counted = True

    def counts(self) -> dict[str, int]:
        """Folders in incoming/, active/, done/ and failed/ (dot-names not counted), as kept in
        the tally: counted on the first call, never walked again."""
        with self._lock:
            counted = self._tally.folders_counted
        if not counted:
            self.count_folders()
        with self._lock:
            return {name: getattr(self._tally, name) for name in _COUNTED}

    def tally(self) -> Tally:
        """A copy of the tally (counts and bytes)."""
        with self._lock:
            return attrs.evolve(self._tally)

    def adjust_tally(self, **deltas: int) -> None:
        """Add to the tally's fields (retention's deletions), never below 0."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._tally, name, max(0, getattr(self._tally, name) + delta))

    def set_bytes(self, *, done: int, failed: int) -> None:
        """The bytes done/ and failed/ take, as measured by a walk (retention's)."""
        with self._lock:
            self._tally.done_bytes, self._tally.failed_bytes = done, failed
            self._tally.bytes_counted = True


def delete_frames(dir_fd: int) -> tuple[int, int]:
    """Delete the frames (regular files named with ``FRAME_SUFFIXES``: images, and a video) of the
    folder open as ``dir_fd``, never following a symlink; everything else stays. Returns (files,
    bytes freed). The folder's mtime is put back afterwards, so it still tells when the folder
    was filed (retention's oldest-first order). OSError if the folder cannot be listed; a frame
    that vanished meanwhile is skipped."""
    before = os.fstat(dir_fd)
    deleted = freed = 0
    for entry in list(os.scandir(dir_fd)):
        if not _is_frame(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                continue
            os.unlink(entry.name, dir_fd=dir_fd)
        except FileNotFoundError:
            continue
        deleted += 1
        freed += st.st_blocks * 512
    if deleted:
        with contextlib.suppress(OSError):
            os.utime(dir_fd, ns=(before.st_atime_ns, before.st_mtime_ns))
    return deleted, freed


def _stored_reason(dir_fd: int) -> str | None:
    """The reason an error.json already in the folder gives (for a folder filed on recovery)."""
    try:
        data = json.loads(fsops.read_regular(dir_fd, ERROR_FILE, CONTROL_FILE_CAP))
    except (OSError, ValueError, RecursionError):
        return None
    reason = data.get("reason") if isinstance(data, dict) else None
    return str(reason) if reason is not None else None


def _mark_ready(dir_fd: int) -> None:
    """Put the ``.ready`` marker in a folder known to be complete. Best effort: without it the
    folder is still taken, after settle_seconds. Never follows or waits on what is there."""
    with contextlib.suppress(OSError):
        os.close(os.open(READY_MARKER, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         0o660, dir_fd=dir_fd))
