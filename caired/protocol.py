"""The wire contract (../shared/protocol.md): payloads, URLs, answers, close codes. No I/O.

A client message has exactly five keys. ``frame_data`` is standard base64 and
``datapt_id`` a canonical UUIDv4, neither of which needs JSON escaping, so a message
is assembled by concatenation rather than by ``json.dumps`` over a megabyte string.
"""

from __future__ import annotations

import enum
import json
import math
import re
import uuid
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs

REDACTED: Final = "***"
STATE_STREAM: Final = "stream"
STATE_END: Final = "end"
PAYLOAD_KEYS: Final = frozenset({"datapt_id", "state", "frame_data", "timestamp", "advanced"})
UUID4_RE: Final = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\Z")
TIMESTAMP_RE: Final = re.compile(r"^[0-9]+(\.[0-9]+)?\Z")  # ASCII digits only; no trailing newline

State = Literal["stream", "end"]


def new_datapt_id() -> str:
    return str(uuid.uuid4())


def message_parts(
    datapt_id: str, state: State, frame_b64: bytes, timestamp: str, advanced: bool
) -> tuple[bytes, bytes, bytes]:
    """One client message in three pieces (before the frame, the frame, after it).

    Joined, they are byte for byte what ``json.dumps`` of the five keys gives, as UTF-8.
    Kept apart, the frame (a megabyte in raw mode) is copied once, into the WebSocket frame.
    """
    if not UUID4_RE.match(datapt_id):
        raise ValueError(f"datapt_id is not a canonical UUIDv4: {datapt_id!r}")
    if not TIMESTAMP_RE.match(timestamp):
        raise ValueError(f"timestamp is not UNIX seconds: {timestamp!r}")
    head = f'{{"datapt_id": "{datapt_id}", "state": "{state}", "frame_data": "'
    tail = f'", "timestamp": "{timestamp}", "advanced": {"true" if advanced else "false"}}}'
    return head.encode("ascii"), frame_b64, tail.encode("ascii")


def encode_message(datapt_id: str, state: State, frame_b64: bytes, timestamp: str, advanced: bool) -> bytes:
    """One client message as UTF-8 JSON; see ``message_parts``."""
    return b"".join(message_parts(datapt_id, state, frame_b64, timestamp, advanced))


def build_url(base: str, *, api_key: str, auth: str, client: str) -> str:
    """The connection URL: the base's own query kept, ``api_key`` added for query auth."""
    parts = urlsplit(base)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if client and not any(k == "client" for k, _ in query):
        query.append(("client", client))
    if auth == "query" and api_key:
        query.append(("api_key", api_key))
    return urlunsplit(parts._replace(query=urlencode(query)))


def auth_headers(*, api_key: str, auth: str) -> list[tuple[bytes, bytes]]:
    if auth == "header" and api_key:
        return [(b"Authorization", b"Bearer " + api_key.encode("utf-8"))]
    return []


def redact_url(url: str) -> str:
    """The URL with any ``api_key`` value replaced by ``***``; safe to log."""
    return re.sub(r"(?i)(api_key=)[^&#\s'\"]*", r"\g<1>" + REDACTED, url)


MAX_DEPTH: Final = 64  # arrays and objects nested deeper than this are not parsed
# One bound for an answer: the connection refuses a longer message (1009, caired.uplink), and
# every answer within it is parsed and logged whole, a large 'finished' included.
MAX_ANSWER: Final = 16 * 1024 * 1024
LOG_WHOLE: Final = MAX_ANSWER  # a text answer up to this many characters is parsed and logged whole
LOG_PREFIX: Final = 1024  # what the log keeps of a longer one
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")

AnswerKind = Literal["json", "text", "binary", "invalid"]


@attrs.frozen
class Answer:
    """One server message as received: JSON, other text, binary (its length), or invalid.

    ``invalid`` is a text message caired refuses to parse: longer than ``LOG_WHOLE``
    characters, nested deeper than ``MAX_DEPTH``, or not encodable as UTF-8; ``body``
    is then its text (its first ``LOG_PREFIX`` characters when it is too long) and
    ``reason`` says why. ``size`` is the message's length in characters (bytes when
    binary).
    """

    kind: AnswerKind
    body: Any
    size: int = 0
    reason: str | None = None

    @property
    def state(self) -> str | None:
        if self.kind == "json" and isinstance(self.body, dict):
            state = self.body.get("state")
            return state if isinstance(state, str) else None
        return None

    @property
    def hr(self) -> float | None:
        """The heart rate, or None while the model warms up (missing, null or -1) or when it is no number."""
        if self.kind != "json" or not isinstance(self.body, dict):
            return None
        inference = self.body.get("inference")
        if not isinstance(inference, dict):
            return None
        hr = inference.get("hr")
        if isinstance(hr, bool) or not isinstance(hr, int | float):
            return None
        try:
            value = float(hr)
        except OverflowError:  # an integer past a double's range
            return None
        if not math.isfinite(value) or value < 0:
            return None
        return value

    @property
    def warming_up(self) -> bool:
        """A JSON answer without a heart rate yet (hr missing, null or -1): the model warms up."""
        return self.kind == "json" and isinstance(self.body, dict) and self.hr is None

    @property
    def confidence(self) -> Any:
        """The answer's ``confidence`` when it carries any (not null, not empty), else None."""
        return self._signal_field("confidence")

    @property
    def feedback(self) -> Any:
        """The answer's ``feedback`` when it carries any (not null, not empty), else None."""
        return self._signal_field("feedback")

    def _signal_field(self, key: str) -> Any:
        if self.kind != "json" or not isinstance(self.body, dict):
            return None
        value = self.body.get(key)
        return None if value is None or value in ("", {}, []) else value

    def for_log(self) -> Any:
        """What goes under ``response`` in the log: the whole message, unfiltered, when within bounds.

        A binary message is its length; an invalid one its reason, length and text (the
        first ``LOG_PREFIX`` characters of one too long to keep).
        """
        if self.kind == "binary":
            return {"binary_bytes": self.body}
        if self.kind == "invalid":
            return {"invalid": self.reason, "chars": self.size, "text": self.body}
        return self.body


def shown_signal(value: Any, width: int = 32) -> str:
    """A confidence or feedback value in a few characters: a number as such, a text quoted,
    a one-number object as that number, anything else as compact JSON, cut to ``width``."""
    if isinstance(value, dict) and len(value) == 1:
        value = next(iter(value.values()))
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
        except (ValueError, RecursionError):  # nested past the recursion limit: it came from the network
            text = "…"
    else:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def parse_answer(message: str | bytes) -> Answer:
    """The answer a server message makes; never raises, whatever the message holds."""
    try:
        return _parse(message)
    except Exception as exc:  # a message caired cannot read is recorded, never the end of an attempt
        size = len(message) if isinstance(message, str | bytes | bytearray) else 0
        return Answer("invalid", "", size=size, reason=f"unreadable: {type(exc).__name__}")


def _parse(message: str | bytes) -> Answer:
    if isinstance(message, bytes | bytearray | memoryview):
        return Answer("binary", len(message), size=len(message))
    size = len(message)
    if size > LOG_WHOLE:
        return Answer("invalid", message[:LOG_PREFIX], size=size,
                      reason=f"{size} characters, more than the {LOG_WHOLE} kept whole; the first {LOG_PREFIX} shown")
    if not message.isascii() and not _utf8(message):
        return Answer("invalid", message.encode("utf-8", "backslashreplace").decode("utf-8"), size=size,
                      reason="not valid UTF-8 (lone surrogates, shown escaped)")
    deep = Answer("invalid", message, size=size, reason=f"nested deeper than {MAX_DEPTH} levels")
    try:
        body = json.loads(message, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        return deep
    except ValueError:  # not JSON (or a number past what Python reads)
        return Answer("text", message, size=size)
    if message.count("[") + message.count("{") > MAX_DEPTH and _depth(body) > MAX_DEPTH:
        return deep
    if "\\u" in message and _SURROGATE_ESCAPE.search(message):
        body = _escape_surrogates(body)  # "\ud800" parses to a string no UTF-8 log line can hold
    return Answer("json", body, size=size)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity, -Infinity: Python's extension, not JSON


def _finite_float(text: str) -> float | str:
    """A JSON number as a float; one past a double's range stays the text it was (no inf in the log)."""
    value = float(text)
    return value if math.isfinite(value) else text


def _depth(value: Any) -> int:
    """How deep arrays and objects nest in ``value``, without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest


def _escape_surrogates(value: Any) -> Any:
    """``value`` with each string a UTF-8 log line can hold: lone surrogates as ``\\udXXX``."""
    if isinstance(value, str):
        return value if _utf8(value) else value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [_escape_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_escape_surrogates(key): _escape_surrogates(item) for key, item in value.items()}
    return value


class CloseKind(enum.Enum):
    SUCCESS = "success"
    RETRY = "retry"  # transient: retry with backoff
    RETRY_SLOW = "retry_slow"  # the server asked for time: retry with a longer backoff
    REJECTED = "rejected"  # key or path: a configuration error, no blind retry
    SESSION = "session"  # the backend failed this session (1011, application codes): limited retries
    TOO_BIG = "too_big"  # this session's payload is the problem
    PROTOCOL = "protocol"  # the server refused our messages: retrying sends the same


def classify_close(code: int | None) -> CloseKind:
    """The client's reaction to a close code, per the protocol's table."""
    if code == 1000:
        return CloseKind.SUCCESS
    if code == 1008:
        return CloseKind.REJECTED
    if code == 1009:
        return CloseKind.TOO_BIG
    if code in (1012, 1013):
        return CloseKind.RETRY_SLOW
    if code in (1002, 1003, 1007):
        return CloseKind.PROTOCOL
    if code == 1011 or (code is not None and 4000 <= code <= 4999):
        return CloseKind.SESSION
    return CloseKind.RETRY  # 1001, 1006, 1005 and unknown codes


def classify_status(status: int) -> CloseKind:
    """The reaction to an HTTP status that refused the handshake."""
    if status in (401, 403):
        return CloseKind.REJECTED
    if status == 429:
        return CloseKind.RETRY_SLOW
    if status == 404:
        return CloseKind.REJECTED  # a wrong path; retrying will not find it
    return CloseKind.RETRY
