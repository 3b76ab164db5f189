"""``caired evaluate LOG|SPOOL|RESULT...``: the backend's HR against the reference, across sessions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from caired.cli import add_common, command
from caired.config import Config
from caired.errors import ExitCode


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = command(
        sub,
        "evaluate",
        _main,
        help="compare the backend's HR with the reference HR across sessions (MAE, RMSE, MAPE, r)",
        description="""
            Compare the backend's final HR with each session's reference HR (from reference.csv, a
            UBFC-rPPG ground_truth.txt or a PURE JSON) across sessions, and print the figures the
            rPPG literature reports: MAE, RMSE, MAPE, Pearson's r, and the Bland-Altman bias with
            its 95% limits of agreement. Sessions come from caired JSON logs, result.json files, or
            a spool's done/ folder. Sessions without a reference (or without a backend HR) are
            listed as such. --json prints the figures as JSON; --plot writes the Bland-Altman plot
            as a PNG. No session with both HRs exits 65.
        """,
        examples=[
            "caired evaluate run.jsonl",
            "caired evaluate /var/spool/caired --json",
            "caired evaluate run.jsonl --plot bland-altman.png",
        ],
    )
    add_common(p)
    p.add_argument("inputs", type=Path, nargs="+", metavar="LOG|SPOOL|RESULT",
                   help="caired JSON-lines logs, spools, session folders or result.json files")
    p.add_argument("--json", action="store_true", help="print the sessions and figures as JSON")
    p.add_argument("--plot", type=Path, metavar="PNG", help="write the Bland-Altman plot here")


def _main(cfg: Config, args: argparse.Namespace) -> int:
    import cv2

    from caired.evaluate import as_json, bland_altman, collect, metrics, table

    rows = collect(args.inputs)
    figures = metrics(rows)
    if args.json:
        print(json.dumps(as_json(rows, figures), indent=2))
    else:
        print(table(rows, figures))
    if args.plot is not None and figures.get("n"):
        ok, png = cv2.imencode(".png", bland_altman(rows))
        if not ok:
            print(f"caired evaluate: cannot encode {args.plot}", file=sys.stderr)
            return int(ExitCode.CANT_CREATE)
        try:
            args.plot.write_bytes(png.tobytes())
        except OSError as exc:
            print(f"caired evaluate: cannot write {args.plot}: {exc.strerror or exc}", file=sys.stderr)
            return int(ExitCode.CANT_CREATE)
    if not figures.get("n"):
        print(f"caired evaluate: no session with both a backend HR and a reference HR among {len(rows)}",
              file=sys.stderr)
        return int(ExitCode.NO_INPUT)
    return 0
