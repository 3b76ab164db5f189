"""The operator's commands on a spool in every state: queue, requeue, hold, release, delete, retry-now."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from caired import cli
from caired import queue as q
from caired.fsops import write_json_atomic
from caired.spool import (
    ERROR_FILE,
    HOLD_MARKER,
    LOCK_FILE,
    PREVIOUS_ERROR_FILE,
    READY_MARKER,
    RESULT_FILE,
    SESSION_FILE,
    Spool,
)

ODD = os.fsdecode(b"caf\xe9-rec")  # a name that is not UTF-8
ODD_SHOWN = "caf\\xe9-rec"


def make_folder(path: Path, frames: int = 3, *, old: float = 3600.0) -> Path:
    path.mkdir(parents=True)
    for i in range(frames):
        (path / f"{1747154380 + i / 30:.7f}.png").write_bytes(b"\x89PNG frame %d" % i)
    then = time.time() - old
    for child in path.iterdir():
        os.utime(child, (then, then))
    os.utime(path, (then, then))
    return path


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", settle_seconds=5.0)
    s.prepare()
    yield s
    s.close()


def drop(spool: Spool, name: str, *, ready: bool = True, frames: int = 3) -> Path:
    staged = make_folder(spool.tmp / f"staging-{os.fsencode(name).hex()}", frames)
    if ready:
        (staged / READY_MARKER).touch()
    target = spool.incoming / name
    os.rename(staged, target)
    return target


class Holder:
    """Another process holding a folder's lock, as a daemon streaming it does."""

    def __init__(self, lock_file: Path) -> None:
        code = (
            "import os, sys; from caired import fsops\n"
            f"fd = os.open({str(lock_file)!r}, os.O_RDWR)\n"
            "assert fsops.try_lock(fd)\n"
            "print('locked', flush=True); sys.stdin.read()\n"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == b"locked\n"

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture
def every_state(spool: Spool) -> Iterator[dict[str, Any]]:
    """A spool with a folder in every state, one of them held by another process."""
    drop(spool, "ready-one")
    drop(spool, "held-one")
    (spool.incoming / "held-one" / HOLD_MARKER).write_text("{}")
    fresh = spool.incoming / "settling-one"
    fresh.mkdir()
    (fresh / "1.png").write_bytes(b"x")
    drop(spool, "streaming")
    streaming = spool.claim("streaming")
    assert streaming is not None
    streaming_id = streaming.datapt_id
    spool.release(streaming)  # give it back and let another process hold it in active/
    os.rename(spool.incoming / "streaming", spool.active / "streaming")
    holder = Holder(spool.active / "streaming" / LOCK_FILE)
    orphan = make_folder(spool.active / "orphan")
    (orphan / LOCK_FILE).touch()
    drop(spool, "good")
    good = spool.claim("good")
    assert good is not None
    spool.finish(good, {"hr": 64.0, "datapt_id": good.datapt_id})
    drop(spool, "bad")
    bad = spool.claim("bad")
    assert bad is not None
    bad.begin_attempt()
    spool.fail(bad, {"reason": "the backend closed with 1009: a frame is too big", "error_type": "SessionError",
                     "close_code": 1009})
    drop(spool, ODD)
    odd = spool.claim(ODD)
    assert odd is not None
    spool.fail(odd, {"reason": "no usable frame", "error_type": "NoFramesError", "close_code": None})
    yield {"holder": holder, "streaming_id": streaming_id, "good_id": good.datapt_id, "bad_id": bad.datapt_id}
    holder.stop()


def by_name(found: list[q.Entry]) -> dict[str, q.Entry]:
    return {e.name: e for e in found}


def test_queue_shows_every_state_with_its_story(spool: Spool, every_state: dict[str, Any]) -> None:
    found = by_name(q.entries(spool.root, settle_seconds=5.0))

    assert {n: e.state for n, e in found.items()} == {
        "ready-one": "ready", "held-one": "held", "settling-one": "settling", "streaming": "active",
        "orphan": "orphaned", "good": "done", "bad": "failed", ODD: "failed",
    }
    assert found["streaming"].holder_pid == every_state["holder"].proc.pid
    assert found["streaming"].datapt_id == every_state["streaming_id"]
    assert found["good"].hr == 64.0 and found["good"].datapt_id == every_state["good_id"]
    assert found["bad"].reason == "the backend closed with 1009: a frame is too big"
    assert (found["bad"].close_code, found["bad"].attempts) == (1009, 1)
    assert all(e.frames == 3 for n, e in found.items() if n != "settling-one")
    # Reading took no lock: the orphan is still free for a daemon's recovery to take.
    assert not q.fsops.lock_is_held(os.open(spool.active / "orphan", os.O_RDONLY), LOCK_FILE)


def test_queue_filters_by_state(spool: Spool, every_state: dict[str, Any]) -> None:
    found = q.entries(spool.root, states=["failed", "held"])
    assert sorted(e.name for e in found) == sorted(["bad", ODD, "held-one"])


def test_queue_json_lines_parse_back_with_stable_fields(
    spool: Spool, every_state: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["queue", "--json", "--spool", str(spool.root)])
    out, err = capsys.readouterr()

    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 8
    fields = {"name", "name_hex", "room", "state", "since", "age_seconds", "frames", "attempts", "crashes",
              "datapt_id", "source", "first_claimed_at", "hr", "reason", "error_type", "close_code",
              "holder_pid", "problem"}
    assert all(set(r) == fields for r in records)
    odd = next(r for r in records if r["name_hex"] is not None)
    assert odd["name"] == ODD_SHOWN and bytes.fromhex(odd["name_hex"]) == os.fsencode(ODD)
    assert odd["error_type"] == "NoFramesError"
    assert [r["room"] for r in records] == sorted((r["room"] for r in records), key=q.ROOMS.index)


def test_queue_table_on_a_terminal_and_a_wrong_state(
    spool: Spool, every_state: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["queue", "--spool", str(spool.root), "active", "failed"]) == 0
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["STATE", "FOLDER", "AGE", "FRAMES", "TRIES", "DATAPT_ID", "INFO"]
    assert any(line.startswith("active") and f"pid {every_state['holder'].proc.pid}" in line for line in lines)
    assert any(f"failed/{ODD_SHOWN}" in line for line in lines)

    with pytest.raises(SystemExit) as exc:
        cli.main(["queue", "--spool", str(spool.root), "stuck"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_held_folder_is_neither_offered_nor_claimed_until_released(spool: Spool) -> None:
    drop(spool, "rec")
    assert spool.scan().ready == ["rec"]

    assert q.hold(spool.root, "rec") == "held incoming/rec"
    assert q.hold(spool.root, "rec") == "incoming/rec was already held"

    scan = spool.scan()
    assert (scan.ready, scan.held) == ([], 1)
    assert spool.claim("rec") is None  # a dispatcher that saw it ready before the hold
    assert (spool.incoming / "rec").is_dir()

    assert q.release(spool.root, "rec") == "released incoming/rec"
    assert spool.scan().ready == ["rec"]
    claim = spool.claim("rec")
    assert claim is not None
    spool.release(claim)


def test_requeue_a_failed_folder_keeps_its_datapt_id_and_forgets_its_crashes(spool: Spool) -> None:
    drop(spool, "rec")
    claim = spool.claim("rec")
    assert claim is not None
    datapt_id = claim.datapt_id
    claim.begin_attempt()
    claim.crashes = spool.max_crashes  # as a quarantined folder has
    spool.fail(claim, {"reason": "quarantined", "error_type": "Quarantined"})

    said = q.requeue(spool.root, "rec")

    assert said == f"requeued failed/rec -> incoming/rec (datapt_id {datapt_id})"
    back = spool.incoming / "rec"
    assert (back / READY_MARKER).exists() and (back / PREVIOUS_ERROR_FILE).exists()
    assert not (back / ERROR_FILE).exists()
    session = json.loads((back / SESSION_FILE).read_text())
    assert (session["datapt_id"], session["crashes"], session["attempts"]) == (datapt_id, 0, 1)
    again = spool.claim("rec")  # streamed, not quarantined at once
    assert again is not None and again.datapt_id == datapt_id
    spool.release(again)


def test_requeue_a_done_folder_only_as_a_new_datapoint(spool: Spool) -> None:
    drop(spool, "rec")
    claim = spool.claim("rec")
    assert claim is not None
    old = claim.datapt_id
    spool.finish(claim, {"hr": 70.0})

    with pytest.raises(q.Refused) as refused:
        q.requeue(spool.root, "rec")
    assert refused.value.status == q.EX_DATAERR and "--new-datapoint" in str(refused.value)
    assert (spool.done / "rec" / RESULT_FILE).exists()

    said = q.requeue(spool.root, "done/rec", new_datapoint=True)

    back = spool.incoming / "rec"
    new = json.loads((back / SESSION_FILE).read_text())["datapt_id"]
    assert new != old and said.endswith(f"(a new datapoint {new})")
    assert json.loads((back / f"result.{old}.json").read_text()) == {"hr": 70.0}
    assert not (back / RESULT_FILE).exists()


def test_a_done_folder_without_frames_is_not_requeued(spool: Spool, tmp_path: Path) -> None:
    s = Spool(spool.root, keep_frames=False)
    drop(s, "rec")
    claim = s.claim("rec")
    assert claim is not None
    s.finish(claim, {"hr": 70.0})
    with pytest.raises(q.Refused, match="no frames left"):
        q.requeue(spool.root, "rec", new_datapoint=True)
    s.close()


def test_nothing_touches_a_folder_another_process_streams(spool: Spool, every_state: dict[str, Any]) -> None:
    for action in (q.requeue, q.hold, q.release):
        with pytest.raises(q.Refused) as refused:
            action(spool.root, "streaming")
        assert refused.value.status in (q.EX_TEMPFAIL, q.EX_DATAERR)
    with pytest.raises(q.Refused) as refused:
        q.delete(spool.root, "streaming", force=True)
    assert refused.value.status == q.EX_TEMPFAIL
    with pytest.raises(q.Refused) as refused:
        q.requeue(spool.root, "streaming")
    assert str(refused.value) == (f"active/streaming is being streamed (pid {every_state['holder'].proc.pid}); "
                                  "requeue it once it is filed")
    assert sorted(os.listdir(spool.active / "streaming")) == sorted(
        [LOCK_FILE, SESSION_FILE, READY_MARKER, *(p.name for p in (spool.active / "streaming").glob("*.png"))])


def test_a_folder_locked_in_done_is_not_deleted(spool: Spool) -> None:
    drop(spool, "rec")
    claim = spool.claim("rec")
    assert claim is not None
    spool.finish(claim, {"hr": 70.0})
    holder = Holder(spool.done / "rec" / LOCK_FILE)  # a daemon still deleting its frames, say
    try:
        with pytest.raises(q.Refused) as refused:
            q.delete(spool.root, "rec")
        assert refused.value.status == q.EX_TEMPFAIL
        assert (spool.done / "rec" / RESULT_FILE).exists()
    finally:
        holder.stop()
    assert q.delete(spool.root, "rec") == "deleted done/rec"
    assert not (spool.done / "rec").exists()


def test_delete_needs_force_for_what_was_never_streamed(spool: Spool, every_state: dict[str, Any]) -> None:
    with pytest.raises(q.Refused) as refused:
        q.delete(spool.root, "ready-one")
    assert refused.value.status == q.EX_DATAERR
    assert q.delete(spool.root, "ready-one", force=True) == "deleted incoming/ready-one"
    assert q.delete(spool.root, "orphan", force=True) == "deleted active/orphan"
    assert q.delete(spool.root, "bad") == "deleted failed/bad"
    assert q.delete(spool.root, ODD_SHOWN) == f"deleted failed/{ODD_SHOWN}"  # by the name as shown
    left = {e.name for e in q.entries(spool.root)}
    assert left == {"held-one", "settling-one", "streaming", "good"}
    assert os.listdir(spool.tmp) == []  # nothing half-deleted left behind


def test_names_that_do_not_exist_or_are_in_two_rooms(spool: Spool) -> None:
    with pytest.raises(q.Refused) as refused:
        q.locate(spool.root, "nope")
    assert refused.value.status == q.EX_NOINPUT
    make_folder(spool.done / "rec")
    make_folder(spool.failed / "rec")
    with pytest.raises(q.Refused) as refused:
        q.locate(spool.root, "rec")
    assert refused.value.status == q.EX_DATAERR and "done/rec, failed/rec" in str(refused.value)
    assert q.locate(spool.root, "failed/rec") == q.Where("failed", "rec")
    assert q.locate(spool.root, os.fsdecode(b"failed/rec")) == q.Where("failed", "rec")


def test_a_name_that_is_not_utf8_is_acted_on_by_its_bytes(spool: Spool) -> None:
    make_folder(spool.failed / ODD)
    write_json_atomic(spool.failed / ODD / ERROR_FILE, {"reason": "x"})
    said = q.requeue(spool.root, ODD)  # as the shell hands it over: the bytes themselves
    assert said.startswith(f"requeued failed/{ODD_SHOWN} -> incoming/{ODD_SHOWN}")
    assert os.listdir(os.fsencode(spool.incoming)) == [os.fsencode(ODD)]


def test_the_commands_exit_with_sysexits_and_one_line_per_refusal(
    spool: Spool, every_state: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    root = str(spool.root)
    assert cli.main(["requeue", "bad", "--spool", root]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("requeued failed/bad -> incoming/bad") and err == ""

    assert cli.main(["requeue", "nope", "good", "streaming", "--spool", root]) == q.EX_NOINPUT
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "caired requeue: nope: no such folder in incoming/, active/, done/, failed/",
        "caired requeue: done/good was streamed and has its result; requeue it as a new datapoint with "
        "--new-datapoint",
        f"caired requeue: active/streaming is being streamed (pid {every_state['holder'].proc.pid}); "
        "requeue it once it is filed",
    ]
    assert cli.main(["hold", "streaming", "--spool", root]) == q.EX_TEMPFAIL
    assert cli.main(["delete", "held-one", "--spool", root]) == q.EX_DATAERR
    assert cli.main(["hold", "ready-one", "--spool", root]) == 0
    assert cli.main(["release", "ready-one", "--spool", root]) == 0
    assert cli.main(["delete", "--force", "held-one", "--spool", root]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err


def test_retry_now_writes_the_control_file_anew_each_time(spool: Spool, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["retry-now", "--spool", str(spool.root)]) == 0
    first = os.stat(spool.incoming / q.RETRY_FILE)
    assert cli.main(["retry-now", "--spool", str(spool.root)]) == 0
    second = os.stat(spool.incoming / q.RETRY_FILE)
    assert (first.st_ino, first.st_mtime_ns) != (second.st_ino, second.st_mtime_ns)
    assert spool.scan().ready == []  # a dot-name: never a folder to stream
    capsys.readouterr()
    assert cli.main(["retry-now", "--spool", str(spool.root / "missing")]) == q.EX_CANTCREAT
    assert capsys.readouterr().err.startswith("caired retry-now: cannot write")
