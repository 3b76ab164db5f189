"""``caired queue [--json] [STATE...]``: every folder of the spool, its state, age and story.

STATE is any of ready, settling, held (incoming/), active, orphaned (active/: streamed by a
live process, or left by a dead one), done, failed; none lists them all. The table is for
people; ``--json`` gives one JSON object per line, with the fields the README documents.
Reading takes no lock: it is safe while daemons run, also on a spool shared over NFS.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from caired.cli import command
from caired.commands._acting import add_spool_options
from caired.config import Config
from caired.fsops import shown
from caired.queue import STATES, Entry, entries


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = command(
        sub,
        "queue",
        _main,
        help="list the spool's folders: state, age, frames, attempts, last error or HR",
        description="""
            List every folder of the spool with its state, how long since it last changed, its
            frames, attempts, datapt_id and what happened to it: the HR of a done folder, the
            reason of a failed one, the process streaming an active one. STATE is any of ready,
            settling, held (in incoming/), active, orphaned (in active/: its process died), done,
            failed; none lists them all. --json prints one JSON object per line, with the fields
            the README documents. Reading takes no lock: it is safe while daemons run, also on a
            spool shared over NFS.
        """,
        examples=[
            "caired queue",
            "caired queue failed held",
            "caired queue --json failed",
        ],
    )
    p.add_argument("states", nargs="*", metavar="STATE", type=_state, help=f"only these states ({', '.join(STATES)})")
    p.add_argument("--json", action="store_true", help="one JSON object per line (stable field names)")
    add_spool_options(p)


def _state(value: str) -> str:
    if value not in STATES:
        raise argparse.ArgumentTypeError(f"{value!r} is not a state; the states are {', '.join(STATES)}")
    return value


def _main(cfg: Config, args: argparse.Namespace) -> int:
    now = time.time()
    found = entries(Path(cfg.spool.dir), settle_seconds=cfg.spool.settle_seconds, states=args.states, now=now)
    if args.json:
        for entry in found:
            print(json.dumps(entry.as_json(now), ensure_ascii=False))
        return 0
    print(table(found, now), end="")
    return 0


def table(found: list[Entry], now: float) -> str:
    """A plain table, one line per folder; an empty spool says so."""
    if not found:
        return "no folders\n"
    rows = [("STATE", "FOLDER", "AGE", "FRAMES", "TRIES", "DATAPT_ID", "INFO")]
    for entry in found:
        record = entry.as_json(now)
        rows.append((
            entry.state,
            f"{entry.room}/{record['name']}",
            age(record["age_seconds"]),
            str(entry.frames),
            "-" if entry.attempts is None else str(entry.attempts),
            (entry.datapt_id or "-")[:8],
            info(entry),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)) + "  " + row[-1] + "\n"
        for row in rows
    )


def info(entry: Entry) -> str:
    parts = []
    if entry.state == "active":
        parts.append(f"pid {entry.holder_pid}" if entry.holder_pid is not None else "pid unknown (another machine?)")
    if entry.state == "orphaned":
        parts.append("no process holds it: the next rescan gives it back")
    if entry.hr is not None:
        parts.append(f"HR {entry.hr:g}")
    if entry.reason:
        parts.append(shown(entry.reason).replace("\n", " "))
    if entry.crashes:
        parts.append(f"{entry.crashes} crash{'es' if entry.crashes != 1 else ''}")
    if entry.problem:
        parts.append(entry.problem)
    return "; ".join(parts)


def age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"
