"""``caired run`` for the camera benchmark, optionally with recording switched off.

Usage: ``python benchmarks/camera_daemon.py [--no-record] RUN-ARGS...``. ``--no-record``
replaces the function the daemon's camera sessions write each frame with
(``write_frame``, a PNG, before they recorded JPEGs; ``write_encoded`` since) by one that
writes nothing, so the difference between the two runs is what recording costs (the
frame still counts as recorded, so sessions end as they would).
"""

from __future__ import annotations

import sys
from typing import Any

from caired import live
from caired.cli import main


def _write_nothing(*_args: Any, **_kwargs: Any) -> None:
    return None


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv and argv[0] == "--no-record":
        argv = argv[1:]
        for name in ("write_frame", "write_encoded"):
            if hasattr(live, name):
                setattr(live, name, _write_nothing)
    sys.exit(main(["run", *argv]))
