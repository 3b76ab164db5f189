"""``caired backend``: the local backend, for development, tests and the demo."""

from __future__ import annotations

import argparse

import trio

from caired.cli import add_common, command
from caired.config import Config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = command(
        sub,
        "backend",
        _main,
        help="run the local backend (protocol checks, rPPG estimate, faults)",
        description="""
            Run a local stand-in for the Caire backend, for development, tests and the demo. It
            checks every message against the streaming protocol and closes on a violation, saying
            which; it answers 'ok' every N frames, with the rPPG window when asked, and 'finished'
            after the end message, with a heart rate estimated from the frames it received. Fault
            injection makes it refuse handshakes, drop or close connections, withhold 'finished' or
            send garbage, to see how a client copes. It runs until Ctrl-C.
        """,
        examples=[
            "caired backend --port 8003",
            "caired backend --api-key test-key --refuse 2 --drop-after 50",
        ],
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8003, help="0 picks a free port (default 8003)")
    p.add_argument("--api-key", default="", metavar="KEY", help="require this key (HTTP 403 otherwise)")
    p.add_argument("--ok-every", type=int, default=15, metavar="N", help="an 'ok' answer every N frames")
    p.add_argument("--no-estimate", dest="estimate", action="store_false",
                   help="answer a constant HR instead of estimating it from the frames")
    p.add_argument("--no-validate", dest="validate", action="store_false",
                   help="skip decoding and checking frames (throughput benchmarks only)")
    faults = p.add_argument_group("fault injection")
    faults.add_argument("--refuse", type=int, default=0, metavar="N", help="refuse the first N handshakes (HTTP 503)")
    faults.add_argument("--drop-after", type=int, default=0, metavar="N",
                        help="drop the connection after N frames (no close frame)")
    faults.add_argument("--drop-times", type=int, default=1, metavar="N", help="... on the first N connections")
    faults.add_argument("--close-after", type=int, default=0, metavar="N", help="close after N frames ...")
    faults.add_argument("--close-code", type=_close_code, default=1011, metavar="CODE",
                        help="... with this code (1009: message too big; 4000-4999: the application's own)")
    faults.add_argument("--withhold-finished", type=int, default=0, metavar="N",
                        help="never answer 'finished' to the first N sessions")
    faults.add_argument("--garbage-every", type=int, default=0, metavar="N",
                        help="send a non-JSON and a binary message every N frames")
    faults.add_argument("--binary-every", type=int, default=0, metavar="N", help="send a binary message every N frames")
    faults.add_argument("--finished-twice", action="store_true", help="send 'finished' twice before closing")
    faults.add_argument("--deep-nesting", type=int, default=0, metavar="N",
                        help="send a message nested N arrays deep (after --hostile-after frames)")
    faults.add_argument("--huge-message", type=int, default=0, metavar="BYTES", help="send a message of BYTES bytes")
    faults.add_argument("--flood", type=int, default=0, metavar="N", help="send N 'ok' messages in one burst")
    faults.add_argument("--invalid-utf8", action="store_true", help="send a text message that is not UTF-8")
    faults.add_argument("--hostile-after", type=int, default=1, metavar="N",
                        help="the four messages above go out after N frames ...")
    faults.add_argument("--hostile-times", type=int, default=1, metavar="N", help="... on the first N connections")
    add_common(p)


def _main(cfg: Config, args: argparse.Namespace) -> int:
    from caired.emulator.server import KEEP_SESSIONS, BackendOptions, BackendState, Faults, serve_backend

    options = BackendOptions(
        api_key=args.api_key,
        ok_every=args.ok_every,
        estimate=args.estimate,
        validate=args.validate,
        faults=Faults(
            refuse_handshakes=args.refuse,
            drop_after=args.drop_after,
            drop_times=args.drop_times,
            close_after=args.close_after,
            close_code=args.close_code,
            withhold_finished=args.withhold_finished,
            garbage_every=args.garbage_every,
            binary_every=args.binary_every,
            finished_twice=args.finished_twice,
            deep_nesting=args.deep_nesting,
            huge_message=args.huge_message,
            flood=args.flood,
            invalid_utf8=args.invalid_utf8,
            hostile_after=args.hostile_after,
            hostile_times=args.hostile_times,
        ),
    )
    state = BackendState(keep=KEEP_SESSIONS)  # it runs until stopped: what it saw must not grow with it
    trio.run(lambda: serve_backend(options, host=args.host, port=args.port, state=state))
    return 0


def _close_code(text: str) -> int:
    """A code a close frame may carry (RFC 6455 7.4): 1000-1003, 1007-1014, 3000-4999."""
    try:
        code = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a close code: {text!r}") from None
    if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999):
        raise argparse.ArgumentTypeError(f"{code} cannot be sent in a close frame (1000-1003, 1007-1014, 3000-4999)")
    return code
