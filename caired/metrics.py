"""Prometheus metrics: a text file for node_exporter, and an optional HTTP endpoint with /health.

The numbers come from where the daemon keeps them (``Stats``, ``Sessions``, the ``Gate``)
and from the spool (folders by state, disk free), which is looked at in a worker thread
before each export; the text itself is made by ``prometheus_client`` in the trio thread,
where the numbers change, so one export is one consistent picture.

* ``[metrics] textfile``: rewritten every ``interval`` seconds with
  ``fsops.write_bytes_atomic`` (a temporary file, fsync, rename), so node_exporter's
  textfile collector never reads half a file; mode 0644, for node_exporter's user.
* ``[metrics] listen = "127.0.0.1:9731"``: a small HTTP/1.1 server inside the trio
  program. ``GET /metrics`` gives the same text; ``GET /health`` is 200 while the event
  loop answers and the backend is not known to reject the key (or path), 503 otherwise.
  Being served by the event loop itself, /health stops answering when the loop is stuck.
  Requests are bounded (8 KiB of head, 10 s), one per connection.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import attrs
import structlog
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from caired import __version__, fsops
from caired.config import MetricsConfig, listen_address
from caired.errors import ConfigError
from caired.lifecycle import Context
from caired.queue import count_held
from caired.stats import DURATION_BUCKETS

log = structlog.get_logger()

HEAD_LIMIT: Final = 8192  # bytes of request line and headers
REQUEST_TIMEOUT: Final = 10.0
MAX_CONNECTIONS: Final = 8  # scrapers at once; more are closed at once
BACKEND_STATES: Final = ("unknown", "up", "down", "rejected")
ROOM_STATES: Final = ("incoming", "held", "active", "done", "failed")
# The classic text format, which every Prometheus and node_exporter reads: caired's names need no escaping.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


@attrs.define
class SpoolView:
    """What the spool looked like at the last look (filled in a worker thread)."""

    folders: dict[str, int] = attrs.field(factory=dict)
    free_bytes: float = math.nan

    def refresh(self, ctx: Context) -> None:
        counts = ctx.spool.counts()
        held = count_held(ctx.spool.root)
        counts["incoming"] = max(0, counts.get("incoming", 0) - held)
        counts["held"] = held
        try:
            st = os.statvfs(ctx.spool.root)
            free = float(st.f_bavail * st.f_frsize)
        except OSError:
            free = math.nan
        self.folders, self.free_bytes = counts, free


class _Collector:
    """The daemon's numbers as metric families, read at each export."""

    def __init__(self, ctx: Context, view: SpoolView) -> None:
        self._ctx = ctx
        self._view = view

    def collect(self) -> Iterator[Metric]:
        ctx, stats, gate = self._ctx, self._ctx.stats, self._ctx.gate
        info = InfoMetricFamily("caired_build", "caired's version")
        info.add_metric([], {"version": __version__})
        yield info

        folders = GaugeMetricFamily("caired_spool_folders", "folders in the spool by state (held: incoming/ on hold)",
                                    labels=["state"])
        for state in ROOM_STATES:
            folders.add_metric([state], self._view.folders.get(state, 0))
        yield folders
        yield GaugeMetricFamily("caired_spool_free_bytes", "bytes free for caired on the spool's filesystem",
                                value=self._view.free_bytes)

        yield GaugeMetricFamily("caired_sessions_in_flight", "sessions streaming now",
                                value=len(ctx.sessions.in_flight))
        sessions = CounterMetricFamily("caired_sessions", "sessions ended, by outcome (done, failed, stored)",
                                       labels=["outcome"])
        for outcome in ("done", "failed", "stored"):
            sessions.add_metric([outcome], stats.sessions[outcome])
        yield sessions
        failures = CounterMetricFamily("caired_session_failures", "sessions filed in failed/, by error type",
                                       labels=["error_type"])
        for error_type, count in sorted(stats.session_failures.items()):
            failures.add_metric([error_type], count)
        yield failures

        yield CounterMetricFamily("caired_attempts", "connection attempts (one per try of a session)",
                                  value=gate.handshakes)
        attempt_failures = CounterMetricFamily("caired_attempt_failures", "failed attempts, by reason",
                                               labels=["reason"])
        for reason, count in sorted(stats.attempt_failures.items()):
            attempt_failures.add_metric([reason], count)
        yield attempt_failures
        retries = CounterMetricFamily("caired_retries", "failed attempts tried again, by reason", labels=["reason"])
        for reason, count in sorted(stats.retries.items()):
            retries.add_metric([reason], count)
        yield retries

        backend = GaugeMetricFamily("caired_backend_state", "1 for the backend's state as this process sees it",
                                    labels=["state"])
        for state in BACKEND_STATES:
            backend.add_metric([state], 1.0 if gate.state == state else 0.0)
        yield backend
        yield GaugeMetricFamily("caired_backend_consecutive_failures", "failed attempts since the last success",
                                value=gate.failures)

        yield CounterMetricFamily("caired_frames_sent", "frames sent (every attempt)", value=stats.frames_sent)
        yield CounterMetricFamily("caired_frames_skipped", "frames skipped as unreadable", value=stats.frames_skipped)
        yield CounterMetricFamily("caired_live_frames_dropped", "camera frames dropped from the live stream "
                                  "(still recorded)", value=stats.live_dropped)
        yield CounterMetricFamily("caired_bytes_sent", "bytes of messages sent", value=stats.bytes_sent)
        answers = CounterMetricFamily("caired_answers", "answers received, by kind (hr: with a heart rate; warmup: "
                                      "hr -1 or missing; other: no JSON object)", labels=["kind"])
        answers.add_metric(["hr"], stats.answers_with_hr)
        answers.add_metric(["warmup"], stats.answers_warmup)
        answers.add_metric(["other"], stats.answers - stats.answers_with_hr - stats.answers_warmup)
        yield answers

        yield GaugeMetricFamily("caired_last_success_timestamp_seconds", "UNIX time of the last finished session "
                                "(0: none since the start)", value=stats.last_success)
        yield GaugeMetricFamily("caired_last_hr_bpm", "heart rate of the last finished session (NaN: none yet)",
                                value=stats.last_hr if stats.last_hr is not None else math.nan)
        cumulative, buckets = 0, []
        for bound, count in zip(DURATION_BUCKETS, stats.duration_counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if math.isinf(bound) else f"{bound:g}", cumulative))
        yield HistogramMetricFamily("caired_session_duration_seconds", "seconds from claim to filing, per session",
                                    buckets=buckets, sum_value=stats.duration_sum)

        reloads = CounterMetricFamily("caired_config_reloads", "SIGHUP reloads, by result", labels=["result"])
        for result in ("ok", "failed"):
            reloads.add_metric([result], stats.reloads[result])
        yield reloads
        yield GaugeMetricFamily("caired_config_last_reload_successful", "1 if the last reload was applied",
                                value=1.0 if stats.last_reload_ok else 0.0)


@attrs.define
class Exporter:
    """The registry and the spool view of one daemon."""

    ctx: Context
    view: SpoolView = attrs.field(factory=SpoolView)
    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)

    def __attrs_post_init__(self) -> None:
        self.registry.register(_Collector(self.ctx, self.view))
        self.registry.register(ProcessCollector(registry=None))

    async def text(self) -> bytes:
        """The metrics now, in Prometheus's text format."""
        await trio.to_thread.run_sync(self.view.refresh, self.ctx, abandon_on_cancel=True)
        return generate_latest(self.registry)

    def health(self) -> tuple[int, dict[str, str]]:
        state = self.ctx.gate.state
        if state == "rejected":
            return 503, {"status": "failing", "backend": state,
                         "reason": "the backend rejects the API key or the URL's path; see the log"}
        return 200, {"status": "ok", "backend": state}


async def open_metrics_listeners(cfg: MetricsConfig) -> list[trio.SocketListener]:
    """The sockets of ``[metrics] listen`` (none when it is empty), opened before the daemon
    starts so that a port in use stops it with one line (ConfigError, exit 78)."""
    if not cfg.listen:
        return []
    host, port = listen_address(cfg.listen)
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ConfigError("metrics.listen", "", f"cannot listen on {cfg.listen}: {exc.strerror or exc}") from None


async def serve_metrics(
    ctx: Context, listeners: list[trio.SocketListener], *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The text file and the HTTP endpoint on ``listeners``, as ``[metrics]`` asks; runs until cancelled."""
    cfg = ctx.cfg.metrics
    exporter = Exporter(ctx)
    async with trio.open_nursery() as nursery:
        if listeners:
            log.info("metrics_listening", address=cfg.listen)
            slots = trio.Semaphore(MAX_CONNECTIONS)  # a local flood cannot take the sessions' descriptors
            nursery.start_soon(trio.serve_listeners, lambda stream: _handle(stream, exporter, slots), listeners)
        if cfg.textfile:
            nursery.start_soon(_write_textfile, exporter, Path(cfg.textfile), cfg.interval)
        task_status.started()


async def _write_textfile(exporter: Exporter, path: Path, interval: float) -> None:
    failing: str | None = None
    while True:
        try:
            data = await exporter.text()
            await trio.to_thread.run_sync(functools.partial(fsops.write_bytes_atomic, path, data, mode=0o644),
                                          abandon_on_cancel=True)
        except Exception as exc:  # metrics never end the daemon: a full disk, or a bug in a collector
            reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
            if reason != failing:
                log.warning("metrics_textfile_failed", path=str(path), reason=reason, error_type=type(exc).__name__)
            failing = reason
        else:
            failing = None
        await trio.sleep(interval)


async def _handle(stream: trio.SocketStream, exporter: Exporter, slots: trio.Semaphore) -> None:
    """One request, one answer, then the connection closes. A connection past MAX_CONNECTIONS
    is closed at once; a request that makes the exporter fail gets 500, never ends the daemon."""
    async with stream:
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            return
        try:
            await _handle_one(stream, exporter)
        finally:
            slots.release()


async def _handle_one(stream: trio.SocketStream, exporter: Exporter) -> None:
    with trio.move_on_after(REQUEST_TIMEOUT):
        try:
            head = await _read_head(stream)
            try:
                status, content_type, body = await _answer(head, exporter)
            except Exception as exc:
                log.error("internal_error", where="metrics endpoint", error_type=type(exc).__name__,
                          reason=str(exc), exc_info=True)
                status, content_type, body = 500, "text/plain; charset=utf-8", b"internal error\n"
            await stream.send_all(
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("ascii")
                + (b"" if head.startswith(b"HEAD ") else body)
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return


_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                   431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


async def _read_head(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > HEAD_LIMIT:
            return b"TOO LARGE"
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data


async def _answer(head: bytes, exporter: Exporter) -> tuple[int, str, bytes]:
    if head == b"TOO LARGE":
        return 431, "text/plain", b"request head too large\n"
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return 400, "text/plain", b"bad request\n"
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return 405, "text/plain", b"GET only\n"
    if target == b"/metrics":
        return 200, CONTENT_TYPE, await exporter.text()
    if target == b"/health":
        status, body = exporter.health()
        return status, "application/json", (json.dumps(body) + "\n").encode()
    if target == b"/":
        return 200, "text/plain", b"caired: /metrics (Prometheus), /health\n"
    return 404, "text/plain", b"not found: try /metrics or /health\n"
