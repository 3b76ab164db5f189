"""``caired delete NAME... [--force]``: remove folders from the spool.

Without ``--force`` only folders of done/ and failed/; with it also folders of incoming/
(never streamed) and orphans of active/ (whose process died). A folder a process holds
(being streamed, or being filed) is never deleted. Exit codes as ``caired requeue``.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from caired.cli import command
from caired.commands._acting import EXIT_CODES, NAMES_HELP, act_on_each, add_spool_options
from caired.config import Config
from caired.queue import delete


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = command(
        sub,
        "delete",
        _main,
        help="remove folders from the spool (done/ and failed/; more with --force)",
        description="""
            Remove folders from the spool: folders of done/ and failed/, and with --force also
            folders of incoming/ (never streamed) and orphans of active/ (whose process died). A
            folder a process holds (being streamed, or being filed) is never deleted. The folder
            leaves its room in one rename before it is removed, so nothing sees half of it.
        """,
        examples=["caired delete failed/rec-001", "caired delete --force rec-002"],
        notes=EXIT_CODES,
    )
    p.add_argument("names", nargs="+", metavar="NAME", help=NAMES_HELP)
    p.add_argument("--force", action="store_true", help="also folders of incoming/ and orphans of active/")
    add_spool_options(p)


def _main(cfg: Config, args: argparse.Namespace) -> int:
    return act_on_each("caired delete", args.names, functools.partial(delete, Path(cfg.spool.dir), force=args.force))
