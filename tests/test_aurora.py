"""RDS and Aurora context for a target: the instance found from the DSN's host, its vCPUs from
AWS as pg_vcpus{source="aws"}, AWS's DBLoad and CPU in the same GetMetricData call as RDS
Proxy, Serverless v2 capacity, and what missing permissions and throttling do. Against moto in
server mode behind the fault-injecting proxy (exporter/devtools/aws_emulator.py), which also
answers Performance Insights, an API moto does not have."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from datetime import UTC, datetime

import asyncpg
import pytest

from exporter import metrics as m
from exporter.aws.cloudwatch import MetricData
from exporter.aws.rds_instances import RdsInstanceSource
from exporter.aws.rds_proxy import RdsProxySource
from exporter.config import AwsConfig, ConfigError, DatabaseConfig, DiagnosisConfig, parse
from exporter.core.cardinality import LabelCap
from exporter.core.render import Renderer
from exporter.core.runner import SourceRunner
from exporter.core.store import Store
from exporter.devtools.aws_emulator import (
    REGION,
    create_proxy,
    create_subnets,
    put_datapoints,
    put_instance_datapoints,
)
from exporter.devtools.daemon_process import run_daemon
from exporter.diagnosis.engine import MIN_TICKS, DiagnosisSource
from exporter.postgres.activity import ActivitySource
from exporter.postgres.connection import TargetConnection
from tests import test_rds_proxy

# the RDS Proxy tests' emulator fixtures (moto server, fault proxy, a clean world) and clock
moto_url, fault_proxy, aws = test_rds_proxy.moto_url, test_rds_proxy.fault_proxy, test_rds_proxy.aws
Clock = test_rds_proxy.Clock

SECRET = "pgpressure-aurora-secret-0123456789"
KEY_ID = "AKIAPGPRESSUREAURORA"
DELAY = 120.0
T0 = float(math.floor(time.time() / 60) * 60 + 30)  # the sources' clock at the first poll
JSON11 = {"Content-Type": "application/x-amz-json-1.1"}
JSON10 = {"Content-Type": "application/x-amz-json-1.0"}
XML = {"Content-Type": "text/xml"}


def ec2_error(code: str) -> str:
    return (
        f"<Response><Errors><Error><Code>{code}</Code><Message>You are not authorized to "
        "perform this operation.</Message></Error></Errors><RequestID>1</RequestID></Response>"
    )


def rds_error(code: str) -> str:
    return (
        f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>not allowed"
        "</Message></Error><RequestId>1</RequestId></ErrorResponse>"
    )


THROTTLED = json.dumps(
    {"__type": "com.amazonaws.cloudwatch#ThrottlingException", "message": "Rate exceeded"}
)


def aws_config(url: str, **rds_proxy: object) -> AwsConfig:
    return AwsConfig(
        region=REGION,
        endpoint_url=url,
        access_key_id=KEY_ID,
        secret_access_key=SECRET,
        rds_proxy={"interval": 60, "delay": DELAY, **rds_proxy},
    )


def target(
    host: str = "db.example.internal", name: str = "main", **block: object
) -> DatabaseConfig:
    return DatabaseConfig(name=name, dsn=f"postgresql://monitor@{host}:5432/postgres", aws=block)


def window_end(now: float) -> float:
    return math.floor((now - DELAY) / 60) * 60


def minute(now: float, minutes_back: int) -> datetime:
    """The CloudWatch minute `minutes_back` before the newest one a poll at `now` reads."""
    return datetime.fromtimestamp(window_end(now) - 60 * (minutes_back + 1), UTC)


def create_instance(rds, name: str, instance_class: str, **extra: object) -> str:
    """A PostgreSQL instance; returns its endpoint address."""
    kwargs = {"Engine": "postgres", "AllocatedStorage": 20}
    if "DBClusterIdentifier" in extra:
        kwargs = {"Engine": "aurora-postgresql"}
    item = rds.create_db_instance(
        DBInstanceIdentifier=name,
        DBInstanceClass=instance_class,
        MasterUsername="app",
        MasterUserPassword="not-used-123",
        **kwargs,
        **extra,
    )["DBInstance"]
    return item["Endpoint"]["Address"]


def create_cluster(rds, name: str, **extra: object) -> dict:
    return rds.create_db_cluster(
        DBClusterIdentifier=name,
        Engine="aurora-postgresql",
        MasterUsername="app",
        MasterUserPassword="not-used-123",
        **extra,
    )["DBCluster"]


def instance_source(url, db, clock, metric_data=None, **kwargs) -> RdsInstanceSource:
    config = aws_config(url)
    return RdsInstanceSource(
        db, config, metric_data or MetricData(config, clock), clock=clock, **kwargs
    )


def by_name(samples) -> dict[str, float]:
    return {s.spec.name: s.value for s in samples if s.spec.kind == "gauge"}


def vcpus_of(samples) -> dict[str, float]:
    return {s.labels[0]: s.value for s in samples if s.spec is m.VCPUS}


# --- the instance and its vCPUs ---------------------------------------------------------------


async def test_instance_found_from_its_endpoint_and_vcpus_reach_pg_vcpus(
    aws, fault_proxy, pg
) -> None:
    """The DSN's host is the instance's endpoint: found with DescribeDBInstances, its class
    db.r6g.2xlarge is r6g.2xlarge's 8 vCPUs, and the target's activity source, sampling the
    real PostgreSQL, exports them as pg_vcpus{source="aws"}."""
    host = create_instance(aws["rds"], "orders-db", "db.r6g.2xlarge")
    create_instance(aws["rds"], "billing-db", "db.t3.micro")
    db = target(host)
    activity = ActivitySource(db, TargetConnection(pg_config(pg)), LabelCap(10))
    clock = Clock(T0)
    source = instance_source(fault_proxy.url, db, clock, on_vcpus=activity.use_aws_vcpus)
    try:
        assert vcpus_of(await activity.sample()) == {}  # not known yet: no series at all
        samples = list(await source.sample())
        assert vcpus_of(await activity.sample()) == {"aws": 8.0}
    finally:
        await activity.conn.close()
    info = [s.labels for s in samples if s.spec is m.RDS_INSTANCE_INFO]
    assert info == [("orders-db", "db.r6g.2xlarge", "", "instance")]
    status = source.status()
    assert status["instance"] == "orders-db" and status["found_by"] == "instance endpoint"
    assert status["vcpus"] == 8.0 and "r6g.2xlarge" in status["vcpus_from"]
    assert status["missing_permissions"] == "none"
    assert SECRET not in json.dumps(status) and KEY_ID not in json.dumps(status)
    assert fault_proxy.calls["DescribeInstanceTypes"] == 1


def pg_config(pg) -> DatabaseConfig:
    return DatabaseConfig(name="main", dsn=pg.dsn("postgres"))


async def test_configured_vcpus_win_and_aws_is_not_asked(aws, fault_proxy, pg) -> None:
    host = create_instance(aws["rds"], "orders-db", "db.r6g.2xlarge")
    db = DatabaseConfig(name="main", dsn=f"postgresql://m@{host}/postgres", vcpus=4, aws={})
    activity = ActivitySource(db, TargetConnection(pg_config(pg)), LabelCap(10))
    source = instance_source(fault_proxy.url, db, Clock(T0), on_vcpus=activity.use_aws_vcpus)
    try:
        await source.sample()
        assert vcpus_of(await activity.sample()) == {"config": 4.0}
    finally:
        await activity.conn.close()
    assert fault_proxy.calls["DescribeInstanceTypes"] == 0
    assert source.status()["vcpus_from"].startswith("config")


async def test_a_class_change_is_picked_up_and_instance_types_are_cached(aws, fault_proxy) -> None:
    host = create_instance(aws["rds"], "orders-db", "db.r6g.2xlarge")
    clock = Clock(T0)
    seen: list[float | None] = []
    source = instance_source(fault_proxy.url, target(host), clock, on_vcpus=seen.append)
    await source.sample()
    clock.now += 60  # within discovery_interval: nothing described again
    await source.sample()
    assert fault_proxy.calls["DescribeDBInstances"] == 1

    aws["rds"].modify_db_instance(
        DBInstanceIdentifier="orders-db", DBInstanceClass="db.r6g.4xlarge", ApplyImmediately=True
    )
    clock.now += 300
    samples = list(await source.sample())
    assert seen[-1] == 16.0 and source.status()["class"] == "db.r6g.4xlarge"
    assert [s.labels[1] for s in samples if s.spec is m.RDS_INSTANCE_INFO] == ["db.r6g.4xlarge"]
    assert fault_proxy.calls["DescribeInstanceTypes"] == 2

    # back to the first class within the cache's hours: no new DescribeInstanceTypes call
    aws["rds"].modify_db_instance(
        DBInstanceIdentifier="orders-db", DBInstanceClass="db.r6g.2xlarge", ApplyImmediately=True
    )
    clock.now += 300
    await source.sample()
    assert seen[-1] == 8.0 and fault_proxy.calls["DescribeInstanceTypes"] == 2


async def test_cluster_endpoints_follow_the_writer_and_a_reader(aws, fault_proxy) -> None:
    cluster = create_cluster(aws["rds"], "orders")
    create_instance(aws["rds"], "orders-1", "db.r6g.large", DBClusterIdentifier="orders")
    create_instance(aws["rds"], "orders-2", "db.r6g.xlarge", DBClusterIdentifier="orders")
    clock = Clock(T0)
    writer = instance_source(fault_proxy.url, target(cluster["Endpoint"]), clock)
    reader = instance_source(
        fault_proxy.url, target(cluster["ReaderEndpoint"], name="replica"), clock
    )
    await writer.sample()
    await reader.sample()
    assert (writer.status()["instance"], writer.status()["role"]) == ("orders-1", "writer")
    assert writer.status()["vcpus"] == 2.0  # r6g.large
    assert (reader.status()["instance"], reader.status()["role"]) == ("orders-2", "reader")

    aws["rds"].failover_db_cluster(
        DBClusterIdentifier="orders", TargetDBInstanceIdentifier="orders-2"
    )
    clock.now += 300  # the next discovery
    samples = list(await writer.sample())
    assert writer.status()["instance"] == "orders-2" and writer.status()["vcpus"] == 4.0
    info = [s.labels for s in samples if s.spec is m.RDS_INSTANCE_INFO]
    assert info == [("orders-2", "db.r6g.xlarge", "orders", "writer")]


async def test_an_endpoint_nobody_has_fails_with_what_to_do(aws, fault_proxy) -> None:
    store = Store()
    runner = SourceRunner(
        instance_source(fault_proxy.url, target("db.example.internal"), Clock(T0)), store
    )
    await runner.run_once()
    health = store.health(runner.key)
    assert not health.up
    assert "db.example.internal" in health.last_error
    assert "db_instance_identifier" in health.last_error


# --- CloudWatch: one call for proxies and instances -------------------------------------------


def put_load(cw, instance: str, when: datetime, cpu: float, dbload: float | None) -> None:
    put_instance_datapoints(cw, instance, "CPUUtilization", [cpu], when, "Percent")
    put_instance_datapoints(cw, instance, "DatabaseConnections", [25.0], when, "Count")
    put_instance_datapoints(cw, instance, "FreeableMemory", [2.5e9], when, "Bytes")
    if dbload is not None:
        put_instance_datapoints(cw, instance, "DBLoad", [dbload], when)
        put_instance_datapoints(cw, instance, "DBLoadCPU", [dbload * 0.75], when)
        put_instance_datapoints(cw, instance, "DBLoadNonCPU", [dbload * 0.25], when)
        put_instance_datapoints(cw, instance, "DBLoadRelativeToNumVCPUs", [dbload / 8], when)


async def test_one_get_metric_data_call_for_proxies_and_instances(aws, fault_proxy) -> None:
    rds, cw = aws["rds"], aws["cloudwatch"]
    create_proxy(rds, "orders-proxy", create_subnets(aws["ec2"], REGION))
    orders = create_instance(rds, "orders-db", "db.r6g.2xlarge")
    billing = create_instance(rds, "billing-db", "db.r6g.large")
    quiet = create_instance(rds, "quiet-db", "db.t3.micro")
    clock = Clock(T0)
    put_datapoints(cw, "orders-proxy", "DatabaseConnections", [3.0], minute(T0 + 60, 0))
    put_load(cw, "orders-db", minute(T0 + 60, 0), cpu=42.0, dbload=3.5)
    put_load(cw, "billing-db", minute(T0 + 60, 3), cpu=10.0, dbload=1.0)  # load 3 minutes ago
    put_load(cw, "billing-db", minute(T0 + 60, 0), cpu=5.0, dbload=None)  # none now
    put_load(cw, "quiet-db", minute(T0 + 60, 0), cpu=1.0, dbload=None)  # never any

    metric_data = MetricData(aws_config(fault_proxy.url), clock)
    proxy = RdsProxySource(
        aws_config(fault_proxy.url, enabled=True, logs=False), clock=clock, metric_data=metric_data
    )
    sources = [proxy] + [
        instance_source(fault_proxy.url, target(host, name=name), clock, metric_data)
        for name, host in (("orders", orders), ("billing", billing), ("quiet", quiet))
    ]
    for source in sources:  # the first minute: each registers on its first poll
        await source.sample()
    first = fault_proxy.calls["GetMetricData"]

    clock.now += 60
    polled = [list(await source.sample()) for source in sources]
    assert fault_proxy.calls["GetMetricData"] == first + 1  # one call for all four sources
    orders_values, billing_values, quiet_values = map(by_name, polled[1:])
    assert orders_values == {
        "aws_rds_instance_info": 1.0,
        "aws_rds_cpu_utilization_ratio": pytest.approx(0.42),
        "aws_rds_db_load": 3.5,
        "aws_rds_db_load_cpu": pytest.approx(2.625),
        "aws_rds_db_load_non_cpu": pytest.approx(0.875),
        "aws_rds_db_load_relative_to_num_vcpus": pytest.approx(0.4375),
        "aws_rds_database_connections": 25.0,
        "aws_rds_freeable_memory_bytes": 2.5e9,
    }
    # published before, none in the newest minute: no load then, so 0, not a gap
    assert billing_values["aws_rds_db_load"] == 0.0
    assert billing_values["aws_rds_cpu_utilization_ratio"] == pytest.approx(0.05)
    # never published (Performance Insights off, or never any load): absent, and said so
    assert "aws_rds_db_load" not in quiet_values
    assert sources[3].status()["dbload"].startswith("not seen yet")
    assert sources[1].status()["dbload"] == "published"
    assert by_name(polled[0])["rds_proxy_database_connections"] == 3.0
    # each source counts what it asked for: 8 proxy metrics, 7 per provisioned instance
    requested = [
        next(s.value for s in p if s.spec is m.CLOUDWATCH_METRICS_REQUESTED) for p in polled
    ]
    assert requested[1:] == [14.0, 14.0, 14.0]  # two minutes of 7 queries each


# --- Serverless v2 ------------------------------------------------------------------------------


async def test_serverless_v2_capacity_and_vcpus_from_performance_insights(aws, fault_proxy) -> None:
    rds, cw = aws["rds"], aws["cloudwatch"]
    cluster = create_cluster(
        rds, "orders", ServerlessV2ScalingConfiguration={"MinCapacity": 0.5, "MaxCapacity": 16}
    )
    create_instance(rds, "orders-1", "db.serverless", DBClusterIdentifier="orders")
    resource = rds.describe_db_instances(DBInstanceIdentifier="orders-1")["DBInstances"][0][
        "DbiResourceId"
    ]
    clock = Clock(T0)
    when = minute(T0, 0)
    put_instance_datapoints(cw, "orders-1", "CPUUtilization", [30.0], when, "Percent")
    put_instance_datapoints(cw, "orders-1", "ServerlessDatabaseCapacity", [4.0], when)
    put_instance_datapoints(cw, "orders-1", "ACUUtilization", [25.0], when, "Percent")
    seen: list[float | None] = []
    source = instance_source(
        fault_proxy.url, target(cluster["Endpoint"]), clock, on_vcpus=seen.append
    )

    # Performance Insights has nothing for it yet: vCPUs unknown, capacity still exported
    values = by_name(await source.sample())
    assert values["aws_rds_serverless_database_capacity_acus"] == 4.0
    assert values["aws_rds_acu_utilization_ratio"] == 0.25
    assert values["aws_rds_serverless_min_capacity_acus"] == 0.5
    assert values["aws_rds_serverless_max_capacity_acus"] == 16.0
    assert seen == [None] and source.status()["vcpus_from"].startswith("unknown: Serverless")
    assert source.status()["serverless_acus"] == "0.5 to 16.0"
    assert fault_proxy.calls["DescribeInstanceTypes"] == 0  # no EC2 type for db.serverless

    # with Performance Insights: its os.general.numVCPUs follows the capacity, every poll
    fault_proxy.performance_insights.put(
        resource, "os.general.numVCPUs.avg", [(clock.now - 120, 1.0), (clock.now - 60, 2.0)]
    )
    clock.now += 300  # the next discovery tries Performance Insights again
    await source.sample()
    assert seen[-1] == 2.0
    fault_proxy.performance_insights.put(resource, "os.general.numVCPUs.avg", [(clock.now, 8.0)])
    clock.now += 60
    await source.sample()
    assert seen[-1] == 8.0
    assert "Performance Insights" in source.status()["vcpus_from"]

    # the permission is taken away: unknown again, said so, the capacity still comes
    denied = json.dumps({"__type": "NotAuthorizedException", "Message": "not authorized"})
    fault_proxy.inject_until_cleared("GetResourceMetrics", 403, denied, JSON11)
    clock.now += 60
    values = by_name(await source.sample())
    assert seen[-1] is None and values["aws_rds_serverless_database_capacity_acus"] == 4.0
    assert source.status()["missing_permissions"] == "pi:GetResourceMetrics"


# --- missing permissions and throttling ---------------------------------------------------------


async def test_missing_permissions_are_named_and_the_rest_keeps_working(aws, fault_proxy) -> None:
    host = create_instance(aws["rds"], "orders-db", "db.r6g.2xlarge")
    put_load(aws["cloudwatch"], "orders-db", minute(T0, 0), cpu=42.0, dbload=2.0)
    fault_proxy.inject_until_cleared(
        "DescribeInstanceTypes", 403, ec2_error("UnauthorizedOperation"), XML
    )
    store, clock = Store(), Clock(T0)
    seen: list[float | None] = []
    source = instance_source(fault_proxy.url, target(host), clock, on_vcpus=seen.append)
    runner = SourceRunner(source, store)
    await runner.run_once()

    assert store.health(runner.key).up  # the metrics still come
    samples = dict(store.snapshots())[runner.key].samples
    assert by_name(samples)["aws_rds_db_load"] == 2.0
    status = source.status()
    assert status["missing_permissions"] == "ec2:DescribeInstanceTypes"
    assert status["vcpus"] is None and "DescribeInstanceTypes" in status["vcpus_from"]
    assert seen == [None]
    clock.now += 60  # not asked again every poll, only at the next discovery
    await runner.run_once()
    assert fault_proxy.calls["DescribeInstanceTypes"] == 1

    fault_proxy.clear("DescribeInstanceTypes")  # the policy is fixed
    clock.now += 300
    await runner.run_once()
    assert seen[-1] == 8.0 and source.status()["missing_permissions"] == "none"


async def test_describe_denied_with_a_configured_identifier_still_reads_cloudwatch(
    aws, fault_proxy
) -> None:
    create_instance(aws["rds"], "orders-db", "db.r6g.2xlarge")
    put_load(aws["cloudwatch"], "orders-db", minute(T0, 0), cpu=42.0, dbload=2.0)
    fault_proxy.inject_until_cleared("DescribeDBInstances", 403, rds_error("AccessDenied"), XML)
    source = instance_source(fault_proxy.url, target(db_instance_identifier="orders-db"), Clock(T0))
    values = by_name(await source.sample())
    assert values["aws_rds_cpu_utilization_ratio"] == pytest.approx(0.42)
    status = source.status()
    assert status["missing_permissions"] == "rds:DescribeDBInstances"
    assert status["instance"] == "orders-db" and status["class"] == "unknown"


async def test_discovery_denied_fails_this_target_only(aws, fault_proxy) -> None:
    """Without an identifier, a denied DescribeDBInstances leaves nothing to read: this
    source fails and says which permission; RDS Proxy, sharing the reader, goes on."""
    rds, cw = aws["rds"], aws["cloudwatch"]
    create_proxy(rds, "orders-proxy", create_subnets(aws["ec2"], REGION))
    host = create_instance(rds, "orders-db", "db.r6g.2xlarge")
    put_datapoints(cw, "orders-proxy", "DatabaseConnections", [3.0], minute(T0, 0))
    fault_proxy.inject_until_cleared("DescribeDBInstances", 403, rds_error("AccessDenied"), XML)
    clock = Clock(T0)
    metric_data = MetricData(aws_config(fault_proxy.url), clock)
    store = Store()
    instance = SourceRunner(
        instance_source(fault_proxy.url, target(host), clock, metric_data), store
    )
    proxy = SourceRunner(
        RdsProxySource(
            aws_config(fault_proxy.url, enabled=True, logs=False),
            clock=clock,
            metric_data=metric_data,
        ),
        store,
    )
    await instance.run_once()
    await proxy.run_once()
    failed = store.health(instance.key)
    assert not failed.up and "DescribeDBInstances" in failed.last_error
    assert "AccessDenied" in failed.last_error
    assert instance.source.status()["missing_permissions"] == "rds:DescribeDBInstances"
    assert store.health(proxy.key).up
    text = Renderer(store).render().decode()
    assert 'rds_proxy_database_connections{proxy="orders-proxy"' in text
    assert 'pgpressure_source_up{source="rds_instance",target="main"} 0.0' in text


async def test_a_throttled_rediscovery_keeps_the_instance_it_had(aws, fault_proxy) -> None:
    host = create_instance(aws["rds"], "orders-db", "db.r6g.2xlarge")
    put_load(aws["cloudwatch"], "orders-db", minute(T0 + 300, 0), cpu=42.0, dbload=None)
    store, clock = Store(), Clock(T0)
    runner = SourceRunner(instance_source(fault_proxy.url, target(host), clock), store)
    await runner.run_once()
    fault_proxy.inject_until_cleared(
        "DescribeDBInstances", 400, rds_error("Throttling"), {**XML, "x-amzn-query-error": "x"}
    )
    clock.now += 300  # the next discovery is throttled
    await runner.run_once()
    assert store.health(runner.key).up
    status = runner.source.status()
    assert status["instance"] == "orders-db" and status["vcpus"] == 8.0
    assert "Throttling" in status["problems"]["discovery"]
    assert status["missing_permissions"] == "none"  # throttled is not denied
    cpu = by_name(dict(store.snapshots())[runner.key].samples)["aws_rds_cpu_utilization_ratio"]
    assert cpu == pytest.approx(0.42)


async def test_throttled_metric_data_is_one_failed_call_for_the_minute(aws, fault_proxy) -> None:
    """A throttled GetMetricData fails every source whose queries it carried, once: the
    minute's other sources are not answered with more calls; the last values stay."""
    rds, cw = aws["rds"], aws["cloudwatch"]
    hosts = [create_instance(rds, name, "db.r6g.large") for name in ("a-db", "b-db")]
    for name in ("a-db", "b-db"):
        put_load(cw, name, minute(T0, 0), cpu=10.0, dbload=1.0)
        put_load(cw, name, minute(T0 + 120, 0), cpu=20.0, dbload=1.0)
    clock = Clock(T0)
    metric_data = MetricData(aws_config(fault_proxy.url), clock)
    store = Store()
    runners = [
        SourceRunner(instance_source(fault_proxy.url, target(h, name=n), clock, metric_data), store)
        for n, h in zip(("a", "b"), hosts, strict=True)
    ]
    for runner in runners:
        await runner.run_once()
    before = [dict(store.snapshots())[r.key].samples for r in runners]

    clock.now += 60
    fault_proxy.inject(
        "GetMetricData", 400, THROTTLED, {**JSON10, "x-amzn-query-error": "Throttling;Sender"}
    )
    calls = fault_proxy.calls["GetMetricData"]
    for runner in runners:
        await runner.run_once()
    assert fault_proxy.calls["GetMetricData"] == calls + 1
    for runner, kept in zip(runners, before, strict=True):
        health = store.health(runner.key)
        assert not health.up and "Throttling" in health.last_error
        assert dict(store.snapshots())[runner.key].samples == kept

    clock.now += 60
    for runner in runners:
        store.health(runner.key).next_attempt = 0.0  # the backoff has passed
        await runner.run_once()
        assert store.health(runner.key).up
        cpu = by_name(dict(store.snapshots())[runner.key].samples)
        assert cpu["aws_rds_cpu_utilization_ratio"] == pytest.approx(0.20)
    assert fault_proxy.calls["GetMetricData"] == calls + 2


# --- pgpressure's load against AWS's ----------------------------------------------------------


async def test_load_that_disagrees_with_dbload_is_logged(aws, fault_proxy, pg, caplog) -> None:
    """Two sessions sleep in the real PostgreSQL while the activity source samples once a
    (fake) minute, each sample standing for 60 s: pgpressure's load is 2. AWS's DBLoad says 4
    for the same 15 minutes: a warning once; when DBLoad says 2, an info line."""
    host = create_instance(aws["rds"], "orders-db", "db.r6g.2xlarge")
    db = DatabaseConfig(
        name="main", dsn=f"postgresql://m@{host}/postgres", activity={"interval": 60}, aws={}
    )
    conn = TargetConnection(pg_config(pg))
    activity = ActivitySource(db, conn, LabelCap(10))
    clock = Clock(T0)
    cw = aws["cloudwatch"]
    for back in range(40):  # every minute any poll below reads: 4 sessions by AWS's count
        when = minute(T0, back - 20)
        put_instance_datapoints(cw, "orders-db", "CPUUtilization", [50.0], when, "Percent")
        put_instance_datapoints(cw, "orders-db", "DBLoad", [4.0], when)
    source = instance_source(
        fault_proxy.url, db, clock, active_seconds=lambda: activity.active_seconds_total
    )
    caplog.set_level(logging.INFO, logger="pgpressure.rds_instance")
    sleepers = [await asyncpg.connect(pg.dsn("postgres")) for _ in range(2)]
    running = [asyncio.create_task(c.execute("SELECT pg_sleep(60)")) for c in sleepers]
    try:
        await asyncio.sleep(0.5)
        for _ in range(20):
            await activity.sample()
            await source.sample()
            clock.now += 60
    finally:
        for task, c in zip(running, sleepers, strict=True):
            task.cancel()
            c.terminate()
        await conn.close()
    warned = [r for r in caplog.records if "disagree" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    assert warned[0].fields["aas"] == pytest.approx(2.0, abs=0.2)
    assert warned[0].fields["dbload"] == 4.0 and warned[0].fields["target"] == "main"
    assert "disagree" in source.status()["aas_vs_dbload"]


# --- configuration -----------------------------------------------------------------------------


def test_the_aws_block_of_a_target_and_its_mistakes_with_key_and_line() -> None:
    ok = parse(
        "databases:\n  - name: main\n    dsn: postgresql://m@orders.cluster-x.rds.amazonaws.com/db\n"
        "    aws: {discovery_interval: 10m}\n"
    )
    block = ok.databases[0].aws
    assert block is not None and block.discovery_interval == 600.0
    assert block.db_instance_identifier is None and block.performance_insights is True
    assert ok.databases[0].host() == "orders.cluster-x.rds.amazonaws.com"
    assert parse("databases: []\n").databases == []
    mistakes = {
        "    aws: {instance: orders-1}\n": "c.yaml line 4: databases[0].aws.instance: unknown key",
        "    aws:\n      db_instance_identifier: 1orders\n": (
            "c.yaml line 5: databases[0].aws.db_instance_identifier: not an RDS DB instance "
            "identifier"
        ),
    }
    for block_text, message in mistakes.items():
        with pytest.raises(ConfigError) as raised:
            parse(
                f"databases:\n  - name: main\n    dsn: postgresql://m@h/db\n{block_text}", "c.yaml"
            )
        assert str(raised.value).startswith(message)
    with pytest.raises(ConfigError) as raised:
        parse("databases:\n  - name: main\n    dsn: postgresql:///db\n    aws: {}\n", "c.yaml")
    assert str(raised.value) == (
        "c.yaml line 4: databases[0].aws: the dsn names no single host to find the instance "
        "by: set aws.db_instance_identifier"
    )


# --- the diagnosis judges against the vCPUs AWS gave ------------------------------------------

BURN_CPU = """DO $$BEGIN
  WHILE clock_timestamp() < statement_timestamp() + interval '4 s' LOOP END LOOP;
END$$"""


@pytest.mark.parametrize("vcpus_from_aws", [True, False], ids=["aws", "none"])
async def test_database_cpu_saturated_uses_the_vcpus_from_aws(
    aws, fault_proxy, pg, vcpus_from_aws
) -> None:
    """Two sessions burn CPU in the real PostgreSQL; the instance's class, db.t2.micro, has one
    vCPU. With the vCPUs from AWS the diagnosis finds the database CPU-saturated; with no vCPUs
    configured or read from anywhere it says nothing about CPU (it never guesses)."""
    host = create_instance(aws["rds"], "orders-db", "db.t2.micro")
    db = DatabaseConfig(
        name="main",
        dsn=f"postgresql://m@{host}/postgres",
        activity={"interval": 15},  # each sample stands for one 15 s tick of the fake clock
        aws={} if vcpus_from_aws else None,
    )
    conn = TargetConnection(pg_config(pg))
    store, clock = Store(), Clock(T0)
    activity = SourceRunner(ActivitySource(db, conn, LabelCap(10)), store)
    if vcpus_from_aws:
        await instance_source(
            fault_proxy.url, db, clock, on_vcpus=activity.source.use_aws_vcpus
        ).sample()
    diagnosis = DiagnosisSource(DiagnosisConfig(interval=15, window=60), store, clock=clock)
    burners = [await asyncpg.connect(pg.dsn("postgres")) for _ in range(2)]
    burning = [asyncio.create_task(c.execute(BURN_CPU)) for c in burners]
    try:
        await asyncio.sleep(0.3)
        for _ in range(MIN_TICKS + 1):
            await activity.run_once()
            findings = diagnosis.evaluate()
            clock.now += 15
    finally:
        await asyncio.gather(*burning, return_exceptions=True)
        for c in burners:
            await c.close()
        await conn.close()
    assert vcpus_of(dict(store.snapshots())[activity.key].samples) == (
        {"aws": 1.0} if vcpus_from_aws else {}
    )
    rules = {s.labels[0] for s in findings}
    assert ("database_cpu_saturated" in rules) is vcpus_from_aws


# --- the whole daemon ---------------------------------------------------------------------------


def test_the_daemon_exports_vcpus_from_aws_for_a_target(aws, fault_proxy, pg) -> None:
    create_instance(aws["rds"], "orders-db", "db.r6g.2xlarge")
    now = time.time()
    put_load(aws["cloudwatch"], "orders-db", minute(now, 0), cpu=42.0, dbload=None)
    config = f"""
databases:
  - name: main
    dsn: {pg.dsn("postgres")}
    aws: {{db_instance_identifier: orders-db}}
ingest: {{enabled: false}}
aws:
  region: {REGION}
  endpoint_url: {fault_proxy.url}
  access_key_id: {KEY_ID}
  secret_access_key: {SECRET}
"""
    with run_daemon(config) as daemon:
        daemon.wait_for(lambda: daemon.value("pg_vcpus", target="main", source="aws") == 8.0)
        assert daemon.value("aws_rds_cpu_utilization_ratio", db_instance="orders-db") == (
            pytest.approx(0.42)
        )
        assert daemon.value("pgpressure_source_up", source="rds_instance", target="main") == 1
        page = daemon.get("/").text
        assert "rds_instance" in page and "not seen yet" in page
        assert "8 vCPUs (from AWS)" in page  # the target's header, as pg_vcpus says
        assert SECRET not in page and SECRET not in daemon.log()
