"""``caired record [DIR]``: capture a camera into a folder of PNGs named by capture time.

The capture itself is ``caired.record``, imported only when the command runs, so
``caired --help`` does not load OpenCV.
"""

from __future__ import annotations

import argparse
import time

import trio

from caired.cli import add_bool, add_common, command
from caired.config import Config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = command(
        sub,
        "record",
        _main,
        help="capture camera frames into a folder of PNGs named by capture time",
        description="""
            Capture frames from a camera, or a video file standing in for one, into DIR as
            <UNIX seconds>.png files, each written whole under a temporary name and renamed, so
            'caired stream' can send the folder as it is. With --to-spool, or a DIR inside a spool's
            incoming/ folder, the recording is a session of the spool, held in active/ while it is
            written and handed to incoming/ (as NAME.1 if NAME is taken) when it ends, for the daemon
            to stream; if the recording dies, the daemon recovers what it wrote. Ctrl-C (or
            SIGTERM) stops the capture and keeps the frames in hand, exiting 130 (143); a second
            Ctrl-C stops at once. A camera that cannot be opened, or stops delivering frames,
            exits 74.
        """,
        examples=[
            "caired record --camera 0 --duration 30 --fps 30 sessions/alice",
            "caired record --camera /dev/video2 --to-spool",
        ],
    )
    p.add_argument("dir", nargs="?", metavar="DIR",
                   help="output folder (default: stream.images_dir, IMAGES_DIR); with --to-spool, the session name")
    p.add_argument("--camera", dest="camera.device", metavar="DEVICE",
                   help="camera index, /dev/videoN or a video file (CAMERA_INDEX)")
    p.add_argument("--fps", dest="camera.fps", type=float, metavar="N", help="frames per second (FPS)")
    p.add_argument("--duration", dest="record.duration", type=float, metavar="SECONDS",
                   help="seconds to record (DURATION_SEC)")
    p.add_argument("--width", dest="camera.width", type=int, metavar="PX", help="capture width (RES_WIDTH)")
    p.add_argument("--height", dest="camera.height", type=int, metavar="PX", help="capture height (RES_HEIGHT)")
    add_bool(p, "preview", "record.preview", "show a preview window where a display exists; q stops (SHOW_PREVIEW)")
    p.add_argument("--to-spool", action="store_true",
                   help="record into the spool (spool.dir): held in active/, handed to incoming/ at the end")
    add_common(p)


def _main(cfg: Config, args: argparse.Namespace) -> int:
    from caired.record import plan, record

    target = plan(cfg, args.dir, to_spool=args.to_spool, now=time.time())
    return trio.run(record, cfg, target)
