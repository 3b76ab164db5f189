"""``caired check-config``: load the configuration as ``run`` would and report it.

stdout lists every key, ``section.key = value   # source``, where the source is
``default``, ``file PATH``, ``env NAME``, ``flag --name`` or ``credential PATH``; the
API key shows as ``***``. Then the paths and the key are checked: problems (exit 78)
and warnings (exit 0) go to stderr, one line each. Nothing is left behind on disk.

The checks run as the user who calls the command. For a deployed service, the checks of
caired.deploy run too: given ``--unit PATH``, or when the installed ``caired.service`` runs
``caired run --config`` on the file checked here. They judge access for the unit's user and
the droppers' group, read the key where the unit's ``LoadCredential=`` takes it from, and say
which folders systemd will create at the first start; run them as root
(``sudo /opt/caired/bin/caired check-config --config /etc/caired/caired.toml``).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import attrs

from caired import deploy
from caired.cli import add_common, add_daemon_paths, command
from caired.config import Config, Secret, iter_fields, key_file_warning
from caired.errors import ConfigError, ConfigErrors, ExitCode, SpoolError
from caired.spool import FOLDERS, MOUNTINFO, check_shared_locks

PROG: Final = "caired check-config"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = command(
        sub,
        "check-config",
        _main,
        help="load the configuration as 'run' would and report it",
        description="""
            Load the configuration exactly as 'caired run' would, from its flags, the environment,
            the file and the defaults, and print every key with its effective value and where the
            value came from (the API key shows as ***). Then check what the daemon needs: that the
            spool and the log file can be created and written, that the URL ends in /ws/, that a
            key is set and no one else can read it. Problems go to stderr and exit 78; warnings go
            to stderr and exit 0. Nothing is created on disk. The checks run as the calling user,
            except for a deployed service (--unit, or the installed caired.service when it runs the
            daemon on this --config): then the key is read where the unit's LoadCredential= takes it
            from, and the spool, the log and the venv's Python are judged for the unit's user and
            the droppers' group; run it as root.
        """,
        examples=[
            "caired check-config --config /etc/caired/caired.toml",
            "caired check-config --spool ~/caired-spool --log-level debug",
            "caired check-config --connect --config /etc/caired/caired.toml",
        ],
    )
    p.set_defaults(opens_log_file=False)  # checking the log file must not create it
    add_daemon_paths(p)
    p.add_argument("--connect", action="store_true",
                   help="also open a session handshake to the backend with the key, and close it (no frame sent)")
    add_common(p)
    p.add_argument("--unit", metavar="PATH", help="check the deployment of this systemd unit file "
                   "(default: the installed caired.service, when it runs the daemon on this --config)")


@attrs.define
class Findings:
    problems: list[str] = attrs.field(factory=list)
    warnings: list[str] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)


def _main(cfg: Config, args: argparse.Namespace) -> int:
    unit = _unit(args)
    credential = None
    if unit is not None:
        cfg, credential = deploy.with_credential(cfg, unit, os.environ)
    for line in describe(cfg):
        print(line)
    sys.stdout.flush()
    found = check(cfg, unit=unit, credential=credential)
    for note in found.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    for warning in found.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    for problem in found.problems:
        print(f"{PROG}: {problem}", file=sys.stderr)
    if found.problems:
        return int(ExitCode.CONFIG)
    if getattr(args, "connect", False):
        return _connect(cfg)
    return int(ExitCode.OK)


def _connect(cfg: Config) -> int:
    """The --connect check: one line on stdout when the backend takes the key, on stderr when not."""
    import trio

    from caired.errors import SessionError
    from caired.probe import probe

    try:
        print(f"backend: {trio.run(probe, cfg.backend)}")
    except SessionError as err:
        print(f"{PROG}: backend: {err.reason}", file=sys.stderr)
        return int(err.exit_code)
    return int(ExitCode.OK)


def describe(cfg: Config) -> list[str]:
    """``section.key = value`` for every key, the sources aligned in one column."""
    rows = []
    for key, _, _ in iter_fields():
        section, name = key.split(".", 1)
        rows.append((f"{key} = {_shown(getattr(getattr(cfg, section), name))}", cfg.sources.get(key, "default")))
    width = max(len(left) for left, _ in rows)
    return [f"{left.ljust(width)}   # {source}" for left, source in rows]


def _unit(args: argparse.Namespace) -> deploy.Unit | None:
    """The unit whose deployment to check as well (caired.deploy.unit_for); ConfigErrors for a bad --unit."""
    explicit = getattr(args, "unit", None)
    config_path = getattr(args, "config", None) or os.environ.get("CAIRED_CONFIG")
    try:
        return deploy.unit_for(config_path, explicit)
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigErrors([ConfigError("--unit", str(explicit), f"cannot be read: {reason}")]) from None


def check(cfg: Config, *, unit: deploy.Unit | None = None, credential: deploy.Credential | None = None) -> Findings:
    """What would stop the daemon (problems) and what deserves a look (warnings); with ``unit``,
    the spool, the log and the key are judged as the deployed service and its droppers see them."""
    found = Findings()
    report = deploy.check(cfg, unit, credential) if unit is not None else None
    if report is not None:
        found.problems.extend(_placed(cfg, line) for line in report.problems)
        found.warnings.extend(_placed(cfg, line) for line in report.warnings)
        found.notes.extend(_placed(cfg, line) for line in report.notes)
    else:
        spool = _spool_problem(Path(cfg.spool.dir))
        if spool:
            found.problems.append(_where(cfg, "spool.dir", spool))
        if cfg.log.file:
            log_file = _log_problem(Path(cfg.log.file))
            if log_file:
                found.problems.append(_where(cfg, "log.file", log_file))
    if not urlsplit(cfg.backend.url).path.endswith("/ws/"):
        found.warnings.append(
            _where(cfg, "backend.url", f"{cfg.backend.url} does not end in /ws/; the backend serves ws://HOST:PORT/ws/")
        )
    found.warnings.extend(_key_warnings(cfg, already=report.key_paths_warned if report else set()))
    return found


def _shown(value: Any) -> str:
    if isinstance(value, Secret):
        return "***" if value.reveal() else "''"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _where(cfg: Config, key: str, problem: str) -> str:
    return str(ConfigError(key, cfg.sources.get(key, ""), problem))


def _placed(cfg: Config, line: str) -> str:
    """``key: text`` from caired.deploy as ``key (from SOURCE): text``, like every other finding."""
    key, sep, text = line.partition(": ")
    return _where(cfg, key, text) if sep and key in cfg.sources else line


def _spool_problem(root: Path, mountinfo: Path = MOUNTINFO) -> str | None:
    """Why the daemon could not use ``root`` as its spool, or None (``mountinfo``: the mount table)."""
    if not root.exists():
        return _creatable_problem(root)
    if not root.is_dir():
        return f"{root} is not a folder"
    try:
        check_shared_locks(root, mountinfo)
    except SpoolError as exc:
        return str(exc)
    try:
        fd, probe = tempfile.mkstemp(prefix=".caired-check-", dir=root)
    except OSError as exc:
        return f"cannot write in {root} ({exc.strerror or exc})"
    os.close(fd)
    os.unlink(probe)
    for name in FOLDERS:
        folder = root / name
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            return f"{folder} is not a folder"
        if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
            return f"cannot write in {folder} (permission denied)"
    return None


def _log_problem(path: Path) -> str | None:
    """Why the daemon could not append to the log file ``path``, or None."""
    if path.is_dir():
        return f"{path} is a folder, not a file"
    if path.exists():
        return None if os.access(path, os.W_OK) else f"cannot append to {path} (permission denied)"
    folder = path.parent
    if not folder.exists():
        return _creatable_problem(folder)
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot create {path}: {folder} is not writable"
    return None


def _creatable_problem(path: Path) -> str | None:
    """Why ``path`` (missing) could not be created with its parents, or None."""
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot create {path}: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create {path}: {parent} is not writable"
    return None


def _key_warnings(cfg: Config, *, already: set[Path] | frozenset[Path] = frozenset()) -> list[str]:
    """``already``: key files the deploy checks warned about (the droppers can read them)."""
    origin, _, path = cfg.sources.get("backend.api_key", "").partition(" ")
    path = path.split(" (", 1)[0]  # "credential PATH (LoadCredential= in UNIT)"
    if not cfg.api_key():
        if origin == "credential":  # the unit's credential, unreadable here: deploy's note says so
            return []
        return [
            "no API key is set (backend.api_key, API_KEY, backend.api_key_file or the systemd credential "
            "api_key): the backend will reject the connection unless it runs without a key"
        ]
    warnings = []
    key_files = [("backend.api_key", path)] if origin in ("credential", "backend.api_key_file") and path else []
    if cfg.backend.api_key_file and cfg.backend.api_key_file != path:
        key_files.append(("backend.api_key_file", cfg.backend.api_key_file))
    for key, key_file in key_files:
        if Path(key_file) in already:
            continue
        if warning := key_file_warning(key_file):
            warnings.append(_where(cfg, key, warning))
    if origin == "file" and path:
        # A config file may well be group-readable (root:caired 0640); others should not read the key.
        try:
            mode = stat.S_IMODE(Path(path).stat().st_mode)
        except OSError:
            mode = 0
        if mode & stat.S_IROTH:
            advice = "move it to backend.api_key_file or a systemd credential, or chmod o-r it"
            warning = f"the API key is in {path}, which everyone can read (mode {mode:o}); {advice}"
            warnings.append(_where(cfg, "backend.api_key", warning))
    return warnings
