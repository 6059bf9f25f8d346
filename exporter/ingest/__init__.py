"""Ingest: the pool reports that instrumented processes push, aggregated per (app, pool).

The daemon wires up one `Ingest`: a source (it exports the aggregates and the result
counters on its interval, folding in processes that went silent) whose `handler.handle` serves
`POST REPORTS_PATH`. The rooms within: `model` (what a report is), `auth` (its bearer token),
`aggregator` (across processes), `results` (outcomes and their counter), `handler` (HTTP).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from exporter.core.source import Source
from exporter.ingest.aggregator import IngestAggregator
from exporter.ingest.handler import IngestHandler, ingest_disabled
from exporter.ingest.wire import REPORTS_PATH
from exporter.metrics import Sample

if TYPE_CHECKING:
    from aiohttp.typedefs import Handler

    from exporter.config import IngestConfig

__all__ = ["REPORTS_PATH", "Ingest", "IngestAggregator", "IngestHandler", "reports_handler"]


class Ingest(Source):
    # The `source` label of pgpressure_source_up and friends, as documented in docs/metrics.md:
    # a label value users may alert on, so it keeps its name.
    name = "apps"
    target = ""
    interval = 1.0

    def __init__(self, config: IngestConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.aggregator = IngestAggregator(config, clock)
        self.handler = IngestHandler(config, self.aggregator, clock)

    async def sample(self) -> list[Sample]:
        return self.samples()

    def samples(self) -> list[Sample]:
        """The aggregates as of now (silent processes folded in) and every result count."""
        self.aggregator.expire()
        return [*self.aggregator.samples(), *self.handler.results.samples()]

    def reconfigure(self, config: IngestConfig) -> None:
        """A reloaded `ingest:` block (token, limits, caps, staleness) applies from the next
        push on; the aggregates, and so the apps' counters, are kept."""
        self.aggregator.config = config
        self.handler.reconfigure(config)

    def live_processes(self) -> int:
        """App processes reporting now, for the landing page."""
        return self.aggregator.live_processes()

    def status(self) -> dict[str, object]:
        return self.aggregator.status()


def reports_handler(ingest: Ingest | None) -> Handler:
    """What answers `POST REPORTS_PATH`: the ingest handler, or a 404 when it is disabled."""
    if ingest is None:
        return ingest_disabled
    return ingest.handler.handle
