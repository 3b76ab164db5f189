"""Stream benchmark: caired against the original notebook client, on the same frames.

    python benchmarks/bench_stream.py [--frames 1000] [--repeat 3] [--out results.json]

It generates webcam-like 640x480 PNG frames once (cached), starts a backend in its own
process (``ws_backend.py``, a plain ``websockets`` server answering every frame; or with
``--backend caired``, ``caired backend --no-estimate --no-validate``), then runs each
client as its own process, one after another, ``--repeat`` times, and prints the
medians:

- caired unpaced jpeg and raw, caired paced at 30 fps (send times recorded for the
  jitter), and the notebook client jpeg and raw as fast as it goes (a high FPS: it
  has no unpaced mode);
- the limit of caired's pipeline: PNG decode (caired's own decoder) + JPEG q90 encode
  of the same frames on every core in this process, no network.

frames/s is taken over the streaming part (connection open to the close after
``finished``); wall is the whole process, start to exit. CPU ("CPU ms/f"), peak RSS and
context switches (voluntary and not, "switches/f") come from the child's own rusage
(``os.wait4``): start-up (~0.5 s of imports) and exit included. "streaming" is caired's
CPU per frame from its first message to its last (``traced_stream.py`` reads the
process's CPU time as each message leaves): what a frame costs a daemon that runs for
months, whatever it cost to start.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from _daemon import clean_env, wait_listening

HERE = Path(__file__).resolve().parent
WIDTH, HEIGHT = 640, 480
FIRST_STAMP = 1747154380.0
QUALITY = 90
PACED_FPS = 30


# ---------------------------------------------------------------- frames


def _base_image(shift: float) -> np.ndarray:
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    image = np.empty((HEIGHT, WIDTH, 3), np.float32)
    image[..., 0] = 60 + 40 * xx / WIDTH
    image[..., 1] = 70 + 50 * yy / HEIGHT
    image[..., 2] = 90 + 30 * (xx + yy) / (WIDTH + HEIGHT)
    face = ((xx - 320 - shift) / 110) ** 2 + ((yy - 230) / 150) ** 2 < 1
    image[face] = (110, 140, 190)
    return cv2.GaussianBlur(image, (0, 0), 3)


def _write_frame(directory: Path, index: int, bases: list[np.ndarray]) -> int:
    rng_sigma = 2.5 + 4.5 * (0.5 + 0.5 * math.sin(index / 40))  # sensor noise: 300-700 KB PNGs
    image = bases[index % len(bases)] * (1 + 0.01 * math.sin(2 * math.pi * 1.2 * index / PACED_FPS))
    noise = np.empty_like(image)
    cv2.randn(noise, (0, 0, 0), (rng_sigma, rng_sigma, rng_sigma))
    frame = np.clip(image + noise, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".png", frame)
    assert ok
    stamp = f"{FIRST_STAMP + index / PACED_FPS:.6f}"
    (directory / f"{stamp}.png").write_bytes(buf.tobytes())
    return len(buf)


def ensure_frames(cache: Path, count: int) -> Path:
    directory = cache / f"frames-{WIDTH}x{HEIGHT}-{count}"
    marker = directory / ".complete"
    if marker.exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    print(f"generating {count} frames into {directory} ...", file=sys.stderr)
    bases = [_base_image(8 * math.sin(k / 5)) for k in range(30)]
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        sizes = list(pool.map(lambda i: _write_frame(directory, i, bases), range(count)))
    marker.write_text(json.dumps({"count": count, "mean_bytes": sum(sizes) / len(sizes)}))
    print(f"  PNG sizes {min(sizes) // 1024}-{max(sizes) // 1024} KB", file=sys.stderr)
    return directory


def frame_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.png"), key=lambda p: float(p.stem))


# ---------------------------------------------------------------- the limit


def _decode_encode(path: Path) -> int:
    from caired import frames

    pixels = frames.decode_png(path.name, path.read_bytes())  # caired's own decoder and encoder: its pipeline's limit
    return len(frames.encode_jpeg(pixels.array, QUALITY, name=path.name, order=pixels.order))


def measure_limit(paths: list[Path]) -> dict[str, Any]:
    """Frames/s of decode + encode alone, with the same malloc tuning caired gets (it is worth ~30% here)."""
    from caired import wire

    wire.keep_big_buffers()
    start = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for _ in pool.map(_decode_encode, paths):
            pass
    seconds = time.perf_counter() - start
    return {"fps": len(paths) / seconds, "seconds": seconds}


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_backend(port: int, kind: str, answer_every: int) -> subprocess.Popen[bytes]:
    """The backend every client talks to, in its own process: the independent one, or caired's own."""
    if kind == "websockets":
        cmd = [sys.executable, str(HERE / "ws_backend.py"), "--port", str(port), "--answer-every", str(answer_every)]
    else:
        cmd = [sys.executable, "-m", "caired", "backend", "--host", "127.0.0.1", "--port", str(port),
               "--no-estimate", "--no-validate", "--log-format", "json", "--log-level", "warning"]
    return wait_listening(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=clean_env()), port)


def cpu_seconds(pid: int) -> float:
    """A running process's user + system CPU so far (Linux: /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# A child's ru_maxrss starts from the RSS high-water mark of the process that spawned it
# (vfork/posix_spawn share the parent's memory until exec, and exec keeps that mark).
# This process holds cv2 and decoded frames, so the measured clients are started by a
# lean launcher instead, whose own mark (~10 MB) is below anything measured.
_LAUNCHER = """
import json, os, subprocess, sys, tempfile, time
for line in sys.stdin:
    job = json.loads(line)
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(job["cmd"], stdout=subprocess.PIPE, stderr=err, env=job["env"])
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        err.seek(0)
        print(json.dumps({"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
                          "switches": usage.ru_nvcsw + usage.ru_nivcsw, "code": os.waitstatus_to_exitcode(status),
                          "stdout": out.decode("utf-8", "replace"),
                          "stderr": err.read().decode("utf-8", "replace")[-2000:]}), flush=True)
"""


class Launcher:
    def __init__(self) -> None:
        self._proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)

    def run(self, cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
        """Run to completion; wall time, CPU and peak RSS of that child alone, and its stdout."""
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps({"cmd": cmd, "env": env}) + "\n")
        self._proc.stdin.flush()
        result: dict[str, Any] = json.loads(self._proc.stdout.readline())
        if result.pop("code") != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{result['stderr']}")
        del result["stderr"]
        return result

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(10)


_launcher: Launcher | None = None


def run_child(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    global _launcher
    if _launcher is None:
        _launcher = Launcher()
    return _launcher.run(cmd, env)


def _iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def caired_stream_seconds(stdout: str) -> tuple[float, float]:
    """(session_started, session_finished) UNIX times from caired's JSON log lines."""
    started = finished = math.nan
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        if event.get("event") == "session_started":
            started = _iso(event["timestamp"])
        elif event.get("event") == "session_finished":
            finished = _iso(event["timestamp"])
    return started, finished


def notebook_stream_seconds(stdout: str) -> tuple[float, float]:
    started = finished = math.nan
    for line in stdout.splitlines():
        if line.startswith("connected "):
            started = float(line.split()[1])
        elif line.startswith("closed "):
            finished = float(line.split()[1])
    return started, finished


def run_caired(port: int, directory: Path, frames: int, *, fmt: str, fps: int, trace: Path | None,
               tree: Path | None = None) -> dict[str, Any]:
    """One ``caired stream``; ``tree``: the caired of that source tree instead (``--before``)."""
    args = [str(directory), "--fps", str(fps), "--format", fmt, "--jpeg-quality", str(QUALITY),
            "--log-format", "json", "--retries", "1"]
    if trace is not None:
        cmd = [sys.executable, str(HERE / "traced_stream.py"), str(trace), *args]
    else:
        cmd = [sys.executable, "-m", "caired", "stream", *args]
    extra = {"PYTHONPATH": str(tree)} if tree is not None else {}
    result = run_child(cmd, clean_env(BACKEND_WS_BASE=f"ws://127.0.0.1:{port}/ws/", **extra))
    started, finished = caired_stream_seconds(result.pop("stdout"))
    result.update(_rates(frames, finished - started, result))
    if trace is not None:
        traced = json.loads(trace.read_text())
        if len(traced["sends"]) < 2:
            raise SystemExit(f"traced_stream.py recorded {len(traced['sends'])} sends: "
                             "its hook no longer sees caired's messages")
        result.update(streaming_cpu(traced))
        if fps:
            result.update(jitter(traced, fps, started))
    return result


def streaming_cpu(trace: dict[str, Any]) -> dict[str, float]:
    """CPU per frame between the first message and the last (every thread; start-up and exit left out)."""
    cpu = trace["cpu"]
    return {"stream_cpu_ms": 1000 * (cpu[-1] - cpu[0]) / (len(cpu) - 1)}


def run_notebook(port: int, directory: Path, frames: int, *, fmt: str, fps: float) -> dict[str, Any]:
    env = clean_env(BACKEND_WS_BASE=f"ws://127.0.0.1:{port}/ws/", IMAGES_DIR=str(directory), FPS=f"{fps:g}",
                    FRAME_FORMAT=fmt, JPEG_QUALITY=str(QUALITY))
    result = run_child([sys.executable, str(HERE / "notebook_client.py")], env)
    started, finished = notebook_stream_seconds(result.pop("stdout"))
    result.update(_rates(frames, finished - started, result))
    return result


def _rates(frames: int, seconds: float, result: dict[str, Any]) -> dict[str, Any]:
    return {"stream_s": seconds, "fps": frames / seconds, "cpu_ms": 1000 * result["cpu"] / frames,
            "switches_per_frame": result["switches"] / frames}


def jitter(trace: dict[str, Any], fps: int, started: float) -> dict[str, Any]:
    """Each message's deviation from t0 + i / fps (t0 = the first send), in ms."""
    sends = trace["sends"]
    t0 = sends[0]
    deviations = sorted(abs(t - (t0 + i / fps)) * 1000 for i, t in enumerate(sends))
    return {
        "p50_ms": percentile(deviations, 50),
        "p99_ms": percentile(deviations, 99),
        "max_ms": deviations[-1],
        "paced_fps": (len(sends) - 1) / (sends[-1] - t0),
        "first_frame_s": trace["first_send_unix"] - started,
    }


def percentile(ordered: list[float], q: float) -> float:
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# ---------------------------------------------------------------- report

CASES = ("caired jpeg", "caired raw", "caired jpeg 30fps", "notebook jpeg", "notebook raw")
BEFORE = ("before jpeg", "before raw", "before jpeg 30fps")  # with --before DIR: that tree's caired, in the same run


def medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k in runs[0] if isinstance(runs[0][k], int | float)]
    return {k: statistics.median(run[k] for run in runs) for k in keys}


def table(summary: dict[str, dict[str, float]], limit: float) -> str:
    head = (f"{'case':<20}{'frames/s':>9}{'stream s':>9}{'wall s':>8}{'CPU ms/f':>9}{'streaming':>10}{'RSS MB':>8}"
            f"{'p50 ms':>8}{'p99 ms':>8}{'vs limit':>9}{'vs notebook':>12}{'backend CPU ms/f':>17}{'switches/f':>11}")
    lines = [head, "-" * len(head)]
    for case in (*CASES, *BEFORE):
        if case not in summary:
            continue
        row = summary[case]
        fmt = case.split()[1]
        base = summary.get(f"notebook {fmt}")
        vs_nb = "" if case.startswith("notebook") or base is None or "30fps" in case else (
            f"{row['fps'] / base['fps']:.1f}x")
        vs_limit = f"{row['fps'] / limit:.2f}" if fmt == "jpeg" and "30fps" not in case else ""
        p50 = f"{row['p50_ms']:.2f}" if "p50_ms" in row else ""
        p99 = f"{row['p99_ms']:.2f}" if "p99_ms" in row else ""
        lines.append(f"{case:<20}{row['fps']:>9.1f}{row['stream_s']:>9.2f}{row['wall']:>8.2f}{row['cpu_ms']:>9.2f}"
                     f"{row.get('stream_cpu_ms', math.nan):>10.2f}"
                     f"{row['rss_mb']:>8.1f}{p50:>8}{p99:>8}{vs_limit:>9}{vs_nb:>12}"
                     f"{row.get('backend_cpu_ms', math.nan):>17.2f}{row['switches_per_frame']:>11.1f}")
    lines.append(f"{'limit (decode+q90)':<20}{limit:>9.1f}")
    paced = summary.get("caired jpeg 30fps")
    if paced:
        lines.append(f"paced: {paced['paced_fps']:.2f} fps held, max deviation {paced['max_ms']:.2f} ms, "
                     f"first frame {1000 * paced['first_frame_s']:.0f} ms after the connection opened")
    for fmt in ("jpeg", "raw"):
        ours, base = summary.get(f"caired {fmt}"), summary.get(f"notebook {fmt}")
        if ours and base:
            lines.append(f"{fmt}: caired uses {ours['rss_mb'] / base['rss_mb']:.2f}x the notebook's peak RSS")
        before = summary.get(f"before {fmt}")
        if ours and before:
            lines.append(f"{fmt}: CPU per frame {ours['cpu_ms'] / before['cpu_ms']:.2f}x before's "
                         f"({ours['stream_cpu_ms'] / before['stream_cpu_ms']:.2f}x while streaming), "
                         f"frames/s {ours['fps'] / before['fps']:.2f}x before's")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "caired-bench")
    parser.add_argument("--out", type=Path, help="write every run and the medians as JSON")
    parser.add_argument("--only", choices=(*CASES, *BEFORE), action="append", help="run only these cases (repeatable)")
    parser.add_argument("--notebook-fps", type=float,
                        help="the notebook client's FPS: it has no unpaced mode, so 'unpaced' is a high FPS "
                             "(default: as many as there are frames, 1000; below 2 x frames, or its prefill "
                             "swallows the folder)")
    parser.add_argument("--backend", choices=("websockets", "caired"), default="websockets",
                        help="websockets: the independent asyncio server in ws_backend.py (default); "
                             "caired: caired's own backend, --no-estimate --no-validate")
    parser.add_argument("--before", type=Path, metavar="DIR",
                        help="also run the caired of this source tree (e.g. `git worktree add DIR main`), "
                             "unpaced jpeg and raw, interleaved with the others: before and after in one run")
    parser.add_argument("--answer-every", type=int, default=1, metavar="N",
                        help="the websockets backend answers every Nth frame (default 1: every frame)")
    args = parser.parse_args()
    cases = args.only or list(CASES)
    if args.before is not None and not args.only:
        cases += BEFORE
    if any(case.startswith("before") for case in cases) and args.before is None:
        parser.error("the 'before' cases need --before DIR")
    if args.notebook_fps is None:
        args.notebook_fps = float(args.frames)
    if any(case.startswith("notebook") for case in cases) and not 0 < args.notebook_fps * 0.5 < args.frames:
        parser.error(f"--notebook-fps must be above 0 and below {2 * args.frames} for {args.frames} frames")

    directory = ensure_frames(args.cache, args.frames)
    paths = frame_paths(directory)[: args.frames]
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in cases}
    limits: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "sends.json"
        for rep in range(args.repeat):
            limits.append(measure_limit(paths)["fps"])
            for case in cases:
                # A backend of its own for each run, so that none meets one that earlier runs left
                # holding the buffers of a thousand 0.8 MB raw messages.
                port = free_port()
                backend = start_backend(port, args.backend, args.answer_every)
                try:
                    who, fmt, *paced = case.split()
                    backend_cpu = cpu_seconds(backend.pid)
                    if who in ("caired", "before"):
                        fps = PACED_FPS if paced else 0
                        result = run_caired(port, directory, len(paths), fmt=fmt, fps=fps, trace=trace,
                                            tree=args.before.resolve() if who == "before" else None)
                    else:
                        result = run_notebook(port, directory, len(paths), fmt=fmt, fps=args.notebook_fps)
                    result["backend_cpu_ms"] = 1000 * (cpu_seconds(backend.pid) - backend_cpu) / len(paths)
                finally:
                    backend.terminate()
                    backend.wait(10)
                runs[case].append(result)
                print(f"[{rep + 1}/{args.repeat}] {case:<18} {result['fps']:7.1f} frames/s "
                      f"{result['cpu_ms']:6.2f} CPU ms/frame {result['rss_mb']:6.1f} MB"
                      + (f"  p99 {result['p99_ms']:.2f} ms" if "p99_ms" in result else ""), file=sys.stderr)

    limit = statistics.median(limits)
    summary = {case: medians(results) for case, results in runs.items()}
    with_notebook = any(case.startswith("notebook") for case in cases)
    notebook = f"; the notebook client at FPS={args.notebook_fps:g}" if with_notebook else ""
    answers = f", answering every {args.answer_every} frames" if args.answer_every > 1 else ", answering every frame"
    backend_name = f"the websockets backend{answers}" if args.backend == "websockets" else "caired's own backend"
    print(f"\n{len(paths)} frames {WIDTH}x{HEIGHT}, {os.cpu_count()} cores, medians of {args.repeat} runs, "
          f"{backend_name}{notebook}")
    print(table(summary, limit))
    if args.out:
        args.out.write_text(json.dumps({"frames": len(paths), "cores": os.cpu_count(), "limit_fps": limits,
                                        "runs": runs, "medians": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
