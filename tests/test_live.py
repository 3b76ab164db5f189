"""Camera sessions in the daemon: live streaming, store-and-forward, drops. A video file is the camera."""

from __future__ import annotations

import hashlib
import itertools
import json
import statistics
from pathlib import Path
from typing import Any

import trio
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from caired.commands.stream import stream_folder
from caired.config import Config
from caired.daemon import serve
from caired.emulator.server import BackendOptions, BackendState, Faults, serve_backend
from caired.lifecycle import Context
from caired.systemd import Notifier
from tests.conftest import BackendFactory, free_port, make_config, write_video


def camera_config(port: int, tmp_path: Path, **env: str) -> Config:
    video = write_video(tmp_path / "camera.avi", frames=40)
    settings = dict(
        CAIRED_SPOOL_DIR=str(tmp_path / "spool"),
        CAIRED_SPOOL_SETTLE_SECONDS="0.2",
        CAIRED_SPOOL_RESCAN_SECONDS="0.5",
        CAIRED_CAMERA_ENABLED="true",
        CAIRED_CAMERA_DEVICE=str(video),
        CAIRED_CAMERA_SESSION_SECONDS="1",
        CAIRED_CAMERA_FPS="10",
        CAIRED_STREAM_FPS="0",
        CAIRED_BACKEND_HEARTBEAT="0",
        CAIRED_RETENTION_FREE_SPACE_FLOOR="0",  # whatever the test machine's disk holds
    )
    return make_config(port, **{**settings, **env})


async def start_daemon(nursery: trio.Nursery, cfg: Config) -> Context:
    daemon: Context = await nursery.start(lambda task_status: serve(cfg, notifier=Notifier(None),
                                                                   task_status=task_status))
    return daemon


def done_results(spool: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((spool / "done").glob("*/result.json"))]


async def wait_for(predicate: Any, deadline: float = 20.0) -> None:
    with trio.fail_after(deadline):
        while not predicate():  # noqa: ASYNC110 - polling the filesystem: there is no event to wait on
            await trio.sleep(0.05)


async def test_camera_sessions_stream_live_back_to_back(
    backend: BackendFactory, tmp_path: Path, nursery: trio.Nursery
) -> None:
    state = await backend()
    cfg = camera_config(state.port, tmp_path)
    with capture_logs(processors=[merge_contextvars]) as logs:
        await start_daemon(nursery, cfg)
        await wait_for(lambda: len(done_results(tmp_path / "spool")) >= 2)
    results = done_results(tmp_path / "spool")[:2]
    assert [r["source"] for r in results] == ["camera", "camera"]
    assert all(r["session"].startswith("cam-") for r in results)
    assert state.violations == []
    finished = state.finished_sessions()
    assert len({s.datapt_id for s in finished}) == len(finished) >= 2
    for seen in finished[:2]:
        stamps = [float(f.timestamp) for f in seen.frames]
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        assert all(gap > 0 for gap in gaps)
        assert 0.07 < statistics.median(gaps) < 0.13  # captured at ~10 fps, timestamps are capture times
    for result in results:
        folder = tmp_path / "spool" / "done" / result["session"]
        assert result["frames_recorded"] >= 5
        assert list(folder.glob("*.jpg")) == []  # camera.keep_frames = false: kept only until delivered
        assert result["frames_sent"] + result["frames_dropped_live"] == result["frames_recorded"]
    camera_answers = [e for e in logs if e["event"] == "response" and e.get("source") == "camera"]
    assert camera_answers and {e["datapt_id"] for e in camera_answers} >= {r["datapt_id"] for r in results}


async def test_a_session_captured_while_the_backend_is_down_is_streamed_once_it_is_back(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    port = free_port()
    cfg = camera_config(port, tmp_path, CAIRED_CAMERA_KEEP_FRAMES="true")
    spool = tmp_path / "spool"
    with capture_logs(processors=[merge_contextvars]) as logs:
        await start_daemon(nursery, cfg)
        # the first camera session is captured with nothing listening: it is stored, not lost
        await wait_for(lambda: any(e["event"] == "camera_session_stored" for e in logs))
        stored = next(e for e in logs if e["event"] == "camera_session_stored")
        state: BackendState = await nursery.start(lambda task_status: serve_backend(
            BackendOptions(), port=port, task_status=task_status))
        await wait_for(lambda: any(r["session"] == stored["session"] for r in done_results(spool)))
    result = next(r for r in done_results(spool) if r["session"] == stored["session"])
    folder = spool / "done" / result["session"]
    assert result["frames_sent"] == len(list(folder.glob("*.jpg"))) == stored["frames"]
    assert result["datapt_id"] == stored["datapt_id"]
    assert result["attempts"] >= 2  # the live attempt, then the stored folder's
    streamed = [s for s in state.finished_sessions() if s.datapt_id == result["datapt_id"]]
    assert len(streamed) == 1 and len(streamed[0].frames) == stored["frames"]
    assert state.violations == []


async def test_a_slow_backend_makes_the_live_stream_drop_frames_but_the_recording_keeps_them(
    backend: BackendFactory, tmp_path: Path, nursery: trio.Nursery
) -> None:
    state = await backend(faults=Faults(accept_delay=0.6))  # the live stream cannot wait: it drops
    cfg = camera_config(state.port, tmp_path, CAIRED_STREAM_SEND_QUEUE="2", CAIRED_CAMERA_FPS="20",
                        CAIRED_CAMERA_KEEP_FRAMES="true")
    await start_daemon(nursery, cfg)
    await wait_for(lambda: len(done_results(tmp_path / "spool")) >= 1, deadline=30)
    result = done_results(tmp_path / "spool")[0]
    assert result["frames_dropped_live"] > 0
    assert result["frames_sent"] + result["frames_dropped_live"] == result["frames_recorded"]
    folder = tmp_path / "spool" / "done" / result["session"]
    assert len(list(folder.glob("*.jpg"))) == result["frames_recorded"]


async def test_the_recording_is_the_jpeg_streamed_live_and_streams_later_byte_for_byte(
    backend: BackendFactory, tmp_path: Path, nursery: trio.Nursery
) -> None:
    state = await backend()
    cfg = camera_config(state.port, tmp_path, CAIRED_STREAM_JPEG_QUALITY="70", CAIRED_CAMERA_KEEP_FRAMES="true")
    await start_daemon(nursery, cfg)
    await wait_for(lambda: len(done_results(tmp_path / "spool")) >= 1)
    result = done_results(tmp_path / "spool")[0]
    folder = tmp_path / "spool" / "done" / result["session"]
    assert list(folder.glob("*.png")) == []
    on_disk = {p.name[: -len(".jpg")]: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.jpg")}
    [live] = [s for s in state.finished_sessions() if s.datapt_id == result["datapt_id"]]
    sent_live = [(f.timestamp, f.digest) for f in live.frames]
    assert len(sent_live) == result["frames_sent"] >= 5
    assert all(on_disk[stamp] == digest for stamp, digest in sent_live)  # the very bytes, not a re-encode

    later_id = "0b0e1c5e-3f3c-4a8e-9d55-1a2b3c4d5e6f"
    await stream_folder(make_config(state.port, FPS="0"), folder, datapt_id=later_id)
    [later] = [s for s in state.finished_sessions() if s.datapt_id == later_id]
    assert [(f.timestamp, f.digest) for f in later.frames] == sorted(on_disk.items(), key=lambda i: float(i[0]))
    live_digests = dict(sent_live)
    assert all(live_digests[f.timestamp] == f.digest for f in later.frames if f.timestamp in live_digests)
