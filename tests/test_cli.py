"""The command-line glue: every command's help, its examples, lazy imports, usage errors, config warnings."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from caired import cli
from caired.errors import ExitCode
from tests.conftest import cli_env

NAMES = ("stream", "run", "record", "check-config", "backend", "synth", "demo", "plot", "evaluate",
         "queue", "requeue", "hold", "release", "delete", "retry-now")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def examples(parser: argparse.ArgumentParser) -> list[str]:
    """The command lines under 'examples:' in a command's help."""
    _, _, after = (parser.epilog or "").partition("examples:\n")
    lines = []
    for line in after.splitlines():
        if not line.startswith("  "):
            break
        lines.append(line.strip())
    return lines


def test_caired_help_lists_every_command_in_order() -> None:
    assert tuple(subcommands()) == NAMES
    assert [name.rsplit(".", 1)[-1].replace("_", "-") for name in cli.COMMANDS] == list(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_command_has_a_plain_one_paragraph_description_and_examples(name: str) -> None:
    parser = subcommands()[name]
    description = parser.description or ""
    assert len(description) > 150 and "\n\n" not in description.strip()
    shown = parser.format_help()
    assert "``" not in shown and ":func:" not in shown  # no reST markup
    assert description.splitlines()[0] in shown  # shown as written, not re-flowed
    assert examples(parser) and all(example.startswith(f"caired {name}") for example in examples(parser))


@pytest.mark.parametrize("name", NAMES)
def test_every_example_in_the_help_is_a_valid_command_line(name: str) -> None:
    for example in examples(subcommands()[name]):
        argv = shlex.split(example)[1:]
        args = cli.build_parser(argv).parse_args(argv)
        assert args.command == name, example


def test_only_the_named_command_module_is_imported() -> None:
    assert cli._chosen(["check-config", "--spool", "x"]) == ("caired.commands.check_config",)
    assert cli._chosen(["record"]) == ("caired.commands.record",)
    assert cli._chosen(["--version"]) == cli._chosen(["no-such-command"]) == cli._chosen([]) == cli.COMMANDS


HEAVY = ("cv2", "caired.record", "caired.synth", "caired.plot", "caired.daemon", "caired.emulator.server")


def loaded_by(argv: list[str], watch: tuple[str, ...]) -> list[str]:
    """Which of ``watch`` a fresh interpreter has imported after ``caired ARGV``."""
    code = (
        "import json, sys\n"
        "from caired.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print(json.dumps([m for m in {list(watch)!r} if m in sys.modules]), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), check=True)
    loaded: list[str] = json.loads(done.stderr.strip().splitlines()[-1])
    return loaded


@pytest.mark.parametrize("name", [None, "stream", "record", "check-config", "demo"])
def test_help_imports_only_the_command_asked_for_and_nothing_heavy(name: str | None) -> None:
    argv = ["--help"] if name is None else [name, "--help"]
    # The overview registers every command; a command's help registers its own only.
    others = () if name is None else tuple(f"caired.commands.{n.replace('-', '_')}" for n in NAMES if n != name)
    assert loaded_by(argv, HEAVY + others) == []


def test_the_recording_code_the_daemon_imports_does_not_load_the_command_line() -> None:
    code = "import sys, caired.record, caired.live\nprint(sorted({'argparse', 'caired.cli'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), check=True)
    assert done.stdout.strip() == "[]"


def test_no_command_shows_the_overview_on_stderr_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == ExitCode.USAGE
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: caired") and "check-config" in err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["no-such-command"], "caired: error: argument COMMAND: invalid choice: 'no-such-command'"),
        (["record", "--duration"], "caired record: error: argument --duration: expected one argument"),
        (["synth"], "caired synth: error: the following arguments are required: dir"),
        (["plot", "log.jsonl", "--bogus"], "caired: error: unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == ExitCode.USAGE
    out, err = capsys.readouterr()
    [line] = err.splitlines()
    assert out == "" and line.startswith(says)


@pytest.fixture
def check_config_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only check-config registered; no caired settings from the environment of whoever runs the tests."""
    monkeypatch.setattr(cli, "COMMANDS", ("caired.commands.check_config",))
    for name in set(os.environ) - set(cli_env()):
        monkeypatch.delenv(name)


def test_a_caired_variable_naming_no_key_draws_one_warning_line(
    check_config_only: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CAIRED_STREAM_FPSS", "12")
    monkeypatch.setenv("CAIRED_BACKEND_API_KEY", "k")
    assert cli.main(["check-config", "--spool", str(tmp_path / "spool")]) == ExitCode.OK
    _, err = capsys.readouterr()
    assert err.splitlines() == [
        "caired check-config: warning: the environment variable CAIRED_STREAM_FPSS names no configuration key and "
        "is ignored; did you mean CAIRED_STREAM_FPS (stream.fps)?"
    ]


def test_an_error_in_the_file_caired_config_names_is_labelled_caired_config(
    check_config_only: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CAIRED_CONFIG", str(tmp_path / "missing.toml"))
    assert cli.main(["check-config"]) == ExitCode.CONFIG
    _, err = capsys.readouterr()
    assert err == f"caired check-config: CAIRED_CONFIG (from {tmp_path / 'missing.toml'}): no such file\n"


def readme_commands() -> list[str]:
    """The ``caired ...`` lines of the README's shell blocks."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, flags=re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.startswith("caired ")]


def test_every_caired_command_line_in_the_readme_parses() -> None:
    lines = readme_commands()
    assert {shlex.split(line, comments=True)[1] for line in lines} >= {"stream", "run", "record", "plot"}
    for line in lines:
        argv = shlex.split(line, comments=True)[1:]
        args = cli.build_parser(argv).parse_args(argv)
        assert args.command == argv[0], line
