"""The emulator's heart-rate estimate: accurate on frames through JPEG and PNG, and not fooled."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import cv2
import numpy as np
import pytest

from caired.emulator.rppg import RGB, PulseEstimator, frame_rgb
from caired.synth import render_frames

FPS: Final = 30.0
SECONDS: Final = 20.0
START: Final = 1747154380.0
TRUTHS: Final = (48.0, 60.0, 72.0, 90.0, 120.0)
FORMATS: Final = ("jpeg", "png")
SEED: Final = 7

Clip = tuple[list[float], list[RGB]]  # frame timestamps, frame colours


def _encode(image: np.ndarray, fmt: str) -> bytes:
    if fmt == "jpeg":
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    else:
        ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def _clips(bpm: float) -> dict[str, Clip]:
    """One rendered clip at ``bpm``, each frame sent through both codecs and back through frame_rgb."""
    times: list[float] = []
    colours: dict[str, list[RGB]] = {fmt: [] for fmt in FORMATS}
    # 160x120: fewer pixels average less noise, so no easier than 320x240 (errors within 0.4 bpm of its), 4x faster.
    for stem, image in render_frames(bpm=bpm, seconds=SECONDS, fps=FPS, width=160, height=120, seed=SEED, start=START):
        times.append(float(stem))
        for fmt in FORMATS:
            rgb = frame_rgb(_encode(image, fmt))
            assert rgb is not None
            colours[fmt].append(rgb)
    return {fmt: (times, colours[fmt]) for fmt in FORMATS}


@pytest.fixture(scope="module")
def clips() -> dict[tuple[float, str], Clip]:
    """Every (bpm, format) clip, rendered once for the module, on both cores."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        rendered = dict(zip(TRUTHS, pool.map(_clips, TRUTHS), strict=True))
    return {(bpm, fmt): clip for bpm, per_format in rendered.items() for fmt, clip in per_format.items()}


def _estimator(times: list[float], colours: list[RGB]) -> PulseEstimator:
    estimator = PulseEstimator()
    for t, rgb in zip(times, colours, strict=True):
        estimator.add(t, rgb)
    return estimator


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bpm", TRUTHS)
def test_final_hr_within_2_bpm_of_the_truth(clips: dict[tuple[float, str], Clip], bpm: float, fmt: str) -> None:
    estimator = _estimator(*clips[bpm, fmt])
    assert estimator.seconds() == pytest.approx(SECONDS - 1 / FPS, abs=1e-3)
    assert abs(estimator.final_hr() - bpm) <= 2.0
    assert abs(estimator.hr() - bpm) <= 3.0  # the last 10 s alone


def test_shuffled_frames_carry_no_pulse(clips: dict[tuple[float, str], Clip]) -> None:
    """The same pixels, dealt out to the timestamps in a random order, lose the rate."""
    bpm = 72.0
    times, colours = clips[bpm, "jpeg"]
    order = np.random.default_rng(1).permutation(len(colours))
    shuffled = [colours[i] for i in order]
    assert abs(_estimator(times, shuffled).final_hr() - bpm) > 2.0
    assert abs(_estimator(times, colours).final_hr() - bpm) <= 2.0  # the unshuffled control


@pytest.mark.parametrize(("bpm", "spacing", "factor"), [(120.0, 1 / 15, 0.5), (60.0, 1 / 60, 2.0)])
def test_wrong_timestamps_scale_the_rate(
    clips: dict[tuple[float, str], Clip], bpm: float, spacing: float, factor: float
) -> None:
    """The rate comes from the timestamps: frames stamped twice (half) as far apart read half (twice) the rate."""
    _, colours = clips[bpm, "png"]
    times = [START + i * spacing for i in range(len(colours))]
    hr = _estimator(times, colours).final_hr()
    assert hr / bpm == pytest.approx(factor, rel=0.05)


def _uniform_frames(bpm: float, seconds: float, fps: float, seed: int) -> Clip:
    """A different generator: a flat colour with a pure sine in green, sensor noise and timing jitter."""
    rng = np.random.default_rng(seed)
    times: list[float] = []
    colours: list[RGB] = []
    base = np.array([96.0, 128.0, 170.0])  # BGR
    for i in range(round(seconds * fps)):
        t = i / fps + rng.uniform(-0.004, 0.004)
        image = np.empty((120, 160, 3))
        image[:] = base
        image[:, :, 1] += 0.8 * math.sin(2 * math.pi * bpm / 60.0 * t)
        image += rng.normal(0.0, 3.0, image.shape)
        rgb = frame_rgb(_encode(np.clip(np.rint(image), 0, 255).astype(np.uint8), "png"))
        assert rgb is not None
        times.append(START + t)
        colours.append(rgb)
    return times, colours


def test_a_plain_sinusoid_from_another_generator_is_found() -> None:
    bpm = 83.5
    estimator = _estimator(*_uniform_frames(bpm, seconds=20.0, fps=FPS, seed=5))
    assert abs(estimator.final_hr() - bpm) <= 3.0


def _sine_colours(times: np.ndarray, bpm: np.ndarray | float, seed: int) -> list[RGB]:
    rng = np.random.default_rng(seed)
    phase = 2 * np.pi * np.cumsum(np.broadcast_to(bpm, times.shape) / 60.0 * np.gradient(times))
    green = 150.0 + 0.6 * np.sin(phase) + rng.normal(0.0, 0.05, times.shape)
    red = 200.0 + 0.25 * np.sin(phase) + rng.normal(0.0, 0.05, times.shape)
    blue = 120.0 + 0.4 * np.sin(phase) + rng.normal(0.0, 0.05, times.shape)
    return [(float(r), float(g), float(b)) for r, g, b in zip(red, green, blue, strict=True)]


def test_hr_is_minus_one_until_five_seconds_then_tracks_the_window() -> None:
    times = START + np.arange(0, 20.0, 1 / FPS)
    rate = np.where(times - START < 10.0, 60.0, 100.0)  # the rate changes half-way
    colours = _sine_colours(times, rate, seed=2)
    estimator = PulseEstimator(window_seconds=8.0, min_seconds=5.0)
    for i, (t, rgb) in enumerate(zip(times.tolist(), colours, strict=True)):
        estimator.add(t, rgb)
        if i % 15 == 0:
            if estimator.seconds() < 5.0:
                assert estimator.hr() == -1.0
                assert estimator.signal() == ([], [])
            else:
                assert estimator.hr() > 0
        if t - START == pytest.approx(9.0, abs=0.5 / FPS):
            assert estimator.hr() == pytest.approx(60.0, abs=2.0)
    assert estimator.hr() == pytest.approx(100.0, abs=2.0)  # only the last 8 s count
    final = estimator.final_hr()  # the whole session holds both rates: the stronger peak is one of them
    assert min(abs(final - 60.0), abs(final - 100.0)) <= 2.0


def test_final_hr_needs_min_seconds() -> None:
    times = START + np.arange(0, 4.0, 1 / FPS)
    estimator = PulseEstimator()
    for t, rgb in zip(times.tolist(), _sine_colours(times, 72.0, seed=3), strict=True):
        estimator.add(t, rgb)
    assert estimator.final_hr() == -1.0
    assert estimator.hr() == -1.0
    assert PulseEstimator().final_hr() == -1.0


def test_signal_windows_of_consecutive_calls_overlap() -> None:
    times = START + np.arange(0, 15.0, 1 / FPS)
    colours = _sine_colours(times, 72.0, seed=4)
    estimator = PulseEstimator()
    windows: list[tuple[list[float], list[float]]] = []
    for i, (t, rgb) in enumerate(zip(times.tolist(), colours, strict=True)):
        estimator.add(t, rgb)
        if i in (329, 344):  # two answers 15 frames apart
            windows.append(estimator.signal())
    (first_values, first_times), (second_values, second_times) = windows
    for values, stamps in windows:
        assert len(values) == len(stamps)
        assert stamps == sorted(set(stamps))
        assert stamps[-1] - stamps[0] <= 10.0 + 1e-6
        assert set(stamps) <= set(times.tolist())  # the frames' own timestamps
    assert second_times[-1] > first_times[-1]
    shared = sorted(set(first_times) & set(second_times))
    assert len(shared) >= len(first_times) - 16
    a = np.array([first_values[first_times.index(t)] for t in shared])
    b = np.array([second_values[second_times.index(t)] for t in shared])
    assert np.corrcoef(a, b)[0, 1] > 0.95  # the same pulse in both answers
    assert abs(float(np.std(second_values)) - 1.0) < 0.1  # in units of its standard deviation


def test_add_keeps_order_and_replaces_a_repeated_timestamp() -> None:
    times = START + np.arange(0, 12.0, 1 / FPS)
    colours = _sine_colours(times, 90.0, seed=6)
    in_order = PulseEstimator()
    scrambled = PulseEstimator()
    for t, rgb in zip(times.tolist(), colours, strict=True):
        in_order.add(t, rgb)
    order = np.random.default_rng(0).permutation(len(times))
    for i in order:
        scrambled.add(float(times[i]), (0.0, 0.0, 0.0))  # garbage first ...
    for i in order:
        scrambled.add(float(times[i]), colours[i])  # ... replaced by the real colour
    assert scrambled.seconds() == in_order.seconds()
    assert scrambled.final_hr() == in_order.final_hr()
    assert scrambled.signal() == in_order.signal()
    assert abs(in_order.final_hr() - 90.0) <= 1.0
    with pytest.raises(ValueError):
        in_order.add(float("nan"), (1.0, 2.0, 3.0))


def test_frame_rgb_reads_the_skin_not_the_wall() -> None:
    _, image = next(render_frames(bpm=72, seconds=1, fps=30, width=320, height=240, seed=1, start=START))
    r, g, b = frame_rgb(_encode(image, "jpeg")) or (0.0, 0.0, 0.0)
    assert r > g > b  # skin; the wall behind is blue-grey (b > g > r)
    assert 160 < r < 230
    assert frame_rgb(b"") is None
    assert frame_rgb(b"not an image at all") is None
    assert frame_rgb(_encode(image, "png")[:200]) is None  # a truncated PNG


def test_estimator_rejects_a_window_shorter_than_its_minimum() -> None:
    with pytest.raises(ValueError):
        PulseEstimator(window_seconds=4.0, min_seconds=5.0)


def test_timestamps_far_apart_cost_no_more_than_the_last_minutes() -> None:
    """A client chose 0 and 2e9 in one session: resampling all of it would take 447 GiB."""
    from caired.emulator.rppg import MAX_SPAN, NO_PULSE, analyse

    times = np.array([0.0, 1.0, 2e9 - MAX_SPAN / 2, 2e9], dtype=np.float64)
    rgb = np.ones((4, 3), dtype=np.float64)
    assert analyse(times, rgb) is NO_PULSE  # a flat signal, and no MemoryError on the way
