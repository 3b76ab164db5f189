"""The log: one whole JSON line per event, whatever the event holds."""

from __future__ import annotations

import io
import json
import os

import structlog

from caired import logging as clog
from caired.config import Config
from tests.conftest import SECRET_KEY


def configured(**env: str) -> io.StringIO:
    out = io.StringIO()
    clog.configure(Config.load(env={"CAIRED_LOG_FORMAT": "json", **env}), stdout=out)
    return out


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_name_that_is_not_utf8_is_logged_escaped() -> None:
    out = configured()
    name = os.fsdecode(b"caf\xe9-\xff")  # Latin-1 bytes, as a camera's SD card may name a folder
    structlog.get_logger().info("incoming_ignored", name=name, response={"text": "\udc80"})
    [line] = lines(out)
    # As fsops.shown() shows it: the bytes as \\xNN, readable by jq and by a person.
    assert line["name"] == "caf\\xe9-\\xff" and line["response"] == {"text": "\\x80"}


def test_an_event_too_deep_to_render_still_gives_a_line() -> None:
    out = configured()
    deep: list[object] = []
    for _ in range(5000):
        deep = [deep]
    structlog.get_logger().info("response", response=deep)
    [line] = lines(out)
    assert line["event"] == "response" and "RecursionError" in str(line["unrenderable"])


def test_an_internal_error_carries_its_traceback_without_the_key() -> None:
    out = configured(API_KEY=SECRET_KEY)
    try:
        raise RuntimeError(f"failed with api_key={SECRET_KEY}")
    except RuntimeError:
        structlog.get_logger().error("internal_error", exc_info=True)
    [line] = lines(out)
    assert "Traceback" in str(line["exception"]) and "RuntimeError" in str(line["exception"])
    assert SECRET_KEY not in out.getvalue()
