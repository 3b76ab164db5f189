"""Ground truth: a session's reference pulse, parsed from what a lab or a dataset ships, and its HR.

Three forms are read, each from bytes already read safely (capped, no link followed):

- ``reference.csv``: a header ``timestamp,hr`` or ``timestamp,ppg`` (UNIX seconds, like
  the frames), or ``seconds,hr`` / ``seconds,ppg`` (seconds from the session's first frame);
- UBFC-rPPG's ``ground_truth.txt``: three lines of numbers (PPG, HR, seconds from the
  video's start);
- PURE's session JSON: ``/FullPackage`` (the oximeter's ``waveform``, nanosecond
  timestamps) and ``/Image`` (each frame's nanosecond timestamp).

Every parser raises GroundTruthError (a ValueError) with one line for anything else,
whatever the bytes hold. The HR over a window is the mean of the HR samples in it, or,
for a PPG, the peak of its spectrum between 0.7 and 3.5 Hz (42-210 bpm) after resampling
at 30 Hz, detrending and a Hann window, as rPPG-Toolbox derives ground-truth HR.
"""

from __future__ import annotations

import csv
import io
import json
import math
from decimal import Decimal, InvalidOperation
from typing import Any, Final, Literal

import attrs
import numpy as np
import numpy.typing as npt

from caired.errors import GroundTruthError

Kind = Literal["hr", "ppg"]
Floats = npt.NDArray[np.float64]

MAX_SAMPLES: Final = 10_000_000
HR_BAND: Final = (0.7, 3.5)  # Hz: 42-210 bpm
RESAMPLE_HZ: Final = 30.0
MIN_PPG_SECONDS: Final = 5.0  # shorter than this, a spectrum cannot tell one bpm from the next
SERIES_WINDOW: Final = 10.0  # seconds per point of the HR series drawn from a PPG
SERIES_STEP: Final = 1.0
_PAD_TO: Final = 1 << 16  # zero padding: ~0.03 bpm between spectrum bins at 30 Hz


@attrs.frozen
class Reference:
    """A reference signal: sample times (UNIX seconds, ascending), values, what they are and where from."""

    kind: Kind
    times: Floats = attrs.field(eq=False)
    values: Floats = attrs.field(eq=False)
    origin: str


@attrs.frozen
class Estimate:
    """The reference HR over a window, and how it was derived."""

    hr: float
    method: str
    start: float
    end: float


def _check(kind: Kind, times: list[float], values: list[float], origin: str) -> Reference:
    if len(times) < 2:
        raise GroundTruthError(f"{origin}: fewer than two samples")
    if len(times) > MAX_SAMPLES:
        raise GroundTruthError(f"{origin}: more than {MAX_SAMPLES} samples")
    t = np.asarray(times, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(v))):
        raise GroundTruthError(f"{origin}: a value is not a finite number")
    if np.any(np.diff(t) <= 0):
        raise GroundTruthError(f"{origin}: the timestamps are not strictly increasing")
    if kind == "hr" and np.any((v < 0) | (v > 300)):
        raise GroundTruthError(f"{origin}: an HR outside 0-300 bpm")
    return Reference(kind, t, v, origin)


def _number(text: str, origin: str, where: str) -> float:
    try:
        value = float(Decimal(text.strip()))
    except (InvalidOperation, ValueError, OverflowError):
        raise GroundTruthError(f"{origin}: {where}: {text.strip()[:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise GroundTruthError(f"{origin}: {where}: not a finite number")
    return value


def _text(data: bytes, origin: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise GroundTruthError(f"{origin}: not UTF-8 text") from None


def parse_csv(data: bytes, *, first_frame: float, origin: str = "reference.csv") -> Reference:
    """``timestamp,hr|ppg`` (UNIX seconds) or ``seconds,hr|ppg`` (seconds from ``first_frame``)."""
    rows = csv.reader(io.StringIO(_text(data, origin), newline=""))
    try:
        header = [cell.strip().lower() for cell in next(rows)]
    except StopIteration:
        raise GroundTruthError(f"{origin}: empty (expected a header timestamp,hr or timestamp,ppg)") from None
    except csv.Error as exc:
        raise GroundTruthError(f"{origin}: not CSV: {exc}") from None
    if len(header) != 2 or header[0] not in ("timestamp", "seconds") or header[1] not in ("hr", "ppg"):
        shown = ",".join(header)[:60]
        raise GroundTruthError(f"{origin}: the header is {shown!r}; expected timestamp,hr or timestamp,ppg "
                             "(or seconds,hr / seconds,ppg, from the first frame)")
    offset = first_frame if header[0] == "seconds" else 0.0
    times: list[float] = []
    values: list[float] = []
    try:
        for line, row in enumerate(rows, start=2):
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != 2:
                raise GroundTruthError(f"{origin}: line {line}: {len(row)} fields, expected 2")
            times.append(offset + _number(row[0], origin, f"line {line}"))
            values.append(_number(row[1], origin, f"line {line}"))
            if len(times) > MAX_SAMPLES:
                raise GroundTruthError(f"{origin}: more than {MAX_SAMPLES} samples")
    except csv.Error as exc:
        raise GroundTruthError(f"{origin}: not CSV: {exc}") from None
    kind: Kind = "hr" if header[1] == "hr" else "ppg"
    return _check(kind, times, values, origin)


def parse_ubfc(data: bytes, *, start: float, origin: str = "ground_truth.txt") -> Reference:
    """UBFC-rPPG's ground truth: line 1 the PPG, line 2 the HR, line 3 seconds from the video's start."""
    lines = [line for line in _text(data, origin).splitlines() if line.strip()]
    if len(lines) < 3:
        raise GroundTruthError(f"{origin}: {len(lines)} lines; UBFC-rPPG ground truth has 3 (PPG, HR, seconds)")
    fields = [line.replace(",", " ").split() for line in lines[:3]]
    if len(fields[0]) > MAX_SAMPLES:
        raise GroundTruthError(f"{origin}: more than {MAX_SAMPLES} samples")
    if not len(fields[0]) == len(fields[2]):
        raise GroundTruthError(f"{origin}: {len(fields[0])} PPG samples but {len(fields[2])} times")
    ppg = [_number(cell, origin, "line 1") for cell in fields[0]]
    seconds = [_number(cell, origin, "line 3") for cell in fields[2]]
    return _check("ppg", [start + s for s in seconds], ppg, origin + " (UBFC-rPPG PPG)")


def _depth_ok(value: Any, limit: int = 32) -> bool:
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


def parse_pure(data: bytes, *, origin: str) -> tuple[Reference, tuple[int, ...]]:
    """PURE's session JSON: the oximeter's waveform and the frames' nanosecond timestamps."""
    try:
        document = json.loads(_text(data, origin))
    except (ValueError, RecursionError) as exc:
        raise GroundTruthError(f"{origin}: not JSON: {str(exc).splitlines()[0][:80] if str(exc) else ''}") from None
    if not isinstance(document, dict) or not _depth_ok(document):
        raise GroundTruthError(f"{origin}: not a PURE session (expected an object with /FullPackage and /Image)")
    package, images = document.get("/FullPackage"), document.get("/Image")
    missing = [key for key, value in (("/FullPackage", package), ("/Image", images)) if not isinstance(value, list)]
    if missing:
        raise GroundTruthError(f"{origin}: no {' and no '.join(missing)} list, as a PURE session has")
    assert isinstance(package, list) and isinstance(images, list)
    stamps: list[int] = []
    for i, entry in enumerate(images):
        stamp = entry.get("Timestamp") if isinstance(entry, dict) else None
        if not isinstance(stamp, int) or isinstance(stamp, bool) or stamp <= 0:
            raise GroundTruthError(f"{origin}: /Image[{i}] has no integer Timestamp")
        stamps.append(stamp)
    times: list[float] = []
    wave: list[float] = []
    for i, entry in enumerate(package):
        stamp = entry.get("Timestamp") if isinstance(entry, dict) else None
        value = entry.get("Value") if isinstance(entry, dict) else None
        if not isinstance(stamp, int) or isinstance(stamp, bool) or not isinstance(value, dict):
            raise GroundTruthError(f"{origin}: /FullPackage[{i}] has no integer Timestamp and Value")
        w = value.get("waveform")
        if not isinstance(w, int | float) or isinstance(w, bool):
            raise GroundTruthError(f"{origin}: /FullPackage[{i}] has no numeric waveform")
        times.append(stamp / 1e9)
        wave.append(float(w))
    return _check("ppg", times, wave, origin + " (PURE oximeter waveform)"), tuple(stamps)


def _inside(ref: Reference, start: float, end: float) -> tuple[Floats, Floats]:
    keep = (ref.times >= start) & (ref.times <= end)
    return ref.times[keep], ref.values[keep]


def _spectral_hr(times: Floats, values: Floats) -> float | None:
    if len(times) < 4 or times[-1] - times[0] < MIN_PPG_SECONDS:
        return None
    grid = np.arange(times[0], times[-1], 1.0 / RESAMPLE_HZ)
    signal = np.interp(grid, times, values)
    signal = signal - np.polyval(np.polyfit(grid - grid[0], signal, 1), grid - grid[0])
    if not np.any(signal):
        return None
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal)), n=max(_PAD_TO, len(signal))))
    freqs = np.fft.rfftfreq(max(_PAD_TO, len(signal)), 1.0 / RESAMPLE_HZ)
    band = np.flatnonzero((freqs >= HR_BAND[0]) & (freqs <= HR_BAND[1]))
    peak = int(band[np.argmax(spectrum[band])])
    return float(freqs[peak] * 60.0)


def window_hr(ref: Reference, start: float, end: float) -> Estimate | None:
    """The reference HR over [start, end] (the streamed frames' first and last timestamps), or None."""
    times, values = _inside(ref, start, end)
    if ref.kind == "hr":
        if not len(values):
            return None
        return Estimate(round(float(values.mean()), 2), f"mean of {len(values)} HR samples of {ref.origin}",
                        start, end)
    hr = _spectral_hr(times, values)
    if hr is None:
        return None
    method = (f"spectral peak ({HR_BAND[0]:g}-{HR_BAND[1]:g} Hz) of {ref.origin} over "
              f"{times[-1] - times[0]:.1f} s")
    return Estimate(round(hr, 2), method, start, end)


def hr_series(ref: Reference, start: float, end: float) -> tuple[list[float], list[float]]:
    """The reference HR over time, for drawing: the HR samples, or the PPG's HR in sliding 10 s windows."""
    times, values = _inside(ref, start, end)
    if ref.kind == "hr":
        return [round(float(t), 3) for t in times], [round(float(v), 2) for v in values]
    xs: list[float] = []
    ys: list[float] = []
    at = start
    while at + SERIES_WINDOW <= end + 1e-9:
        keep = (times >= at) & (times <= at + SERIES_WINDOW)
        hr = _spectral_hr(times[keep], values[keep])
        if hr is not None:
            xs.append(round(at + SERIES_WINDOW / 2, 3))
            ys.append(round(hr, 2))
        at += SERIES_STEP
    return xs, ys
