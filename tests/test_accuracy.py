"""Proof of life: heart rates streamed through caired come back from the local backend's rPPG estimate.

Frames go through the real path: PNG files, caired's encoder (jpeg or raw), the WebSocket, the strict backend's
decoder, POS. A shuffled control shows the check has teeth.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from caired.commands.stream import stream_folder
from caired.frames import list_frames
from caired.synth import synthesize
from tests.conftest import BackendFactory, make_config

RATES = (48.0, 60.0, 72.0, 90.0, 120.0)
# Small frames: a quarter of the pixels averages the sensor noise less, so the estimate is no easier than at
# 320x240 (the errors at the two sizes differ by at most 0.4 bpm), for a quarter of the suite's time.
SIZE = (160, 120)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    """20 s at 30 fps of the synthetic face, one folder per heart rate, made once for the file."""
    root = tmp_path_factory.mktemp("clips")
    return {bpm: _synth(root / f"bpm{bpm:g}", bpm) for bpm in RATES}


def _synth(directory: Path, bpm: float) -> Path:
    synthesize(directory, bpm=bpm, seconds=20.0, fps=30.0, width=SIZE[0], height=SIZE[1], seed=11, start=1747154380.0)
    return directory


async def _estimate(backend: BackendFactory, directory: Path, fmt: str) -> float:
    state = await backend()
    await stream_folder(make_config(state.port, FPS="0", FRAME_FORMAT=fmt), directory)
    assert state.violations == []
    [seen] = state.finished_sessions()
    assert seen.hr is not None
    return seen.hr


@pytest.mark.parametrize("fmt", ["jpeg", "raw"])
@pytest.mark.parametrize("bpm", RATES)
async def test_the_estimate_is_within_2_bpm(backend: BackendFactory, clips: dict[float, Path], bpm: float,
                                            fmt: str) -> None:
    hr = await _estimate(backend, clips[bpm], fmt)
    assert abs(hr - bpm) <= 2.0, f"{fmt} {bpm} bpm came back as {hr}"


async def test_frames_whose_content_is_shuffled_among_the_timestamps_do_not_give_the_rate(
    backend: BackendFactory, clips: dict[float, Path], tmp_path: Path
) -> None:
    """The same frames with their pixels shuffled across the (still ascending) timestamps: the pulse is gone."""
    refs = list_frames(clips[72.0]).frames
    order = np.random.default_rng(3).permutation(len(refs))
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for ref, source in zip(refs, order, strict=True):
        shutil.copyfile(refs[source].path, shuffled / ref.path.name)
    hr = await _estimate(backend, shuffled, "raw")
    assert abs(hr - 72.0) > 2.0


async def test_frames_from_a_different_generator_come_back_within_3_bpm(
    backend: BackendFactory, tmp_path: Path
) -> None:
    """Not synth.py: a flat skin-coloured field whose green channel carries a pure sine at 83.5 bpm, with noise."""
    rng = np.random.default_rng(5)
    bpm, fps, seconds = 83.5, 30.0, 20.0
    directory = tmp_path / "other"
    directory.mkdir()
    base = np.array([120.0, 150.0, 200.0])  # B, G, R of a light skin tone
    for i in range(int(seconds * fps)):
        t = i / fps
        pulse = np.sin(2 * np.pi * bpm / 60 * t)
        colour = base + np.array([0.4, 1.2, 0.5]) * pulse
        image = colour + rng.normal(0, 2.0, (120, 160, 3))
        cv2.imwrite(str(directory / f"{1747154380.0 + t:.7f}.png"), np.clip(image, 0, 255).astype(np.uint8))
    hr = await _estimate(backend, directory, "jpeg")
    assert abs(hr - bpm) <= 3.0, hr
