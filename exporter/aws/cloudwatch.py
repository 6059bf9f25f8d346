"""CloudWatch `GetMetricData` for every AWS source of the daemon: one call per minute for all.

AWS bills per metric requested, not per call, but every call is also an API request under a
shared quota; and the RDS Proxy source and each target's RDS instance source all want the same
kind of thing (60-second datapoints of `AWS/RDS`, `delay` late). So they register their
queries here and read through one `MetricData`: the first source to read in a CloudWatch
minute (the window ends on a minute boundary, `delay` ago) fetches the queries of *every*
registered source in one call (500 queries per call at most, the API's limit), and the others
read that answer. A source that reads twice within one minute (a retry, or an interval under a
minute) fetches its own queries again; a source registered after the minute's call (its first
discovery) is fetched on its own once. A failed call is the minute's answer for every source
whose queries it carried, so throttling is not answered with more calls.

Datapoints that are not finite non-negative numbers (every metric read here is a count, a
percentage, bytes, load or latency) are kept as None: the source sees that the minute had a
datapoint but exports nothing from it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from exporter import metrics as m
from exporter.aws.clients import AwsApiError, Clients
from exporter.config import AwsConfig
from exporter.logs import kv
from exporter.metrics import Sample

log = logging.getLogger("pgpressure.cloudwatch")

PERIOD = 60  # seconds; the finest period RDS and RDS Proxy metrics have
MAX_QUERIES_PER_CALL = 500  # GetMetricData limit

#: A query's datapoints: timestamp -> value, None for a datapoint that is not a plausible value.
Points = dict[datetime, float | None]


@dataclass(frozen=True, slots=True)
class Query:
    """One metric of one dimension set with one statistic, at PERIOD seconds."""

    namespace: str
    metric: str
    dimensions: tuple[tuple[str, str], ...]
    stat: str

    def request(self, query_id: str) -> dict[str, Any]:
        return {
            "Id": query_id,
            "MetricStat": {
                "Metric": {
                    "Namespace": self.namespace,
                    "MetricName": self.metric,
                    "Dimensions": [{"Name": n, "Value": v} for n, v in self.dimensions],
                },
                "Period": PERIOD,
                "Stat": self.stat,
            },
            "ReturnData": True,
        }


@dataclass
class _Owner:
    queries: tuple[Query, ...] = ()
    lookback: float = 5 * PERIOD
    requested: float = 0.0  # metric queries fetched for this owner: what AWS bills


class MetricData:
    """The daemon's CloudWatch reader, shared by its AWS sources (thread-safe: each source
    polls in a worker thread)."""

    def __init__(
        self,
        config: AwsConfig,
        clock: Callable[[], float] = time.time,
        clients: Clients | None = None,
    ) -> None:
        self.clients = clients or Clients(config, clock)
        self.clock = clock
        self.delay = config.rds_proxy.delay
        self.calls_total = 0
        self._lock = threading.Lock()
        self._owners: dict[str, _Owner] = {}
        self._end: float | None = None  # the current minute's window end (Unix time)
        self._points: dict[Query, Points] = {}
        self._failure: AwsApiError | None = None
        self._served: set[str] = set()  # owners that read in the current minute

    def register(self, owner: str, queries: Iterable[Query], lookback: float) -> None:
        """Replace `owner`'s queries; `lookback` is how far back its answers reach."""
        with self._lock:
            entry = self._owners.setdefault(owner, _Owner())
            entry.queries = tuple(dict.fromkeys(queries))
            entry.lookback = max(float(PERIOD), lookback)

    def window_end(self, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        return math.floor((now - self.delay) / PERIOD) * PERIOD

    def read(self, owner: str) -> tuple[dict[Query, Points], int]:
        """`owner`'s datapoints within its lookback of this minute's window, and how many
        GetMetricData calls this read made (0 when the minute's call had answered it)."""
        with self._lock:
            end = self.window_end()
            if end != self._end:
                self._end, self._points, self._failure, self._served = end, {}, None, set()
            mine = self._owners.get(owner, _Owner())
            if owner in self._served:  # a second poll within the minute wants fresh values
                for query in mine.queries:
                    self._points.pop(query, None)
                self._failure = None
            self._served.add(owner)
            calls = 0
            if any(q not in self._points for q in mine.queries):
                if self._failure is not None:
                    raise self._failure
                try:
                    calls = self._fetch(end)
                except AwsApiError as exc:
                    self._failure = exc
                    raise
            start = datetime.fromtimestamp(end - mine.lookback, UTC)
            return {
                q: {ts: v for ts, v in self._points.get(q, {}).items() if ts >= start}
                for q in mine.queries
            }, calls

    def requested_sample(self, owner: str) -> Sample:
        """The metric queries fetched for `owner` so far (each source exports its share)."""
        with self._lock:
            requested = self._owners.get(owner, _Owner()).requested
        return Sample(m.CLOUDWATCH_METRICS_REQUESTED, (), requested)

    def requested(self, owner: str) -> float:
        with self._lock:
            return self._owners.get(owner, _Owner()).requested

    # -- the call, the lock held ----------------------------------------------------------
    def _fetch(self, end: float) -> int:
        """Every registered query this minute has no answer for, in calls of 500."""
        billed: dict[Query, _Owner] = {}
        for entry in self._owners.values():
            for query in entry.queries:
                if query not in self._points:
                    billed.setdefault(query, entry)
        queries = list(billed)
        lookback = max(e.lookback for e in self._owners.values())
        window = (datetime.fromtimestamp(end - lookback, UTC), datetime.fromtimestamp(end, UTC))
        got: dict[Query, Points] = {q: {} for q in queries}
        calls = unusable = 0
        for offset in range(0, len(queries), MAX_QUERIES_PER_CALL):
            batch = queries[offset : offset + MAX_QUERIES_PER_CALL]
            for page in self._pages(batch, window):
                calls += 1
                self.calls_total += 1
                for query in batch:  # AWS bills per metric requested, on every page
                    billed[query].requested += 1
                unusable += _collect(page, batch, got)
        if unusable:
            log.warning(
                "cloudwatch returned datapoints that are not finite non-negative numbers; skipped",
                extra=kv(datapoints=unusable),
            )
        self._points.update(got)
        return calls

    def _pages(self, batch: list[Query], window: tuple[datetime, datetime]) -> Iterable[dict]:
        return self.clients.pages(
            "cloudwatch",
            "get_metric_data",
            "MetricDataResults",
            "NextToken",
            "NextToken",
            MetricDataQueries=[q.request(f"q{i}") for i, q in enumerate(batch)],
            StartTime=window[0],
            EndTime=window[1],
            ScanBy="TimestampDescending",
        )


def _collect(page: dict, batch: list[Query], got: dict[Query, Points]) -> int:
    """Add one answer page's datapoints; returns how many were not plausible values."""
    unusable = 0
    for result in page.get("MetricDataResults", []):
        qid = str(result.get("Id", ""))
        if not qid.startswith("q") or not qid[1:].isdigit() or int(qid[1:]) >= len(batch):
            continue
        points = got[batch[int(qid[1:])]]
        for ts, value in zip(result.get("Timestamps", []), result.get("Values", []), strict=False):
            plausible = _plausible(value)
            unusable += not plausible
            points[ts] = float(value) if plausible else None
    return unusable


def _plausible(value: object) -> bool:
    """Every metric read here is a count, a ratio, bytes, load or a latency: a NaN, an
    infinity or a negative number is a broken answer, and exporting it would trip alerts on
    nonsense."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def newest(points: Points) -> datetime | None:
    """The newest minute with a plausible datapoint."""
    return max((ts for ts, value in points.items() if value is not None), default=None)
