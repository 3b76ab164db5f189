"""``caired release NAME...``: let held folders of incoming/ be streamed again.

The daemons are woken at once; a folder without ``.ready`` settles first as usual.
Exit codes as ``caired requeue``.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from caired.cli import command
from caired.commands._acting import EXIT_CODES, NAMES_HELP, act_on_each, add_spool_options
from caired.config import Config
from caired.queue import release


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = command(
        sub,
        "release",
        _main,
        help="let held folders be streamed again",
        description="""
            Take folders of incoming/ off hold, under the folder's lock as 'caired hold' put them
            on it. The daemons are woken at once; a folder without its .ready marker settles
            first, as any dropped folder does.
        """,
        examples=["caired release rec-001"],
        notes=EXIT_CODES,
    )
    p.add_argument("names", nargs="+", metavar="NAME", help=NAMES_HELP)
    add_spool_options(p)


def _main(cfg: Config, args: argparse.Namespace) -> int:
    return act_on_each("caired release", args.names, functools.partial(release, Path(cfg.spool.dir)))
