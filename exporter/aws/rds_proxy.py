"""RDS Proxy: connection metrics from CloudWatch and pinning reasons from the proxy's logs.

Every `interval` the source reads its metrics through the daemon's one `GetMetricData` call
per minute, shared with the RDS instance sources (`exporter.aws.cloudwatch`: up to 500 metric
queries per call; more proxies means more calls of 500), then reads the pinning lines
each proxy wrote to `/aws/rds/proxy/<proxy>` since the last poll with `FilterLogEvents`.
Discovery (`DescribeDBProxies`, `DescribeDBProxyTargetGroups`, `DescribeDBProxyTargets`, and
`ListMetrics` for the dimension values CloudWatch actually uses) runs every
`discovery_interval`, not every poll. boto3 is blocking, so one poll runs in a worker thread.

Choices that matter to users (also in docs/rds-proxy.md):

- **Statistic per metric as AWS recommends**: `Sum` for connection counts (the proxy runs on
  several EC2 hosts that each report their share), `Average` for the two latencies, which
  CloudWatch reports in microseconds and we export in seconds.
- **Window shifted by `delay`**: CloudWatch publishes RDS Proxy datapoints minutes late, so
  we ask for 60 s periods ending `delay` ago. The values are that old;
  `pgpressure_source_last_success_timestamp_seconds` dates the poll.
- **One minute per label set**: every metric of one (proxy, target_group, target) is exported
  from the same minute: the newest with a `DatabaseConnections` datapoint in the window (or,
  if it has none, the newest minute any of its metrics has). Taking each metric's own newest
  datapoint would pair a pinned count from minutes ago with fresh connections.
- **Absent, not zero**: a metric with no datapoint in that minute is not exported - an empty
  answer means "CloudWatch has nothing", not "zero connections". The exception is
  `rds_proxy_database_connections_currently_session_pinned`: AWS only publishes it once a
  connection has been pinned and stops when none is, so it is exported as 0 when the minute
  is one with a `DatabaseConnections` datapoint (the proxy is reporting, it just has nothing
  pinned). Without a `DatabaseConnections` datapoint in the window it is never zero-filled,
  and a label set with no datapoint at all is absent.
- **Dimension sets**: `ProxyName` alone (labels target_group="" and target="") for every
  metric, plus `ProxyName, TargetGroup, Target` for the metrics AWS publishes per target.
  The per-endpoint and per-role sets are not read; they would double the cost.
- **Failures**: throttling, expired credentials, 5xx and unreadable answers raise, so the
  runner counts the error and backs off while the last values stay exported
  (`keep_gauges_on_failure`). botocore's own retries are off so one poll is one attempt and
  the cost counter stays exact. A missing log group or missing logs permission is logged
  once per proxy and retried every `discovery_interval`; it is a setup state, not an error.
  A throttled FilterLogEvents call skips the rest of the poll's log reading (logged) and keeps
  the poll's fresh CloudWatch metrics; the logs are read on from their cursors next poll.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from exporter import metrics as m
from exporter.aws.clients import EXPIRED, AwsApiError, off_the_loop
from exporter.aws.cloudwatch import PERIOD, MetricData, Points, Query, newest
from exporter.aws.cloudwatch import _plausible as _plausible  # the tests' unit of plausibility
from exporter.config import AwsConfig
from exporter.core.source import Source
from exporter.logs import kv
from exporter.metrics import MetricSpec, Sample
from exporter.pinning.proxy_logs import CALL_SPACING, PinningLogs, log_group
from exporter.redaction import redact_dsn

log = logging.getLogger("pgpressure.rds_proxy")

NAMESPACE = "AWS/RDS"
OWNER = "rds_proxy"  # this source's name in the shared MetricData
FORGET_AFTER_DISCOVERIES = 3  # a proxy left out this many discovery intervals is forgotten


@dataclass(frozen=True, slots=True)
class _CwMetric:
    name: str  # CloudWatch MetricName
    spec: MetricSpec
    stat: str  # statistic AWS recommends for it
    scale: float  # CloudWatch unit -> exported base unit
    per_target: bool  # also published with ProxyName, TargetGroup, Target


METRICS: tuple[_CwMetric, ...] = (
    _CwMetric("DatabaseConnectionsCurrentlySessionPinned", m.RDS_PROXY_PINNED, "Sum", 1.0, True),
    _CwMetric("DatabaseConnections", m.RDS_PROXY_DATABASE_CONNECTIONS, "Sum", 1.0, True),
    _CwMetric("DatabaseConnectionsCurrentlyBorrowed", m.RDS_PROXY_BORROWED, "Sum", 1.0, True),
    _CwMetric(
        "DatabaseConnectionsCurrentlyInTransaction", m.RDS_PROXY_IN_TRANSACTION, "Sum", 1.0, True
    ),
    _CwMetric("MaxDatabaseConnectionsAllowed", m.RDS_PROXY_MAX_ALLOWED, "Sum", 1.0, True),
    _CwMetric("ClientConnections", m.RDS_PROXY_CLIENT_CONNECTIONS, "Sum", 1.0, False),
    _CwMetric(
        "DatabaseConnectionsBorrowLatency", m.RDS_PROXY_BORROW_LATENCY, "Average", 1e-6, False
    ),
    _CwMetric("QueryDatabaseResponseLatency", m.RDS_PROXY_QUERY_LATENCY, "Average", 1e-6, True),
)
_PINNED = METRICS[0]
_CONNECTIONS = METRICS[1]


@dataclass
class _Proxy:
    name: str
    engine: str = ""
    status: str = ""
    target_groups: list[dict[str, object]] = field(default_factory=list)
    # (TargetGroup, Target) dimension values that CloudWatch has for this proxy
    cw_targets: list[tuple[str, str]] = field(default_factory=list)


class RdsProxySource(Source):
    """CloudWatch metrics and pinning log reasons of the account's RDS Proxies."""

    name = "rds_proxy"
    target = ""
    keep_gauges_on_failure = True

    def __init__(
        self,
        config: AwsConfig,
        *,
        clock: Callable[[], float] = time.time,
        log_call_spacing: float = CALL_SPACING,
        metric_data: MetricData | None = None,
    ) -> None:
        self.config = config
        self.rds = config.rds_proxy
        self.interval = self.rds.interval
        self.backoff_max = max(self.interval * 8, 300.0)
        self.clock = clock
        # shared with the RDS instance sources, so one call per minute carries everything
        self.metric_data = metric_data or MetricData(config, clock)
        self.clients = self.metric_data.clients
        self._logs = PinningLogs(
            self.clients,
            clock,
            first_lookback=max(self.interval, 300.0),
            max_events_per_poll=self.rds.max_log_events_per_poll,
            retry_after=self.rds.discovery_interval,
            forget_after=FORGET_AFTER_DISCOVERIES * self.rds.discovery_interval,
            call_spacing=log_call_spacing,
        )
        self._proxies: list[_Proxy] = []
        self._discovered_at: float | None = None
        self._last_poll: dict[str, object] = {}

    # -- the runner's side -----------------------------------------------------------------
    async def sample(self) -> Iterable[Sample]:
        return await off_the_loop(self._poll, "pgpressure-rds-proxy-poll")

    async def close(self) -> None:
        await off_the_loop(self.clients.reset, "pgpressure-aws-close")

    def status(self) -> dict[str, object]:
        endpoint = self.config.endpoint_url
        return {
            "region": self.config.region,
            "endpoint_url": redact_dsn(endpoint) if endpoint else None,
            "assume_role": bool(self.config.role_arn),
            "discovery": "configured" if self.rds.proxies else "DescribeDBProxies",
            "discovered_at": _iso(self._discovered_at),
            "proxies": [self._proxy_status(p) for p in list(self._proxies)],
            "last_poll": dict(self._last_poll),
            "cloudwatch_metric_queries_total": self.metric_data.requested(OWNER),
        }

    def pinning_logs(self) -> dict[str, dict[str, object]]:
        """Per proxy, the statements its pinning lines named (Digests) and its pins by driver
        fingerprint, for the pinning report; empty with logs off."""
        if not self.rds.logs:
            return {}
        totals = self._logs.totals
        return {
            p.name: {
                "statements": totals.statements(p.name),
                "pins_by_fingerprint": totals.pins_by_fingerprint(p.name),
            }
            for p in list(self._proxies)
        }

    def _proxy_status(self, proxy: _Proxy) -> dict[str, object]:
        return {
            "name": proxy.name,
            "engine_family": proxy.engine,
            "status": proxy.status,
            "target_groups": proxy.target_groups,
            "cloudwatch_targets": [{"target_group": g, "target": t} for g, t in proxy.cw_targets],
            "log_group": log_group(proxy.name),
            "logs": self._logs.state_of(proxy.name) if self.rds.logs else "disabled",
            "pinning_log": self._logs.details(proxy.name) if self.rds.logs else {},
        }

    # -- one poll, in a worker thread --------------------------------------------------------
    def _poll(self) -> list[Sample]:
        started = self.clock()
        try:
            if self._discovery_due(started):
                self._discover()
            values, queries, calls = self._metrics(started)
            if self.rds.logs:
                self._logs.read([p.name for p in self._proxies])
        except AwsApiError as exc:
            if exc.code in EXPIRED:
                self.clients.reset()  # pick up refreshed credentials on the next attempt
            raise
        self._last_poll = {
            "at": _iso(started),
            "metric_queries": queries,
            "get_metric_data_calls": calls,
            "values": len(values),
            "logs_throttled": self.rds.logs and self._logs.throttled,
        }
        return self._samples(values)

    def _samples(self, values: list[Sample]) -> list[Sample]:
        samples = list(values)
        samples += [
            Sample(m.RDS_PROXY_PINNING_EVENTS, key, v)
            for key, v in sorted(self._logs.counts.items())
        ]
        samples += self._logs.samples(values)  # would-pin lines, silent log groups
        samples.append(self.metric_data.requested_sample(OWNER))
        return samples

    # -- discovery -------------------------------------------------------------------------
    def _discovery_due(self, now: float) -> bool:
        return self._discovered_at is None or now - self._discovered_at >= (
            self.rds.discovery_interval
        )

    def _discover(self) -> None:
        if self.rds.proxies:
            proxies = [_Proxy(name) for name in self.rds.proxies]
        else:
            proxies = []
            for page in self.clients.pages(
                "rds", "describe_db_proxies", "DBProxies", "Marker", "Marker"
            ):
                for item in page.get("DBProxies", []):
                    # pgpressure is about PostgreSQL; list other proxies explicitly to read them
                    if item.get("EngineFamily") == "POSTGRESQL":
                        proxies.append(
                            _Proxy(
                                item["DBProxyName"],
                                item.get("EngineFamily", ""),
                                item.get("Status", ""),
                            )
                        )
            proxies = self._within_cap(proxies)
            for proxy in proxies:
                proxy.target_groups = self._target_groups(proxy.name)
        for proxy in proxies:
            proxy.cw_targets = self._cloudwatch_targets(proxy.name)
        known = {p.name for p in proxies}
        if known != {p.name for p in self._proxies}:
            log.info("rds proxies discovered", extra=kv(proxies=",".join(sorted(known)) or "-"))
        self._proxies = proxies
        self._discovered_at = self.clock()
        self._logs.forget_except(known)

    def _within_cap(self, proxies: list[_Proxy]) -> list[_Proxy]:
        """Discovery in a large account must not turn one poll into thousands of metric
        queries: keep the first `max_proxies` by name and say what was left out."""
        proxies.sort(key=lambda p: p.name)
        cap = self.rds.max_proxies
        if len(proxies) > cap:
            log.warning(
                "more rds proxies than max_proxies; list the ones to read in rds_proxy.proxies",
                extra=kv(found=len(proxies), max_proxies=cap, skipped=len(proxies) - cap),
            )
        return proxies[:cap]

    def _target_groups(self, proxy: str) -> list[dict[str, object]]:
        groups = []
        page = self.clients.call(
            "rds", "describe_db_proxy_target_groups", "TargetGroups", DBProxyName=proxy
        )
        for group in page.get("TargetGroups", []):
            name = group.get("TargetGroupName", "")
            targets = self.clients.call(
                "rds",
                "describe_db_proxy_targets",
                "Targets",
                DBProxyName=proxy,
                TargetGroupName=name,
            ).get("Targets", [])
            groups.append(
                {
                    "name": name,
                    "status": group.get("Status", ""),
                    "targets": [
                        {
                            "id": t.get("RdsResourceId", ""),
                            "type": t.get("Type", ""),
                            "role": t.get("Role", ""),
                            "health": t.get("TargetHealth", {}).get("State", ""),
                        }
                        for t in targets
                    ],
                }
            )
        return groups

    def _cloudwatch_targets(self, proxy: str) -> list[tuple[str, str]]:
        """The (TargetGroup, Target) values CloudWatch publishes for this proxy. Asked, not
        derived from DescribeDBProxyTargets, so the dimension values are exactly CloudWatch's;
        RecentlyActive drops targets that have not reported for three hours."""
        found: set[tuple[str, str]] = set()
        pages = self.clients.pages(
            "cloudwatch",
            "list_metrics",
            "Metrics",
            "NextToken",
            "NextToken",
            Namespace=NAMESPACE,
            MetricName=_CONNECTIONS.name,
            RecentlyActive="PT3H",
            Dimensions=[{"Name": "ProxyName", "Value": proxy}],
        )
        for page in pages:
            for metric in page.get("Metrics", []):
                dims = {d["Name"]: d["Value"] for d in metric.get("Dimensions", [])}
                if set(dims) == {"ProxyName", "TargetGroup", "Target"}:
                    found.add((dims["TargetGroup"], dims["Target"]))
        return sorted(found)

    # -- metrics ---------------------------------------------------------------------------
    def _queries(self) -> list[tuple[Query, _CwMetric, tuple[str, str, str]]]:
        out = []
        for proxy in self._proxies:
            sets = [((("ProxyName", proxy.name),), (proxy.name, "", ""), False)]
            sets += [
                (
                    (("ProxyName", proxy.name), ("TargetGroup", group), ("Target", target)),
                    (proxy.name, group, target),
                    True,
                )
                for group, target in proxy.cw_targets
            ]
            for dims, labels, per_target in sets:
                for metric in METRICS:
                    if per_target and not metric.per_target:
                        continue
                    out.append((Query(NAMESPACE, metric.name, dims, metric.stat), metric, labels))
        return out

    def _metrics(self, now: float) -> tuple[list[Sample], int, int]:
        queries = self._queries()
        lookback = max(5 * PERIOD, math.ceil(2 * self.interval / PERIOD) * PERIOD)
        self.metric_data.register(OWNER, [q for q, _, _ in queries], lookback)
        if not queries:
            return [], 0, 0
        points, calls = self.metric_data.read(OWNER)
        return _one_minute_per_label_set(queries, points), len(queries), calls


def _one_minute_per_label_set(
    queries: list[tuple[Query, _CwMetric, tuple[str, str, str]]], points: dict[Query, Points]
) -> list[Sample]:
    """The values of one (proxy, target_group, target) all come from one minute: the newest
    with a `DatabaseConnections` datapoint, or, when the window has none, the newest minute
    any of its metrics has. Choosing the newest datapoint of each metric separately would pair
    a pinned count from minutes ago (AWS stops publishing it when nothing is pinned) with
    fresh connections and keep the pinning alert firing after pinning stopped. So the pinned
    count is 0 when the proxy reported connections in that minute without a pinned datapoint;
    any other metric without a datapoint in that minute is absent."""
    by_labels: dict[tuple[str, str, str], dict[_CwMetric, Points]] = {}
    for query, metric, labels in queries:
        by_labels.setdefault(labels, {})[metric] = points.get(query, {})
    samples = []
    for labels, series in by_labels.items():
        anchor = newest(series.get(_CONNECTIONS, {}))
        anchored = anchor is not None
        if not anchored:
            stamps = [newest(got) for got in series.values()]
            anchor = max((ts for ts in stamps if ts is not None), default=None)
        if anchor is None:
            continue  # nothing published: absent, not zero
        for metric, got in series.items():
            value = got.get(anchor)
            if anchor not in got and metric is _PINNED and anchored:
                value = 0.0  # reporting connections, nothing pinned
            if value is not None:
                samples.append(Sample(metric.spec, labels, value * metric.scale))
    return samples


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
