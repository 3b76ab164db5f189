"""The droppers' permission model, tried for real.

Throwaway system users (the service, two droppers, a stranger) and groups; the spool made by
the README's own ``install -d`` lines; the log and the key as systemd and the README make them;
the real Spool run as the service user in a forked child. Each thing a dropper must not do is
tried as that dropper and must fail with the errno the kernel gives; nothing outside the spool
may change. The user-switching tests need root (CI runs as root) and are skipped otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from errno import EACCES, EPERM
from pathlib import Path
from typing import Any

import attrs
import pytest

from caired import permissions
from caired.errors import SpoolError
from caired.spool import Spool
from tests import users
from tests.conftest import T0

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
needs_root = pytest.mark.skipif(not users.IS_ROOT, reason=users.NOT_ROOT_REASON)
SECRET = "sk-live-perm-5d1e0c"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)  # what the frames hold does not matter here


def readme_spool_commands() -> list[list[str]]:
    """The ``sudo install -d`` lines of the README's deploy block, without sudo."""
    text = README.read_text()
    section = text[text.index("## Deploying as a service") :]
    start = section.index("```sh\n") + len("```sh\n")
    block = section[start : section.index("```", start)]
    commands = [shlex.split(line)[1:] for line in block.splitlines() if line.startswith("sudo install -d ")]
    assert len(commands) == 4, block
    return commands


def localized(argv: list[str], *, user: str, group: str, droppers: str, spool: Path) -> list[str]:
    """A README command for this test's users and spool."""
    out = []
    for before, word in zip(["", *argv], argv, strict=False):
        if before == "-o":
            assert word == "caired", argv
            word = user
        elif before == "-g":
            assert word in ("caired", "caired-drop"), argv
            word = droppers if word == "caired-drop" else group
        elif word.startswith("/var/lib/caired"):
            word = str(spool) + word[len("/var/lib/caired") :]
        out.append(word)
    return out


@attrs.frozen
class Site:
    base: Path
    spool: Path
    log: Path  # the log file, in its folder
    key: Path
    outside: Path  # a folder the service user may write, outside the spool
    service: users.User
    alice: users.User
    bob: users.User
    stranger: users.User
    droppers_gid: int


@pytest.fixture
def site() -> Iterator[Site]:
    with users.accounts() as made, users.reachable_tmp() as base:
        droppers_gid = made.group("drop")
        service = made.user("svc")
        alice = made.user("alice", groups=("drop",))
        bob = made.user("bob", groups=("drop",))
        stranger = made.user("stranger")
        spool = base / "lib" / "caired"
        spool.parent.mkdir(mode=0o755)
        for argv in readme_spool_commands():
            command = localized(argv, user=service.name, group=service.name, droppers=f"{made.prefix}-drop",
                                spool=spool)
            subprocess.run(command, check=True, capture_output=True)
        # The log as LogsDirectory=/LogsDirectoryMode=0750 and caired's 0640 log file make it.
        logs = base / "log"
        subprocess.run(["install", "-d", "-o", service.name, "-g", service.name, "-m", "0750", str(logs)], check=True)
        log = logs / "caired.jsonl"
        log.write_text('{"event": "daemon_ready"}\n')
        os.chown(log, service.uid, service.gid)
        log.chmod(0o640)
        # The key as the README installs it: root's, 0600.
        key = base / "etc" / "api_key"
        key.parent.mkdir(mode=0o755)
        key.write_text(SECRET + "\n")
        key.chmod(0o600)
        # A folder the service may write outside the spool, holding something precious.
        outside = base / "outside"
        outside.mkdir()
        (outside / "precious.png").write_bytes(PNG)
        (outside / "notes").mkdir()
        for path in (outside, outside / "precious.png", outside / "notes"):
            os.chown(path, service.uid, service.gid)
        outside.chmod(0o770)
        yield Site(base, spool, log, key, outside, service, alice, bob, stranger, droppers_gid)


def snapshot(site: Site) -> dict[str, tuple[Any, ...]]:
    """Everything under the test's base folder but the spool: kind, owner, mode, times, content."""
    found: dict[str, tuple[Any, ...]] = {}
    for folder, dirs, files in os.walk(site.base):
        if Path(folder) == site.spool:
            dirs.clear()
            continue
        for name in [*dirs, *files]:
            path = Path(folder) / name
            st = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
            found[str(path)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, digest)
    return found


def as_user(user: users.User, fn: Callable[..., Any], *args: Any) -> Any:
    return users.run_as(user, fn, *args)


def errno_as(user: users.User, fn: Callable[..., Any], *args: Any) -> int:
    """The errno of ``fn(*args)`` run as ``user``; 0 when it worked."""
    result = users.run_as(user, fn, *args)
    return result.errno if isinstance(result, users.Raised) else 0


# --- what a user does, run in a child as that user -----------------------------------------------


def read(path: Path) -> bytes:
    return path.read_bytes()


def create(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))


def stage(spool: Path, name: str, publish: bool = True) -> tuple[int, int, int]:
    """Drop a folder as the README says: umask 007, made in tmp/, frames in, moved to incoming/.
    Returns the owner, group and mode of the folder where it ended up."""
    os.umask(0o007)
    folder = spool / "tmp" / name
    folder.mkdir()
    for i in range(3):
        (folder / f"{T0 + i / 30:.7f}.png").write_bytes(PNG)
    if publish:
        folder = folder.rename(spool / "incoming" / name)
    st = folder.stat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def service_claims(spool: Path, name: str) -> str:
    """The service claims the folder and dies: it stays in active/."""
    os.umask(0o007)  # the unit's UMask=
    claim = Spool(spool, settle_seconds=0).claim(name)
    assert claim is not None
    return claim.folder


def service_streams(spool: Path, name: str) -> list[str]:
    """The service starts, recovers what its dead self left in active/, claims the folder and files
    it as done (frames deleted: keep_frames = false). Returns what done/ then holds of it."""
    os.umask(0o007)
    s = Spool(spool, settle_seconds=0, keep_frames=False)
    s.prepare()
    s.recover()
    assert name in s.scan().ready
    claim = s.claim(name)
    assert claim is not None
    claim.begin_attempt()
    claim.end_attempt()
    done = s.finish(claim, {"session": name, "hr": 72.0, "frames_sent": 3})
    listing = sorted(os.listdir(done))
    s.close()
    return listing


# --- the model ------------------------------------------------------------------------------------


def modes_of(spool: Path) -> dict[str, tuple[int, int, int]]:
    return {
        name: (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
        for name in ("", *permissions.FOLDER_MODES)
        for st in [(spool / name).stat()]
    }


def test_prepare_makes_the_folders_with_the_modes_of_the_model(tmp_path: Path) -> None:
    """Whatever the umask: the unit's UMask=0007 would strip the others' bits droppers need."""
    old = os.umask(0o077)
    try:
        Spool(tmp_path / "spool").prepare()
    finally:
        os.umask(old)
    modes = {name: mode for name, (_, _, mode) in modes_of(tmp_path / "spool").items()}
    assert modes == {"": permissions.ROOT_MODE, **permissions.FOLDER_MODES}
    assert modes == {"": 0o750, "incoming": 0o3777, "active": 0o750, "done": 0o755, "failed": 0o755, "tmp": 0o3777}


def test_prepare_leaves_the_modes_of_existing_folders(tmp_path: Path) -> None:
    (tmp_path / "spool" / "incoming").mkdir(parents=True, mode=0o700)
    (tmp_path / "spool").chmod(0o710)
    Spool(tmp_path / "spool").prepare()
    modes = modes_of(tmp_path / "spool")
    assert modes[""][2] == 0o710 and modes["incoming"][2] == 0o700
    assert modes["done"][2] == 0o755  # the missing ones are made


def test_prepare_says_which_command_makes_a_folder_it_cannot_give_its_setgid_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under the unit's RestrictSUIDSGID=yes, setting the setgid bit fails with EPERM (a seccomp
    filter, stood in for here): one line with the install -d command, and no half-made folder."""
    real_fchmod = os.fchmod

    def restricted(fd: int, mode: int) -> None:
        if mode & (stat.S_ISUID | stat.S_ISGID):
            raise PermissionError(EPERM, os.strerror(EPERM))
        real_fchmod(fd, mode)

    monkeypatch.setattr(os, "fchmod", restricted)
    spool = Spool(tmp_path / "spool")
    with pytest.raises(SpoolError) as info:
        spool.prepare()
    user, group = permissions.user_name(os.geteuid()), permissions.group_name(os.getegid())
    assert str(info.value) == (
        f"cannot set the mode 3777 of the new spool folder {tmp_path}/spool/incoming: Operation not permitted "
        "(a unit with RestrictSUIDSGID=yes forbids the setgid bit); create it as root: "
        f"install -d -o {user} -g {group} -m 3777 {tmp_path}/spool/incoming"
    )
    assert info.value.exit_code == 73
    assert not (tmp_path / "spool" / "incoming").exists()
    (tmp_path / "spool" / "incoming").mkdir()  # as root would, with install -d
    (tmp_path / "spool" / "tmp").mkdir()
    spool.prepare()  # the rest is made


@needs_root
def test_the_readme_commands_make_the_modes_of_the_model(site: Site) -> None:
    service, droppers = site.service, site.droppers_gid
    expected = {name: (service.uid, service.gid, mode) for name, mode in permissions.FOLDER_MODES.items()}
    expected[""] = (service.uid, droppers, permissions.ROOT_MODE)
    assert modes_of(site.spool) == expected
    as_user(site.service, lambda: Spool(site.spool).prepare())  # the daemon's start changes nothing
    assert modes_of(site.spool) == expected


# --- what droppers and strangers cannot do --------------------------------------------------------


@needs_root
def test_nobody_but_root_reads_the_key_and_no_dropper_reads_the_log(site: Site) -> None:
    for user in (site.alice, site.bob, site.stranger, site.service):
        assert errno_as(user, read, site.key) == EACCES, user  # the service gets it from LoadCredential=
    for user in (site.alice, site.bob, site.stranger):
        assert errno_as(user, read, site.log) == EACCES, user
        assert errno_as(user, os.listdir, site.log.parent) == EACCES, user
    assert as_user(site.service, read, site.log) == b'{"event": "daemon_ready"}\n'


@needs_root
def test_a_stranger_cannot_get_into_the_spool(site: Site) -> None:
    before = snapshot(site)
    assert errno_as(site.stranger, os.listdir, site.spool) == EACCES
    assert errno_as(site.stranger, stage, site.spool, "rec-x") == EACCES
    assert errno_as(site.stranger, os.listdir, site.spool / "done") == EACCES
    assert snapshot(site) == before


@needs_root
def test_a_dropped_folder_is_its_owners_and_the_services_alone(site: Site) -> None:
    before = snapshot(site)
    # alice drops one folder and stages another; both belong to the group of the service.
    assert as_user(site.alice, stage, site.spool, "rec-a") == (site.alice.uid, site.service.gid, 0o2770)
    assert as_user(site.alice, stage, site.spool, "rec-staged", False) == (
        site.alice.uid, site.service.gid, 0o2770
    )
    frame = next(iter(as_user(site.service, os.listdir, site.spool / "incoming" / "rec-a")))
    assert as_user(site.service, read, site.spool / "incoming" / "rec-a" / frame) == PNG
    # bob has a folder of his own.
    as_user(site.bob, stage, site.spool, "rec-b")

    for folder in (site.spool / "incoming" / "rec-a", site.spool / "tmp" / "rec-staged"):
        assert errno_as(site.bob, os.listdir, folder) == EACCES
        assert errno_as(site.bob, read, folder / frame) == EACCES
        assert errno_as(site.bob, create, folder / ".caired-session.json") == EACCES
        assert errno_as(site.bob, os.unlink, folder / frame) == EACCES
        assert errno_as(site.bob, os.chmod, folder, 0o2777) == EPERM
        # The sticky bit: no renaming, removing or replacing another's folder.
        assert errno_as(site.bob, os.rename, folder, folder.with_name("mine")) == EPERM
        assert errno_as(site.bob, os.rename, folder, site.spool / "tmp" / "mine") == EPERM
        assert errno_as(site.bob, os.rmdir, folder) == EPERM
        assert errno_as(site.bob, os.rename, site.spool / "incoming" / "rec-b", folder) == EPERM
    # A stranger cannot even look.
    assert errno_as(site.stranger, os.listdir, site.spool / "incoming") == EACCES

    assert sorted(as_user(site.alice, os.listdir, site.spool / "incoming" / "rec-a")) == sorted(
        as_user(site.service, os.listdir, site.spool / "incoming" / "rec-a")
    )
    assert snapshot(site) == before


@needs_root
def test_nobody_can_swap_a_claimed_folder_or_plant_results(site: Site) -> None:
    before = snapshot(site)
    as_user(site.alice, stage, site.spool, "rec-a")
    as_user(site.bob, stage, site.spool, "rec-b")
    assert as_user(site.service, service_claims, site.spool, "rec-a") == "rec-a"
    active = site.spool / "active"

    for dropper in (site.alice, site.bob):  # alice's own folder included: active/ is the service's
        assert errno_as(dropper, os.listdir, active) == EACCES
        assert errno_as(dropper, os.rename, active / "rec-a", active / "other") == EACCES
        assert errno_as(dropper, os.rename, active / "rec-a", site.spool / "tmp" / "away") == EACCES
        assert errno_as(dropper, os.rmdir, active / "rec-a") == EACCES
        assert errno_as(dropper, os.symlink, site.outside, active / "rec-z") == EACCES
        assert errno_as(dropper, os.rename, site.spool / "incoming" / "rec-b", active / "rec-b") == EACCES

    assert as_user(site.service, service_streams, site.spool, "rec-a") == [
        ".caired-lock", ".caired-session.json", ".ready", "result.json"
    ]
    done, failed = site.spool / "done", site.spool / "failed"
    assert "rec-a" in as_user(site.bob, os.listdir, done)  # names are visible, contents are not
    assert errno_as(site.bob, os.listdir, done / "rec-a") == EACCES
    assert errno_as(site.bob, read, done / "rec-a" / "result.json") == EACCES
    assert errno_as(site.bob, os.unlink, done / "rec-a" / "result.json") == EACCES
    assert errno_as(site.bob, create, done / "rec-a" / "error.json") == EACCES
    assert errno_as(site.bob, os.rename, done / "rec-a", done / "mine") == EACCES
    for planted in (done / "rec-b", failed / "rec-b"):  # filing his own folder without caired
        assert errno_as(site.bob, os.rename, site.spool / "incoming" / "rec-b", planted) == EACCES
        assert errno_as(site.bob, os.mkdir, planted) == EACCES
        assert errno_as(site.bob, os.symlink, site.outside, planted) == EACCES
    assert snapshot(site) == before


@needs_root
def test_a_dropper_reads_the_result_of_her_own_folder(site: Site) -> None:
    as_user(site.alice, stage, site.spool, "rec-a")
    as_user(site.service, service_streams, site.spool, "rec-a")
    result = as_user(site.alice, read, site.spool / "done" / "rec-a" / "result.json")
    if isinstance(result, users.Raised):
        raise PermissionError(result.errno, result.message)
    assert json.loads(result)["hr"] == 72.0


@needs_root
def test_links_planted_by_a_dropper_make_the_service_write_nothing_outside(site: Site) -> None:
    """Symlinks and planted control files in a dropper's own folder, in incoming/ and in tmp/:
    the service recovers, scans, claims and files, and nothing outside the spool changes."""
    before = snapshot(site)
    outside = site.outside

    def plant(spool: Path) -> None:
        os.umask(0o007)
        os.symlink(outside, spool / "incoming" / "rec-link")
        staging = spool / "tmp" / ".caired-new-0123456789abcdef0123456789abcdef"
        os.symlink(outside, staging)
        os.utime(staging, (T0, T0), follow_symlinks=False)  # old enough for the staging cleaner
        folder = spool / "tmp" / "rec-b"
        folder.mkdir()
        (folder / f"{T0:.7f}.png").write_bytes(PNG)
        os.symlink(outside / "precious.png", folder / f"{T0 + 1:.7f}.png")
        os.symlink(outside / "ready", folder / ".ready")
        os.symlink(outside / "result.json", folder / "result.json")
        os.symlink(outside / "notes", folder / "sub")
        os.symlink(outside / "lock", folder / ".caired-lock.tmp")
        folder.rename(spool / "incoming" / "rec-b")

    as_user(site.bob, plant, site.spool)

    def serve(spool: Path) -> list[str]:
        os.umask(0o007)
        s = Spool(spool, settle_seconds=0, keep_frames=False)
        s.recover()
        ready = s.scan().ready
        for name in ready:
            claim = s.claim(name)
            if claim is not None:
                s.finish(claim, {"session": name, "hr": 60.0})
        s.recover()
        s.close()
        return sorted(ready)

    assert as_user(site.service, serve, site.spool) == ["rec-b"]
    assert snapshot(site) == before


# --- check-config on a real deployment --------------------------------------------------------------


def deployed_unit(site: Site) -> tuple[Path, Path]:
    """The shipped unit and a configuration for this site (PrivateTmp= left out: it lives under /tmp)."""
    program = site.base / "opt" / "caired"
    program.parent.mkdir(mode=0o755)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    config = site.key.parent / "caired.toml"
    config.write_text(f'[spool]\ndir = "{site.spool}"\n[log]\nfile = "{site.log}"\n')
    config.chmod(0o644)
    text = (ROOT / "systemd" / "caired.service").read_text()
    for old, new in {
        "ExecStart=/opt/caired/bin/caired run --config /etc/caired/caired.toml": f"ExecStart={program} run "
                                                                                f"--config {config}",
        "LoadCredential=api_key:/etc/caired/api_key": f"LoadCredential=api_key:{site.key}",
        "ReadWritePaths=/var/lib/caired": f"ReadWritePaths={site.spool} {site.log.parent}",
        "User=caired": f"User={site.service.name}",
        "Group=caired": f"Group={site.service.name}",
        "SupplementaryGroups=video": "",
        "PrivateTmp=yes": "",
    }.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    unit = site.base / "caired.service"
    unit.write_text(text)
    return unit, config


def check_config(unit: Path, config: Path) -> tuple[int, list[str]]:
    """``caired check-config`` as root, as the README runs it: its exit code and stderr lines."""
    done = subprocess.run(
        [sys.executable, "-m", "caired", "check-config", "--config", str(config), "--unit", str(unit)],
        capture_output=True, text=True, check=False, env={**os.environ, "CAIRED_LOG_FORMAT": "json"},
    )
    return done.returncode, done.stderr.splitlines()


def fix(finding: str) -> None:
    """Run the commands a finding ends with ('...; chown a:b X && chmod 0750 X')."""
    commands = finding.rsplit("; ", 1)[1]
    subprocess.run(commands, shell=True, check=True, capture_output=True)


@needs_root
def test_check_config_finds_a_readme_deployment_clean_and_each_departure_with_its_fix(site: Site) -> None:
    unit, config = deployed_unit(site)
    assert check_config(unit, config) == (0, [])
    prefix = f"caired check-config: warning: spool.dir (from file {config}): "
    user, group = site.service.name, site.service.name

    # Droppers in the service's own group (the old layout): they could read the log.
    os.chown(site.spool, -1, site.service.gid)
    code, lines = check_config(unit, config)
    assert code == 0
    [line] = lines
    assert line.startswith(prefix + f"{site.spool} belongs to the group {group}, one of {user}'s own: droppers "
                                    "would have to join it")
    os.chown(site.spool, -1, site.droppers_gid)

    # A door the droppers can write: they could move the spool's own folders away.
    assert errno_as(site.bob, os.rename, site.spool / "tmp", site.spool / "bobs") == EACCES
    site.spool.chmod(0o770)
    code, lines = check_config(unit, config)
    drop = permissions.group_name(site.droppers_gid)
    assert (code, lines) == (0, [
        prefix + f"{site.spool} is {user}:{drop} 0770, not {user}:{drop} 0750: droppers could rename or replace "
                 f"the spool's folders; chown {user} {site.spool} && chmod 0750 {site.spool}"
    ])
    assert errno_as(site.bob, os.rename, site.spool / "tmp", site.spool / "bobs") == 0
    os.rename(site.spool / "bobs", site.spool / "tmp")
    fix(lines[0])
    assert check_config(unit, config) == (0, [])

    # incoming/ without its setgid and sticky bits.
    (site.spool / "incoming").chmod(0o777)
    code, lines = check_config(unit, config)
    assert (code, lines) == (0, [
        prefix + f"{site.spool}/incoming is {user}:{group} 0777, not {user}:{group} 3777 as the droppers' model has "
                 f"it (README, 'Deploying as a service'); chown {user}:{group} {site.spool}/incoming && "
                 f"chmod 3777 {site.spool}/incoming"
    ])
    fix(lines[0])
    assert check_config(unit, config) == (0, [])

    # The key readable by the droppers' group.
    os.chown(site.key, 0, site.droppers_gid)
    site.key.chmod(0o640)
    code, lines = check_config(unit, config)
    assert code == 0
    assert f"the droppers (group {permissions.group_name(site.droppers_gid)}) can read the API key in {site.key} " \
           f"(root:{permissions.group_name(site.droppers_gid)} 0640); chmod 0600 {site.key}" in lines[0]
    assert len(lines) == 1  # not warned twice
    site.key.chmod(0o600)

    # The log readable by everyone.
    site.log.parent.chmod(0o755)
    site.log.chmod(0o644)
    code, lines = check_config(unit, config)
    assert code == 0
    [line] = lines
    assert f"log.file (from file {config}): the droppers can read the log in {site.log.parent}" in line
    fix(line)
    site.log.chmod(0o640)
    assert check_config(unit, config) == (0, [])

    # The service cannot read its configuration.
    config.chmod(0o600)
    code, lines = check_config(unit, config)
    assert code == 78
    assert lines == [
        f"caired check-config: --config: the service cannot read its configuration: {user} may not read {config} "
        f"(root:root 0600); chmod 0644 {config}, or chgrp {group} and chmod 0640 if it holds a secret"
    ]
