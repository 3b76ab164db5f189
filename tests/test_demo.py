"""``caired demo`` end to end (the README's first command), on a terminal and into a pipe."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

from caired.progress import CLEAR
from tests.conftest import cli_env

# The shortest demo the estimate allows, sent as fast as it goes.
DEMO = (sys.executable, "-m", "caired", "demo", "--seconds", "6", "--fps", "0", "--bpm", "72")
SUMMARY = re.compile(
    r"  heart rate estimated by the backend : [\d.]+ bpm\n"
    r"  true heart rate of the synthetic face: 72\.0 bpm   \(error [+-][\d.]+ bpm\)\n"
    r"  frames sent: 180   attempts: 1   took [\d.]+ s\n"
)


def test_off_a_terminal_stdout_is_the_summary_alone_and_the_log_is_in_its_file(tmp_path: Path) -> None:
    done = subprocess.run([*DEMO, "--dir", str(tmp_path)], capture_output=True, text=True, env=cli_env(),
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no progress line off a terminal
    log, result = tmp_path / "caired.jsonl", next((tmp_path / "spool" / "done").glob("*/result.json"))
    assert SUMMARY.match(done.stdout)
    assert done.stdout[SUMMARY.match(done.stdout).end():] == f"  log:         {log}\n  result.json: {result}\n"
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert events[0] == "backend_listening" and "session_finished" in events and "response" in events


def test_on_a_terminal_the_progress_line_never_shares_a_line_with_the_log() -> None:
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(DEMO, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
                                env=cli_env(NO_COLOR="1", COLUMNS="500"))
        os.close(terminal)
        sent = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            sent += chunk
        assert proc.wait(timeout=120) == 0
    finally:
        os.close(controller)
    text = sent.decode().replace("\r\n", "\n")
    screen = [line.rsplit(CLEAR, 1)[-1] for line in text.split("\n")]  # what each line shows in the end
    progress = re.compile(r"backend received \d+/180 frames · (HR (warming up|[\d.]+ bpm)|waiting for the daemon)")
    assert progress.search(text)  # the line was drawn while the log went on
    assert [line for line in screen if "backend received" in line] == []  # cleared before each log line, and at the end
    logged = [line for line in screen if re.match(r"\d{4}-\d\d-\d\dT[\d:.]+Z \[", line)]
    assert any("session_finished" in line for line in logged) and any("response" in line for line in logged)
    assert SUMMARY.search("\n".join(screen))
