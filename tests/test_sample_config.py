"""etc/caired.toml: loads, lists every key with its default and its help, and matches the unit."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from caired.config import Config, env_names, iter_fields

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "etc" / "caired.toml"
UNIT = ROOT / "systemd" / "caired.service"
LOG_FILE = "/var/log/caired/caired.jsonl"


def test_sample_loads_and_every_value_comes_from_it() -> None:
    cfg = Config.load(path=SAMPLE, env={})
    assert dict(cfg.sources) == {key: f"file {SAMPLE}" for key, _, _ in iter_fields()}


def test_sample_lists_every_key_and_nothing_else() -> None:
    document = tomllib.loads(SAMPLE.read_text())
    in_file = {f"{section}.{name}" for section, table in document.items() for name in table}
    assert in_file == {key for key, _, _ in iter_fields()}


def test_sample_values_are_the_defaults_except_the_log_file() -> None:
    cfg = Config.load(path=SAMPLE, env={})
    different = {}
    for key, attr, _ in iter_fields():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value != attr.default:
            different[key] = value
    assert different == {"log.file": LOG_FILE}
    assert cfg.spool.dir == "/var/lib/caired"
    assert cfg.api_key() == ""


def test_each_key_is_explained_by_its_help_and_environment_names() -> None:
    comments: dict[str, list[str]] = {}
    section = ""
    block: list[str] = []
    for line in SAMPLE.read_text().splitlines():
        if line.startswith("["):
            section, block = line.strip("[]"), []
        elif line.startswith("#"):
            block.append(line)
        elif "=" in line and section:
            comments[f"{section}.{line.split('=')[0].strip()}"] = block
            block = []
    for key, attr, _ in iter_fields():
        first = comments[key][0]  # the one-line comment right above the key (or its block)
        assert attr.metadata["help"] in first, key
        assert "Env: " + ", ".join(env_names(key, attr)) in first, key


def test_sample_paths_are_the_ones_the_unit_provides() -> None:
    unit = UNIT.read_text().splitlines()
    assert "ReadWritePaths=/var/lib/caired" in unit
    assert "LogsDirectory=caired" in unit
    cfg = Config.load(path=SAMPLE, env={})
    assert cfg.spool.dir == "/var/lib/caired"
    assert Path(cfg.log.file).parent == Path("/var/log/caired")
    assert "ExecStart=/opt/caired/bin/caired run --config /etc/caired/caired.toml" in unit


# --- etc/logrotate.d/caired -----------------------------------------------------------

LOGROTATE_CONF = ROOT / "etc" / "logrotate.d" / "caired"
LOGROTATE = shutil.which("logrotate", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
needs_logrotate = pytest.mark.skipif(LOGROTATE is None, reason="logrotate is not installed")
POSTROTATE = "systemctl kill --signal=USR2 --kill-whom=main caired.service >/dev/null 2>&1 || true"


def rules() -> list[str]:
    """The directives of the shipped logrotate file, comments left out."""
    lines = (line.strip() for line in LOGROTATE_CONF.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def for_this_machine(text: str) -> str:
    """The shipped rules with 'create ... caired caired' owned by whoever runs the test, if caired does not exist."""
    try:
        pwd.getpwnam("caired")
        grp.getgrnam("caired")
    except KeyError:
        user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
        text = text.replace("create 0640 caired caired", f"create 0640 {user} {group}")
    return text


def logrotate(conf: Path, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert LOGROTATE is not None
    return subprocess.run([LOGROTATE, *args, "-s", str(state), str(conf)], capture_output=True, text=True, timeout=30)


def test_logrotate_rules_rename_and_signal_instead_of_truncating() -> None:
    directives = rules()
    assert directives[0] == "/var/log/caired/*.jsonl {"
    assert LOG_FILE.endswith(".jsonl") and LOG_FILE.startswith("/var/log/caired/")
    for wanted in [
        "daily",
        "missingok",
        "notifempty",
        "compress",
        "delaycompress",
        "create 0640 caired caired",
        "sharedscripts",
        "postrotate",
        POSTROTATE,
        "endscript",
    ]:
        assert wanted in directives
    assert not any("copytruncate" in line for line in directives)


@needs_logrotate
def test_logrotate_accepts_the_shipped_rules(tmp_path: Path) -> None:
    conf = tmp_path / "caired"
    conf.write_text(for_this_machine(LOGROTATE_CONF.read_text()))
    result = logrotate(conf, tmp_path / "state", "-d")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "error" not in output.lower(), output


@needs_logrotate
def test_logrotate_renames_recreates_and_signals_once(tmp_path: Path) -> None:
    logs, marker = tmp_path / "log", tmp_path / "signalled"
    logs.mkdir()
    lines = '{"event": "session_finished", "hr": 71.5}\n{"event": "session_finished", "hr": 72.0}\n'
    (logs / "caired.jsonl").write_text(lines)
    (logs / "emulator.jsonl").write_text(lines)
    text = for_this_machine(LOGROTATE_CONF.read_text())
    assert text.count("/var/log/caired/*.jsonl {") == 1 and text.count(POSTROTATE) == 1
    text = text.replace("/var/log/caired/*.jsonl {", f"{logs}/*.jsonl {{").replace(POSTROTATE, f"echo USR2 >> {marker}")
    conf = tmp_path / "caired"
    conf.write_text(text)

    result = logrotate(conf, tmp_path / "state", "-f")

    assert result.returncode == 0, result.stdout + result.stderr
    assert marker.read_text() == "USR2\n"  # sharedscripts: one signal for all the files
    fresh = logs / "caired.jsonl"
    assert fresh.read_text() == ""
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o640
    [rotated] = logs.glob("caired.jsonl-*")
    assert re.fullmatch(r"caired\.jsonl-\d{8}-\d+", rotated.name)  # kept whole, not yet compressed
    assert rotated.read_text() == lines
