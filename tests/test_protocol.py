"""The wire contract's pure parts: messages, URLs, redaction, answers, close codes."""

from __future__ import annotations

import base64
import io
import json
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from caired.logging import LineSink
from caired.protocol import (
    LOG_PREFIX,
    LOG_WHOLE,
    MAX_DEPTH,
    TIMESTAMP_RE,
    UUID4_RE,
    Answer,
    CloseKind,
    auth_headers,
    build_url,
    classify_close,
    classify_status,
    encode_message,
    message_parts,
    new_datapt_id,
    parse_answer,
    redact_url,
)


def test_message_is_exactly_the_five_keys_as_json_would_write_them() -> None:
    datapt = new_datapt_id()
    message = encode_message(datapt, "stream", b"aGVsbG8=", "1747154380.5511632", True)
    expected = {"datapt_id": datapt, "state": "stream", "frame_data": "aGVsbG8=",
                "timestamp": "1747154380.5511632", "advanced": True}
    assert json.loads(message) == expected
    assert message == json.dumps(expected).encode()


def test_datapt_ids_are_canonical_uuid4() -> None:
    ids = {new_datapt_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(UUID4_RE.match(i) for i in ids)


@pytest.mark.parametrize("bad", ["ED21C799-9EDD-4706-9256-0324A7697ADB", "not-a-uuid", ""])
def test_message_refuses_a_bad_datapt_id(bad: str) -> None:
    with pytest.raises(ValueError):
        encode_message(bad, "stream", b"", "1.0", True)


@pytest.mark.parametrize("bad", ["1.5\n", "\u0661\u0662", "1.", ".5", "-1", "1e9"])
def test_message_refuses_a_timestamp_that_is_not_ascii_unix_seconds(bad: str) -> None:
    with pytest.raises(ValueError, match="timestamp"):
        encode_message(new_datapt_id(), "stream", b"", bad, True)


def test_a_datapt_id_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ValueError, match="datapt_id"):
        encode_message(new_datapt_id() + "\n", "stream", b"", "1.0", True)


def test_url_keeps_the_base_query_and_adds_the_key() -> None:
    url = build_url("wss://host:8003/ws/?region=eu", api_key="k/+=&", auth="query", client="caired")
    assert url == "wss://host:8003/ws/?region=eu&client=caired&api_key=k%2F%2B%3D%26"


def test_header_auth_keeps_the_key_out_of_the_url() -> None:
    url = build_url("ws://h/ws/", api_key="abc", auth="header", client="caired")
    assert "abc" not in url
    assert auth_headers(api_key="abc", auth="header") == [(b"Authorization", b"Bearer abc")]
    assert auth_headers(api_key="abc", auth="query") == []


def test_redaction_hides_every_key_value() -> None:
    assert redact_url("ws://h/ws/?client=c&api_key=SECRET&x=1") == "ws://h/ws/?client=c&api_key=***&x=1"
    assert "SECRET" not in redact_url("GET /ws/?api_key=SECRET HTTP/1.1")


def test_answers_keep_everything_and_read_the_hr() -> None:
    ok = parse_answer('{"state": "ok", "inference": {"hr": 66}, "extra": [1]}')
    assert ok.kind == "json" and ok.state == "ok" and ok.hr == 66
    assert ok.for_log() == {"state": "ok", "inference": {"hr": 66}, "extra": [1]}
    assert parse_answer('{"state": "ok", "inference": {"hr": -1}}').hr is None
    assert parse_answer('{"state": "ok", "inference": {}}').hr is None
    assert parse_answer("garbage {").for_log() == "garbage {"
    assert parse_answer(b"\x00" * 7).for_log() == {"binary_bytes": 7}
    assert parse_answer("[1, 2]").state is None


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (1000, CloseKind.SUCCESS), (1001, CloseKind.RETRY), (1006, CloseKind.RETRY), (1008, CloseKind.REJECTED),
        (1009, CloseKind.TOO_BIG), (1011, CloseKind.SESSION), (1012, CloseKind.RETRY_SLOW),
        (1013, CloseKind.RETRY_SLOW), (1007, CloseKind.PROTOCOL), (None, CloseKind.RETRY),
            (4000, CloseKind.SESSION), (4999, CloseKind.SESSION), (1001, CloseKind.RETRY),
    ],
)
def test_close_codes_are_told_apart(code: int | None, kind: CloseKind) -> None:
    assert classify_close(code) is kind


@pytest.mark.parametrize(
    ("status", "kind"),
    [(401, CloseKind.REJECTED), (403, CloseKind.REJECTED), (429, CloseKind.RETRY_SLOW), (500, CloseKind.RETRY),
     (502, CloseKind.RETRY), (503, CloseKind.RETRY)],
)
def test_handshake_statuses_are_told_apart(status: int, kind: CloseKind) -> None:
    assert classify_status(status) is kind


# --- answers from a hostile backend ---------------------------------------------------------------------------


def logged(answer: Answer) -> dict[str, Any]:
    """The ``response`` line caired's own log sink writes for ``answer``, read back."""
    out = io.StringIO()
    LineSink(stdout=out, console=False, path="", secrets=()).emit(
        {"event": "response", "response_kind": answer.kind, "response": answer.for_log()}
    )
    line: dict[str, Any] = json.loads(out.getvalue())
    return line


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5000, 10 * sys.getrecursionlimit()])
def test_deep_nesting_is_an_invalid_answer_not_a_recursion_error(depth: int) -> None:
    message = '{"state": "finished", "x": ' + "[" * depth + "]" * depth + "}"
    answer = parse_answer(message)
    assert answer.kind == "invalid" and answer.state is None and answer.hr is None
    assert answer.reason == "nested deeper than 64 levels"
    assert logged(answer)["response"] == {"invalid": answer.reason, "chars": len(message), "text": message}


def test_nesting_up_to_the_limit_is_json_and_brackets_in_strings_do_not_count() -> None:
    at_limit = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert parse_answer(at_limit).kind == "json"
    assert parse_answer("[" + at_limit + "]").kind == "invalid"
    mixed = '{"a": ' * 32 + "[" * 32 + "]" * 32 + "}" * 32
    assert parse_answer(mixed).kind == "json"
    assert parse_answer("[" + mixed + "]").kind == "invalid"
    in_strings = json.dumps({"state": "ok", "text": "[{" * 5000, "more": ["]]]", "[[["]})
    answer = parse_answer(in_strings)
    assert answer.kind == "json" and answer.state == "ok" and answer.body == json.loads(in_strings)


def test_a_message_within_bounds_is_logged_whole_and_a_huge_one_by_size_and_prefix() -> None:
    whole = json.dumps({"state": "ok", "pad": "x" * (LOG_WHOLE - 40)})
    assert len(whole) <= LOG_WHOLE
    answer = parse_answer(whole)
    assert answer.kind == "json" and logged(answer)["response"] == json.loads(whole)
    huge = json.dumps({"state": "finished", "pad": "x" * LOG_WHOLE})  # the connection refuses it; parsing too
    answer = parse_answer(huge)
    assert answer.kind == "invalid" and answer.size == len(huge) and answer.state is None
    line = logged(answer)["response"]
    assert line["chars"] == len(huge) and line["text"] == huge[:LOG_PREFIX]
    assert f"more than the {LOG_WHOLE} kept whole" in line["invalid"]
    assert len(json.dumps(line)) < 2 * LOG_PREFIX


def test_lone_surrogates_never_reach_the_log_as_such() -> None:
    escaped = '{"state": "finished", "inference": {"hr": 64}, "n\\udc00": ["\\ud800", "\\ud83d\\ude00"]}'
    answer = parse_answer(escaped)
    assert answer.kind == "json" and answer.state == "finished" and answer.hr == 64
    assert answer.body["n\\udc00"] == ["\\ud800", "\U0001f600"]  # a lone one shown escaped; a pair is a character
    assert logged(answer)["response"] == answer.body
    raw = parse_answer('{"state": "ok", "x": "\ud800"}')  # not from wsproto, but from anywhere else
    assert raw.kind == "invalid" and raw.reason is not None and "UTF-8" in raw.reason
    assert logged(raw)["response"]["text"] == '{"state": "ok", "x": "\\ud800"}'


@pytest.mark.parametrize("message", ["NaN", '{"hr": Infinity}', "[-Infinity]"])
def test_non_json_constants_are_text(message: str) -> None:
    answer = parse_answer(message)
    assert answer.kind == "text" and logged(answer)["response"] == message


def test_numbers_past_a_double_neither_raise_nor_log_infinity() -> None:
    answer = parse_answer('{"state": "ok", "inference": {"hr": 1e999}}')
    assert answer.hr is None and answer.body["inference"]["hr"] == "1e999"
    assert logged(answer)["response"]["inference"]["hr"] == "1e999"
    big = parse_answer('{"state": "ok", "inference": {"hr": 1' + "0" * 400 + "}}")
    assert big.kind == "json" and big.hr is None
    digits = parse_answer('{"hr": 1' + "0" * 5000 + "}")  # past Python's int-from-text limit
    assert digits.kind == "text"


def test_binary_in_any_buffer_is_its_length() -> None:
    for message in (b"\xff" * 9, bytearray(9), memoryview(b"123456789")):
        answer = parse_answer(message)  # type: ignore[arg-type]
        assert answer.kind == "binary" and answer.size == 9 and logged(answer)["response"] == {"binary_bytes": 9}


def test_parse_answer_never_raises_even_on_what_is_not_a_message() -> None:
    for thing in (None, 12, object()):
        answer = parse_answer(thing)  # type: ignore[arg-type]
        assert answer.kind == "invalid" and answer.reason is not None and answer.reason.startswith("unreadable")
        logged(answer)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=40,
)


@given(st.one_of(st.text(), st.binary(), st.from_regex(r"\A[\[\]{}\"\\:,0-9a-z ]*\Z")))
def test_any_message_is_an_answer_that_logs(message: str | bytes) -> None:
    answer = parse_answer(message)
    assert answer.size == len(message)
    line = logged(answer)
    if answer.kind == "binary":
        assert line["response"] == {"binary_bytes": len(message)}
    elif answer.kind == "text":
        assert line["response"] == message
    elif answer.kind == "json":
        assert line["response"] == json.loads(message)


@given(JSON_VALUES)
def test_json_within_bounds_comes_back_whole(value: Any) -> None:
    answer = parse_answer(json.dumps(value))
    assert answer.kind == "json" and answer.body == value
    assert logged(answer)["response"] == value


@settings(max_examples=200)
@given(st.integers(1, 3000), st.lists(st.booleans(), min_size=1, max_size=8), JSON_VALUES)
def test_any_depth_is_json_up_to_the_limit_and_invalid_past_it(depth: int, arrays: list[bool], leaf: Any) -> None:
    message = json.dumps(leaf)
    for level in range(depth):
        message = f"[{message}]" if arrays[level % len(arrays)] else f'{{"k": {message}}}'
    answer = parse_answer(message)
    assert answer.kind == ("json" if depth + _depth(leaf) <= MAX_DEPTH else "invalid")
    logged(answer)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


TIMESTAMPS = st.from_regex(r"\A[0-9]{1,12}(\.[0-9]{1,9})?\Z")


@given(st.uuids(version=4), st.sampled_from(["stream", "end"]), st.binary(max_size=300), TIMESTAMPS, st.booleans())
def test_message_parts_are_what_json_would_write(
    datapt: Any, state: str, frame: bytes, timestamp: str, advanced: bool
) -> None:
    datapt_id = str(datapt)
    frame_b64 = base64.b64encode(frame)
    parts = message_parts(datapt_id, state, frame_b64, timestamp, advanced)  # type: ignore[arg-type]
    expected = {"datapt_id": datapt_id, "state": state, "frame_data": frame_b64.decode(),
                "timestamp": timestamp, "advanced": advanced}
    assert json.loads(b"".join(parts)) == expected
    assert b"".join(parts) == json.dumps(expected).encode()
    assert parts[1] is frame_b64  # the frame is not copied


@given(st.text(max_size=30).filter(lambda t: TIMESTAMP_RE.match(t) is None))
def test_message_parts_refuse_any_other_timestamp(timestamp: str) -> None:
    with pytest.raises(ValueError, match="timestamp"):
        message_parts(new_datapt_id(), "stream", b"", timestamp, True)

