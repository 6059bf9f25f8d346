"""RDS Proxy: connection metrics from CloudWatch and pinning reasons from the proxy's logs.

Every `interval` the source makes **one** `GetMetricData` call for all proxies (up to 500
metric queries per call; more proxies means more calls of 500), then reads the pinning lines
each proxy wrote to `/aws/rds/proxy/<proxy>` since the last poll with `FilterLogEvents`.
Discovery (`DescribeDBProxies`, `DescribeDBProxyTargetGroups`, `DescribeDBProxyTargets`, and
`ListMetrics` for the dimension values CloudWatch actually uses) runs every
`discovery_interval`, not every poll. boto3 is blocking, so one poll runs in a worker thread.

Choices that matter to users (also in docs/rds-proxy.md):

- **Statistic per metric as AWS recommends**: `Sum` for connection counts (the proxy runs on
  several EC2 hosts that each report their share), `Average` for the two latencies, which
  CloudWatch reports in microseconds and we export in seconds.
- **Window shifted by `delay`**: CloudWatch publishes RDS Proxy datapoints minutes late, so
  we ask for 60 s periods ending `delay` ago and export the newest datapoint in the window.
  The values are that old; `pgpressure_source_last_success_timestamp_seconds` dates the poll.
- **Absent, not zero**: a metric with no datapoint in the window is not exported - an empty
  answer means "CloudWatch has nothing", not "zero connections". The exception is
  `rds_proxy_database_connections_currently_session_pinned`: AWS only publishes it once a
  connection has been pinned and stops when none is, so it is exported as 0 whenever the same
  proxy/target *does* have a `DatabaseConnections` datapoint in the window (the proxy is
  reporting, it just has nothing pinned). With no datapoints at all it is absent like the rest.
- **Dimension sets**: `ProxyName` alone (labels target_group="" and target="") for every
  metric, plus `ProxyName, TargetGroup, Target` for the metrics AWS publishes per target.
  The per-endpoint and per-role sets are not read; they would double the cost.
- **Failures**: throttling, expired credentials, 5xx and unreadable answers raise, so the
  runner counts the error and backs off while the last values stay exported
  (`keep_gauges_on_failure`). botocore's own retries are off so one poll is one attempt and
  the cost counter stays exact. A missing log group or missing logs permission is logged
  once per proxy and retried every `discovery_interval`; it is a setup state, not an error.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from exporter import __version__, pinning
from exporter import metrics as m
from exporter.config import AwsConfig
from exporter.logs import kv
from exporter.metrics import MetricSpec, Sample
from exporter.secrets import redact, redact_dsn
from exporter.sources.base import Source

log = logging.getLogger("pgpressure.rds_proxy")

NAMESPACE = "AWS/RDS"
PERIOD = 60  # seconds; the finest period RDS Proxy metrics have
MAX_QUERIES_PER_CALL = 500  # GetMetricData limit
LOG_OVERLAP_MS = 120_000  # re-read this much before the cursor: late-ingested lines
LOG_CALL_SPACING = 0.25  # FilterLogEvents is limited to 5 requests/s per account and region
MAX_SEEN_EVENT_IDS = 50_000
_EXPIRED = frozenset(
    {
        "ExpiredToken",
        "ExpiredTokenException",
        "RequestExpired",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
    }
)
_LOGS_SETUP = frozenset({"ResourceNotFoundException", "AccessDeniedException"})


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


class AwsApiError(RuntimeError):
    """One failed AWS call, phrased for the log: operation, error code, HTTP status."""

    def __init__(self, operation: str, code: str, status: int | None, message: str) -> None:
        self.operation, self.code, self.status = operation, code, status
        where = f" (HTTP {status})" if status else ""
        super().__init__(redact(f"{operation} failed: {code}{where}: {message}".strip()))


@dataclass
class _Proxy:
    name: str
    engine: str = ""
    status: str = ""
    target_groups: list[dict[str, object]] = field(default_factory=list)
    # (TargetGroup, Target) dimension values that CloudWatch has for this proxy
    cw_targets: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _LogState:
    cursor_ms: int
    seen: dict[str, int] = field(default_factory=dict)  # eventId -> timestamp
    readable: bool = False  # read successfully at least once
    problem: str = ""  # "log group missing" / "access denied"
    retry_at: float = 0.0


class _Clients:
    """boto3 clients for one region with the standard credential chain, explicit keys or an
    assumed role. Rebuilt when credentials expire (the role is re-assumed before it does)."""

    def __init__(self, config: AwsConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self._lock = threading.Lock()
        self._clients: dict[str, Any] = {}
        self._role_expires = 0.0
        self.botocore_config = BotoConfig(
            region_name=config.region,
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=20,
            user_agent_extra=f"pgpressure/{__version__}",
        )

    def _base_session(self) -> boto3.session.Session:
        return boto3.session.Session(
            aws_access_key_id=self.config.access_key_id,
            aws_secret_access_key=self.config.secret_access_key,
            region_name=self.config.region,
        )

    def _session(self) -> boto3.session.Session:
        session = self._base_session()
        if not self.config.role_arn:
            return session
        sts = session.client(
            "sts", endpoint_url=self.config.endpoint_url, config=self.botocore_config
        )
        try:
            creds = sts.assume_role(RoleArn=self.config.role_arn, RoleSessionName="pgpressure")[
                "Credentials"
            ]
        except ClientError as exc:
            raise _api_error("AssumeRole", exc) from None
        self._role_expires = creds["Expiration"].timestamp()
        return boto3.session.Session(
            aws_access_key_id=creds["AccessKeyId"],
            aws_secret_access_key=creds["SecretAccessKey"],
            aws_session_token=creds["SessionToken"],
            region_name=self.config.region,
        )

    def get(self, service: str) -> Any:
        with self._lock:
            if self.config.role_arn and self._clients and (self._role_expires - self.clock() < 600):
                self._clients.clear()  # re-assume the role ten minutes before it expires
            if not self._clients:
                session = self._session()
                for name in ("cloudwatch", "logs", "rds"):
                    self._clients[name] = session.client(
                        name,
                        endpoint_url=self.config.endpoint_url,
                        config=self.botocore_config,
                    )
            return self._clients[service]

    def reset(self) -> None:
        with self._lock:
            self._clients.clear()


def _api_error(operation: str, exc: Exception) -> AwsApiError:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return AwsApiError(
            operation, err.get("Code") or "Unknown", status, err.get("Message") or ""
        )
    return AwsApiError(operation, type(exc).__name__, None, str(exc))


def _pages(
    call: Callable[..., dict], token_in: str, token_out: str, **kwargs: Any
) -> Iterator[dict]:
    """Follow a paginated API; bounded so a misbehaving endpoint cannot loop forever."""
    for _ in range(100):
        page = call(**kwargs)
        yield page
        token = page.get(token_out)
        if not token:
            return
        kwargs[token_in] = token


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
        log_call_spacing: float = LOG_CALL_SPACING,
    ) -> None:
        self.config = config
        self.rds = config.rds_proxy
        self.interval = self.rds.interval
        self.backoff_max = max(self.interval * 8, 300.0)
        self.clock = clock
        self.log_call_spacing = log_call_spacing
        self._clients = _Clients(config, clock)
        self._proxies: list[_Proxy] = []
        self._discovered_at: float | None = None
        self._logs: dict[str, _LogState] = {}
        self._pin_events: dict[tuple[str, str], float] = {}
        self._log_rotation = 0
        self._metric_queries_total = 0.0
        self._last_values: list[Sample] = []
        self._last_poll: dict[str, object] = {}

    # -- the runner's side -----------------------------------------------------------------
    async def sample(self) -> Iterable[Sample]:
        return await asyncio.to_thread(self._poll)

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
            "cloudwatch_metric_queries_total": self._metric_queries_total,
        }

    def _proxy_status(self, proxy: _Proxy) -> dict[str, object]:
        logs = self._logs.get(proxy.name)
        if not self.rds.logs:
            log_state = "disabled"
        elif logs is None:
            log_state = "not read yet"
        else:
            log_state = logs.problem or ("reading" if logs.readable else "not read yet")
        return {
            "name": proxy.name,
            "engine_family": proxy.engine,
            "status": proxy.status,
            "target_groups": proxy.target_groups,
            "cloudwatch_targets": [{"target_group": g, "target": t} for g, t in proxy.cw_targets],
            "log_group": f"/aws/rds/proxy/{proxy.name}",
            "logs": log_state,
        }

    # -- one poll, in a worker thread --------------------------------------------------------
    def _poll(self) -> list[Sample]:
        started = self.clock()
        try:
            if self._discovery_due(started):
                self._discover()
            values, queries, calls = self._metrics(started)
            if self.rds.logs:
                self._read_logs()
        except AwsApiError as exc:
            if exc.code in _EXPIRED:
                self._clients.reset()  # pick up refreshed credentials on the next attempt
            raise
        self._last_values = values
        self._last_poll = {
            "at": _iso(started),
            "metric_queries": queries,
            "get_metric_data_calls": calls,
            "values": len(values),
        }
        return self._samples(values)

    def _samples(self, values: list[Sample]) -> list[Sample]:
        samples = list(values)
        samples += [
            Sample(m.RDS_PROXY_PINNING_EVENTS, key, v)
            for key, v in sorted(self._pin_events.items())
        ]
        samples.append(Sample(m.CLOUDWATCH_METRICS_REQUESTED, (), self._metric_queries_total))
        return samples

    def _call(self, service: str, operation: str, expect: str, **kwargs: Any) -> dict:
        """One API call; `expect` is a key every well-formed answer has. botocore turns an
        unparseable 200 answer into a dict without it, which must not read as "no data"."""
        try:
            page = getattr(self._clients.get(service), operation)(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise _api_error(_camel(operation), exc) from None
        if not isinstance(page, dict) or expect not in page:
            raise AwsApiError(
                _camel(operation), "MalformedResponse", None, f"the answer has no {expect}"
            )
        return page

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
            for page in _pages(
                lambda **kw: self._call("rds", "describe_db_proxies", "DBProxies", **kw),
                "Marker",
                "Marker",
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
            for proxy in proxies:
                proxy.target_groups = self._target_groups(proxy.name)
        for proxy in proxies:
            proxy.cw_targets = self._cloudwatch_targets(proxy.name)
        known = {p.name for p in proxies}
        if known != {p.name for p in self._proxies}:
            log.info("rds proxies discovered", extra=kv(proxies=",".join(sorted(known)) or "-"))
        self._proxies = proxies
        self._discovered_at = self.clock()
        for name in list(self._logs):
            if name not in known:
                del self._logs[name]

    def _target_groups(self, proxy: str) -> list[dict[str, object]]:
        groups = []
        page = self._call(
            "rds", "describe_db_proxy_target_groups", "TargetGroups", DBProxyName=proxy
        )
        for group in page.get("TargetGroups", []):
            name = group.get("TargetGroupName", "")
            targets = self._call(
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
        pages = _pages(
            lambda **kw: self._call("cloudwatch", "list_metrics", "Metrics", **kw),
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
    def _queries(self) -> list[tuple[dict, _CwMetric, tuple[str, str, str]]]:
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
                    query = {
                        "Id": f"q{len(out)}",
                        "MetricStat": {
                            "Metric": {
                                "Namespace": NAMESPACE,
                                "MetricName": metric.name,
                                "Dimensions": [{"Name": n, "Value": v} for n, v in dims],
                            },
                            "Period": PERIOD,
                            "Stat": metric.stat,
                        },
                        "ReturnData": True,
                    }
                    out.append((query, metric, labels))
        return out

    def _window(self, now: float) -> tuple[datetime, datetime]:
        end = math.floor((now - self.rds.delay) / PERIOD) * PERIOD
        lookback = max(5 * PERIOD, math.ceil(2 * self.interval / PERIOD) * PERIOD)
        return (datetime.fromtimestamp(end - lookback, UTC), datetime.fromtimestamp(end, UTC))

    def _metrics(self, now: float) -> tuple[list[Sample], int, int]:
        queries = self._queries()
        if not queries:
            return [], 0, 0
        start, end = self._window(now)
        newest: dict[str, tuple[datetime, float]] = {}
        calls = 0
        for offset in range(0, len(queries), MAX_QUERIES_PER_CALL):
            batch = [q for q, _, _ in queries[offset : offset + MAX_QUERIES_PER_CALL]]
            kwargs: dict[str, Any] = {
                "MetricDataQueries": batch,
                "StartTime": start,
                "EndTime": end,
                "ScanBy": "TimestampDescending",
            }
            for page in _pages(
                lambda **kw: self._call("cloudwatch", "get_metric_data", "MetricDataResults", **kw),
                "NextToken",
                "NextToken",
                **kwargs,
            ):
                calls += 1
                self._metric_queries_total += len(batch)  # AWS bills per metric requested
                for result in page.get("MetricDataResults", []):
                    for ts, value in zip(
                        result.get("Timestamps", []), result.get("Values", []), strict=False
                    ):
                        best = newest.get(result["Id"])
                        if best is None or ts > best[0]:
                            newest[result["Id"]] = (ts, float(value))
        values: dict[tuple[MetricSpec, tuple[str, str, str]], float] = {}
        for query, metric, labels in queries:
            got = newest.get(query["Id"])
            if got is not None:
                values[(metric.spec, labels)] = got[1] * metric.scale
        # The pinned count is only published after a pin: 0 where the proxy does report.
        for _query, metric, labels in queries:
            if metric is _CONNECTIONS and (metric.spec, labels) in values:
                values.setdefault((_PINNED.spec, labels), 0.0)
        samples = [Sample(spec, labels, v) for (spec, labels), v in values.items()]
        return samples, len(queries), calls

    # -- logs ------------------------------------------------------------------------------
    def _read_logs(self) -> None:
        """Every proxy's new pinning lines, at most max_log_events_per_poll in all; the
        starting proxy rotates so a backlog on one cannot starve the others."""
        budget = self.rds.max_log_events_per_poll
        proxies = list(self._proxies)
        if proxies:
            self._log_rotation = (self._log_rotation + 1) % len(proxies)
            proxies = proxies[self._log_rotation :] + proxies[: self._log_rotation]
        first = True
        for proxy in proxies:
            if budget <= 0:
                break
            if not first and self.log_call_spacing:
                time.sleep(self.log_call_spacing)
            first = False
            budget -= self._read_proxy_log(proxy.name, budget)

    def _read_proxy_log(self, proxy: str, budget: int) -> int:
        now = self.clock()
        now_ms = int(now * 1000)
        state = self._logs.get(proxy)
        if state is None:
            lookback_ms = int(max(self.interval, 300.0) * 1000)
            state = self._logs[proxy] = _LogState(cursor_ms=now_ms - lookback_ms)
        if state.problem and now < state.retry_at:
            return 0
        group = f"/aws/rds/proxy/{proxy}"
        kwargs: dict[str, Any] = {
            "logGroupName": group,
            "startTime": max(0, state.cursor_ms - LOG_OVERLAP_MS),
            "endTime": now_ms,
            "filterPattern": f'"{pinning.PIN_MARKER}"',
            "interleaved": True,
        }
        read = 0
        newest = state.cursor_ms
        truncated = False
        counts: dict[str, int] = {}
        seen = dict(state.seen)
        try:
            for page in _pages(
                lambda **kw: self._call("logs", "filter_log_events", "events", **kw),
                "nextToken",
                "nextToken",
                limit=min(10_000, budget),
                **kwargs,
            ):
                for event in page.get("events", []):
                    event_id = str(event.get("eventId", ""))
                    stamp = int(event.get("timestamp", 0))
                    if event_id in seen:
                        continue
                    seen[event_id] = stamp
                    read += 1
                    newest = max(newest, stamp)
                    reason = pinning.log_reason(str(event.get("message", "")))
                    if reason is not None:
                        counts[reason] = counts.get(reason, 0) + 1
                if read >= budget and page.get("nextToken"):
                    truncated = True
                    break
        except AwsApiError as exc:
            if exc.code not in _LOGS_SETUP:
                raise  # throttling, 5xx, credentials: the runner backs off
            self._note_log_problem(proxy, state, exc, now)
            return read
        # Commit only after the whole read succeeded, so a failure never double counts.
        if state.problem:
            log.info("rds proxy log group readable", extra=kv(proxy=proxy, log_group=group))
        state.problem = ""
        state.readable = True
        for reason in pinning.REASONS:
            key = (proxy, reason)
            self._pin_events[key] = self._pin_events.get(key, 0.0) + counts.get(reason, 0)
        state.cursor_ms = newest if truncated else now_ms
        horizon = state.cursor_ms - LOG_OVERLAP_MS
        state.seen = {k: v for k, v in seen.items() if v >= horizon}
        if len(state.seen) > MAX_SEEN_EVENT_IDS:
            keep = sorted(state.seen.items(), key=lambda kv_: kv_[1])[-MAX_SEEN_EVENT_IDS:]
            state.seen = dict(keep)
        if truncated:
            log.info(
                "rds proxy pinning log backlog; continuing next poll",
                extra=kv(proxy=proxy, events=read),
            )
        return read

    def _note_log_problem(self, proxy: str, state: _LogState, exc: AwsApiError, now: float) -> None:
        problem = (
            "log group missing" if exc.code == "ResourceNotFoundException" else "access denied"
        )
        if problem != state.problem:
            hint = (
                "turn on enhanced logging for the proxy to see pinning reasons"
                if problem == "log group missing"
                else "grant logs:FilterLogEvents on the proxy's log group"
            )
            log.warning(
                f"rds proxy pinning logs unavailable: {problem}; {hint}",
                extra=kv(proxy=proxy, log_group=f"/aws/rds/proxy/{proxy}"),
            )
        state.problem = problem
        state.retry_at = now + self.rds.discovery_interval


def _camel(operation: str) -> str:
    return "".join(part.capitalize() for part in operation.split("_")).replace("Db", "DB")


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
