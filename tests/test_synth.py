"""Synthetic frames: names, determinism, a faint pulse at the asked rate, whole files, the CLI."""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path
from typing import Final

import cv2
import numpy as np
import pytest

from caired.cli import main
from caired.commands import synth as synth_command
from caired.config import Config
from caired.errors import ConfigError, ExitCode
from caired.synth import ppg_template, pulse_wave, render_frames, synthesize

START: Final = 1747154380.5511632


def test_stems_are_seven_decimal_timestamps_one_frame_period_apart() -> None:
    frames = list(render_frames(bpm=72, seconds=1.0, fps=30, width=32, height=24, seed=1, start=START))
    assert len(frames) == 30
    stems = [s for s, _ in frames]
    assert stems[0] == "1747154380.5511632"
    for i, stem in enumerate(stems):
        assert stem == f"{START + i / 30:.7f}"
        assert len(stem.split(".")[1]) == 7
    assert all(float(a) < float(b) for a, b in itertools.pairwise(stems))
    for _, image in frames:
        assert image.shape == (24, 32, 3)
        assert image.dtype == np.uint8


def test_the_same_seed_gives_the_same_frames_and_another_seed_does_not() -> None:
    def clip(seed: int) -> list[np.ndarray]:
        return [im for _, im in render_frames(bpm=80, seconds=0.2, fps=30, width=64, height=48, seed=seed, start=0)]

    first, again, other = clip(3), clip(3), clip(4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[0], first[1])  # sensor noise changes every frame


def test_start_defaults_to_now() -> None:
    import time

    before = time.time()
    stem, _ = next(render_frames(bpm=60, seconds=1, fps=30, width=16, height=16, seed=0))
    assert before <= float(stem) <= time.time() + 1e-6


def test_the_skin_pulses_faintly_at_the_asked_rate_strongest_in_green() -> None:
    bpm, fps = 84.0, 30.0
    frames = [im for _, im in render_frames(bpm=bpm, seconds=12, fps=fps, width=160, height=120, seed=5, start=0)]
    patch = np.array([im[62:72, 62:98].reshape(-1, 3).mean(axis=0) for im in frames])  # cheeks and nose, BGR
    centred = patch - patch.mean(axis=0)
    spectrum = np.abs(np.fft.rfft(centred * np.hanning(len(patch))[:, None], 8192, axis=0))
    freqs = np.fft.rfftfreq(8192, 1 / fps)
    band = (freqs > 0.7) & (freqs < 4.0)
    green_peak = freqs[band][np.argmax(spectrum[band, 1])] * 60
    assert green_peak == pytest.approx(bpm, abs=1.5)
    relative = spectrum[band].max(axis=0) / patch.mean(axis=0)  # pulsatility per channel: B, G, R
    assert relative[1] > relative[0] > relative[2]  # G > B > R, as in real skin
    # Invisible: the pulse moves the skin by about one level of 255, not more.
    swing = np.ptp(np.convolve(centred[:, 1], np.ones(3) / 3, mode="valid"))
    assert 0.4 < swing < 2.5


def test_the_face_sways_a_few_pixels() -> None:
    frames = [im for _, im in render_frames(bpm=60, seconds=8, fps=5, width=320, height=240, seed=2, start=0)]
    columns = []
    for image in frames:
        hsv = cv2.cvtColor(cv2.GaussianBlur(image, (0, 0), 2), cv2.COLOR_BGR2HSV)
        skin = (hsv[:, :, 0] < 25) & (hsv[:, :, 1] > 60)
        columns.append(float(np.nonzero(skin)[1].mean()))
    assert 0.5 < np.ptp(columns) < 12


def test_ppg_beat_has_a_systolic_peak_and_a_dicrotic_wave() -> None:
    phase = np.linspace(0, 1, 1000, endpoint=False)
    beat = ppg_template(phase)
    assert np.ptp(beat) == pytest.approx(1.0, rel=1e-3)
    assert abs(beat.mean()) < 1e-3
    maxima = [i for i in range(1, 999) if beat[i - 1] < beat[i] >= beat[i + 1]]
    assert len(maxima) == 2
    systolic, dicrotic = maxima
    assert beat[systolic] == beat.max() and beat[dicrotic] < beat[systolic]
    assert phase[systolic] < 0.3 < phase[dicrotic] < 0.7


def test_pulse_wave_varies_beat_to_beat_but_keeps_the_rate() -> None:
    times = np.arange(0, 60, 1 / 100)
    wave = pulse_wave(times, 75.0, np.random.default_rng(0))
    peaks = [i for i in range(1, len(wave) - 1) if wave[i - 1] < wave[i] >= wave[i + 1] and wave[i] > 0.3]
    intervals = np.diff(times[peaks])
    assert len(peaks) == pytest.approx(75, abs=1)
    assert np.mean(intervals) == pytest.approx(60 / 75, rel=0.02)
    assert 0.005 < np.std(intervals) < 0.08  # some variability, not arrhythmia


def test_synthesize_writes_whole_pngs_identical_to_the_rendered_frames(tmp_path: Path) -> None:
    out = tmp_path / "new" / "clip"
    paths = synthesize(out, bpm=66, seconds=0.5, fps=20, width=96, height=72, seed=9, start=START)
    rendered = list(render_frames(bpm=66, seconds=0.5, fps=20, width=96, height=72, seed=9, start=START))
    assert [p.name for p in paths] == [f"{stem}.png" for stem, _ in rendered]
    assert sorted(os.listdir(out)) == sorted(p.name for p in paths)  # no temporaries left behind
    for path, (_, image) in zip(paths, rendered, strict=True):
        assert np.array_equal(cv2.imread(str(path), cv2.IMREAD_COLOR), image)


def test_synthesize_renames_each_file_into_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    moves: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src: str, dst: str, *, src_dir_fd: int, dst_dir_fd: int) -> None:
        assert os.stat(src, dir_fd=src_dir_fd).st_size > 0  # complete before it is renamed
        assert src_dir_fd == dst_dir_fd  # same folder, so the rename is atomic
        moves.append((src, dst))
        real_replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(os, "replace", spy)
    paths = synthesize(tmp_path, seconds=0.2, fps=20, width=32, height=32, seed=1, start=START)
    assert sorted(dst for _, dst in moves) == sorted(p.name for p in paths)
    for src, _ in moves:
        assert src.startswith(".") and not src.endswith(".png")  # a watcher skips it


def test_a_webcam_sized_frame_is_webcam_sized_on_disk(tmp_path: Path) -> None:
    (path,) = synthesize(tmp_path, seconds=0.1, fps=10, seed=1, start=START)
    assert cv2.imread(str(path)).shape == (480, 640, 3)
    assert 300_000 <= path.stat().st_size <= 700_000


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"bpm": 20.0}, "bpm"),
        ({"bpm": 300.0}, "bpm"),
        ({"seconds": -1.0}, "seconds"),
        ({"fps": 0.0}, "fps"),
        ({"width": 8}, "width"),
        ({"height": 15}, "height"),
    ],
)
def test_bad_values_are_config_errors_naming_the_flag(
    tmp_path: Path, changes: dict[str, float], name: str
) -> None:
    values = {"bpm": 72.0, "seconds": 1.0, "fps": 30.0, "width": 64, "height": 48, "seed": 0, "start": START}
    args = argparse.Namespace(dir=tmp_path / "out", **{**values, **changes})
    with pytest.raises(ConfigError) as caught:
        synth_command._main(Config(), args)
    assert caught.value.exit_code == ExitCode.CONFIG
    assert f"--{name}" in str(caught.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=name):
        render_frames(**{**values, **changes})  # type: ignore[arg-type]


def test_cli_writes_frames_and_logs_one_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "frames"
    code = main(["synth", str(out), "--bpm", "90", "--seconds", "0.5", "--fps", "10", "--width", "48",
                 "--height", "32", "--seed", "3", "--start", "1747154380", "--log-format", "json"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{1747154380 + i / 10:.7f}.png" for i in range(5)]
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    (summary,) = [line for line in lines if line["event"] == "synth_written"]
    assert summary["frames"] == 5 and summary["bpm"] == 90.0 and summary["dir"] == str(out)


def test_cli_rejects_a_bad_rate_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", str(tmp_path / "x"), "--bpm", "500"]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--bpm" in err and "between 30 and 240" in err
