"""Synthetic "pulsing face" frames: timestamp-named PNGs with a known heart rate.

``write_layout`` also writes the other forms a session comes in, each with its ground
truth: JPEG frames, a video (AVI, or a variable frame rate Matroska file), a UBFC-rPPG
session (``vid.avi`` + ``ground_truth.txt``) and a PURE one (``Image<ns>.png`` + JSON).

The scene is a face-like skin ellipse (hair, eyes, brows, mouth) on a textured wall,
swaying a few pixels, under a slowly drifting exposure, with per-pixel sensor noise.
The skin carries a blood-volume pulse at ``bpm``: a systolic peak and a dicrotic wave
per beat, with slight beat-to-beat variability. As in life, more blood absorbs more
light, so the skin darkens with each beat, by about one intensity level of 255 in green
and less in red and blue (relative weights 0.33, 0.77, 0.53, as measured in the rPPG
literature). It is invisible to the eye and findable by rPPG.

Everything is deterministic for a given ``seed``: each frame's noise comes from its
own generator spawned from the seed, so frames can be rendered in any order, on any
thread, and come out the same.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import math
import os
import statistics
import struct
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Final

import cv2
import numpy as np
import numpy.typing as npt

from caired import fsops

Image = npt.NDArray[np.uint8]
Floats = npt.NDArray[np.float32]

BPM_RANGE: Final = (30.0, 240.0)
MIN_SIZE: Final = 16
MAX_SIZE: Final = 8192
MAX_FPS: Final = 1000.0
# Relative pulse strength per channel, B, G, R order (R 0.33, G 0.77, B 0.53).
PULSE_WEIGHTS_BGR: Final = np.array([0.53, 0.77, 0.33], dtype=np.float32)
# Relative skin modulation: green swings about 0.9 levels peak to peak on ~150.
PULSE_DEPTH: Final = 0.008
NOISE_SIGMA: Final = 2.5  # sensor noise, levels of 255, per pixel and channel
SKIN_BGR: Final = (122.0, 152.0, 206.0)


def check(*, bpm: float, seconds: float, fps: float, width: int, height: int) -> list[tuple[str, str]]:
    """The problems with these parameters, as (option name, what is allowed); empty when fine."""
    problems: list[tuple[str, str]] = []
    if not BPM_RANGE[0] <= bpm <= BPM_RANGE[1]:
        problems.append(("bpm", f"must be between {BPM_RANGE[0]:g} and {BPM_RANGE[1]:g}"))
    if not 0 < seconds <= 24 * 3600:
        problems.append(("seconds", "must be greater than 0 (and at most a day)"))
    if not 0 < fps <= MAX_FPS:
        problems.append(("fps", f"must be greater than 0 and at most {MAX_FPS:g}"))
    for name, value in (("width", width), ("height", height)):
        if not MIN_SIZE <= value <= MAX_SIZE:
            problems.append((name, f"must be between {MIN_SIZE} and {MAX_SIZE} pixels"))
    return problems


def frame_count(seconds: float, fps: float) -> int:
    """Frames in a clip: at least one, ``seconds * fps`` rounded."""
    return max(1, round(seconds * fps))


def stem(timestamp: float) -> str:
    """A frame's file stem: UNIX seconds with 7 decimals, e.g. ``1747154380.5511632``."""
    return f"{timestamp:.7f}"


def render_frames(
    *,
    bpm: float,
    seconds: float,
    fps: float,
    width: int,
    height: int,
    seed: int | None = None,
    start: float | None = None,
) -> Iterator[tuple[str, Image]]:
    """``(timestamp stem, BGR uint8 image)`` pairs; frame i is taken at ``start + i / fps``.

    Bad parameters raise ValueError here, before the first frame is asked for.
    """
    scene, stems = _prepare(bpm=bpm, seconds=seconds, fps=fps, width=width, height=height, seed=seed, start=start)
    return ((name, scene.frame(i)) for i, name in enumerate(stems))


def synthesize(
    directory: Path,
    *,
    bpm: float = 72.0,
    seconds: float = 10.0,
    fps: float = 30.0,
    width: int = 640,
    height: int = 480,
    seed: int | None = None,
    start: float | None = None,
) -> list[Path]:
    """Write the frames as ``<stem>.png`` in ``directory`` (created if missing); return their paths in order.

    Each file appears whole: it is written under a hidden temporary name and renamed (fsops).
    Rendering and PNG encoding run on a small thread pool (numpy and cv2 release the GIL).
    """
    scene, stems = _prepare(bpm=bpm, seconds=seconds, fps=fps, width=width, height=height, seed=seed, start=start)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{name}.png" for name in stems]
    workers = max(1, min(4, os.cpu_count() or 1))
    pending: collections.deque[Future[None]] = collections.deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="synth") as pool:
        try:
            for i, path in enumerate(paths):
                if len(pending) >= 2 * workers:  # bounded memory: wait for the oldest
                    pending.popleft().result()
                pending.append(pool.submit(_write_frame, scene, i, path))
            while pending:
                pending.popleft().result()
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return paths


def _prepare(
    *, bpm: float, seconds: float, fps: float, width: int, height: int, seed: int | None, start: float | None
) -> tuple[_Scene, list[str]]:
    problems = check(bpm=bpm, seconds=seconds, fps=fps, width=width, height=height)
    if problems:
        raise ValueError("; ".join(f"{name} {problem}" for name, problem in problems))
    scene = _Scene(bpm=bpm, seconds=seconds, fps=fps, width=width, height=height, seed=seed)
    start = time.time() if start is None else start
    stems = [stem(start + i / fps) for i in range(scene.count)]
    if any(float(a) >= float(b) for a, b in itertools.pairwise(stems)):
        raise ValueError(f"fps {fps:g} is too high for 7-decimal timestamps at {start:.7f}")
    return scene, stems


def _write_frame(scene: _Scene, index: int, path: Path) -> None:
    ok, png = cv2.imencode(".png", scene.frame(index))
    if not ok:
        raise OSError(f"cv2 could not encode {path.name} as PNG")
    fsops.write_bytes_atomic(path, png.data)


def ppg_template(phase: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """One beat of a fingertip-like PPG at ``phase`` in [0, 1): systolic peak, notch, dicrotic wave.

    A periodic mixture of Gaussians, scaled to zero mean and unit peak-to-peak.
    """
    components = ((0.20, 0.070, 1.00), (0.43, 0.060, 0.32), (0.55, 0.090, 0.38))  # (centre, width, height)
    grid = np.linspace(0.0, 1.0, 512, endpoint=False)

    def mixture(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        total = np.zeros_like(x)
        for centre, width, height in components:
            for wrap in (-1.0, 0.0, 1.0):
                total += height * np.exp(-0.5 * ((x - centre - wrap) / width) ** 2)
        return total

    reference = mixture(grid)
    lo, hi, mean = reference.min(), reference.max(), reference.mean()
    wave: npt.NDArray[np.float64] = (mixture(phase) - mean) / (hi - lo)
    return wave


def pulse_wave(
    times: npt.NDArray[np.float64], bpm: float, rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    """The blood-volume pulse at ``times`` (seconds), unit peak-to-peak, averaging exactly ``bpm``.

    Beat-to-beat intervals wander by about 2% (a moving average of white noise, rescaled
    so their mean is 60 / bpm) and each beat's height varies slightly, as in a resting person.
    """
    period = 60.0 / bpm
    span = float(times[-1] - times[0]) if len(times) else 0.0
    beats = int(span / period) + 3
    wander = np.convolve(rng.standard_normal(beats + 4), np.ones(5) / math.sqrt(5), mode="valid")[:beats]
    intervals = period * (1.0 + 0.02 * wander)
    intervals *= period / intervals.mean()
    onsets = times[0] - rng.uniform(0.0, period) + np.concatenate(([0.0], np.cumsum(intervals)))
    heights = 1.0 + 0.06 * rng.standard_normal(beats)
    beat = np.clip(np.searchsorted(onsets, times, side="right") - 1, 0, beats - 1)
    phase = np.clip((times - onsets[beat]) / intervals[beat], 0.0, 1.0 - 1e-9)
    return heights[beat] * ppg_template(phase)


class _Scene:
    """The layers of one clip, rendered once; ``frame(i)`` is pure and thread-safe."""

    def __init__(self, *, bpm: float, seconds: float, fps: float, width: int, height: int, seed: int | None) -> None:
        self.count = frame_count(seconds, fps)
        self.width, self.height = width, height
        root = np.random.SeedSequence(seed)
        scene_seq, pulse_seq, self._noise_seq = root.spawn(3)
        rng = np.random.default_rng(scene_seq)
        times = np.arange(self.count, dtype=np.float64) / fps

        self._background = _wall(width, height, rng)
        self._face, self._alpha, self._skin = _face(width, height, rng)
        pulse = pulse_wave(times, bpm, np.random.default_rng(pulse_seq))
        self.bvp = pulse  # the blood-volume pulse of each frame: the ground truth a reference file records
        breath = 0.25 * np.sin(2 * np.pi * 0.23 * times + rng.uniform(0, 2 * np.pi))  # breathing, below the pulse band
        self._pulse = (-PULSE_DEPTH * (pulse + breath)).astype(np.float32)  # more blood, darker skin
        # Auto-exposure drifting by half a percent, slowly.
        self._gain = (1.0 + 0.005 * np.sin(2 * np.pi * 0.05 * times + rng.uniform(0, 2 * np.pi))).astype(np.float32)
        # Sway of a few pixels: two slow sinusoids per axis with random phases.
        scale = min(width, height) / 480.0
        phases = rng.uniform(0, 2 * np.pi, 4)
        self._dx = scale * (2.5 * np.sin(2 * np.pi * 0.11 * times + phases[0]) + np.sin(0.6 * times + phases[1]))
        self._dy = scale * (1.5 * np.sin(2 * np.pi * 0.07 * times + phases[2]) + np.sin(0.4 * times + phases[3]))

    def frame(self, index: int) -> Image:
        rng = np.random.default_rng(_child(self._noise_seq, index))
        layer = np.asarray(self._face + (self._pulse[index] * PULSE_WEIGHTS_BGR) * self._skin, dtype=np.float32)
        shift = np.array([[1.0, 0.0, self._dx[index]], [0.0, 1.0, self._dy[index]]], dtype=np.float64)
        moved = np.asarray(
            cv2.warpAffine(
                np.dstack((layer, self._alpha)),
                shift,
                (self.width, self.height),
                flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_CONSTANT,
                borderValue=(0.0, 0.0, 0.0, 0.0),
            ),
            dtype=np.float32,
        )
        alpha = moved[:, :, 3:4]
        image: Floats = self._background * (1.0 - alpha) + moved[:, :, :3]  # the face layer is premultiplied
        image *= self._gain[index]
        image += _gaussian_table()[rng.integers(0, 1 << 16, image.shape, dtype=np.uint16)]
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@functools.cache
def _gaussian_table() -> Floats:
    """Sensor noise by lookup: 65536 equiprobable quantiles of N(0, NOISE_SIGMA).

    Indexing it with uniform 16-bit draws samples the normal distribution (to 1/65536 in
    probability) five times faster than ``standard_normal``; rendering is mostly noise.
    """
    normal = statistics.NormalDist(0.0, NOISE_SIGMA)
    return np.array([normal.inv_cdf((i + 0.5) / (1 << 16)) for i in range(1 << 16)], dtype=np.float32)


def _child(seq: np.random.SeedSequence, index: int) -> np.random.SeedSequence:
    """The seed of frame ``index``: the same whatever order frames are rendered in."""
    return np.random.SeedSequence(seq.entropy, spawn_key=(*seq.spawn_key, index))


def _blurred_noise(height: int, width: int, rng: np.random.Generator, sigma: float) -> Floats:
    noise = rng.standard_normal((height, width), dtype=np.float32)
    blurred = cv2.GaussianBlur(noise, (0, 0), sigma)
    spread = float(blurred.std()) or 1.0
    return (blurred / spread).astype(np.float32)


def _wall(width: int, height: int, rng: np.random.Generator) -> Floats:
    """A grey-blue wall: lit from one side, with plaster-like texture and a darker skirting."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    light = 0.85 + 0.25 * (xs / width) - 0.10 * (ys / height)
    base = np.array([128.0, 112.0, 100.0], dtype=np.float32)
    texture = 4.0 * _blurred_noise(height, width, rng, max(1.0, width / 160)) + 3.0 * _blurred_noise(
        height, width, rng, max(0.6, width / 640)
    )
    wall: Floats = (base * light[:, :, None] + texture[:, :, None]).astype(np.float32)
    wall[ys > 0.86 * height] *= 0.55  # a darker skirting board
    return wall


def _face(width: int, height: int, rng: np.random.Generator) -> tuple[Floats, Floats, Floats]:
    """The face layer premultiplied by its soft alpha, the alpha, and the perfused part (where the pulse shows)."""
    cx, cy = width / 2.0, height * 0.50
    ax, ay = width * 0.15, height * 0.28
    unit = min(width, height) / 480.0
    Ellipse = tuple[tuple[float, float], tuple[float, float]]  # centre, semi-axes

    def soft(ellipses: list[Ellipse], blur: float) -> Floats:
        mask = np.zeros((height, width), dtype=np.uint8)
        for (x, y), (a, b) in ellipses:  # cv2 takes integers: draw with 4 fractional bits
            centre, axes = (round(x * 16), round(y * 16)), (max(1, round(a * 16)), max(1, round(b * 16)))
            cv2.ellipse(mask, centre, axes, 0, 0, 360, 255, -1, cv2.LINE_AA, 4)
        return cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), max(0.5, blur * unit)).astype(np.float32)

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    face = soft([((cx, cy), (ax, ay))], 1.5)
    neck = soft([((cx, cy + ay * 1.1), (ax * 0.48, ay * 0.55))], 1.5) * (1.0 - face)
    head = np.clip(face + neck, 0.0, 1.0)
    shirt = soft([((cx, cy + ay * 2.05), (ax * 2.6, ay * 0.62))], 2.0)
    head = head * (1.0 - shirt)
    hair = soft([((cx, cy - ay * 0.45), (ax * 1.1, ay * 0.7))], 2.0)
    above_hairline = 0.5 - 0.5 * np.tanh((ys - (cy - ay * 0.6)) / (3.0 * unit))
    hair = hair * (1.0 - head + head * above_hairline)
    eye_l, eye_r = (cx - ax * 0.40, cy - ay * 0.12), (cx + ax * 0.40, cy - ay * 0.12)
    eyes = soft([(eye_l, (ax * 0.17, ay * 0.06)), (eye_r, (ax * 0.17, ay * 0.06))], 1.0)
    brows = soft([((eye_l[0], eye_l[1] - ay * 0.13), (ax * 0.22, ay * 0.03)),
                  ((eye_r[0], eye_r[1] - ay * 0.13), (ax * 0.22, ay * 0.03))], 1.0)
    mouth = soft([((cx, cy + ay * 0.45), (ax * 0.30, ay * 0.06))], 1.2)
    nose = soft([((cx, cy + ay * 0.18), (ax * 0.10, ay * 0.05))], 2.0)

    # Light from the upper left; a darker nose tip; faint blotches.
    shading = 1.0 - 0.12 * ((xs - cx) / ax) ** 2 - 0.05 * (ys - cy) / ay - 0.06 * (xs - cx) / ax - 0.08 * nose
    shading -= 0.22 * neck  # in the chin's shadow
    shading *= 1.0 + 0.02 * _blurred_noise(height, width, rng, 3.0 * unit)
    skin_colour = np.array(SKIN_BGR, dtype=np.float32) * shading[:, :, None]

    dark = np.clip(eyes + brows, 0.0, 1.0) * head
    lips = mouth * head
    skin = np.clip(head * (1.0 - hair) * (1.0 - dark) * (1.0 - lips), 0.0, 1.0)
    # Skin and lips are perfused: they carry the pulse; hair, eyes and brows do not.
    bare = skin_colour * skin[:, :, None] + np.array([70.0, 80.0, 150.0], dtype=np.float32) * lips[:, :, None]
    colour = (
        bare
        + np.array([34.0, 37.0, 42.0], dtype=np.float32) * dark[:, :, None]
        + np.array([28.0, 34.0, 44.0], dtype=np.float32) * hair[:, :, None]
        + np.array([88.0, 96.0, 40.0], dtype=np.float32) * (shirt * (0.9 + 0.1 * xs / width))[:, :, None]
    )
    alpha = np.clip(head + hair + shirt, 0.0, 1.0)
    return colour.astype(np.float32), alpha.astype(np.float32), bare.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Layouts: the forms researchers' sessions come in, each with its reference pulse

LAYOUTS: Final = ("png", "jpeg", "video", "vfr", "ubfc", "pure")


def write_layout(
    directory: Path,
    layout: str,
    *,
    bpm: float = 72.0,
    seconds: float = 10.0,
    fps: float = 30.0,
    width: int = 320,
    height: int = 240,
    seed: int | None = None,
    start: float | None = None,
    reference: bool = True,
    times: list[float] | None = None,
) -> list[str]:
    """Write a session of ``layout`` into ``directory``; return the frames' timestamps as the source records them.

    - ``png`` / ``jpeg``: ``<timestamp>.png`` / ``.jpg`` frames, and ``reference.csv`` (``timestamp,ppg``);
    - ``video``: ``clip.avi`` (MJPEG), its modification time set so the first frame is at ``start``,
      and ``reference.csv`` (``seconds,ppg``);
    - ``vfr``: ``clip.mkv`` (MJPEG in Matroska), frames at ``times`` (seconds; default a
      jittered 1/fps), its creation time ``start``;
    - ``ubfc``: ``vid.avi`` + ``ground_truth.txt`` (PPG, HR, seconds), as UBFC-rPPG ships a subject;
    - ``pure``: ``<dir name>/Image<ns>.png`` + ``<dir name>.json`` (``/Image``, ``/FullPackage``), as PURE ships.

    The reference is the pulse the skin carries, sampled at each frame.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}")
    start = round(time.time() - seconds, 3) if start is None else start
    scene, stems = _prepare(bpm=bpm, seconds=seconds, fps=fps, width=width, height=height, seed=seed, start=start)
    directory.mkdir(parents=True, exist_ok=True)
    offsets = [i / fps for i in range(scene.count)]
    if layout == "vfr":
        rng = np.random.default_rng(seed)
        offsets = times if times is not None else [
            round(i / fps + (float(rng.uniform(0.0, 0.4 / fps)) if i else 0.0), 3) for i in range(scene.count)]
        if len(offsets) != scene.count or any(b <= a for a, b in itertools.pairwise(offsets)):
            raise ValueError(f"times must be {scene.count} increasing offsets")
    bvp = [round(float(v), 6) for v in scene.bvp]
    if layout in ("png", "jpeg"):
        suffix = ".png" if layout == "png" else ".jpg"
        for i, name in enumerate(stems):
            params = [int(cv2.IMWRITE_JPEG_QUALITY), 95] if layout == "jpeg" else []
            ok, data = cv2.imencode(suffix, scene.frame(i), params)
            if not ok:
                raise OSError(f"cv2 could not encode frame {i}")
            fsops.write_bytes_atomic(directory / f"{name}{suffix}", data.data)
        if reference:
            rows = "".join(f"{name},{v}\n" for name, v in zip(stems, bvp, strict=True))
            fsops.write_bytes_atomic(directory / "reference.csv", ("timestamp,ppg\n" + rows).encode())
        return stems
    if layout == "pure":
        images = directory / directory.name
        images.mkdir(exist_ok=True)
        ns = [int(Decimal(repr(start)).scaleb(9)) + round(offset * 1e9) for offset in offsets]
        for i, stamp in enumerate(ns):
            _write_frame(scene, i, images / f"Image{stamp}.png")
        document = {
            "/FullPackage": [{"Timestamp": stamp, "Value": {"waveform": v, "pulseRate": round(bpm),
                                                            "o2saturation": 98, "signalStrength": 5}}
                             for stamp, v in zip(ns, bvp, strict=True)],
            "/Image": [{"Timestamp": stamp} for stamp in ns],
        }
        fsops.write_bytes_atomic(directory / f"{directory.name}.json", json.dumps(document).encode())
        return [f"{str(stamp)[:-9]}.{str(stamp)[-9:]}" for stamp in ns]
    if layout == "vfr":
        write_mkv(directory / "clip.mkv", (scene.frame(i) for i in range(scene.count)),
                  [round(o * 1000) for o in offsets], created=start)
        if reference:
            rows = "".join(f"{o},{v}\n" for o, v in zip(offsets, bvp, strict=True))
            fsops.write_bytes_atomic(directory / "reference.csv", ("seconds,ppg\n" + rows).encode())
        return [f"{Decimal(repr(start)) + Decimal(round(o * 1000)).scaleb(-3):.6f}" for o in offsets]
    name = "vid.avi" if layout == "ubfc" else "clip.avi"
    path = directory / name
    write_avi(path, (scene.frame(i) for i in range(scene.count)), fps=fps, size=(width, height))
    duration = Decimal(scene.count) / Decimal(repr(float(fps)))
    os.utime(path, ns=(time.time_ns(), int((Decimal(repr(start)) + duration).scaleb(9))))
    if layout == "ubfc":
        lines = [" ".join(f"{v:.6e}" for v in bvp), " ".join(f"{bpm:.6e}" for _ in bvp),
                 " ".join(f"{o:.6e}" for o in offsets)]
        fsops.write_bytes_atomic(directory / "ground_truth.txt", ("\n".join(lines) + "\n").encode())
    elif reference:
        rows = "".join(f"{o},{v}\n" for o, v in zip(offsets, bvp, strict=True))
        fsops.write_bytes_atomic(directory / "reference.csv", ("seconds,ppg\n" + rows).encode())
    first = Decimal(repr(start)).quantize(Decimal("0.000001"))
    return [f"{first + Decimal(round(i * 1_000_000 / fps)).scaleb(-6):.6f}" for i in range(scene.count)]


def write_avi(path: Path, images: Iterable[Image], *, fps: float, size: tuple[int, int]) -> None:
    """Frames as an MJPEG AVI, the container UBFC-rPPG uses (OpenCV's own muxer: no creation time)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, size)
    if not writer.isOpened():
        raise OSError(f"cannot write {path}")
    try:
        for image in images:
            writer.write(image)
    finally:
        writer.release()


def _ebml(ident: int, body: bytes) -> bytes:
    """One EBML element: its ID, its size as an 8-byte variable-length integer, its body."""
    return ident.to_bytes((ident.bit_length() + 7) // 8, "big") + (0x01 << 56 | len(body)).to_bytes(8, "big") + body


def _uint(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def write_mkv(path: Path, images: Iterable[Image], times_ms: list[int], *, created: float | None = None,
              quality: int = 95) -> None:
    """Frames as MJPEG in Matroska at ``times_ms`` (any increasing times: variable frame rate).

    Written directly (EBML: header, Info with DateUTC when ``created`` is given, one video
    track, clusters of SimpleBlocks), because OpenCV's writer only knows constant rates.
    """
    width = height = 0
    cluster_start, pending = 0, b""
    clusters: list[bytes] = []
    for image, at in zip(images, times_ms, strict=True):
        height, width = image.shape[:2]
        ok, jpeg = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), quality])
        if not ok:
            raise OSError("cv2 could not encode a frame as JPEG")
        if at - cluster_start > 30_000 or not pending:
            if pending:
                clusters.append(_ebml(0x1F43B675, pending))
            cluster_start, pending = at, _ebml(0xE7, _uint(at))
        block = b"\x81" + (at - cluster_start).to_bytes(2, "big", signed=True) + b"\x80" + jpeg.tobytes()
        pending += _ebml(0xA3, block)
    if pending:
        clusters.append(_ebml(0x1F43B675, pending))
    header = _ebml(0x1A45DFA3, _ebml(0x4286, b"\x01") + _ebml(0x42F7, b"\x01") + _ebml(0x42F2, b"\x04")
                   + _ebml(0x42F3, b"\x08") + _ebml(0x4282, b"matroska") + _ebml(0x4287, b"\x04")
                   + _ebml(0x4285, b"\x02"))
    info = _ebml(0x2AD7B1, _uint(1_000_000)) + _ebml(0x4D80, b"caired") + _ebml(0x5741, b"caired synth")
    if times_ms:
        info += _ebml(0x4489, struct.pack(">d", float(times_ms[-1] + 1)))
    if created is not None:
        ns = int((Decimal(repr(created)) - 978307200).scaleb(9))
        info += _ebml(0x4461, struct.pack(">q", ns))
    track = _ebml(0xAE, _ebml(0xD7, b"\x01") + _ebml(0x73C5, b"\x01") + _ebml(0x83, b"\x01")
                  + _ebml(0x86, b"V_MJPEG") + _ebml(0xE0, _ebml(0xB0, _uint(width)) + _ebml(0xBA, _uint(height))))
    segment = _ebml(0x18538067, _ebml(0x1549A966, info) + _ebml(0x1654AE6B, track) + b"".join(clusters))
    fsops.write_bytes_atomic(path, header + segment)
