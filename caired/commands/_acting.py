"""What the commands acting on the spool share: the spool option, the exit codes, one line per folder."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Final

from caired.cli import add_common
from caired.errors import SpoolError
from caired.fsops import shown
from caired.queue import EX_CANTCREAT, Refused

EXIT_CODES: Final = """\
exit codes:
  0    every folder named was acted on
  65   a folder is in a state this command does not apply to
  66   no such folder
  73   the spool cannot be written
  75   a process holds the folder (it is being streamed): try again later
  78   a configuration error"""

NAMES_HELP: Final = "a folder's name as 'caired queue' shows it, or ROOM/NAME (incoming, active, done, failed)"


def add_spool_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spool", dest="spool.dir", metavar="DIR", help="spool folder (default: [spool] dir)")
    p.set_defaults(opens_log_file=False)  # an operator's command writes nothing into the daemon's log
    add_common(p)


def act_on_each(prog: str, names: Sequence[str], action: Callable[[str], str]) -> int:
    """``action`` on every name: what was done on stdout, each refusal as one line on stderr.

    Every name is tried; the exit code is the first refusal's (0 when there was none).
    """
    status = 0
    for name in names:
        try:
            print(action(name), flush=True)
        except Refused as err:
            print(f"{prog}: {err}", file=sys.stderr, flush=True)
            status = status or err.status
        except SpoolError as err:
            print(f"{prog}: {shown(name)}: {err}", file=sys.stderr, flush=True)
            status = status or EX_CANTCREAT
    return status
