"""The live diagnosis: every `diagnosis.interval` (15 s), record, collect, evaluate, publish.

It is a source like the samplers, so the daemon's runner gives it the same timing, health
(`pgpressure_source_up{source="diagnosis"}`), backoff and failure logging. Each run records
the store's current samples into the bounded history, builds the evidence over the window,
runs every rule, and exports one `pgpressure_finding` series per finding (value 1) so that
an alert rule can page with the cause; the findings themselves, with their numbers and fix,
are the JSON of `GET /api/v1/findings`.

Until the history holds `MIN_TICKS` ticks, rates cannot be told from noise: the status is
`warming_up` and there are no findings (`pgpressure doctor` exits 2 "cannot tell").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from exporter import metrics as m
from exporter.config import DiagnosisConfig
from exporter.core.source import Source
from exporter.core.store import Store
from exporter.diagnosis import rules
from exporter.diagnosis.collect import collect
from exporter.diagnosis.evidence import Evidence, RiskyStatement
from exporter.diagnosis.finding import SUBJECT_LABELS, Finding
from exporter.diagnosis.history import History
from exporter.metrics import Sample

MIN_TICKS = 3
#: Reads the live pinning-risk statements (with their texts), if the daemon has any.
RiskyReader = Callable[[], Iterable[RiskyStatement]]


class DiagnosisSource(Source):
    name = "diagnosis"
    backoff_max = 60.0

    def __init__(
        self,
        config: DiagnosisConfig,
        store: Store,
        risky: RiskyReader | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.interval = config.interval
        self.store = store
        self.risky = risky
        self.clock = clock
        self.history = History(config.window, config.interval, config.max_series)
        self.ticks = 0
        self.evidence: Evidence | None = None
        self.findings: list[Finding] = []
        self.cpu_seconds = 0.0  # of the last evaluation

    async def sample(self) -> Iterable[Sample]:
        """Record on the event loop (the store is the loop's), judge in a thread: with
        hundreds of pools that takes a tenth of a second, which a scrape must not wait for."""
        self.record()
        risky = tuple(self.risky()) if self.risky is not None else None
        return await asyncio.to_thread(self.judge, risky)

    def evaluate(self) -> list[Sample]:
        """One run, synchronously (for tests and benches)."""
        self.record()
        return self.judge(tuple(self.risky()) if self.risky is not None else None)

    def record(self) -> None:
        self.history.record(self.clock(), self.store)
        self.ticks += 1

    def judge(self, risky: tuple[RiskyStatement, ...] | None) -> list[Sample]:
        """Evidence over the window, every rule, and the findings as samples."""
        started = time.thread_time()
        if self.ticks < MIN_TICKS:
            self.evidence, self.findings = None, []
        else:
            self.evidence = collect(self.history, risky)
            self.findings = rules.evaluate(self.evidence, self.config.thresholds)
        self.cpu_seconds = time.thread_time() - started
        return [finding_sample(f) for f in self.findings]

    @property
    def ready(self) -> bool:
        return self.ticks >= MIN_TICKS

    def to_json(self) -> dict[str, Any]:
        """The body of `GET /api/v1/findings`."""
        return {
            "status": "ok" if self.ready else "warming_up",
            "evaluated_at": self.history.at or None,
            "window_seconds": self.config.window,
            "interval_seconds": self.config.interval,
            "findings": [f.to_json() for f in self.findings],
            "links": links(self.evidence),
            "history": {
                "series": self.history.series,
                "bytes": self.history.nbytes(),
                "dropped_series": self.history.dropped,
                "points_per_series": self.history.points,
            },
        }

    def status(self) -> dict[str, object]:
        return {"findings": len(self.findings), "history_series": self.history.series}


def finding_sample(finding: Finding) -> Sample:
    subject = tuple(finding.subject.get(label, "") for label in SUBJECT_LABELS)
    return Sample(m.FINDING, (finding.rule, finding.severity, *subject), 1.0)


def links(evidence: Evidence | None) -> list[dict[str, object]]:
    """Which pool uses which target, as the rules saw it (for the landing page)."""
    if evidence is None:
        return []
    return [
        {"app": p.app, "pool": p.pool, "targets": [t.target for t in p.targets]}
        for p in evidence.pools
    ]


def risky_reader(sources: Iterable[Source]) -> RiskyReader:
    """The live pinning-risk statements of the database sources among `sources` (those with
    a pinning-risk report, `source.pinning`), read at each evaluation."""
    reports = [s for s in sources if getattr(s, "pinning", None) is not None]

    def read() -> list[RiskyStatement]:
        return [
            r
            for s in reports
            for r in risky_from_offenders(s.target, s.pinning.top_offenders(), s.interval)
        ]

    return read


def risky_from_offenders(
    target: str, offenders: Iterable[Mapping[str, Any]], interval: float
) -> list[RiskyStatement]:
    """The pinning-risk report's top offenders (`PinningRisk.top_offenders()`), as evidence:
    `recent_calls` grew over one database-source interval."""
    return [
        RiskyStatement(
            target=target,
            datname=str(o.get("datname", "")),
            reasons=tuple(o.get("reasons", ())),
            calls_per_s=float(o.get("recent_calls", 0.0)) / max(interval, 1e-9),
            text=str(o.get("query", "")),
        )
        for o in offenders
    ]
