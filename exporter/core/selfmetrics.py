"""The exporter's own series: build info, every source's health, HTTP connections refused at the
cap or closed at the header deadline.

They describe the daemon rather than what it samples, so no source publishes them: they are
built at render time from the store's source health and the daemon's own counters. Keeping
them here, one hop from `exporter.metrics`, leaves the renderer free of metric names and the
store free of made-up source keys. (`pgpressure_reports_total` belongs to the ingest room,
which counts the reports it answers.)
"""

from __future__ import annotations

from exporter import __version__
from exporter import metrics as m
from exporter.core.store import Store
from exporter.metrics import Sample


class SelfMetrics:
    """Counts what only the daemon sees and turns it, with the store's health, into samples."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.http_connections_refused = 0
        self.http_header_timeouts = 0

    def connection_refused(self) -> None:
        """One HTTP connection closed at the cap (`CappedSite`'s `on_refused`)."""
        self.http_connections_refused += 1
        self.store.touch()  # the exposition changed: the renderer must not reuse its last one

    def header_timeout(self) -> None:
        """One HTTP connection closed because its request headers were not complete in time
        (`CappedSite`'s `on_header_timeout`)."""
        self.http_header_timeouts += 1
        self.store.touch()

    def samples(self) -> list[Sample]:
        """The series as they are now; the HTTP counters are there from 0, as counters are."""
        samples = [Sample(m.BUILD_INFO, (__version__,), 1.0)]
        for key, health in self.store.healths():
            samples.append(Sample(m.SOURCE_UP, key, 1.0 if health.up else 0.0))
            samples.append(Sample(m.SOURCE_DURATION, key, health.last_duration))
            samples.append(Sample(m.SOURCE_ERRORS, key, float(health.errors_total)))
            if health.last_success is not None:
                samples.append(Sample(m.SOURCE_LAST_SUCCESS, key, health.last_success))
        refused = float(self.http_connections_refused)
        samples.append(Sample(m.HTTP_CONNECTIONS_REFUSED, (), refused))
        samples.append(Sample(m.HTTP_HEADER_TIMEOUTS, (), float(self.http_header_timeouts)))
        return samples
