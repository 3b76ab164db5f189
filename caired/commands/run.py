"""``caired run``: the daemon, in the foreground (systemd style, no forking)."""

from __future__ import annotations

import argparse
import functools
import signal

import trio

from caired.cli import add_common, add_daemon_paths, command, config_flags
from caired.config import Config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = command(
        sub,
        "run",
        _main,
        help="run the daemon: stream every folder dropped into the spool",
        description="""
            Run the daemon in the foreground, as systemd expects (no forking): watch the spool's
            incoming/ folder, stream each complete folder dropped there as one session, and file
            it in done/ with its result.json, or in failed/ with its error.json; with [camera]
            enabled, also stream live camera sessions. Connection problems are retried without
            limit. SIGTERM or Ctrl-C stops within seconds and puts sessions in flight back into
            incoming/; SIGHUP reloads the backend, retry and log-level settings and reopens the
            log file; SIGUSR1 ends the backoff wait (as caired retry-now does).
        """,
        examples=[
            "caired run --config /etc/caired/caired.toml",
            "caired run --spool ~/caired-spool --log-file ~/caired.jsonl",
        ],
    )
    add_daemon_paths(p)
    add_common(p)


def _main(cfg: Config, args: argparse.Namespace) -> int:
    from caired.daemon import serve

    def reload() -> Config:  # SIGHUP: the same file, environment and flags as now
        return Config.load(path=getattr(args, "config", None), flags=config_flags(args.command_parser, args))

    # SIGUSR1 (retry now) and SIGHUP (reload) must not kill a daemon that has not yet installed
    # its own handlers (their default action is to terminate): ignored until the signal task
    # takes them, which is before READY=1.
    for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    trio.run(functools.partial(serve, cfg, reload=reload))
    return 0
