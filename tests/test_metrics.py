"""Metrics scraped over HTTP with a real client and parsed with prometheus_client's parser, checked
against what the backend saw; /health; the text file's atomic replacement."""

from __future__ import annotations

import json
import os
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from caired import queue
from caired.config import listen_address
from caired.errors import ConfigError
from caired.metrics import open_metrics_listeners
from tests.conftest import SECRET_KEY, BackendFactory, free_port
from tests.test_daemon import daemon_config, drop, names_in, running, until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def get(port: int, path: str) -> tuple[int, str, str]:
    """A real HTTP client (urllib), in a worker thread."""

    def fetch() -> tuple[int, str, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
                return reply.status, reply.headers["Content-Type"], reply.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.headers["Content-Type"], err.read().decode()

    return await trio.to_thread.run_sync(fetch)


async def test_metrics_over_http_agree_with_what_happened(
    backend: BackendFactory, tmp_path: Path
) -> None:
    state = await backend(api_key=SECRET_KEY, ok_every=3, estimate=False)  # HR 72 in every answer
    spool, port, started = tmp_path / "spool", free_port(), time.time()
    drop(spool, "a", 0, 8)
    drop(spool, "b", 1, 9)
    bad = spool / "incoming" / "bad"
    bad.mkdir()
    (bad / f"{1747154380.0:.7f}.png").write_bytes(b"not a png at all")
    (bad / ".ready").touch()
    cfg = daemon_config(state.port, spool, CAIRED_METRICS_LISTEN=f"127.0.0.1:{port}",
                        CAIRED_LOG_FILE=str(tmp_path / "caired.jsonl"))
    async with running(cfg):
        await until(lambda: len(names_in(spool, "done")) == 2 and names_in(spool, "failed") == ["bad"],
                    "two done, one failed")
        drop(spool, "later", 2, 4, age=None)
        await trio.to_thread.run_sync(queue.hold, spool, "later")
        status, content_type, text = await get(port, "/metrics")
        health = await get(port, "/health")
        missing = await get(port, "/nothing")

    assert status == 200 and content_type.startswith("text/plain; version=")
    m = parse(text)
    assert value(m, "caired_sessions_total", outcome="done") == 2
    assert value(m, "caired_sessions_total", outcome="failed") == 1
    assert value(m, "caired_session_failures_total", error_type="NoFramesError") == 1
    assert value(m, "caired_attempts_total") == len(state.sessions) == 2
    assert value(m, "caired_frames_sent_total") == sum(len(s.frames) for s in state.sessions) == 17
    answers = sum(len(s.answers) for s in state.sessions)
    kinds = [value(m, "caired_answers_total", kind=k) for k in ("hr", "warmup", "other")]
    assert kinds == [answers, 0, 0]
    assert value(m, "caired_bytes_sent_total") > 17 * 100
    assert value(m, "caired_backend_state", state="up") == 1 and value(m, "caired_backend_state", state="down") == 0
    assert started <= value(m, "caired_last_success_timestamp_seconds") <= time.time()
    assert value(m, "caired_last_hr_bpm") == 72
    assert value(m, "caired_spool_folders", state="done") == 2
    assert value(m, "caired_spool_folders", state="failed") == 1
    assert value(m, "caired_spool_folders", state="held") == 1
    assert value(m, "caired_spool_folders", state="incoming") == 0
    assert value(m, "caired_spool_free_bytes") > 0
    assert value(m, "caired_session_duration_seconds_count") == 3
    assert value(m, "caired_session_duration_seconds_bucket", le="+Inf") == 3
    assert value(m, "caired_sessions_in_flight") == 0
    assert value(m, "process_start_time_seconds") > 0

    assert health == (200, "application/json", json.dumps({"status": "ok", "backend": "up"}) + "\n")
    assert missing[0] == 404


async def test_health_fails_while_the_backend_rejects_the_key(backend: BackendFactory, tmp_path: Path) -> None:
    state = await backend(api_key=SECRET_KEY)
    spool, port = tmp_path / "spool", free_port()
    drop(spool, "a", 0, 4)
    cfg = daemon_config(state.port, spool, API_KEY="not-the-key", CAIRED_METRICS_LISTEN=f"127.0.0.1:{port}",
                        CAIRED_LOG_FILE=str(tmp_path / "caired.jsonl"))
    async with running(cfg) as daemon:
        assert (await get(port, "/health"))[0] == 200  # unknown: not known to be rejected
        await until(lambda: daemon.gate.state == "rejected", "the key rejected")
        status, _, body = await get(port, "/health")
        _, _, text = await get(port, "/metrics")
    assert status == 503 and json.loads(body)["backend"] == "rejected"
    m = parse(text)
    assert value(m, "caired_backend_state", state="rejected") == 1
    assert value(m, "caired_attempt_failures_total", reason="key_rejected") == state.rejected >= 1
    assert value(m, "caired_retries_total", reason="key_rejected") == state.rejected  # kept, tried again later
    assert value(m, "caired_last_success_timestamp_seconds") == 0


async def test_the_textfile_is_replaced_whole_every_interval(backend: BackendFactory, tmp_path: Path) -> None:
    state = await backend(api_key=SECRET_KEY)
    spool, textfile = tmp_path / "spool", tmp_path / "textfile" / "caired.prom"
    textfile.parent.mkdir()
    drop(spool, "a", 0, 4)
    cfg = daemon_config(state.port, spool, CAIRED_METRICS_TEXTFILE=str(textfile), CAIRED_METRICS_INTERVAL="0.2",
                        CAIRED_LOG_FILE=str(tmp_path / "caired.jsonl"))
    async with running(cfg):
        await until(lambda: names_in(spool, "done") == ["a"], "the folder done")

        def done_counted() -> bool:
            return value(parse(textfile.read_text()), "caired_sessions_total", outcome="done") == 1

        await until(done_counted, "the session counted in the text file")
        first = os.stat(textfile).st_ino
        await until(lambda: os.stat(textfile).st_ino != first, "the next write")
    # Each write is a new file renamed over the old one: a reader has the old one or the new one, whole.
    assert os.stat(textfile).st_ino != first
    assert stat.S_IMODE(os.stat(textfile).st_mode) == 0o644  # node_exporter runs as another user
    assert os.listdir(textfile.parent) == ["caired.prom"]  # no temporary left behind
    assert value(parse(textfile.read_text()), "caired_frames_sent_total") == 4


@pytest.mark.parametrize("bad", ["9731", "localhost:", "localhost:99999", ":80"])
def test_a_listen_address_must_be_host_and_port(bad: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        listen_address(bad)
    assert listen_address("[::1]:9731") == ("::1", 9731)


async def test_a_port_in_use_is_one_configuration_error(tmp_path: Path) -> None:
    port = free_port()
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", port))
        taken.listen()
        cfg = daemon_config(1, tmp_path / "spool", CAIRED_METRICS_LISTEN=f"127.0.0.1:{port}")
        with pytest.raises(ConfigError, match=f"metrics.listen: cannot listen on 127.0.0.1:{port}: "):
            await open_metrics_listeners(cfg.metrics)


async def test_a_failing_exporter_answers_500_and_the_daemon_goes_on(
    backend: BackendFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from caired import metrics

    async def broken(self: metrics.Exporter) -> bytes:
        raise RuntimeError("a collector bug")

    monkeypatch.setattr(metrics.Exporter, "text", broken)
    state = await backend()
    spool, port = tmp_path / "spool", free_port()
    cfg = daemon_config(state.port, spool, CAIRED_METRICS_LISTEN=f"127.0.0.1:{port}",
                        CAIRED_METRICS_TEXTFILE=str(tmp_path / "caired.prom"))
    async with running(cfg):
        assert (await get(port, "/metrics"))[0] == 500
        drop(spool, "after", 1, 4)  # the daemon is still there
        await until(lambda: names_in(spool, "done") == ["after"], "a folder streamed after the failure")
