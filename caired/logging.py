"""The structlog chain: JSON lines (or a console form on a terminal), and redaction.

Every line is rendered once as JSON; it goes to stdout (journald) and, when
``[log] file`` is set, is appended to that file with one ``write`` of the whole line
(O_APPEND), so lines from several processes never interleave. ``reopen()`` starts a
new file after logrotate renamed the old one. The API key is replaced by ``***`` in
every rendered line, whatever field it hid in.

When stdout is the journal (``$JOURNAL_STREAM``, "DEVICE:INODE", names the very stream
stdout is), each stdout line starts with the syslog priority ``<N>`` of its level, which
journald strips and files as the entry's priority: ``journalctl -p warning`` then shows
warnings and errors only, and ``journalctl -o cat`` still gives the bare JSON line. The
log file never gets the prefix.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping, MutableMapping
from typing import IO, Any, Final, TextIO

import structlog

from caired.config import Config
from caired.errors import CairedError, ExitCode
from caired.protocol import REDACTED, redact_url

FIRST_KEYS: Final = ("timestamp", "level", "event")
_LEVELS: Final = {"debug": 10, "info": 20, "warning": 30, "error": 40}
# syslog priorities (sd-daemon(3)) by structlog level name
PRIORITIES: Final = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3, "critical": 2}


class LineSink:
    """Writes rendered lines to stdout and to the log file; the one shared writer."""

    def __init__(self, *, stdout: TextIO, console: bool, path: str, secrets: tuple[str, ...]) -> None:
        self._stdout = stdout
        self._console = structlog.dev.ConsoleRenderer(colors=_colors(stdout)) if console else None
        self._path = path
        self._secrets = tuple(s for s in secrets if s)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._file_error: str | None = None
        self._journal = not console and is_journal(stdout)
        self.before_console_line: Callable[[], None] | None = None
        if path:
            self._fd = _open_log(path)

    def reopen(self) -> None:
        """Open the log file anew (after logrotate moved it); the old descriptor closes."""
        if not self._path:
            return
        new = _open_log(self._path)
        with self._lock:
            old, self._fd = self._fd, new
            self._file_error = None
        if old is not None:
            os.close(old)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def emit(self, event: MutableMapping[str, Any]) -> None:
        line = _printable(self.redact(_render(event)) + "\n")
        data = line.encode("utf-8")
        with self._lock:
            if self._fd is not None:
                self._write_file(data)
            try:
                if self._console is not None:
                    if self.before_console_line is not None:
                        self.before_console_line()
                    text = self.redact(self._console(None, "", _for_console(event)))
                    self._stdout.write(_printable(text) + "\n")
                elif self._journal:
                    self._stdout.write(f"<{PRIORITIES.get(str(event.get('level')), 6)}>{line}")
                else:
                    self._stdout.write(line)
                self._stdout.flush()
            except (BrokenPipeError, ValueError):
                pass  # stdout went away (a closed pipe): the file, if any, still has the line

    def _write_file(self, data: bytes) -> None:
        assert self._fd is not None
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            # A full disk must not stop the daemon; say so once per state change.
            message = f"caired: cannot write the log file {self._path}: {exc.strerror}"
            if message != self._file_error:
                self._file_error = message
                print(message, file=sys.stderr)
        else:
            self._file_error = None


class _Logger:
    """The structlog logger: every method hands the event dict to the sink."""

    def __init__(self, sink: LineSink) -> None:
        self._sink = sink

    def _emit(self, event: MutableMapping[str, Any]) -> None:
        self._sink.emit(event)

    msg = debug = info = warning = warn = error = critical = exception = fatal = log = _emit


_sink: LineSink | None = None


def configure(
    cfg: Config,
    *,
    stdout: TextIO | None = None,
    secrets: tuple[str, ...] = (),
) -> LineSink:
    """Set up structlog for this process (the one global, as in structlog)."""
    global _sink
    stdout = stdout or sys.stdout
    fmt = cfg.log.format
    console = fmt == "console" or (fmt == "auto" and _isatty(stdout))
    # The new sink first: if its file cannot be opened, the old one goes on writing.
    sink = LineSink(
        stdout=stdout, console=console, path=cfg.log.file, secrets=(cfg.api_key(), *secrets)
    )
    if _sink is not None:
        _sink.close()
    _sink = sink
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
            structlog.processors.format_exc_info,  # exc_info=True: the traceback as "exception"
            _to_sink_args,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[cfg.log.level]),
        logger_factory=lambda *_: _Logger(sink),
        cache_logger_on_first_use=False,
    )
    _quiet_libraries(sink)
    return sink


def reconfigure(cfg: Config, *, secrets: tuple[str, ...] = ()) -> LineSink:
    """``configure`` again with new settings (a reload), writing to the same stdout as before."""
    return configure(cfg, stdout=_sink._stdout if _sink is not None else None, secrets=secrets)


def reopen() -> None:
    if _sink is not None:
        _sink.reopen()


def redact(text: str) -> str:
    """``text`` with the key (the configured one and any ``api_key=`` value) replaced by ``***``:
    for what leaves the log's way, such as error.json."""
    text = redact_url(text)
    return _sink.redact(text) if _sink is not None else text


def console_write(out: TextIO, text: str) -> None:
    """Write ``text`` to ``out`` under the lock log lines are written under, so a line logged
    from a worker thread never lands in the middle of it (the progress line's redraw)."""
    lock = _sink._lock if _sink is not None else None
    if lock is None:
        out.write(text)
        out.flush()
        return
    with lock:
        out.write(text)
        out.flush()


def set_before_console_line(hook: Callable[[], None] | None) -> None:
    """Called before each console line (the progress line clears itself there)."""
    if _sink is not None:
        _sink.before_console_line = hook


def get_logger(**initial: Any) -> Any:
    return structlog.get_logger(**initial)


def _to_sink_args(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> Any:
    return (event,), {}


_SURROGATE_BYTE: Final = re.compile("[\udc80-\udcff]")


def _printable(text: str) -> str:
    """``text`` with nothing a UTF-8 writer refuses. A file name that is not UTF-8 reaches Python
    with its bytes as lone surrogates (os.fsdecode): each shows as ``\\xNN``, as caired shows such
    names everywhere; any other lone surrogate (a backend's "\\udc00") as its escape."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = _SURROGATE_BYTE.sub(lambda m: "\\\\x%02x" % (ord(m.group()) - 0xDC00), text)
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _render(event: Mapping[str, Any]) -> str:
    """One JSON line; an event that cannot be rendered (nested past the recursion limit, say)
    still gives a line that says what it was."""
    try:
        return json.dumps(_ordered(event), default=str, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError) as exc:
        fallback = {k: event[k] for k in FIRST_KEYS if k in event and isinstance(event[k], str)}
        fallback["unrenderable"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        return json.dumps(fallback, ensure_ascii=False)


def _ordered(event: Mapping[str, Any]) -> dict[str, Any]:
    ordered = {k: event[k] for k in FIRST_KEYS if k in event}
    ordered.update((k, v) for k, v in event.items() if k not in ordered)
    return ordered


def _for_console(event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A readable form: a server answer shows as its state and HR, not its arrays."""
    shown = dict(event)
    response = shown.get("response")
    if isinstance(response, dict):
        inference = response.get("inference")
        hr = inference.get("hr") if isinstance(inference, dict) else None
        shown["response"] = f"state={response.get('state')} hr={hr}"
    return shown


class LogFileError(CairedError, OSError):
    exit_code = ExitCode.CANT_CREATE


def _open_log(path: str) -> int:
    try:
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        raise LogFileError(f"cannot open the log file {path}: {exc.strerror or exc} (log.file)") from None


def is_journal(stream: IO[str], env: Mapping[str, str] | None = None) -> bool:
    """Is ``stream`` connected to journald? ``$JOURNAL_STREAM`` is "DEVICE:INODE" of the stream
    systemd connected; it is inherited by children whose stdout may be elsewhere, so the
    stream's own device and inode must match (systemd.exec(5))."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (ValueError, io.UnsupportedOperation):
        return False


def _colors(stream: IO[str]) -> bool:
    return _isatty(stream) and "NO_COLOR" not in os.environ


class _RedactFilter(logging.Filter):
    """Libraries log through stdlib logging; their lines pass through redaction too."""

    def __init__(self, sink: LineSink) -> None:
        super().__init__()
        self._sink = sink

    def filter(self, record: logging.LogRecord) -> bool:
        text = redact_url(self._sink.redact(record.getMessage()))
        record.msg, record.args = text, None
        return True


def _quiet_libraries(sink: LineSink) -> None:
    # trio-websocket logs the URL, query included, at debug level: keep it out of
    # our output entirely, and redact whatever a handler someone adds would see.
    for name in ("trio-websocket", "trio_websocket", "wsproto"):
        lib = logging.getLogger(name)
        lib.setLevel(logging.WARNING)
        lib.filters = [f for f in lib.filters if not isinstance(f, _RedactFilter)]
        lib.addFilter(_RedactFilter(sink))
