"""What a dropped folder holds, recognised by its names: frames, a video, or a dataset's session.

``classify`` looks at a folder's entries (names as bytes, and which are folders) and
decides, in this order:

- ``ubfc``: ``ground_truth.txt`` beside one video (UBFC-rPPG's ``vid.avi``);
- ``pure``: ``Image<nanoseconds>.png`` frames and one JSON file, here or (as PURE ships a
  session ``01-01``) in a subfolder ``01-01/`` beside ``01-01.json``;
- ``frames``: ``<timestamp>.png`` / ``.jpg`` / ``.jpeg`` files;
- ``video``: one ``.avi`` / ``.mp4`` / ``.mkv`` / ``.mov`` file.

Any of them may hold a ``reference.csv`` (``timestamp,hr`` or ``timestamp,ppg``), which
is then the session's reference. A folder that looks like one of these but is not
quite (ground truth without its video, PURE frames without their JSON, two videos,
frames and a video together) is a LayoutError naming what is missing; an empty one is
NoFramesError. ``Layout.explanation`` says why the layout was chosen, for the log.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from decimal import Decimal
from typing import Any, Final, Literal

import attrs

from caired.errors import LayoutError, NoFramesError
from caired.frames import FrameRef, sort_frames
from caired.fsops import shown
from caired.video import VIDEO_SUFFIXES, is_video

Kind = Literal["frames", "video", "ubfc", "pure"]
RefKind = Literal["csv", "ubfc", "pure"]

UBFC_TRUTH: Final = b"ground_truth.txt"
REFERENCE_CSV: Final = b"reference.csv"
PURE_IMAGE: Final = re.compile(rb"^Image([0-9]{1,30})\.png\Z")
MAX_REFERENCE_BYTES: Final = 256 * 1024 * 1024  # a PURE JSON of a long session is tens of MB
EXPECTED: Final = ("expected <timestamp>.png or .jpg frames, one video file (.avi, .mp4, .mkv, .mov), "
                   "a UBFC-rPPG session (vid.avi + ground_truth.txt) or a PURE one (Image<ns>.png + its JSON)")


@attrs.frozen
class Layout:
    kind: Kind
    explanation: str
    frames: tuple[FrameRef, ...] = ()
    video: str | None = None  # the video's name in the folder
    images: str | None = None  # PURE: the subfolder holding the frames (None: the folder itself)
    reference: str | None = None  # the reference file's name (in the folder)
    reference_kind: RefKind | None = None
    ignored: int = 0
    examples: tuple[str, ...] = ()


@attrs.frozen
class Entry:
    name: bytes
    is_dir: bool = False


def ns_timestamp(digits: bytes) -> str:
    """``1392643993642815000`` (nanoseconds) -> ``"1392643993.642815000"``, exactly."""
    text = digits.decode("ascii").lstrip("0").rjust(10, "0")
    return f"{text[:-9]}.{text[-9:]}"


def pure_frames(names: Iterable[bytes]) -> tuple[FrameRef, ...]:
    """The ``Image<ns>.png`` names, in time order, each with its nanosecond time as UNIX seconds."""
    found = []
    for name in names:
        match = PURE_IMAGE.match(name)
        if match is not None:
            found.append((int(match.group(1)), FrameRef(name.decode("ascii"), ns_timestamp(match.group(1)))))
    found.sort(key=lambda pair: pair[0])
    return tuple(ref for _, ref in found)


def _text(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def _names(items: Iterable[bytes], limit: int = 3) -> str:
    shown_names = [shown(name) for name in sorted(items)]
    more = f" and {len(shown_names) - limit} more" if len(shown_names) > limit else ""
    return ", ".join(shown_names[:limit]) + more


def classify(entries: Iterable[Entry], label: str) -> Layout:
    """The folder's layout from its entries (hidden ones are caired's own and not looked at)."""
    visible = [entry for entry in entries if not entry.name.startswith(b".")]
    files = [entry.name for entry in visible if not entry.is_dir]
    folders = [entry.name for entry in visible if entry.is_dir]
    videos = [name for name in files if is_video(name)]
    jsons = [name for name in files if name.lower().endswith(b".json")]
    pure = [name for name in files if PURE_IMAGE.match(name)]
    has_csv = REFERENCE_CSV in files
    csv_note = " and reference.csv" if has_csv else ""

    def ref(name: str | None, kind: RefKind | None) -> dict[str, Any]:
        """reference.csv, when there is one, is the reference; else the dataset's own file."""
        return {"reference": "reference.csv", "reference_kind": "csv"} if has_csv else \
            {"reference": name, "reference_kind": kind}
    known = {UBFC_TRUTH, REFERENCE_CSV}

    if UBFC_TRUTH in files:
        if not videos:
            raise LayoutError(f"{label}: ground_truth.txt (UBFC-rPPG) but no vid.avi beside it")
        if len(videos) > 1:
            raise LayoutError(f"{label}: ground_truth.txt (UBFC-rPPG) beside {len(videos)} videos "
                              f"({_names(videos)}); a UBFC-rPPG session has one, vid.avi")
        rest = [name for name in files if name not in known and name not in videos]
        return Layout("ubfc", f"UBFC-rPPG session: {shown(videos[0])} with ground_truth.txt{csv_note}",
                      video=_text(videos[0]), **ref("ground_truth.txt", "ubfc"),
                      ignored=len(rest), examples=tuple(shown(n) for n in rest[:3]))

    if pure:
        if not jsons:
            raise LayoutError(f"{label}: PURE-style frames (Image<ns>.png) but no session JSON beside them "
                              "(such as 01-01.json, with /Image and /FullPackage)")
        if len(jsons) > 1:
            raise LayoutError(f"{label}: PURE-style frames beside {len(jsons)} JSON files ({_names(jsons)}); "
                              "a PURE session has one")
        frames = pure_frames(files)
        rest = [n for n in files if not PURE_IMAGE.match(n) and n != jsons[0] and n != REFERENCE_CSV]
        return Layout("pure", f"PURE session: {len(frames)} Image<ns>.png frames with {shown(jsons[0])}{csv_note}",
                      frames=frames, ignored=len(rest), examples=tuple(shown(n) for n in rest[:3]),
                      **ref(_text(jsons[0]), "pure"))

    # A folder or a FIFO named like a frame is a frame that will fail to read, with its reason.
    listing = sort_frames([entry.name for entry in visible])
    if not listing.frames and not videos and len(folders) == 1 and folders[0] + b".json" in jsons:
        return Layout("pure", f"PURE session: frames in {shown(folders[0])}/ with {shown(folders[0] + b'.json')}"
                      f"{csv_note}", images=_text(folders[0]), **ref(_text(folders[0] + b".json"), "pure"))
    if not listing.frames and not videos and folders and jsons:
        raise LayoutError(f"{label}: a subfolder ({_names(folders)}) and JSON ({_names(jsons)}) but not as PURE "
                          "keeps them: frames in NAME/ beside NAME.json")

    if listing.frames and videos:
        raise LayoutError(f"{label}: holds both frames and a video ({_names(videos)}); one session streams one "
                          "of them: put each in a folder of its own")
    if listing.frames:
        for a, b in itertools.pairwise(listing.frames):
            if Decimal(a.timestamp) == Decimal(b.timestamp):
                raise LayoutError(f"{label}: {shown(a.name)} and {shown(b.name)} carry the same time; "
                                  "keep one of them")
        jpegs = sum(1 for ref in listing.frames if ref.is_jpeg)
        kinds = "JPEG" if jpegs == len(listing.frames) else "PNG" if not jpegs else "PNG and JPEG"
        rest = [entry.name for entry in visible if entry.name not in known and not sort_frames([entry.name]).frames]
        return Layout("frames", f"{len(listing.frames)} {kinds} frames named by timestamp{csv_note}",
                      frames=listing.frames, ignored=len(rest), examples=tuple(shown(n) for n in rest[:3]),
                      **ref(None, None))
    if len(videos) > 1:
        raise LayoutError(f"{label}: holds {len(videos)} videos ({_names(videos)}); one session streams one "
                          "video: put each in a folder of its own")
    if videos:
        rest = [n for n in files if n not in known and n not in videos]
        return Layout("video", f"one video, {shown(videos[0])}{csv_note}", video=_text(videos[0]),
                      ignored=len(rest), examples=tuple(shown(n) for n in rest[:3]), **ref(None, None))
    raise NoFramesError(f"{label}: no frames ({EXPECTED})")


def single_video(name: str, label: str) -> Layout:
    """``caired stream FILE``: the file itself, which must be a video."""
    if not is_video(name):
        raise LayoutError(f"{label}: not a folder, nor a video ({', '.join(VIDEO_SUFFIXES)})")
    return Layout("video", f"one video file, {shown(name)}", video=name)
