"""SIGHUP: reload the settings that can change under a running daemon.

What reloads: ``[backend]`` (URL, key, key file, credential, auth, timeouts), ``[retry]``
and ``[log] level``. The configuration is loaded again exactly as at start (same file,
environment and flags; the key file and the systemd credential are read anew) and
validated whole: a configuration that fails validation changes nothing, and one
``config_reload_failed`` line says why. Other sections need a restart: a change there is
named in ``config_reload_partial`` and otherwise ignored.

A connection that is open keeps the settings it opened with, so a session streaming
during a reload finishes as it started. Every later connection (the next session's, or
a retry of a session in flight) uses the new ones: a session waiting out a rejected key
or an unreachable URL is exactly what a reload is for. The log file is reopened on every
SIGHUP, whether the reload succeeds or not (logrotate sends one).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import attrs
import structlog
import trio

from caired import logging as clog
from caired.config import Config, iter_fields
from caired.errors import CairedError

log = structlog.get_logger()

RELOADABLE: Final = ("backend.", "retry.", "log.level")


@attrs.define
class Settings:
    """The daemon's configuration now; sessions read it when they start, connections when they open."""

    cfg: Config


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted keys whose effective value differs (the key compared revealed)."""
    keys = []
    for key, _, _ in iter_fields():
        section, name = key.split(".", 1)
        before, after = getattr(getattr(old, section), name), getattr(getattr(new, section), name)
        if str.__eq__(before, after) if isinstance(before, str) and isinstance(after, str) else before == after:
            continue
        keys.append(key)
    return keys


def merged(old: Config, new: Config) -> Config:
    """``old`` with the reloadable parts of ``new``."""
    sources = dict(old.sources)
    for key in new.sources:
        if key.startswith(RELOADABLE):
            sources[key] = new.sources[key]
    return attrs.evolve(old, backend=new.backend, retry=new.retry, log=attrs.evolve(old.log, level=new.log.level),
                        sources=sources)


async def reload(settings: Settings, load: Callable[[], Config]) -> list[str] | None:
    """Load the configuration again (in a worker thread: it reads files) and apply what may
    change; the keys changed, or None when the new configuration is invalid (then nothing changed)."""
    old = settings.cfg
    try:
        new = await trio.to_thread.run_sync(load, abandon_on_cancel=True)
    except Exception as err:  # a config error, or anything reading the files raised: keep what runs
        reasons = str(err).splitlines() or [type(err).__name__]
        log.error("config_reload_failed", reason="; ".join(reasons), kept="the configuration in use",
                  error_type=type(err).__name__)
        return None
    changed = changed_keys(old, new)
    applied = [k for k in changed if k.startswith(RELOADABLE)]
    ignored = [k for k in changed if not k.startswith(RELOADABLE)]
    if ignored:
        log.warning("config_reload_partial", needs_restart=ignored, reason="these keys change only on a restart")
    log.info("config_reloaded", changed=applied)  # said at the level in force until now: a new one may hide it
    candidate = merged(old, new)
    try:
        # The new key is redacted from now on; the old one too, for connections still using it.
        clog.reconfigure(candidate, secrets=(old.api_key(),))
    except CairedError as err:  # the new log file cannot be opened: nothing is applied
        log.error("config_reload_failed", reason=str(err), kept="the configuration in use")
        return None
    settings.cfg = candidate
    return applied
