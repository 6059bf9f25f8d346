"""The RDS or Aurora instance behind a target: its vCPUs, AWS's own load figure, its capacity.

One source per target with an `aws:` block (`source="rds_instance"`, its `target`). Every
`aws.rds_proxy.interval` it

- finds the instance (`exporter.aws.rds_discovery`) when `discovery_interval` has passed, so a
  failover behind a cluster endpoint or a class change is followed;
- without `vcpus` configured, learns the vCPUs from AWS (`exporter.aws.vcpus`) and hands them
  to the target's activity source, which exports them as `pg_vcpus{source="aws"}` next to the
  load it samples (one series, whatever the origin, so rules and dashboards stay as they are);
- reads `AWS/RDS` for the instance through the daemon's shared `MetricData`, in the same
  `GetMetricData` call as RDS Proxy and the other targets;
- compares pgpressure's load with AWS's `DBLoad` over 15 minutes (`exporter.aws.load_check`).

Values of one instance come from one CloudWatch minute: the newest with a `CPUUtilization`
datapoint, which a running instance always publishes. AWS publishes the `DBLoad*` metrics only
with Performance Insights on, and only for minutes with load: in that minute a missing `DBLoad*`
is 0 once the instance is known to publish them (PerformanceInsightsEnabled, or a datapoint
seen). Without Performance Insights they stay absent, and the landing page says why.

Failures: a missing permission or throttling on a describe call (DescribeDBInstances,
DescribeDBClusters, DescribeInstanceTypes, GetResourceMetrics) does not fail the source while
it has something to go on: the last answer is kept, the state names the missing permission,
and the call is tried again at the next discovery. Only an instance that cannot be found at all,
or a failed `GetMetricData`, fails the source (the runner backs off, the last values stay).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from exporter import metrics as m
from exporter.aws import rds_discovery
from exporter.aws.clients import DENIED, EXPIRED, THROTTLED, AwsApiError, off_the_loop
from exporter.aws.cloudwatch import MetricData, Points, Query, newest
from exporter.aws.load_check import WINDOW, LoadCheck
from exporter.aws.rds_discovery import Instance, InstanceNotFound
from exporter.aws.vcpus import NoVcpuFigure, VcpuLookup, ec2_type
from exporter.config import AwsConfig, DatabaseConfig
from exporter.core.source import Source
from exporter.logs import kv
from exporter.metrics import MetricSpec, Sample

log = logging.getLogger("pgpressure.rds_instance")

NAMESPACE = "AWS/RDS"


@dataclass(frozen=True, slots=True)
class _Metric:
    name: str  # CloudWatch MetricName, read with the Average statistic
    spec: MetricSpec
    scale: float = 1.0  # CloudWatch unit -> exported unit (percent -> ratio)
    dbload: bool = False  # published only with Performance Insights, only with load
    serverless: bool = False  # Aurora Serverless v2 only


METRICS: tuple[_Metric, ...] = (
    _Metric("CPUUtilization", m.RDS_CPU_UTILIZATION, 0.01),
    _Metric("DBLoad", m.RDS_DB_LOAD, dbload=True),
    _Metric("DBLoadCPU", m.RDS_DB_LOAD_CPU, dbload=True),
    _Metric("DBLoadNonCPU", m.RDS_DB_LOAD_NON_CPU, dbload=True),
    _Metric("DBLoadRelativeToNumVCPUs", m.RDS_DB_LOAD_RELATIVE_TO_VCPUS, dbload=True),
    _Metric("DatabaseConnections", m.RDS_DATABASE_CONNECTIONS),
    _Metric("FreeableMemory", m.RDS_FREEABLE_MEMORY),
    _Metric("ServerlessDatabaseCapacity", m.RDS_SERVERLESS_CAPACITY, serverless=True),
    _Metric("ACUUtilization", m.RDS_ACU_UTILIZATION, 0.01, serverless=True),
)
_CPU, _DBLOAD = METRICS[0], METRICS[1]

#: The IAM prefix of each step's calls, to name a missing permission as a policy does.
_SERVICE = {"discovery": "rds", "vcpus": "ec2", "performance_insights": "pi"}


class RdsInstanceSource(Source):
    name = "rds_instance"
    keep_gauges_on_failure = True  # CloudWatch values are minutes old anyway

    def __init__(
        self,
        db: DatabaseConfig,
        aws: AwsConfig,
        metric_data: MetricData,
        *,
        clock: Callable[[], float] = time.time,
        on_vcpus: Callable[[float | None], None] | None = None,
        active_seconds: Callable[[], float] | None = None,
    ) -> None:
        assert db.aws is not None, "only targets with an aws: block have this source"
        self.db, self.settings = db, db.aws
        self.target = db.name
        self.scope = (("target", db.name),)
        self.interval = aws.rds_proxy.interval
        self.backoff_max = max(self.interval * 8, 300.0)
        self.clock = clock
        self.metric_data = metric_data
        self.clients = metric_data.clients
        self.owner = f"rds_instance:{db.name}"
        self.on_vcpus = on_vcpus
        self.lookup = VcpuLookup(self.clients, clock)
        self.load_check = (
            LoadCheck(active_seconds, clock, self._log_fields) if active_seconds else None
        )
        self.instance: Instance | None = None
        self.vcpus: float | None = db.vcpus
        self.vcpus_from = "config (databases[].vcpus)" if db.vcpus else "not read yet"
        self._discovered_at: float | None = None
        self._vcpus_due = True
        self._dbload_seen = False
        self._problems: dict[str, str] = {}  # step -> the last error of that step
        self._missing: dict[str, str] = {}  # step -> the permission it lacked
        self._last_poll: dict[str, object] = {}

    # -- the runner's side -----------------------------------------------------------------
    async def sample(self) -> Iterable[Sample]:
        return await off_the_loop(self._poll, f"pgpressure-rds-instance-{self.target}")

    async def close(self) -> None:
        await off_the_loop(self.clients.reset, "pgpressure-aws-close")

    def _log_fields(self) -> dict[str, object]:
        return {"target": self.target, "db_instance": self.instance and self.instance.identifier}

    # -- one poll, in a worker thread --------------------------------------------------------
    def _poll(self) -> list[Sample]:
        now = self.clock()
        try:
            if self._discovered_at is None or now - self._discovered_at >= (
                self.settings.discovery_interval
            ):
                self._discover(now)
            instance = self.instance
            assert instance is not None  # _discover raised otherwise
            self._refresh_vcpus(instance)
            queries = self._queries(instance)
            self.metric_data.register(self.owner, [q for q, _ in queries], WINDOW)
            points, calls = self._read()
        except AwsApiError as exc:
            if exc.code in EXPIRED:
                self.clients.reset()  # pick up refreshed credentials on the next attempt
            raise
        series = {metric: points.get(query, {}) for query, metric in queries}
        samples = self._samples(instance, series)
        self._cross_check(instance, series.get(_DBLOAD, {}))
        self._last_poll = {
            "at": _iso(now),
            "metric_queries": len(queries),
            "get_metric_data_calls": calls,
            "values": len(samples),
        }
        return samples

    def _read(self) -> tuple[dict[Query, Points], int]:
        try:
            got = self.metric_data.read(self.owner)
        except AwsApiError as exc:
            self._problem("cloudwatch", "cloudwatch", exc)
            raise
        self._solved("cloudwatch")
        return got

    # -- which instance --------------------------------------------------------------------
    def _discover(self, now: float) -> None:
        self._discovered_at = now  # whatever happens, the next try is a discovery interval on
        self._vcpus_due = True
        try:
            found = rds_discovery.find(
                self.clients, self.settings.db_instance_identifier, self.db.host()
            )
        except (AwsApiError, InstanceNotFound) as exc:
            self._problem("discovery", "rds", exc)
            if isinstance(exc, AwsApiError) and exc.code in EXPIRED:
                raise
            if self.instance is None and self.settings.db_instance_identifier:
                # CloudWatch needs only the identifier: read it, class and vCPUs unknown
                self.instance = Instance(self.settings.db_instance_identifier)
            if self.instance is None:
                self._discovered_at = None  # nothing to go on: the runner's backoff paces us
                raise
            log.warning(
                "rds instance discovery failed; keeping the last answer",
                extra=kv(**self._log_fields(), err=str(exc)),
            )
            return
        self._solved("discovery")
        self._found(found)

    def _found(self, found: Instance) -> None:
        before = self.instance
        if before is None or before.identifier != found.identifier:
            self._dbload_seen = False
        if before is None or (before.identifier, before.instance_class, before.role) != (
            found.identifier,
            found.instance_class,
            found.role,
        ):
            log.info(
                "rds instance found" if before is None else "rds instance changed",
                extra=kv(
                    target=self.target,
                    db_instance=found.identifier,
                    db_instance_class=found.instance_class or "-",
                    role=found.role,
                    found_by=found.found_by,
                ),
            )
        self.instance = found

    # -- vCPUs -----------------------------------------------------------------------------
    def _refresh_vcpus(self, instance: Instance) -> None:
        """vCPUs from AWS when `vcpus` is not configured: the class's, looked up at discovery
        (cached for hours); on Serverless v2, Performance Insights' every poll while it
        answers, else again at the next discovery."""
        if self.db.vcpus is not None or not self._vcpus_due:
            return
        if not instance.instance_class:
            self._set_vcpus(self.vcpus, "unknown: the instance class could not be read")
            return
        if instance.serverless:
            self._vcpus_due = self._serverless_vcpus(instance)
        else:
            self._vcpus_due = False
            self._class_vcpus(instance.instance_class)

    def _class_vcpus(self, instance_class: str) -> None:
        kind = ec2_type(instance_class)
        try:
            vcpus = self.lookup.for_class(instance_class)
        except AwsApiError as exc:
            self._problem("vcpus", "ec2", exc)
            stale = self.lookup.cached(instance_class)
            if stale is not None:
                self._set_vcpus(stale, f"{instance_class}: last DescribeInstanceTypes answer")
            else:
                self._set_vcpus(None, f"unknown: DescribeInstanceTypes {kind} failed ({exc.code})")
            return
        except NoVcpuFigure as exc:
            self._problem("vcpus", "ec2", exc)
            self._set_vcpus(None, f"unknown: {exc}; set databases[].vcpus")
            return
        self._solved("vcpus")
        self._set_vcpus(vcpus, f"{instance_class} (DescribeInstanceTypes {kind})")

    def _serverless_vcpus(self, instance: Instance) -> bool:
        """True when Performance Insights answered (ask again next poll)."""
        if not self.settings.performance_insights:
            self._set_vcpus(None, "unknown: Serverless v2 and aws.performance_insights is off")
            return False
        if instance.performance_insights is False or not instance.resource_id:
            self._set_vcpus(None, "unknown: Serverless v2 without Performance Insights")
            return False
        try:
            vcpus = self.lookup.from_performance_insights(instance.resource_id)
        except (AwsApiError, NoVcpuFigure) as exc:
            self._problem("performance_insights", "pi", exc)
            throttled = isinstance(exc, AwsApiError) and exc.code in THROTTLED
            if throttled and self.vcpus is not None:  # a minute-old figure beats none
                self._set_vcpus(self.vcpus, "Serverless v2: last Performance Insights answer")
                return False
            reason = exc.code if isinstance(exc, AwsApiError) else str(exc)
            self._set_vcpus(None, f"unknown: Serverless v2, Performance Insights: {reason}")
            return False
        self._solved("performance_insights")
        self._set_vcpus(vcpus, "Serverless v2: Performance Insights os.general.numVCPUs")
        return True

    def _set_vcpus(self, vcpus: float | None, origin: str) -> None:
        if vcpus != self.vcpus:
            log.info(
                "vcpus from aws",
                extra=kv(**self._log_fields(), vcpus=vcpus if vcpus else "unknown", why=origin),
            )
        self.vcpus, self.vcpus_from = vcpus, origin
        if self.on_vcpus is not None:
            self.on_vcpus(vcpus)

    # -- CloudWatch ------------------------------------------------------------------------
    def _queries(self, instance: Instance) -> list[tuple[Query, _Metric]]:
        """Serverless metrics only for Serverless v2 (or an instance of unknown class), DBLoad
        only unless Performance Insights is known to be off: AWS bills every query."""
        dims = (("DBInstanceIdentifier", instance.identifier),)
        maybe_serverless = instance.serverless or not instance.instance_class
        return [
            (Query(NAMESPACE, metric.name, dims, "Average"), metric)
            for metric in METRICS
            if (maybe_serverless or not metric.serverless)
            and not (metric.dbload and instance.performance_insights is False)
        ]

    def _samples(self, instance: Instance, series: dict[_Metric, Points]) -> list[Sample]:
        ident = (instance.identifier,)
        role = instance.role
        samples = [
            Sample(
                m.RDS_INSTANCE_INFO, (*ident, instance.instance_class, instance.cluster, role), 1.0
            )
        ]
        if any(newest(got) for metric, got in series.items() if metric.dbload):
            self._dbload_seen = True
        zero_fill = instance.performance_insights is True or self._dbload_seen
        anchor = newest(series.get(_CPU, {})) or max(
            (ts for ts in map(newest, series.values()) if ts is not None), default=None
        )
        for metric, got in series.items() if anchor is not None else ():
            value = got.get(anchor)
            if anchor not in got and metric.dbload and zero_fill:
                value = 0.0  # published only in minutes with load
            if value is not None:
                samples.append(Sample(metric.spec, ident, value * metric.scale))
        if instance.serverless:
            for spec, acus in (
                (m.RDS_SERVERLESS_MIN_ACUS, instance.min_acus),
                (m.RDS_SERVERLESS_MAX_ACUS, instance.max_acus),
            ):
                if acus is not None:
                    samples.append(Sample(spec, ident, acus))
        samples.append(self.metric_data.requested_sample(self.owner))
        return samples

    def _cross_check(self, instance: Instance, dbload: Points) -> None:
        if self.load_check is None:
            return
        self.load_check.record()
        zero_fill = instance.performance_insights is True or self._dbload_seen
        self.load_check.compare(dbload, self.metric_data.window_end(), zero_fill)

    # -- state -----------------------------------------------------------------------------
    def _problem(self, step: str, service: str, exc: Exception) -> None:
        self._problems[step] = str(exc)
        if isinstance(exc, AwsApiError) and exc.code in DENIED:
            self._missing[step] = f"{service}:{exc.operation}"
        else:
            self._missing.pop(step, None)

    def _solved(self, step: str) -> None:
        self._problems.pop(step, None)
        self._missing.pop(step, None)

    def status(self) -> dict[str, object]:
        instance = self.instance or Instance("")
        details: dict[str, object] = {
            "instance": instance.identifier or "not found yet",
            "class": instance.instance_class or "unknown",
            "cluster": instance.cluster or "-",
            "role": instance.role,
            "found_by": instance.found_by,
            "vcpus": self.vcpus,
            "vcpus_from": self.vcpus_from,
            "dbload": self._dbload_state(instance),
            "missing_permissions": ", ".join(sorted(set(self._missing.values()))) or "none",
            "problems": dict(self._problems),
            "discovered_at": _iso(self._discovered_at),
            "last_poll": dict(self._last_poll),
        }
        if instance.serverless:
            details["serverless_acus"] = f"{instance.min_acus} to {instance.max_acus}"
        last = self.load_check.last if self.load_check else None
        details["aas_vs_dbload"] = last.describe() if last else "not compared yet"
        return details

    def _dbload_state(self, instance: Instance) -> str:
        if instance.performance_insights is False:
            return "absent: Performance Insights is off, so AWS publishes no DBLoad"
        if self._dbload_seen:
            return "published"
        return (
            "not seen yet: AWS publishes DBLoad only with Performance Insights on, "
            "and only in minutes with load"
        )


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
