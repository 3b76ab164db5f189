"""``caired requeue NAME... [--new-datapoint]``: give folders back to the daemon.

A folder of failed/ goes back to incoming/ under its own datapt_id (error.json kept as
error.previous.json; its crash count starts over). A folder of done/ goes back only with
``--new-datapoint``: a fresh datapt_id, its result kept beside it as
``result.<old datapt_id>.json``. NAME is a folder's name, or ROOM/NAME. A folder being
streamed is refused. Exit codes: 0 all requeued; 65 a folder in the wrong state; 66 no
such folder; 73 the spool cannot be written; 75 a process holds the folder.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from caired.cli import command
from caired.commands._acting import EXIT_CODES, NAMES_HELP, act_on_each, add_spool_options
from caired.config import Config
from caired.queue import requeue


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = command(
        sub,
        "requeue",
        _main,
        help="move failed (or, as new datapoints, done) folders back to incoming/",
        description="""
            Give folders back to the daemon. A folder of failed/ goes back to incoming/ under its
            own datapt_id: its error.json is kept as error.previous.json and its crash count
            starts over. A folder of done/ goes back only with --new-datapoint: a fresh datapt_id,
            its result kept beside it as result.<old datapt_id>.json. A folder being streamed is
            refused; every move is a rename under the folder's lock, as the daemon's own.
        """,
        examples=["caired requeue rec-001 rec-002", "caired requeue done/rec-003 --new-datapoint"],
        notes=EXIT_CODES,
    )
    p.add_argument("names", nargs="+", metavar="NAME", help=NAMES_HELP)
    p.add_argument("--new-datapoint", action="store_true",
                   help="stream it again under a fresh datapt_id (needed for a done/ folder)")
    add_spool_options(p)


def _main(cfg: Config, args: argparse.Namespace) -> int:
    action = functools.partial(requeue, Path(cfg.spool.dir), new_datapoint=args.new_datapoint)
    return act_on_each("caired requeue", args.names, action)
