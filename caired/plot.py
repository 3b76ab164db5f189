"""One session's answers as a picture: the rPPG waveform above, the heart rate below (``caired plot``).

The log is caired's JSON lines: the daemon's log file, a saved stdout, or journal
output whose lines end in the JSON object. ``response`` lines give the answers;
``session_finished`` gives the session's HR when the ``finished`` answer carries none.
Anything else (other events, non-JSON or console-form lines) is skipped.

Consecutive answers' rPPG windows overlap. They are merged by timestamp and the later
answer wins: its window was computed with more context, so its values are the better
ones, and each sample is drawn once.

Both panels share one time axis: seconds from the session's first rPPG timestamp (frame
time). An answer is placed at the end of its rPPG window; an answer without a window is
placed at its log time, shifted by the typical lag between frame time and log time of the
answers that have both. With no rPPG at all, the axis counts from the first answer.

Signal quality is marked on the heart-rate panel: an answer without an HR yet (``hr``
-1 or missing: the model warming up) as a violet triangle on the panel's floor, an answer
carrying ``feedback`` as a green tick on its ceiling; the title counts the warm-up
answers and gives the last ``confidence`` and ``feedback``.

Drawing is cv2 only, at twice the size and then downscaled, for smooth lines and text.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import attrs
import cv2
import numpy as np
import numpy.typing as npt

from caired import fsops
from caired.errors import InputError, NoFramesError, PlotWriteError
from caired.protocol import Answer, shown_signal

Canvas = npt.NDArray[np.uint8]
Colour = tuple[int, int, int]

SIZE: Final = (1200, 700)  # width, height of the PNG
_SCALE: Final = 2  # drawn this much larger, then downscaled
_FONT: Final = cv2.FONT_HERSHEY_SIMPLEX
_BOLD: Final = cv2.FONT_HERSHEY_DUPLEX
# BGR
_PAPER: Final[Colour] = (255, 255, 255)
_PANEL: Final[Colour] = (250, 248, 246)
_GRID: Final[Colour] = (228, 224, 222)
_AXIS: Final[Colour] = (140, 140, 140)
_INK: Final[Colour] = (40, 40, 40)
_MUTED: Final[Colour] = (120, 120, 120)
_PULSE: Final[Colour] = (70, 40, 200)
_HR: Final[Colour] = (150, 95, 25)
_FINAL: Final[Colour] = (0, 130, 240)
WARMUP: Final[Colour] = (200, 110, 200)  # answers without an HR yet (violet)
FEEDBACK: Final[Colour] = (60, 170, 60)  # answers carrying feedback (green)
REFERENCE: Final[Colour] = (120, 140, 0)  # the reference HR (teal): ground truth from the session's reference


@attrs.frozen
class Reading:
    """One server answer as logged."""

    state: str
    hr: float | None  # None while the model warms up (missing or -1)
    logged: float | None  # UNIX seconds of the log line
    values: tuple[float, ...] = ()  # the rPPG window ...
    stamps: tuple[float, ...] = ()  # ... and its timestamps
    warmup: bool = False  # no HR yet: hr -1 or missing
    confidence: Any = None  # the answer's confidence / feedback, when it carries any
    feedback: Any = None


@attrs.define
class SessionLog:
    """Everything the log says about one session."""

    name: str
    datapt_id: str = ""
    source: str = ""
    attempt: int | None = None
    readings: list[Reading] = attrs.field(factory=list)
    finished_hr: float | None = None  # the 'finished' answer's inference.hr
    reported_hr: float | None = None  # session_finished's hr
    reference_hr: float | None = None  # the reference HR over the streamed frames (reference_hr event)
    reference_series: list[tuple[float, float]] = attrs.field(factory=list)  # (UNIX seconds, bpm)
    reference_start: float | None = None  # the first frame's time, on the frames' clock

    @property
    def final_hr(self) -> float | None:
        return self.finished_hr if self.finished_hr is not None else self.reported_hr


def merge_windows(windows: Iterable[tuple[Sequence[float], Sequence[float]]]) -> tuple[list[float], list[float]]:
    """Overlapping ``(values, timestamps)`` windows as one signal: ``(values, timestamps)``, ascending.

    Each timestamp appears once; where windows overlap, the later window's value wins.
    Timestamps equal to the microsecond count as the same sample.
    """
    merged: dict[float, tuple[float, float]] = {}
    for values, stamps in windows:
        for value, stamp in zip(values, stamps, strict=True):
            merged[round(stamp, 6)] = (stamp, value)
    ordered = sorted(merged.values())
    return [value for _, value in ordered], [stamp for stamp, _ in ordered]


def read_log(path: Path, session: str | None = None) -> SessionLog:
    """The named session (matched by name or datapt_id), or the latest one with answers.

    The log is streamed, not loaded: once to find the latest session when none is named,
    once for the session's own lines. Answers of every attempt count; the title shows the
    datapt_id of the last.
    """
    if session is None:
        session = _latest_session(_records(_lines(path)))
        if session is None:
            raise NoFramesError(f"{path}: no session answers in this log")
    found = SessionLog(name=session)
    for record in _records(_lines(path), containing=session):
        if _session_key(record) == session or record.get("datapt_id") == session:
            _absorb(found, record)
    if not found.readings:
        known = ", ".join(_answered(_records(_lines(path)))[-5:]) or "none"
        raise NoFramesError(f"{path}: no answers for session {session!r} (sessions with answers: {known})")
    return found


def render(session: SessionLog, *, size: tuple[int, int] = SIZE) -> Canvas:
    """The picture of one session: title, rPPG panel, heart-rate panel, shared time axis."""
    width, height = size[0] * _SCALE, size[1] * _SCALE
    canvas = np.full((height, width, 3), _PAPER, dtype=np.uint8)
    values, stamps = merge_windows((r.values, r.stamps) for r in session.readings if r.stamps)
    origin, place = _time_base(session.readings, stamps)
    placed = [(x, r) for r in session.readings if r.hr is not None and (x := place(r)) is not None]
    hr_points = sorted((x, r.hr) for x, r in placed if r.hr is not None and r.state != "finished")
    finished = [(x, r.hr) for x, r in placed if r.hr is not None and r.state == "finished"]
    # The reference is on the frames' clock: against the rPPG timestamps when there are some, else from
    # the first frame, which the axis then takes to be the first answer's time.
    ref_origin = origin if stamps else (session.reference_start or 0.0)
    ref_points = [(t - ref_origin, hr) for t, hr in session.reference_series]
    xs = [t - origin for t in stamps] + [x for x, _ in hr_points + finished + ref_points]
    x_lo, x_hi = (min(0.0, *xs), max(xs)) if xs else (0.0, 1.0)
    if x_hi - x_lo < 1.0:
        x_hi = x_lo + 1.0

    _title(canvas, session, samples=len(stamps), hr_answers=len(hr_points))
    s = _SCALE
    left, right = 90 * s, width - 40 * s
    top = _Panel(canvas, (left, 118 * s, right, 392 * s), (x_lo, x_hi), _signal_range(values))
    bottom = _Panel(canvas, (left, 440 * s, right, 628 * s), (x_lo, x_hi),
                    _hr_range(hr_points + ref_points, finished, session))
    top.frame("rPPG signal (a.u.)", x_labels=False)
    bottom.frame("heart rate (bpm)", x_labels=True)
    since = "the first frame" if stamps else "the first answer"
    _text(canvas, f"time (s) from {since}", ((left + right) // 2, height - 22 * s), 0.55, _MUTED, "centre")

    if values:
        for run in _runs([t - origin for t in stamps], values):
            top.line(run, _PULSE, 2)
    else:
        top.note("no rPPG in these answers (advanced off?)")
    if session.final_hr is not None:
        bottom.hline(session.final_hr, _FINAL, f"final {session.final_hr:g} bpm")
    if len(ref_points) > 1:
        bottom.line(ref_points, REFERENCE, 2)
    elif ref_points:
        bottom.dot(ref_points[0], REFERENCE, 4)
    if session.reference_hr is not None:
        bottom.hline_right(session.reference_hr, REFERENCE, f"reference {session.reference_hr:g} bpm")
    if hr_points:
        bottom.line(hr_points, _HR, 2)
        for point in hr_points:
            bottom.dot(point, _HR, 4)
    else:
        bottom.note("no heart rate in these answers yet")
    for point in finished:
        bottom.ring(point, _FINAL, 7)
    quality_marks(bottom, session.readings, place)
    return np.asarray(cv2.resize(canvas, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)


def quality_marks(panel: _Panel, readings: list[Reading], place: Callable[[Reading], float | None]) -> None:
    """Warm-up answers on the panel's floor, answers with feedback on its ceiling."""
    s = _SCALE
    _, y0, x1, y1 = panel.box
    for reading in readings:
        x = place(reading)
        if x is None or not panel.xlim[0] <= x <= panel.xlim[1]:
            continue
        px, _ = panel.px(x, panel.ylim[0])
        if reading.warmup:
            tip = np.array([[px, y1 - 12 * s], [px - 6 * s, y1 - 2 * s], [px + 6 * s, y1 - 2 * s]], np.int32)
            cv2.fillPoly(panel.canvas, [tip], WARMUP, cv2.LINE_AA)
        if reading.feedback is not None:
            cv2.line(panel.canvas, (px, y0 + 2 * s), (px, y0 + 14 * s), FEEDBACK, 3 * s, cv2.LINE_AA)
    notes = []
    if any(r.warmup for r in readings):
        notes.append(("warm-up: no HR yet", WARMUP))
    if any(r.feedback is not None for r in readings):
        notes.append(("feedback", FEEDBACK))
    right = x1 - 8 * s
    for text, colour in notes:
        (w, _), _ = cv2.getTextSize(text, _FONT, 0.45 * s, s)
        _text(panel.canvas, text, (right, y0 - 10 * s), 0.45, colour, "right")
        right -= w + 16 * s


def plot(log: Path, *, session: str | None = None, output: Path | None = None) -> tuple[Path, SessionLog]:
    """Draw a session of ``log`` into a PNG (default ``<log stem>-<session>.png`` beside the log)."""
    found = read_log(log, session)
    if output is None:
        output = log.with_name(f"{log.stem}-{_safe(found.name)}.png")
    ok, png = cv2.imencode(".png", render(found))
    if not ok:
        raise PlotWriteError(f"{output}: cv2 could not encode the picture")
    try:
        fsops.write_bytes_atomic(output, png.data)
    except OSError as exc:
        raise PlotWriteError(f"{output}: cannot write the picture: {exc.strerror or exc}") from None
    return output, found


# Reading the log


def _lines(path: Path) -> Iterator[str]:
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            yield from fh
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a log file") from None
    except PermissionError:
        raise InputError(f"{path}: cannot be read (permission denied)") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read: {exc.strerror or exc}") from None


def _records(lines: Iterable[str], containing: str | None = None) -> Iterator[dict[str, Any]]:
    """The JSON objects of the log; a journal prefix before the ``{`` is allowed.

    With ``containing``, lines that cannot mention that string are skipped unparsed.
    """
    needles = () if containing is None else tuple(
        {json.dumps(containing, ensure_ascii=flag)[1:-1] for flag in (False, True)}
    )
    for line in lines:
        start = line.find("{")
        if start < 0 or (needles and not any(n in line for n in needles)):
            continue
        try:
            record = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(record, dict):
            yield record


def _session_key(record: dict[str, Any]) -> str | None:
    for key in ("session", "datapt_id"):
        value = record.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _is_answer(record: dict[str, Any]) -> bool:
    return record.get("event") == "response" and isinstance(record.get("response"), dict)


def _latest_session(records: Iterable[dict[str, Any]]) -> str | None:
    """The session with answers whose last line comes last."""
    last: dict[str, int] = {}
    answered: set[str] = set()
    for index, record in enumerate(records):
        key = _session_key(record)
        if key is None:
            continue
        last[key] = index
        if _is_answer(record):
            answered.add(key)
    candidates = [key for key in last if key in answered]
    return max(candidates, key=last.__getitem__) if candidates else None


def _answered(records: Iterable[dict[str, Any]]) -> list[str]:
    """The sessions with answers, in order of first answer."""
    names: dict[str, None] = {}
    for record in records:
        key = _session_key(record)
        if key is not None and _is_answer(record):
            names[key] = None
    return list(names)


def _absorb(session: SessionLog, record: dict[str, Any]) -> None:
    event = record.get("event")
    if isinstance(record.get("datapt_id"), str):
        session.datapt_id = record["datapt_id"]
    if isinstance(record.get("source"), str):
        session.source = record["source"]
    if isinstance(record.get("attempt"), int) and not isinstance(record.get("attempt"), bool):
        session.attempt = record["attempt"]
    if event == "session_finished":
        session.reported_hr = _number(record.get("hr"), minimum=0.0)
        return
    if event == "reference_hr":
        _absorb_reference(session, record)
        return
    response = record.get("response")
    if event != "response" or not isinstance(response, dict):
        return
    answer = Answer("json", response)
    state = answer.state or ""
    values, stamps = _window(response.get("advanced"))
    session.readings.append(Reading(state, answer.hr, _when(record.get("timestamp")), values, stamps,
                                    warmup=answer.warming_up, confidence=answer.confidence,
                                    feedback=answer.feedback))
    if state == "finished" and answer.hr is not None:
        session.finished_hr = answer.hr


def _absorb_reference(session: SessionLog, record: dict[str, Any]) -> None:
    """The reference HR and its series over time, as FolderSource logs them; malformed parts are left out."""
    session.reference_hr = _number(record.get("reference_hr"), minimum=0.0)
    window = record.get("window")
    if isinstance(window, list) and window:
        session.reference_start = _number(window[0])
    times, hrs = record.get("series_t"), record.get("series_hr")
    if isinstance(times, list) and isinstance(hrs, list) and len(times) == len(hrs):
        pairs = [(_number(t), _number(h, minimum=0.0)) for t, h in zip(times, hrs, strict=True)]
        session.reference_series = [(t, h) for t, h in pairs if t is not None and h is not None]


def _window(advanced: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """An answer's rPPG window; empty when missing or malformed (lengths differ, not numbers)."""
    if not isinstance(advanced, dict):
        return (), ()
    values, stamps = advanced.get("rppg"), advanced.get("rppg_timestamps")
    if not isinstance(values, list) or not isinstance(stamps, list) or len(values) != len(stamps):
        return (), ()
    pairs = [(_number(v), _number(t)) for v, t in zip(values, stamps, strict=True)]
    kept = [(v, t) for v, t in pairs if v is not None and t is not None]
    return tuple(v for v, _ in kept), tuple(t for _, t in kept)


def _number(value: Any, minimum: float = -math.inf) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= minimum else None


def _when(stamp: Any) -> float | None:
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp).timestamp()
    except ValueError:
        return None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "session"


# Drawing


def _time_base(readings: list[Reading], stamps: list[float]) -> tuple[float, Callable[[Reading], float | None]]:
    """The axis origin and a function placing an answer on the axis (None when it cannot be placed)."""
    lags = [r.stamps[-1] - r.logged for r in readings if r.stamps and r.logged is not None]
    if stamps:
        origin, lag = stamps[0], (statistics.median(lags) if lags else None)
    else:
        logged = [r.logged for r in readings if r.logged is not None]
        origin, lag = (min(logged) if logged else 0.0), 0.0

    def place(reading: Reading) -> float | None:
        if reading.stamps:
            return reading.stamps[-1] - origin
        if reading.logged is None or lag is None:
            return None
        return reading.logged + lag - origin

    return origin, place


def _runs(xs: list[float], ys: list[float]) -> Iterator[list[tuple[float, float]]]:
    """The signal split where frames are missing, so a gap is not drawn as a straight line."""
    steps = np.diff(xs)
    gap = max(0.5, 5.0 * float(np.median(steps))) if len(steps) else math.inf
    run: list[tuple[float, float]] = []
    for i, point in enumerate(zip(xs, ys, strict=True)):
        if run and xs[i] - xs[i - 1] > gap:
            yield run
            run = []
        run.append(point)
    if run:
        yield run


def _signal_range(values: list[float]) -> tuple[float, float]:
    if not values:
        return (-1.0, 1.0)
    lo, hi = min(values), max(values)
    pad = max((hi - lo) * 0.08, 1e-3)
    return (lo - pad, hi + pad)


def _hr_range(
    points: list[tuple[float, float]], finished: list[tuple[float, float]], session: SessionLog
) -> tuple[float, float]:
    levels = (session.final_hr, session.reference_hr)
    hrs = [hr for _, hr in points + finished] + [hr for hr in levels if hr is not None]
    if not hrs:
        return (40.0, 120.0)
    lo, hi = min(hrs), max(hrs)
    pad = max(5.0, (hi - lo) * 0.12)
    return (max(0.0, lo - pad), hi + pad)


def _ticks(lo: float, hi: float, target: int) -> tuple[list[float], int]:
    """Round tick values (1, 2, 5 x 10^k apart) covering [lo, hi], and the decimals they need."""
    raw = (hi - lo) / max(target, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1.0, 2.0, 5.0, 10.0) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]
    return ticks, max(0, -math.floor(math.log10(step) + 1e-9))


def _text(
    canvas: Canvas, text: str, at: tuple[int, int], scale: float, colour: Colour, align: str = "left",
    font: int = _FONT, thickness: int = 1,
) -> None:
    scale, thickness = scale * _SCALE, thickness * _SCALE
    (w, _), _ = cv2.getTextSize(text, font, scale, thickness)
    x, y = at
    if align == "centre":
        x -= w // 2
    elif align == "right":
        x -= w
    cv2.putText(canvas, text, (x, y), font, scale, colour, thickness, cv2.LINE_AA)


def _title(canvas: Canvas, session: SessionLog, *, samples: int, hr_answers: int) -> None:
    s = _SCALE
    width = canvas.shape[1]
    _text(canvas, f"Session {session.name}", (40 * s, 40 * s), 0.9, _INK, font=_BOLD)
    if session.final_hr is not None:
        _text(canvas, f"final HR {session.final_hr:g} bpm", (width - 40 * s, 40 * s), 0.9, _FINAL, "right",
              font=_BOLD)
    else:
        _text(canvas, "no final HR", (width - 40 * s, 40 * s), 0.8, _MUTED, "right")
    answers = len(session.readings)
    warmup = sum(r.warmup for r in session.readings)
    details = [f"datapt_id {session.datapt_id or '?'}",
               f"{answers} answer{'s' if answers != 1 else ''} ({hr_answers} with HR, {warmup} warm-up)",
               f"{samples} rPPG samples"]
    confidence = next((r.confidence for r in reversed(session.readings) if r.confidence is not None), None)
    feedback = next((r.feedback for r in reversed(session.readings) if r.feedback is not None), None)
    if confidence is not None:
        details.append(f"confidence {shown_signal(confidence, 20)}")
    if feedback is not None:
        details.append(f"feedback {shown_signal(feedback, 24)}")
    if session.source:
        details.append(f"source {session.source}")
    if session.attempt is not None:
        details.append(f"attempt {session.attempt}")
    _text(canvas, "   |   ".join(details), (40 * s, 68 * s), 0.5, _MUTED)


@attrs.define
class _Panel:
    """A plotting area: data coordinates in, canvas pixels out."""

    canvas: Canvas
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in canvas pixels
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def px(self, x: float, y: float) -> tuple[int, int]:
        x0, y0, x1, y1 = self.box
        fx = (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0])
        fy = (min(max(y, self.ylim[0]), self.ylim[1]) - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
        return (round(x0 + fx * (x1 - x0)), round(y1 - fy * (y1 - y0)))

    def frame(self, label: str, *, x_labels: bool) -> None:
        s = _SCALE
        x0, y0, x1, y1 = self.box
        cv2.rectangle(self.canvas, (x0, y0), (x1, y1), _PANEL, -1)
        xticks, xdec = _ticks(*self.xlim, target=12)
        for t in xticks:
            x, _ = self.px(t, self.ylim[0])
            cv2.line(self.canvas, (x, y0), (x, y1), _GRID, s)
            cv2.line(self.canvas, (x, y1), (x, y1 + 5 * s), _AXIS, s)
            if x_labels:
                _text(self.canvas, f"{t:.{xdec}f}", (x, y1 + 22 * s), 0.48, _INK, "centre")
        yticks, ydec = _ticks(*self.ylim, target=5)
        for t in yticks:
            _, y = self.px(self.xlim[0], t)
            cv2.line(self.canvas, (x0, y), (x1, y), _GRID, s)
            cv2.line(self.canvas, (x0 - 5 * s, y), (x0, y), _AXIS, s)
            _text(self.canvas, f"{t:.{ydec}f}", (x0 - 9 * s, y + 5 * s), 0.48, _INK, "right")
        cv2.rectangle(self.canvas, (x0, y0), (x1, y1), _AXIS, s)
        _text(self.canvas, label, (x0, y0 - 10 * s), 0.6, _INK, font=_BOLD)

    def line(self, points: list[tuple[float, float]], colour: Colour, thickness: int) -> None:
        pixels = np.array([self.px(x, y) for x, y in points], dtype=np.int32).reshape(-1, 1, 2)
        cv2.polylines(self.canvas, [pixels], False, colour, thickness * _SCALE, cv2.LINE_AA)

    def dot(self, point: tuple[float, float], colour: Colour, radius: int) -> None:
        cv2.circle(self.canvas, self.px(*point), radius * _SCALE, colour, -1, cv2.LINE_AA)

    def ring(self, point: tuple[float, float], colour: Colour, radius: int) -> None:
        cv2.circle(self.canvas, self.px(*point), radius * _SCALE, colour, 2 * _SCALE, cv2.LINE_AA)

    def hline(self, y: float, colour: Colour, label: str) -> None:
        """A dashed level line, labelled at its left end on a patch of panel colour (over any curve)."""
        s = _SCALE
        x0, _, x1, _ = self.box
        _, py = self.px(self.xlim[0], y)
        dash = 12 * s
        for x in range(x0, x1, 2 * dash):
            cv2.line(self.canvas, (x, py), (min(x + dash, x1), py), colour, 2 * s, cv2.LINE_AA)
        (w, h), _ = cv2.getTextSize(label, _FONT, 0.5 * s, s)
        cv2.rectangle(self.canvas, (x0 + 6 * s, py - h - 12 * s), (x0 + 14 * s + w, py - 4 * s), _PANEL, -1)
        _text(self.canvas, label, (x0 + 10 * s, py - 8 * s), 0.5, colour)

    def hline_right(self, y: float, colour: Colour, label: str) -> None:
        """A dotted level line, labelled at its right end (the left end is the final HR's)."""
        s = _SCALE
        x0, _, x1, _ = self.box
        _, py = self.px(self.xlim[0], y)
        for x in range(x0, x1, 10 * s):
            cv2.line(self.canvas, (x, py), (min(x + 4 * s, x1), py), colour, 2 * s, cv2.LINE_AA)
        (w, h), _ = cv2.getTextSize(label, _FONT, 0.5 * s, s)
        cv2.rectangle(self.canvas, (x1 - 14 * s - w, py + 4 * s), (x1 - 6 * s, py + h + 12 * s), _PANEL, -1)
        _text(self.canvas, label, (x1 - 10 * s - w, py + h + 8 * s), 0.5, colour)

    def note(self, text: str) -> None:
        x0, y0, x1, y1 = self.box
        _text(self.canvas, text, ((x0 + x1) // 2, (y0 + y1) // 2), 0.6, _MUTED, "centre")
