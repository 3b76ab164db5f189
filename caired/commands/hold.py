"""``caired hold NAME...``: keep folders of incoming/ from being streamed until released.

The hold is a marker file inside the folder, written under the folder's lock: no daemon
claims a held folder. Exit codes as ``caired requeue``.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from caired.cli import command
from caired.commands._acting import EXIT_CODES, NAMES_HELP, act_on_each, add_spool_options
from caired.config import Config
from caired.queue import hold


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = command(
        sub,
        "hold",
        _main,
        help="keep folders of incoming/ from being streamed",
        description="""
            Keep folders of incoming/ from being streamed until 'caired release'. The hold is a
            marker file inside the folder, written under the folder's lock: no daemon claims a
            held folder, and 'caired queue' shows it as held.
        """,
        examples=["caired hold rec-001 rec-002", "caired hold incoming/rec-003"],
        notes=EXIT_CODES,
    )
    p.add_argument("names", nargs="+", metavar="NAME", help=NAMES_HELP)
    add_spool_options(p)


def _main(cfg: Config, args: argparse.Namespace) -> int:
    return act_on_each("caired hold", args.names, functools.partial(hold, Path(cfg.spool.dir)))
