"""argparse -> Config -> logging -> the command; returns an exit code.

Each command's argparse glue lives in its own module under ``caired.commands``, which
exposes ``register(subparsers)`` and imports its domain modules only when it runs. An
option whose ``dest`` is a dotted config key (``dest="stream.fps"``) is a config flag:
it overrides that key, and ``check-config`` reports it as ``flag --fps``. The command's
handler is ``handler(cfg, args) -> int``, registered with ``command()``, which also gives
every command its description and examples.

User mistakes end in one line on stderr and a sysexits code; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs

from caired import __version__
from caired.config import Config, key_file_warning
from caired.errors import CairedError, ExitCode

Handler = Callable[[Config, argparse.Namespace], int]

# Modules that register a subcommand, in the order `caired --help` lists them.
COMMANDS: Final = (
    "caired.commands.stream",
    "caired.commands.run",
    "caired.commands.record",
    "caired.commands.check_config",
    "caired.commands.backend",
    "caired.commands.synth",
    "caired.commands.demo",
    "caired.commands.plot",
    "caired.commands.evaluate",
    "caired.commands.queue",
    "caired.commands.requeue",
    "caired.commands.hold",
    "caired.commands.release",
    "caired.commands.delete",
    "caired.commands.retry_now",
)
# Width of a command's description in its --help.
HELP_WIDTH: Final = 79


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: 'caired stream: error: ...' and exit 2."""

    def error(self, message: str) -> Any:
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def add_bool(parser: argparse.ArgumentParser, name: str, dest: str, help: str) -> None:
    """``--name/--no-name`` for a boolean config key."""
    parser.add_argument(f"--{name}", dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help)


def add_daemon_paths(parser: argparse.ArgumentParser) -> None:
    """The paths ``run`` takes on its command line (and ``check-config``, to check them the same way)."""
    parser.add_argument("--spool", dest="spool.dir", metavar="DIR", help="spool folder (default /var/lib/caired)")
    parser.add_argument("--log-file", dest="log.file", metavar="PATH", help="also append the JSON log to PATH")


def add_common(parser: argparse.ArgumentParser) -> None:
    """Options every command that loads the configuration accepts."""
    parser.add_argument("--config", metavar="PATH", help="TOML configuration file (or CAIRED_CONFIG)")
    parser.add_argument(
        "--log-level", dest="log.level", choices=["debug", "info", "warning", "error"], default=None
    )
    parser.add_argument(
        "--log-format", dest="log.format", choices=["auto", "json", "console"], default=None,
        help="stdout form: console on a terminal, JSON elsewhere (auto)",
    )


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given ``argv`` naming a command, only that command's module is imported.

    Importing every command costs what their heaviest dependencies cost (cv2 is ~15 MB
    of RSS): ``caired stream --format raw`` should not pay for ``record`` or ``synth``.
    """
    parser = _Parser(
        prog="caired",
        description="Stream camera frames to the Caire rPPG backend; keep every answer as a JSON line.",
    )
    parser.add_argument("--version", action="version", version=f"caired {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)
    for name in _chosen(argv):
        importlib.import_module(name).register(sub)
    return parser


def _chosen(argv: Sequence[str] | None) -> tuple[str, ...]:
    """The command modules to import: the one ``argv`` names (by module name), or all of them."""
    if not argv or argv[0].startswith("-"):
        return tuple(COMMANDS)
    wanted = argv[0].replace("-", "_")
    matches = tuple(name for name in COMMANDS if name.rsplit(".", 1)[-1] == wanted)
    return matches if len(matches) == 1 else tuple(COMMANDS)


def config_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, tuple[Any, str]]:
    """The dotted-dest options the user gave, as ``{key: (value, 'flag --name')}``."""
    flags: dict[str, tuple[Any, str]] = {}
    for action in _all_actions(parser, args):
        if "." in action.dest and getattr(args, action.dest, None) is not None:
            shown = action.option_strings[0] if action.option_strings else action.dest
            flags[action.dest] = (getattr(args, action.dest), f"flag {shown}")
    return flags


def _all_actions(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[argparse.Action]:
    actions = list(parser._actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(args, "command_parser", None)
            if chosen is not None:
                actions.extend(chosen._actions)
    return actions


def load_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Config:
    return Config.load(path=getattr(args, "config", None), flags=config_flags(parser, args))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    try:
        cfg = load_config(parser, args)
        from caired import logging as clog
        from caired import wire

        wire.keep_big_buffers()

        if getattr(args, "opens_log_file", True):
            clog.configure(cfg)
        else:
            clog.configure(attrs.evolve(cfg, log=attrs.evolve(cfg.log, file="")))
        for line in cfg.warnings:
            _say(args, f"warning: {line}")
        if cfg.backend.api_key_file and (warning := key_file_warning(cfg.backend.api_key_file)):
            clog.get_logger().warning("key_file_readable_by_others", problem=warning)
        return int(handler(cfg, args))
    except CairedError as exc:
        _say(args, str(exc) or type(exc).__name__)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130


def _say(args: argparse.Namespace, text: str) -> None:
    """``text`` on stderr, each line prefixed with the command, as every user-facing line is."""
    prog = f"caired {getattr(args, 'command', '')}".strip()
    for line in text.splitlines():
        print(f"{prog}: {line}", file=sys.stderr)


def command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    handler: Handler,
    *,
    help: str,
    description: str,
    examples: Sequence[str],
    notes: str = "",
) -> argparse.ArgumentParser:
    """Register a subcommand; the parser remembers itself so config flags can be found.

    ``description`` is one paragraph of plain text (no markup), wrapped here; ``examples``
    are whole command lines, shown as written; ``notes`` (exit codes, say) follow them.
    """
    epilog = "examples:\n" + "\n".join(f"  {example}" for example in examples)
    if notes:
        epilog += "\n\n" + notes.strip("\n")
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=textwrap.fill(" ".join(description.split()), HELP_WIDTH),
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler, command=name, command_parser=parser)
    return parser
