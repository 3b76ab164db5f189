"""Run a function as another user, and throwaway system users and groups (root only).

``run_as`` forks; the child drops to the user's uid, gid and groups for good and calls the
function, whose return value (or OSError) comes back pickled through a pipe. No exec: the
child keeps the modules already imported, so it works where the user could not even start
this Python (a pyenv under /root). Import what the function needs before calling it.
"""

from __future__ import annotations

import grp
import os
import pickle
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

IS_ROOT = os.geteuid() == 0
NOT_ROOT_REASON = "switching users needs root (CI runs the tests as root)"


@attrs.frozen
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def named(cls, name: str) -> User:
        entry = pwd.getpwnam(name)
        return cls(name, entry.pw_uid, entry.pw_gid, tuple(os.getgrouplist(name, entry.pw_gid)))


@attrs.frozen
class Raised:
    """An OSError raised in the child, as ``errno`` and message."""

    errno: int
    message: str


def run_as(user: User, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a child running as ``user`` (its groups only); an OSError comes back as Raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(read_end)
            os.setgroups(list(user.groups))
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
            try:
                result: Any = fn(*args)
            except OSError as exc:
                result = Raised(exc.errno or 0, str(exc))
            with os.fdopen(write_end, "wb") as out:
                pickle.dump(result, out)
        except BaseException as exc:  # anything else is reported, then the child exits
            code = 1
            with os.fdopen(write_end, "wb", closefd=False) as out:
                pickle.dump(RuntimeError(f"{type(exc).__name__}: {exc}"), out)
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as inp:
        data = inp.read()
    os.waitpid(pid, 0)
    result = pickle.loads(data)
    if isinstance(result, RuntimeError):
        raise result
    return result


def _tool(name: str) -> str:
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    assert found, f"{name} is not installed"
    return found


@attrs.define
class Accounts:
    """System groups and users made for one test, removed afterwards; names are unique."""

    prefix: str = attrs.field(factory=lambda: f"ct{uuid.uuid4().hex[:8]}")
    users: list[str] = attrs.field(factory=list)
    groups: list[str] = attrs.field(factory=list)

    def group(self, role: str) -> int:
        name = f"{self.prefix}-{role}"
        subprocess.run([_tool("groupadd"), "--system", name], check=True, capture_output=True)
        self.groups.append(name)
        return grp.getgrnam(name).gr_gid

    def user(self, role: str, *, groups: tuple[str, ...] = ()) -> User:
        """A system user with a group of its own (user private group) and the extra ``groups`` (roles)."""
        name = f"{self.prefix}-{role}"
        extra = [f"{self.prefix}-{g}" for g in groups]
        command = [_tool("useradd"), "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                   "--shell", "/usr/sbin/nologin"]
        if extra:
            command += ["--groups", ",".join(extra)]
        subprocess.run([*command, name], check=True, capture_output=True)
        self.users.append(name)
        self.groups.append(name)  # userdel removes the private group; groupdel then finds nothing
        return User.named(name)

    def remove(self) -> None:
        for name in reversed(self.users):
            subprocess.run([_tool("userdel"), name], check=False, capture_output=True)
        for name in reversed(self.groups):
            subprocess.run([_tool("groupdel"), name], check=False, capture_output=True)


@contextmanager
def reachable_tmp() -> Iterator[Path]:
    """A fresh folder every user can get into (pytest's tmp_path is under a 0700 folder of the
    user running the tests); removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="caired-test-", dir="/tmp"))  # not $TMPDIR, which may be private
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def accounts() -> Iterator[Accounts]:
    made = Accounts()
    try:
        yield made
    finally:
        made.remove()
