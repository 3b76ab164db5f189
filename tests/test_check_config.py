"""caired check-config through caired.cli.main: the listing, its sources, the checks, the exit codes."""

from __future__ import annotations

import contextlib
import grp
import io
import os
import pwd
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

import caired.logging
import caired.wire  # noqa: F401 - imported before a test forks a child that cannot import
from caired import cli, deploy, permissions
from caired.commands import check_config
from caired.config import Config, env_names, iter_fields
from caired.errors import ExitCode
from tests import users

SECRET = "sk-live-3f9c2e77d1"
OTHER_SECRET = "env-key-0b84aa51"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No configuration from the environment of whoever runs the tests; only this command registered."""
    monkeypatch.setattr("caired.cli.COMMANDS", ("caired.commands.check_config",))
    for key, attr, _ in iter_fields():
        for name in env_names(key, attr):
            monkeypatch.delenv(name, raising=False)
    for name in ("CAIRED_CONFIG", "CREDENTIALS_DIRECTORY", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    for name in [n for n in os.environ if n.startswith("CAIRED_")]:  # a stray one would print a typo warning
        monkeypatch.delenv(name)


def write_config(tmp_path: Path, body: str, *, mode: int = 0o600) -> Path:
    path = tmp_path / "caired.toml"
    path.write_text(body)
    path.chmod(mode)
    return path


def good_config(tmp_path: Path, extra: str = "", *, api_key: str = SECRET) -> Path:
    return write_config(
        tmp_path,
        f"""
[backend]
url = "ws://127.0.0.1:8003/ws/"
api_key = "{api_key}"

[stream]
fps = 12.5
format = "raw"

[spool]
dir = "{tmp_path / "spool"}"
{extra}""",
    )


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["check-config", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def listing(out: str) -> dict[str, tuple[str, str]]:
    """{key: (value, source)} from the stdout lines 'key = value   # source'."""
    rows = {}
    for line in out.splitlines():
        match = re.fullmatch(r"([a-z_]+\.[a-z_]+) = (.*?) +# (.+)", line)
        if match:
            rows[match[1]] = (match[2], match[3])
    return rows


def test_good_config_lists_every_key_with_its_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = good_config(tmp_path)
    monkeypatch.setenv("FPS", "24")  # the environment beats the file
    monkeypatch.setenv("CAIRED_SPOOL_MAX_SESSIONS", "3")

    code, out, err = run(capsys, "--config", str(path), "--log-level", "warning")

    assert code == ExitCode.OK, err
    rows = listing(out)
    assert list(rows) == [key for key, _, _ in iter_fields()]
    file = f"file {path}"
    assert rows["backend.url"] == ('"ws://127.0.0.1:8003/ws/"', file)
    assert rows["backend.api_key"] == ("***", file)
    assert rows["stream.fps"] == ("24.0", "env FPS")
    assert rows["camera.fps"] == ("24.0", "env FPS")
    assert rows["stream.format"] == ('"raw"', file)
    assert rows["spool.dir"] == (f'"{tmp_path / "spool"}"', file)
    assert rows["spool.max_sessions"] == ("3", "env CAIRED_SPOOL_MAX_SESSIONS")
    assert rows["log.level"] == ('"warning"', "flag --log-level")
    assert rows["retry.max"] == ("60.0", "default")
    assert rows["backend.api_key_file"] == ('""', "default")
    assert SECRET not in out + err
    assert err == ""
    assert not (tmp_path / "spool").exists()  # checked, not created


def test_an_existing_spool_is_probed_without_leaving_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = good_config(tmp_path)
    (tmp_path / "spool" / "incoming").mkdir(parents=True)
    code, _, err = run(capsys, "--config", str(path))
    assert code == ExitCode.OK, err
    assert sorted(p.name for p in (tmp_path / "spool").iterdir()) == ["incoming"]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ('[stream]\nfps = "fast"\n', "stream.fps (from file {path}): must be a number (got 'fast')"),
        ("[stream]\nframes_per_second = 30\n", "stream.frames_per_second (from file {path}): unknown key"),
        ("[streaming]\nfps = 30\n", "streaming (from file {path}): unknown section"),
        ('[stream]\nformat = "png"\n', "stream.format (from file {path}): must be one of 'jpeg', 'raw'"),
    ],
)
def test_bad_values_exit_78_naming_key_and_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, named: str
) -> None:
    path = write_config(tmp_path, body)
    code, out, err = run(capsys, "--config", str(path))
    assert code == 78
    assert out == ""
    assert err.startswith("caired check-config: " + named.format(path=path)), err


def test_bad_environment_value_is_named_with_its_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JPEG_QUALITY", "best")
    code, _, err = run(capsys, "--config", str(good_config(tmp_path)))
    assert code == ExitCode.CONFIG
    assert err == (
        "caired check-config: stream.jpeg_quality (from env JPEG_QUALITY): must be a whole number (got 'best')\n"
    )


def test_spool_under_a_file_cannot_be_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("not a folder")
    spool = tmp_path / "afile" / "spool"
    path = write_config(tmp_path, f'[backend]\napi_key = "{SECRET}"\n[spool]\ndir = "{spool}"\n')
    code, out, err = run(capsys, "--config", str(path))
    assert code == ExitCode.CONFIG
    assert listing(out)["spool.dir"] == (f'"{spool}"', f"file {path}")  # the listing still comes first
    assert err == (
        f"caired check-config: spool.dir (from file {path}): cannot create {spool}: {tmp_path / 'afile'} "
        "is not a folder\n"
    )


def test_spool_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "spool").write_text("")
    code, _, err = run(capsys, "--config", str(good_config(tmp_path)))
    assert code == ExitCode.CONFIG
    assert f"spool.dir (from file {tmp_path / 'caired.toml'}): {tmp_path / 'spool'} is not a folder" in err


def writes_through_mode_500(folder: Path) -> bool:
    """True for root (CAP_DAC_OVERRIDE), whom a read-only mode does not stop."""
    try:
        (folder / "probe").touch()
    except PermissionError:
        return False
    (folder / "probe").unlink()
    return True


def test_spool_in_a_read_only_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o500)
    existing = tmp_path / "ro-existing"
    existing.mkdir(mode=0o500)
    if writes_through_mode_500(parent):
        pytest.skip("this user writes through mode 500 (root); test_spool_under_a_file_cannot_be_created covers it")
    try:
        for spool, expected in [(parent / "spool", "is not writable"), (existing, "cannot write in")]:
            path = write_config(tmp_path, f'[backend]\napi_key = "k"\n[spool]\ndir = "{spool}"\n')
            code, _, err = run(capsys, "--config", str(path))
            assert code == ExitCode.CONFIG
            assert err.startswith(f"caired check-config: spool.dir (from file {path}): "), err
            assert expected in err
    finally:
        parent.chmod(0o700)
        existing.chmod(0o700)


def test_log_file_folder_must_be_creatable(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    assert check_config._log_problem(tmp_path / "afile" / "caired.jsonl") == f"{tmp_path / 'afile'} is not a folder"
    assert check_config._log_problem(tmp_path / "afile" / "deeper" / "caired.jsonl") == (
        f"cannot create {tmp_path / 'afile' / 'deeper'}: {tmp_path / 'afile'} is not a folder"
    )
    assert check_config._log_problem(tmp_path) == f"{tmp_path} is a folder, not a file"
    assert check_config._log_problem(tmp_path / "logs" / "caired.jsonl") is None
    assert not (tmp_path / "logs").exists()


def test_log_file_is_checked_and_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log_file = tmp_path / "logs" / "caired.jsonl"
    path = good_config(tmp_path, f'\n[log]\nfile = "{log_file}"\n')
    code, out, err = run(capsys, "--config", str(path))
    assert code == ExitCode.OK, err
    assert listing(out)["log.file"] == (f'"{log_file}"', f"file {path}")
    assert SECRET not in out + err
    assert not log_file.exists()  # checking the log file does not create it


def test_credential_beats_the_environment_and_stays_hidden(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "api_key").write_text(SECRET + "\n")
    (credentials / "api_key").chmod(0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    monkeypatch.setenv("API_KEY", OTHER_SECRET)
    path = good_config(tmp_path, api_key="")

    code, out, err = run(capsys, "--config", str(path))

    assert code == ExitCode.OK, err
    assert listing(out)["backend.api_key"] == ("***", f"credential {credentials / 'api_key'}")
    assert SECRET not in out + err
    assert OTHER_SECRET not in out + err
    assert err == ""


def test_environment_key_beats_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("API_KEY", OTHER_SECRET)
    code, out, err = run(capsys, "--config", str(good_config(tmp_path)))
    assert code == ExitCode.OK, err
    assert listing(out)["backend.api_key"] == ("***", "env API_KEY")
    assert OTHER_SECRET not in out + err and SECRET not in out + err


@pytest.mark.parametrize("mode", [0o644, 0o600])
def test_key_file_readable_by_others_draws_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int
) -> None:
    key_file = tmp_path / "api_key"
    key_file.write_text(SECRET)
    key_file.chmod(mode)
    body = good_config(tmp_path, api_key="").read_text().replace('api_key = ""', f'api_key_file = "{key_file}"')
    path = write_config(tmp_path, body)

    code, out, err = run(capsys, "--config", str(path))

    assert code == ExitCode.OK  # a warning, not an error
    assert listing(out)["backend.api_key"] == ("***", f"backend.api_key_file {key_file}")
    warning = (
        f"caired check-config: warning: backend.api_key (from backend.api_key_file {key_file}): "
        f"{key_file} is readable by others (mode 644); chmod 600 it\n"
    )
    assert (warning in err) == (mode == 0o644), err
    assert SECRET not in out + err


def test_key_in_a_world_readable_config_draws_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = good_config(tmp_path)
    path.chmod(0o644)
    code, _, err = run(capsys, "--config", str(path))
    assert code == ExitCode.OK
    assert f"warning: backend.api_key (from file {path}): the API key is in {path}, which everyone can read" in err
    path.chmod(0o640)
    assert run(capsys, "--config", str(path))[2] == ""


def test_no_key_draws_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--config", str(good_config(tmp_path, api_key="")))
    assert code == ExitCode.OK
    assert listing(out)["backend.api_key"] == ("''", f"file {tmp_path / 'caired.toml'}")
    assert err.startswith("caired check-config: warning: no API key is set")
    assert "the backend will reject" in err


def test_url_without_ws_path_draws_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, good_config(tmp_path).read_text().replace("/ws/", "/"))
    code, _, err = run(capsys, "--config", str(path))
    assert code == ExitCode.OK
    assert err == (
        f"caired check-config: warning: backend.url (from file {path}): ws://127.0.0.1:8003/ does not end in /ws/; "
        "the backend serves ws://HOST:PORT/ws/\n"
    )


def test_malformed_url_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, good_config(tmp_path).read_text().replace("ws://127.0.0.1:8003", "http://x:99999"))
    code, _, err = run(capsys, "--config", str(path))
    assert code == ExitCode.CONFIG
    assert err.startswith(f"caired check-config: backend.url (from file {path}): must be a ws:// or wss:// URL")


def test_a_spool_on_an_nfs_mount_with_local_only_locks_is_a_problem(tmp_path: Path) -> None:
    """The daemon would refuse it at start (Spool.prepare); check-config says so beforehand."""
    share = tmp_path.resolve() / "share"
    (share / "spool").mkdir(parents=True)
    table = tmp_path / "mountinfo"
    table.write_text(
        "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"
        f"2 1 0:40 / {share} rw,relatime - nfs4 server:/export rw,vers=4.2,local_lock=all,addr=10.0.0.1\n"
    )
    problem = check_config._spool_problem(share / "spool", table)
    assert problem is not None and "local_lock=all" in problem and "remount it without nolock" in problem
    table.write_text(table.read_text().replace("local_lock=all", "local_lock=none"))
    assert check_config._spool_problem(share / "spool", table) is None


def test_spool_and_log_file_flags_are_checked_as_run_would_take_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "afile").write_text("")
    spool, log_file = tmp_path / "afile" / "spool", tmp_path / "logs" / "caired.jsonl"
    code, out, err = run(capsys, "--config", str(good_config(tmp_path)), "--spool", str(spool),
                         "--log-file", str(log_file))
    assert code == ExitCode.CONFIG
    rows = listing(out)
    assert rows["spool.dir"] == (f'"{spool}"', "flag --spool")
    assert rows["log.file"] == (f'"{log_file}"', "flag --log-file")
    assert err == (f"caired check-config: spool.dir (from flag --spool): cannot create {spool}: "
                   f"{tmp_path / 'afile'} is not a folder\n")


# --- a credentials directory the service user cannot read ------------------------------------------


def check_config_in_child(*argv: str) -> tuple[int, str, str]:
    """``caired check-config ARGV`` in this (forked) process, its output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["check-config", *argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A fresh folder other users can get into, unlike tmp_path (root checks as nobody)."""
    with users.reachable_tmp() as path:
        yield path


def test_an_unreadable_credentials_directory_is_one_config_error(
    shared_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$CREDENTIALS_DIRECTORY 0700 root, as a misconfigured unit gives it: exit 78, one line, no traceback."""
    credentials = shared_tmp / "credentials"
    credentials.mkdir()
    (credentials / "api_key").write_text(SECRET)
    credentials.chmod(0o700)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    path = good_config(shared_tmp, api_key="")
    path.chmod(0o644)
    if users.IS_ROOT:  # root passes through any mode: check as nobody, who cannot get in
        nobody = users.User.named("nobody")
        code, out, err = users.run_as(nobody, check_config_in_child, "--config", str(path))
        uid = nobody.uid
    else:
        credentials.chmod(0o000)
        try:
            code, out, err = check_config_in_child("--config", str(path))
        finally:
            credentials.chmod(0o700)
        uid = os.geteuid()

    assert code == ExitCode.CONFIG
    assert out == ""
    assert err == (
        f"caired check-config: backend.api_key (from env CREDENTIALS_DIRECTORY): cannot read {credentials}/api_key: "
        f"Permission denied (uid {uid} cannot get into {credentials}; systemd makes it for the unit's User=, "
        "so run caired as that user)\n"
    )


# --- a deployed service: the checks of caired.deploy, given the unit -------------------------------

SHIPPED_UNIT = Path(__file__).resolve().parent.parent / "systemd" / "caired.service"


@attrs.define
class Deployment:
    """A deployment in tmp_path as the README makes it, for the user running the tests: the shipped
    unit with its paths moved here (and PrivateTmp= left out, since tmp_path is under /tmp)."""

    root: Path
    unit: Path
    config: Path
    key: Path
    spool: Path
    program: Path
    logs: str  # LogsDirectory=, under /var/log: made by systemd at the first start

    def write_unit(self, **replace: str) -> None:
        user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
        text = SHIPPED_UNIT.read_text()
        for old, new in {
            "ExecStart=/opt/caired/bin/caired run --config /etc/caired/caired.toml":
                f"ExecStart={self.program} run --config {self.config}",
            "LoadCredential=api_key:/etc/caired/api_key": f"LoadCredential=api_key:{self.key}",
            "ReadWritePaths=/var/lib/caired": f"ReadWritePaths={self.spool}",
            "RequiresMountsFor=/var/lib/caired": f"RequiresMountsFor={self.spool}",
            "User=caired": f"User={user}",
            "Group=caired": f"Group={group}",
            "SupplementaryGroups=video": "",
            "PrivateTmp=yes": "",
            "LogsDirectory=caired": f"LogsDirectory={self.logs}",
            **replace,
        }.items():
            assert text.count(old) == 1, old
            text = text.replace(old, new)
        self.unit.write_text(text)

    def run(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
        return run(capsys, "--config", str(self.config), "--unit", str(self.unit), *argv)


@pytest.fixture
def deployment(tmp_path: Path) -> Deployment:
    root = tmp_path / "deployed"
    program = root / "opt" / "caired" / "bin" / "caired"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")  # what runs it does not matter, only that the service reaches it
    program.chmod(0o755)
    spool = root / "var" / "lib" / "caired"
    spool.mkdir(parents=True, mode=0o750)
    spool.chmod(0o750)
    for name, mode in permissions.FOLDER_MODES.items():
        (spool / name).mkdir()
        (spool / name).chmod(mode)
    key = root / "etc" / "caired" / "api_key"
    key.parent.mkdir(parents=True)
    key.write_text(SECRET + "\n")
    key.chmod(0o600)
    logs = f"caired-test-{uuid.uuid4().hex[:12]}"
    assert not (Path("/var/log") / logs).exists()
    config = key.parent / "caired.toml"
    config.write_text(f'[spool]\ndir = "{spool}"\n[log]\nfile = "/var/log/{logs}/caired.jsonl"\n')
    config.chmod(0o644)
    made = Deployment(root=root, unit=root / "caired.service", config=config, key=key, spool=spool,
                      program=program, logs=logs)
    made.write_unit()
    return made


def test_the_key_is_read_where_the_units_load_credential_takes_it(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = deployment.run(capsys)
    assert code == ExitCode.OK, err
    assert listing(out)["backend.api_key"] == ("***", f"credential {deployment.key} (LoadCredential= in "
                                                      f"{deployment.unit})")
    assert "no API key" not in err
    assert SECRET not in out + err


def test_a_missing_credential_file_is_a_problem(deployment: Deployment, capsys: pytest.CaptureFixture[str]) -> None:
    deployment.key.unlink()
    code, _, err = deployment.run(capsys)
    assert code == ExitCode.CONFIG
    assert (
        f"caired check-config: backend.api_key (from credential {deployment.key} (LoadCredential= in "
        f"{deployment.unit})): {deployment.key} does not exist, so the service would fail to start "
        f"(status 243/CREDENTIALS): put the key there (install -m 0600 /dev/stdin {deployment.key}) or remove "
        f"LoadCredential=api_key:{deployment.key} from {deployment.unit}\n"
    ) in err


def test_an_unreadable_credential_file_is_a_note_not_a_missing_key(
    deployment: Deployment, shared_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """'sudo -u caired caired check-config': the key is root's, as it should be."""
    key = shared_tmp / "api_key"
    key.write_text(SECRET)
    key.chmod(0o600)
    deployment.write_unit(**{"LoadCredential=api_key:/etc/caired/api_key": f"LoadCredential=api_key:{key}"})
    config = shared_tmp / "caired.toml"
    config.write_text("")
    config.chmod(0o644)

    unit, loaded = deploy.Unit.load(deployment.unit), Config.load(path=config, env={})

    def found() -> tuple[str, list[str]]:
        cfg, credential = deploy.with_credential(loaded, unit, {})
        assert credential is not None and credential.key is None
        return cfg.sources["backend.api_key"], check_config._key_warnings(cfg)

    if users.IS_ROOT:
        source, warnings = users.run_as(users.User.named("nobody"), found)
    else:
        key.chmod(0o000)
        source, warnings = found()
    assert source == f"credential {key} (LoadCredential= in {deployment.unit})"
    assert warnings == []  # not "no API key is set"


@pytest.mark.parametrize("store", [0, 2])
def test_a_credential_named_without_a_path_is_found_in_the_credential_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: int
) -> None:
    stores = tuple(tmp_path / name for name in ("etc", "run", "usr"))
    monkeypatch.setattr(deploy, "CREDSTORES", stores)
    stores[store].mkdir()
    (stores[store] / "api_key").write_text("from-the-store\n")
    unit = tmp_path / "caired.service"
    unit.write_text("[Service]\nLoadCredential=api_key\n")
    found = deploy.credential(deploy.Unit.load(unit))
    assert found == deploy.Credential(setting="LoadCredential=api_key", path=stores[store] / "api_key",
                                      key="from-the-store")


def test_set_credential_stands_in_for_a_missing_load_credential(tmp_path: Path) -> None:
    unit = tmp_path / "caired.service"
    unit.write_text(f"[Service]\nLoadCredential=api_key:{tmp_path / 'gone'}\nSetCredential=api_key:fallback\n")
    found = deploy.credential(deploy.Unit.load(unit))
    assert found is not None and (found.key, found.problem) == ("fallback", None)
    unit.write_text("[Service]\nLoadCredentialEncrypted=api_key:/etc/credstore.encrypted/api_key\n")
    found = deploy.credential(deploy.Unit.load(unit))
    assert found is not None and found.key is None and found.problem is None
    assert found.note is not None and "encrypted" in found.note


def test_inside_the_service_the_credentials_directory_wins(deployment: Deployment) -> None:
    unit = deploy.Unit.load(deployment.unit)
    cfg = Config.load(env={})
    assert deploy.with_credential(cfg, unit, {"CREDENTIALS_DIRECTORY": "/run/credentials/caired.service"}) == (
        cfg, None
    )


def test_the_log_folder_systemd_makes_at_the_first_start_is_a_note(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = deployment.run(capsys)
    assert code == ExitCode.OK
    assert (
        f"caired check-config: note: log.file (from file {deployment.config}): /var/log/{deployment.logs} will be "
        f"created by systemd at the service's first start (LogsDirectory={deployment.logs})\n"
    ) in err
    # Without LogsDirectory=, nobody makes it, and /var/log is read-only to the service.
    deployment.write_unit(**{"LogsDirectory=caired": ""})
    code, _, err = deployment.run(capsys)
    assert code == ExitCode.CONFIG
    assert (
        f"log.file (from file {deployment.config}): /var/log/{deployment.logs} is read-only for the service "
        "(ProtectSystem=strict); use LogsDirectory= or ReadWritePaths="
    ) in err


def test_a_spool_the_unit_lists_in_read_write_paths_must_exist(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.rmtree(deployment.spool)
    code, _, err = deployment.run(capsys)
    assert code == ExitCode.CONFIG
    user = pwd.getpwuid(os.getuid()).pw_name
    assert (
        f"caired check-config: spool.dir (from file {deployment.config}): {deployment.spool} does not exist, and the "
        "unit lists it in ReadWritePaths=, so the service would fail to start (status 226/NAMESPACE); create it: "
        f"install -d -o {user} -g caired-drop -m 0750 {deployment.spool}\n"
    ) in err


def test_a_spool_outside_the_writable_paths_is_read_only(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    deployment.write_unit(**{"ReadWritePaths=/var/lib/caired": "ReadWritePaths=/srv/elsewhere"})
    code, _, err = deployment.run(capsys)
    assert code == ExitCode.CONFIG
    assert (
        f"spool.dir (from file {deployment.config}): {deployment.spool} is read-only for the service "
        f"(ProtectSystem=strict in {deployment.unit}); add ReadWritePaths={deployment.spool} to the unit"
    ) in err


def test_a_missing_incoming_folder_needs_root_under_restrict_suid_sgid(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    (deployment.spool / "incoming").rmdir()
    code, _, err = deployment.run(capsys)
    assert code == ExitCode.CONFIG
    user, group = pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name
    assert (
        f"spool.dir (from file {deployment.config}): {deployment.spool}/incoming does not exist, and caired cannot "
        "make it with its setgid bit under the unit's RestrictSUIDSGID=yes; create it: "
        f"install -d -o {user} -g {group} -m 3777 {deployment.spool}/incoming\n"
    ) in err


def fake_python(root: Path, *, home: Path) -> Path:
    """A venv in ``root`` whose python links to ``home``/python3.11, as 'python3 -m venv' makes it;
    returns the venv's caired script."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "python3.11").write_text("#!/bin/sh\n")
    (home / "python3.11").chmod(0o755)
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python3").symlink_to(home / "python3.11")
    (root / "pyvenv.cfg").write_text(f"home = {home}\ninclude-system-site-packages = false\n")
    script = root / "bin" / "caired"
    script.write_text(f"#!{root / 'bin' / 'python3'}\nimport sys\n")
    script.chmod(0o755)
    return script


def test_a_venv_whose_python_the_sandbox_hides_is_a_problem(
    deployment: Deployment, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """pyenv's Python under a home folder: ProtectHome=yes hides /home and /root (here: a folder
    named by InaccessiblePaths=, which hides it the same way)."""
    home = tmp_path / "home" / "me" / ".pyenv" / "versions" / "3.11.9" / "bin"
    script = fake_python(tmp_path / "opt" / "caired", home=home)
    deployment.program = script
    deployment.write_unit(ProtectHome="InaccessiblePaths=" + str(tmp_path / "home") + "\nProtectHome")
    code, _, err = deployment.run(capsys)
    assert code == ExitCode.CONFIG
    python = f"{tmp_path}/opt/caired/bin/python3 -> {home}/python3.11"
    assert (
        f"caired check-config: the service cannot run {script}: its Python {python}: {home}/python3.11 is under "
        f"{tmp_path}/home, which the unit's InaccessiblePaths={tmp_path}/home hides from the service; make the venv "
        "from a Python outside home folders and /tmp"
    ) in err
    deployment.write_unit()  # without InaccessiblePaths=: fine
    code, _, err = deployment.run(capsys)
    assert code == ExitCode.OK, err


def test_protect_home_and_private_tmp_hide_homes_and_tmp(tmp_path: Path) -> None:
    unit_file = tmp_path / "u.service"
    unit_file.write_text("[Service]\nProtectHome=yes\nPrivateTmp=yes\nInaccessiblePaths=-/srv/secret\n")
    hidden = dict(deploy.Unit.load(unit_file).hidden_paths())
    assert hidden == {
        Path("/home"): "ProtectHome=yes", Path("/root"): "ProtectHome=yes", Path("/run/user"): "ProtectHome=yes",
        Path("/tmp"): "PrivateTmp=yes", Path("/var/tmp"): "PrivateTmp=yes",
        Path("/srv/secret"): "InaccessiblePaths=-/srv/secret",
    }
    unit_file.write_text("[Service]\nProtectHome=read-only\n")
    assert deploy.Unit.load(unit_file).hidden_paths() == []  # readable: a venv there still runs


def test_a_python_behind_a_closed_home_is_a_problem(shared_tmp: Path) -> None:
    """Without ProtectHome=: the home folder's own mode keeps the service's user out."""
    home = shared_tmp / "home" / "me"
    script = fake_python(shared_tmp / "opt" / "caired", home=home / ".pyenv" / "bin")
    home.chmod(0o700)
    unit_file = shared_tmp / "caired.service"
    unit_file.write_text(f"[Service]\nExecStart={script} run\n")
    stranger = permissions.Principal(name="svc", uid=54321, gid=54321, gids=frozenset({54321}))
    report = deploy.check(Config.load(env={}), deploy.Unit.load(unit_file), None, service=stranger)
    [problem] = [p for p in report.problems if "cannot run" in p]
    assert f"svc cannot pass through {home} ({pwd.getpwuid(os.getuid()).pw_name}:" in problem
    assert " 0700) to reach " in problem


def test_the_installed_unit_applies_when_it_runs_the_daemon_on_this_config(
    deployment: Deployment, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    system = tmp_path / "systemd" / "system"
    system.mkdir(parents=True)
    monkeypatch.setattr(deploy, "UNIT_DIRS", (system, tmp_path / "lib"))
    deployment.unit = system / "caired.service"
    deployment.write_unit()
    code, out, err = run(capsys, "--config", str(deployment.config))
    assert code == ExitCode.OK, err
    assert listing(out)["backend.api_key"] == ("***", f"credential {deployment.key} (LoadCredential= in "
                                                      f"{deployment.unit})")
    # Another config: the unit is not about it.
    other = good_config(tmp_path, api_key="")
    code, out, err = run(capsys, "--config", str(other))
    assert listing(out)["backend.api_key"] == ("''", f"file {other}")
    assert "no API key is set" in err


def test_an_unreadable_unit_is_one_config_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--config", str(good_config(tmp_path)), "--unit", str(tmp_path / "nope.service"))
    assert code == ExitCode.CONFIG
    assert out == ""
    assert err == (
        f"caired check-config: --unit (from {tmp_path}/nope.service): cannot be read: No such file or directory\n"
    )


def test_unit_files_combine_as_systemd_combines_them(tmp_path: Path) -> None:
    unit_file = tmp_path / "caired.service"
    unit_file.write_text(
        "[Service]\n"
        "# a comment\n"
        "ExecStart=-/opt/caired/bin/caired run \\\n"
        "    --config=/etc/caired/other.toml\n"
        "ReadWritePaths=/a /b\n"
        "LoadCredential=api_key:/first\n"
        "User=caired\n"
    )
    dropins = tmp_path / "caired.service.d"
    dropins.mkdir()
    (dropins / "20-key.conf").write_text("[Service]\nLoadCredential=\nLoadCredential=api_key:/second\n")
    (dropins / "10-paths.conf").write_text("[Service]\nReadWritePaths=-/c\nUser=\nUser=other\n")
    unit = deploy.Unit.load(unit_file)
    assert unit.exec_start == ["/opt/caired/bin/caired", "run", "--config=/etc/caired/other.toml"]
    assert unit.config_path == Path("/etc/caired/other.toml")
    assert unit.words("ReadWritePaths") == ["/a", "/b", "-/c"]
    assert unit.writable_paths() == [Path("/a"), Path("/b"), Path("/c")]
    assert unit.settings["LoadCredential"] == ("api_key:/second",)  # the empty assignment cleared /first
    assert unit.last("User") == "other"


def test_a_unit_user_that_does_not_exist_is_a_problem(
    deployment: Deployment, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = f"nouser{uuid.uuid4().hex[:8]}"
    deployment.write_unit(**{"User=caired": f"User={missing}"})
    code, _, err = deployment.run(capsys)
    assert code == ExitCode.CONFIG
    assert (
        f"caired check-config: the unit's User={missing} does not exist, so the service cannot start; create it "
        "as the README, 'Deploying as a service' says: useradd --system --user-group --home-dir /var/lib/caired "
        f"--no-create-home --shell /usr/sbin/nologin {missing}\n"
    ) in err
    deployment.write_unit(**{"SupplementaryGroups=video": f"SupplementaryGroups={missing}"})
    code, _, err = deployment.run(capsys)
    assert code == ExitCode.CONFIG
    assert f"the unit's SupplementaryGroups={missing} names no group, so the service cannot start" in err
