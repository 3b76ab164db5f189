"""Disk benchmark: a camera daemon on a small filesystem records ten times what it can hold.

    sudo python benchmarks/bench_disk.py [--size 200M] [--ratio 10] [--fps 15] [--session-seconds 4]
                                         [--camera-keep-frames true] [--fill-seconds 30]

Mounts a tmpfs of ``--size`` (a loop-mounted ext4 file when tmpfs cannot be mounted; both
need root) and runs ``caired run`` with its spool there and a video file of noisy 640x480
frames as the camera, streaming live to a local backend; each in its own process. The
retention keys keep their defaults (done/ budget 10% of the volume, free-space floor
10%); ``camera.keep_frames`` is true by default here, so every frame stays in done/ until
retention deletes it (the default, false, deletes them at delivery: the easy case).

It runs until the frames written add up to ``--ratio`` times the volume. A third of the
way in, a filler file (someone else's) takes the volume below the floor for
``--fill-seconds``, then goes: camera sessions must go on streaming live unrecorded and
be recorded again afterwards, by themselves.

At the end (the daemon stopped with SIGTERM; the session in flight is handed to
``incoming/`` to be streamed later) it checks:
- the lowest free space seen (statvfs every 0.1 s), and free space at the end above the floor;
- every camera session accounted for: filed in done/ (delivered), or waiting in incoming/
  (handed off at the stop), none lost, none failed;
- every deletion logged: frames written (``camera_session_recorded``) = frames deleted
  (``retention_deleted`` lines) + frames still on the volume;
- the low state entered and left (``disk_low``, ``disk_ok``, STATUS=).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from _daemon import Daemon, free_port, spool_env, start_backend, stop

from caired.config import parse_amount

WIDTH, HEIGHT = 640, 480


def make_video(path: Path, frames: int = 45) -> Path:
    if path.exists():
        return path
    rng = np.random.default_rng(3)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 30, (WIDTH, HEIGHT))
    writer.set(cv2.VIDEOWRITER_PROP_QUALITY, 95)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    for i in range(frames):
        base = np.stack([60 + 40 * xx / WIDTH, 70 + 50 * yy / HEIGHT, 90 + 30 * (xx + yy) / (WIDTH + HEIGHT)], -1)
        face = ((xx - 320 - 3 * i) / 110) ** 2 + ((yy - 230) / 150) ** 2 < 1
        base[face] = (110, 140, 190)
        noisy = base + rng.normal(0, 12, base.shape)
        writer.write(np.clip(noisy, 0, 255).astype(np.uint8))
    writer.release()
    return path


def mount_volume(point: Path, size: str, scratch: Path) -> str:
    """Mount a small filesystem at ``point``; returns what was mounted ('tmpfs' or 'ext4 loop')."""
    point.mkdir(parents=True, exist_ok=True)
    tried = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size.lower()}", "tmpfs", str(point)],
                           capture_output=True, text=True)
    if tried.returncode == 0:
        return "tmpfs"
    image = scratch / "volume.img"
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(point)], check=True)
    return "ext4 loop"


def pngs(root: Path) -> int:
    """Frame files under ``root``: camera sessions record ``.jpg`` frames, dropped folders ``.png``."""
    return sum(1 for p in root.rglob("*") if p.suffix in (".png", ".jpg"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="200M", help="the volume's size")
    parser.add_argument("--ratio", type=float, default=10.0, help="run until this many volumes were written")
    parser.add_argument("--fps", default="15")
    parser.add_argument("--session-seconds", default="4")
    parser.add_argument("--camera-keep-frames", default="true")
    parser.add_argument("--fill-seconds", type=float, default=30.0, help="how long the filler holds the floor")
    parser.add_argument("--max-seconds", type=float, default=540.0, help="stop anyway after this long")
    parser.add_argument("--mount", default=None, help="mount point (default: a new folder in $TMPDIR)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="caired-bench-disk-"))
    point = Path(args.mount) if args.mount else scratch / "volume"
    kind = mount_volume(point, args.size, scratch)
    try:
        return run(args, scratch, point, kind)
    finally:
        subprocess.run(["umount", str(point)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace, scratch: Path, point: Path, kind: str) -> int:
    video = make_video(scratch / "camera.avi")
    spool = point / "spool"
    st = os.statvfs(point)
    volume = st.f_blocks * st.f_frsize
    floor = int(volume * parse_amount("10%")[0] / 100)
    port = free_port()
    backend = start_backend(port)
    events: Counter[str] = Counter()
    written = [0]
    deleted = {"files": 0, "bytes": 0, "frames_lines": 0, "folder_lines": 0}
    why: Counter[str] = Counter()
    sessions: dict[str, str] = {}  # camera session -> its last known state
    counted: set[str] = set()  # sessions whose frames a camera_session_recorded line counted
    recorded_bytes = [0]
    lock = threading.Lock()
    low_statuses: list[str] = []

    def on_line(event: dict[str, Any]) -> None:
        kind_ = event.get("event", "")
        with lock:
            events[kind_] += 1
            if kind_ == "camera_session_recorded":
                written[0] += int(event.get("frames", 0))
                counted.add(event.get("session", ""))
            elif kind_ == "retention_deleted":
                deleted["files"] += int(event.get("files", 0))
                deleted["bytes"] += int(event.get("bytes", 0))
                deleted["frames_lines" if event["what"] == "frames" else "folder_lines"] += 1
                why[event["why"].split(" =")[0]] += 1
            elif kind_ == "folder_created":
                sessions[event["session"]] = "recording"
            elif kind_ in ("folder_done", "folder_failed", "folder_handed_off") and event.get("source") == "camera":
                sessions[event["session"]] = kind_.removeprefix("folder_")

    env = spool_env(spool, port, CAIRED_CAMERA_ENABLED="true", CAIRED_CAMERA_DEVICE=str(video),
                    CAIRED_CAMERA_FPS=args.fps, CAIRED_CAMERA_SESSION_SECONDS=args.session_seconds,
                    CAIRED_CAMERA_WIDTH=str(WIDTH), CAIRED_CAMERA_HEIGHT=str(HEIGHT),
                    CAIRED_CAMERA_KEEP_FRAMES=args.camera_keep_frames)
    env.pop("FPS")
    env["CAIRED_STREAM_FPS"] = "0"
    daemon = Daemon(env, scratch, on_line=on_line, keep_lines=False)
    lowest_free = volume
    filler = point / "someone-elses-file"
    fill_phase = "before"
    fill_started = fill_ended = 0.0
    start = time.monotonic()
    try:
        daemon.wait_ready()
        while True:
            now = time.monotonic() - start
            st = os.statvfs(point)
            free = st.f_bavail * st.f_frsize
            lowest_free = min(lowest_free, free)
            # bytes written so far: what was deleted plus what is on the volume now (less the filler)
            used = volume - free - (filler.stat().st_size if filler.exists() else 0)
            with lock:
                recorded_bytes[0] = deleted["bytes"] + max(0, used)
            if "DISK LOW" in daemon.notifications.status and not low_statuses:
                low_statuses.append(daemon.notifications.status)
            if fill_phase == "before" and recorded_bytes[0] >= volume * args.ratio / 3:
                fill_phase, fill_started = "filling", now
                with filler.open("wb") as fh:  # leave half the floor free
                    fh.truncate(0)
                    chunk = b"\0" * (1 << 20)
                    target = max(0, free - floor // 2)
                    while fh.tell() + len(chunk) <= target:
                        fh.write(chunk)
                print(f"{now:6.1f} s: filler of {filler.stat().st_size >> 20} MiB takes free space below the floor",
                      flush=True)
            elif fill_phase == "filling" and now - fill_started >= args.fill_seconds:
                filler.unlink()
                fill_phase, fill_ended = "after", now
                print(f"{now:6.1f} s: filler removed", flush=True)
            if fill_phase == "after" and recorded_bytes[0] >= volume * args.ratio:
                break
            if now > args.max_seconds:
                print("stopped at --max-seconds before the ratio was reached", flush=True)
                break
            if daemon.proc.poll() is not None:
                raise SystemExit(f"caired run exited with {daemon.proc.returncode}")
            time.sleep(0.1)
        elapsed = time.monotonic() - start
    finally:
        daemon.stop()
        stop(backend)

    st = os.statvfs(point)
    free_end = st.f_bavail * st.f_frsize
    on_disk = pngs(spool)
    # the session in flight at the stop is handed off before it could log what it recorded
    written[0] += sum(pngs(p) for p in (spool / "incoming").iterdir() if p.name not in counted)
    states = Counter(sessions.values())
    done_results = [json.loads(p.read_text()) for p in (spool / "done").glob("*/result.json")]
    unrecorded = [r for r in done_results if r.get("frames_not_recorded")]
    recorded_after = [r for r in done_results if r.get("frames_recorded", 0) > 0]
    lost = states.get("recording", 0) + states.get("failed", 0)
    waiting = len([p for p in (spool / "incoming").iterdir() if not p.name.startswith(".")])
    figures = {
        "volume": kind, "volume_bytes": volume, "floor_bytes": floor, "seconds": elapsed,
        "bytes_written": recorded_bytes[0], "volumes_written": recorded_bytes[0] / volume,
        "frames_written": written[0], "frames_deleted_logged": deleted["files"], "frames_on_volume": on_disk,
        "deletion_lines": deleted["frames_lines"] + deleted["folder_lines"], "deletions_by_key": dict(why),
        "lowest_free": lowest_free, "free_at_end": free_end, "sessions": dict(states),
        "sessions_done": len(done_results), "sessions_unrecorded_live": len(unrecorded),
        "sessions_waiting_at_stop": waiting, "disk_low": events["disk_low"], "disk_ok": events["disk_ok"],
        "low_status": low_statuses[0] if low_statuses else None, "fill": [fill_started, fill_ended],
        "errors": events["internal_error"],
    }
    print(f"\n{kind} of {volume / 2**20:.0f} MiB, floor {floor / 2**20:.0f} MiB, {elapsed:.0f} s:")
    print(f"  written {recorded_bytes[0] / 2**20:.0f} MiB = {figures['volumes_written']:.1f} volumes "
          f"({written[0]} frames in {len(sessions)} camera sessions)")
    print(f"  free space: lowest {lowest_free / 2**20:.1f} MiB (the filler left {floor / 2**21:.1f}), "
          f"at the end {free_end / 2**20:.1f} MiB (floor {floor / 2**20:.1f})")
    print(f"  sessions: {dict(states)}; done/ holds {len(done_results)} results, "
          f"{len(unrecorded)} streamed live without (all their frames) recorded; {waiting} waiting in incoming/")
    print(f"  deletions: {figures['deletion_lines']} retention_deleted lines, {deleted['files']} frames "
          f"({deleted['bytes'] / 2**20:.0f} MiB), by key {dict(why)}")
    print(f"  frames written {written[0]} = deleted and logged {deleted['files']} + on the volume {on_disk}: "
          f"{'yes' if written[0] == deleted['files'] + on_disk else 'NO'}")
    print(f"  low disk: disk_low {events['disk_low']}, disk_ok {events['disk_ok']}, STATUS={figures['low_status']!r}")
    ok = (figures["volumes_written"] >= args.ratio and free_end >= floor and lost == 0
          and written[0] == deleted["files"] + on_disk and events["disk_low"] >= 1 and events["disk_ok"] >= 1
          and bool(unrecorded) and bool(recorded_after) and events["internal_error"] == 0)
    print(f"  holds: {'yes' if ok else 'NO'}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
