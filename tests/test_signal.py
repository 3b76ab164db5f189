"""Signal quality made visible: warm-up answers, confidence and feedback in the progress line,
in result.json's summary, in the process's counters and on caired plot's picture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import trio
import trio.testing

from caired import plot
from caired.attempt import Tally, stream
from caired.progress import render
from caired.protocol import parse_answer
from caired.session import Delivered
from caired.stats import Stats
from tests.test_attempt import DATAPT, FakeSocket, feed_of, frames
from tests.test_plot import T0, _answer, _line, _response

ANSWERS: list[dict[str, Any]] = [
    {"state": "ok", "inference": {"hr": -1}, "confidence": {}, "feedback": None},  # warming up
    {"state": "ok", "inference": {}, "confidence": None, "feedback": "move closer to the camera"},  # warming up
    {"state": "ok", "inference": {"hr": 71}, "confidence": {"hr": 0.42}, "feedback": None},
    {"state": "ok", "inference": {"hr": 72}, "confidence": {}, "feedback": None},
]


class ScriptedSocket(FakeSocket):
    """Answers one scripted message per frame, then 'finished'."""

    async def send_message(self, message: str | bytes) -> None:
        await super().send_message(message)
        frames_sent = sum(1 for _, p in self.sent if p["state"] == "stream")
        if self.sent[-1][1]["state"] == "stream" and frames_sent <= len(ANSWERS):
            self.inbox_send.send_nowait(json.dumps(ANSWERS[frames_sent - 1]))


def test_an_answer_says_whether_the_model_warms_up_and_what_it_reports() -> None:
    warm, missing, confident, plain = (parse_answer(json.dumps(a)) for a in ANSWERS)
    assert (warm.warming_up, missing.warming_up, confident.warming_up, plain.warming_up) == (True, True, False, False)
    assert (warm.confidence, warm.feedback) == (None, None)  # {} and null carry nothing
    assert missing.feedback == "move closer to the camera"
    assert confident.confidence == {"hr": 0.42}
    assert not parse_answer(b"\x00binary").warming_up and not parse_answer("not json").warming_up


async def test_the_attempt_keeps_a_summary_and_counts_for_the_metrics(autojump_clock: trio.testing.MockClock) -> None:
    ws, stats, tally = ScriptedSocket(), Stats(), Tally()
    finished = await stream(ws, feed_of(frames(6)), datapt_id=DATAPT, fps=30.0, advanced=True, finish_timeout=5,
                            tally=tally, stats=stats)

    assert finished.signal == {"answers_with_hr": 3, "warmup_answers": 2, "last_confidence": {"hr": 0.42},
                               "last_feedback": "move closer to the camera"}  # 'finished' carries hr 65: 3 with HR
    assert (stats.answers, stats.answers_with_hr, stats.answers_warmup) == (5, 3, 2)
    assert stats.frames_sent == 6
    sent_bytes = sum(len(json.dumps(p)) for _, p in ws.sent)
    assert stats.bytes_sent == sent_bytes  # every message, the end message too
    delivered = Delivered(name="rec", datapt_id=DATAPT, attempts=1, finished=finished, started_at=T0, ended_at=T0 + 1)
    assert delivered.result()["signal"] == finished.signal


def test_the_progress_line_tells_warm_up_confidence_and_feedback() -> None:
    tally = Tally(total=300, sent=90, started=1.0)
    assert render(tally, 4.0).endswith("HR warming up")  # no answer yet
    tally.count(parse_answer(json.dumps(ANSWERS[0])))
    assert "HR warming up (1 answer without HR)" in render(tally, 4.0)
    tally.count(parse_answer(json.dumps(ANSWERS[1])))
    line = render(tally, 4.0)
    assert "HR warming up (2 answers without HR)" in line
    assert 'feedback "move closer to the camera"' in line
    tally.count(parse_answer(json.dumps(ANSWERS[2])))
    assert render(tally, 4.0) == ('sent 90/300 frames ·  30.0 fps · HR 71 bpm · confidence 0.42 · '
                                  'feedback "move closer to the camera"')


def quality_log(tmp_path: Path, *, warmup: bool, feedback: bool) -> Path:
    lines = []
    stamps = [T0 + i / 30 for i in range(300)]
    for n, end in enumerate(range(14, 300, 15)):
        window = stamps[max(0, end - 60): end + 1]
        hr = -1 if warmup and n < 6 else 70 + n % 3
        body = _answer(hr, ([0.0 for _ in window], window))
        if feedback and n in (8, 12):
            body["feedback"] = "too dark"
        if n == 15:
            body["confidence"] = {"hr": 0.9}
        lines.append(_response("rec", stamps[end] + 0.2, body))
    lines.append(_line("session_finished", stamps[-1] + 0.5, session="rec", hr=71.0))
    path = tmp_path / f"log-{warmup}-{feedback}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def pixels(image: np.ndarray[Any, Any], colour: tuple[int, int, int], rows: slice) -> int:
    return int((np.abs(image[rows].astype(int) - np.array(colour)).sum(axis=2) < 40).sum())


def test_the_plot_marks_warm_up_and_feedback_answers(tmp_path: Path) -> None:
    both = plot.read_log(quality_log(tmp_path, warmup=True, feedback=True))
    assert sum(r.warmup for r in both.readings) == 6
    assert [r.feedback for r in both.readings if r.feedback] == ["too dark", "too dark"]
    image = plot.render(both)
    floor, ceiling = slice(600, 629), slice(420, 455)  # the HR panel's lower edge; its top edge and legend
    assert pixels(image, plot.WARMUP, floor) > 100
    assert pixels(image, plot.FEEDBACK, ceiling) > 40

    plain = plot.render(plot.read_log(quality_log(tmp_path, warmup=False, feedback=False)))
    assert pixels(plain, plot.WARMUP, slice(0, 700)) == 0
    assert pixels(plain, plot.FEEDBACK, slice(0, 700)) == 0
