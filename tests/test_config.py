"""The configuration tree: layers, the original client's variables, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from caired.config import Config, Secret
from caired.errors import ConfigErrors


def test_defaults() -> None:
    cfg = Config.load(env={})
    assert cfg.backend.url == "ws://localhost:8003/ws/"
    assert cfg.stream.fps == 30.0 and cfg.stream.format == "jpeg" and cfg.stream.jpeg_quality == 90
    assert cfg.backend.finish_timeout == 30.0 and cfg.stream.advanced is True
    assert set(cfg.sources.values()) == {"default"}


def test_the_original_clients_variables_keep_their_meaning() -> None:
    cfg = Config.load(env={
        "BACKEND_WS_BASE": "wss://b.example:8003/ws/", "API_KEY": "k", "IMAGES_DIR": "/data/x", "FPS": "15",
        "FRAME_FORMAT": "raw", "ADVANCED": "0", "CONNECT_TIMEOUT_SEC": "3.5", "SEND_QUEUE_MAXSIZE": "16",
        "PREFILL_QUEUE": "4",
    })
    assert cfg.backend.url == "wss://b.example:8003/ws/" and cfg.api_key() == "k"
    assert cfg.stream.images_dir == "/data/x" and cfg.stream.fps == 15.0 and cfg.stream.format == "raw"
    assert cfg.stream.advanced is False and cfg.backend.connect_timeout == 3.5
    assert cfg.stream.send_queue == 16 and cfg.stream.prefill == 4
    assert cfg.sources["stream.fps"] == "env FPS"
    assert Config.load(env={"ADVANCED": "false"}).stream.advanced is False


def test_layers_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[stream]\nfps = 10\njpeg_quality = 70\nformat = "raw"\n[backend]\nfinish_timeout = 9\n')
    cfg = Config.load(path=path, env={"FPS": "20", "FRAME_FORMAT": "jpeg"},
                      flags={"stream.fps": (25.0, "flag --fps")})
    assert cfg.stream.fps == 25.0 and cfg.sources["stream.fps"] == "flag --fps"
    assert cfg.stream.format == "jpeg" and cfg.sources["stream.format"] == "env FRAME_FORMAT"
    assert cfg.stream.jpeg_quality == 70 and cfg.sources["stream.jpeg_quality"] == f"file {path}"
    assert cfg.backend.finish_timeout == 9.0


def test_caired_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[spool]\nmax_sessions = 3\n")
    assert Config.load(env={"CAIRED_CONFIG": str(path)}).spool.max_sessions == 3


def test_caired_names_win_over_the_original_names() -> None:
    cfg = Config.load(env={"FPS": "15", "CAIRED_STREAM_FPS": "12"})
    assert cfg.stream.fps == 12 and cfg.sources["stream.fps"] == "env CAIRED_STREAM_FPS"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"FPS": "fast"}, "stream.fps (from env FPS): must be a number (got 'fast')"),
        ({"FRAME_FORMAT": "png"}, "stream.format (from env FRAME_FORMAT): must be one of 'jpeg', 'raw'"),
        ({"ADVANCED": "maybe"}, "stream.advanced (from env ADVANCED): must be true or false"),
        ({"BACKEND_WS_BASE": "http://x/ws/"}, "backend.url (from env BACKEND_WS_BASE): must be a ws:// or wss://"),
        ({"CAIRED_STREAM_JPEG_QUALITY": "101"}, "stream.jpeg_quality (from env CAIRED_STREAM_JPEG_QUALITY): must be"),
        ({"SEND_QUEUE_MAXSIZE": "2", "PREFILL_QUEUE": "3"}, "must not exceed stream.send_queue"),
    ],
)
def test_bad_values_name_the_key_the_source_and_what_is_allowed(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigErrors) as caught:
        Config.load(env=env)
    assert expected in str(caught.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[stream]\nfsp = 10\n[nope]\nx = 1\n")
    with pytest.raises(ConfigErrors) as caught:
        Config.load(path=path, env={})
    lines = str(caught.value).splitlines()
    assert f"stream.fsp (from file {path}): unknown key; did you mean stream.fps?" in lines
    assert any(line.startswith(f"nope (from file {path}): unknown section (known: backend, ") for line in lines)
    path.write_text("[stream\n")
    with pytest.raises(ConfigErrors, match="is not valid TOML"):
        Config.load(path=path, env={})
    with pytest.raises(ConfigErrors, match=r"^--config \(from .*missing.toml\): no such file$"):
        Config.load(path=tmp_path / "missing.toml", env={})


def test_an_error_about_the_file_caired_config_names_is_labelled_caired_config(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigErrors) as caught:
        Config.load(env={"CAIRED_CONFIG": str(missing)})
    assert str(caught.value) == f"CAIRED_CONFIG (from {missing}): no such file"
    (tmp_path / "bad.toml").write_text("[stream\n")
    with pytest.raises(ConfigErrors, match=r"^CAIRED_CONFIG \(from .*bad.toml\): is not valid TOML"):
        Config.load(env={"CAIRED_CONFIG": str(tmp_path / "bad.toml")})


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("[stream]\nfsp = 10\n", "stream.fsp (from file {path}): unknown key; did you mean stream.fps?"),
        ("[stream]\nduration = 10\n", "stream.duration (from file {path}): unknown key; did you mean record.duration?"),
        ("[spool]\nsettle = 1\n", "spool.settle (from file {path}): unknown key; did you mean spool.settle_seconds?"),
        ("[stream]\nupload_bandwidth_kbps = 30\n", "stream.upload_bandwidth_kbps (from file {path}): unknown key"),
        ("[streem]\nfps = 30\n", "streem (from file {path}): unknown section; did you mean stream? (known: backend, "
                                   "stream, spool, retry, log, camera, record, metrics, retention)"),
    ],
)
def test_an_unknown_key_suggests_the_closest_one(tmp_path: Path, body: str, problem: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(body)
    with pytest.raises(ConfigErrors) as caught:
        Config.load(path=path, env={})
    assert str(caught.value) == problem.format(path=path)


def test_caired_variables_that_name_no_key_are_warned_about_with_the_closest_key() -> None:
    cfg = Config.load(env={"CAIRED_STREAM_FPSS": "12", "CAIRED_CONFIGG": "/etc/caired.toml", "CAIRED_ZZZ": "1",
                           "CAIRED_STREAM_FPS": "15", "CAIRED_CONFIG": "", "FPSS": "3"})
    assert cfg.stream.fps == 15.0  # the misspelt one is ignored, the right one counts
    assert cfg.warnings == (
        "the environment variable CAIRED_CONFIGG names no configuration key and is ignored; "
        "did you mean CAIRED_CONFIG?",
        "the environment variable CAIRED_STREAM_FPSS names no configuration key and is ignored; "
        "did you mean CAIRED_STREAM_FPS (stream.fps)?",
        "the environment variable CAIRED_ZZZ names no configuration key and is ignored "
        "(a key's variable is CAIRED_<SECTION>_<KEY>)",
    )
    assert Config.load(env={"CAIRED_CONFIG": "", "CAIRED_SPOOL_MAX_SESSIONS": "3"}).warnings == ()


def test_key_from_a_file_or_a_credential(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert Config.load(env={"API_KEY_FILE": str(key_file)}).api_key() == "from-file"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api_key").write_text("from-credential")
    cfg = Config.load(env={"API_KEY": "from-env", "CREDENTIALS_DIRECTORY": str(creds)})
    assert cfg.api_key() == "from-credential"
    assert cfg.sources["backend.api_key"].startswith("credential ")
    with pytest.raises(ConfigErrors, match="cannot read"):
        Config.load(env={"API_KEY_FILE": str(tmp_path / "nope")})


def test_the_key_never_shows_itself() -> None:
    cfg = Config.load(env={"API_KEY": "hunter2-secret"})
    for text in (str(cfg), repr(cfg), f"{cfg.backend.api_key}", str(cfg.backend), repr(Secret("hunter2-secret"))):
        assert "hunter2-secret" not in text
    with pytest.raises(ConfigErrors) as caught:
        Config.load(env={"API_KEY": "hunter2-secret", "BACKEND_WS_BASE": "ws://h/ws/?api_key=hunter2-secret"})
    assert "hunter2-secret" not in str(caught.value)


def test_one_bad_variable_is_one_line_but_every_bad_file_value_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors) as caught:
        Config.load(env={"FPS": "fast"})  # feeds stream.fps and camera.fps
    assert len(caught.value.errors) == 1
    path = tmp_path / "c.toml"
    path.write_text('[stream]\nfps = "fast"\njpeg_quality = "high"\n')
    with pytest.raises(ConfigErrors) as caught:
        Config.load(path=path, env={})
    assert [e.key for e in caught.value.errors] == ["stream.fps", "stream.jpeg_quality"]
