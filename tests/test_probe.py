"""caired check-config --connect against the local backend: accepted, key rejected, wrong path,
down, unresolvable, and TLS with a certificate nobody trusts; never a frame sent."""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import pytest
import trio
import trio_websocket

from tests.conftest import SECRET_KEY, BackendFactory, cli_env, free_port, run_cli


def config(tmp_path: Path, url: str, key: str = SECRET_KEY) -> Path:
    path = tmp_path / "caired.toml"
    path.write_text(f'[backend]\nurl = "{url}"\napi_key = "{key}"\nconnect_timeout = 5.0\n'
                    f'[spool]\ndir = "{tmp_path / "spool"}"\n')
    path.chmod(0o600)
    return path


async def check(tmp_path: Path, url: str, key: str = SECRET_KEY) -> tuple[int, list[str], list[str]]:
    done = await run_cli("check-config", "--connect", "--config", str(config(tmp_path, url, key)), env=cli_env())
    out = done.stdout.decode().splitlines()
    return done.returncode, [line for line in out if line.startswith("backend:")], done.stderr.decode().splitlines()


async def test_an_accepted_key_connects_closes_cleanly_and_sends_no_frame(
    backend: BackendFactory, tmp_path: Path
) -> None:
    state = await backend(api_key=SECRET_KEY)
    code, said, err = await check(tmp_path, f"ws://127.0.0.1:{state.port}/ws/")

    assert (code, err) == (0, [])
    [line] = said
    assert line.startswith(f"backend: connected to ws://127.0.0.1:{state.port}/ws/?client=caired&api_key=***: "
                           "handshake accepted in ")
    assert line.endswith(" s, closed cleanly (1000), no frame sent")
    [seen] = state.sessions
    assert (seen.frames, seen.end, seen.close_code) == ([], None, 1000)
    assert SECRET_KEY not in line


async def test_a_rejected_key_exits_77_in_one_line(backend: BackendFactory, tmp_path: Path) -> None:
    state = await backend(api_key=SECRET_KEY)
    code, said, err = await check(tmp_path, f"ws://127.0.0.1:{state.port}/ws/", key="wrong-key")
    assert (code, said) == (77, [])
    assert err == [f"caired check-config: backend: the backend rejected the connection (HTTP 403) at "
                   f"ws://127.0.0.1:{state.port}/ws/?client=caired&api_key=***: check the API key"]
    assert not state.sessions


async def test_a_wrong_path_is_told_apart_from_a_key(backend: BackendFactory, tmp_path: Path) -> None:
    state = await backend(api_key=SECRET_KEY)
    code, said, err = await check(tmp_path, f"ws://127.0.0.1:{state.port}/api/")
    assert (code, said) == (78, [])
    assert "does not end in /ws/" in err[0]  # check-config's own warning, before the connection
    assert err[1:] == ["caired check-config: backend: the backend closed with 1008 (Invalid path): check the URL's "
                       "path (the backend's is /ws/)"]
    assert [s.frames for s in state.sessions] == [[]]


async def test_a_backend_that_is_down_or_unresolvable_exits_69(tmp_path: Path) -> None:
    port = free_port()
    code, said, err = await check(tmp_path, f"ws://127.0.0.1:{port}/ws/")
    assert (code, said) == (69, [])
    assert err == [f"caired check-config: backend: TCP: ws://127.0.0.1:{port}/ws/?client=caired&api_key=*** "
                   "refused the connection: nothing listens there"]

    code, said, err = await check(tmp_path, "ws://no-such-host.invalid:8003/ws/")
    assert (code, said) == (69, [])
    assert len(err) == 1 and err[0].startswith("caired check-config: backend: DNS: cannot resolve the host of "
                                                "ws://no-such-host.invalid:8003/ws/")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the self-signed certificate")
async def test_tls_with_a_self_signed_certificate_is_refused(tmp_path: Path, nursery: trio.Nursery) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    await trio.run_process(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_stdout=True, capture_stderr=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    reached: list[str] = []

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        reached.append(request.path)
        await request.reject(500)

    server = await nursery.start(lambda task_status: trio_websocket.serve_websocket(
        handler, "127.0.0.1", 0, ssl_context=context, task_status=task_status))
    code, said, err = await check(tmp_path, f"wss://127.0.0.1:{server.port}/ws/")

    assert (code, said, reached) == (69, [], [])
    assert len(err) == 1
    assert err[0].startswith(f"caired check-config: backend: TLS: the certificate of wss://127.0.0.1:{server.port}"
                             "/ws/?client=caired&api_key=*** is not trusted (self-signed certificate)")
