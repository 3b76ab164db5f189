"""The hostile spool: a running daemon and the local backend, good folders dropped between
hostile ones that Hypothesis builds (issue 11).

What a dropper can put in ``incoming/`` is drawn from: frames that are not what their
name says (a PNG header claiming 50000x50000 pixels, broken chunks, truncated files,
zero bytes, wrong magic, a FIFO, a folder, a link to /dev/zero or out of the spool, a
sparse 2 GB file), names that are not UTF-8, ~1100 nested subfolders, planted control
files (a session file with a UUID that is not v4, odd names and sources, huge numbers,
deep nesting, or that is a FIFO or a link; result.json, error.json, ``.caired-lock`` and
``.ready`` as files, folders, links and FIFOs), 255-byte names whose ``done/NAME`` is
already taken, and plain files, FIFOs and links in ``incoming/`` itself.

Each Hypothesis example drops one batch into the same running daemon and waits for it to
drain. Then: the daemon is still running; every good folder is in done/ exactly once with
the result the strict backend agrees with; every hostile folder is in done/ (its own
result.json, the frames that could not be read listed as unreadable) or failed/ (error.json
with its reason), exactly once; no folder is left in incoming/ or active/; nothing outside
the spool changed; no ``internal_error`` was logged. The subprocess test adds: the pid
never changes, nothing on stderr, peak RSS (VmHWM) under a bound, SIGTERM exits within 10 s
with hostile folders in flight.

``CAIRED_HOSTILE_FOLDERS=500`` runs the subprocess test with that many hostile folders
against one daemon (default: a few dozen) and prints the figures.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import stat
import struct
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import cv2
import numpy as np
import pytest
import structlog.testing
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from caired import logging as clog
from caired.daemon import serve
from caired.emulator.server import BackendState
from caired.protocol import UUID4_RE
from caired.systemd import Notifier
from tests.conftest import SECRET_KEY, BackendFactory, write_frames
from tests.test_daemon import check_done, child, child_env, daemon_config, drop, log_lines, stop, until

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_CRASHES = 3  # the default [spool] max_crashes
DRAIN_WITHIN = 90.0  # seconds one batch may take to be filed, on 2 busy cores
RSS_BOUND_MB = 256  # peak RSS of the daemon (about 70 MiB measured); a 2 GB frame read whole would blow it
# What OpenCV and libpng print on stderr themselves, about frames they cannot decode: not caired's.
NATIVE_DIAGNOSTIC = re.compile(r"\[ WARN:\S+\] global |libpng (error|warning): ")
HOSTILE_FOLDERS = int(os.environ.get("CAIRED_HOSTILE_FOLDERS", "24"))  # the subprocess test's total
BATCH = 8  # at most this many hostile things per batch
EXAMPLES = int(os.environ.get("CAIRED_HOSTILE_EXAMPLES", "10"))  # batches of the in-process test
KILLS = 4  # batches of the kill -9 test, each cut off once
HOSTILE_BASE = 2_000_000_000.0  # frame timestamps of hostile folders: never those of good folders

Outcome = str  # "done" | "failed"


# --- PNG bytes ------------------------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes, *, crc_ok: bool = True) -> bytes:
    crc = zlib.crc32(kind + data) ^ (0 if crc_ok else 0xFFFFFFFF)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def good_png(seed: int, size: tuple[int, int] = (32, 24)) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return bytes(buf)


def header_png(width: int, height: int, *, depth: int, color: int, crc_ok: bool, idat: bytes) -> bytes:
    """A PNG whose IHDR says what it is told to (68 bytes for 50000x50000 with a tiny IDAT)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", ihdr, crc_ok=crc_ok) + png_chunk(b"IDAT", zlib.compress(idat))
            + png_chunk(b"IEND", b""))


def broken_chunks_png(seed: int, how: str) -> bytes:
    """A real PNG with one chunk broken: a bad CRC, an unknown critical chunk, a lying length,
    IDAT bytes that do not inflate."""
    data = good_png(seed)
    ihdr_end = 8 + 25
    if how == "bad_crc":
        return data[: ihdr_end - 1] + bytes([data[ihdr_end - 1] ^ 0xFF]) + data[ihdr_end:]
    if how == "unknown_critical":
        return data[:ihdr_end] + png_chunk(b"ZZZZ", b"hostile") + data[ihdr_end:]
    if how == "lying_length":
        return data[:ihdr_end] + struct.pack(">I", 0x7FFFFFFF) + b"IDAT" + data[ihdr_end + 8:]
    return data[:ihdr_end] + png_chunk(b"IDAT", b"\x78\x9c not deflate at all") + png_chunk(b"IEND", b"")


# --- what a dropper can leave ---------------------------------------------------------------------------------

# One entry of a hostile folder: (kind, parameters). Frame entries are named like frames.
Entry = tuple[str, Any]

ENTRIES: dict[str, st.SearchStrategy[Entry]] = {
    "giant_ihdr": st.tuples(
        st.just("giant_ihdr"),
        st.tuples(st.sampled_from([(50000, 50000), (2**31 - 1, 1), (1, 2**31 - 1), (65535, 65535), (0, 0),
                                   (20000, 20000)]),
                  st.sampled_from([(8, 2), (16, 6), (8, 0), (1, 3)]), st.booleans(), st.binary(max_size=64))),
    "broken_chunk": st.tuples(st.just("broken_chunk"),
                              st.sampled_from(["bad_crc", "unknown_critical", "lying_length", "bad_deflate"])),
    "truncated": st.tuples(st.just("truncated"), st.floats(0.0, 0.99)),
    "zero_bytes": st.tuples(st.just("zero_bytes"), st.none()),
    "wrong_magic": st.tuples(st.just("wrong_magic"), st.binary(max_size=256)),
    "fifo_frame": st.tuples(st.just("fifo_frame"), st.none()),
    "folder_frame": st.tuples(st.just("folder_frame"), st.none()),
    "link_dev_zero": st.tuples(st.just("link_dev_zero"), st.none()),
    "link_outside": st.tuples(st.just("link_outside"), st.none()),
    "sparse_2gb": st.tuples(st.just("sparse_2gb"), st.none()),
    # Stems near the folder's own (a backend resamples the whole span: 0 to 2e9 s would be its problem).
    "odd_stem": st.tuples(st.just("odd_stem"), st.sampled_from(["{b}.PNG", "000{b}.png", "{b}.5" + "9" * 200 + ".png",
                                                                 "{b}.0.png", "{b}.00.png", "{b}.png"])),
    "non_utf8_file": st.tuples(st.just("non_utf8_file"), st.binary(min_size=1, max_size=8).map(
        lambda b: b.replace(b"/", b"_").replace(b"\0", b"_"))),
    "deep_tree": st.tuples(st.just("deep_tree"), st.integers(1000, 1200)),
    "plain_file": st.tuples(st.just("plain_file"), st.sampled_from(["notes.txt", "1.png.txt", "frame.png",
                                                                    "1e5.png", "-1.png", ".hidden.png"])),
    "session_file": st.tuples(st.just("session_file"), st.data()),
    "result_file": st.tuples(st.just("result_file"), st.tuples(st.sampled_from(["result.json", "error.json"]),
                                                               st.data())),
    "lock_file": st.tuples(st.just("lock_file"), st.tuples(st.sampled_from(["folder", "link_outside", "link_dev_zero",
                                                                            "dangling", "fifo"]), st.booleans())),
    "ready_marker": st.tuples(st.just("ready_marker"), st.sampled_from(["fifo", "link_dev_zero", "folder"])),
}
entries = st.one_of(*ENTRIES.values())


def shown(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def folder_names(ident: int) -> st.SearchStrategy[tuple[bytes, bool]]:
    """A folder name (bytes) and whether done/ and failed/ already hold one by that name."""
    tag = b"h%d-" % ident
    plain = st.tuples(st.just(tag + b"plain"), st.booleans())
    non_utf8 = st.tuples(st.binary(min_size=1, max_size=12).map(
        lambda b: tag + b.replace(b"/", b"_").replace(b"\0", b"_") + b"\xff\xfe"), st.booleans())
    odd = st.tuples(st.sampled_from(["new\nline", "tab\there", " spaced ", "\u202eevil.png", "-rf", "~home",
                                     "émoji-🎉", "back\\slash", "quo\"te", "*?[", "x" * 200]).map(
        lambda s: tag + s.encode()), st.booleans())

    def long(fill: str) -> tuple[bytes, bool]:
        raw = tag + fill.encode() * 255
        raw = raw[:255]
        while True:  # cut on a character boundary: a valid UTF-8 name of at most 255 bytes
            try:
                raw.decode()
                break
            except UnicodeDecodeError:
                raw = raw[:-1]
        return raw, True

    long_names = st.sampled_from(["a", "é", "€", "🎉"]).map(long)
    return st.one_of(plain, non_utf8, odd, long_names)


@attrs.frozen
class FolderCase:
    name: bytes
    clash: bool  # done/NAME and failed/NAME already exist
    goods: int  # valid frames in it
    entries: tuple[Entry, ...]


@attrs.frozen
class IncomingCase:
    """Something in incoming/ that is not a folder: ignored, left alone, never followed."""

    kind: str  # plain_file, fifo, link_dev_zero, link_folder_outside, link_file_outside
    name: bytes


def folder_cases(ident: int) -> st.SearchStrategy[FolderCase]:
    return st.builds(FolderCase, st.just(b""), st.just(False), st.integers(0, 3),
                     st.lists(entries, max_size=4).map(tuple)).flatmap(
        lambda case: folder_names(ident).map(lambda nc: attrs.evolve(case, name=nc[0], clash=nc[1])))


def incoming_cases(ident: int) -> st.SearchStrategy[IncomingCase]:
    kinds = st.sampled_from(["plain_file", "fifo", "link_dev_zero", "link_folder_outside", "link_file_outside"])
    names = st.one_of(st.just(b"i%d" % ident), st.binary(min_size=1, max_size=8).map(
        lambda b: b"i%d-" % ident + b.replace(b"/", b"_").replace(b"\0", b"_") + b"\xff"))
    return st.builds(IncomingCase, kinds, names)


Hostile = FolderCase | IncomingCase


def hostile(ident: int) -> st.SearchStrategy[Hostile]:
    return st.one_of(folder_cases(ident), folder_cases(ident), folder_cases(ident), incoming_cases(ident))


# --- planting -------------------------------------------------------------------------------------------------


@attrs.define
class Planted:
    """One hostile folder as dropped, and what must become of it."""

    tag: bytes  # a file only this folder holds: found wherever the folder ends
    name: bytes
    outcomes: frozenset[Outcome]
    session: str  # result.json / error.json "session"
    unreadable: set[str]  # frame names that cannot be read: listed as unreadable when done
    maybe: int  # frames that may or may not decode
    goods: int
    reason: str | None = None  # a substring error.json's reason must hold when failed
    case: FolderCase | None = None  # what it was built from, for the failure message
    one_crash_from_quarantine: bool = False  # a kill -9 while it streams files it in failed/


@attrs.define
class Outside:
    """Files outside the spool that links point at: they must never change."""

    root: Path
    file: Path
    folder: Path

    @classmethod
    def make(cls, root: Path) -> Outside:
        root.mkdir(parents=True, exist_ok=True)
        file = root / "outside.png"
        file.write_bytes(good_png(424242))
        folder = root / "outside-folder"
        write_frames(folder, 3, start=HOSTILE_BASE - 10_000)
        return cls(root, file, folder)

    def digest(self) -> dict[str, str]:
        return {str(p.relative_to(self.root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
                for p in sorted(self.root.rglob("*"))}


def _quiet(path: bytes) -> None:
    """Old mtimes on a folder and its entries, as for a folder written earlier and moved in."""
    past = time.time() - 3600
    for name in os.listdir(path):
        os.utime(os.path.join(path, name), (past, past), follow_symlinks=False)
    os.utime(path, (past, past))


def session_file(data: st.DataObject) -> tuple[bytes | str, int]:
    """Content (or a special-file kind) of a planted .caired-session.json, and the crashes it
    records that count (a valid file's ``crashes``, plus one when ``in_attempt``). A name in
    it never renames a folder dropped in incoming/."""
    kind = data.draw(st.sampled_from(["valid", "not_v4", "odd_source", "huge", "deep", "garbage", "special",
                                      "odd_name", "too_big"]), label="session kind")
    datapt_id = str(uuid.UUID(int=data.draw(st.integers(0, 2**128 - 1)), version=4))
    base: dict[str, Any] = {"datapt_id": datapt_id, "attempts": 0, "crashes": 0, "in_attempt": False,
                            "source": "drop"}
    if kind == "valid":
        base.update(attempts=data.draw(st.integers(0, 10**9)), crashes=data.draw(st.integers(0, MAX_CRASHES)),
                    in_attempt=data.draw(st.booleans()))
        return json.dumps(base).encode(), base["crashes"] + base["in_attempt"]
    if kind == "odd_name":
        name = data.draw(st.one_of(st.text(max_size=300), st.sampled_from(
            ["../../etc/passwd", "a/b", ".hidden", "", "\x00", "\ud800", "\udcff", "x" * 256, "é" * 128,
             "ok\nnewline", "\u202eevil"])), label="name")
        base["name"] = name
        return json.dumps(base).encode(), 0
    if kind == "not_v4":
        base["datapt_id"] = data.draw(st.sampled_from([
            str(uuid.uuid1()), "00000000-0000-0000-0000-000000000000", datapt_id.upper(), "{" + datapt_id + "}",
            datapt_id + "\n", datapt_id.replace("-", ""), datapt_id[:14] + "1" + datapt_id[15:], "",
            "x" * 10_000]))
    elif kind == "odd_source":
        base["source"] = data.draw(st.one_of(st.text(max_size=50).filter(lambda s: s not in ("drop", "camera")),
                                             st.integers(), st.none(), st.lists(st.integers(), max_size=3),
                                             st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)))
    elif kind == "huge":
        key = data.draw(st.sampled_from(["attempts", "crashes", "first_claimed_at", "in_attempt"]))
        value = data.draw(st.sampled_from(["1" + "0" * 5000, "1e308", "-1", "1.5", "true", "1e999",
                                           '"' + "9" * 100 + '"']))
        return json.dumps({**base, key: 0}).replace(f'"{key}": 0', f'"{key}": {value}').encode(), 0
    elif kind == "deep":
        depth = data.draw(st.integers(1000, 200_000))
        return (b"[" * depth + b"]" * depth), 0
    elif kind == "garbage":
        return data.draw(st.binary(max_size=200)) + b"\xff", 0
    elif kind == "too_big":
        return json.dumps({**base, "pad": "x" * 70_000}).encode(), 0
    else:
        return data.draw(st.sampled_from(["fifo", "link_dev_zero", "link_outside", "folder"])), 0
    return json.dumps(base).encode(), 0


def _special(path: bytes, kind: str, outside: Outside) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "link_dev_zero":
        os.symlink(b"/dev/zero", path)
    elif kind == "link_outside":
        os.symlink(os.fsencode(outside.file), path)
    elif kind == "dangling":
        os.symlink(b"/nonexistent/caired-hostile", path)
    else:  # a folder, not empty
        os.mkdir(path)
        with open(os.path.join(path, b"inside"), "wb") as f:
            f.write(b"planted")


def plant_folder(case: FolderCase, ident: int, staging: Path, incoming: Path, spool: Path,
                 outside: Outside) -> Planted:
    """Build the folder beside the spool, then move it into incoming/ in one rename."""
    where = os.fsencode(staging / f"h{ident}")
    os.makedirs(where)
    tag = b"tag-%d" % ident
    with open(os.path.join(where, tag), "wb") as f:
        f.write(b"%d" % ident)
    base = HOSTILE_BASE + 1000 * ident
    if case.goods:
        write_frames(Path(os.fsdecode(where)), case.goods, start=base, seed=ident)
    unreadable: set[str] = set()
    maybe = 0
    same_time = False
    odd_times: set[Decimal] = set()
    quarantine = one_crash_from_quarantine = False
    session = shown(case.name)
    numbers = itertools.count(1)

    def frame_name(kind: str) -> bytes:
        if kind == "fifo_frame" and not os.path.lexists(os.path.join(where, b"1747154380.0.png")):
            return b"1747154380.0.png"
        return b"%.1f.png" % (base + 500 + next(numbers))

    for kind, params in case.entries:
        if kind in ("giant_ihdr", "broken_chunk", "truncated", "zero_bytes", "wrong_magic", "fifo_frame",
                    "folder_frame", "link_dev_zero", "link_outside", "sparse_2gb"):
            name = frame_name(kind)
            path = os.path.join(where, name)
            certain = True
            if kind == "giant_ihdr":
                (width, height), (depth, color), crc_ok, idat = params
                content = header_png(width, height, depth=depth, color=color, crc_ok=crc_ok, idat=idat)
            elif kind == "broken_chunk":
                content, certain = broken_chunks_png(ident, params), False
            elif kind == "truncated":
                whole = good_png(ident)
                content, certain = whole[: int(len(whole) * params)], False
            elif kind == "zero_bytes":
                content = b""
            elif kind == "wrong_magic":
                content = b"\x7fELF" + params
            else:
                content = None
            if content is not None:
                with open(path, "wb") as f:
                    f.write(content)
            elif kind == "fifo_frame":
                os.mkfifo(path)
            elif kind == "folder_frame":
                os.mkdir(path)
            elif kind == "sparse_2gb":
                with open(path, "wb"):
                    pass
                os.truncate(path, 2 * 1024**3)
            else:
                _special(path, "link_dev_zero" if kind == "link_dev_zero" else "link_outside", outside)
            if certain:
                unreadable.add(name.decode())
            else:
                maybe += 1
        elif kind == "odd_stem":  # a readable frame with a name that is a number, but an odd one
            stem = params.format(b=int(base) + 700)
            path = os.path.join(where, stem.encode())
            if not os.path.lexists(path):
                value = Decimal(stem[: -len(".png")])
                same_time = same_time or value in odd_times  # 7.png beside 007.png: the folder is refused
                odd_times.add(value)
                with open(path, "wb") as f:
                    f.write(good_png(ident + 1))
                maybe += 1
        elif kind == "non_utf8_file":
            with open(os.path.join(where, b"%d" % next(numbers) + params + b"\xff.png"), "wb") as f:
                f.write(good_png(ident))
        elif kind == "deep_tree":
            path = os.path.join(where, b"tree%d" % next(numbers))
            for _ in range(params):
                path = os.path.join(path, b"d")
            os.makedirs(path)
            with open(os.path.join(path, b"1.png"), "wb") as f:
                f.write(good_png(ident))
        elif kind == "plain_file":
            path = os.path.join(where, params.encode())
            if not os.path.lexists(path):
                with open(path, "wb") as f:
                    f.write(b"not a frame")
        elif kind == "session_file":
            path = os.path.join(where, b".caired-session.json")
            if os.path.lexists(path):
                continue
            planted, crashes = session_file(params)
            if isinstance(planted, str):
                _special(path, planted, outside)
            else:
                with open(path, "wb") as f:
                    f.write(planted)
            if params.draw(st.booleans(), label="invalid slot taken"):
                _special(os.path.join(where, b".caired-session.invalid.json"), "folder", outside)
            quarantine = quarantine or crashes >= MAX_CRASHES
            one_crash_from_quarantine = one_crash_from_quarantine or crashes == MAX_CRASHES - 1
        elif kind == "result_file":
            which, data = params
            path = os.path.join(where, which.encode())
            if os.path.lexists(path):
                continue
            how = data.draw(st.sampled_from(["json", "garbage", "fifo", "link_dev_zero", "link_outside", "folder"]))
            if how == "json":
                with open(path, "wb") as f:
                    f.write(json.dumps({"session": "planted", "datapt_id": str(uuid.uuid4()), "hr": 60,
                                        "finished": {"state": "finished"}, "reason": "planted"}).encode())
            elif how == "garbage":
                with open(path, "wb") as f:
                    f.write(data.draw(st.binary(max_size=64)))
            else:
                _special(path, how, outside)
            previous = which.replace(".json", ".previous.json").encode()
            if data.draw(st.booleans(), label="previous taken") and not os.path.lexists(os.path.join(where, previous)):
                _special(os.path.join(where, previous), data.draw(st.sampled_from(["folder", "fifo"])), outside)
        elif kind == "lock_file":
            how, invalid_taken = params
            path = os.path.join(where, b".caired-lock")
            if os.path.lexists(path):
                continue
            _special(path, how, outside)
            if invalid_taken:
                _special(os.path.join(where, b".caired-lock.invalid"), "folder", outside)
        elif kind == "ready_marker":
            path = os.path.join(where, b".ready")
            if not os.path.lexists(path):
                _special(path, params, outside)
    _quiet(where)
    if case.clash:
        for room in (b"done", b"failed"):
            decoy = os.path.join(os.fsencode(spool), room, case.name)
            if not os.path.lexists(decoy):
                os.mkdir(decoy)
                with open(os.path.join(decoy, b"decoy"), "wb") as f:
                    f.write(b"someone else's")
    os.rename(where, os.path.join(os.fsencode(incoming), case.name))
    if quarantine:
        outcomes, reason = frozenset({"failed"}), "quarantined"
    elif same_time:
        outcomes, reason = frozenset({"failed"}), "carry the same time"
    elif case.goods:
        outcomes, reason = frozenset({"done"}), None
    elif maybe:
        outcomes, reason = frozenset({"done", "failed"}), None
    else:
        outcomes, reason = frozenset({"failed"}), "frame"
    return Planted(tag=tag, name=case.name, outcomes=outcomes, session=session, unreadable=unreadable, maybe=maybe,
                   goods=case.goods, reason=reason, case=case, one_crash_from_quarantine=one_crash_from_quarantine)


def plant_in_incoming(case: IncomingCase, incoming: Path, outside: Outside) -> tuple[bytes, str]:
    path = os.path.join(os.fsencode(incoming), case.name)
    if case.kind == "plain_file":
        with open(path, "wb") as f:
            f.write(good_png(7))
    elif case.kind == "fifo":
        os.mkfifo(path)
    elif case.kind == "link_dev_zero":
        os.symlink(b"/dev/zero", path)
    elif case.kind == "link_folder_outside":
        os.symlink(os.fsencode(outside.folder), path)
    else:
        os.symlink(os.fsencode(outside.file), path)
    return case.name, case.kind


# --- the batch and its checks ---------------------------------------------------------------------------------


@attrs.define
class Tally:
    """What the run tried, for the figures."""

    hostile: int = 0
    incoming_plants: int = 0
    goods: int = 0
    batches: int = 0
    kinds: dict[str, int] = attrs.field(factory=dict)

    def count(self, case: Hostile) -> None:
        if isinstance(case, IncomingCase):
            self.incoming_plants += 1
            self.kinds[f"incoming:{case.kind}"] = self.kinds.get(f"incoming:{case.kind}", 0) + 1
            return
        self.hostile += 1
        for kind, _ in case.entries:
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
        for what, present in (("non_utf8_name", _not_utf8(case.name)), ("name_clash", case.clash),
                              ("empty", not case.entries and not case.goods)):
            if present:
                self.kinds[what] = self.kinds.get(what, 0) + 1


def _not_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return True
    return False


@attrs.define
class Batch:
    goods: list[tuple[str, int, int]]  # name, index, frames
    planted: list[Planted]
    in_incoming: list[tuple[bytes, str]]


def _listdir(path: Path) -> list[bytes]:
    try:
        return os.listdir(os.fsencode(path))
    except FileNotFoundError:
        return []


def _folders(spool: Path, room: str) -> list[bytes]:
    """The folders of one room now (the daemon may move one while we look)."""
    root = os.fsencode(spool / room)
    found = []
    for name in _listdir(spool / room):
        try:
            if not name.startswith(b".") and stat.S_ISDIR(os.lstat(os.path.join(root, name)).st_mode):
                found.append(name)
        except FileNotFoundError:
            continue
    return found


def where_tags_are(spool: Path) -> dict[bytes, list[tuple[str, bytes]]]:
    """For every tag file: the (room, folder) pairs holding it."""
    found: dict[bytes, list[tuple[str, bytes]]] = {}
    for room in ("incoming", "active", "done", "failed"):
        root = os.fsencode(spool / room)
        for folder in _folders(spool, room):
            for entry in _listdir(Path(os.fsdecode(os.path.join(root, folder)))):
                if entry.startswith(b"tag-"):
                    found.setdefault(entry, []).append((room, folder))
    return found


def drained(spool: Path, batch: Batch) -> bool:
    tags = where_tags_are(spool)
    done = set(_folders(spool, "done"))
    return (all(tags.get(p.tag, [("?", b"")])[0][0] in ("done", "failed") for p in batch.planted)
            and all(os.fsencode(name) in done for name, _, _ in batch.goods)
            and not _folders(spool, "incoming") and not _folders(spool, "active"))


def check_batch(spool: Path, batch: Batch, state: BackendState, outside: Outside, before: dict[str, str],
                *, killed: bool = False) -> None:
    """The invariants, once a batch has drained (``killed``: the daemon was killed meanwhile)."""
    assert not _folders(spool, "incoming"), f"left in incoming/: {_folders(spool, 'incoming')}"
    assert not _folders(spool, "active"), f"left in active/: {_folders(spool, 'active')}"
    for name, index, count in batch.goods:
        check_done(spool, name, index, count, state)
        assert not (spool / "failed" / name).exists()
    tags = where_tags_are(spool)
    for planted in batch.planted:
        homes = tags.get(planted.tag, [])
        assert len(homes) == 1, f"{planted.name!r} is in {homes}, not in exactly one place"
        room, folder = homes[0]
        path = os.path.join(os.fsencode(spool / room), folder)
        what = f"{planted.name!r} ({room}/{folder!r})"
        outcomes = planted.outcomes | ({"failed"} if killed and planted.one_crash_from_quarantine else set())
        assert room in outcomes, f"{what}: expected {sorted(outcomes)}"
        if not _not_utf8(planted.name):  # shortened for a suffix on a clash: never mid-character
            assert not _not_utf8(folder), f"{what}: a UTF-8 name was filed under one that is not"
        if room == "done":
            with open(os.path.join(path, b"result.json"), "rb") as f:
                result = json.load(f)
            with open(os.path.join(path, b".caired-session.json"), "rb") as f:
                session = json.load(f)
            assert result["session"] == planted.session, what
            assert UUID4_RE.match(result["datapt_id"]) and result["datapt_id"] == session["datapt_id"], what
            assert result["finished"]["state"] == "finished", what
            assert planted.goods <= result["frames_sent"] <= planted.goods + planted.maybe, (what, result)
            assert planted.unreadable <= set(result["frames_unreadable"]), (what, result["frames_unreadable"])
        else:
            with open(os.path.join(path, b"error.json"), "rb") as f:
                error = json.load(f)
            assert error["reason"] and error["error_type"], (what, error)
            if planted.reason is not None:
                assert planted.reason in error["reason"], (what, error)
            assert error["session"] == planted.session, (what, error)
    for plant, kind in batch.in_incoming:  # left alone: not claimed, not followed, not removed
        entry = os.path.join(os.fsencode(spool / "incoming"), plant)
        assert os.path.lexists(entry), f"incoming/{plant!r} ({kind}) was removed"
        mode = os.lstat(entry).st_mode
        assert (stat.S_ISLNK(mode) if kind.startswith("link") else
                stat.S_ISFIFO(mode) if kind == "fifo" else stat.S_ISREG(mode)), (plant, kind)
    assert outside.digest() == before, "something outside the spool changed"
    for room in ("done", "failed"):  # the decoys of name clashes are untouched
        for folder in _folders(spool, room):
            decoy = os.path.join(os.fsencode(spool / room), folder, b"decoy")
            if os.path.lexists(decoy):
                assert sorted(_listdir(Path(os.fsdecode(os.path.dirname(decoy))))) == [b"decoy"]


def internal_errors(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("event") == "internal_error" or "exception" in line]


@attrs.define
class Run:
    """One daemon fed batches from a worker thread; the checks run in trio's thread."""

    spool: Path
    state: BackendState
    outside: Outside
    log: Path
    alive: Callable[[], str | None]  # None while the daemon runs, else what became of it
    # Called (in trio) after each batch is dropped, with a delay Hypothesis draws: kill -9 and restart.
    cut: Callable[[float], Awaitable[None]] | None = None
    tally: Tally = attrs.field(factory=Tally)
    goods: itertools.count[int] = attrs.field(factory=itertools.count)
    idents: itertools.count[int] = attrs.field(factory=itertools.count)

    def drop_batch(self, cases: list[Hostile], good_count: int) -> Batch:
        staging = self.spool.parent / "staging"
        incoming = self.spool / "incoming"
        batch = Batch([], [], [])
        goods_at = set(range(0, len(cases) + 1, max(1, (len(cases) + 1) // max(1, good_count))))
        for position in range(len(cases) + 1):
            if position in goods_at and len(batch.goods) < good_count:
                index = next(self.goods)
                name = f"good-{index}"
                drop(self.spool, name, index, 6)
                batch.goods.append((name, index, 6))
                self.tally.goods += 1
            if position < len(cases):
                case = cases[position]
                self.tally.count(case)
                if isinstance(case, FolderCase):
                    ident = int(case.name.split(b"-", 1)[0][1:])
                    batch.planted.append(plant_folder(case, ident, staging, incoming, self.spool, self.outside))
                else:
                    batch.in_incoming.append(plant_in_incoming(case, incoming, self.outside))
        self.tally.batches += 1
        return batch

    async def wait_and_check(self, batch: Batch, before: dict[str, str]) -> None:
        deadline = trio.current_time() + DRAIN_WITHIN
        for polls in itertools.count():
            if drained(self.spool, batch):
                break
            if (dead := self.alive()) is not None:
                raise AssertionError(f"the daemon died: {dead}")
            if polls % 20 == 19 and (bugs := internal_errors(log_lines(self.log))):
                raise AssertionError(f"internal errors while draining: {bugs[:3]}")
            if trio.current_time() > deadline:
                tags = where_tags_are(self.spool)
                stuck = {p.name: (tags.get(p.tag), p.case) for p in batch.planted
                         if not tags.get(p.tag) or tags[p.tag][0][0] not in ("done", "failed")}
                raise AssertionError(f"not drained within {DRAIN_WITHIN:g} s: incoming "
                                     f"{_folders(self.spool, 'incoming')}, active {_folders(self.spool, 'active')}, "
                                     f"hostile folders at {stuck}")
            await trio.sleep(0.1)
        assert self.alive() is None
        check_batch(self.spool, batch, self.state, self.outside, before, killed=self.cut is not None)
        bugs = internal_errors(log_lines(self.log))
        assert not bugs, bugs[:3]

    def feed(self, examples: int) -> None:
        """Run in a worker thread: Hypothesis draws ``examples`` batches, each dropped and checked."""
        before = self.outside.digest()
        next_ident = self.idents

        @st.composite
        def batches(draw: st.DrawFn) -> tuple[list[Hostile], int, float]:
            size = draw(st.integers(1, BATCH), label="hostile folders")
            cases = [draw(hostile(next(next_ident))) for _ in range(size)]
            return cases, draw(st.integers(1, 2), label="goods"), draw(st.floats(0.0, 0.6), label="kill after")

        # No shrinking: every example changes the one daemon's spool, and a failing one can
        # take DRAIN_WITHIN; the failing batch is printed whole instead.
        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(batches())
        def one_batch(drawn: tuple[list[Hostile], int, float]) -> None:
            cases, good_count, kill_after = drawn
            batch = self.drop_batch(cases, good_count)
            if self.cut is not None:
                trio.from_thread.run(self.cut, kill_after)
            trio.from_thread.run(self.wait_and_check, batch, before)

        one_batch()


def _make_spool(tmp_path: Path) -> tuple[Path, Outside]:
    spool = tmp_path / "spool"
    for room in ("incoming", "active", "done", "failed", "tmp"):
        (spool / room).mkdir(parents=True, exist_ok=True)
    return spool, Outside.make(tmp_path / "outside")


def remove_tree(root: Path) -> None:
    """Remove ``root`` and everything in it without recursion (links not followed)."""
    stack = [os.fsencode(root)]
    while stack:
        path = stack[-1]
        subfolders = []
        for name in os.listdir(path):
            entry = os.path.join(path, name)
            if stat.S_ISDIR(os.lstat(entry).st_mode):
                subfolders.append(entry)
            else:
                os.unlink(entry)
        if subfolders:
            stack.extend(subfolders)
            continue
        os.rmdir(path)
        stack.pop()


@pytest.fixture(autouse=True)
def _no_deep_tree_left(tmp_path: Path) -> Iterator[None]:
    """pytest removes old tmp_path folders with a recursive rmtree, which a tree 1100 deep
    overflows (in a later run, of any test): nothing of this test's is left to it."""
    yield
    kept = tmp_path.parent / f"{tmp_path.name}-logs"  # the logs stay, for a failure's story
    for log in [*tmp_path.glob("*.log"), *tmp_path.glob("*.jsonl"), *tmp_path.glob("*.stderr")]:
        kept.mkdir(exist_ok=True)
        log.rename(kept / log.name)
    remove_tree(tmp_path)


# --- the tests ------------------------------------------------------------------------------------------------


async def test_a_hostile_spool_never_stops_the_daemon_and_every_folder_is_filed(
    backend: BackendFactory, tmp_path: Path
) -> None:
    state = await backend(api_key=SECRET_KEY)
    spool, outside = _make_spool(tmp_path)
    log = tmp_path / "caired.log"
    cfg = daemon_config(state.port, spool, CAIRED_LOG_FILE=str(log))
    clog.configure(cfg)
    ended: list[str] = []
    lock = threading.Lock()

    async def daemon(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await serve(cfg, notifier=Notifier(None), task_status=task_status)
        except BaseException as exc:  # recorded for the check, then re-raised
            with lock:
                ended.append(repr(exc))
            raise
        with lock:
            ended.append("returned")

    def alive() -> str | None:
        with lock:
            return ended[0] if ended and not ended[0].startswith("Cancelled") else None

    async with trio.open_nursery() as nursery:
        await nursery.start(daemon)
        run = Run(spool, state, outside, log, alive)
        await trio.to_thread.run_sync(partial(run.feed, EXAMPLES))
        assert alive() is None and not ended
        nursery.cancel_scope.cancel()
    print(f"in-process: {run.tally.hostile} hostile folders, {run.tally.incoming_plants} things in incoming/, "
          f"{run.tally.goods} good folders, {run.tally.batches} batches; kinds {sorted(run.tally.kinds.items())}")
    assert run.tally.batches >= EXAMPLES
    assert internal_errors(log_lines(log)) == []


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_python_m_caired_run_survives_a_hostile_spool_with_one_pid_bounded_memory_and_a_quick_stop(
    backend: BackendFactory, tmp_path: Path
) -> None:
    state = await backend(api_key=SECRET_KEY)
    spool, outside = _make_spool(tmp_path)
    # Left in active/ by a process that died holding it: a FIFO .ready, a FIFO session file,
    # no lock file (an older caired). Recovery must still reach READY and stream it.
    orphan = spool / "active" / "orphan"
    write_frames(orphan, 3, start=HOSTILE_BASE - 20_000)
    os.mkfifo(orphan / ".ready")
    os.mkfifo(orphan / ".caired-session.json")
    (orphan / ".result.json.0badc0de.caired-tmp").mkdir()  # a folder named like one of caired's temporaries
    out = tmp_path / "out.jsonl"
    examples = max(1, -(-HOSTILE_FOLDERS // (BATCH // 2)))  # a batch holds about BATCH / 2 hostile folders
    started = time.monotonic()
    env = child_env(state.port, spool, CAIRED_SPOOL_MAX_SESSIONS="2", CAIRED_SPOOL_KEEP_FRAMES="false")
    async with child(env, out) as proc:
        pid = proc.pid

        def alive() -> str | None:
            return None if proc.returncode is None else f"exit code {proc.returncode}"

        run = Run(spool, state, outside, out, alive)
        with trio.fail_after(30):
            while not any(line["event"] == "daemon_ready" for line in log_lines(out)):
                assert alive() is None, out.with_suffix(".stderr").read_text()
                await trio.sleep(0.05)
        while run.tally.hostile < HOSTILE_FOLDERS:
            await trio.to_thread.run_sync(partial(run.feed, examples))
            examples = max(1, examples // 4)
        assert alive() is None
        assert (spool / "done" / "orphan" / "result.json").exists()
        peak_kib = vm_hwm_kib(pid)
        # Stop with hostile folders in flight: a FIFO frame, a link to /dev/zero, a sparse 2 GB frame.
        last = FolderCase(b"h999999-last", False, 2, (("fifo_frame", None), ("link_dev_zero", None),
                                                       ("sparse_2gb", None)))
        plant_folder(last, 999999, spool.parent / "staging", spool / "incoming", spool, outside)
        await until(lambda: any(line["event"] == "folder_claimed" and line["session"] == "h999999-last"
                                for line in log_lines(out)), "the last folder claimed")
        code, seconds = await stop(proc)
    elapsed = time.monotonic() - started
    lines = log_lines(out)
    stderr = out.with_suffix(".stderr").read_text()
    starts = [line["pid"] for line in lines if line["event"] == "daemon_starting"]
    print(f"subprocess: {run.tally.hostile} hostile folders + {run.tally.incoming_plants} things in incoming/ "
          f"+ {run.tally.goods} good folders in {run.tally.batches} batches, {elapsed:.0f} s; daemon deaths "
          f"{len(starts) - 1 + (code != 0)}; peak RSS {peak_kib / 1024:.0f} MiB; SIGTERM exit {code} after "
          f"{seconds:.2f} s; kinds {sorted(run.tally.kinds.items())}")
    assert starts == [pid]  # never restarted, never another process
    assert code == 0 and seconds < 10
    assert "Traceback" not in stderr, stderr[-2000:]
    python_lines = [line for line in stderr.splitlines() if line.strip() and not NATIVE_DIAGNOSTIC.match(line)]
    assert python_lines == [], python_lines[:5]
    assert peak_kib < RSS_BOUND_MB * 1024
    assert internal_errors(lines) == []
    assert not _folders(spool, "active")
    assert run.tally.hostile >= HOSTILE_FOLDERS


async def test_hostile_folders_cut_off_by_kill_9_are_recovered_and_filed(
    backend: BackendFactory, tmp_path: Path
) -> None:
    """A crash (kill -9) while hostile folders stream: on restart, recovery files every one
    of them like the others (what a dropper left travels into active/ with the folder)."""
    state = await backend(api_key=SECRET_KEY)
    spool, outside = _make_spool(tmp_path)
    out = tmp_path / "out.jsonl"
    env = child_env(state.port, spool, FPS="20")  # paced: folders are still streaming when the kill comes
    procs: list[trio.Process] = []

    async def start() -> None:
        with out.open("ab") as stdout, out.with_suffix(".stderr").open("ab") as stderr:
            procs.append(await trio.lowlevel.open_process([sys.executable, "-m", "caired", "run"], env=env,
                                                          stdout=stdout, stderr=stderr))
        await until(lambda: sum(line["event"] == "daemon_ready" for line in log_lines(out)) == len(procs),
                    "daemon_ready")

    async def kill_and_restart(after: float) -> None:
        claimed = sum(line["event"] == "folder_claimed" for line in log_lines(out))
        await until(lambda: sum(line["event"] == "folder_claimed" for line in log_lines(out)) > claimed,
                    "a folder of the batch claimed")
        await trio.sleep(after / 3)  # 0 to 0.2 s into its stream
        procs[-1].kill()
        await procs[-1].wait()
        await start()

    def alive() -> str | None:
        return None if procs[-1].returncode is None else f"exit code {procs[-1].returncode}"

    await start()
    try:
        run = Run(spool, state, outside, out, alive, cut=kill_and_restart)
        await trio.to_thread.run_sync(partial(run.feed, KILLS))
        code, seconds = await stop(procs[-1])
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    cut = sum(line["event"] == "folder_recovered" for line in log_lines(out))
    print(f"kill -9: {len(procs) - 1} kills, {cut} folders recovered, {run.tally.hostile} hostile folders")
    assert code == 0 and seconds < 10
    assert len(procs) == KILLS + 1
    stderr = out.with_suffix(".stderr").read_text()
    assert "Traceback" not in stderr, stderr[-2000:]


@pytest.mark.parametrize("how", ["fifo", "link_dev_zero", "folder"])
async def test_an_orphan_with_a_special_ready_marker_or_temporary_is_recovered_and_streamed(
    backend: BackendFactory, tmp_path: Path, how: str
) -> None:
    state = await backend(api_key=SECRET_KEY)
    spool, outside = _make_spool(tmp_path)
    orphan = spool / "active" / "orphan"
    write_frames(orphan, 3, start=HOSTILE_BASE - 30_000)
    _special(os.fsencode(orphan / ".ready"), how, outside)
    _special(os.fsencode(orphan / ".result.json.0badc0de.caired-tmp"), how, outside)  # named like a temporary
    log = tmp_path / "caired.log"
    cfg = daemon_config(state.port, spool, CAIRED_LOG_FILE=str(log))
    clog.configure(cfg)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(20):
            await nursery.start(partial(serve, cfg, notifier=Notifier(None)))
        await until((spool / "done" / "orphan" / "result.json").exists, "the orphan in done/", within=20)
        nursery.cancel_scope.cancel()
    assert internal_errors(log_lines(log)) == []
    (spool / "done" / "orphan" / ".result.json.0badc0de.caired-tmp").lstat()  # not caired's: kept


@pytest.mark.parametrize(("planted", "aside"), [("result.json", "result.previous.json"),
                                                 ("error.json", "error.previous.json"),
                                                 (".caired-session.json", ".caired-session.invalid.json")])
@pytest.mark.parametrize("kind", ["fifo", "folder", "link_dev_zero"])
def test_a_control_file_is_set_aside_even_when_its_aside_name_is_taken_by_a_folder(
    tmp_path: Path, planted: str, aside: str, kind: str
) -> None:
    """Found by the hostile spool: a planted result.json beside a folder named
    result.previous.json made every claim fail (EISDIR), so the folder stayed in incoming/."""
    from caired.spool import Spool

    spool, outside = _make_spool(tmp_path)
    folder = spool / "incoming" / "x"
    write_frames(folder, 2)
    _special(os.fsencode(folder / planted), kind, outside)
    _special(os.fsencode(folder / aside), "folder", outside)
    box = Spool(spool)
    box.prepare()
    claim = box.claim("x")
    assert claim is not None
    assert (claim.path / aside / "inside").read_bytes() == b"planted"  # what was there is kept
    kept = claim.path / f"{aside}.1"
    assert kept.is_symlink() if kind == "link_dev_zero" else kept.exists()
    if planted != ".caired-session.json":
        assert not os.path.lexists(claim.path / planted)
    box.finish(claim, {"hr": 60})
    assert (spool / "done" / "x" / "result.json").exists()
    box.close()


@pytest.mark.parametrize("source", [["drop"], {"drop": 1}, None, 7, "DROP", "drop\n"])
def test_a_session_file_with_a_source_that_is_not_a_known_name_is_set_aside(tmp_path: Path, source: Any) -> None:
    """Found by the hostile spool: a list as "source" raised TypeError (unhashable) from the
    check, past the claim's ValueError handling, so the folder was never claimed."""
    from caired.spool import INVALID_SESSION_FILE, SESSION_FILE, Spool, validate_session

    good = {"datapt_id": str(uuid.uuid4()), "source": source}
    with pytest.raises(ValueError, match="source"):
        validate_session(good, "x")
    spool, _ = _make_spool(tmp_path)
    folder = spool / "incoming" / "x"
    write_frames(folder, 2)
    (folder / SESSION_FILE).write_text(json.dumps(good))
    box = Spool(spool)
    box.prepare()
    claim = box.claim("x")
    assert claim is not None and claim.datapt_id != good["datapt_id"] and claim.source == "drop"
    assert json.loads((claim.path / INVALID_SESSION_FILE).read_text()) == good
    box.release(claim)
    box.close()


def vm_hwm_self_kib(*, reset: bool = False) -> int:
    """This process's peak RSS; ``reset``: the peak starts again from the RSS of now."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return vm_hwm_kib(os.getpid())


async def test_a_chunk_claiming_2_gib_is_skipped_without_the_memory(backend: BackendFactory, tmp_path: Path) -> None:
    """Found by the hostile spool: a 32x24 PNG whose IDAT length says 0x7FFFFFFF made the
    daemon's peak RSS 2.1 GiB (cv2.imdecode reserving the chunk), 30 such frames decoded at
    once by the encode workers would be the OOM killer's. The frame must be skipped unread."""
    state = await backend(api_key=SECRET_KEY)
    spool, _ = _make_spool(tmp_path)
    folder = tmp_path / "staging" / "lying"
    write_frames(folder, 3, start=HOSTILE_BASE)
    (folder / f"{HOSTILE_BASE + 500:.1f}.png").write_bytes(broken_chunks_png(1, "lying_length"))
    log = tmp_path / "caired.log"
    cfg = daemon_config(state.port, spool, CAIRED_LOG_FILE=str(log))
    clog.configure(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, cfg, notifier=Notifier(None)))
        before = vm_hwm_self_kib(reset=True)
        folder.rename(spool / "incoming" / "lying")
        await until((spool / "done" / "lying" / "result.json").exists, "the folder in done/")
        peak = vm_hwm_self_kib()
        nursery.cancel_scope.cancel()
    result = json.loads((spool / "done" / "lying" / "result.json").read_text())
    assert result["frames_sent"] == 3 and result["frames_unreadable"] == [f"{HOSTILE_BASE + 500:.1f}.png"]
    assert peak - before < 256 * 1024, f"peak RSS grew by {(peak - before) / 1024:.0f} MiB"


async def test_frames_whose_names_give_one_timestamp_twice_never_break_the_protocol(
    backend: BackendFactory, tmp_path: Path
) -> None:
    """Found by the hostile spool: the strict backend closed the session ("timestamps must
    ascend: 2000329700 after 2000329700") for a folder holding 2000329700.png beside
    2000329700.0.png. Names a dropper chose must never make caired break the protocol."""
    state = await backend(api_key=SECRET_KEY)
    spool, _ = _make_spool(tmp_path)
    folder = tmp_path / "staging" / "twice"
    write_frames(folder, 3, start=HOSTILE_BASE)
    stem = int(HOSTILE_BASE) + 700
    for name in (f"{stem}.png", f"{stem}.0.png", f"000{stem}.png", f"{stem}.00.png"):
        (folder / name).write_bytes(good_png(stem))
    log = tmp_path / "caired.log"
    cfg = daemon_config(state.port, spool, CAIRED_LOG_FILE=str(log))
    clog.configure(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, cfg, notifier=Notifier(None)))
        folder.rename(spool / "incoming" / "twice")
        await until(lambda: any((spool / room / "twice").exists() for room in ("done", "failed")), "the folder filed")
        nursery.cancel_scope.cancel()
    assert state.violations == [] and not state.sessions  # nothing out of order ever reached the backend
    error = json.loads((spool / "failed" / "twice" / "error.json").read_text())
    assert "carry the same time; keep one of them" in error["reason"]  # which to keep is the dropper's call


def test_a_bug_met_in_a_dropped_folder_files_it_in_failed_instead_of_retrying_for_ever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next TypeError nobody foresaw in reading a planted control file must end that
    folder's claim in failed/ with its reason, not put it back in incoming/ to fail again
    every 10 s for ever (as the unhashable "source" did)."""
    from caired import spool as spool_module
    from caired.spool import SESSION_FILE, Spool

    def broken(data: Any, folder_name: str) -> dict[str, Any]:
        raise TypeError("a check nobody foresaw")

    monkeypatch.setattr(spool_module, "validate_session", broken)
    spool, _ = _make_spool(tmp_path)
    folder = spool / "incoming" / "x"
    write_frames(folder, 2)
    (folder / SESSION_FILE).write_text(json.dumps({"datapt_id": str(uuid.uuid4())}))
    box = Spool(spool)
    box.prepare()
    with structlog.testing.capture_logs() as logs:
        assert box.claim("x") is None
    box.close()
    assert not (spool / "incoming" / "x").exists() and not (spool / "active" / "x").exists()
    error = json.loads((spool / "failed" / "x" / "error.json").read_text())
    assert error["error_type"] == "TypeError" and "a check nobody foresaw" in error["reason"]
    assert [line["where"] for line in logs if line["event"] == "internal_error"] == ["claim"]
