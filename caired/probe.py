"""``caired check-config --connect``: one real session handshake, closed cleanly, no frame sent.

It goes up the layers one at a time, so a failure names its layer: the host is resolved
(DNS), a TCP connection opened and, for ``wss://``, the TLS handshake done with the
system's trust store (trio-websocket would report a certificate it refuses as a
connect timeout); then the WebSocket handshake is made as a session makes it (the
configured URL, key, auth and timeouts), a moment is left for the close with 1008 by
which the backend refuses a key or a path right after the handshake, and the
connection is closed with 1000. Each failure is one line: DNS, TCP, TLS, the HTTP status
of the handshake, or the close code.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from typing import Final
from urllib.parse import urlsplit

import trio
import trio_websocket

from caired.config import BackendConfig
from caired.errors import BackendUnavailable, SessionError
from caired.uplink import classify_closed, connect, endpoint

LINGER: Final = 1.0  # seconds to wait for a close right after the handshake


async def probe(backend: BackendConfig) -> str:
    """What happened, as one line, when the handshake and a clean close succeeded; otherwise
    the SessionError (BackendUnavailable, KeyRejected, WrongPath...) with a one-line reason."""
    target = endpoint(backend).shown
    try:
        with trio.fail_after(backend.connect_timeout):
            await _transport(backend.url)
    except trio.TooSlowError:
        raise BackendUnavailable(f"TCP: no answer from {target} within {backend.connect_timeout:g} s",
                                 connected=False) from None
    except (OSError, trio.BrokenResourceError) as exc:
        raise BackendUnavailable(_layer(exc, target), connected=False) from None
    started = trio.current_time()
    try:
        async with connect(backend) as ws:
            handshake = trio.current_time() - started
            with trio.move_on_after(LINGER):
                try:
                    await ws.get_message()  # the backend says nothing before a frame: we wait for a close
                except trio_websocket.ConnectionClosed as exc:
                    raise classify_closed(exc.reason) from None
            await ws.aclose(1000)
    except BackendUnavailable as err:
        raise BackendUnavailable(_layer(err, target), connected=False) from None
    return f"connected to {target}: handshake accepted in {handshake:.2f} s, closed cleanly (1000), no frame sent"


async def _transport(url: str) -> None:
    """Resolve, connect and (wss) shake hands over TLS, then hang up: the layers below WebSocket."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if parts.scheme == "wss":
        tls = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl.create_default_context())
        async with tls:
            await tls.do_handshake()
    else:
        tcp = await trio.open_tcp_stream(host, port)
        await tcp.aclose()


def _layer(err: BaseException, target: str) -> str:
    """Name the layer that failed, from the exceptions behind ``err`` (trio reports every
    address it tried as a group behind one OSError)."""
    for cause in _causes(err):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (f"TLS: the certificate of {target} is not trusted ({cause.verify_message}); install the "
                    "issuing CA in the system's trust store")
        if isinstance(cause, ssl.SSLError):
            return f"TLS: the handshake with {target} failed ({cause.reason or cause})"
        if isinstance(cause, socket.gaierror):
            return f"DNS: cannot resolve the host of {target} ({cause.strerror})"
        if isinstance(cause, ConnectionRefusedError):
            return f"TCP: {target} refused the connection: nothing listens there"
        if isinstance(cause, OSError) and cause.strerror:
            return f"TCP: cannot reach {target} ({cause.strerror})"
    return err.reason if isinstance(err, SessionError) else f"cannot reach {target}: {err}"


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and everything behind it, depth first: causes, contexts, members of groups."""
    seen: set[int] = set()
    stack = [err]
    while stack:
        exc = stack.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        yield exc
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(reversed(exc.exceptions))
        for behind in (exc.__context__, exc.__cause__):
            if behind is not None:
                stack.append(behind)
