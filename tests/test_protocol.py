"""The wire contract's pure parts: messages, URLs, redaction, answers, close codes."""

from __future__ import annotations

import json

import pytest

from caired.protocol import (
    UUID4_RE,
    CloseKind,
    auth_headers,
    build_url,
    classify_close,
    classify_status,
    encode_message,
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
