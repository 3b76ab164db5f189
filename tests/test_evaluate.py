"""Reference parsers under arbitrary input, layout classification, and caired evaluate's figures."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caired.errors import GroundTruthError, LayoutError, NoFramesError
from caired.evaluate import collect, metrics
from caired.frames import jpeg_size
from caired.layouts import Entry, classify, ns_timestamp
from caired.reference import Reference, parse_csv, parse_pure, parse_ubfc, window_hr
from caired.video import creation_time, mkv_creation_time, mp4_creation_time
from tests.conftest import run_cli


@given(st.binary(max_size=400))
def test_the_csv_parser_raises_only_its_one_line_error(data: bytes) -> None:
    try:
        parse_csv(data, first_frame=0.0)
    except GroundTruthError as err:
        assert "\n" not in str(err)


@given(st.text(alphabet="0123456789.,-e \nabtimesphrg", max_size=300))
def test_the_csv_parser_takes_text_near_the_format(text: str) -> None:
    try:
        ref = parse_csv(("timestamp,hr\n" + text).encode(), first_frame=0.0)
    except GroundTruthError as err:
        assert "\n" not in str(err)
    else:
        assert np.all(np.diff(ref.times) > 0)


@given(st.binary(max_size=300))
def test_the_ubfc_parser_raises_only_its_one_line_error(data: bytes) -> None:
    try:
        parse_ubfc(data, start=0.0)
    except GroundTruthError as err:
        assert "\n" not in str(err)


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=3)
entries = st.fixed_dictionaries({}, optional={
    "Timestamp": scalars,
    "Value": st.fixed_dictionaries({}, optional={"waveform": scalars, "pulseRate": scalars}) | scalars})


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional={"/FullPackage": st.lists(entries, max_size=4) | scalars,
                                           "/Image": st.lists(entries, max_size=4) | scalars}))
def test_the_pure_parser_raises_only_its_one_line_error(document: dict[str, object]) -> None:
    try:
        parse_pure(json.dumps(document).encode(), origin="s.json")
    except GroundTruthError as err:
        assert "\n" not in str(err)


def test_a_deeply_nested_json_is_one_error() -> None:
    with pytest.raises(GroundTruthError):
        parse_pure(b"[" * 100_000 + b"]" * 100_000, origin="s.json")


@given(st.binary(max_size=200))
def test_the_jpeg_header_walk_raises_only_value_error(data: bytes) -> None:
    try:
        width, height = jpeg_size(b"\xff\xd8" + data)
    except ValueError:
        return
    assert width > 0 and height > 0


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=24), st.booleans()), max_size=8))
def test_layout_classification_is_a_layout_or_one_line(entries: list[tuple[bytes, bool]]) -> None:
    try:
        layout = classify([Entry(n.replace(b"/", b"_"), d) for n, d in entries], "f")
    except NoFramesError as err:
        assert "\n" not in str(err)
    else:
        assert layout.frames or layout.video or layout.images


@settings(max_examples=200)
@given(st.binary(max_size=120), st.sampled_from(["a.mp4", "a.mov", "a.mkv", "a.avi"]))
def test_creation_time_parsers_never_raise_on_any_bytes(data: bytes, name: str) -> None:
    import tempfile

    with tempfile.TemporaryFile() as handle:
        handle.write(data)
        handle.flush()
        found = creation_time(handle.fileno(), name)
    assert found is None or found.is_finite()


@given(st.binary(max_size=64))
def test_an_mp4_header_with_any_mvhd_body_is_a_time_or_none(body: bytes) -> None:
    import tempfile

    box = (8 + len(body)).to_bytes(4, "big") + b"mvhd" + body
    data = (8 + len(box)).to_bytes(4, "big") + b"moov" + box
    with tempfile.TemporaryFile() as handle:
        handle.write(data)
        handle.flush()
        found = creation_time(handle.fileno(), "x.mp4")
    assert found is None or found.is_finite()


def test_pure_nanoseconds_become_seconds_character_for_character() -> None:
    assert ns_timestamp(b"1392643993642815000") == "1392643993.642815000"
    assert ns_timestamp(b"5") == "0.000000005"


def test_reference_csv_beside_ubfc_truth_is_the_reference() -> None:
    layout = classify([Entry(b"vid.avi"), Entry(b"ground_truth.txt"), Entry(b"reference.csv")], "s")
    assert (layout.kind, layout.reference, layout.reference_kind) == ("ubfc", "reference.csv", "csv")
    with pytest.raises(LayoutError, match=r"no vid\.avi"):
        classify([Entry(b"ground_truth.txt")], "s")


def test_an_hr_reference_is_the_mean_of_its_samples_in_the_window() -> None:
    ref = parse_csv(b"seconds,hr\n0,60\n1,70\n2,80\n3,200\n", first_frame=100.0)
    estimate = window_hr(ref, 100.0, 102.0)
    assert estimate is not None and estimate.hr == 70.0


def test_a_ppg_reference_gives_its_rate() -> None:
    t = np.arange(0, 20, 1 / 50)
    ref = Reference("ppg", t + 1000, np.sin(2 * np.pi * 1.3 * t), "x")
    estimate = window_hr(ref, 1000, 1020)
    assert estimate is not None and estimate.hr == pytest.approx(78.0, abs=0.3)
    assert window_hr(ref, 1000, 1003) is None  # under 5 s of PPG


def test_creation_times_are_read_from_mp4_and_matroska(tmp_path: Path) -> None:
    from caired.synth import write_mkv

    mvhd = b"\x00\x00\x00\x00" + (2082844800 + 1747154380).to_bytes(4, "big") + bytes(92)
    moov = (8 + 8 + len(mvhd)).to_bytes(4, "big") + b"moov" + (8 + len(mvhd)).to_bytes(4, "big") + b"mvhd" + mvhd
    (tmp_path / "a.mp4").write_bytes(b"\x00\x00\x00\x10ftypisom\x00\x00\x02\x00" + moov)
    write_mkv(tmp_path / "b.mkv", [np.zeros((16, 16, 3), np.uint8)], [0], created=1747154380.25)
    with (tmp_path / "a.mp4").open("rb") as a, (tmp_path / "b.mkv").open("rb") as b:
        assert mp4_creation_time(a.fileno()) == 1747154380
        assert str(mkv_creation_time(b.fileno())) == "1747154380.250000"


def _result(folder: Path, name: str, hr: float | None, ref: float | None) -> None:
    folder.mkdir(parents=True)
    body = {"session": name, "datapt_id": name, "hr": hr}
    if ref is not None:
        body |= {"reference_hr": ref, "reference_method": "m"}
    (folder / "result.json").write_text(json.dumps(body))


PAIRS = [(70.0, 72.5), (88.0, 84.0), (61.0, 60.0), (101.0, 99.5)]


def test_the_figures_match_an_independent_computation(tmp_path: Path) -> None:
    for i, (hr, ref) in enumerate(PAIRS):
        _result(tmp_path / "done" / f"s{i}", f"s{i}", hr, ref)
    _result(tmp_path / "done" / "plain", "plain", 75.0, None)
    rows = collect([tmp_path])
    figures = metrics(rows)
    errors = [h - r for h, r in PAIRS]
    assert figures["n"] == 4
    assert figures["mae"] == pytest.approx(statistics.fmean(abs(e) for e in errors), abs=1e-4)
    assert figures["rmse"] == pytest.approx(math.sqrt(statistics.fmean(e * e for e in errors)), abs=1e-4)
    assert figures["mape"] == pytest.approx(100 * statistics.fmean(abs(h - r) / r for h, r in PAIRS), abs=1e-4)
    assert figures["pearson_r"] == pytest.approx(statistics.correlation([h for h, _ in PAIRS], [r for _, r in PAIRS]),
                                                 abs=1e-4)
    sd = statistics.stdev(errors)
    assert figures["loa_high"] == pytest.approx(statistics.fmean(errors) + 1.96 * sd, abs=1e-4)
    assert [row.session for row in rows if not row.paired] == ["plain"]


async def test_caired_evaluate_prints_the_table_json_and_plot(tmp_path: Path) -> None:
    for i, (hr, ref) in enumerate(PAIRS):
        _result(tmp_path / "spool" / "done" / f"s{i}", f"s{i}", hr, ref)
    _result(tmp_path / "spool" / "done" / "plain", "plain", 75.0, None)
    done = await run_cli("evaluate", str(tmp_path / "spool"), "--plot", str(tmp_path / "ba.png"))
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert "MAE 2.25 bpm" in out and "without a reference" in out and "plain" in out
    assert (tmp_path / "ba.png").read_bytes().startswith(b"\x89PNG")
    as_json = await run_cli("evaluate", str(tmp_path / "spool"), "--json")
    document = json.loads(as_json.stdout)
    assert document["metrics"]["mae"] == 2.25
    assert [s["session"] for s in document["without_reference"]] == ["plain"]
    none = await run_cli("evaluate", str(tmp_path / "spool" / "done" / "plain"))
    assert none.returncode == 65 and len(none.stderr.decode().strip().splitlines()) == 1
