"""``caired plot LOG``: draw one session of a JSON log into a PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

import structlog

from caired.cli import add_common, command
from caired.config import Config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = command(
        sub,
        "plot",
        _main,
        help="draw a session's rPPG and heart rate from a JSON log into a PNG",
        description="""
            Draw one session of a caired JSON log into a PNG: the rPPG waveform, merged from the
            answers' overlapping windows, above the heart rate over time and the final heart rate,
            on one time axis. The log can be the daemon's log file, a saved stdout or journal
            output; other lines are skipped. Without --session, the latest session with answers is
            drawn; the picture goes beside the log unless -o says where. A log that is missing or
            holds no answers for the session exits 65.
        """,
        examples=[
            "caired plot /var/log/caired/caired.jsonl --session rec-001 -o rec-001.png",
            "caired plot saved-stdout.jsonl",
        ],
    )
    add_common(p)
    p.add_argument("log", type=Path, metavar="LOG", help="caired's JSON-lines log (log file or saved stdout)")
    p.add_argument("--session", metavar="NAME", help="session name or datapt_id (default: the latest)")
    p.add_argument("-o", "--output", type=Path, metavar="PNG", help="where to write (default: beside the log)")


def _main(cfg: Config, args: argparse.Namespace) -> int:
    from caired.plot import plot

    path, found = plot(args.log, session=args.session, output=args.output)
    structlog.get_logger().info(
        "plot_written",
        path=str(path),
        session=found.name,
        datapt_id=found.datapt_id,
        answers=len(found.readings),
        final_hr=found.final_hr,
    )
    return 0
