"""SIGHUP reloads the key, the URL, the log level and the retry settings; a session in flight
finishes with what it started with; a reload that fails validation changes nothing."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path

import structlog
import structlog.testing

from caired import logging as clog
from caired.config import Config
from caired.reload import Settings, reload
from tests.conftest import BackendFactory, cli_env
from tests.test_daemon import child, drop, log_lines, names_in, ready, stop, until

KEY_A, KEY_B = "key-A-0123456789", "key-B-9876543210"


def write_config(path: Path, spool: Path, url: str, key_file: Path, *, extra: str = "") -> None:
    path.write_text(
        f'[backend]\nurl = "{url}"\napi_key_file = "{key_file}"\n'
        f'[stream]\nfps = 10.0\n'
        f'[spool]\ndir = "{spool}"\nsettle_seconds = 0.3\nrescan_seconds = 1.0\n'
        f'[retry]\ninitial = 0.05\nmax = 0.2\n'
        f'[log]\nformat = "json"\n{extra}'
    )


async def test_a_reload_mid_session_reaches_the_next_connection_only(
    backend: BackendFactory, tmp_path: Path
) -> None:
    a = await backend(api_key=KEY_A, estimate=False)
    b = await backend(api_key=KEY_B, estimate=False)
    spool, out, cfg = tmp_path / "spool", tmp_path / "out.jsonl", tmp_path / "caired.toml"
    key_a, key_b = tmp_path / "key-a", tmp_path / "key-b"
    key_a.write_text(KEY_A)
    key_b.write_text(KEY_B)
    for key in (key_a, key_b):
        key.chmod(0o600)
    write_config(cfg, spool, f"ws://127.0.0.1:{a.port}/ws/", key_a)
    drop(spool, "first", 0, 30)  # 3 s at 10 fps
    async with child(cli_env(CAIRED_CONFIG=str(cfg)), out) as proc:
        await ready(out, proc)
        await until(lambda: a.sessions and len(a.sessions[0].frames) >= 3, "the first session streaming to A")
        write_config(cfg, spool, f"ws://127.0.0.1:{b.port}/ws/", key_b,
                     extra='level = "warning"\n')
        proc.send_signal(signal.SIGHUP)
        await until(lambda: any(line["event"] == "config_reloaded" for line in log_lines(out)), "the reload")
        await until(lambda: names_in(spool, "done") == ["first"], "the first session done")
        assert [s.finished for s in a.sessions] == [True] and not b.sessions  # it finished on A, as it began

        drop(spool, "second", 1, 5)
        await until(lambda: names_in(spool, "done") == ["first", "second"], "the second session done")
        assert len(a.sessions) == 1 and [s.finished for s in b.sessions] == [True]  # the new key, the new URL

        cfg.write_text("[backend\nurl = broken")  # invalid: nothing changes
        proc.send_signal(signal.SIGHUP)
        await until(lambda: any(line["event"] == "config_reload_failed" for line in log_lines(out)),
                    "the failed reload")
        drop(spool, "third", 2, 5)
        await until(lambda: names_in(spool, "done") == ["first", "second", "third"], "the third session done")
        assert len(a.sessions) == 1 and len(b.sessions) == 2
        assert (await stop(proc))[0] == 0

    lines = log_lines(out)
    [reloaded] = [line for line in lines if line["event"] == "config_reloaded"]
    assert set(reloaded["changed"]) == {"backend.url", "backend.api_key", "backend.api_key_file", "log.level"}
    [failed] = [line for line in lines if line["event"] == "config_reload_failed"]
    assert "is not valid TOML" in failed["reason"] and failed["level"] == "error"
    after = lines[lines.index(reloaded) + 1:]
    assert not [line for line in after if line["level"] in ("info", "debug")]  # log.level = "warning" applied
    text = out.read_text()
    assert KEY_A not in text and KEY_B not in text


async def test_a_reload_applies_backend_retry_and_level_and_keeps_the_rest() -> None:
    out = io.StringIO()
    old = Config.load(env={"CAIRED_LOG_FORMAT": "json", "API_KEY": KEY_A, "CAIRED_SPOOL_MAX_SESSIONS": "2"})
    clog.configure(old, stdout=out)
    settings = Settings(old)
    new = Config.load(env={"CAIRED_LOG_FORMAT": "json", "API_KEY": KEY_B, "CAIRED_SPOOL_MAX_SESSIONS": "5",
                           "CAIRED_RETRY_MAX": "7", "CAIRED_LOG_LEVEL": "warning",
                           "BACKEND_WS_BASE": "wss://backend.example:8003/ws/"})

    changed = await reload(settings, lambda: new)

    assert changed == ["backend.url", "backend.api_key", "retry.max", "log.level"]
    cfg = settings.cfg
    assert (cfg.backend.url, cfg.api_key(), cfg.retry.max, cfg.log.level) == (
        "wss://backend.example:8003/ws/", KEY_B, 7.0, "warning")
    assert cfg.spool.max_sessions == 2  # needs a restart: kept
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    partial = [e for e in events if e["event"] == "config_reload_partial"]
    assert partial and partial[0]["needs_restart"] == ["spool.max_sessions"]
    structlog.get_logger().info("not_shown")
    structlog.get_logger().warning("shown", key=f"{KEY_A} {KEY_B}")
    tail = out.getvalue().splitlines()[-1]
    assert '"event": "shown"' in tail and KEY_A not in tail and KEY_B not in tail  # both keys redacted


async def test_a_failing_reload_changes_nothing() -> None:
    out = io.StringIO()
    old = Config.load(env={"CAIRED_LOG_FORMAT": "json", "API_KEY": KEY_A})
    clog.configure(old, stdout=out)
    settings = Settings(old)

    def broken() -> Config:
        return Config.load(env={"CAIRED_RETRY_MAX": "soon", "CAIRED_STREAM_FPS": "-3"})

    assert await reload(settings, broken) is None
    assert settings.cfg is old
    [line] = [json.loads(line) for line in out.getvalue().splitlines()]
    assert line["event"] == "config_reload_failed"
    assert "retry.max (from env CAIRED_RETRY_MAX): must be a number" in line["reason"]
    assert "stream.fps" in line["reason"]


async def test_a_reload_that_cannot_read_the_file_keeps_the_configuration(tmp_path: Path) -> None:
    """A file that is not UTF-8 (or cannot be read) raised past the reload and ended the daemon."""
    path = tmp_path / "caired.toml"
    path.write_bytes(b"[stream]\nfps = 30\n")
    old = Config.load(path=str(path))
    settings = Settings(old)
    path.write_bytes(b"[stream]\nfps = \xff\n")
    with structlog.testing.capture_logs() as logs:
        assert await reload(settings, lambda: Config.load(path=str(path))) is None
    assert settings.cfg is old
    [failed] = [e for e in logs if e["event"] == "config_reload_failed"]
    assert "not UTF-8" in failed["reason"]
