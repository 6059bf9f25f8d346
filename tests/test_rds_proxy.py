"""The RDS Proxy source against a real AWS API emulator (moto in server mode), through a small
HTTP proxy that counts requests per API operation and injects faults
(exporter/devtools/aws_emulator.py)."""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from exporter import metrics as m
from exporter.aws.clients import AwsApiError, Clients, TooManyPages
from exporter.aws.rds_proxy import RdsProxySource, _plausible
from exporter.config import AwsConfig
from exporter.core.render import Renderer
from exporter.core.runner import SourceRunner
from exporter.core.store import Store
from exporter.devtools.aws_emulator import (
    PIN_LINE,
    REGION,
    SETTINGS_REASON,
    FaultProxy,
    clients,
    create_proxy,
    create_subnets,
    moto_server,
    put_datapoints,
    put_log_lines,
    reset_moto,
)
from exporter.pinning.statements import REASONS

SECRET = "pgpressure-test-secret-0123456789"
KEY_ID = "AKIAPGPRESSURETEST01"

JSON10 = {"Content-Type": "application/x-amz-json-1.0"}
JSON11 = {"Content-Type": "application/x-amz-json-1.1"}
THROTTLED = json.dumps(
    {"__type": "com.amazonaws.cloudwatch#ThrottlingException", "message": "Rate exceeded"}
)


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture(scope="module")
def fault_proxy(moto_url: str) -> Iterator[FaultProxy]:
    with FaultProxy(moto_url) as proxy:
        yield proxy


@pytest.fixture
def aws(moto_url: str, fault_proxy: FaultProxy):
    """A clean emulator; boto3 clients that talk to it directly (setup is not counted)."""
    reset_moto(moto_url)
    fault_proxy.reset()
    return clients(moto_url, "ec2", "rds", "cloudwatch", "logs")


# --- the world: proxies, datapoints, log lines -------------------------------------------

T0 = float(math.floor(time.time()))  # the source's clock at the first poll
DELAY = 120.0
WINDOW_END = math.floor((T0 - DELAY) / 60) * 60


def _at(seconds_before_window_end: float) -> datetime:
    return datetime.fromtimestamp(WINDOW_END - seconds_before_window_end, UTC)


ORDERS_LINES = [
    PIN_LINE.format(c=1, d=11, reason=SETTINGS_REASON.format(digest="set search_path to $1,$2,$3")),
    PIN_LINE.format(c=2, d=12, reason=SETTINGS_REASON.format(digest="set search_path to $1,$2,$3")),
    PIN_LINE.format(c=3, d=13, reason=SETTINGS_REASON.format(digest="set extra_float_digits = $1")),
    PIN_LINE.format(c=4, d=14, reason="A parse message was detected."),
    PIN_LINE.format(c=5, d=15, reason="A parse message was detected."),
    PIN_LINE.format(c=6, d=16, reason=SETTINGS_REASON.format(digest="select pg_advisory_lock($1)")),
    PIN_LINE.format(c=7, d=17, reason=SETTINGS_REASON.format(digest="create temp table t (a int)")),
    PIN_LINE.format(c=8, d=18, reason=SETTINGS_REASON.format(digest="select nextval($1)")),
    PIN_LINE.format(c=9, d=19, reason=SETTINGS_REASON.format(digest="select nextval($1)")),
    # not pins: a warning about a possible pin, and ordinary connection chatter
    "[INFO] [proxyEndpoint=default] [clientConnection=10] If this prepared statement runs, the "
    "client session will be pinned. Reason: SQL changed session settings that the proxy "
    "doesn't track.",
    "[INFO] [proxyEndpoint=default] A new client connected from 10.0.1.17:52344.",
]
ORDERS_REASONS = {
    "session_settings": 3,
    "prepared_statement": 2,
    "advisory_lock": 1,
    "temporary_object": 1,
    "sequence": 2,
}


def build_world(aws) -> None:
    ec2, rds, cw, logs = aws["ec2"], aws["rds"], aws["cloudwatch"], aws["logs"]
    subnets = create_subnets(ec2, REGION)
    rds.create_db_instance(
        DBInstanceIdentifier="orders-db",
        Engine="postgres",
        DBInstanceClass="db.t3.micro",
        MasterUsername="app",
        MasterUserPassword="not-used-123",
        AllocatedStorage=20,
    )
    for name in ("orders-proxy", "billing-proxy", "idle-proxy"):
        create_proxy(rds, name, subnets)
    create_proxy(rds, "legacy-mysql-proxy", subnets, engine="MYSQL")
    rds.register_db_proxy_targets(
        DBProxyName="orders-proxy", TargetGroupName="default", DBInstanceIdentifiers=["orders-db"]
    )

    # orders-proxy, ProxyName only. Two proxy hosts report in the same minute: Sum adds them,
    # Average averages the latencies (microseconds).
    put_datapoints(
        cw, "orders-proxy", "DatabaseConnections", [2.0], _at(240)
    )  # older: not the newest
    put_datapoints(cw, "orders-proxy", "DatabaseConnections", [3.0, 4.0], _at(90))
    put_datapoints(cw, "orders-proxy", "DatabaseConnections", [999.0], _at(-30))  # after the window
    put_datapoints(
        cw, "orders-proxy", "DatabaseConnectionsCurrentlySessionPinned", [2.0, 3.0], _at(90)
    )
    put_datapoints(cw, "orders-proxy", "DatabaseConnectionsCurrentlyBorrowed", [1.0, 1.0], _at(90))
    put_datapoints(cw, "orders-proxy", "DatabaseConnectionsCurrentlyInTransaction", [1.0], _at(90))
    put_datapoints(cw, "orders-proxy", "MaxDatabaseConnectionsAllowed", [45.0, 45.0], _at(90))
    put_datapoints(cw, "orders-proxy", "ClientConnections", [20.0, 22.0], _at(90))
    put_datapoints(
        cw,
        "orders-proxy",
        "DatabaseConnectionsBorrowLatency",
        [1500.0, 2500.0],
        _at(90),
        unit="Microseconds",
    )
    put_datapoints(
        cw, "orders-proxy", "QueryDatabaseResponseLatency", [800.0], _at(90), unit="Microseconds"
    )
    # per target (dimension set 3) and per role (set 4, not read)
    target = {"TargetGroup": "default", "Target": "orders-db"}
    put_datapoints(cw, "orders-proxy", "DatabaseConnections", [6.0], _at(90), target)
    put_datapoints(
        cw, "orders-proxy", "DatabaseConnectionsCurrentlySessionPinned", [4.0], _at(90), target
    )
    put_datapoints(
        cw,
        "orders-proxy",
        "QueryDatabaseResponseLatency",
        [1200.0],
        _at(90),
        target,
        unit="Microseconds",
    )
    put_datapoints(
        cw,
        "orders-proxy",
        "DatabaseConnections",
        [100.0],
        _at(90),
        {"TargetGroup": "default", "TargetRole": "READ_WRITE"},
    )
    # billing-proxy reports connections but has never pinned one: pinned is 0, not absent
    put_datapoints(cw, "billing-proxy", "DatabaseConnections", [3.0], _at(60))
    # idle-proxy: nothing at all, and no log group

    put_log_lines(logs, "orders-proxy", ORDERS_LINES, T0 - 60)
    put_log_lines(logs, "billing-proxy", [ORDERS_LINES[-1]], T0 - 30)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_source(url: str, clock: Clock, **rds_proxy: object) -> RdsProxySource:
    config = AwsConfig(
        region=REGION,
        endpoint_url=url,
        access_key_id=KEY_ID,
        secret_access_key=SECRET,
        rds_proxy={"enabled": True, "interval": 60, "delay": DELAY, **rds_proxy},
    )
    return RdsProxySource(config, clock=clock, log_call_spacing=0)


def values(samples) -> dict[tuple[str, tuple[str, ...]], float]:
    return {(s.spec.name, s.labels): s.value for s in samples}


def gauges(samples, labels: tuple[str, str, str]) -> dict[str, float]:
    return {s.spec.name: s.value for s in samples if s.spec.kind == "gauge" and s.labels == labels}


def pin_counts(samples, proxy: str) -> dict[str, float]:
    return {
        s.labels[1]: s.value
        for s in samples
        if s.spec is m.RDS_PROXY_PINNING_EVENTS and s.labels[0] == proxy
    }


# --- tests ----------------------------------------------------------------------------------


async def test_metrics_units_reasons_and_one_batched_call(aws, fault_proxy, caplog) -> None:
    build_world(aws)
    clock = Clock(T0)
    source = make_source(fault_proxy.url, clock)
    caplog.set_level(logging.INFO, logger="pgpressure.rds_proxy")

    samples = list(await source.sample())

    assert gauges(samples, ("orders-proxy", "", "")) == {
        "rds_proxy_database_connections": 7.0,  # newest minute, Sum of two hosts
        "rds_proxy_database_connections_currently_session_pinned": 5.0,
        "rds_proxy_database_connections_currently_borrowed": 2.0,
        "rds_proxy_database_connections_currently_in_transaction": 1.0,
        "rds_proxy_max_database_connections_allowed": 90.0,
        "rds_proxy_client_connections": 42.0,
        "rds_proxy_database_connections_borrow_latency_seconds": pytest.approx(0.002),
        "rds_proxy_query_database_response_latency_seconds": pytest.approx(0.0008),
    }
    # Per target: only what CloudWatch has; no ClientConnections (not published per target).
    assert gauges(samples, ("orders-proxy", "default", "orders-db")) == {
        "rds_proxy_database_connections": 6.0,
        "rds_proxy_database_connections_currently_session_pinned": 4.0,
        "rds_proxy_query_database_response_latency_seconds": pytest.approx(0.0012),
    }
    # Reporting but never pinned: pinned is 0; everything without a datapoint is absent.
    assert gauges(samples, ("billing-proxy", "", "")) == {
        "rds_proxy_database_connections": 3.0,
        "rds_proxy_database_connections_currently_session_pinned": 0.0,
    }
    assert not [s for s in samples if s.labels[:1] == ("idle-proxy",)]
    assert not [s for s in samples if s.labels[:1] == ("legacy-mysql-proxy",)]
    assert 100.0 not in {s.value for s in samples}  # the TargetRole dimension set is not read
    assert 999.0 not in {s.value for s in samples}  # newer than `delay`: not published yet

    # every reason is exported (0 until seen) so rate() works from the first pin
    assert pin_counts(samples, "orders-proxy") == {
        reason: float(ORDERS_REASONS.get(reason, 0)) for reason in REASONS
    }
    assert set(pin_counts(samples, "billing-proxy").values()) == {0.0}
    assert pin_counts(samples, "idle-proxy") == {}

    # One GetMetricData call for all proxies; its cost counted per metric query:
    # 3 PostgreSQL proxies x 8 metrics + 6 per-target metrics for orders-db.
    assert fault_proxy.calls["GetMetricData"] == 1
    requested = values(samples)[("pgpressure_cloudwatch_metrics_requested_total", ())]
    assert requested == 3 * 8 + 6
    assert fault_proxy.calls["DescribeDBProxies"] == 1
    assert fault_proxy.calls["FilterLogEvents"] == 3
    missing = [r for r in caplog.records if "log group missing" in r.getMessage()]
    assert len(missing) == 1 and missing[0].fields["proxy"] == "idle-proxy"

    # A minute later: new lines are counted once, the overlap is not counted twice, the
    # missing log group is not retried before discovery_interval, discovery is not repeated.
    put_log_lines(
        aws["logs"], "orders-proxy", [ORDERS_LINES[3], ORDERS_LINES[3]], T0 + 20, create=False
    )
    clock.now = T0 + 60
    samples = list(await source.sample())
    assert pin_counts(samples, "orders-proxy")["prepared_statement"] == 4.0
    assert pin_counts(samples, "orders-proxy")["session_settings"] == 3.0
    assert fault_proxy.calls["GetMetricData"] == 2
    assert values(samples)[("pgpressure_cloudwatch_metrics_requested_total", ())] == 2 * 30
    assert fault_proxy.calls["FilterLogEvents"] == 5
    assert fault_proxy.calls["DescribeDBProxies"] == 1
    assert len([r for r in caplog.records if "log group missing" in r.getMessage()]) == 1

    status = source.status()
    text = json.dumps(status)
    assert SECRET not in text and KEY_ID not in text
    names = [p["name"] for p in status["proxies"]]
    assert names == ["billing-proxy", "idle-proxy", "orders-proxy"]  # by name, like the cap
    by_name = {p["name"]: p for p in status["proxies"]}
    orders = by_name["orders-proxy"]
    assert orders["target_groups"][0]["targets"][0]["id"] == "orders-db"
    assert orders["cloudwatch_targets"] == [{"target_group": "default", "target": "orders-db"}]
    assert by_name["idle-proxy"]["logs"] == "log group missing"
    assert status["last_poll"]["get_metric_data_calls"] == 1


async def test_renders_as_prometheus_text(aws, fault_proxy) -> None:
    build_world(aws)
    source = make_source(fault_proxy.url, Clock(T0))
    store = Store()
    await SourceRunner(source, store).run_once()
    text = Renderer(store).render().decode()
    assert (
        'rds_proxy_database_connections{proxy="orders-proxy",target="orders-db",'
        'target_group="default"} 6.0'
    ) in text
    assert 'rds_proxy_pinning_events_total{proxy="orders-proxy",reason="sequence"} 2.0' in text
    assert "pgpressure_cloudwatch_metrics_requested_total 30.0" in text
    assert 'pgpressure_source_up{source="rds_proxy",target=""} 1.0' in text


async def test_configured_proxies_skip_rds_discovery(aws, fault_proxy) -> None:
    build_world(aws)
    source = make_source(fault_proxy.url, Clock(T0), proxies=["orders-proxy"])
    samples = list(await source.sample())
    assert fault_proxy.calls["DescribeDBProxies"] == 0
    assert fault_proxy.calls["DescribeDBProxyTargets"] == 0
    assert gauges(samples, ("orders-proxy", "", ""))["rds_proxy_database_connections"] == 7.0
    assert values(samples)[("pgpressure_cloudwatch_metrics_requested_total", ())] == 14


async def test_implausible_datapoints_are_skipped_and_discovery_is_capped(
    aws, fault_proxy, caplog
) -> None:
    build_world(aws)
    cw = aws["cloudwatch"]
    # The newest DatabaseConnections datapoint (the minute of 3.0 at _at(60)) sums to -2: only
    # the filter keeps it, and the rest of its minute, from being exported; the minute before
    # is (moto, like AWS, refuses NaN and infinities on input; the unit test below covers those).
    put_datapoints(cw, "billing-proxy", "DatabaseConnections", [-5.0], _at(60))
    put_datapoints(cw, "billing-proxy", "ClientConnections", [50.0], _at(60))
    put_datapoints(cw, "billing-proxy", "DatabaseConnections", [4.0], _at(120))
    put_datapoints(cw, "billing-proxy", "ClientConnections", [8.0], _at(120))
    caplog.set_level(logging.WARNING, logger="pgpressure.rds_proxy")
    source = make_source(fault_proxy.url, Clock(T0), max_proxies=2, logs=False)

    samples = list(await source.sample())

    # billing-proxy and idle-proxy are the first two by name; orders-proxy is left out
    assert {s.labels[0] for s in samples if s.spec.kind == "gauge"} == {"billing-proxy"}
    assert gauges(samples, ("billing-proxy", "", "")) == {
        "rds_proxy_database_connections": 4.0,  # the newest *plausible* datapoint
        "rds_proxy_database_connections_currently_session_pinned": 0.0,
        "rds_proxy_client_connections": 8.0,  # from the same minute
    }
    messages = {r.getMessage(): r for r in caplog.records}
    capped = messages[
        "more rds proxies than max_proxies; list the ones to read in rds_proxy.proxies"
    ]
    assert (capped.fields["found"], capped.fields["skipped"]) == (3, 1)
    skipped = [r for m, r in messages.items() if m.startswith("cloudwatch returned datapoints")]
    assert skipped and skipped[0].fields["datapoints"] == 1


async def test_values_of_a_label_set_come_from_one_minute(aws, fault_proxy) -> None:
    build_world(aws)
    cw = aws["cloudwatch"]
    # billing-proxy pinned connections three minutes ago and AWS stopped publishing the pinned
    # count when they were released; DatabaseConnections goes on (3.0 at _at(60)).
    put_datapoints(
        cw, "billing-proxy", "DatabaseConnectionsCurrentlySessionPinned", [5.0], _at(180)
    )
    put_datapoints(cw, "billing-proxy", "DatabaseConnections", [6.0], _at(180))
    put_datapoints(cw, "billing-proxy", "ClientConnections", [40.0], _at(180))
    # the same per target: connections newer than orders-db's pinned 4.0 at _at(90)
    target = {"TargetGroup": "default", "Target": "orders-db"}
    put_datapoints(cw, "orders-proxy", "DatabaseConnections", [5.0], _at(30), target)
    # idle-proxy has no DatabaseConnections datapoint at all: its newest minute of any metric
    put_datapoints(cw, "idle-proxy", "DatabaseConnectionsCurrentlySessionPinned", [1.0], _at(150))
    put_datapoints(cw, "idle-proxy", "ClientConnections", [2.0], _at(150))
    put_datapoints(cw, "idle-proxy", "ClientConnections", [1.0], _at(30))
    source = make_source(fault_proxy.url, Clock(T0), logs=False)

    samples = list(await source.sample())

    # the stale pinned count is not paired with fresh connections: nothing pinned now is 0
    assert gauges(samples, ("billing-proxy", "", "")) == {
        "rds_proxy_database_connections": 3.0,
        "rds_proxy_database_connections_currently_session_pinned": 0.0,
    }
    assert gauges(samples, ("orders-proxy", "default", "orders-db")) == {
        "rds_proxy_database_connections": 5.0,
        "rds_proxy_database_connections_currently_session_pinned": 0.0,
    }
    # without connections to compare with, the pinned count is not invented either way
    assert gauges(samples, ("idle-proxy", "", "")) == {"rds_proxy_client_connections": 1.0}
    # a label set whose minutes agree is exported whole
    assert len(gauges(samples, ("orders-proxy", "", ""))) == 8


@pytest.mark.parametrize(
    ("value", "plausible"),
    [
        (0, True),
        (3.5, True),
        (-1.0, False),
        (math.nan, False),
        (math.inf, False),
        (True, False),
        ("7", False),
        (None, False),
    ],
)
def test_plausible_datapoints(value: object, plausible: bool) -> None:
    assert _plausible(value) is plausible


async def test_more_than_500_queries_are_split_into_calls_of_500(aws, fault_proxy) -> None:
    names = [f"proxy-{i:02d}" for i in range(70)]  # 70 x 8 = 560 metric queries
    source = make_source(fault_proxy.url, Clock(T0), proxies=names, logs=False)
    samples = list(await source.sample())
    assert fault_proxy.calls["GetMetricData"] == 2
    assert values(samples)[("pgpressure_cloudwatch_metrics_requested_total", ())] == 560
    assert fault_proxy.calls["FilterLogEvents"] == 0


FAULTS = {
    "throttled": (
        "GetMetricData",
        400,
        THROTTLED,
        {**JSON10, "x-amzn-query-error": "Throttling;Sender"},
        "Throttling",
    ),
    "server error": (
        "GetMetricData",
        500,
        "<html>Internal Server Error</html>",
        {"Content-Type": "text/html"},
        "500",
    ),
    "malformed body": ("GetMetricData", 200, "{not json at all", JSON10, "MalformedResponse"),
    # (a throttled FilterLogEvents call does not fail the poll: see test_throttled_logs_...)
    "logs server error": (
        "FilterLogEvents",
        503,
        json.dumps({"__type": "ServiceUnavailableException", "message": "Try again"}),
        JSON11,
        "ServiceUnavailableException",
    ),
    "discovery 503": (
        "DescribeDBProxies",
        503,
        "<ErrorResponse><Error><Code>ServiceUnavailable</Code><Message>Service "
        "unavailable</Message></Error></ErrorResponse>",
        {"Content-Type": "text/xml"},
        "ServiceUnavailable",
    ),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_faults_back_off_and_keep_the_last_values(aws, fault_proxy, fault) -> None:
    build_world(aws)
    clock = Clock(T0)
    # discovery every poll, so the DescribeDBProxies fault is hit on the second poll too
    source = make_source(
        fault_proxy.url, clock, **({"discovery_interval": 1} if fault == "discovery 503" else {})
    )
    store = Store()
    runner = SourceRunner(source, store)
    await runner.run_once()
    health = store.health(runner.key)
    assert health.up
    before = dict(store.snapshots())[runner.key].samples

    operation, status, body, headers, code = FAULTS[fault]
    fault_proxy.inject(operation, status, body, headers)
    put_log_lines(aws["logs"], "orders-proxy", [ORDERS_LINES[0]], T0 + 10, create=False)
    clock.now = T0 + 60
    await runner.run_once()  # must not raise
    assert not health.up and health.errors_total == 1
    assert code in health.last_error and operation in health.last_error
    assert SECRET not in health.last_error
    assert health.next_attempt > time.monotonic()  # backing off
    assert dict(store.snapshots())[runner.key].samples == before  # last values kept

    await runner.run_once()  # inside the backoff: not attempted
    assert runner.attempts == 2

    health.next_attempt = 0.0  # time passes
    clock.now = T0 + 120
    await runner.run_once()
    assert health.up and health.errors_total == 1
    after = dict(store.snapshots())[runner.key].samples
    # the line written during the outage is counted exactly once
    assert pin_counts(after, "orders-proxy")["session_settings"] == 4.0
    # two minutes on, the window has moved past the datapoint that was too fresh at first
    assert gauges(after, ("orders-proxy", "", ""))["rds_proxy_database_connections"] == 999.0


async def test_expired_credentials_rebuild_the_clients(aws, fault_proxy) -> None:
    build_world(aws)
    source = make_source(fault_proxy.url, Clock(T0))
    await source.sample()
    fault_proxy.inject(
        "GetMetricData",
        400,
        json.dumps(
            {
                "__type": "ExpiredTokenException",
                "message": "The security token included in the request is expired",
            }
        ),
        JSON10,
    )
    with pytest.raises(AwsApiError) as raised:
        await source.sample()
    assert raised.value.code == "ExpiredTokenException"
    assert not source.clients.built()  # rebuilt from the credential chain next time
    await source.sample()


async def test_assumes_the_configured_role_once(aws, fault_proxy) -> None:
    build_world(aws)
    source = RdsProxySource(role_config(fault_proxy.url), clock=Clock(T0), log_call_spacing=0)
    for _ in range(2):
        samples = list(await source.sample())
    assert fault_proxy.calls["AssumeRole"] == 1
    assert gauges(samples, ("orders-proxy", "", ""))["rds_proxy_database_connections"] == 7.0
    assert source.status()["assume_role"] is True


def role_config(url: str) -> AwsConfig:
    return AwsConfig(
        region=REGION,
        endpoint_url=url,
        access_key_id=KEY_ID,
        secret_access_key=SECRET,
        role_arn="arn:aws:iam::123456789012:role/pgpressure-reader",
        rds_proxy={"enabled": True, "delay": DELAY},
    )


async def test_role_renewal_closes_the_clients_it_replaces(aws, fault_proxy) -> None:
    """The assumed role's credentials last an hour (the emulator's STS default, as AWS's);
    ten minutes before they expire the source assumes the role again and closes the clients
    built with the old credentials, so their connections are released."""
    build_world(aws)
    # The credentials' expiry follows the real clock: start from now, not from the module's
    # T0, which is as old as the test session.
    start = float(math.floor(time.time()))
    clock = Clock(start)
    source = RdsProxySource(role_config(fault_proxy.url), clock=clock, log_call_spacing=0)
    await source.sample()
    assert fault_proxy.calls["AssumeRole"] == 1
    services = ("rds", "cloudwatch", "logs")
    old = {name: source.clients.get(name) for name in services}
    closed: list[str] = []
    for name, client in old.items():
        client.close = functools.partial(_record_close, client.close, closed, name)

    clock.now = start + 3600 - 900  # fifteen minutes before expiry: nothing renewed yet
    await source.sample()
    assert fault_proxy.calls["AssumeRole"] == 1 and not closed
    clock.now = start + 3600 - 300  # inside the ten-minute renewal margin
    await source.sample()

    # The emulator dates the new credentials from the real clock, which the source's clock is
    # now ahead of, so every call of this poll is inside the margin and renews again.
    assert fault_proxy.calls["AssumeRole"] >= 2
    assert sorted(closed) == sorted(services)  # every dropped client released its connections
    assert all(source.clients.get(name) is not old[name] for name in services)


def _record_close(close, closed: list[str], name: str) -> None:
    closed.append(name)
    close()


async def test_log_reading_is_bounded_per_poll(aws, fault_proxy) -> None:
    build_world(aws)
    many = [ORDERS_LINES[3]] * 30
    put_log_lines(aws["logs"], "billing-proxy", many, T0 - 20, create=False)
    clock = Clock(T0)
    source = make_source(
        fault_proxy.url, clock, max_log_events_per_poll=12, proxies=["billing-proxy"]
    )
    polls = []
    for i in range(4):
        clock.now = T0 + 60 * i
        polls.append(pin_counts(list(await source.sample()), "billing-proxy")["prepared_statement"])
    assert polls[0] <= 12  # never more than the bound in one poll...
    assert polls[-1] == 30  # ...and the backlog is caught up without double counting
    assert polls == sorted(polls)


def test_paging_says_when_it_stops_at_its_page_limit(aws, fault_proxy) -> None:
    build_world(aws)
    config = AwsConfig(
        region=REGION, endpoint_url=fault_proxy.url, access_key_id=KEY_ID, secret_access_key=SECRET
    )
    clients = Clients(config, time.time)
    kwargs = {"logGroupName": "/aws/rds/proxy/orders-proxy", "interleaved": True}
    fault_proxy.inject_empty_pages("FilterLogEvents", 5)
    got = []
    with pytest.raises(TooManyPages) as raised:
        for page in clients.pages(
            "logs", "filter_log_events", "events", "nextToken", "nextToken", max_pages=3, **kwargs
        ):
            got.append(page)
    assert len(got) == 3 and raised.value.code == "TooManyPages"
    assert "FilterLogEvents" in str(raised.value)
    # within the limit, the empty pages are followed to the end: nothing is lost
    fault_proxy.inject_empty_pages("FilterLogEvents", 2)
    events = [
        e
        for page in clients.pages(
            "logs", "filter_log_events", "events", "nextToken", "nextToken", **kwargs
        )
        for e in page["events"]
    ]
    assert len(events) == len(ORDERS_LINES)
    clients.reset()


async def test_a_log_scan_longer_than_one_poll_goes_on_from_its_next_page_token(
    aws, fault_proxy, caplog
) -> None:
    """FilterLogEvents answers a large log group with many empty pages that carry a next-page
    token. When a poll's calls are used up, the next poll follows the token: starting the scan
    again would meet the same empty pages and never reach the lines."""
    build_world(aws)
    # older than the overlap a cursor moved to "now" would re-read on the next poll
    put_log_lines(aws["logs"], "billing-proxy", [ORDERS_LINES[3]] * 5, T0 - 250, create=False)
    fault_proxy.inject_empty_pages("FilterLogEvents", 150)  # more than one poll may call
    clock = Clock(T0)
    source = make_source(fault_proxy.url, clock, proxies=["billing-proxy"])
    caplog.set_level(logging.INFO, logger="pgpressure.rds_proxy")

    first = pin_counts(list(await source.sample()), "billing-proxy")
    assert fault_proxy.calls["FilterLogEvents"] == 100  # this poll's calls, then it stopped
    backlog = [r for r in caplog.records if "backlog" in r.getMessage()]
    assert backlog and backlog[0].fields["proxy"] == "billing-proxy"
    assert first["prepared_statement"] == 0.0

    clock.now = T0 + 60
    second = pin_counts(list(await source.sample()), "billing-proxy")
    assert fault_proxy.calls["FilterLogEvents"] == 151  # 50 more empty pages, then the lines
    assert second["prepared_statement"] == 5.0


async def test_a_scan_whose_token_is_refused_starts_again_and_counts_nothing_twice(
    aws, fault_proxy, caplog
) -> None:
    """Next-page tokens expire after 24 hours (an exporter stopped for a day, say): the scan
    then starts over from the cursor, and the lines are still counted once."""
    build_world(aws)
    put_log_lines(aws["logs"], "billing-proxy", [ORDERS_LINES[3]] * 5, T0 - 250, create=False)
    fault_proxy.inject_empty_pages("FilterLogEvents", 150)
    clock = Clock(T0)
    source = make_source(fault_proxy.url, clock, proxies=["billing-proxy"])
    caplog.set_level(logging.INFO, logger="pgpressure.rds_proxy")
    counts = []
    for poll in range(4):
        clock.now = T0 + 60 * poll
        if poll == 1:
            expired = {"__type": "InvalidParameterException", "message": "token expired"}
            fault_proxy.inject("FilterLogEvents", 400, json.dumps(expired), JSON11)
        samples = list(await source.sample())
        counts.append(pin_counts(samples, "billing-proxy")["prepared_statement"])
    # 100 empty pages; the refused resume; 100 again from the start; 50 more and the lines
    assert fault_proxy.calls["FilterLogEvents"] == 100 + 1 + 100 + 51
    assert counts == [0.0, 0.0, 0.0, 5.0]
    assert any("could not be resumed" in r.getMessage() for r in caplog.records)


async def test_log_pages_of_one_proxy_are_spaced_like_calls_for_different_proxies(
    aws, fault_proxy
) -> None:
    build_world(aws)
    config = AwsConfig(
        region=REGION,
        endpoint_url=fault_proxy.url,
        access_key_id=KEY_ID,
        secret_access_key=SECRET,
        rds_proxy={"enabled": True, "delay": DELAY, "proxies": ["orders-proxy", "billing-proxy"]},
    )
    source = RdsProxySource(config, clock=Clock(T0), log_call_spacing=0.2)
    orders_group = {"logGroupName": "/aws/rds/proxy/orders-proxy"}
    fault_proxy.inject_empty_pages("FilterLogEvents", 3, match=orders_group)
    samples = list(await source.sample())
    times = fault_proxy.times("FilterLogEvents")
    assert len(times) == 5  # 3 empty pages and the lines of one proxy, the other proxy's
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.19, gaps
    assert pin_counts(samples, "orders-proxy")["sequence"] == 2.0


async def test_throttled_logs_skip_the_logs_not_the_poll(aws, fault_proxy, caplog) -> None:
    build_world(aws)
    clock = Clock(T0)
    source = make_source(fault_proxy.url, clock)
    store = Store()
    runner = SourceRunner(source, store)
    await runner.run_once()
    health = store.health(runner.key)
    caplog.set_level(logging.WARNING, logger="pgpressure.rds_proxy")

    throttled = json.dumps({"__type": "ThrottlingException", "message": "Rate exceeded"})
    fault_proxy.inject("FilterLogEvents", 400, throttled, JSON11)
    put_log_lines(aws["logs"], "orders-proxy", [ORDERS_LINES[0]], T0 + 10, create=False)
    clock.now = T0 + 60
    await runner.run_once()
    assert health.up and health.errors_total == 0
    samples = dict(store.snapshots())[runner.key].samples
    # the poll's fresh CloudWatch values are exported: the window moved onto the 999 minute
    assert gauges(samples, ("orders-proxy", "", ""))["rds_proxy_database_connections"] == 999.0
    warned = [r for r in caplog.records if "throttled" in r.getMessage()]
    assert len(warned) == 1 and warned[0].fields["error"] == "ThrottlingException"
    assert source.status()["last_poll"]["logs_throttled"] is True
    # the log reading that was skipped is not lost: the next poll counts the line once
    clock.now = T0 + 120
    health.next_attempt = 0.0
    await runner.run_once()
    samples = dict(store.snapshots())[runner.key].samples
    assert pin_counts(samples, "orders-proxy")["session_settings"] == 4.0
    assert source.status()["last_poll"]["logs_throttled"] is False


async def test_a_proxy_that_leaves_discovery_and_returns_resumes_its_log_reading(
    aws, fault_proxy
) -> None:
    build_world(aws)
    rds = aws["rds"]
    ours = [{"Name": "cidr-block", "Values": ["10.20.0.0/24", "10.20.1.0/24"]}]
    subnets = [s["SubnetId"] for s in aws["ec2"].describe_subnets(Filters=ours)["Subnets"]]
    clock = Clock(T0)
    # discovery every poll; three proxies fit under the cap
    source = make_source(fault_proxy.url, clock, max_proxies=3, discovery_interval=60)
    polls = [list(await source.sample())]
    assert pin_counts(polls[0], "orders-proxy")["session_settings"] == 3.0

    # a proxy that sorts first pushes orders-proxy past max_proxies for one discovery
    create_proxy(rds, "alpha-proxy", subnets)
    clock.now = T0 + 60
    polls.append(list(await source.sample()))
    assert "orders-proxy" not in {s.labels[0] for s in polls[-1] if s.spec.kind == "gauge"}
    # its counts stay as they were while it may come back
    assert pin_counts(polls[-1], "orders-proxy") == pin_counts(polls[0], "orders-proxy")

    rds.delete_db_proxy(DBProxyName="alpha-proxy")
    put_log_lines(aws["logs"], "orders-proxy", [ORDERS_LINES[0]], T0 + 70, create=False)
    clock.now = T0 + 120
    polls.append(list(await source.sample()))
    # back: read on from its cursor, so the lines counted before are not counted again, and the
    # line written while it was left out is counted once
    assert pin_counts(polls[-1], "orders-proxy") == {
        reason: float(ORDERS_REASONS.get(reason, 0) + (reason == "session_settings"))
        for reason in REASONS
    }

    # billing-proxy is deleted: its counts stay for three discovery intervals, then go
    rds.delete_db_proxy(DBProxyName="billing-proxy")
    for step in range(3, 7):
        clock.now = T0 + 60 * step
        polls.append(list(await source.sample()))
    assert pin_counts(polls[-2], "billing-proxy")  # left out since T0 + 180, for 120 s
    assert pin_counts(polls[-1], "billing-proxy") == {}  # for 180 s: forgotten
    assert pin_counts(polls[-1], "orders-proxy")["session_settings"] == 4.0


async def test_close_releases_clients_and_a_new_poll_rebuilds_them(aws, fault_proxy) -> None:
    build_world(aws)
    source = make_source(fault_proxy.url, Clock(T0))
    await source.sample()
    await source.close()
    assert not source.clients.built()
    assert list(await source.sample())
