"""``caired synth DIR``: write a clip of synthetic face frames with a known heart rate."""

from __future__ import annotations

import argparse
from pathlib import Path

import structlog

from caired.cli import add_common, command
from caired.config import Config
from caired.errors import ConfigError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = command(
        sub,
        "synth",
        _main,
        help="write synthetic timestamp-named PNG frames with a pulse",
        description="""
            Write a clip of synthetic frames into DIR as <timestamp>.png files, 1/fps apart: a face
            on a wall, swaying slightly, whose skin darkens faintly with each heartbeat at --bpm, as
            perfused skin does on camera. The pulse is invisible to the eye and findable by rPPG, so
            streaming the clip checks an estimate against a known truth. The same --seed gives the
            same frames. --layout writes the clip as a research session instead, with the pulse as
            its reference: jpeg (<timestamp>.jpg + reference.csv), video (clip.avi + reference.csv),
            vfr (a variable frame rate clip.mkv), ubfc (vid.avi + ground_truth.txt) or pure
            (DIR/Image<ns>.png + DIR.json, DIR named after the session).
        """,
        examples=[
            "caired synth clip --bpm 72 --seconds 10",
            "caired synth frames --bpm 95 --seed 1 --width 320 --height 240 --start 1747154380",
            "caired synth subject1 --layout ubfc --bpm 84 --seconds 30 --width 320 --height 240",
        ],
    )
    add_common(p)
    p.add_argument("dir", type=Path, help="folder to write <timestamp>.png frames into (created if missing)")
    p.add_argument("--bpm", type=float, default=72.0, help="heart rate carried by the skin (30-240)")
    p.add_argument("--seconds", type=float, default=10.0, help="clip length")
    p.add_argument("--fps", type=float, default=30.0, help="frames per second (sets the timestamp spacing)")
    p.add_argument("--width", type=int, default=640, help="frame width in pixels")
    p.add_argument("--height", type=int, default=480, help="frame height in pixels")
    p.add_argument("--seed", type=int, default=None, help="make the clip reproducible")
    p.add_argument("--start", type=float, default=None, help="first timestamp, UNIX seconds (default: now)")
    p.add_argument("--layout", choices=["png", "jpeg", "video", "vfr", "ubfc", "pure"], default=None,
                   help="write a research session of this layout, with its reference (default: PNG frames only)")


def _main(cfg: Config, args: argparse.Namespace) -> int:
    from caired.synth import check, synthesize, write_layout

    problems = check(bpm=args.bpm, seconds=args.seconds, fps=args.fps, width=args.width, height=args.height)
    if problems:
        name, problem = problems[0]
        raise ConfigError(name, f"flag --{name}", problem)
    if args.layout is not None:
        stamps = write_layout(args.dir, args.layout, bpm=args.bpm, seconds=args.seconds, fps=args.fps,
                              width=args.width, height=args.height, seed=args.seed, start=args.start)
        structlog.get_logger().info("synth_written", dir=str(args.dir), layout=args.layout, frames=len(stamps),
                                    bpm=args.bpm)
        return 0
    paths = synthesize(
        args.dir,
        bpm=args.bpm,
        seconds=args.seconds,
        fps=args.fps,
        width=args.width,
        height=args.height,
        seed=args.seed,
        start=args.start,
    )
    structlog.get_logger().info("synth_written", dir=str(args.dir), frames=len(paths), bpm=args.bpm)
    return 0
