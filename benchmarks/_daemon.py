"""What the spool benchmarks share: a local backend and a ``caired run`` daemon in their own
processes, the daemon's log read line by line, its sd_notify messages, its /proc figures,
and folders of small frames made cheaply (hard links to a few template PNGs)."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

FIRST_STAMP = 1747154380.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The environment as the benchmark started: importing caired sets OpenCV variables in
# os.environ (OPENCV_FOR_THREADS_NUM...), and a child measured as another program (the
# code before a change, the notebook client) must not inherit them from this process.
_STARTING_ENV: dict[str, str] = dict(os.environ)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in _STARTING_ENV.items() if not k.startswith("CAIRED_")}
    for name in ("BACKEND_WS_BASE", "API_KEY", "IMAGES_DIR", "FPS", "FRAME_FORMAT", "JPEG_QUALITY", "NOTIFY_SOCKET",
                 "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(name, None)
    env.update(extra)
    return env


def start_backend(port: int) -> subprocess.Popen[bytes]:
    """``caired backend`` on 127.0.0.1:port, no estimate and no validation (the benchmark
    measures caired, not the emulator); returns once it listens."""
    cmd = [sys.executable, "-m", "caired", "backend", "--host", "127.0.0.1", "--port", str(port),
           "--no-estimate", "--no-validate", "--log-format", "json", "--log-level", "warning"]
    return wait_listening(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=clean_env()), port)


def wait_listening(proc: subprocess.Popen[bytes], port: int) -> subprocess.Popen[bytes]:
    """``proc`` once something listens on 127.0.0.1:port; SystemExit if it dies or takes 20 s."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("the backend did not start") from None
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the backend did not start listening")


def stop(proc: subprocess.Popen[Any], timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- frames and folders


def template_frames(directory: Path, count: int = 20, size: tuple[int, int] = (32, 24)) -> list[Path]:
    """``count`` small noisy PNGs named by timestamp, made once."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    paths = []
    for i in range(count):
        path = directory / f"{FIRST_STAMP + i / 30:.6f}.png"
        if not path.exists():
            image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            ok, buf = cv2.imencode(".png", image)
            assert ok
            path.write_bytes(buf.tobytes())
        paths.append(path)
    return paths


def make_folder(folder: Path, frames: list[Path]) -> None:
    """A session folder whose frames are hard links to the templates (same filesystem)."""
    folder.mkdir()
    for frame in frames:
        os.link(frame, folder / frame.name)


# ---------------------------------------------------------------- the daemon


class Notifications:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET: the time of READY=1 and
    the last STATUS=."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify.sock"
        self.path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.ready_at: float | None = None
        self.status = ""
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536).decode()
            except OSError:
                return
            for line in data.splitlines():
                if line == "READY=1" and self.ready_at is None:
                    self.ready_at = time.perf_counter()
                elif line.startswith("STATUS="):
                    self.status = line[len("STATUS="):]

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


class Daemon:
    """``caired run`` in its own process; every JSON log line goes to ``on_line`` (in a reader
    thread) and into ``lines`` unless ``keep_lines`` is off."""

    def __init__(self, env: dict[str, str], workdir: Path, *, on_line: Callable[[dict[str, Any]], None] | None = None,
                 keep_lines: bool = True, pythonpath: str | None = None) -> None:
        self.notifications = Notifications(workdir)
        full = clean_env(**env, NOTIFY_SOCKET=str(self.notifications.path), CAIRED_LOG_FORMAT="json")
        if pythonpath:
            full["PYTHONPATH"] = pythonpath
        self.started_at = time.perf_counter()
        # cwd: ``-m`` puts the working folder first on sys.path, before PYTHONPATH
        self.proc = subprocess.Popen([sys.executable, "-m", "caired", "run"], stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=full, cwd=workdir)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self._on_line = on_line
        self._keep = keep_lines
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            event["_t"] = time.perf_counter()
            if self._on_line is not None:
                self._on_line(event)
            if self._keep:
                self.lines.put(event)

    def wait_ready(self, timeout: float = 600) -> float:
        """Seconds from the spawn to READY=1."""
        deadline = time.monotonic() + timeout
        while self.notifications.ready_at is None:
            if self.proc.poll() is not None:
                raise SystemExit(f"caired run exited with {self.proc.returncode} before READY")
            if time.monotonic() > deadline:
                raise SystemExit("caired run did not get READY")
            time.sleep(0.005)
        return self.notifications.ready_at - self.started_at

    def proc_stats(self) -> dict[str, float]:
        """RSS (MB), open descriptors, threads and CPU seconds of the daemon now."""
        pid = self.proc.pid
        status = Path(f"/proc/{pid}/status").read_text()
        rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
        threads = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        return {"rss_mb": rss_kb / 1024, "fds": fds, "threads": threads, "cpu_s": cpu}

    def stop(self) -> None:
        stop(self.proc, timeout=60)
        self._reader.join(10)
        self.notifications.close()


def workdir(base: str | None, name: str) -> Path:
    root = Path(base) if base else Path(tempfile.gettempdir())
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def spool_env(spool: Path, port: int, **extra: str) -> dict[str, str]:
    return {
        "CAIRED_SPOOL_DIR": str(spool),
        "BACKEND_WS_BASE": f"ws://127.0.0.1:{port}/ws/",
        "FPS": "0",
        "CAIRED_BACKEND_HEARTBEAT": "0",
        **extra,
    }


def caired_source(pythonpath: str | None, cwd: Path) -> str:
    """Where the daemon's ``caired`` package comes from, as the daemon would import it."""
    env = clean_env(**({"PYTHONPATH": pythonpath} if pythonpath else {}))
    out = subprocess.run([sys.executable, "-c", "import caired, os; print(os.path.dirname(caired.__file__))"],
                         env=env, cwd=cwd, capture_output=True, text=True, check=True)
    return out.stdout.strip()
