"""Who may do what in a deployed spool: the folder modes, and access as another user would have it.

The model (README, "Deploying as a service")::

    /var/lib/caired        caired:caired-drop  0750  the door: only caired and the droppers get in
      incoming/  tmp/      caired:caired       3777  anyone past the door may create; setgid, so what a
                                                     dropper makes here belongs to the group caired;
                                                     sticky, so nobody renames or removes another's entry
      active/              caired:caired       0750  caired's alone
      done/  failed/       caired:caired       0755  droppers list them and enter their own folders
    a dropped folder       alice:caired        2770  made under incoming/ or tmp/ with umask 007: alice
                                                     and caired (the group) only, no other dropper
    /var/log/caired        caired:caired       0750  the unit's LogsDirectory; no dropper reads the log
    /etc/caired/api_key    root:root           0600  handed to the service by LoadCredential=

The droppers are not in the group caired and caired is not in the droppers' group: each side
gets in through a different door. caired needs write access to a dropped folder (it moves it,
which rewrites its ``..``, and creates its lock and session files in it), so the folder's group
must be caired, which only the setgid bit of ``incoming/`` or ``tmp/`` can give a folder made by
someone outside that group.

Nothing here touches the filesystem beyond ``os.stat``; ``may`` and ``blocked_at`` answer for
a user other than the one running, from the mode bits (ACLs are not read).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import attrs

READ: Final = 4
WRITE: Final = 2
SEARCH: Final = 1  # execute, for a folder: pass through it

ROOT_MODE: Final = 0o750
FOLDER_MODES: Final[dict[str, int]] = {
    "incoming": 0o3777,
    "active": 0o750,
    "done": 0o755,
    "failed": 0o755,
    "tmp": 0o3777,
}
DROPPED_FOLDER_MODE: Final = 0o2770
LOG_DIR_MODE: Final = 0o750


@attrs.frozen
class Principal:
    """A user as the kernel sees it when checking access: a uid and every group it is in.

    ``uid`` -1 stands for "a member of these groups who owns nothing here" (the droppers).
    """

    name: str
    uid: int
    gid: int  # the primary group: what the files it creates belong to
    gids: frozenset[int]

    @classmethod
    def user(cls, name: str, *, group: str | None = None, extra_groups: Iterable[str] = ()) -> Principal:
        """The user ``name`` as a service with ``User=name``, ``Group=group`` and ``SupplementaryGroups=``
        would run: its primary group (or ``group``), its groups from /etc/group, and the extra ones.
        KeyError names what does not exist."""
        entry = pwd.getpwnam(name)
        primary = grp.getgrnam(group).gr_gid if group else entry.pw_gid
        gids = {primary, *os.getgrouplist(name, primary)}
        gids.update(grp.getgrnam(extra).gr_gid for extra in extra_groups)
        return cls(name=name, uid=entry.pw_uid, gid=primary, gids=frozenset(gids))

    @classmethod
    def group_member(cls, gid: int) -> Principal:
        """Any member of the group ``gid`` who is in no other group that matters and owns nothing."""
        return cls(name=f"group {group_name(gid)}", uid=-1, gid=gid, gids=frozenset({gid}))

    @classmethod
    def anyone(cls) -> Principal:
        """A user in no group that matters, who owns nothing: what the others' bits allow."""
        return cls(name="anyone", uid=-1, gid=-1, gids=frozenset())


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def may(who: Principal, st: os.stat_result, want: int) -> bool:
    """Would ``who`` get ``want`` (READ | WRITE | SEARCH) on the file whose status is ``st``?

    The kernel's rule: the owner's bits if ``who`` owns it, else the group's bits if ``who`` is in
    its group, else the others' bits; root reads and writes anything and executes what anyone may.
    """
    mode = stat.S_IMODE(st.st_mode)
    if who.uid == 0:  # CAP_DAC_OVERRIDE: anything but running a file nobody may run
        return not (want & SEARCH and not stat.S_ISDIR(st.st_mode) and not mode & 0o111)
    if st.st_uid == who.uid:
        bits = mode >> 6
    elif st.st_gid in who.gids:
        bits = mode >> 3
    else:
        bits = mode
    return bits & want & 7 == want


def blocked_at(who: Principal, path: Path) -> Path | None:
    """The first folder on the way to ``path`` that ``who`` cannot pass through, or None.

    Symlinks on the way are followed as the kernel would, and every folder passed must grant
    SEARCH; ``path`` itself is not checked. A folder that cannot be looked at here counts as blocking.
    """
    for folder in folders_passed(Path(path)):
        try:
            st = folder.stat()
        except OSError:
            return folder
        if not may(who, st, SEARCH):
            return folder
    return None


def folders_passed(path: Path) -> list[Path]:
    """The folders the kernel passes through to reach ``path``, from ``/`` on, symlinks followed."""
    found: dict[Path, None] = {}
    todo = [Path(os.path.abspath(path))]
    for _ in range(_MAX_SYMLINKS):
        if not todo:
            break
        current = todo.pop()
        for prefix in reversed(current.parents):  # '/' first
            real = Path(os.path.realpath(prefix))
            for folder in (*reversed(real.parents), real):
                found.setdefault(folder)
        if current.is_symlink():  # its target is reached from the folder the link is in
            target = Path(os.path.realpath(current.parent)) / os.readlink(current)
            todo.append(Path(os.path.normpath(target)))
    return list(found)


_MAX_SYMLINKS: Final = 40  # the kernel's own limit on a path's symlinks


def describe(st: os.stat_result) -> str:
    """``caired:caired-drop 0750``"""
    return f"{user_name(st.st_uid)}:{group_name(st.st_gid)} {stat.S_IMODE(st.st_mode):04o}"
