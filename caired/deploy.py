"""What a deployed caired needs, checked from its systemd unit: ``caired check-config``'s deploy checks.

``check-config`` applies these when it is given the unit (``--unit PATH``), or when the installed
``caired.service`` runs ``caired run --config`` on the very file being checked. The unit says
who the service runs as (``User=``, ``Group=``, ``SupplementaryGroups=``), where its key comes
from (``LoadCredential=``), which folders systemd creates (``StateDirectory=``,
``LogsDirectory=``) and which the sandbox leaves writable (``ReadWritePaths=``) or hides
(``ProtectHome=``, ``PrivateTmp=``). Access is judged for the service's user and for the
droppers' group (the spool's own group) from mode bits (caired.permissions), so the result is
the same whoever runs the check; run it as root, so that every file can be looked at.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

import attrs

from caired import permissions as perm
from caired.config import CREDENTIAL_NAME, Config, Secret
from caired.errors import SpoolError
from caired.permissions import READ, SEARCH, WRITE, Principal
from caired.spool import MOUNTINFO, check_shared_locks

UNIT_NAME: Final = "caired.service"
# Where systemd looks for units, highest priority first (systemd.unit(5)).
UNIT_DIRS: Final = (
    Path("/etc/systemd/system"),
    Path("/run/systemd/system"),
    Path("/usr/local/lib/systemd/system"),
    Path("/usr/lib/systemd/system"),
    Path("/lib/systemd/system"),
)
# Where LoadCredential= looks for a credential given by name or relative path (systemd.exec(5)).
CREDSTORES: Final = (Path("/etc/credstore"), Path("/run/credstore"), Path("/usr/lib/credstore"))
# The base of each kind of directory systemd creates for a system service.
SYSTEMD_DIRS: Final = {
    "StateDirectory": Path("/var/lib"),
    "LogsDirectory": Path("/var/log"),
    "CacheDirectory": Path("/var/cache"),
    "RuntimeDirectory": Path("/run"),
}
_HIDDEN_BY_PROTECT_HOME: Final = (Path("/home"), Path("/root"), Path("/run/user"))
_HIDDEN_BY_PRIVATE_TMP: Final = (Path("/tmp"), Path("/var/tmp"))
_READ_ONLY_BY_PROTECT_SYSTEM: Final = {
    "yes": (Path("/usr"), Path("/boot"), Path("/efi")),
    "full": (Path("/usr"), Path("/boot"), Path("/efi"), Path("/etc")),
}
_TRUE: Final = frozenset({"yes", "true", "on", "1"})
README: Final = "README, 'Deploying as a service'"


# ---------------------------------------------------------------------------------------------
# The unit


@attrs.frozen
class Unit:
    """The settings of a unit file and its drop-ins, as systemd would combine them.

    Every assignment of a key is kept in order; an empty assignment clears the ones before it
    (for list settings that is systemd's rule, for single values it resets to the default).
    """

    path: Path
    settings: Mapping[str, tuple[str, ...]]

    @classmethod
    def load(cls, path: Path, dropin_dirs: Iterable[Path] | None = None) -> Unit:
        """Read ``path`` and its drop-ins (``NAME.d/*.conf`` in ``dropin_dirs``, by default the
        folder of ``path``; of two drop-ins with one file name the first folder's wins)."""
        settings: dict[str, list[str]] = {}
        _parse(path.read_text(encoding="utf-8"), settings)
        dropins: dict[str, Path] = {}
        for folder in dropin_dirs if dropin_dirs is not None else (path.parent,):
            directory = folder / f"{path.name}.d"
            if directory.is_dir():
                for conf in directory.glob("*.conf"):
                    dropins.setdefault(conf.name, conf)
        for name in sorted(dropins):
            _parse(dropins[name].read_text(encoding="utf-8"), settings)
        return cls(path=path, settings={key: tuple(values) for key, values in settings.items()})

    def last(self, key: str, default: str = "") -> str:
        values = self.settings.get(key, ())
        return values[-1] if values else default

    def words(self, key: str) -> list[str]:
        """Every word of every assignment of a space-separated list setting."""
        return [word for value in self.settings.get(key, ()) for word in shlex.split(value)]

    def flag(self, key: str) -> bool:
        return self.last(key).lower() in _TRUE

    @property
    def exec_start(self) -> list[str]:
        """The ExecStart= command line, its prefixes (-@:+!) left out."""
        value = self.last("ExecStart").lstrip("-@:+!")
        try:
            return shlex.split(value)
        except ValueError:
            return value.split()

    @property
    def config_path(self) -> Path | None:
        """The file given to ``--config`` in ExecStart=, if any."""
        argv = self.exec_start
        for i, arg in enumerate(argv):
            if arg == "--config" and i + 1 < len(argv):
                return Path(argv[i + 1])
            if arg.startswith("--config="):
                return Path(arg.partition("=")[2])
        return None

    def writable_paths(self) -> list[Path]:
        """Folders the sandbox leaves writable: ReadWritePaths= and the directories systemd makes."""
        paths = [Path(word.lstrip("-+")) for word in self.words("ReadWritePaths")]
        paths.extend(path for path, _ in self.systemd_dirs())
        return paths

    def systemd_dirs(self) -> list[tuple[Path, str]]:
        """The folders systemd creates at start, owned by the service's user, with the setting that says so."""
        found = []
        for key, base in SYSTEMD_DIRS.items():
            for word in self.words(key):
                found.append((base / word.split(":", 1)[0], f"{key}={word}"))
        return found

    def hidden_paths(self) -> list[tuple[Path, str]]:
        """Folders the sandbox hides from the service, with the setting that hides them."""
        hidden: list[tuple[Path, str]] = []
        protect_home = self.last("ProtectHome").lower()
        if protect_home in _TRUE | {"tmpfs"}:
            hidden.extend((path, f"ProtectHome={self.last('ProtectHome')}") for path in _HIDDEN_BY_PROTECT_HOME)
        if self.flag("PrivateTmp"):
            hidden.extend((path, "PrivateTmp=yes") for path in _HIDDEN_BY_PRIVATE_TMP)
        for word in self.words("InaccessiblePaths"):
            hidden.append((Path(word.lstrip("-+")), f"InaccessiblePaths={word}"))
        return hidden

    def read_only(self, path: Path) -> str | None:
        """The setting that leaves ``path`` read-only for the service, or None."""
        protect = self.last("ProtectSystem").lower()
        if protect in ("strict", *_READ_ONLY_BY_PROTECT_SYSTEM, *_TRUE):
            if any(_under(path, writable) for writable in self.writable_paths()):
                return None
            if protect == "strict":
                return "ProtectSystem=strict"
            for root in _READ_ONLY_BY_PROTECT_SYSTEM["full" if protect == "full" else "yes"]:
                if _under(path, root):
                    return f"ProtectSystem={self.last('ProtectSystem')}"
        for word in self.words("ReadOnlyPaths"):
            if _under(path, Path(word.lstrip("-+"))):
                return f"ReadOnlyPaths={word}"
        return None


def _parse(text: str, settings: dict[str, list[str]]) -> None:
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    if pending:
        logical.append(pending)
    for line in logical:
        if not line or line.startswith("[") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key, value = key.strip(), value.strip().replace("%%", "%")
        if value:
            settings.setdefault(key, []).append(value)
        else:
            settings[key] = []


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def installed_unit() -> Unit | None:
    """The installed caired.service with its drop-ins, as systemd would find it; None if there is none."""
    for folder in UNIT_DIRS:
        path = folder / UNIT_NAME
        if path.is_file():
            return Unit.load(path, UNIT_DIRS)
    return None


def unit_for(config_path: str | None, explicit: str | None) -> Unit | None:
    """The unit whose deployment to check: ``explicit`` (--unit), or the installed unit when its
    ExecStart= runs the daemon on ``config_path`` itself. Only an ``explicit`` unit that cannot be
    read raises (OSError, UnicodeDecodeError); an installed one that cannot is passed over."""
    if explicit:
        return Unit.load(Path(explicit))
    if not config_path:
        return None
    try:
        unit = installed_unit()
    except (OSError, UnicodeDecodeError):
        return None
    if unit is None or unit.config_path is None:
        return None
    return unit if os.path.realpath(unit.config_path) == os.path.realpath(config_path) else None


# ---------------------------------------------------------------------------------------------
# The key the unit hands over


@attrs.frozen
class Credential:
    """Where the unit's api_key credential comes from, and what was found there."""

    setting: str  # "LoadCredential=api_key:/etc/caired/api_key"
    path: Path | None  # the file systemd copies; None for SetCredential=
    key: str | None  # the key; None when it could not be read here
    problem: str | None = None  # why the service would not get it
    note: str | None = None


def credential(unit: Unit, name: str = CREDENTIAL_NAME) -> Credential | None:
    """The credential ``name`` the unit loads (LoadCredential=, SetCredential= as its fallback)."""
    loaded = [value for value in unit.settings.get("LoadCredential", ()) if value.partition(":")[0] == name]
    given = [value for value in unit.settings.get("SetCredential", ()) if value.partition(":")[0] == name]
    fallback = given[-1].partition(":")[2] if given else None
    encrypted = [
        value
        for key in ("LoadCredentialEncrypted", "SetCredentialEncrypted")
        for value in unit.settings.get(key, ())
        if value.partition(":")[0] == name
    ]
    if not loaded:
        if encrypted:
            note = (f"the unit's {name} credential is encrypted ({encrypted[-1].partition(':')[0]}); "
                    "check-config cannot read it, only the service can")
            return Credential(setting=f"LoadCredentialEncrypted={encrypted[-1]}", path=None, key=None, note=note)
        if fallback is not None:
            return Credential(setting=f"SetCredential={name}:***", path=None, key=fallback.strip())
        return None
    setting = f"LoadCredential={loaded[-1]}"
    source = loaded[-1].partition(":")[2] or name
    candidates = [Path(source)] if os.path.isabs(source) else [store / source for store in CREDSTORES]
    for path in candidates:
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        except OSError as exc:
            return Credential(setting=setting, path=path, key=None,
                              note=f"{path} ({setting}) cannot be looked at as this user ({exc.strerror}); "
                                   "run check-config as root to check the key")
        if not stat.S_ISREG(st.st_mode):
            return Credential(setting=setting, path=path, key=None,
                              note=f"{path} ({setting}) is not a regular file; check-config does not read it")
        try:
            text = path.read_text(encoding="utf-8").strip()
        except PermissionError:
            return Credential(setting=setting, path=path, key=None,
                              note=f"the key is in {path} ({setting}), which this user cannot read, as it "
                                   "should be: systemd hands it to the service; run check-config as root to check it")
        except (OSError, UnicodeDecodeError) as exc:
            return Credential(setting=setting, path=path, key=None, problem=f"cannot read {path} ({setting}): {exc}")
        if not text:
            return Credential(setting=setting, path=path, key=None, problem=f"{path} ({setting}) is empty")
        return Credential(setting=setting, path=path, key=text)
    if fallback is not None:
        return Credential(setting=f"SetCredential={name}:***", path=None, key=fallback.strip())
    where = " or ".join(str(path) for path in candidates)
    return Credential(
        setting=setting, path=candidates[0], key=None,
        problem=f"{where} does not exist, so the service would fail to start (status 243/CREDENTIALS): "
                f"put the key there (install -m 0600 /dev/stdin {candidates[0]}) or remove {setting} from {unit.path}",
    )


def with_credential(cfg: Config, unit: Unit, env: Mapping[str, str]) -> tuple[Config, Credential | None]:
    """``cfg`` with the key the unit would hand the service, which beats every other source.

    Inside the service (``$CREDENTIALS_DIRECTORY`` set) the configuration already has it.
    """
    if env.get("CREDENTIALS_DIRECTORY"):
        return cfg, None
    found = credential(unit)
    if found is None:
        return cfg, None
    sources = dict(cfg.sources)
    where = str(found.path) if found.path else "the unit"
    sources["backend.api_key"] = f"credential {where} ({found.setting.partition('=')[0]}= in {unit.path})"
    if found.key is None:
        return attrs.evolve(cfg, sources=sources), found
    backend = attrs.evolve(cfg.backend, api_key=Secret(found.key))
    return attrs.evolve(cfg, backend=backend, sources=sources), found


# ---------------------------------------------------------------------------------------------
# The checks


@attrs.define
class Report:
    problems: list[str] = attrs.field(factory=list)
    warnings: list[str] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)
    key_paths_warned: set[Path] = attrs.field(factory=set)


@attrs.frozen
class _Context:
    cfg: Config
    unit: Unit
    service: Principal
    report: Report

    @property
    def user(self) -> str:
        return self.service.name

    @property
    def group(self) -> str:
        return perm.group_name(self.service.gid)


def service_principal(unit: Unit) -> tuple[Principal | None, str | None]:
    """Who the service runs as, or None and why that cannot be known here."""
    if unit.flag("DynamicUser"):
        return None, "the unit has DynamicUser=yes: access for its user cannot be checked before it runs"
    user = unit.last("User", "root")
    group = unit.last("Group") or None
    extra = unit.words("SupplementaryGroups")
    try:
        pwd.getpwnam(user)
    except KeyError:
        return None, (f"the unit's User={user} does not exist, so the service cannot start; create it as the "
                      f"{README} says: useradd --system --user-group --home-dir /var/lib/caired --no-create-home "
                      f"--shell /usr/sbin/nologin {user}")
    for name, setting in ((group, "Group"), *((name, "SupplementaryGroups") for name in extra)):
        if name is None:
            continue
        try:
            grp.getgrnam(name)
        except KeyError:
            return None, f"the unit's {setting}={name} names no group, so the service cannot start: groupadd {name}"
    return Principal.user(user, group=group, extra_groups=extra), None


def check(
    cfg: Config,
    unit: Unit,
    credential_found: Credential | None,
    *,
    service: Principal | None = None,
    mountinfo: Path = MOUNTINFO,
) -> Report:
    """Everything the deployed service needs from the system, judged for its user (``service``,
    by default the unit's User=, Group= and SupplementaryGroups=) and for the droppers."""
    report = Report()
    if credential_found is not None:
        if credential_found.problem:
            report.problems.append(f"backend.api_key: {credential_found.problem}")
        if credential_found.note:
            report.notes.append(credential_found.note)
    why = None
    if service is None:
        service, why = service_principal(unit)
    if service is None:
        (report.notes if unit.flag("DynamicUser") else report.problems).append(str(why))
        return report
    ctx = _Context(cfg=cfg, unit=unit, service=service, report=report)
    _check_interpreter(ctx)
    _check_config_file(ctx)
    droppers = _check_spool(ctx, Path(cfg.spool.dir), mountinfo)
    if cfg.log.file:
        _check_log(ctx, Path(cfg.log.file), droppers)
    if credential_found is not None and credential_found.path is not None:
        _check_key_file(ctx, credential_found.path, droppers)
    if cfg.backend.api_key_file:
        _check_key_file(ctx, Path(cfg.backend.api_key_file), droppers)
    return report


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def _hidden(ctx: _Context, path: Path) -> str | None:
    """Why the sandbox hides ``path`` (or a folder passed on the way to it) from the service, or None."""
    for passed in (*perm.folders_passed(path), Path(os.path.abspath(path))):
        for root, setting in ctx.unit.hidden_paths():
            if _under(passed, root):
                if _under(Path(os.path.abspath(path)), root):
                    return f"{path} is under {root}, which the unit's {setting} hides from the service"
                under = f" (under {root})" if passed != root else ""
                return f"the way to {path} passes through {passed}{under}, which the unit's {setting} hides"
    return None


def _unreachable(ctx: _Context, path: Path) -> str | None:
    """Why the service's user cannot get to ``path`` (sandbox or permissions), or None."""
    if hidden := _hidden(ctx, path):
        return hidden
    blocker = perm.blocked_at(ctx.service, path)
    if blocker is None:
        return None
    st = _stat(blocker)
    shown = f" ({perm.describe(st)})" if st else ""
    return f"{ctx.user} cannot pass through {blocker}{shown} to reach {path}"


def _check_interpreter(ctx: _Context) -> None:
    """The service's program and its Python must be reachable and runnable by its user."""
    argv = ctx.unit.exec_start
    if not argv:
        ctx.report.problems.append(f"{ctx.unit.path} has no ExecStart=")
        return
    program = Path(argv[0])
    st = _stat(program)
    if st is None:
        ctx.report.problems.append(
            f"ExecStart= runs {program}, which does not exist: install caired there as the {README} says"
        )
        return
    paths = [program]
    try:
        with program.open("rb") as fh:
            head = fh.read(256)
    except OSError:
        head = b""
    if head.startswith(b"#!"):
        words = head[2:].split(b"\n", 1)[0].split()
        if words:
            paths.append(Path(os.fsdecode(words[0])))
    interpreter = paths[-1]
    real = Path(os.path.realpath(interpreter))
    checks = [(program, f"the service cannot run {program}: ")]
    if interpreter != program:
        python = f"{interpreter} -> {real}" if real != interpreter else str(real)
        checks.append((real, f"the service cannot run {program}: its Python {python}: "))
    home = _pyvenv_home(interpreter.parent.parent / "pyvenv.cfg")
    if home is not None and home not in real.parents:
        checks.append((home, f"the service cannot run {program}: the home of its venv, {home}: "))
    advice = (
        "; make the venv from a Python outside home folders and /tmp (/usr/bin/python3 if it is 3.11 or newer, "
        "or one installed under /opt or /usr/local): python3 -m venv /opt/caired"
    )
    for path, prefix in checks:
        why = _unreachable(ctx, path)
        if why is None:
            st = _stat(path)
            if st is None:
                why = f"{path} does not exist"
            elif not stat.S_ISDIR(st.st_mode) and not perm.may(ctx.service, st, SEARCH):
                why = f"{ctx.user} may not run {path} ({perm.describe(st)})"
        if why is not None:
            ctx.report.problems.append(prefix + why + advice)
            return


def _pyvenv_home(venv_cfg: Path) -> Path | None:
    try:
        lines = venv_cfg.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and key.strip() == "home" and value.strip():
            return Path(value.strip())
    return None


def _check_config_file(ctx: _Context) -> None:
    path = ctx.unit.config_path
    if path is None:
        return
    why = _unreachable(ctx, path)
    st = _stat(path)
    if why is not None:
        ctx.report.problems.append(f"--config: the service cannot read its configuration: {why}")
    elif st is not None and not perm.may(ctx.service, st, READ):
        ctx.report.problems.append(
            f"--config: the service cannot read its configuration: {ctx.user} may not read {path} "
            f"({perm.describe(st)}); chmod 0644 {path}, or chgrp {ctx.group} and chmod 0640 if it holds a secret"
        )


def _check_spool(ctx: _Context, root: Path, mountinfo: Path) -> Principal | None:
    """The spool's folders against the droppers' model; returns the droppers (the spool's group)."""
    report, user = ctx.report, ctx.user
    create_root = f"install -d -o {user} -g caired-drop -m 0750 {root}"
    if hidden := _hidden(ctx, root):
        report.problems.append(f"spool.dir: {hidden}")
        return None
    if read_only := ctx.unit.read_only(root):
        report.problems.append(
            f"spool.dir: {root} is read-only for the service ({read_only} in {ctx.unit.path}); "
            f"add ReadWritePaths={root} to the unit"
        )
        return None
    st = _stat(root) if not root.is_symlink() else root.lstat()
    if st is None:
        _missing_spool(ctx, root, create_root)
        return None
    if not stat.S_ISDIR(st.st_mode):
        report.problems.append(f"spool.dir: {root} is not a folder")
        return None
    if why := _unreachable(ctx, root):
        report.problems.append(f"spool.dir: {why}")
        return None
    if not perm.may(ctx.service, st, READ | WRITE | SEARCH):
        report.problems.append(
            f"spool.dir: {user} cannot write in {root} ({perm.describe(st)}); chown {user} {root}"
        )
        return None
    try:
        check_shared_locks(root, mountinfo)
    except SpoolError as exc:
        report.problems.append(f"spool.dir: {exc}")
    droppers: Principal | None = None
    if st.st_gid in ctx.service.gids:
        report.warnings.append(
            f"spool.dir: {root} belongs to the group {perm.group_name(st.st_gid)}, one of {user}'s own: droppers "
            f"would have to join it, and could then read the log and change each other's folders; give the "
            f"droppers a group of their own ({README}): groupadd --system caired-drop && "
            f"chgrp caired-drop {root} && chmod 0750 {root}"
        )
    else:
        droppers = Principal.group_member(st.st_gid)
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != ctx.service.uid or mode != perm.ROOT_MODE:
        why = "the droppers' model has it so"
        if mode & 0o007:
            why = "anyone, not only the droppers, can get into the spool"
        elif mode & 0o020:
            why = "droppers could rename or replace the spool's folders"
        elif not mode & 0o010:
            why = "the droppers cannot get in"
        report.warnings.append(
            f"spool.dir: {root} is {perm.describe(st)}, not {user}:{perm.group_name(st.st_gid)} "
            f"{perm.ROOT_MODE:04o}: {why}; chown {user} {root} && chmod {perm.ROOT_MODE:04o} {root}"
        )
    for name, wanted in perm.FOLDER_MODES.items():
        _check_spool_folder(ctx, root / name, wanted)
    return droppers


def _missing_spool(ctx: _Context, root: Path, create_root: str) -> None:
    report = ctx.report
    for path, setting in ctx.unit.systemd_dirs():
        if path == root:
            report.notes.append(
                f"spool.dir: {root} will be created by systemd at the service's first start ({setting}), "
                f"owned by {ctx.user}:{ctx.group}; droppers then need their own group on it ({README})"
            )
            return
    listed = [word for word in ctx.unit.words("ReadWritePaths") if Path(word.lstrip("+")) == root]
    if listed and not listed[-1].startswith("-"):
        report.problems.append(
            f"spool.dir: {root} does not exist, and the unit lists it in ReadWritePaths=, so the service would "
            f"fail to start (status 226/NAMESPACE); create it: {create_root}"
        )
        return
    parent = root.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    st = _stat(parent)
    if st is None or not perm.may(ctx.service, st, WRITE | SEARCH) or _unreachable(ctx, parent):
        shown = f" ({perm.describe(st)})" if st else ""
        report.problems.append(
            f"spool.dir: {root} does not exist and {ctx.user} cannot create it in {parent}{shown}; create it: "
            f"{create_root}"
        )
        return
    report.warnings.append(
        f"spool.dir: {root} does not exist; caired would create it owned by {ctx.user}:{ctx.group}, where no "
        f"dropper can get in; create it: {create_root}"
    )


def _check_spool_folder(ctx: _Context, path: Path, wanted: int) -> None:
    report, user, group = ctx.report, ctx.user, ctx.group
    fix = f"install -d -o {user} -g {group} -m {wanted:04o} {path}"
    try:
        st = path.lstat()
    except FileNotFoundError:
        if wanted & stat.S_ISGID and ctx.unit.flag("RestrictSUIDSGID"):
            report.problems.append(
                f"spool.dir: {path} does not exist, and caired cannot make it with its setgid bit under the "
                f"unit's RestrictSUIDSGID=yes; create it: {fix}"
            )
        return
    except OSError as exc:
        report.problems.append(f"spool.dir: cannot look at {path}: {exc.strerror}")
        return
    if not stat.S_ISDIR(st.st_mode):
        report.problems.append(f"spool.dir: {path} is not a folder; move it away")
        return
    if not perm.may(ctx.service, st, READ | WRITE | SEARCH):
        report.problems.append(f"spool.dir: {user} cannot write in {path} ({perm.describe(st)}); {fix}")
        return
    if st.st_uid != ctx.service.uid or st.st_gid != ctx.service.gid or stat.S_IMODE(st.st_mode) != wanted:
        report.warnings.append(
            f"spool.dir: {path} is {perm.describe(st)}, not {user}:{group} {wanted:04o} as the droppers' model "
            f"has it ({README}); chown {user}:{group} {path} && chmod {wanted:04o} {path}"
        )


def _check_log(ctx: _Context, log_file: Path, droppers: Principal | None) -> None:
    report, user = ctx.report, ctx.user
    folder = log_file.parent
    if hidden := _hidden(ctx, folder):
        report.problems.append(f"log.file: {hidden}")
        return
    if read_only := ctx.unit.read_only(folder):
        report.problems.append(
            f"log.file: {folder} is read-only for the service ({read_only}); use LogsDirectory= or ReadWritePaths="
        )
        return
    st = _stat(folder)
    if st is None:
        for path, setting in ctx.unit.systemd_dirs():
            if _under(folder, path):
                report.notes.append(
                    f"log.file: {path} will be created by systemd at the service's first start ({setting})"
                )
                return
        parent = folder.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        pst = _stat(parent)
        if pst is None or not perm.may(ctx.service, pst, WRITE | SEARCH) or _unreachable(ctx, parent):
            report.problems.append(
                f"log.file: {folder} does not exist and {user} cannot create it in {parent}; add "
                f"LogsDirectory={folder.name} to the unit or create it: install -d -o {user} -m 0750 {folder}"
            )
        return
    if why := _unreachable(ctx, folder):
        report.problems.append(f"log.file: {why}")
        return
    fst = _stat(log_file)
    writable = perm.may(ctx.service, fst, WRITE) if fst else perm.may(ctx.service, st, WRITE | SEARCH)
    if not writable:
        shown = perm.describe(fst) if fst else perm.describe(st)
        report.problems.append(f"log.file: {user} cannot write {log_file} ({shown})")
        return
    for who, label in ((droppers, "the droppers"), (Principal.anyone(), "everyone")):
        if who is None:
            continue
        if perm.blocked_at(who, log_file) is None and (fst is None or perm.may(who, fst, READ)):
            report.warnings.append(
                f"log.file: {label} can read the log in {folder} ({perm.describe(st)}); "
                f"chmod {perm.LOG_DIR_MODE:04o} {folder} && chgrp {ctx.group} {folder}"
            )
            return


def _check_key_file(ctx: _Context, path: Path, droppers: Principal | None) -> None:
    st = _stat(path)
    if st is None:
        return
    if droppers is not None and perm.blocked_at(droppers, path) is None and perm.may(droppers, st, READ):
        ctx.report.warnings.append(
            f"backend.api_key: the droppers ({droppers.name}) can read the API key in {path} "
            f"({perm.describe(st)}); chmod 0600 {path}"
        )
        ctx.report.key_paths_warned.add(path)
