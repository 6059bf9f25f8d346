"""The in-memory snapshots that sources write and `/metrics` reads.

Sampling is decoupled from scraping: each source run replaces its snapshot as a whole (an
immutable tuple), so a scrape only reads references that are already complete and never
waits on PostgreSQL or AWS. Health is kept beside the snapshots because it must be visible
precisely when a source has nothing new to say.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from exporter.metrics import Sample

SourceKey = tuple[str, str]  # (source name, target name; "" for daemon-wide sources)


@dataclass(frozen=True, slots=True)
class Snapshot:
    samples: tuple[Sample, ...]
    scope: tuple[tuple[str, str], ...]  # labels added to every sample, e.g. (("target", "main"),)


@dataclass(slots=True)
class SourceHealth:
    up: bool = False
    last_success: float | None = None
    last_duration: float = 0.0
    errors_total: int = 0
    consecutive_failures: int = 0
    last_error: str = ""
    next_attempt: float = 0.0  # monotonic time before which a failing source is not retried


@dataclass
class Store:
    _snapshots: dict[SourceKey, Snapshot] = field(default_factory=dict)
    _health: dict[SourceKey, SourceHealth] = field(default_factory=dict)
    version: int = 0  # bumped on every write, lets the renderer reuse its last output

    def publish(
        self, key: SourceKey, samples: Iterable[Sample], scope: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._snapshots[key] = Snapshot(tuple(samples), scope)
        self.version += 1

    def keep_counters_only(self, key: SourceKey) -> None:
        """Drop a failed source's gauges (they describe a moment that has passed) but keep
        its counters, so rate() over the outage does not see a reset."""
        snap = self._snapshots.get(key)
        if snap is None:
            return
        kept = tuple(s for s in snap.samples if s.spec.kind != "gauge")
        self._snapshots[key] = Snapshot(kept, snap.scope)
        self.version += 1

    def forget(self, key: SourceKey) -> None:
        """A source that is gone (its target removed by a reload): its series and health go."""
        self._snapshots.pop(key, None)
        self._health.pop(key, None)
        self.version += 1

    def health(self, key: SourceKey) -> SourceHealth:
        h = self._health.get(key)
        if h is None:
            h = self._health[key] = SourceHealth()
            self.version += 1
        return h

    def touch(self) -> None:
        self.version += 1

    def snapshots(self) -> Iterator[tuple[SourceKey, Snapshot]]:
        return iter(list(self._snapshots.items()))

    def healths(self) -> Iterator[tuple[SourceKey, SourceHealth]]:
        return iter(list(self._health.items()))
