"""Shared fakes: frame folders, a real local backend on 127.0.0.1 port 0, configs, the CLI."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import structlog
import trio

from caired import logging as clog
from caired.config import Config
from caired.emulator.server import BackendOptions, BackendState, Faults, serve_backend
from caired.spool import Spool

SECRET_KEY = "s3cr3t-Key-0123456789abcdef"
T0 = 1747154380.5511632


def write_frames(
    directory: Path,
    count: int,
    *,
    fps: float = 30.0,
    start: float = T0,
    size: tuple[int, int] = (64, 48),
    seed: int = 0,
) -> list[Path]:
    """``count`` small noisy PNG frames named by timestamp, 1/fps apart."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = directory / f"{start + i / fps:.7f}.png"
        cv2.imwrite(str(path), image)
        paths.append(path)
    return paths


def write_video(path: Path, frames: int = 30, size: tuple[int, int] = (64, 48)) -> Path:
    """A short MJPG .avi whose frames differ, readable by headless OpenCV: the camera in tests."""
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 30, (width, height))
    assert writer.isOpened()
    for i in range(frames):
        image = np.zeros((height, width, 3), np.uint8)
        image[:] = ((i * 37) % 256, 255 - (i * 11) % 256, 80)
        cv2.putText(image, str(i), (4, height - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (255, 255, 255), 2)
        writer.write(image)
    writer.release()
    return path


def free_port() -> int:
    """A loopback port nothing listens on (yet)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def unused_port() -> int:
    return free_port()


@pytest.fixture
def frames(tmp_path: Path) -> Callable[..., Path]:
    def make(count: int = 12, name: str = "session", **kwargs: Any) -> Path:
        directory = tmp_path / name
        write_frames(directory, count, **kwargs)
        return directory

    return make


BackendFactory = Callable[..., Awaitable[BackendState]]


@pytest.fixture
def backend(nursery: trio.Nursery) -> BackendFactory:
    """Start a local backend; ``await backend(api_key=..., faults=Faults(...))`` gives its state."""

    async def start(*, faults: Faults | None = None, **options: Any) -> BackendState:
        opts = BackendOptions(faults=faults or Faults(), **options)
        state: BackendState = await nursery.start(serve_backend, opts)
        return state

    return start


def make_config(port: int, *, path: Path | None = None, **env: str) -> Config:
    base = {
        "BACKEND_WS_BASE": f"ws://127.0.0.1:{port}/ws/",
        "CAIRED_RETRY_INITIAL": "0.05",
        "CAIRED_RETRY_MAX": "0.2",
        "CAIRED_BACKEND_FINISH_TIMEOUT": "5",
        "CAIRED_BACKEND_CONNECT_TIMEOUT": "5",
    }
    base.update(env)
    return Config.load(path=path, env=base)


@pytest.fixture(autouse=True)
def _plain_logging() -> Iterator[None]:
    """Each test starts with JSON logging to stdout, as a service would have."""
    clog.configure(Config.load(env={"CAIRED_LOG_FORMAT": "json"}))
    yield
    structlog.contextvars.clear_contextvars()


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a ``python -m caired`` subprocess: no inherited caired settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAIRED_")}
    for name in ("BACKEND_WS_BASE", "API_KEY", "IMAGES_DIR", "FPS", "FRAME_FORMAT", "ADVANCED", "NOTIFY_SOCKET"):
        env.pop(name, None)
    env.update(extra)
    return env


async def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                  deadline: float = 60) -> trio.CompletedProcess[bytes]:
    """Run ``python -m caired ARGS`` to completion; stdout and stderr captured."""
    with trio.fail_after(deadline):
        return await trio.run_process(
            [sys.executable, "-m", "caired", *args],
            env=env if env is not None else cli_env(),
            cwd=cwd,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


class FakeClock:
    """``time.time`` under the test's control (a Spool's clock); starts at the real time, since ctimes are real."""

    def __init__(self, offset: float = 0.0) -> None:
        self.now = time.time() + offset

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def spool(tmp_path: Path, clock: FakeClock) -> Spool:
    """A prepared spool on the test's clock, settling after 5 s (test_daemon, test_queue and
    test_retention define their own)."""
    s = Spool(tmp_path / "spool", settle_seconds=5.0, clock=clock)
    s.prepare()
    return s
