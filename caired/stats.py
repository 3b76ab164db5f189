"""What this process did since it started, counted where it happens; ``metrics.py`` exports it.

Plain numbers in the trio thread, no library and no locks: sessions, failed attempts by
reason, frames, bytes and answers, the last success and HR, session durations in fixed
buckets, reloads (attempts themselves are the Gate's ``handshakes``). Reading them from the
trio thread (a scrape, the text file writer) sees a consistent picture; nothing here blocks.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import Final

import attrs

from caired.errors import BackendUnavailable, FinishTimeout, KeyRejected, SessionError, WrongPath

# Seconds: a session is one to a few minutes of frames; retries and outages stretch it.
DURATION_BUCKETS: Final = (5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0, 600.0, 1800.0, math.inf)


def failure_reason(err: SessionError) -> str:
    """A short, bounded label for why an attempt failed."""
    if isinstance(err, WrongPath):
        return "wrong_path"
    if isinstance(err, KeyRejected):
        return "key_rejected"
    if isinstance(err, BackendUnavailable):
        return "unavailable"
    if isinstance(err, FinishTimeout):
        return "finish_timeout"
    if err.close_code is not None:
        return f"closed_{err.close_code}"
    return "connection_lost"


@attrs.define
class Stats:
    attempt_failures: Counter[str] = attrs.field(factory=Counter)  # by failure_reason
    retries: Counter[str] = attrs.field(factory=Counter)  # failed attempts tried again, by failure_reason
    frames_sent: int = 0
    frames_skipped: int = 0
    bytes_sent: int = 0
    answers: int = 0
    answers_with_hr: int = 0
    answers_warmup: int = 0  # JSON answers whose hr is -1 or missing: the model warming up
    live_dropped: int = 0
    sessions: Counter[str] = attrs.field(factory=Counter)  # by outcome: done, failed, stored
    session_failures: Counter[str] = attrs.field(factory=Counter)  # by error type
    last_success: float = 0.0  # UNIX time of the last session that got 'finished'; 0: none yet
    last_hr: float | None = None
    duration_counts: list[int] = attrs.field(factory=lambda: [0] * len(DURATION_BUCKETS))
    duration_sum: float = 0.0
    reloads: Counter[str] = attrs.field(factory=Counter)  # ok, failed
    last_reload_ok: bool = True
    started_at: float = attrs.field(factory=time.time)

    def attempt_failed(self, err: SessionError, *, retried: bool) -> None:
        reason = failure_reason(err)
        self.attempt_failures[reason] += 1
        if retried:
            self.retries[reason] += 1

    def succeeded(self, hr: float | None) -> None:
        self.last_success = time.time()
        if hr is not None:
            self.last_hr = hr

    def session_ended(self, outcome: str | None, *, error_type: str | None, seconds: float) -> None:
        """A session left active/: done, failed (``error_type`` says why), stored, or None (put back)."""
        if outcome is None:
            return
        self.sessions[outcome] += 1
        if outcome == "failed":
            self.session_failures[error_type or "unknown"] += 1
        for i, bound in enumerate(DURATION_BUCKETS):
            if seconds <= bound:
                self.duration_counts[i] += 1
                break
        self.duration_sum += seconds

    def reloaded(self, ok: bool) -> None:
        self.reloads["ok" if ok else "failed"] += 1
        self.last_reload_ok = ok
