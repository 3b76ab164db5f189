"""``caired run``: the daemon, in the foreground (systemd style, no forking)."""

from __future__ import annotations

import argparse

import trio

from caired.cli import add_common, command
from caired.config import Config
from caired.daemon import serve


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = command(sub, "run", _main, help="run the daemon: stream every folder dropped into the spool")
    p.add_argument("--spool", dest="spool.dir", metavar="DIR", help="spool folder (default /var/lib/caired)")
    p.add_argument("--log-file", dest="log.file", metavar="PATH", help="also append the JSON log to PATH")
    add_common(p)


def _main(cfg: Config, args: argparse.Namespace) -> int:
    trio.run(serve, cfg)
    return 0
