"""``caired retry-now``: every daemon on the spool ends its backoff wait and tries the backend.

It writes the control file ``incoming/.caired-retry-now``, which the daemons look at every
second, so it needs only write access to the spool (caired's group), not the right to
signal the daemon; ``systemctl kill -s SIGUSR1 caired`` does the same for one daemon.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from caired.cli import command
from caired.commands._acting import add_spool_options
from caired.config import Config
from caired.errors import SpoolError
from caired.queue import EX_CANTCREAT, retry_now


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = command(
        sub,
        "retry-now",
        _main,
        help="end the daemons' backoff wait: try the backend at once",
        description="""
            Ask every daemon on the spool to end its current backoff wait and try the backend at
            once, after an outage was fixed or a key was replaced. It writes the control file
            incoming/.caired-retry-now, which the daemons look at every second, so it needs write
            access to the spool (caired's group), not the right to signal the service;
            'systemctl kill -s SIGUSR1 caired' does the same for one daemon.
        """,
        examples=["caired retry-now", "caired retry-now --spool /srv/caired-spool"],
        notes="exit codes:\n  0    asked\n  73   the spool cannot be written\n  78   a configuration error",
    )
    add_spool_options(p)


def _main(cfg: Config, args: argparse.Namespace) -> int:
    try:
        print(retry_now(Path(cfg.spool.dir)))
    except SpoolError as err:
        print(f"caired retry-now: {err}", file=sys.stderr)
        return EX_CANTCREAT
    return 0
