"""Configuration reload without a restart: SIGHUP or `POST /-/reload`, as Prometheus does.

A restart loses what the daemon has counted: the apps' aggregated counters (their departed
processes' totals live only here), each target's load counters, and every connection. So
the configuration is cut into parts that are built, and replaced, together: each database
target (its connection and sources), ingest, and the AWS sources. A reload re-reads the file
and compares each part's slice of it with the one it runs on:

- an equal slice keeps its part exactly as it runs: connection, counters, health;
- a changed slice replaces the part (its series start over, as after a restart), unless the
  part takes the change in place: ingest does, so a new token, cap or `stale_after` keeps
  the apps' counters;
- a slice that is gone stops its part, and its series leave /metrics.

A file that does not load, or a part that cannot be built, changes nothing: the daemon keeps
running on the configuration it had, logs why (the file, the line and the key) and sets
`pgpressure_config_last_reload_successful` to 0, as Prometheus does for its own file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter import metrics as m
from exporter.config import Config, ConfigError, load
from exporter.core.runner import SourceRunner
from exporter.core.source import Source
from exporter.core.store import Store
from exporter.logs import kv
from exporter.metrics import Sample
from exporter.postgres.connection import TargetConnection

log = logging.getLogger("pgpressure.reload")


@dataclass(eq=False)
class Part:
    """Sources built from one slice of the configuration, started and stopped together."""

    slice: object  # the part of the configuration it was built from; compared by value
    sources: list[Source]
    connections: list[TargetConnection] = field(default_factory=list)
    # Takes a changed slice in place, keeping the part's state; None: the part is rebuilt.
    update: Callable[[Any], None] | None = None
    runners: list[SourceRunner] = field(default_factory=list)  # set when it starts


# Builds the part of a key from its slice; the sources of the parts before it are given (the
# AWS sources hand what they learn to their targets' activity sources).
Build = Callable[[str, Any, list[Source]], Part]


@dataclass
class Plan:
    """What a new configuration changes, decided (and new parts built) before anything runs."""

    parts: dict[str, Part]  # every part of the new configuration, in its order
    start: list[Part]  # built, not running yet
    stop: dict[str, Part]  # running parts the new configuration replaces or drops
    updates: list[tuple[str, Part, object]]  # kept parts and the slice they take in place

    def summary(self) -> dict[str, str]:
        """The log fields: which parts started, stopped, were replaced or updated."""
        started = [k for k, p in self.parts.items() if p in self.start]
        replaced = [k for k in started if k in self.stop]
        fields = {
            "started": [k for k in started if k not in replaced],
            "stopped": [k for k in self.stop if k not in self.parts],
            "replaced": replaced,
            "updated": [k for k, _, _ in self.updates],
        }
        return {name: ",".join(keys) for name, keys in fields.items() if keys}


def plan(running: dict[str, Part], slices: dict[str, object], build: Build) -> Plan:
    """Compare each slice of the new configuration with the running part of its key; build
    what is new or changed. Raises whatever building raises, before anything has changed."""
    parts: dict[str, Part] = {}
    start: list[Part] = []
    updates: list[tuple[str, Part, object]] = []
    for key, new in slices.items():
        old = running.get(key)
        if old is not None and old.slice == new:
            parts[key] = old
        elif old is not None and old.update is not None:
            parts[key] = old
            updates.append((key, old, new))
        else:
            sources = [s for p in parts.values() for s in p.sources]
            parts[key] = build(key, new, sources)
            start.append(parts[key])
    stop = {k: p for k, p in running.items() if parts.get(k) is not p}
    return Plan(parts, start, stop, updates)


class ReloadStatus:
    """The outcome of the last load of the configuration file, as Prometheus exports its own
    (`prometheus_config_last_reload_successful` and `..._success_timestamp_seconds`)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.successful = True  # the daemon only starts on a configuration that loaded
        self.success_timestamp = time.time()

    def succeeded(self) -> None:
        self.successful = True
        self.success_timestamp = time.time()
        self.store.touch()  # the exposition changed: the renderer must not reuse its last one

    def failed(self) -> None:
        self.successful = False
        self.store.touch()

    def samples(self) -> list[Sample]:
        return [
            Sample(m.CONFIG_LAST_RELOAD_SUCCESSFUL, (), 1.0 if self.successful else 0.0),
            Sample(m.CONFIG_LAST_RELOAD_SUCCESS, (), self.success_timestamp),
        ]


class Reloader:
    """Re-reads the configuration file and has the daemon apply it, one reload at a time
    (a SIGHUP and a POST can arrive together)."""

    def __init__(
        self,
        path: str | Path | None,
        prepare: Callable[[Config], Plan],
        commit: Callable[[Config, Plan], Awaitable[None]],
        status: ReloadStatus,
    ) -> None:
        self.path = path
        self.prepare = prepare  # may raise; nothing has changed yet
        self.commit = commit  # does not raise: stops, updates, starts
        self.status = status
        self._lock = asyncio.Lock()

    async def reload(self) -> str | None:
        """None when the file was loaded and applied, else why not (the configuration in use
        is kept). The reason names the file, the line and the key, as `check-config` does."""
        async with self._lock:
            try:
                if self.path is None:
                    raise ConfigError("the configuration was not read from a file")
                config = load(self.path)
                change = self.prepare(config)
            except ConfigError as exc:
                return self._failed(str(exc))
            except Exception as exc:  # building a source failed: keep what runs
                return self._failed(f"{self.path}: cannot apply: {exc}")
            await self.commit(config, change)
            self.status.succeeded()
            changes = change.summary() or {"changed": "nothing"}
            log.info("configuration reloaded", extra=kv(file=str(self.path), **changes))
            return None

    def _failed(self, reason: str) -> str:
        self.status.failed()
        log.error(
            "configuration not reloaded, keeping the previous one",
            extra=kv(file=str(self.path), err=reason.replace("\n", "; ")),
        )
        return reason
