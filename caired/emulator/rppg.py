"""A real heart-rate estimate for the local backend: skin colour per frame, then POS.

Per frame, ``frame_rgb`` averages the skin of the central region (a YCrCb skin mask,
the whole region when too little of it looks like skin). ``PulseEstimator`` keeps
those means keyed by frame timestamp and, on demand:

1. resamples them onto a uniform 30 Hz grid by timestamp, so the frame rate and its
   jitter come from the timestamps, never from a frame count;
2. extracts the pulse with POS (Wang et al., "Algorithmic principles of remote PPG",
   IEEE TBME 2017): temporal normalisation over 1.6 s windows, projection onto the
   plane orthogonal to skin tone, alpha tuning, overlap-add;
3. band-passes 0.7-4 Hz (an FFT mask with cosine edges);
4. takes the spectral peak in 42-240 bpm from a zero-padded, Hann-windowed
   periodogram, refined by parabolic interpolation.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Final

import attrs
import cv2
import numpy as np
import numpy.typing as npt

from caired.frames import IHDR_END, PNG_SIGNATURE, png_size

Floats = npt.NDArray[np.float64]
RGB = tuple[float, float, float]

FS: Final = 30.0  # Hz, the resampling grid
POS_SECONDS: Final = 1.6
BAND_HZ: Final = (0.7, 4.0)
HR_BPM: Final = (42.0, 240.0)
_TAPER_HZ: Final = 0.1  # width of the band-pass mask's cosine edges
# Chai and Ngan's skin cluster in YCrCb, above deep shadow (which also drops dark hair).
_SKIN_LOW: Final = np.array([50, 133, 77], dtype=np.uint8)
_SKIN_HIGH: Final = np.array([255, 173, 127], dtype=np.uint8)
_MIN_SKIN_FRACTION: Final = 0.05
MAX_PIXELS: Final = 16_000_000  # larger PNGs are not decoded (caired's own default stream.max_frame_pixels)


def frame_rgb(image: bytes) -> RGB | None:
    """Mean (R, G, B) of the skin in the frame's central region; None if the bytes do not decode.

    A PNG whose header is malformed or claims more than ``MAX_PIXELS`` is not decoded.

    The region is the middle half of the width and 70% of the height, where a face sits
    in a webcam frame; within it, the pixels a YCrCb skin mask accepts, or all of it when
    fewer than 5% do. Pure and thread-safe.
    """
    if image.startswith(PNG_SIGNATURE):
        try:
            width, height = png_size(image[:IHDR_END])
        except ValueError:
            return None
        if width * height > MAX_PIXELS:
            return None  # a decompression bomb from a client must not take the backend down
    data = np.frombuffer(image, dtype=np.uint8)
    if data.size == 0:
        return None
    try:
        bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    except cv2.error:  # OpenCV's own size limit, or a codec that gave up
        return None
    if bgr is None or bgr.size == 0:
        return None
    height, width = bgr.shape[:2]
    roi = bgr[int(height * 0.15) : max(int(height * 0.85), 1), int(width * 0.25) : max(int(width * 0.75), 1)]
    mask = cv2.inRange(cv2.cvtColor(roi, cv2.COLOR_BGR2YCrCb), _SKIN_LOW, _SKIN_HIGH)
    if cv2.countNonZero(mask) >= _MIN_SKIN_FRACTION * mask.size:
        b, g, r, _ = cv2.mean(roi, mask=mask)
    else:
        b, g, r, _ = cv2.mean(roi)
    return (float(r), float(g), float(b))


@attrs.frozen
class Pulse:
    """One analysis: the heart rate (-1.0 when there is none) and the pulse at the frame timestamps."""

    hr: float
    values: tuple[float, ...]
    timestamps: tuple[float, ...]


NO_PULSE: Final = Pulse(-1.0, (), ())


class PulseEstimator:
    """Frame colour means in, heart rate and rPPG signal out.

    ``add`` is O(1) for frames arriving in order; ``hr`` and ``signal`` cost O(window)
    and share one computation until the next ``add``. Safe to call from several threads.
    """

    def __init__(self, *, window_seconds: float = 10.0, min_seconds: float = 5.0) -> None:
        if not POS_SECONDS <= min_seconds <= window_seconds:
            raise ValueError(
                f"need {POS_SECONDS:g} <= min_seconds <= window_seconds, got {min_seconds:g} and {window_seconds:g}"
            )
        self._window = window_seconds
        self._min = min_seconds
        self._times: list[float] = []  # ascending, unique
        self._rgb: dict[float, RGB] = {}
        self._version = 0
        self._cached: tuple[int, Pulse] | None = None
        self._lock = threading.Lock()

    def add(self, timestamp: float, rgb: RGB) -> None:
        """Record a frame's colour; a later add with the same timestamp replaces it."""
        if not math.isfinite(timestamp) or not all(math.isfinite(c) for c in rgb):
            raise ValueError(f"not a finite sample: {timestamp!r} {rgb!r}")
        sample = (float(rgb[0]), float(rgb[1]), float(rgb[2]))
        with self._lock:
            if timestamp not in self._rgb:
                if not self._times or timestamp > self._times[-1]:
                    self._times.append(timestamp)
                else:
                    bisect.insort(self._times, timestamp)
            self._rgb[timestamp] = sample
            self._version += 1

    def seconds(self) -> float:
        """The span of the timestamps received."""
        with self._lock:
            return self._times[-1] - self._times[0] if len(self._times) > 1 else 0.0

    def hr(self) -> float:
        """The heart rate over the last ``window_seconds``, in bpm; -1.0 until ``min_seconds`` of frames."""
        return self._current().hr

    def signal(self) -> tuple[list[float], list[float]]:
        """(rPPG values, their frame timestamps) over the current window; empty until ``min_seconds``.

        Values are the band-passed blood-volume pulse (systolic peaks up, as in a finger PPG)
        in units of its standard deviation over the window.
        Windows of consecutive calls overlap and agree on timestamps.
        """
        pulse = self._current()
        return list(pulse.values), list(pulse.timestamps)

    def final_hr(self) -> float:
        """The heart rate over the whole session; -1.0 if it is shorter than ``min_seconds``."""
        times, rgb = self._samples(window=None)
        if len(times) < 2 or times[-1] - times[0] < self._min:
            return -1.0
        return analyse(times, rgb, with_signal=False).hr

    def _current(self) -> Pulse:
        with self._lock:
            version = self._version
            if self._cached is not None and self._cached[0] == version:
                return self._cached[1]
        times, rgb = self._samples(window=self._window)
        pulse = NO_PULSE
        if len(times) > 1 and times[-1] - times[0] >= self._min:
            pulse = analyse(times, rgb)
        with self._lock:
            if self._version == version:
                self._cached = (version, pulse)
        return pulse

    def _samples(self, *, window: float | None) -> tuple[Floats, Floats]:
        with self._lock:
            if not self._times:
                return np.empty(0), np.empty((0, 3))
            start = 0 if window is None else bisect.bisect_left(self._times, self._times[-1] - window)
            times = self._times[start:]
            rgb = [self._rgb[t] for t in times]
        return np.asarray(times, dtype=np.float64), np.asarray(rgb, dtype=np.float64).reshape(-1, 3)


MAX_SPAN: Final = 600.0  # seconds of samples a pulse is estimated from, at most


def analyse(times: Floats, rgb: Floats, *, with_signal: bool = True) -> Pulse:
    """The pulse in samples ``rgb`` (N x 3, R G B) taken at ascending ``times`` (seconds).

    Only the last MAX_SPAN seconds are looked at: timestamps a client chose (0 and 2e9 in one
    session) must not make the resampling grid take hundreds of GiB.
    """
    if len(times) and times[-1] - times[0] > MAX_SPAN:
        keep = times >= times[-1] - MAX_SPAN
        times, rgb = times[keep], rgb[keep]
    grid = np.arange(math.ceil(times[0] * FS), math.floor(times[-1] * FS) + 1) / FS
    window = math.ceil(POS_SECONDS * FS)
    if len(grid) < window:
        return NO_PULSE
    uniform = np.column_stack([np.interp(grid, times, rgb[:, c]) for c in range(3)])
    pulse = band_pass(pos(uniform, window), FS)
    spread = float(pulse.std())
    if not spread > 1e-12:
        return NO_PULSE  # a flat signal carries no pulse
    hr = peak_bpm(pulse, FS)
    if not with_signal:
        return Pulse(hr, (), ())
    # POS follows skin brightness, which falls as blood volume rises: flip it to read as a PPG.
    values = np.round(np.interp(times, grid, -pulse / spread), 4)
    return Pulse(hr, tuple(values.tolist()), tuple(times.tolist()))


def pos(rgb: Floats, window: int) -> Floats:
    """POS (plane orthogonal to skin): the pulse in uniformly sampled (R, G, B) rows, overlap-added."""
    n = len(rgb)
    frames = np.lib.stride_tricks.sliding_window_view(rgb, window, axis=0)  # (n - window + 1, 3, window)
    means = frames.mean(axis=2, keepdims=True)
    normalised = frames / np.where(np.abs(means) > 1e-9, means, 1.0)
    r, g, b = normalised[:, 0], normalised[:, 1], normalised[:, 2]
    s0 = g - b
    s1 = -2.0 * r + g + b
    spread0, spread1 = s0.std(axis=1, keepdims=True), s1.std(axis=1, keepdims=True)
    alpha = np.divide(spread0, spread1, out=np.zeros_like(spread0), where=spread1 > 1e-12)
    h = s0 + alpha * s1
    h -= h.mean(axis=1, keepdims=True)
    out = np.zeros(n)
    counts = np.zeros(n)
    segments = len(h)
    for k in range(window):  # overlap-add, one column offset at a time: O(n * window), vectorised
        out[k : k + segments] += h[:, k]
        counts[k : k + segments] += 1.0
    return out / counts


def band_pass(signal: Floats, fs: float, band: tuple[float, float] = BAND_HZ) -> Floats:
    """Keep ``band`` (Hz): an FFT mask with raised-cosine edges, zero-padded against wrap-around."""
    n = len(signal)
    size = 1 << (2 * n - 1).bit_length()
    spectrum = np.fft.rfft(signal - signal.mean(), size)
    freqs = np.fft.rfftfreq(size, 1.0 / fs)
    lo, hi = band
    rise = np.clip((freqs - (lo - _TAPER_HZ)) / _TAPER_HZ, 0.0, 1.0)
    fall = np.clip(((hi + _TAPER_HZ) - freqs) / _TAPER_HZ, 0.0, 1.0)
    mask = 0.5 - 0.5 * np.cos(np.pi * np.minimum(rise, fall))
    filtered: Floats = np.fft.irfft(spectrum * mask, size)[:n]
    return filtered


def peak_bpm(signal: Floats, fs: float, bpm_range: tuple[float, float] = HR_BPM) -> float:
    """The frequency of the strongest spectral peak within ``bpm_range``, in beats per minute."""
    n = len(signal)
    size = max(8192, 1 << (8 * n - 1).bit_length())
    power = np.abs(np.fft.rfft((signal - signal.mean()) * np.hanning(n), size)) ** 2
    freqs = np.fft.rfftfreq(size, 1.0 / fs)
    inside = np.flatnonzero((freqs >= bpm_range[0] / 60.0) & (freqs <= bpm_range[1] / 60.0))
    k = int(inside[np.argmax(power[inside])])
    offset = 0.0
    if 0 < k < len(power) - 1:  # a parabola through the peak bin and its neighbours
        left, mid, right = power[k - 1], power[k], power[k + 1]
        denominator = left - 2.0 * mid + right
        if denominator < 0:
            offset = float(np.clip(0.5 * (left - right) / denominator, -0.5, 0.5))
    return float((freqs[k] + offset * (freqs[1] - freqs[0])) * 60.0)
