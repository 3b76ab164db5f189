"""Research inputs streamed through the strict local backend: JPEG frames, videos, UBFC-rPPG, PURE, references."""

from __future__ import annotations

import hashlib
import json
import os
from decimal import Decimal
from pathlib import Path

import pytest

from caired.commands.stream import stream_folder
from caired.emulator.server import BackendState
from caired.errors import LayoutError, NoFramesError
from caired.synth import write_layout
from tests.conftest import BackendFactory, make_config

START = 1747154380.25


def sent(state: BackendState) -> list[str]:
    assert state.violations == []
    session = state.sessions[-1]
    assert session.finished
    return [f.timestamp for f in session.frames]


@pytest.mark.parametrize("layout", ["png", "jpeg", "video", "vfr", "ubfc", "pure"])
async def test_each_layout_streams_at_the_sources_own_times_with_its_reference(
    backend: BackendFactory, tmp_path: Path, layout: str
) -> None:
    folder = tmp_path / "01-01"
    stamps = write_layout(folder, layout, bpm=84, seconds=8, fps=15, width=96, height=72, seed=1, start=START)
    state = await backend()
    result = await stream_folder(make_config(state.port, FPS="0"), folder)
    assert sent(state) == stamps
    assert result["reference_hr"] == pytest.approx(84, abs=3)
    assert result["error_bpm"] is None or isinstance(result["error_bpm"], float)
    assert result["reference_window"] == [round(float(stamps[0]), 6), round(float(stamps[-1]), 6)]


async def test_jpeg_frames_are_byte_identical_on_the_wire_exif_and_all(backend: BackendFactory, tmp_path: Path) -> None:
    write_layout(tmp_path, "jpeg", seconds=1, fps=5, width=64, height=48, seed=2, start=START, reference=False)
    names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".jpg"))
    first = tmp_path / names[0]
    data = first.read_bytes()
    exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x00"
    first.write_bytes(data[:2] + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif + data[2:])  # an APP1 segment
    state = await backend()
    await stream_folder(make_config(state.port, FPS="0"), tmp_path)
    on_disk = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in names]
    assert [f.digest for f in state.sessions[0].frames] == on_disk
    assert {f.kind for f in state.sessions[0].frames} == {"jpeg"}


async def test_a_single_video_file_streams_and_start_time_sets_the_clock(
    backend: BackendFactory, tmp_path: Path
) -> None:
    write_layout(tmp_path, "video", seconds=1, fps=10, width=64, height=48, seed=3, start=START, reference=False)
    state = await backend()
    await stream_folder(make_config(state.port, FPS="0"), tmp_path / "clip.avi", start_time=Decimal("1000.5"))
    assert sent(state) == [f"{Decimal('1000.5') + Decimal(i) / 10:.6f}" for i in range(10)]


async def test_a_video_without_creation_time_starts_at_its_mtime_minus_its_duration(
    backend: BackendFactory, tmp_path: Path
) -> None:
    write_layout(tmp_path, "video", seconds=2, fps=10, width=64, height=48, seed=3, start=START, reference=False)
    os.utime(tmp_path / "clip.avi", ns=(0, 1_800_000_000_123_456_000))
    state = await backend()
    await stream_folder(make_config(state.port, FPS="0"), tmp_path)
    first = Decimal("1800000000.123456") - 2
    assert sent(state) == [f"{first + Decimal(i) / 10:.6f}" for i in range(20)]


async def test_variable_frame_rate_times_come_from_the_container(backend: BackendFactory, tmp_path: Path) -> None:
    times = [0.0, 0.033, 0.1, 0.107, 0.5, 0.52, 1.25]
    stamps = write_layout(tmp_path, "vfr", seconds=7 / 30, fps=30, width=64, height=48, start=START, times=times,
                          reference=False)
    state = await backend()
    await stream_folder(make_config(state.port, FPS="0"), tmp_path)
    assert sent(state) == stamps == [f"{Decimal('1747154380.25') + Decimal(repr(t)):.6f}" for t in times]


@pytest.mark.parametrize(("files", "says"), [
    ({"ground_truth.txt": b"1 2\n3 4\n0 1\n"}, "ground_truth.txt (UBFC-rPPG) but no vid.avi"),
    ({"Image1392643993642815000.png": b"x"}, "no session JSON"),
    ({"a.mp4": b"x", "b.avi": b"y"}, "holds 2 videos"),
    ({"1.png": b"x", "a.mp4": b"y"}, "both frames and a video"),
    ({"vid.avi": b"not a video", "ground_truth.txt": b"1\n2\n3\n"}, "vid.avi: not an AVI, MP4, MOV or Matroska"),
    ({"clip.avi": b"RIFF....AVI garbage", }, "cannot be read as a video"),
    ({"clip.mp4": b"#EXTM3U\n#EXTINF:1,\nhttp://127.0.0.1:9/x.ts\n"}, "not an AVI, MP4, MOV or Matroska"),
    ({"1.5.png": b"x", "1.50.jpg": b"y"}, "carry the same time"),
    ({"1.png": b"x", "reference.csv": b"time,pulse\n1,2\n"}, "the header is 'time,pulse'"),
    ({"1.png": b"x", "reference.csv": b"timestamp,hr\n1,abc\n"}, "line 2: 'abc' is not a number"),
])
async def test_an_almost_right_layout_fails_with_one_line_naming_what_is_wrong(
    backend: BackendFactory, tmp_path: Path, files: dict[str, bytes], says: str
) -> None:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    state = await backend()
    with pytest.raises(NoFramesError) as caught:
        await stream_folder(make_config(state.port, FPS="0"), tmp_path)
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not state.sessions


async def test_a_pure_json_whose_times_match_no_frame_is_refused(backend: BackendFactory, tmp_path: Path) -> None:
    folder = tmp_path / "02-01"
    write_layout(folder, "pure", seconds=1, fps=5, width=64, height=48, seed=1, start=START)
    document = json.loads((folder / "02-01.json").read_text())
    for entry in document["/Image"]:
        entry["Timestamp"] += 7
    (folder / "02-01.json").write_text(json.dumps(document))
    state = await backend()
    with pytest.raises(LayoutError, match="match none of the frames"):
        await stream_folder(make_config(state.port, FPS="0"), folder)


async def test_plot_draws_the_reference_over_the_backends_hr(backend: BackendFactory, tmp_path: Path) -> None:
    import numpy as np
    import structlog

    from caired.plot import REFERENCE, read_log, render

    folder = tmp_path / "s"
    write_layout(folder, "ubfc", bpm=80, seconds=14, fps=15, width=96, height=72, seed=1, start=START)
    state = await backend()
    with structlog.testing.capture_logs() as logs:
        await stream_folder(make_config(state.port, FPS="0"), folder)
    log = tmp_path / "run.jsonl"
    log.write_text("".join(json.dumps(record | {"session": "s"}) + "\n" for record in logs))
    found = read_log(log, "s")
    reference = next(r for r in logs if r["event"] == "reference_hr")
    assert found.reference_hr == reference["reference_hr"] == pytest.approx(80, abs=2)
    assert len(found.reference_series) == len(reference["series_t"]) > 1
    teal = np.all(render(found) == np.array(REFERENCE, dtype=np.uint8), axis=2).sum()
    found.reference_hr, found.reference_series = None, []
    assert teal > 100 and np.all(render(found) == np.array(REFERENCE, dtype=np.uint8), axis=2).sum() == 0


async def test_a_video_session_retried_after_a_drop_starts_again_from_its_first_frame(
    backend: BackendFactory, tmp_path: Path
) -> None:
    from caired.emulator.server import Faults

    stamps = write_layout(tmp_path, "ubfc", bpm=70, seconds=8, fps=10, width=64, height=48, seed=4, start=START)
    state = await backend(faults=Faults(drop_after=5, drop_times=1))
    result = await stream_folder(make_config(state.port, FPS="0"), tmp_path)
    assert len(state.sessions) == 2 and result["attempts"] == 2
    assert [f.timestamp for f in state.sessions[0].frames] == stamps[:5]
    assert sent(state) == stamps
    assert result["reference_hr"] == pytest.approx(70, abs=3)


async def test_caired_synth_writes_a_layout_that_caired_stream_recognises(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    done = await run_cli("synth", str(tmp_path / "01-01"), "--layout", "pure", "--seconds", "1", "--fps", "5",
                         "--width", "32", "--height", "24", "--start", "1747154380")
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(tmp_path / "01-01")) == ["01-01", "01-01.json"]
    assert len(os.listdir(tmp_path / "01-01" / "01-01")) == 5
    missing = await run_cli("stream", str(tmp_path / "none"), "--start-time", "yesterday")
    assert missing.returncode == 2 and "--start-time" in missing.stderr.decode()


async def test_the_daemon_recognises_dropped_layouts_and_files_almost_right_ones(
    backend: BackendFactory, tmp_path: Path
) -> None:
    from tests.test_daemon import daemon_config, log_lines, running, until

    spool, staging = tmp_path / "spool", tmp_path / "staging"
    (spool / "incoming").mkdir(parents=True)
    expected = {}
    for i, layout in enumerate(["ubfc", "pure", "jpeg", "vfr"]):
        expected[layout] = write_layout(staging / layout, layout, bpm=75, seconds=6, fps=10, width=64, height=48,
                                        seed=i, start=START + 100 * i)
    (staging / "broken").mkdir()
    (staging / "broken" / "ground_truth.txt").write_text("1 2\n3 4\n0 1\n")
    state = await backend()
    cfg = daemon_config(state.port, spool, CAIRED_LOG_FILE=str(tmp_path / "log.jsonl"))
    async with running(cfg):
        for name in [*expected, "broken"]:
            os.rename(staging / name, spool / "incoming" / name)
        await until(lambda: len(os.listdir(spool / "done")) == 4 and os.listdir(spool / "failed"), "every folder")
    assert sorted(os.listdir(spool / "done")) == sorted(expected)
    assert state.violations == []
    by_first = {s.frames[0].timestamp: [f.timestamp for f in s.frames] for s in state.sessions if s.finished}
    for stamps in expected.values():
        assert by_first[stamps[0]] == stamps
    error = json.loads((spool / "failed" / "broken" / "error.json").read_text())
    assert "ground_truth.txt (UBFC-rPPG) but no vid.avi beside it" in error["reason"]
    layouts = {line["session"]: line["layout"] for line in log_lines(tmp_path / "log.jsonl")
               if line["event"] == "source_layout"}
    assert layouts == {"ubfc": "ubfc", "pure": "pure", "jpeg": "frames", "vfr": "video"}
    for name in ("ubfc", "pure"):  # result.json carries the reference beside the backend's HR
        result = json.loads((spool / "done" / name / "result.json").read_text())
        assert result["reference_hr"] == pytest.approx(75, abs=3) and "reference_method" in result


async def test_a_truncated_video_streams_what_it_holds_and_says_it_ended_early(
    backend: BackendFactory, tmp_path: Path
) -> None:
    import structlog

    stamps = write_layout(tmp_path, "video", seconds=3, fps=10, width=64, height=48, seed=5, start=START,
                          reference=False)
    clip = tmp_path / "clip.avi"
    data = clip.read_bytes()
    stat = clip.stat()
    clip.write_bytes(data[: len(data) // 2])  # the index at the end is gone too: FFmpeg reads on to the cut
    os.utime(clip, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    state = await backend()
    with structlog.testing.capture_logs() as logs:
        await stream_folder(make_config(state.port, FPS="0"), tmp_path, start_time=Decimal("1747154380.25"))
    got = sent(state)
    assert 0 < len(got) < len(stamps) and got == stamps[: len(got)]
    ended = [r for r in logs if r["event"] == "video_ended_early"]
    assert [(r["frames"], r["container_frames"]) for r in ended] == [(len(got), len(stamps))]
