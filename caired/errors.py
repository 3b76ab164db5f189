"""caired's errors: one root, subclasses that also inherit the fitting builtin.

Each error that ends a command carries its exit code (sysexits.h numbering), and
its message is the one line a user reads: it says what went wrong and what to do.
"""

from __future__ import annotations

import enum
from pathlib import Path


class ExitCode(enum.IntEnum):
    OK = 0
    SESSION_FAILED = 1
    USAGE = 2
    NO_INPUT = 65  # EX_DATAERR: no usable frames
    UNAVAILABLE = 69  # EX_UNAVAILABLE: backend unreachable after the retries
    SOFTWARE = 70  # EX_SOFTWARE: a bug
    CANT_CREATE = 73  # EX_CANTCREAT: an output could not be written
    IO_ERROR = 74  # EX_IOERR: a device (camera) failed
    NO_PERMISSION = 77  # EX_NOPERM: the key was rejected
    CONFIG = 78  # EX_CONFIG


class CairedError(Exception):
    """Root of caired's own errors. ``str(err)`` is a one-line message for users."""

    exit_code: ExitCode = ExitCode.SOFTWARE


class ConfigError(CairedError, ValueError):
    """A configuration value is wrong: names the key, its source and what is allowed."""

    exit_code = ExitCode.CONFIG

    def __init__(self, key: str, source: str, problem: str) -> None:
        self.key = key
        self.source = source
        self.problem = problem
        where = f" (from {source})" if source else ""
        super().__init__(f"{key}{where}: {problem}")


class ConfigErrors(CairedError, ValueError):
    """Several configuration problems, one line each."""

    exit_code = ExitCode.CONFIG

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class NoFramesError(CairedError, FileNotFoundError):
    """A folder is missing or holds no usable frame."""

    exit_code = ExitCode.NO_INPUT


class FrameError(CairedError, ValueError):
    """One frame could not be read or decoded; the session skips it."""

    def __init__(self, name: str, problem: str) -> None:
        self.name = name
        self.problem = problem
        super().__init__(f"{name}: {problem}")


class Retry(enum.Enum):
    """What a failed attempt says about trying again."""

    BACKOFF = "backoff"  # the backend's side (refused, down, timeouts, 1001, 1006): retry without limit
    SLOW = "slow"  # the backend asked for time (1012, 1013, 429): a longer backoff, without limit
    SESSION = "session"  # failed after the backend took this session (1011, no 'finished'): limited retries
    NEVER = "never"  # this session's payload is the problem (1009, 1002, 1003, 1007): retrying sends the same


class SessionError(CairedError):
    """A streaming attempt ended without ``finished``.

    ``retry`` says how (and whether) to try again; ``connected`` whether the connection had
    opened (the backend is up); ``close_code`` is the WebSocket close code when there was one.
    """

    exit_code = ExitCode.SESSION_FAILED

    def __init__(
        self, reason: str, *, close_code: int | None = None, retry: Retry = Retry.BACKOFF, connected: bool = True
    ) -> None:
        self.reason = reason
        self.close_code = close_code
        self.retry = retry
        self.connected = connected
        super().__init__(reason)

    @property
    def permanent(self) -> bool:
        return self.retry is Retry.NEVER


class BackendUnavailable(SessionError):
    """The backend could not be reached (refused, timeout, 5xx, 429)."""

    exit_code = ExitCode.UNAVAILABLE


class KeyRejected(SessionError, PermissionError):
    """The backend rejected the key (HTTP 401/403, close 1008 right after the handshake)."""

    exit_code = ExitCode.NO_PERMISSION


class WrongPath(KeyRejected):
    """The backend refused the URL's path (close 1008 "Invalid path", HTTP 404): a configuration
    error with another fix than a key."""

    exit_code = ExitCode.CONFIG


class FinishTimeout(SessionError, TimeoutError):
    """The ``finished`` answer did not come within ``finish_timeout``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, retry=Retry.SESSION)


class DeviceError(CairedError, OSError):
    """A camera could not be opened or stopped delivering frames."""

    exit_code = ExitCode.IO_ERROR


class SpoolError(CairedError, OSError):
    """The spool cannot be created or written; the message says which path and what to do."""

    exit_code = ExitCode.CANT_CREATE

    def __init__(self, message: str, *, path: Path | None = None, code: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = code


class LocksRefused(SpoolError):
    """The filesystem refuses the lock itself (not: someone holds it). That is the same for every
    folder of the spool, so recovery stops on it instead of skipping the folder."""


class OutputError(CairedError, OSError):
    """A recording folder or a frame file could not be written."""

    exit_code = ExitCode.CANT_CREATE


class PlotWriteError(CairedError, OSError):
    """The picture could not be written."""

    exit_code = ExitCode.CANT_CREATE


class InputError(CairedError, OSError):
    """An input file (a log to plot) is missing or cannot be read: the same exit code as a missing folder."""

    exit_code = ExitCode.NO_INPUT


class DemoFailed(CairedError):
    """The demo's session did not finish (failed, or no result in time), or its options are out of range."""

    exit_code = ExitCode.SESSION_FAILED


class LayoutError(NoFramesError):
    """A folder looks like a known layout (a dataset, a video) but is not quite one: names what is missing."""


class GroundTruthError(CairedError, ValueError):
    """A reference file (reference.csv, a dataset's ground truth) cannot be read: one line says why."""

    exit_code = ExitCode.NO_INPUT


class VideoError(NoFramesError):
    """A video file cannot be opened or decoded."""
