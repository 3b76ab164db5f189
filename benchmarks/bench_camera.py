"""Camera daemon benchmark: CPU of ``caired run`` with ``[camera] enabled``, a video file as the camera.

    python benchmarks/bench_camera.py [--seconds 15] [--repeat 3] [--sizes 640x480,1280x720]

For each size a video file stands in for the camera (MJPG in AVI, sensor-like noise on a
moving face, 10 s that the camera replays forever; made once and cached). Against the
independent backend (``ws_backend.py``, answering every frame), the daemon runs at 30 fps
with recording on (each frame written into the spool, as in production) and off
(``camera_daemon.py --no-record``: the same daemon with its frame writer replaced by one
that writes nothing). Each case is its own daemon process, cases interleaved, ``--repeat``
rounds; after a warm-up, its CPU (user + system, every thread, ``/proc/PID/stat``) is read
over ``--seconds`` of wall time.

Columns: CPU % of one core; CPU ms per captured frame; frames/s captured and streamed over
the window (from the daemon's own log lines); peak RSS (``VmHWM``). Medians of the rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_stream import clean_env, cpu_seconds, free_port, start_backend  # noqa: E402

FPS = 30
VIDEO_SECONDS = 10
SESSION_SECONDS = 10
WARMUP = 3.0


def ensure_video(cache: Path, width: int, height: int) -> Path:
    """A 10 s MJPG video of a moving face under sensor noise, as a webcam would deliver."""
    path = cache / f"camera-{width}x{height}-{FPS}fps.avi"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.avi")
    writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (width, height))
    if not writer.isOpened():
        raise SystemExit("OpenCV cannot write an MJPG video here")
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    background = np.empty((height, width, 3), np.float32)
    background[..., 0] = 60 + 40 * xx / width
    background[..., 1] = 70 + 50 * yy / height
    background[..., 2] = 90 + 30 * (xx + yy) / (width + height)
    rng = np.random.default_rng(16)
    for i in range(FPS * VIDEO_SECONDS):
        image = background.copy()
        cx = width / 2 + width / 40 * math.sin(i / 25)
        face = ((xx - cx) / (width / 5.8)) ** 2 + ((yy - height / 2) / (height / 3.2)) ** 2 < 1
        image[face] = np.array((110, 140, 190), np.float32) * (1 + 0.01 * math.sin(2 * math.pi * 1.2 * i / FPS))
        image = cv2.GaussianBlur(image, (0, 0), 3)
        image += rng.normal(0, 2.5 + 4.5 * (0.5 + 0.5 * math.sin(i / 40)), image.shape).astype(np.float32)
        writer.write(np.clip(image, 0, 255).astype(np.uint8))
    writer.release()
    partial.rename(path)
    return path


def config(directory: Path, port: int, video: Path, width: int, height: int) -> Path:
    path = directory / "caired.toml"
    path.write_text(f"""
[backend]
url = "ws://127.0.0.1:{port}/ws/"
heartbeat = 5.0

[spool]
dir = "{directory / 'spool'}"

[log]
level = "info"
format = "json"

[camera]
enabled = true
device = "{video}"
width = {width}
height = {height}
fps = {FPS}
session_seconds = {SESSION_SECONDS}
""")
    return path


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def run_case(port: int, video: Path, width: int, height: int, *, record: bool, seconds: float,
             tree: Path | None = None) -> dict[str, Any]:
    """One daemon run; ``tree``: the caired of that source tree instead (``--before``)."""
    with tempfile.TemporaryDirectory(prefix="caired-bench-camera-") as tmp:
        directory = Path(tmp)
        cfg = config(directory, port, video, width, height)
        log_path = directory / "daemon.jsonl"
        cmd = [sys.executable, str(HERE / "camera_daemon.py"), *([] if record else ["--no-record"]),
               "--config", str(cfg)]
        with log_path.open("wb") as log:
            extra = {"PYTHONPATH": str(tree)} if tree is not None else {}
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=clean_env(**extra))
            try:
                time.sleep(WARMUP)
                if proc.poll() is not None:
                    raise SystemExit(f"the daemon exited: {log_path.read_text()[-2000:]}")
                cpu0, wall0 = cpu_seconds(proc.pid), time.monotonic()
                sent0 = count_sent(log_path)
                time.sleep(seconds)
                cpu1, wall1 = cpu_seconds(proc.pid), time.monotonic()
                sent1 = count_sent(log_path)
                rss = peak_rss_mb(proc.pid)
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        cpu, wall = cpu1 - cpu0, wall1 - wall0
        frames = FPS * wall
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        captured = [e for e in lines if e.get("event") == "camera_session_captured"]
        problems = [e for e in lines if e.get("level") in ("error", "critical")]
        if problems:
            raise SystemExit(f"the daemon logged errors: {problems[:3]}")
        return {
            "cpu_pct": 100 * cpu / wall,
            "cpu_ms": 1000 * cpu / frames,
            "answers_fps": (sent1 - sent0) / wall,
            "captured_fps": statistics.median(e["fps"] for e in captured) if captured else math.nan,
            "dropped": sum(e.get("dropped", 0) for e in captured),
            "rss_mb": rss,
            "sessions": len(captured),
        }


def count_sent(log_path: Path) -> int:
    """Answers the daemon logged so far: one per frame from a backend that answers every frame."""
    text = log_path.read_bytes()
    return text.count(b'"event": "response"') + text.count(b'"event":"response"')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured wall time per run, after a warm-up")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", default="640x480,1280x720")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "caired-bench")
    parser.add_argument("--before", type=Path, metavar="DIR",
                        help="also run the caired of this source tree, interleaved: before and after in one run")
    parser.add_argument("--out", type=Path, help="write every run and the medians as JSON")
    args = parser.parse_args()
    sizes = [tuple(int(n) for n in size.split("x")) for size in args.sizes.split(",")]
    videos = {size: ensure_video(args.cache, *size) for size in sizes}
    trees: list[Path | None] = [None] if args.before is None else [None, args.before.resolve()]
    cases = [(size, record, tree) for size in sizes for record in (True, False) for tree in trees]
    port = free_port()
    backend = start_backend(port, "websockets", 1)
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for rep in range(args.repeat):
            for (width, height), record, tree in cases:
                name = f"{'before ' if tree else ''}{width}x{height} recording {'on' if record else 'off'}"
                result = run_case(port, videos[(width, height)], width, height, record=record, seconds=args.seconds,
                                  tree=tree)
                runs.setdefault(name, []).append(result)
                print(f"[{rep + 1}/{args.repeat}] {name:<33} {result['cpu_pct']:5.1f}% of a core "
                      f"{result['cpu_ms']:6.2f} CPU ms/frame {result['answers_fps']:5.1f} answers/s "
                      f"{result['rss_mb']:6.1f} MB", file=sys.stderr)
    finally:
        backend.terminate()
        backend.wait(10)
    summary = {name: {k: statistics.median(r[k] for r in results) for k in results[0]}
               for name, results in runs.items()}
    print(f"\ncaired run, [camera] a video file at {FPS} fps, {os.cpu_count()} cores, medians of {args.repeat} runs "
          f"of {args.seconds:g} s; the websockets backend answering every frame")
    head = f"{'case':<33}{'CPU %':>7}{'CPU ms/f':>9}{'captured/s':>11}{'answers/s':>10}{'dropped':>8}{'RSS MB':>8}"
    print(head)
    print("-" * len(head))
    for name, row in summary.items():
        print(f"{name:<33}{row['cpu_pct']:>7.1f}{row['cpu_ms']:>9.2f}{row['captured_fps']:>11.1f}"
              f"{row['answers_fps']:>10.1f}{row['dropped']:>8.0f}{row['rss_mb']:>8.1f}")
    if args.out:
        args.out.write_text(json.dumps({"runs": runs, "medians": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
