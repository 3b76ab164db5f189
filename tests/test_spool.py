"""The spool: readiness, exclusive claims across processes, crash-safe outcomes, the watcher."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Final

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from caired import fsops
from caired import spool as spool_module
from caired.errors import CairedError, ExitCode, SpoolError
from caired.fsops import write_json_atomic
from caired.protocol import UUID4_RE
from caired.spool import (
    ERROR_FILE,
    LOCK_FILE,
    READY_MARKER,
    RESULT_FILE,
    SESSION_FILE,
    Claim,
    Spool,
)
from tests.conftest import FakeClock


def make_folder(path: Path, frames: int = 3, *, old: float | None = None) -> Path:
    """A folder of ``frames`` small files named like frames; with ``old``, mtimes set that far back."""
    path.mkdir(parents=True)
    for i in range(frames):
        (path / f"{1747154380 + i / 30:.7f}.png").write_bytes(b"\x89PNG frame %d" % i)
    if old is not None:
        then = time.time() - old
        for child in path.iterdir():
            os.utime(child, (then, then))
        os.utime(path, (then, then))
    return path


def drop(spool: Spool, name: str, frames: int = 3) -> Path:
    """Drop a complete folder the recommended way: written in tmp/, then renamed into incoming/."""
    staged = make_folder(spool.tmp / name, frames)
    (staged / READY_MARKER).touch()
    target = spool.incoming / name
    os.rename(staged, target)
    return target


def settling(spool: Spool) -> float:
    """Seconds until the next look may find a folder ready; fails if one is ready now."""
    scan = spool.scan()
    assert scan.ready == [] and scan.settle_in is not None
    return scan.settle_in


def ready_now(spool: Spool) -> list[str]:
    """The folders ready now; fails if a folder is still settling."""
    scan = spool.scan()
    assert scan.settle_in is None
    return scan.ready


def session_of(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / SESSION_FILE).read_text())
    return data


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------------------------
# prepare, counts


def test_prepare_creates_the_folders(tmp_path: Path) -> None:
    s = Spool(tmp_path / "a" / "spool")
    s.prepare()
    s.prepare()  # idempotent
    assert listing(s.root) == ["active", "done", "failed", "incoming", "tmp"]
    assert s.incoming.stat().st_mode & stat.S_ISGID
    assert s.tmp.stat().st_mode & stat.S_ISGID
    assert s.counts() == {"incoming": 0, "active": 0, "done": 0, "failed": 0}


def test_prepare_reports_an_unusable_spool(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    s = Spool(tmp_path / "file" / "spool")
    with pytest.raises(SpoolError) as info:
        s.prepare()
    err = info.value
    assert isinstance(err, CairedError) and isinstance(err, OSError)
    assert err.exit_code == ExitCode.CANT_CREATE and int(err.exit_code) == 73
    assert err.errno == errno.ENOTDIR
    assert "[spool] dir" in str(err) and "\n" not in str(err)


_NFS4: Final = "rw,vers=4.2,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys"


def fake_mountinfo(tmp_path: Path, *mounts: tuple[Path | str, str, str]) -> Path:
    """A mount table in /proc/self/mountinfo's format with (mount point, fstype, super options)
    for each mount, in this order."""
    lines = ["1 0 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw"]
    for i, (point, fstype, options) in enumerate(mounts, start=2):
        escaped = str(point).replace("\\", "\\134").replace(" ", "\\040")
        lines.append(f"{i} 1 0:{i} / {escaped} rw,relatime shared:{i} master:1 - {fstype} server:/export {options}")
    path = tmp_path / "mountinfo"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("fstype", "options"),
    [
        ("nfs4", f"{_NFS4},clientaddr=10.0.0.2,local_lock=all,addr=10.0.0.1"),
        ("nfs4", f"{_NFS4},local_lock=posix,addr=10.0.0.1"),
        ("nfs", "rw,vers=3,hard,nolock,proto=tcp,local_lock=all,addr=10.0.0.1"),
        ("nfs", "rw,vers=3,hard,nolock,proto=tcp,addr=10.0.0.1"),
    ],
    ids=["local_lock=all", "local_lock=posix", "nolock and local_lock=all", "nolock"],
)
def test_prepare_refuses_an_nfs_mount_whose_locks_stay_on_this_machine(
    tmp_path: Path, fstype: str, options: str
) -> None:
    mount = tmp_path.resolve() / "nfs share"
    mountinfo = fake_mountinfo(tmp_path, (mount, fstype, options))
    s = Spool(mount / "spool")
    with pytest.raises(SpoolError) as info:
        s.prepare(mountinfo=mountinfo)
    err = info.value
    assert err.exit_code == ExitCode.CANT_CREATE and err.errno == errno.ENOLCK and "\n" not in str(err)
    assert str(mount) in str(err) and "remount it without nolock and local_lock" in str(err)


@pytest.mark.parametrize(
    ("fstype", "options"),
    [
        ("nfs4", f"{_NFS4},clientaddr=10.0.0.2,local_lock=none,addr=10.0.0.1"),
        ("nfs4", f"{_NFS4},local_lock=flock,addr=10.0.0.1"),  # flock is not what caired uses
        ("ext4", "rw,errors=remount-ro"),
    ],
    ids=["nfs4 local_lock=none", "nfs4 local_lock=flock", "ext4"],
)
def test_prepare_accepts_a_mount_with_shared_or_local_locks(tmp_path: Path, fstype: str, options: str) -> None:
    mount = tmp_path.resolve() / "share"
    Spool(mount / "spool").prepare(mountinfo=fake_mountinfo(tmp_path, (mount, fstype, options)))


def test_prepare_looks_at_the_mount_the_spool_is_on(tmp_path: Path) -> None:
    """The deepest mount point above the spool, by whole path components, and of two mounts on one
    point the later one (mounted on top); a missing table (no /proc) checks nothing."""
    local_locks = f"{_NFS4},local_lock=all"
    base = tmp_path.resolve()
    spool = Spool(base / "outer" / "inner" / "spool")
    inner_is_local = fake_mountinfo(
        tmp_path, (base / "outer", "nfs4", local_locks), (base / "outer" / "inner", "ext4", "rw")
    )
    spool.prepare(mountinfo=inner_is_local)
    inner_is_nfs = fake_mountinfo(
        tmp_path, (base / "outer", "ext4", "rw"), (base / "outer" / "inner", "nfs4", local_locks)
    )
    with pytest.raises(SpoolError, match="inner"):
        spool.prepare(mountinfo=inner_is_nfs)
    a_sibling_sharing_a_prefix = fake_mountinfo(tmp_path, (base / "outer" / "inn", "nfs4", local_locks))
    spool.prepare(mountinfo=a_sibling_sharing_a_prefix)
    local_mounted_over_nfs = fake_mountinfo(
        tmp_path, (base / "outer", "nfs4", local_locks), (base / "outer", "ext4", "rw")
    )
    spool.prepare(mountinfo=local_mounted_over_nfs)
    nfs_mounted_over_local = fake_mountinfo(tmp_path, (base / "outer", "ext4", "rw"), (base / "outer", "nfs", "nolock"))
    with pytest.raises(SpoolError):
        spool.prepare(mountinfo=nfs_mounted_over_local)
    spool.prepare(mountinfo=tmp_path / "no such table")


def test_counts(spool: Spool) -> None:
    drop(spool, "a")
    drop(spool, "b")
    make_folder(spool.incoming / ".staging")
    claim = spool.claim("a")
    assert claim is not None
    assert spool.counts() == {"incoming": 1, "active": 1, "done": 0, "failed": 0}
    spool.finish(claim, {"hr": 70.0})
    assert spool.counts() == {"incoming": 1, "active": 0, "done": 1, "failed": 0}


# ---------------------------------------------------------------------------------------------
# readiness


def test_marker_makes_a_folder_ready(spool: Spool) -> None:
    folder = make_folder(spool.incoming / "fresh")
    assert settling(spool) == pytest.approx(5.0, abs=0.2)
    (folder / READY_MARKER).touch()
    assert ready_now(spool) == ["fresh"]


def test_folder_moved_in_after_being_written_is_ready_at_once(spool: Spool, clock: FakeClock) -> None:
    make_folder(spool.tmp / "recorded")
    clock.advance(60)  # written a minute ago
    os.rename(spool.tmp / "recorded", spool.incoming / "recorded")  # the rename changes the ctime only
    assert ready_now(spool) == ["recorded"]


def test_folder_being_written_waits_until_settled(spool: Spool, clock: FakeClock) -> None:
    folder = make_folder(spool.incoming / "copying", frames=2)
    names, wait = (scan := spool.scan()).ready, scan.settle_in
    assert names == [] and wait == pytest.approx(5.0, abs=0.2)
    clock.advance(3)
    (folder / "late.png").write_bytes(b"more")  # still being written
    names, wait = (scan := spool.scan()).ready, scan.settle_in
    assert names == [] and wait is not None and 4.0 < wait <= 8.1
    clock.advance(wait)
    assert ready_now(spool) == ["copying"]


def test_a_change_seen_resets_the_settle_time_even_with_old_mtimes(spool: Spool, clock: FakeClock) -> None:
    make_folder(spool.tmp / "x")
    clock.advance(60)  # everything on disk is a minute old
    folder = spool.incoming / "x"
    os.rename(spool.tmp / "x", folder)
    assert spool.scan().ready == ["x"]  # a look at a quiet folder...
    # ...then a file grows while its times stay old (the clock runs a minute ahead of the disk)
    first = sorted(folder.glob("*.png"))[0]
    st = first.stat()
    first.write_bytes(b"grown" * 100)
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns))
    clock.advance(1)
    spool.forget_readiness()  # the periodic rescan: a ready folder's own mtime did not change
    assert settling(spool) == pytest.approx(5.0)
    clock.advance(5)
    assert ready_now(spool) == ["x"]


def test_restored_mtimes_still_wait_for_the_ctimes(spool: Spool, clock: FakeClock) -> None:
    """`cp -a` sets old mtimes on each file, the folder last; utime makes the ctimes recent."""
    make_folder(spool.incoming / "archived", old=3600)
    assert settling(spool) == pytest.approx(5.0, abs=0.2)
    clock.advance(5.2)
    assert ready_now(spool) == ["archived"]


def test_future_mtimes_count_from_the_first_look(spool: Spool, clock: FakeClock) -> None:
    folder = make_folder(spool.tmp / "skewed")
    future = clock.now + 86400
    for child in folder.iterdir():
        os.utime(child, (future, future))
    os.utime(folder, (future, future))
    clock.advance(60)
    os.rename(folder, spool.incoming / "skewed")
    assert settling(spool) == pytest.approx(5.0)
    clock.advance(5)
    assert ready_now(spool) == ["skewed"]


def test_ready_lists_oldest_first(spool: Spool, clock: FakeClock) -> None:
    for name, age in (("b", 10), ("a", 30), ("c", 20)):
        drop(spool, name)
        then = clock.now - age
        os.utime(spool.incoming / name, (then, then))
    assert ready_now(spool) == ["a", "c", "b"]


def test_dot_names_and_plain_files_are_ignored(spool: Spool) -> None:
    make_folder(spool.incoming / ".being-copied")
    (spool.incoming / ".being-copied" / READY_MARKER).touch()
    (spool.incoming / "notes.txt").write_text("hello")
    (spool.incoming / "link").symlink_to(spool.tmp)
    drop(spool, "real")
    with structlog.testing.capture_logs() as logs:
        assert ready_now(spool) == ["real"]
        assert ready_now(spool) == ["real"]
    ignored = [e for e in logs if e["event"] == "incoming_ignored"]
    assert sorted(e["name"] for e in ignored) == ["link", "notes.txt"]  # once each


def test_claim_refuses_hidden_and_path_names(spool: Spool) -> None:
    for bad in (".hidden", "a/b", "", ".."):
        with pytest.raises(ValueError):
            spool.claim(bad)


# ---------------------------------------------------------------------------------------------
# claiming


def test_claim_moves_to_active_with_a_session_file(spool: Spool) -> None:
    drop(spool, "s1")
    with structlog.testing.capture_logs() as logs:
        claim = spool.claim("s1")
    assert claim is not None and claim.held
    assert claim.path == spool.active / "s1" and not (spool.incoming / "s1").exists()
    assert str(uuid.UUID(claim.datapt_id, version=4)) == claim.datapt_id
    session = session_of(claim.path)
    assert session == {
        "datapt_id": claim.datapt_id,
        "attempts": 0,
        "crashes": 0,
        "in_attempt": False,
        "first_claimed_at": claim.first_claimed_at,
        "source": "drop",
        "name": "s1",
    }
    assert claim.begin_attempt() == 1
    assert session_of(claim.path)["attempts"] == 1
    assert [e["event"] for e in logs] == ["folder_claimed"]
    assert logs[0]["datapt_id"] == claim.datapt_id and logs[0]["session"] == "s1"


def test_claim_is_exclusive_between_spools(spool: Spool, clock: FakeClock) -> None:
    other = Spool(spool.root, clock=clock)
    drop(spool, "s1")
    first = spool.claim("s1")
    assert first is not None
    assert other.claim("s1") is None  # gone from incoming/
    assert other.recover() == []  # locked: its owner is alive


def lock_elsewhere(folder: Path) -> int:
    """Lock ``folder``'s lock file through an open file description of its own, as another
    claimer would; close the returned descriptor to let go."""
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, fsops.WHOLE_FILE_WRITE_LOCK)
    except OSError:
        os.close(fd)
        raise
    return fd


def locks_on(path: Path) -> list[tuple[str, str, str, str]]:
    """(kind, type, start, end) of each lock /proc/locks lists on ``path``'s inode."""
    inode = path.stat().st_ino
    found = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1] == "->":  # a waiter, not a lock
            continue
        if int(fields[5].rsplit(":", 1)[1]) == inode:
            found.append((fields[1], fields[3], fields[6], fields[7]))
    return found


def test_claim_skips_a_folder_locked_by_another_claimer(spool: Spool) -> None:
    """The loser of the lock race (the winner locked it but has not renamed it yet) skips it.
    The winner here is this very process, through another open file description: OFD locks
    conflict there, where claims taking process-owned POSIX locks (F_SETLK) would each be
    granted the lock again."""
    folder = drop(spool, "s1")
    fd = lock_elsewhere(folder)
    try:
        assert spool.claim("s1") is None
        assert folder.exists() and listing(spool.active) == []
    finally:
        os.close(fd)
    assert spool.claim("s1") is not None


def test_a_claim_is_an_ofd_write_lock_on_the_whole_lock_file(spool: Spool) -> None:
    """The kind of lock NFS can arbitrate between machines: not flock, not a process-owned
    POSIX lock, and over the whole file."""
    drop(spool, "s1")
    claim = spool.claim("s1")
    assert claim is not None
    lock_file = claim.path / LOCK_FILE
    assert stat.S_ISREG(lock_file.stat().st_mode)
    assert locks_on(lock_file) == [("OFDLCK", "WRITE", "0", "EOF")]
    assert locks_on(claim.path) == []  # the folder itself is not locked
    done = spool.finish(claim, {"hr": 70.0})
    assert locks_on(done / LOCK_FILE) == []


def test_a_held_claim_cannot_be_taken_through_another_open_file_description_of_this_process(
    spool: Spool, clock: FakeClock
) -> None:
    drop(spool, "s1")
    claim = spool.claim("s1")
    assert claim is not None
    with pytest.raises(BlockingIOError):
        lock_elsewhere(claim.path)
    other = Spool(spool.root, clock=clock)  # same process, no record of the claim: only the lock counts
    assert other.recover() == []
    assert claim.held and listing(spool.active) == ["s1"]


@pytest.mark.parametrize("meanwhile", ["the folder was replaced", "the lock file was replaced"])
def test_claim_gives_up_when_what_it_locked_is_no_longer_in_place(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, meanwhile: str
) -> None:
    """Between opening the lock file and locking it, the folder was moved away and another
    dropped under its name, or the lock file was unlinked and created anew: the lock taken
    guards neither, so the claim must not move anything."""
    folder = drop(spool, "s1")
    lock_for_real = fsops.try_lock

    def change_then_lock(fd: int) -> bool:
        if meanwhile == "the folder was replaced":
            os.rename(folder, spool.incoming / "moved")
            drop(spool, "s1", frames=5)
        else:
            (folder / LOCK_FILE).unlink()
            (folder / LOCK_FILE).touch()
        return lock_for_real(fd)

    monkeypatch.setattr(fsops, "try_lock", change_then_lock)
    assert spool.claim("s1") is None
    monkeypatch.undo()
    assert listing(spool.active) == []
    assert spool.claim("s1") is not None  # nothing was left locked


def orphan_in_active_and_one_dropped(spool: Spool) -> None:
    """active/s1, whose owner died holding it, and incoming/s2: one folder for recover, one for claim."""
    drop(spool, "s1")
    orphan = spool.claim("s1")
    assert orphan is not None
    _die_holding(spool, orphan)
    drop(spool, "s2")


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP], ids=errno.errorcode.get)
def test_a_filesystem_without_locks_gives_a_one_line_spool_error(
    spool: Spool, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    orphan_in_active_and_one_dropped(spool)

    def refuse(fd: int, command: int, arg: Any = 0) -> Any:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "fcntl", refuse)
    restarted = Spool(spool.root, clock=clock)
    for attempt in (lambda: spool.claim("s2"), restarted.recover):
        with pytest.raises(SpoolError) as info:
            attempt()
        err = info.value
        assert err.errno == code and err.exit_code == ExitCode.CANT_CREATE
        assert "\n" not in str(err) and LOCK_FILE in str(err) and "open file description locks" in str(err)
    monkeypatch.undo()
    assert listing(spool.incoming) == ["s2"] and listing(spool.active) == ["s1"]


def answer_eacces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make F_OFD_SETLK fail with EACCES, as POSIX allows for a conflict and as a filesystem or a
    security module does that refuses the lock; F_OFD_GETLK still answers truly."""
    real_fcntl = fcntl.fcntl

    def fake(fd: int, command: int, arg: Any = 0) -> Any:
        if command == fcntl.F_OFD_SETLK:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return real_fcntl(fd, command, arg)

    monkeypatch.setattr(fcntl, "fcntl", fake)


def test_eacces_on_a_lock_someone_holds_means_held(
    spool: Spool, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = drop(spool, "s1")
    busy = make_folder(spool.active / "busy")
    holders = [lock_elsewhere(folder), lock_elsewhere(busy)]
    try:
        answer_eacces(monkeypatch)
        assert spool.claim("s1") is None
        assert Spool(spool.root, clock=clock).recover() == []
        monkeypatch.undo()
        assert listing(spool.incoming) == ["s1"] and listing(spool.active) == ["busy"]
    finally:
        for fd in holders:
            os.close(fd)


def test_eacces_on_a_lock_nobody_holds_is_a_refusal_not_a_folder_owned_forever(
    spool: Spool, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    orphan_in_active_and_one_dropped(spool)
    answer_eacces(monkeypatch)
    restarted = Spool(spool.root, clock=clock)
    for attempt in (lambda: spool.claim("s2"), restarted.recover):
        with pytest.raises(SpoolError) as info:
            attempt()
        err = info.value
        assert err.errno == errno.EACCES and err.exit_code == ExitCode.CANT_CREATE
        assert "\n" not in str(err) and LOCK_FILE in str(err) and "refuses it" in str(err)
    monkeypatch.undo()
    assert listing(spool.incoming) == ["s2"] and listing(spool.active) == ["s1"]


def test_claim_with_a_busy_name_in_active_takes_a_suffix(spool: Spool) -> None:
    drop(spool, "s1")
    first = spool.claim("s1")
    drop(spool, "s1")
    second = spool.claim("s1")
    assert first is not None and second is not None
    assert second.path == spool.active / "s1.1" and second.name == "s1"
    assert first.datapt_id != second.datapt_id


_CLAIMER = """
import random, sys
from caired.spool import Spool
spool = Spool(sys.argv[1])
names = sys.argv[2:]
random.shuffle(names)
sys.stdin.readline()  # all start together
for name in names:
    if spool.claim(name) is not None:
        print("CLAIMED", name, flush=True)
"""


def _python(snippet: str, *args: str, stdin: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", snippet, *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def test_processes_racing_claim_each_folder_exactly_once(spool: Spool) -> None:
    names = [f"f{i:02d}" for i in range(16)]
    for name in names:
        drop(spool, name, frames=1)
    workers = [_python(_CLAIMER, str(spool.root), *names, stdin=subprocess.PIPE) for _ in range(3)]
    time.sleep(0.1)
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write("go\n")
        worker.stdin.flush()
    claimed: list[str] = []
    for worker in workers:
        out, _ = worker.communicate(timeout=20)
        assert worker.returncode == 0
        claimed += [line.split()[1] for line in out.splitlines() if line.startswith("CLAIMED ")]
    assert sorted(claimed) == names  # each exactly once
    assert listing(spool.active) == names and listing(spool.incoming) == []


_HOLDER = """
import sys, time
from caired.spool import Spool
claim = Spool(sys.argv[1]).claim("held")
claim.begin_attempt()
print("CLAIMED", claim.datapt_id, flush=True)
time.sleep(60)
"""


def test_folder_of_a_killed_process_is_recovered_with_its_datapt_id(spool: Spool) -> None:
    drop(spool, "held")
    holder = _python(_HOLDER, str(spool.root))
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        while line and not line.startswith("CLAIMED "):  # skip its log lines
            line = holder.stdout.readline()
        assert line, "the holder died before claiming"
        datapt_id = line.split()[1]
        assert spool.recover() == []  # alive: its lock is held
        assert (spool.active / "held").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    with structlog.testing.capture_logs() as logs:
        assert spool.recover() == ["held"]
    assert [(e["event"], e["from"], e["to"]) for e in logs] == [("folder_recovered", "active", "incoming")]
    folder = spool.incoming / "held"
    assert session_of(folder)["datapt_id"] == datapt_id
    assert (folder / READY_MARKER).exists()
    assert ready_now(spool) == ["held"]
    again = spool.claim("held")
    assert again is not None and again.datapt_id == datapt_id and again.attempts == 1


_RECOVERER = """
import sys
from caired.spool import Spool
print("RECOVERED", *Spool(sys.argv[1]).recover(), flush=True)
"""


def recover_elsewhere(spool: Spool) -> list[str]:
    """What ``recover`` moves when another process runs it."""
    out, _ = _python(_RECOVERER, str(spool.root)).communicate(timeout=20)
    [line] = [line for line in out.splitlines() if line.startswith("RECOVERED")]
    return line.split()[1:]


def test_closing_another_descriptor_of_the_lock_file_keeps_the_claim(spool: Spool) -> None:
    """A process-owned POSIX lock would be gone after any close of the file in this process."""
    drop(spool, "s1")
    claim = spool.claim("s1")
    assert claim is not None
    for flags in (os.O_RDONLY, os.O_RDWR):
        os.close(os.open(claim.path / LOCK_FILE, flags | os.O_CLOEXEC))
    assert recover_elsewhere(spool) == []
    assert claim.held and listing(spool.active) == ["s1"]
    _die_holding(spool, claim)
    assert recover_elsewhere(spool) == ["s1"]  # the probe itself can move an orphan


_LOCK_HOLDER = """
import fcntl, os, sys, time
from caired.fsops import WHOLE_FILE_WRITE_LOCK as _WHOLE_FILE_WRITE_LOCK
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _WHOLE_FILE_WRITE_LOCK)
print("LOCKED", flush=True)
time.sleep(60)
"""


def test_a_lock_held_by_another_process_keeps_the_folder_in_active_until_it_is_killed(spool: Spool) -> None:
    folder = make_folder(spool.active / "busy")
    holder = _python(_LOCK_HOLDER, str(folder / LOCK_FILE))
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "LOCKED\n"
        assert spool.recover() == []
        assert listing(spool.active) == ["busy"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    assert spool.recover() == ["busy"]
    assert listing(spool.active) == [] and listing(spool.incoming) == ["busy"]


def test_a_folder_left_in_active_without_a_lock_file_is_recovered(spool: Spool) -> None:
    """An older caired locked the folder itself with flock and made no lock file."""
    folder = make_folder(spool.active / "old")
    datapt_id = str(uuid.uuid4())
    session = {"datapt_id": datapt_id, "attempts": 2, "first_claimed_at": "", "source": "drop", "name": "old"}
    write_json_atomic(folder / SESSION_FILE, session)
    assert spool.recover() == ["old"]
    back = spool.incoming / "old"
    assert (back / LOCK_FILE).is_file() and (back / READY_MARKER).exists()
    again = spool.claim("old")
    assert again is not None and (again.datapt_id, again.attempts) == (datapt_id, 2)


@pytest.mark.parametrize("bad_lock_file", ["a folder", "a symlink"])
def test_a_folder_that_cannot_be_recovered_does_not_stop_the_others(spool: Spool, bad_lock_file: str) -> None:
    bad = make_folder(spool.active / "bad")
    if bad_lock_file == "a folder":
        (bad / LOCK_FILE).mkdir()
    else:
        (bad / LOCK_FILE).symlink_to(spool.root / "elsewhere")
    make_folder(spool.active / "orphan")
    staging = spool.tmp / f"{spool_module.NEW_PREFIX}dead"
    staging.mkdir()
    old = time.time() - 3600
    os.utime(staging, (old, old))
    with structlog.testing.capture_logs() as logs:
        assert spool.recover() == ["orphan"]
        assert spool.recover() == []  # still there, not warned about again
    warnings = [e for e in logs if e["event"] == "folder_not_recovered"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert warnings[0]["path"] == str(bad) and "not a regular file" in warnings[0]["reason"]
    assert listing(spool.active) == ["bad"] and listing(spool.incoming) == ["orphan"]
    assert listing(spool.tmp) == [] and not (spool.root / "elsewhere").exists()
    if bad_lock_file == "a folder":
        (bad / LOCK_FILE).rmdir()
    else:
        (bad / LOCK_FILE).unlink()
    assert spool.recover() == ["bad"]


def test_a_lookup_gone_stale_on_nfs_means_the_folder_is_gone(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """ESTALE: the name led to a file the NFS server has removed since (another machine did)."""
    drop(spool, "s1")
    make_folder(spool.active / "orphan")
    real_stat = os.stat

    def stale_lock_file(path: Any, *, dir_fd: int | None = None, follow_symlinks: bool = True) -> os.stat_result:
        if path == LOCK_FILE and dir_fd is not None:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return real_stat(path, dir_fd=dir_fd, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(os, "stat", stale_lock_file)
    with structlog.testing.capture_logs() as logs:
        assert spool.claim("s1") is None
        assert spool.recover() == []
    monkeypatch.undo()
    assert logs == []
    assert listing(spool.incoming) == ["s1"] and listing(spool.active) == ["orphan"]
    assert spool.recover() == ["orphan"]  # nothing was left locked
    assert spool.claim("s1") is not None


def test_a_dropped_folder_gone_stale_on_nfs_is_skipped(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """ESTALE on opening incoming/X: another machine took or removed it; not an error, not a claim."""
    drop(spool, "s1")
    real_open = os.open

    def open_stale(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if str(path) == "s1" and dir_fd is not None:  # incoming/s1, opened relative to incoming/
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), str(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", open_stale)
    assert spool.claim("s1") is None
    monkeypatch.undo()
    assert listing(spool.incoming) == ["s1"]
    assert spool.claim("s1") is not None


def test_own_claims_are_not_recovered(spool: Spool) -> None:
    drop(spool, "mine")
    claim = spool.claim("mine")
    assert claim is not None
    assert spool.recover() == []
    assert claim.held and claim.path.exists()


def test_datapt_id_persists_across_release_and_claim(spool: Spool) -> None:
    drop(spool, "s1")
    claim = spool.claim("s1")
    assert claim is not None
    claim.begin_attempt()
    with structlog.testing.capture_logs() as logs:
        back = spool.release(claim)
    assert back == spool.incoming / "s1" and not claim.held and claim.path == back
    assert [e["event"] for e in logs] == ["folder_released"]
    assert ready_now(spool) == ["s1"]
    again = spool.claim("s1")
    assert again is not None
    assert (again.datapt_id, again.attempts, again.first_claimed_at) == (
        claim.datapt_id,
        1,
        claim.first_claimed_at,
    )
    with pytest.raises(RuntimeError):
        claim.begin_attempt()  # the released claim is spent


def test_release_never_overwrites_a_new_drop_of_the_same_name(spool: Spool) -> None:
    drop(spool, "s1")
    claim = spool.claim("s1")
    assert claim is not None
    drop(spool, "s1", frames=5)
    assert spool.release(claim) == spool.incoming / "s1.1"
    assert len(list((spool.incoming / "s1").glob("*.png"))) == 5
    assert session_of(spool.incoming / "s1.1")["datapt_id"] == claim.datapt_id


# ---------------------------------------------------------------------------------------------
# outcomes


def _result(claim: Claim) -> dict[str, Any]:
    return {
        "session": claim.name,
        "datapt_id": claim.datapt_id,
        "attempts": claim.attempts,
        "frames_sent": 3,
        "frames_skipped": 0,
        "finished": {"state": "finished", "hr": 71.5},
        "hr": 71.5,
    }


def test_finish_writes_result_json_and_moves_to_done(spool: Spool) -> None:
    drop(spool, "s1")
    claim = spool.claim("s1")
    assert claim is not None
    with structlog.testing.capture_logs() as logs:
        done = spool.finish(claim, {**_result(claim), "snr": float("nan")})
    assert done == spool.done / "s1" == claim.path and not claim.held
    result = json.loads((done / RESULT_FILE).read_text())
    assert result["datapt_id"] == claim.datapt_id and result["hr"] == 71.5 and result["snr"] is None
    assert len(list(done.glob("*.png"))) == 3 and (done / SESSION_FILE).exists()
    assert not any(p.name.endswith(".caired-tmp") for p in done.iterdir())
    assert [e["event"] for e in logs] == ["folder_done"]
    assert listing(spool.active) == []


def test_a_folder_filed_into_done_is_dated_when_it_was_filed(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Retention's order is done/ folders' mtime: the one that enters done/ last must come last,
    whenever its result.json was written."""
    drop(spool, "s1")
    claim = spool.claim("s1")
    assert claim is not None
    move = fsops.move_unique

    def slow_move(src_dir: int, name: str, dst_dir: int, wanted: str) -> str:
        long_ago = time.time() - 3600  # as if result.json had been written an hour before the move
        os.utime(name, (long_ago, long_ago), dir_fd=src_dir)
        return move(src_dir, name, dst_dir, wanted)

    monkeypatch.setattr(fsops, "move_unique", slow_move)
    before = time.time_ns()
    done = spool.finish(claim, _result(claim))
    assert done.stat().st_mtime_ns >= before - 1_000_000_000  # not an hour ago (the filesystem's clock is coarse)


def test_finish_never_overwrites_a_done_folder(spool: Spool) -> None:
    paths = []
    for _ in range(3):
        drop(spool, "same")
        claim = spool.claim("same")
        assert claim is not None
        paths.append(spool.finish(claim, _result(claim)))
    assert paths == [spool.done / "same", spool.done / "same.1", spool.done / "same.2"]
    ids = {json.loads((p / RESULT_FILE).read_text())["datapt_id"] for p in paths}
    assert len(ids) == 3


def test_keep_frames_false_deletes_the_frames_and_keeps_result_json_and_the_lock_file(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool", keep_frames=False)
    s.prepare()
    drop(s, "s1", frames=4)
    claim = s.claim("s1")
    assert claim is not None
    done = s.finish(claim, _result(claim))
    assert listing(done) == sorted([LOCK_FILE, READY_MARKER, SESSION_FILE, RESULT_FILE])


def test_fail_writes_error_json_and_moves_to_failed(spool: Spool) -> None:
    drop(spool, "bad")
    claim = spool.claim("bad")
    assert claim is not None
    error = {"reason": "message too big", "close_code": 1009, "attempts": 1, "time": "2025-05-13T16:39:40Z"}
    with structlog.testing.capture_logs() as logs:
        failed = spool.fail(claim, error)
    assert failed == spool.failed / "bad"
    assert json.loads((failed / ERROR_FILE).read_text()) == error
    assert len(list(failed.glob("*.png"))) == 3 and (failed / SESSION_FILE).exists()
    assert [e["event"] for e in logs] == ["folder_failed"]


def test_a_failed_folder_dropped_again_is_retried(spool: Spool) -> None:
    drop(spool, "bad")
    claim = spool.claim("bad")
    assert claim is not None
    os.rename(spool.fail(claim, {"reason": "x"}), spool.incoming / "bad")
    again = spool.claim("bad")
    assert again is not None and again.datapt_id == claim.datapt_id
    assert not (again.path / ERROR_FILE).exists() and (again.path / spool_module.PREVIOUS_ERROR_FILE).exists()


def _die_holding(spool: Spool, claim: Claim) -> None:
    """What kill -9 does to a claim: the lock goes with the process, the folder stays."""
    claim._close()


@pytest.mark.parametrize(("outcome", "parent"), [(RESULT_FILE, "done"), (ERROR_FILE, "failed")])
def test_crash_after_the_outcome_file_finishes_the_move_exactly_once(
    spool: Spool, clock: FakeClock, outcome: str, parent: str
) -> None:
    drop(spool, "s1")
    claim = spool.claim("s1")
    assert claim is not None
    write_json_atomic(claim.path / outcome, _result(claim))
    (claim.path / f".{outcome}.dead{fsops.TMP_SUFFIX}").write_text('{"half')  # an interrupted write
    _die_holding(spool, claim)
    restarted = Spool(spool.root, clock=clock)
    with structlog.testing.capture_logs() as logs:
        assert restarted.recover() == ["s1"]
        assert restarted.recover() == []
    assert ("folder_recovered", "active", parent) in [(e["event"], e.get("from"), e.get("to")) for e in logs]
    assert listing(spool.root / parent) == ["s1"]
    assert listing(spool.active) == [] and listing(spool.incoming) == []  # never streamed again
    folder = spool.root / parent / "s1"
    assert json.loads((folder / outcome).read_text())["datapt_id"] == claim.datapt_id
    assert not any(p.name.endswith(fsops.TMP_SUFFIX) for p in folder.iterdir())
    assert (folder / LOCK_FILE).is_file()  # temporaries go, the lock file stays


def test_crash_before_the_outcome_file_streams_again(spool: Spool, clock: FakeClock) -> None:
    drop(spool, "s1")
    claim = spool.claim("s1")
    assert claim is not None
    claim.begin_attempt()
    _die_holding(spool, claim)
    assert Spool(spool.root, clock=clock).recover() == ["s1"]
    assert session_of(spool.incoming / "s1")["attempts"] == 1


def test_a_result_json_in_incoming_is_set_aside_not_trusted(spool: Spool) -> None:
    """Only caired writes result.json, in active/: one found in a dropped folder was planted (or
    the folder was moved back by hand to be streamed again), so it must not file the folder as done."""
    folder = drop(spool, "s1")
    write_json_atomic(folder / RESULT_FILE, {"hr": 70})
    with structlog.testing.capture_logs() as logs:
        claim = spool.claim("s1")
    assert claim is not None and listing(spool.done) == []
    assert not (claim.path / RESULT_FILE).exists()
    assert json.loads((claim.path / spool_module.PREVIOUS_RESULT_FILE).read_text()) == {"hr": 70}
    assert [e["file"] for e in logs if e["event"] == "control_file_set_aside"] == [RESULT_FILE]


def test_release_of_a_finished_folder_goes_to_done(spool: Spool) -> None:
    drop(spool, "s1")
    claim = spool.claim("s1")
    assert claim is not None
    write_json_atomic(claim.path / RESULT_FILE, _result(claim))
    assert spool.release(claim) == spool.done / "s1"


def test_full_disk_leaves_the_folder_in_active_without_result_json(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    drop(spool, "s1")
    claim = spool.claim("s1")
    assert claim is not None
    before = listing(claim.path)

    def no_space(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", no_space)
    with pytest.raises(SpoolError) as info:
        spool.finish(claim, _result(claim))
    with pytest.raises(SpoolError):
        claim.begin_attempt()
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and info.value.exit_code == ExitCode.CANT_CREATE
    assert "result.json" in str(info.value)
    assert claim.held and claim.path == spool.active / "s1" and claim.attempts == 0
    assert listing(claim.path) == before  # no result.json, no temporary file
    assert session_of(claim.path)["attempts"] == 0
    assert spool.release(claim) == spool.incoming / "s1"  # the daemon can give it back and try later


# ---------------------------------------------------------------------------------------------
# camera sessions


def test_create_active_then_handoff_streams_later_like_a_drop(spool: Spool) -> None:
    claim = spool.create_active("cam-1", source="camera")
    assert claim.held and claim.path == spool.active / "cam-1" and listing(spool.tmp) == []
    assert session_of(claim.path)["source"] == "camera"
    assert spool.recover() == [] and recover_elsewhere(spool) == []  # locked from the start
    make_folder(claim.path / "sub")  # frames written as captured
    with structlog.testing.capture_logs() as logs:
        moved = spool.handoff(claim)
    assert moved == spool.incoming / "cam-1" and [e["event"] for e in logs] == ["folder_handed_off"]
    assert ready_now(spool) == ["cam-1"]
    later = spool.claim("cam-1")
    assert later is not None and (later.datapt_id, later.source) == (claim.datapt_id, "camera")


def test_create_active_takes_a_free_name(spool: Spool) -> None:
    first = spool.create_active("cam", source="camera")
    second = spool.create_active("cam", source="camera")
    assert (first.path.name, second.path.name) == ("cam", "cam.1")
    assert first.datapt_id != second.datapt_id


def test_recover_removes_abandoned_staging(spool: Spool) -> None:
    dead = spool.tmp / f"{spool_module.NEW_PREFIX}dead"
    dead.mkdir()
    old = time.time() - 3600
    os.utime(dead, (old, old))
    (spool.tmp / "someone-recording").mkdir()
    spool.recover()
    assert listing(spool.tmp) == ["someone-recording"]


def test_recover_keeps_staging_being_built_and_removes_it_once_its_builder_is_gone(spool: Spool) -> None:
    staging = spool.tmp / f"{spool_module.NEW_PREFIX}building"
    make_folder(staging / "sub")
    (staging / SESSION_FILE).write_text("{}")
    fd = lock_elsewhere(staging)
    old = time.time() - 3600
    os.utime(staging, (old, old))  # old enough: only its lock keeps it
    try:
        spool.recover()
        assert listing(spool.tmp) == [staging.name]
        assert listing(staging) == sorted([LOCK_FILE, SESSION_FILE, "sub"])
    finally:
        os.close(fd)
    spool.recover()
    assert listing(spool.tmp) == []


def test_recover_leaves_a_young_unlocked_staging_folder_to_its_builder(spool: Spool, clock: FakeClock) -> None:
    """Between create_active's mkdir and its lock, the folder is unlocked; a cleaner must not take it."""
    staging = spool.tmp / f"{spool_module.NEW_PREFIX}just-made"
    staging.mkdir()
    clock.now = staging.stat().st_mtime + 1
    spool.recover()
    assert listing(spool.tmp) == [staging.name]
    assert listing(staging) == []  # not even a lock file taken on the builder's behalf
    clock.advance(spool_module._STAGING_GRACE)
    spool.recover()
    assert listing(spool.tmp) == []


def test_full_disk_at_claim_gives_the_folder_back(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    drop(spool, "s1")

    def no_space(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", no_space)
    with pytest.raises(SpoolError):
        spool.claim("s1")
    monkeypatch.undo()
    assert listing(spool.active) == [] and not (spool.incoming / "s1" / SESSION_FILE).exists()
    assert not any(p.name.endswith(fsops.TMP_SUFFIX) for p in (spool.incoming / "s1").iterdir())
    assert spool.claim("s1") is not None  # not left locked


def test_a_claim_is_named_as_dropped(spool: Spool) -> None:
    drop(spool, "first")
    claim = spool.claim("first")
    assert claim is not None
    os.rename(spool.release(claim), spool.incoming / "renamed")
    again = spool.claim("renamed")
    assert again is not None and again.name == "renamed" and again.datapt_id == claim.datapt_id
    again.begin_attempt()
    assert session_of(again.path)["name"] == "renamed"


# ---------------------------------------------------------------------------------------------
# crash quarantine, hostile names and control files


def test_a_folder_that_keeps_killing_caired_is_quarantined(spool: Spool, clock: FakeClock) -> None:
    drop(spool, "poison")
    for crash in range(1, 4):
        claim = Spool(spool.root, clock=clock).claim("poison")
        assert claim is not None and claim.crashes == crash - 1
        claim.begin_attempt()  # durable before streaming: what a native crash cannot undo
        _die_holding(spool, claim)
        with structlog.testing.capture_logs() as logs:
            moved = Spool(spool.root, clock=clock).recover()
        assert moved == ["poison"]
        if crash < 3:
            assert listing(spool.incoming) == ["poison"]
            assert session_of(spool.incoming / "poison")["crashes"] == crash
    assert listing(spool.incoming) == [] and listing(spool.failed) == ["poison"]
    error = json.loads((spool.failed / "poison" / ERROR_FILE).read_text())
    assert error["crashes"] == 3 and "quarantined" in error["reason"]
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["folder_failed", "folder_quarantined"]


def test_an_attempt_that_ended_or_a_clean_release_is_no_crash(spool: Spool, clock: FakeClock) -> None:
    drop(spool, "s1")
    for _ in range(5):
        claim = spool.claim("s1")
        assert claim is not None
        claim.begin_attempt()
        spool.release(claim)  # shutdown mid-attempt: a release, not a crash
    claim = spool.claim("s1")
    assert claim is not None and claim.crashes == 0 and claim.attempts == 5
    claim.begin_attempt()
    claim.end_attempt()
    _die_holding(spool, claim)  # killed between attempts: not while streaming
    assert Spool(spool.root, clock=clock).recover() == ["s1"]
    assert session_of(spool.incoming / "s1")["crashes"] == 0


@pytest.mark.parametrize(
    ("planted", "why"),
    [
        ({"datapt_id": "ed21c799-9edd-1706-9256-0324a7697adb"}, "UUIDv4"),  # version 1
        ({"datapt_id": "ED21C799-9EDD-4706-9256-0324A7697ADB"}, "UUIDv4"),  # not canonical
        ({"datapt_id": "ed21c799-9edd-4706-9256-0324a7697adb", "attempts": -1}, "count"),
        ({"datapt_id": "ed21c799-9edd-4706-9256-0324a7697adb", "source": "\x00evil"}, "source"),
        ([1, 2, 3], "object"),
    ],
)
def test_a_planted_session_file_that_does_not_validate_is_set_aside(
    spool: Spool, planted: Any, why: str
) -> None:
    folder = drop(spool, "s1")
    (folder / SESSION_FILE).write_text(json.dumps(planted))
    with structlog.testing.capture_logs() as logs:
        claim = spool.claim("s1")
    assert claim is not None and UUID4_RE.match(claim.datapt_id) and claim.source == "drop"
    assert claim.datapt_id != "ed21c799-9edd-4706-9256-0324a7697adb"
    assert json.loads((claim.path / spool_module.INVALID_SESSION_FILE).read_text()) == planted
    [aside] = [e for e in logs if e["event"] == "control_file_set_aside"]
    assert why in aside["reason"]


@pytest.mark.parametrize("kind", ["fifo", "symlink", "folder"])
def test_planted_control_files_that_are_not_regular_files_never_block_a_claim(spool: Spool, kind: str) -> None:
    folder = drop(spool, "s1")
    outside = spool.root.parent / "outside.json"
    outside.write_text(json.dumps({"datapt_id": "ed21c799-9edd-4706-9256-0324a7697adb"}))
    for name in (SESSION_FILE, LOCK_FILE):
        if kind == "fifo":
            os.mkfifo(folder / name)
        elif kind == "symlink":
            (folder / name).symlink_to(outside)
        else:
            (folder / name).mkdir()
    claim = spool.claim("s1")  # a FIFO would block a plain open() forever
    assert claim is not None and claim.held
    assert claim.datapt_id != "ed21c799-9edd-4706-9256-0324a7697adb"
    assert stat.S_ISREG(os.lstat(claim.path / LOCK_FILE).st_mode)
    assert os.path.lexists(claim.path / spool_module.INVALID_LOCK_FILE)
    spool.finish(claim, {"ok": True})
    assert outside.read_text().startswith('{"datapt_id"')  # nothing written through the link


def test_a_name_that_is_not_utf8_is_claimed_and_filed_under_its_bytes(spool: Spool) -> None:
    raw = b"caf\xe9"
    os.mkdir(os.fsencode(spool.tmp) + b"/" + raw)
    make_folder(spool.tmp / "x")
    for child in (spool.tmp / "x").iterdir():
        os.rename(child, os.fsencode(spool.tmp) + b"/" + raw + b"/" + os.fsencode(child.name))
    open(os.fsencode(spool.tmp) + b"/" + raw + b"/" + READY_MARKER.encode(), "wb").close()
    os.rename(os.fsencode(spool.tmp) + b"/" + raw, os.fsencode(spool.incoming) + b"/" + raw)
    [name] = spool.scan().ready or [""]
    assert os.fsencode(name) == raw
    claim = spool.claim(name)
    assert claim is not None and claim.shown == "caf\\xe9"
    session = session_of(claim.path)
    assert session["name"] == "caf\\xe9" and bytes.fromhex(session["name_hex"]) == raw
    spool.release(claim)
    again = spool.claim(name)
    assert again is not None and os.fsencode(again.name) == raw and again.datapt_id == claim.datapt_id
    spool.finish(again, {"ok": True})
    assert os.listdir(os.fsencode(spool.done)) == [raw]


def test_a_long_name_that_clashes_in_done_is_filed_under_a_shortened_name(spool: Spool) -> None:
    name = "x" * 255
    (spool.done / name).mkdir()  # planted, or an earlier session of the same name
    drop(spool, name)
    claim = spool.claim(name)
    assert claim is not None
    spool.finish(claim, {"ok": True})
    assert sorted(os.listdir(spool.done)) == ["x" * 253 + ".1", name]
    assert listing(spool.active) == [] and not claim.held


def test_a_deep_tree_in_a_dropped_folder_is_settled_without_recursion(spool: Spool) -> None:
    folder = make_folder(spool.tmp / "deep")
    fd = os.open(folder, os.O_RDONLY)
    try:
        for _ in range(1100):  # deeper than Python's recursion limit
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    os.rename(folder, spool.incoming / "deep")
    try:
        assert spool.scan().ready in (["deep"], [])  # no RecursionError
    finally:
        _remove_deep(spool.incoming / "deep" / "d")  # shutil.rmtree (pytest's clean-up) recurses


def _remove_deep(top: Path) -> None:
    """Remove a chain of nested ``d`` folders without recursion (mv each one up, then rmdir)."""
    parent = top.parent
    while top.exists():
        inner = top / "d"
        if inner.exists():
            os.rename(inner, parent / "d.next")
            os.rmdir(top)
            os.rename(parent / "d.next", top)
        else:
            os.rmdir(top)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=20,
)
_session_like = st.fixed_dictionaries(
    {},
    optional={
        "datapt_id": st.uuids().map(str) | st.text(max_size=40),
        "attempts": st.integers(-5, 2**40) | st.booleans() | st.text(max_size=3),
        "crashes": st.integers(-5, 2**40),
        "in_attempt": st.booleans() | st.integers(0, 2),
        "source": st.sampled_from(["drop", "camera", "cli", ""]) | st.text(max_size=8),
        "first_claimed_at": st.text(max_size=80),
        "name": st.text(max_size=300),
        "name_hex": st.binary(max_size=300).map(bytes.hex) | st.text(max_size=8),
    },
)


@settings(max_examples=300, deadline=None)
@given(data=_json | _session_like)
def test_session_file_validation_accepts_only_what_is_safe_to_use(data: Any) -> None:
    try:
        session = spool_module.validate_session(data, "fallback")
    except ValueError:
        return
    assert UUID4_RE.match(session["datapt_id"])  # it goes on the wire as is
    assert all(isinstance(session[k], int) and 0 <= session[k] <= spool_module.MAX_ATTEMPTS_RECORDED
               for k in ("attempts", "crashes"))
    assert isinstance(session["in_attempt"], bool) and session["source"] in spool_module.SOURCES
    spool_module.check_name(session["name"])  # a name the spool can move a folder to
    json.dumps(fsops.json_safe(session))  # and write back


def test_a_folder_its_owner_renames_while_it_is_claimed_is_let_go(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between our lock and our rename the dropper renames her folder and puts another under
    its name: the rename by name would take the other one. It goes back, and nothing is claimed."""
    drop(spool, "s1")
    real_move = fsops.move_unique
    moves: list[str] = []

    def renamed_first(src_dir: int, src: str, dst_dir: int, name: str) -> str:
        if not moves:
            os.rename(spool.incoming / "s1", spool.incoming / "s1-renamed")
            make_folder(spool.incoming / "s1")  # someone else's, under the name we locked
        moves.append(src)
        return real_move(src_dir, src, dst_dir, name)

    monkeypatch.setattr(fsops, "move_unique", renamed_first)
    assert spool.claim("s1") is None
    assert listing(spool.incoming) == ["s1", "s1-renamed"] and listing(spool.active) == []
    assert not (spool.incoming / "s1" / SESSION_FILE).exists()  # the other folder was not touched
    monkeypatch.undo()
    assert spool.claim("s1-renamed") is not None  # the locked one is free again


def test_planted_control_folders_are_set_aside_under_free_names_and_the_folder_streams(spool: Spool) -> None:
    """Set-aside names that are taken must not leave a folder cycling incoming <-> active forever."""
    folder = drop(spool, "s1")
    for name in (SESSION_FILE, spool_module.INVALID_SESSION_FILE, spool_module.PREVIOUS_RESULT_FILE):
        (folder / name).mkdir()
        (folder / name / "x").write_text("planted")
    (folder / RESULT_FILE).write_text('{"hr": 1}')
    claim = spool.claim("s1")
    assert claim is not None and claim.held
    names = set(os.listdir(claim.path))
    assert {f"{spool_module.INVALID_SESSION_FILE}.1", f"{spool_module.PREVIOUS_RESULT_FILE}.1"} <= names
    assert stat.S_ISREG(os.lstat(claim.path / SESSION_FILE).st_mode)


def test_a_control_file_that_cannot_be_set_aside_files_the_folder_in_failed(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = drop(spool, "s1")
    (folder / RESULT_FILE).write_text('{"hr": 1}')
    real_move = fsops.move_unique

    def stuck(src_dir: int, src: str, dst_dir: int, name: str) -> str:
        if src == RESULT_FILE:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real_move(src_dir, src, dst_dir, name)

    monkeypatch.setattr(fsops, "move_unique", stuck)
    assert spool.claim("s1") is None
    assert listing(spool.failed) == ["s1"] and listing(spool.incoming) == listing(spool.active) == []
    error = json.loads((spool.failed / "s1" / ERROR_FILE).read_text())
    assert error["error_type"] == "UntrustedControlFile" and RESULT_FILE in error["reason"]
    assert UUID4_RE.match(error["datapt_id"])


def test_a_lock_file_made_under_any_umask_can_be_opened_by_the_service_later(spool: Spool) -> None:
    drop(spool, "s1")
    old = os.umask(0o077)  # sudo caired hold, as root with a strict umask
    try:
        claim = spool.claim("s1")
    finally:
        os.umask(old)
    assert claim is not None
    assert stat.S_IMODE(os.lstat(claim.path / LOCK_FILE).st_mode) == fsops.LOCK_MODE
