"""journald priorities: a <N> prefix on stdout lines only when stdout is the journal's stream."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest
import structlog

from caired import logging as clog
from caired.config import Config


@pytest.fixture
def stdout(tmp_path: Path) -> Iterator[TextIO]:
    with (tmp_path / "stdout").open("w+", encoding="utf-8") as stream:
        yield stream


def journal_stream(stream: TextIO) -> str:
    st = os.fstat(stream.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def log_every_level(stream: TextIO, tmp_path: Path) -> tuple[list[str], list[str]]:
    log_file = tmp_path / "caired.jsonl"
    clog.configure(Config.load(env={"CAIRED_LOG_FORMAT": "json", "CAIRED_LOG_LEVEL": "debug",
                                    "CAIRED_LOG_FILE": str(log_file)}), stdout=stream)
    log = structlog.get_logger()
    log.debug("a_debug_line")
    log.info("an_info_line", n=1)
    log.warning("a_warning_line")
    log.error("an_error_line", reason="x")
    stream.seek(0)
    return stream.read().splitlines(), log_file.read_text().splitlines()


def test_lines_get_their_priority_when_stdout_is_the_journal(
    stdout: TextIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream(stdout))
    out, in_file = log_every_level(stdout, tmp_path)

    assert [line[:3] for line in out] == ["<7>", "<6>", "<4>", "<3>"]
    # journald strips the prefix: what is left is the same JSON line the file gets
    assert [line[3:] for line in out] == in_file
    assert [json.loads(line)["event"] for line in in_file] == ["a_debug_line", "an_info_line", "a_warning_line",
                                                               "an_error_line"]


@pytest.mark.parametrize("value", [None, "", "1:2", "garbage", "12:"])
def test_no_prefix_without_the_journal_or_for_another_stream(
    stdout: TextIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    else:
        monkeypatch.setenv("JOURNAL_STREAM", value)  # "1:2": inherited from a parent whose stdout was the journal
    out, in_file = log_every_level(stdout, tmp_path)
    assert out == in_file
    assert all(line.startswith("{") for line in out)


def test_the_console_form_gets_no_prefix(stdout: TextIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream(stdout))
    clog.configure(Config.load(env={"CAIRED_LOG_FORMAT": "console"}), stdout=stdout)
    structlog.get_logger().warning("a_warning_line")
    stdout.seek(0)
    assert not stdout.read().startswith("<")
