"""The configuration: one frozen attrs tree.

Values come from, highest first: command-line flags, environment variables, a TOML
file (``--config PATH`` or ``CAIRED_CONFIG``), defaults. Every field declares its
environment names and a one-line help in its metadata, so loading, error messages,
``caired check-config`` and ``etc/caired.toml`` all read the same table.

Every environment variable of the original client keeps its meaning
(``BACKEND_WS_BASE``, ``API_KEY``, ``IMAGES_DIR``, ``FPS``, ...); each key also has a
``CAIRED_<SECTION>_<KEY>`` form, which wins over the original name. A misspelt key gets a
"did you mean": an error in the file, a warning for a ``CAIRED_`` variable that names no key.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import tomllib
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import attrs

from caired.errors import ConfigError, ConfigErrors
from caired.protocol import redact_url

DEFAULT_URL: Final = "ws://localhost:8003/ws/"
CREDENTIAL_NAME: Final = "api_key"
# The documented CAIRED_ variables that are not a key's environment name.
NON_KEY_VARIABLES: Final = frozenset({"CAIRED_CONFIG"})
ENV_PREFIX: Final = "CAIRED_"
# The most pixels stream.max_frame_pixels may allow; also OpenCV's own limit (see caired.frames).
DECODER_PIXEL_LIMIT: Final = 1 << 28


class Secret(str):
    """A string that never shows itself: ``str()``, ``repr()`` and f-strings give ``***``.

    The real value is ``reveal()``; it is used only where it goes on the wire.
    """

    __slots__ = ()

    def __new__(cls, value: object = "") -> Secret:
        if isinstance(value, Secret):
            return value
        return super().__new__(cls, value)

    def reveal(self) -> str:
        return str.__getitem__(self, slice(None))

    def __repr__(self) -> str:
        return "'***'" if self.reveal() else "''"

    def __str__(self) -> str:
        return "***" if self.reveal() else ""

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


class Amount(str):
    """A disk amount as written: bytes (``1073741824``, ``500M``, ``2G``, ``1.5GiB``) or a share
    of the filesystem (``10%``); ``0`` means none. ``resolve(total)`` gives bytes."""

    __slots__ = ()

    def resolve(self, total: int) -> int:
        """Bytes this amount means on a filesystem of ``total`` bytes."""
        number, percent = parse_amount(self)
        return int(total * number / 100) if percent else int(number)


_UNITS: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_AMOUNT: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(?:(%)|([KMGT]?)(?:I?B)?)", re.IGNORECASE)


def parse_amount(text: str) -> tuple[float, bool]:
    """(number, is_percent) of a disk amount; ValueError says what is allowed."""
    match = _AMOUNT.fullmatch(text.strip())
    if match is None or (match[2] and float(match[1]) > 100):
        raise ValueError("must be bytes (e.g. 500M, 2G) or a percentage of the filesystem up to 100% (e.g. 10%)")
    if match[2]:
        return float(match[1]), True
    return float(match[1]) * _UNITS[match[3].upper()], False


def _amount(_inst: object, attr: attrs.Attribute[Any], value: Amount) -> None:
    parse_amount(value)


def _meta(help: str, *env: str) -> dict[str, Any]:
    return {"help": help, "env": env}


def _positive(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError("must be greater than 0")


def _non_negative(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError("must be 0 or more")


def _between(lo: float, hi: float) -> Callable[[object, attrs.Attribute[Any], float], None]:
    def check(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo:g} and {hi:g}")

    return check


def _ws_url(_inst: object, attr: attrs.Attribute[Any], value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError("must be a ws:// or wss:// URL with a host, e.g. ws://HOST:8003/ws/")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ValueError("has a malformed port") from None
    if "api_key=" in parts.query:
        raise ValueError("must not carry api_key=; set backend.api_key (or API_KEY) instead")


@attrs.frozen(kw_only=True)
class BackendConfig:
    url: str = attrs.field(
        default=DEFAULT_URL,
        validator=_ws_url,
        metadata=_meta("WebSocket base URL of the backend (the /ws/ path matters)", "BACKEND_WS_BASE"),
    )
    api_key: Secret = attrs.field(
        default=Secret(""),
        converter=Secret,
        metadata=_meta("API key; better kept in api_key_file or a systemd credential", "API_KEY"),
    )
    api_key_file: str = attrs.field(
        default="",
        metadata=_meta("file holding the API key (used when api_key is empty)", "API_KEY_FILE"),
    )
    auth: Literal["query", "header"] = attrs.field(
        default="query",
        metadata=_meta("'query' appends api_key=KEY to the URL; 'header' sends Authorization: Bearer"),
    )
    client: str = attrs.field(
        default="caired", metadata=_meta("value of the client= query parameter ('' sends none)")
    )
    connect_timeout: float = attrs.field(
        default=10.0,
        validator=_positive,
        metadata=_meta("seconds to open the connection (TCP, TLS, handshake)", "CONNECT_TIMEOUT_SEC"),
    )
    finish_timeout: float = attrs.field(
        default=30.0,
        validator=_positive,
        metadata=_meta("seconds to wait for 'finished' after the end message"),
    )
    heartbeat: float = attrs.field(
        default=5.0,
        validator=_non_negative,
        metadata=_meta("seconds between pings while waiting for answers (0 = off)"),
    )


@attrs.frozen(kw_only=True)
class StreamConfig:
    images_dir: str = attrs.field(
        default="images",
        metadata=_meta("folder 'caired stream' and 'caired record' use when none is given", "IMAGES_DIR"),
    )
    fps: float = attrs.field(
        default=30.0,
        validator=_between(0, 1000),
        metadata=_meta("frames per second on the wire (0 = unpaced)", "FPS"),
    )
    format: Literal["jpeg", "raw"] = attrs.field(
        default="jpeg",
        metadata=_meta("'jpeg' re-encodes each frame; 'raw' sends the PNG file untouched", "FRAME_FORMAT"),
    )
    jpeg_quality: int = attrs.field(
        default=90, validator=_between(1, 100), metadata=_meta("JPEG quality, 1-100", "JPEG_QUALITY")
    )
    advanced: bool = attrs.field(
        default=True,
        metadata=_meta("ask the backend for the continuous rPPG signal in its answers", "ADVANCED"),
    )
    send_queue: int = attrs.field(
        default=8,
        validator=_between(1, 256),
        metadata=_meta("encoded frames held ready ahead of the sender", "SEND_QUEUE_MAXSIZE"),
    )
    prefill: int = attrs.field(
        default=1,
        validator=_between(0, 256),
        metadata=_meta("frames encoded before the first is sent", "PREFILL_QUEUE"),
    )
    max_frame_bytes: int = attrs.field(
        default=32 * 1024 * 1024,
        validator=_between(64, 1 << 30),
        metadata=_meta("largest frame file read, in bytes; a larger one is skipped"),
    )
    max_frame_pixels: int = attrs.field(
        default=16_000_000,
        validator=_between(1, DECODER_PIXEL_LIMIT),
        metadata=_meta("largest frame in pixels (width x height, read from the PNG header before decoding)"),
    )

    def __attrs_post_init__(self) -> None:
        if self.prefill > self.send_queue:
            raise ValueError(
                f"stream.prefill ({self.prefill}) must not exceed stream.send_queue ({self.send_queue})"
            )


@attrs.frozen(kw_only=True)
class SpoolConfig:
    dir: str = attrs.field(default="/var/lib/caired", metadata=_meta("spool folder (incoming/ active/ done/ failed/)"))
    settle_seconds: float = attrs.field(
        default=5.0,
        validator=_non_negative,
        metadata=_meta("a dropped folder unchanged this long counts as complete"),
    )
    rescan_seconds: float = attrs.field(
        default=30.0,
        validator=_positive,
        metadata=_meta("periodic rescan, for lost events and network filesystems"),
    )
    max_sessions: int = attrs.field(
        default=2, validator=_between(1, 64), metadata=_meta("sessions streaming at once")
    )
    keep_frames: bool = attrs.field(
        default=True, metadata=_meta("keep the PNGs of done sessions (false keeps result.json only)")
    )
    max_crashes: int = attrs.field(
        default=3,
        validator=_between(0, 1000),
        metadata=_meta("a folder being streamed whenever caired died this often goes to failed/ (0 = never)"),
    )


@attrs.frozen(kw_only=True)
class RetryConfig:
    initial: float = attrs.field(default=1.0, validator=_positive, metadata=_meta("first backoff, seconds"))
    max: float = attrs.field(default=60.0, validator=_positive, metadata=_meta("longest backoff, seconds"))
    multiplier: float = attrs.field(
        default=2.0, validator=_between(1, 100), metadata=_meta("backoff growth per failed attempt")
    )
    attempts: int = attrs.field(
        default=5,
        validator=_non_negative,
        metadata=_meta("connection attempts of 'caired stream' before giving up (0 = no limit)"),
    )
    rejected_probe: float = attrs.field(
        default=300.0,
        validator=_positive,
        metadata=_meta("after a rejected key, the daemon tries again this rarely (seconds)"),
    )
    session_attempts: int = attrs.field(
        default=10,
        validator=_non_negative,
        metadata=_meta("a daemon session failing after the backend accepted it is tried this often (0 = no limit)"),
    )


@attrs.frozen(kw_only=True)
class LogConfig:
    file: str = attrs.field(default="", metadata=_meta("JSON log file, appended ('' = stdout only)"))
    level: Literal["debug", "info", "warning", "error"] = attrs.field(
        default="info", metadata=_meta("lowest level written")
    )
    format: Literal["auto", "json", "console"] = attrs.field(
        default="auto", metadata=_meta("stdout form: 'auto' is console on a terminal, JSON elsewhere")
    )


@attrs.frozen(kw_only=True)
class CameraConfig:
    enabled: bool = attrs.field(default=False, metadata=_meta("stream live camera sessions in the daemon"))
    device: str = attrs.field(
        default="0", metadata=_meta("camera index, /dev/videoN, or a video file", "CAMERA_INDEX")
    )
    width: int = attrs.field(default=640, validator=_between(16, 8192), metadata=_meta("capture width", "RES_WIDTH"))
    height: int = attrs.field(
        default=480, validator=_between(16, 8192), metadata=_meta("capture height", "RES_HEIGHT")
    )
    fps: float = attrs.field(
        default=30.0,
        validator=_between(0, 240),
        metadata=_meta("capture rate (0 = as fast as the device delivers)", "FPS"),
    )
    session_seconds: float = attrs.field(
        default=30.0, validator=_positive, metadata=_meta("one datapoint session per this much capture")
    )
    interval_seconds: float = attrs.field(
        default=0.0, validator=_non_negative, metadata=_meta("pause between camera sessions")
    )
    keep_frames: bool = attrs.field(
        default=False,
        metadata=_meta("keep the frames of camera sessions once delivered (false keeps result.json only)"),
    )


@attrs.frozen(kw_only=True)
class RecordConfig:
    duration: float = attrs.field(
        default=30.0, validator=_positive, metadata=_meta("seconds 'caired record' captures", "DURATION_SEC")
    )
    preview: bool = attrs.field(
        default=True, metadata=_meta("show a preview window where a display exists", "SHOW_PREVIEW")
    )


def listen_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as (host, port); ValueError says what is allowed."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:9731 ('' = no HTTP endpoint)")
    return host, int(port)


def _listen(_inst: object, attr: attrs.Attribute[Any], value: str) -> None:
    if value:
        listen_address(value)


@attrs.frozen(kw_only=True)
class MetricsConfig:
    textfile: str = attrs.field(
        default="",
        metadata=_meta("Prometheus text file rewritten atomically every interval, e.g. for node_exporter ('' = none)"),
    )
    listen: str = attrs.field(
        default="",
        validator=_listen,
        metadata=_meta("HOST:PORT serving /metrics and /health over HTTP ('' = none; keep it on localhost)"),
    )
    interval: float = attrs.field(
        default=15.0, validator=_positive, metadata=_meta("seconds between rewrites of the text file")
    )


@attrs.frozen(kw_only=True)
class RetentionConfig:
    done_max_bytes: Amount = attrs.field(
        default=Amount("10%"),
        converter=Amount,
        validator=_amount,
        metadata=_meta("disk done/ may use (bytes like 2G, or a share of the filesystem like 10%); "
                       "past it the oldest frames go, then the oldest folders (0 = no budget)"),
    )
    free_space_floor: Amount = attrs.field(
        default=Amount("10%"),
        converter=Amount,
        validator=_amount,
        metadata=_meta("free space kept on the spool's filesystem: below it done/ frames go and camera "
                       "sessions are not recorded (bytes or %; 0 = no floor)"),
    )
    frames_max_days: float = attrs.field(
        default=0.0,
        validator=_non_negative,
        metadata=_meta("frames of done/ folders older than this are deleted (days; 0 = only the budget decides)"),
    )
    folders_max_days: float = attrs.field(
        default=30.0,
        validator=_non_negative,
        metadata=_meta("done/ folders, result.json included, older than this are deleted (days; 0 = never)"),
    )


@attrs.frozen(kw_only=True)
class Config:
    backend: BackendConfig = attrs.field(factory=BackendConfig)
    stream: StreamConfig = attrs.field(factory=StreamConfig)
    spool: SpoolConfig = attrs.field(factory=SpoolConfig)
    retry: RetryConfig = attrs.field(factory=RetryConfig)
    log: LogConfig = attrs.field(factory=LogConfig)
    camera: CameraConfig = attrs.field(factory=CameraConfig)
    record: RecordConfig = attrs.field(factory=RecordConfig)
    metrics: MetricsConfig = attrs.field(factory=MetricsConfig)
    retention: RetentionConfig = attrs.field(factory=RetentionConfig)
    # Where each effective value came from ("default", "file PATH", "env FPS", "flag --fps").
    sources: Mapping[str, str] = attrs.field(factory=dict, eq=False, repr=False)
    # What deserves a look but stops nothing (a CAIRED_ variable that names no key), one line each.
    warnings: tuple[str, ...] = attrs.field(default=(), eq=False, repr=False)

    @classmethod
    def load(
        cls,
        *,
        path: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        flags: Mapping[str, tuple[Any, str]] | None = None,
    ) -> Config:
        """Build the configuration from every layer; raise ConfigErrors naming each problem."""
        env = os.environ if env is None else env
        return _load(path=path, env=env, flags=flags or {})

    @classmethod
    def from_toml(cls, path: str | Path) -> Config:
        return cls.load(path=path, env={})

    def api_key(self) -> str:
        """The effective key, revealed: for the wire only."""
        return self.backend.api_key.reveal()


SECTIONS: Final[dict[str, type]] = {
    f.name: typing.get_type_hints(Config)[f.name]
    for f in attrs.fields(Config)
    if f.name not in ("sources", "warnings")
}


def iter_fields() -> Iterator[tuple[str, attrs.Attribute[Any], Any]]:
    """(dotted key, attribute, type) for every configuration key, in declaration order."""
    for section, klass in SECTIONS.items():
        hints = typing.get_type_hints(klass)
        for f in attrs.fields(klass):
            yield f"{section}.{f.name}", f, hints[f.name]


def env_names(key: str, attr: attrs.Attribute[Any]) -> tuple[str, ...]:
    """Environment variables for a key, the CAIRED_ form first."""
    generic = ENV_PREFIX + key.replace(".", "_").upper()
    legacy: tuple[str, ...] = attr.metadata.get("env", ())
    return (generic, *legacy)


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def coerce(value: Any, kind: Any) -> Any:
    """Turn a TOML or environment value into the field's type; ValueError says what is allowed."""
    if typing.get_origin(kind) is Literal:
        allowed = typing.get_args(kind)
        text = str(value).strip().lower() if isinstance(value, str) else value
        if text not in allowed:
            raise ValueError("must be one of " + ", ".join(repr(a) for a in allowed))
        return text
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError("must be true or false (1/0, yes/no, on/off)")
    if kind is int:
        if isinstance(value, bool):
            raise ValueError("must be a whole number")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ValueError("must be a whole number")
    if kind is float:
        if isinstance(value, bool):
            raise ValueError("must be a number")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
            else:
                if number == number and number not in (float("inf"), float("-inf")):
                    return number
        raise ValueError("must be a number")
    if kind is Amount:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ValueError("must be bytes (e.g. 500M, 2G) or a percentage of the filesystem (e.g. 10%)")
        parse_amount(value)  # ValueError says what is allowed
        return Amount(value.strip())
    if kind in (str, Secret):
        if not isinstance(value, str):
            raise ValueError("must be a string")
        return kind(value)
    raise TypeError(f"no coercion for {kind!r}")  # a bug in the table, not user input


def _read_toml(path: Path, named_by: str) -> dict[str, Any]:
    """The file's tables; an error names the file and what named it (``--config`` or ``CAIRED_CONFIG``)."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        problem = "no such file"
    except IsADirectoryError:
        problem = "is a folder, not a file"
    except PermissionError:
        problem = "cannot be read (permission denied)"
    except tomllib.TOMLDecodeError as exc:
        problem = f"is not valid TOML: {exc}"
    except UnicodeDecodeError:
        problem = "is not valid TOML: it is not UTF-8 text"
    except OSError as exc:
        problem = f"cannot be read: {exc.strerror or exc}"
    raise ConfigErrors([ConfigError(named_by, str(path), problem)])


def _closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice ``word`` was most likely a misspelling of, or None when none is close."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def _unknown(what: str, word: str, choices: Iterable[str]) -> str:
    """``unknown key; did you mean stream.fps?`` (without the question when nothing is close)."""
    guess = _closest(word, choices)
    return f"unknown {what}; did you mean {guess}?" if guess else f"unknown {what}"


def _unknown_variables(env: Mapping[str, str]) -> list[str]:
    """A warning for each ``CAIRED_`` variable that is no key's name, naming the closest key."""
    known = {env_names(key, attr)[0]: f"{env_names(key, attr)[0]} ({key})" for key, attr, _ in iter_fields()}
    known.update((name, name) for name in NON_KEY_VARIABLES)
    by_bare = {name.removeprefix(ENV_PREFIX): shown for name, shown in known.items()}
    warnings = []
    for variable in sorted(env):
        if not variable.startswith(ENV_PREFIX) or variable in known:
            continue
        # Compared without the prefix every name shares, or CAIRED_ alone would make them all look close.
        guess = _closest(variable.removeprefix(ENV_PREFIX), by_bare)
        hint = f"; did you mean {by_bare[guess]}?" if guess else f" (a key's variable is {ENV_PREFIX}<SECTION>_<KEY>)"
        warnings.append(f"the environment variable {variable} names no configuration key and is ignored{hint}")
    return warnings


def _load(*, path: str | Path | None, env: Mapping[str, str], flags: Mapping[str, tuple[Any, str]]) -> Config:
    errors: list[ConfigError] = []
    raw: dict[str, tuple[Any, str]] = {}  # key -> (value, source), later layers overwrite

    named_by = "--config"
    if path is None and env.get("CAIRED_CONFIG"):
        path, named_by = env["CAIRED_CONFIG"], "CAIRED_CONFIG"
    known = [key for key, _, _ in iter_fields()]
    if path is not None:
        path = Path(path)
        document = _read_toml(path, named_by)
        source = f"file {path}"
        for section, table in document.items():
            if section not in SECTIONS:
                problem = _unknown("section", section, SECTIONS) + " (known: " + ", ".join(SECTIONS) + ")"
                errors.append(ConfigError(section, source, problem))
                continue
            if not isinstance(table, dict):
                errors.append(ConfigError(section, source, "must be a [section] table"))
                continue
            for name, value in table.items():
                key = f"{section}.{name}"
                if key not in known:
                    errors.append(ConfigError(key, source, _unknown("key", key, known)))
                else:
                    raw[key] = (value, source)

    for key, attr, _ in iter_fields():
        for name in env_names(key, attr):  # the CAIRED_ name first
            if name in env:
                raw[key] = (env[name], f"env {name}")
                break

    for key, (value, source) in flags.items():
        if value is not None:
            raw[key] = (value, source)

    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    sources: dict[str, str] = {}
    for key, attr, kind in iter_fields():
        section, name = key.split(".", 1)
        if key not in raw:
            sources[key] = "default"
            continue
        value, source = raw[key]
        try:
            value = coerce(value, kind)
            if attr.validator is not None:
                attr.validator(None, attr, value)
        except ValueError as exc:
            if source.startswith("env ") and any(e.source == source for e in errors):
                continue  # one variable feeding two keys (FPS) is one mistake: say it once
            shown = "'***'" if name == "api_key" else redact_url(repr(value))
            errors.append(ConfigError(key, source, f"{exc} (got {shown})"))
            continue
        values[section][name] = value
        sources[key] = source

    if not errors:
        _resolve_key(values["backend"], sources, env, errors)

    sections: dict[str, Any] = {}
    if not errors:
        for section, klass in SECTIONS.items():
            try:
                sections[section] = klass(**values[section])
            except ValueError as exc:
                errors.append(ConfigError(section, "combined values", str(exc)))
    if errors:
        raise ConfigErrors(errors)
    return Config(**sections, sources=sources, warnings=tuple(_unknown_variables(env)))


def _resolve_key(
    backend: dict[str, Any], sources: dict[str, str], env: Mapping[str, str], errors: list[ConfigError]
) -> None:
    """The key: a systemd credential first, then api_key_file, then api_key itself."""
    credentials = env.get("CREDENTIALS_DIRECTORY", "")
    candidates: list[tuple[Path, str]] = []
    if credentials:
        candidates.append((Path(credentials) / CREDENTIAL_NAME, "credential"))
    if backend.get("api_key_file"):
        candidates.append((Path(backend["api_key_file"]), "backend.api_key_file"))
    for path, origin in candidates:
        if origin == "credential":
            try:
                present = path.exists()
            except OSError as exc:  # the credentials directory cannot be searched (EACCES)
                errors.append(ConfigError(
                    "backend.api_key", "env CREDENTIALS_DIRECTORY",
                    f"cannot read {path}: {exc.strerror or exc} (uid {os.geteuid()} cannot get into {credentials}; "
                    "systemd makes it for the unit's User=, so run caired as that user)"))
                return
            if not present:
                continue
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            key, source = (
                ("backend.api_key", "env CREDENTIALS_DIRECTORY") if origin == "credential"
                else ("backend.api_key_file", sources.get("backend.api_key_file", ""))
            )
            reason = "it is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else exc.strerror or str(exc)
            errors.append(ConfigError(key, source, f"cannot read {path}: {reason}"))
            return
        if not text:
            errors.append(ConfigError("backend.api_key_file", str(path), "the file is empty"))
            return
        backend["api_key"] = Secret(text)
        sources["backend.api_key"] = f"{origin} {path}"
        return


def key_file_warning(path: str | Path) -> str | None:
    """A warning when a key file can be read by users other than its owner."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        return f"{path} is readable by others (mode {stat.S_IMODE(mode):o}); chmod 600 it"
    return None


def flag(value: Any, name: str) -> tuple[Any, str]:
    """A command-line value with its source, for ``Config.load(flags=...)``."""
    return (value, f"flag {name}")
