"""caired check-config through caired.cli.main: the listing, its sources, the checks, the exit codes."""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import caired.logging
import caired.wire  # noqa: F401 - imported before a test forks a child that cannot import
from caired import cli
from caired.commands import check_config
from caired.config import env_names, iter_fields
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
def shared_tmp(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, or (as root, who checks as nobody) a folder nobody can get into as well."""
    if not users.IS_ROOT:
        yield tmp_path
        return
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
