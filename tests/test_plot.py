"""``caired plot``: reading sessions from a JSON log, merging rPPG windows, drawing, the CLI."""

from __future__ import annotations

import itertools
import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np
import pytest

from caired import plot
from caired.cli import main
from caired.errors import ExitCode, InputError, NoFramesError
from caired.plot import merge_windows, read_log, render

T0: Final = 1762439955.133
FPS: Final = 30.0
PULSE_HZ: Final = 1.2
DATAPT: Final = "0e06d32c-1afb-43de-994a-8293d96d5e05"


def _pulse(t: float) -> float:
    return round(math.sin(2 * math.pi * PULSE_HZ * (t - T0)), 4)


def _line(event: str, logged: float, **fields: Any) -> str:
    stamp = datetime.fromtimestamp(logged, UTC).isoformat().replace("+00:00", "Z")
    return json.dumps({"timestamp": stamp, "level": "info", "event": event, **fields})


def _response(session: str, logged: float, body: Any, datapt_id: str = DATAPT) -> str:
    return _line("response", logged, source="drop", session=session, datapt_id=datapt_id, attempt=1, response=body)


def _answer(hr: float | None, window: tuple[list[float], list[float]] | None, state: str = "ok") -> dict[str, Any]:
    inference = {} if hr is None else {"hr": hr}
    advanced = None if window is None else {"rppg": window[0], "rppg_timestamps": window[1]}
    return {"state": state, "socket_id": "c73bb619", "datapt_id": DATAPT, "inference": inference,
            "advanced": advanced, "confidence": {}, "feedback": None, "model_version": "HR"}


def _session_lines(session: str, *, seconds: float = 12.0, finished_hr: float | None = 71.0) -> list[str]:
    """Answers every 15 frames, each with the last 5 s of a 1.2 Hz sine: windows overlap by 4.5 s."""
    stamps = [T0 + i / FPS for i in range(round(seconds * FPS))]
    lines = [_line("session_started", T0, session=session, datapt_id=DATAPT)]
    for end in range(14, len(stamps), 15):
        window = [t for t in stamps[: end + 1] if t > stamps[end] - 5.0]
        hr = -1 if stamps[end] - T0 < 5.0 else 72
        lines.append(_response(session, stamps[end] + 0.25, _answer(hr, ([_pulse(t) for t in window], window))))
    last = stamps[-1] + 0.5
    lines.append(_response(session, last, _answer(finished_hr, None, state="finished")))
    lines.append(_line("session_finished", last, session=session, datapt_id=DATAPT, hr=70.5))
    return lines


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "caired.log"
    lines = [
        "caired starting, not JSON",
        *_session_lines("rec-000", seconds=8.0),
        "2026-11-20 22:50:01 [info     ] response   session=rec-001 response=state=ok hr=66",  # console form
        _response("rec-001", T0, "just a string"),  # not a dict: skipped
        _response("rec-001", T0, _answer(None, None)),  # warming up, no hr at all
        *_session_lines("rec-001"),
        '{"truncated": ',
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_merge_keeps_each_timestamp_once_and_the_later_window_wins() -> None:
    stamps = [T0 + i / FPS for i in range(90)]
    windows = [
        ([1.0] * 60, stamps[0:60]),
        ([2.0] * 60, stamps[15:75]),
        ([3.0] * 60, stamps[30:90]),
    ]
    values, merged = merge_windows(windows)
    assert merged == stamps  # strictly increasing, every sample, no duplicates
    assert values == [1.0] * 15 + [2.0] * 15 + [3.0] * 60


def test_merge_orders_samples_and_treats_microsecond_equal_stamps_as_one() -> None:
    values, stamps = merge_windows([([0.5, 0.25], [T0 + 1, T0]), ([0.75, 0.1], [T0 + 1 + 1e-8, T0 + 2])])
    assert stamps == [T0, T0 + 1 + 1e-8, T0 + 2]
    assert values == [0.25, 0.75, 0.1]
    assert merge_windows([]) == ([], [])


def test_merged_windows_of_a_log_reproduce_the_sine(log: Path) -> None:
    session = read_log(log, "rec-001")
    values, stamps = merge_windows((r.values, r.stamps) for r in session.readings if r.stamps)
    assert len(stamps) == len(set(stamps)) == round(12.0 * FPS)  # every frame once
    assert all(a < b for a, b in itertools.pairwise(stamps))
    assert values == [_pulse(t) for t in stamps]


def test_read_log_takes_the_latest_session_and_its_final_hr(log: Path) -> None:
    session = read_log(log)
    assert session.name == "rec-001"
    assert session.datapt_id == DATAPT and session.source == "drop"
    assert [r.state for r in session.readings].count("finished") == 1
    # The warm-up answer, one window per 15 of the 360 frames, 'finished'; the string answer is skipped.
    assert len(session.readings) == 1 + 24 + 1
    # Windows ending before 5 s carry hr -1 (10 of them), which counts as no HR.
    assert [r.hr for r in session.readings if r.hr is not None] == [72.0] * 14 + [71.0]
    assert session.final_hr == 71.0  # the finished answer wins over session_finished's 70.5
    assert read_log(log, "rec-000").readings[0].stamps[0] == T0


def test_session_finished_hr_is_used_when_the_finished_answer_has_none(tmp_path: Path) -> None:
    path = tmp_path / "run.log"
    path.write_text("\n".join(_session_lines("rec-9", finished_hr=-1)) + "\n")
    assert read_log(path).final_hr == 70.5


def test_the_picture_is_the_expected_size_and_shows_both_curves(log: Path) -> None:
    image = render(read_log(log))
    assert image.shape == (700, 1200, 3)
    assert float(image.std()) > 10.0

    def count(colour: tuple[int, int, int], rows: slice) -> int:
        close = np.abs(image[rows].astype(int) - np.array(colour)).sum(axis=2) < 60
        return int(close.sum())

    assert count(plot._PULSE, slice(118, 392)) > 2000  # the waveform, in the top panel
    assert count(plot._PULSE, slice(440, 700)) == 0
    assert count(plot._HR, slice(440, 628)) > 500  # the heart-rate line, in the bottom panel
    assert count(plot._FINAL, slice(0, 80)) > 200  # the final HR in the title


def test_a_session_without_rppg_or_hr_still_draws(tmp_path: Path) -> None:
    path = tmp_path / "bare.log"
    path.write_text(_response("bare", T0, _answer(-1, None)) + "\n")
    image = render(read_log(path))
    assert image.shape == (700, 1200, 3)
    assert int((np.abs(image.astype(int) - np.array(plot._PULSE)).sum(axis=2) < 60).sum()) == 0


def test_plot_writes_beside_the_log_by_default(log: Path) -> None:
    path, session = plot.plot(log)
    assert path == log.with_name("caired-rec-001.png")
    assert session.name == "rec-001"
    image = cv2.imread(str(path))
    assert image is not None and image.shape == (700, 1200, 3)
    assert sorted(p.name for p in log.parent.iterdir()) == ["caired-rec-001.png", "caired.log"]  # no temporary


def test_errors_say_what_is_wrong(tmp_path: Path, log: Path) -> None:
    with pytest.raises(InputError, match="no such file") as missing:
        read_log(tmp_path / "missing.log")
    assert missing.value.exit_code == ExitCode.NO_INPUT  # a missing input, as for 'caired stream'
    with pytest.raises(InputError, match="is a folder"):
        read_log(tmp_path)
    with pytest.raises(NoFramesError, match=r"rec-404.*rec-000, rec-001"):
        read_log(log, "rec-404")
    empty = tmp_path / "empty.log"
    empty.write_text("hello\n" + _line("session_started", T0, session="x") + "\n")
    with pytest.raises(NoFramesError, match="no session answers"):
        read_log(empty)


def _stdout_events(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_cli_draws_the_chosen_session(log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pictures" / "older.png"
    out.parent.mkdir()
    assert main(["plot", str(log), "--session", "rec-000", "-o", str(out), "--log-format", "json"]) == 0
    assert cv2.imread(str(out)).shape == (700, 1200, 3)
    (written,) = [e for e in _stdout_events(capsys.readouterr().out) if e["event"] == "plot_written"]
    assert written["path"] == str(out) and written["session"] == "rec-000" and written["final_hr"] == 71.0
    assert written["answers"] == 240 // 15 + 1


def test_cli_selects_by_datapt_id_too(log: Path, tmp_path: Path) -> None:
    out = tmp_path / "by-id.png"
    assert main(["plot", str(log), "--session", DATAPT, "-o", str(out)]) == 0
    assert out.exists()


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["plot", "{tmp}/nope.log"], ExitCode.NO_INPUT, "nope.log: no such file"),
        (["plot", "{log}", "--session", "rec-404"], ExitCode.NO_INPUT, "no answers for session 'rec-404'"),
        (["plot", "{tmp}/empty.log"], ExitCode.NO_INPUT, "no session answers"),
        (["plot", "{log}", "-o", "{tmp}/no/such/dir/x.png"], ExitCode.CANT_CREATE, "cannot write"),
    ],
)
def test_cli_errors_are_one_line_with_an_exit_code(
    log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], code: int, says: str
) -> None:
    (tmp_path / "empty.log").write_text("nothing here\n")
    argv = [a.format(tmp=tmp_path, log=log) for a in args]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("caired plot: ") and says in err


def test_a_session_name_with_quotes_and_accents_is_found(tmp_path: Path) -> None:
    name = 'Zoë "front door"'
    path = tmp_path / "odd.log"
    path.write_text("\n".join(_session_lines(name, seconds=6.0)) + "\n")  # written with \u00eb and \" escapes
    assert read_log(path, name).name == name
    assert len(read_log(path, name).readings) == 180 // 15 + 1
    written, _ = plot.plot(path, session=name)
    assert written.name == "odd-Zo_front_door.png"
