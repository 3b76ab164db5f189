"""Spool benchmark: sessions/s with 10, 1,000 and 10,000 folders waiting, and start-up to READY.

    python benchmarks/bench_spool.py [--backlogs 10,1000,10000] [--sessions 300] [--repeat 1]
                                     [--ready-incoming 10000 --ready-active 1000] [--caired-src DIR]

For each backlog N a fresh spool gets N folders of 20 small frames (32x24 noisy PNGs,
hard links to 20 templates, so 10,000 folders cost little disk) in ``incoming/``, moved in
after being written, without a ``.ready`` marker: each is complete by the settle rule,
which is the expensive look. A daemon (``caired run``, max_sessions 2, unpaced, default
settle and rescan) streams them to the local backend (``caired backend --no-estimate
--no-validate``), each in its own process. The backlog is held at N: each time a session
ends (``folder_done``), the benchmark moves one more folder, written before the daemon
started, into ``incoming/``. After ``--warmup`` sessions, the time of the next
``--sessions`` gives sessions/s, and the daemon's CPU over them gives CPU ms per session.
With ``--repeat`` the backlogs are run in turn, round after round, and medians reported.

Then the start-up case: ``--ready-incoming`` folders in ``incoming/`` and ``--ready-active``
folders left in ``active/`` by a process that died; the time from spawning ``caired run``
to READY=1 (its sd_notify, caught on a socket of our own), and to the first session done.

``--caired-src DIR`` runs the daemon from another checkout (PYTHONPATH=DIR), for a
before/after comparison on the same machine; the backend and the harness stay the same.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _daemon import (
    Daemon,
    caired_source,
    free_port,
    make_folder,
    spool_env,
    start_backend,
    stop,
    template_frames,
    workdir,
)

SETTLE = 5.0  # the default settle_seconds: folders are written at least this long before the daemon looks


def build(spool: Path, frames: list[Path], waiting: int, pool: int, active: int = 0) -> None:
    """``waiting`` folders in incoming/, ``pool`` more in tmp/pool/ (moved in later), ``active``
    folders in active/ as a dead process leaves them (a locked-by-nobody lock file, no session)."""
    for name in ("incoming", "active", "done", "failed", "tmp", "tmp/pool"):
        (spool / name).mkdir(parents=True, exist_ok=True)
    for i in range(waiting):
        make_folder(spool / "tmp" / f"w{i:06d}", frames)
        os.rename(spool / "tmp" / f"w{i:06d}", spool / "incoming" / f"w{i:06d}")
    for i in range(pool):
        make_folder(spool / "tmp" / "pool" / f"p{i:06d}", frames)
    for i in range(active):
        make_folder(spool / "active" / f"a{i:06d}", frames)
        (spool / "active" / f"a{i:06d}" / ".caired-lock").touch()


def settle_wait(since: float) -> None:
    left = SETTLE + 0.5 - (time.monotonic() - since)
    if left > 0:
        time.sleep(left)


def measure_backlog(base: Path, port: int, frames: list[Path], waiting: int, warmup: int, sessions: int,
                    pythonpath: str | None) -> dict[str, Any]:
    spool = base / f"backlog-{waiting}" / "spool"
    if spool.exists():
        shutil.rmtree(spool)
    pool = warmup + sessions + 10
    t0 = time.monotonic()
    build(spool, frames, waiting, pool)
    built = time.monotonic() - t0
    settle_wait(time.monotonic())
    pool_names = sorted(os.listdir(spool / "tmp" / "pool"))
    done_times: list[float] = []
    lock = threading.Lock()

    def on_line(event: dict[str, Any]) -> None:
        if event.get("event") != "folder_done":
            return
        with lock:
            done_times.append(event["_t"])
            if pool_names:  # hold the backlog: one more folder for each one done
                name = pool_names.pop(0)
                os.rename(spool / "tmp" / "pool" / name, spool / "incoming" / name)

    daemon = Daemon(spool_env(spool, port, CAIRED_SPOOL_MAX_SESSIONS="2"), spool.parent, on_line=on_line,
                    keep_lines=False, pythonpath=pythonpath)
    try:
        ready = daemon.wait_ready()
        cpu_marks: dict[int, float] = {}
        deadline = time.monotonic() + 600
        while True:
            with lock:
                count = len(done_times)
            if warmup not in cpu_marks and count >= warmup:
                cpu_marks[warmup] = daemon.proc_stats()["cpu_s"]
            if count >= warmup + sessions:
                cpu_marks[warmup + sessions] = daemon.proc_stats()["cpu_s"]
                break
            if time.monotonic() > deadline or daemon.proc.poll() is not None:
                raise SystemExit(f"backlog {waiting}: only {count} sessions done")
            time.sleep(0.01)
        stats = daemon.proc_stats()
    finally:
        daemon.stop()
    with lock:
        window = done_times[warmup - 1: warmup + sessions]
    seconds = window[-1] - window[0]
    cpu = cpu_marks[warmup + sessions] - cpu_marks[warmup]
    return {"waiting": waiting, "sessions": sessions, "seconds": seconds, "rate": sessions / seconds,
            "cpu_ms": 1000 * cpu / sessions, "ready_s": ready, "build_s": built, "rss_mb": stats["rss_mb"]}


def measure_startup(base: Path, port: int, frames: list[Path], incoming: int, active: int,
                    pythonpath: str | None) -> dict[str, Any]:
    spool = base / "startup" / "spool"
    if spool.exists():
        shutil.rmtree(spool)
    build(spool, frames, incoming, 0, active)
    settle_wait(time.monotonic())
    first: list[float] = []
    recovered: list[int] = []

    def on_line(event: dict[str, Any]) -> None:
        if event.get("event") == "folder_done" and not first:
            first.append(event["_t"])
        elif event.get("event") == "daemon_starting":
            recovered.append(event.get("recovered", -1))

    daemon = Daemon(spool_env(spool, port, CAIRED_SPOOL_MAX_SESSIONS="2"), spool.parent, on_line=on_line,
                    keep_lines=False, pythonpath=pythonpath)
    try:
        ready = daemon.wait_ready()
        deadline = time.monotonic() + 300
        while not first and time.monotonic() < deadline and daemon.proc.poll() is None:
            time.sleep(0.01)
        first_done = first[0] - daemon.started_at if first else float("nan")
        status = daemon.notifications.status
    finally:
        daemon.stop()
    return {"incoming": incoming, "active": active, "ready_s": ready, "first_done_s": first_done,
            "recovered": recovered[0] if recovered else None, "status": status}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlogs", default="10,1000,10000", help="comma-separated backlog sizes")
    parser.add_argument("--sessions", type=int, default=300, help="sessions timed per backlog")
    parser.add_argument("--warmup", type=int, default=30, help="sessions before the timing starts")
    parser.add_argument("--repeat", type=int, default=1, help="runs per backlog (medians reported)")
    parser.add_argument("--ready-incoming", type=int, default=10_000)
    parser.add_argument("--ready-active", type=int, default=1_000)
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up case")
    parser.add_argument("--caired-src", default=None, help="run the daemon from this checkout (PYTHONPATH)")
    parser.add_argument("--dir", default=None, help="where the spools are made (default $TMPDIR)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    base = workdir(args.dir, "caired-bench-spool")
    frames = template_frames(base / "templates")
    backlogs = [int(b) for b in args.backlogs.split(",") if b]
    port = free_port()
    source = caired_source(args.caired_src, base)
    print(f"caired run from {source}", flush=True)
    backend = start_backend(port)
    results: dict[str, Any] = {"backlogs": [], "startup": None, "caired_src": source}
    try:
        by_backlog: dict[int, list[dict[str, Any]]] = {waiting: [] for waiting in backlogs}
        for _ in range(args.repeat):  # interleaved, so a busy spell of the machine hits every backlog alike
            for waiting in backlogs:
                by_backlog[waiting].append(measure_backlog(base, port, frames, waiting, args.warmup, args.sessions,
                                                           args.caired_src))
        for waiting, runs in by_backlog.items():
            rate = statistics.median(r["rate"] for r in runs)
            row = {**runs[0], "rate": rate, "rates": [r["rate"] for r in runs],
                   "cpu_ms": statistics.median(r["cpu_ms"] for r in runs)}
            results["backlogs"].append(row)
            print(f"{waiting:>6} waiting: {rate:6.2f} sessions/s  CPU {row['cpu_ms']:6.1f} ms/session  "
                  f"READY {row['ready_s']:.2f} s  RSS {row['rss_mb']:.1f} MB  (built in {row['build_s']:.1f} s)",
                  flush=True)
        if not args.no_startup:
            start = measure_startup(base, port, frames, args.ready_incoming, args.ready_active, args.caired_src)
            results["startup"] = start
            print(f"start-up with {start['incoming']} in incoming/ and {start['active']} in active/: "
                  f"READY after {start['ready_s']:.2f} s (recovered {start['recovered']}), "
                  f"first session done after {start['first_done_s']:.2f} s", flush=True)
    finally:
        stop(backend)
    rows = results["backlogs"]
    if rows:
        small = rows[0]
        for row in rows[1:]:
            print(f"rate at {row['waiting']} waiting / rate at {small['waiting']}: {row['rate'] / small['rate']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
