"""The backend's HR against the reference, across sessions: the figures the rPPG literature reports.

Sessions come from logs (``session_finished`` and ``reference_hr`` lines, joined by
``datapt_id``), from ``result.json`` files, or from a spool (its ``done/*/result.json``).
The figures: MAE, RMSE, MAPE, Pearson's r, and the Bland-Altman bias with its 95% limits
of agreement (bias +- 1.96 SD of the differences), each a closed form in numpy; the
Bland-Altman plot is drawn with OpenCV, as ``caired plot`` draws, so no plotting
library is needed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Final

import attrs
import numpy as np

from caired.errors import NoFramesError

MAX_LINE: Final = 4 * 1024 * 1024  # a log line longer than this is not one caired wrote
MAX_RESULT: Final = 16 * 1024 * 1024


@attrs.frozen
class Row:
    session: str
    datapt_id: str
    hr: float | None  # the backend's
    reference_hr: float | None
    method: str = ""
    origin: str = ""  # the file it came from

    @property
    def paired(self) -> bool:
        return self.hr is not None and self.reference_hr is not None

    @property
    def error(self) -> float | None:
        return round(self.hr - self.reference_hr, 2) if self.hr is not None and self.reference_hr is not None else None


def _hr(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def _json_lines(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as handle:
        for line in handle:
            if len(line) > MAX_LINE:
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict):
                yield record


def from_log(path: Path) -> list[Row]:
    """Sessions of a caired log: their last ``session_finished`` HR and their ``reference_hr``."""
    finished: dict[str, dict[str, Any]] = {}
    references: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for record in _json_lines(path):
        key = record.get("datapt_id")
        if not isinstance(key, str):
            continue
        if record.get("event") == "session_finished":
            if key not in finished and key not in references:
                order.append(key)
            finished[key] = record
        elif record.get("event") == "reference_hr":
            if key not in finished and key not in references:
                order.append(key)
            references[key] = record
    rows = []
    for key in order:
        if key not in finished:
            continue  # a session that did not finish has no HR to compare
        done, ref = finished[key], references.get(key, {})
        rows.append(Row(str(done.get("session", key)), key, _hr(done.get("hr")), _hr(ref.get("reference_hr")),
                        str(ref.get("reference_method", ref.get("problem", ""))), str(path)))
    return rows


def from_result(path: Path) -> Row:
    with path.open("rb") as handle:
        data = handle.read(MAX_RESULT + 1)
    try:
        result = json.loads(data) if len(data) <= MAX_RESULT else None
    except (ValueError, RecursionError):
        result = None
    if not isinstance(result, dict):
        raise NoFramesError(f"{path}: not a result.json (no JSON object)")
    return Row(str(result.get("session", path.parent.name)), str(result.get("datapt_id", "")), _hr(result.get("hr")),
               _hr(result.get("reference_hr")),
               str(result.get("reference_method", result.get("reference_problem", "")) or ""), str(path))


def collect(paths: Iterable[Path]) -> list[Row]:
    """Every session the paths hold: logs, result.json files, spools (done/), session folders."""
    rows: list[Row] = []
    for path in paths:
        try:
            rows.extend(_collect_one(path))
        except OSError as exc:
            raise NoFramesError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    return rows


def _collect_one(path: Path) -> list[Row]:
    if path.is_dir():
        done = path / "done"
        if done.is_dir():
            results = (done / name / "result.json" for name in sorted(os.listdir(done)))
            return [from_result(result) for result in results if result.is_file()]
        if (path / "result.json").is_file():
            return [from_result(path / "result.json")]
        raise NoFramesError(f"{path}: neither a spool (no done/) nor a session folder (no result.json)")
    if path.is_file():
        return [from_result(path)] if path.name.endswith("result.json") else from_log(path)
    raise NoFramesError(f"{path}: no such file or folder")


def metrics(rows: Iterable[Row]) -> dict[str, float | int | None]:
    """MAE, RMSE, MAPE (%), Pearson's r, bias and 95% limits of agreement, over the paired sessions."""
    pairs = [(row.hr, row.reference_hr) for row in rows if row.hr is not None and row.reference_hr is not None]
    est = np.array([p[0] for p in pairs], dtype=np.float64)
    ref = np.array([p[1] for p in pairs], dtype=np.float64)
    n = len(pairs)
    if not n:
        return {"n": 0}
    diff = est - ref
    sd = float(diff.std(ddof=1)) if n > 1 else 0.0
    r: float | None = None
    if n > 2 and est.std() > 0 and ref.std() > 0:
        r = round(float(np.corrcoef(est, ref)[0, 1]), 4)
    bias = float(diff.mean())
    return {
        "n": n,
        "mae": round(float(np.abs(diff).mean()), 4),
        "rmse": round(float(np.sqrt((diff**2).mean())), 4),
        "mape": round(float((np.abs(diff) / ref).mean() * 100.0), 4),
        "pearson_r": r,
        "bias": round(bias, 4),
        "loa_low": round(bias - 1.96 * sd, 4),
        "loa_high": round(bias + 1.96 * sd, 4),
    }


def table(rows: list[Row], figures: dict[str, float | int | None]) -> str:
    lines = [f"{'session':<28} {'backend HR':>10} {'reference':>10} {'error':>8}  reference from"]
    for row in rows:
        if not row.paired:
            continue
        lines.append(f"{row.session[:28]:<28} {row.hr:>10.1f} {row.reference_hr:>10.1f} {row.error:>+8.1f}  "
                     f"{row.method[:60]}")
    missing = [row for row in rows if not row.paired]
    if missing:
        lines.append("")
        lines.append("without a reference HR or a backend HR:")
        for row in missing:
            why = "no backend HR" if row.hr is None else (row.method or "no reference")
            lines.append(f"  {row.session[:40]:<40} {why[:70]}")
    lines.append("")
    if figures.get("n"):
        r = figures["pearson_r"]
        lines.append(f"n {figures['n']}   MAE {figures['mae']:.2f} bpm   RMSE {figures['rmse']:.2f} bpm   "
                     f"MAPE {figures['mape']:.2f}%   Pearson r {'n/a' if r is None else f'{r:.3f}'}")
        lines.append(f"Bland-Altman: bias {figures['bias']:+.2f} bpm, 95% limits of agreement "
                     f"{figures['loa_low']:+.2f} to {figures['loa_high']:+.2f} bpm")
    return "\n".join(lines)


def as_json(rows: list[Row], figures: dict[str, float | int | None]) -> dict[str, Any]:
    return {
        "metrics": figures,
        "sessions": [{"session": r.session, "datapt_id": r.datapt_id, "hr": r.hr, "reference_hr": r.reference_hr,
                      "error_bpm": r.error, "reference_method": r.method, "from": r.origin}
                     for r in rows if r.paired],
        "without_reference": [{"session": r.session, "datapt_id": r.datapt_id, "hr": r.hr, "why": r.method,
                               "from": r.origin} for r in rows if not r.paired],
    }


def bland_altman(rows: list[Row], *, size: tuple[int, int] = (800, 560)) -> np.ndarray:
    """The Bland-Altman plot: each session's mean of the two HRs against their difference, bias and limits."""
    import cv2

    width, height = size
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    pairs = [(row.hr, row.reference_hr) for row in rows if row.hr is not None and row.reference_hr is not None]
    figures = metrics(rows)
    left, right, top, bottom = 80, width - 30, 50, height - 60
    if not pairs:
        return canvas
    means = [(a + b) / 2 for a, b in pairs]
    diffs = [a - b for a, b in pairs]
    lo_x, hi_x = min(means) - 5, max(means) + 5
    span_y = max([abs(d) for d in diffs] + [abs(float(figures["loa_low"] or 0)), abs(float(figures["loa_high"] or 0)),
                                            2.0]) * 1.2

    def px(x: float, y: float) -> tuple[int, int]:
        return (round(left + (x - lo_x) / (hi_x - lo_x) * (right - left)),
                round(bottom - (y + span_y) / (2 * span_y) * (bottom - top)))

    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.rectangle(canvas, (left, top), (right, bottom), (0, 0, 0), 1)
    for value, colour, label in ((float(figures["bias"] or 0), (200, 60, 0), "bias"),
                                 (float(figures["loa_low"] or 0), (60, 60, 200), "-1.96 SD"),
                                 (float(figures["loa_high"] or 0), (60, 60, 200), "+1.96 SD")):
        row_y = px(lo_x, value)[1]
        cv2.line(canvas, (left, row_y), (right, row_y), colour, 1, cv2.LINE_AA)
        cv2.putText(canvas, f"{label} {value:+.2f}", (right - 170, row_y - 5), font, 0.45, colour, 1, cv2.LINE_AA)
    zero = px(lo_x, 0.0)[1]
    cv2.line(canvas, (left, zero), (right, zero), (180, 180, 180), 1)
    for mean, diff in zip(means, diffs, strict=True):
        cv2.circle(canvas, px(mean, diff), 5, (40, 40, 40), -1, cv2.LINE_AA)
    for i in range(5):
        tick = lo_x + (hi_x - lo_x) * i / 4
        cv2.putText(canvas, f"{tick:.0f}", (px(tick, 0)[0] - 12, bottom + 20), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        level = -span_y + 2 * span_y * i / 4
        cv2.putText(canvas, f"{level:+.1f}", (10, px(lo_x, level)[1] + 5), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(canvas, f"Bland-Altman: backend HR - reference HR (bpm), n={len(pairs)}", (left, 30), font, 0.6,
                (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(canvas, "mean of backend and reference HR (bpm)", (left + 150, height - 15), font, 0.5, (0, 0, 0), 1,
                cv2.LINE_AA)
    return canvas
