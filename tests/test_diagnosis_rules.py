"""Every diagnosis rule on evidence records: it fires on its incident, with the numbers and
the fix, and stays silent on a healthy record and on the look-alikes it must not confuse."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from exporter.config import ConfigError, parse
from exporter.diagnosis import rules
from exporter.diagnosis.evidence import (
    Evidence,
    Holder,
    PoolEvidence,
    PoolLink,
    ProxyEvidence,
    RiskyStatement,
    Statement,
    TargetEvidence,
)
from exporter.diagnosis.rules import (
    connection_churn,
    connections_held_idle,
    database_cpu_saturated,
    idle_in_transaction,
    lock_contention,
    pool_undersized,
    pools_exceed_server,
    proxy_pinning,
    temp_spills,
)
from exporter.diagnosis.thresholds import Thresholds

TH = Thresholds()
W = 900.0


def healthy_target(**changes: object) -> TargetEvidence:
    """A server with 4 vCPUs at 1.2 active sessions, no locks, no spills, room to spare."""
    base = TargetEvidence(
        target="main",
        window=W,
        aas=1.2,
        aas_by_wait={"CPU": 0.9, "IO": 0.2, "Lock": 0.1},
        vcpus=4.0,
        sessions=30.0,
        max_connections=100.0,
        reserved_connections=3.0,
        blocked_sessions=0.0,
        temp_bytes_per_s={"appdb": 2048.0},
        statements=(Statement("appdb", "111", 0.5, 100.0, 0.0),),
        work_mem_bytes=4 * 2**20,
        sessions_per_s=0.01,
        applications=frozenset({"orders"}),
        pools=(PoolLink("orders", "default", 30.0, 2.0),),
    )
    return replace(base, **changes)


def healthy_pool(**changes: object) -> PoolEvidence:
    """2 processes, 15 connections each, 5 used on average, nobody waiting."""
    base = PoolEvidence(
        app="orders",
        pool="default",
        window=W,
        processes=2.0,
        max_connections=30.0,
        used=5.0,
        pending=0.0,
        at_max_share=0.0,
        pending_share=0.0,
        wait_p95=0.0002,
        statement_p95=0.02,
        hold_mean=0.025,
        statement_mean=0.01,
        statements_per_s=400.0,
        statement_seconds_per_s=4.0,
        hold_seconds_per_s=5.0,
        checkouts_per_s=200.0,
        connects_per_s=0.01,
        create_mean=0.008,
        closes_per_s={"overflow": 0.005},
        targets=(healthy_target(),),
    )
    return replace(base, **changes)


def healthy_proxy(**changes: object) -> ProxyEvidence:
    base = ProxyEvidence(
        proxy="orders-proxy",
        window=W,
        pinned=1.0,
        database_connections=20.0,
        max_allowed=90.0,
        pin_reasons={"session_settings": 3.0},
    )
    return replace(base, **changes)


# --- a healthy workload: no finding at all ---------------------------------------------------
def test_a_healthy_workload_gives_no_finding() -> None:
    evidence = Evidence(W, 0.0, (healthy_target(),), (healthy_pool(),), (healthy_proxy(),))
    assert rules.evaluate(evidence, TH) == []


@pytest.mark.parametrize("rule", rules.RULES, ids=lambda r: r.NAME)
def test_every_rule_is_silent_on_its_healthy_record(rule) -> None:
    record = {"target": healthy_target(), "pool": healthy_pool(), "proxy": healthy_proxy()}
    assert rule.evaluate(record[rule.SUBJECT], TH) is None


# --- database_cpu_saturated ------------------------------------------------------------------
def saturated_target() -> TargetEvidence:
    """Incident 1: 100 clients on 2 vCPUs, pool 20 + overflow 100."""
    return healthy_target(
        aas=38.0,
        aas_by_wait={"CPU": 35.0, "LWLock": 2.0, "IO": 1.0},
        vcpus=2.0,
        statements=(
            Statement("appdb", "42", 20.0, 300.0, 0.0),
            Statement("appdb", "43", 8.0, 50.0, 0.0),
        ),
        pools=(PoolLink("orders", "default", 120.0, 1.0),),
    )


def test_cpu_saturated_says_a_bigger_pool_makes_it_worse_and_names_statements() -> None:
    finding = database_cpu_saturated.evaluate(saturated_target(), TH)
    assert finding is not None
    assert finding.severity == "critical"  # 38 sessions on 2 vCPUs is far past 2x
    assert finding.subject == {"target": "main"}
    assert "38 active sessions on 2 vCPUs" in finding.summary
    assert "92% on CPU" in finding.summary
    assert "larger pool would make it worse" in finding.summary
    assert "Do not enlarge the pools" in finding.fix and "120" in finding.fix
    assert finding.details[0].startswith("queryid 42")
    assert finding.evidence["vcpus"] == 2.0


def test_cpu_saturated_is_silent_when_the_load_is_not_cpu() -> None:
    # 15 sessions in pg_sleep on 2 vCPUs: load above the vCPUs, but not CPU (incident 2).
    sleeping = healthy_target(aas=15.0, aas_by_wait={"Timeout": 14.5, "CPU": 0.5}, vcpus=2.0)
    assert database_cpu_saturated.evaluate(sleeping, TH) is None


def test_cpu_saturated_needs_the_vcpus() -> None:
    assert database_cpu_saturated.evaluate(replace(saturated_target(), vcpus=None), TH) is None


def test_cpu_saturated_is_a_warning_between_one_and_two_times_the_vcpus() -> None:
    busy = healthy_target(aas=5.0, aas_by_wait={"CPU": 4.5, "IO": 0.5})
    finding = database_cpu_saturated.evaluate(busy, TH)
    assert finding is not None and finding.severity == "warning"


# --- pool_undersized -------------------------------------------------------------------------
def undersized_pool(**changes: object) -> PoolEvidence:
    """Incident 2: a sync app, default pool 5 + 10, 48 concurrent requests of 50 ms queries."""
    fields: dict[str, object] = dict(
        processes=1.0,
        max_connections=15.0,
        used=15.0,
        pending=33.0,
        at_max_share=0.95,
        pending_share=0.9,
        wait_p95=0.0975,
        wait_mean=0.085,
        statement_p95=0.0975,
        statement_mean=0.0505,
        hold_mean=0.052,
        statements_per_s=288.0,
        statement_seconds_per_s=14.5,
        hold_seconds_per_s=15.0,
        checkouts_per_s=288.0,
        targets=(
            healthy_target(
                aas=15.0,
                aas_by_wait={"Timeout": 14.5, "CPU": 0.5},
                vcpus=2.0,
                pools=(PoolLink("orders", "default", 15.0, 1.0),),
            ),
        ),
    )
    return healthy_pool(**(fields | changes))


def test_pool_undersized_suggests_a_size_from_littles_law() -> None:
    finding = pool_undersized.evaluate(undersized_pool(), TH)
    assert finding is not None
    assert finding.subject == {"app": "orders", "pool": "default"}
    assert "at its maximum of 15 for 95% of the window" in finding.summary
    assert "main not saturated" in finding.summary
    # 288/s x 52 ms = 15 busy, + 33 waiting = 48, x 1.25 headroom = 60 per process.
    assert finding.evidence["suggested_per_process"] == 60
    assert "about 60 per process" in finding.fix
    assert "within the 97 main accepts" in finding.fix
    assert finding.severity == "warning"


def test_pool_undersized_is_critical_with_timeouts_and_warns_past_the_server() -> None:
    finding = pool_undersized.evaluate(undersized_pool(processes=2.0, timeouts_per_s=0.5), TH)
    assert finding is not None and finding.severity == "critical"
    assert "about 30 per process" in finding.fix
    # 60 in all on a server with 100 - 3 usable is within; with 4 processes of others it is not
    crowded = replace(
        undersized_pool().targets[0],
        pools=(PoolLink("orders", "default", 15.0, 1.0), PoolLink("batch", "default", 60.0, 4.0)),
    )
    finding = pool_undersized.evaluate(undersized_pool(targets=(crowded,)), TH)
    assert finding is not None and "ABOVE the 97 main accepts" in finding.fix


def test_pool_undersized_is_silent_when_the_database_is_saturated() -> None:
    # Incident 1's look-alike: the pool is full, but because the server is.
    assert pool_undersized.evaluate(undersized_pool(targets=(saturated_target(),)), TH) is None


def test_pool_undersized_is_silent_when_the_wait_is_the_statements_own() -> None:
    slow_server = undersized_pool(wait_mean=0.2, statement_mean=0.25)
    assert pool_undersized.evaluate(slow_server, TH) is None


def test_pool_undersized_is_silent_when_full_but_nobody_waits() -> None:
    assert pool_undersized.evaluate(undersized_pool(pending_share=0.0, pending=0.0), TH) is None
    assert pool_undersized.evaluate(undersized_pool(max_connections=math.inf), TH) is None


# --- connections_held_idle -------------------------------------------------------------------
def test_connections_held_idle_from_hold_versus_statement_time() -> None:
    # Each checkout holds 800 ms and runs 40 ms of statements (an HTTP call in between).
    idle = healthy_pool(
        hold_mean=0.8,
        statements_per_s=20.0,
        statement_seconds_per_s=0.8,
        hold_seconds_per_s=16.0,
        checkouts_per_s=20.0,
    )
    finding = connections_held_idle.evaluate(idle, TH)
    assert finding is not None
    assert "holds each connection 800 ms on average but runs statements for 5% of it" in (
        finding.summary
    )
    assert "outside" in finding.fix


def test_connections_held_idle_from_the_apps_idle_transactions() -> None:
    target = healthy_target(idle_in_transaction=(Holder("appdb", "orders", 95.0),))
    finding = connections_held_idle.evaluate(healthy_pool(targets=(target,)), TH)
    assert finding is not None and "idle in a transaction for up to 95 s" in finding.summary
    other_app = healthy_target(idle_in_transaction=(Holder("appdb", "billing", 95.0),))
    assert connections_held_idle.evaluate(healthy_pool(targets=(other_app,)), TH) is None


def test_connections_held_idle_needs_statement_timing() -> None:
    untimed = healthy_pool(hold_mean=0.8, statements_per_s=0.0, statement_seconds_per_s=0.0)
    assert connections_held_idle.evaluate(untimed, TH) is None


# --- lock_contention -------------------------------------------------------------------------
def locked_target() -> TargetEvidence:
    return healthy_target(
        aas=6.0,
        aas_by_wait={"Lock": 5.0, "CPU": 1.0},
        blocked_sessions=5.0,
        blockers=(Holder("appdb", "nightly-batch", 140.0), Holder("appdb", "orders", 3.0)),
    )


def test_lock_contention_names_the_blocker_and_how_long_it_held() -> None:
    finding = lock_contention.evaluate(locked_target(), TH)
    assert finding is not None
    assert finding.subject == {"target": "main", "datname": "appdb"}
    assert "lock waits are 83% of the load" in finding.summary
    assert "'nightly-batch'" in finding.summary and "open for 140 s" in finding.summary
    assert finding.evidence["blocker_application_name"] == "nightly-batch"
    assert finding.severity == "warning"
    assert (
        lock_contention.evaluate(
            replace(locked_target(), blockers=(Holder("appdb", "x", 400.0),)), TH
        ).severity
        == "critical"
    )


def test_lock_contention_from_a_long_holder_alone() -> None:
    quiet = healthy_target(blocked_sessions=1.0, blockers=(Holder("appdb", "migrate", 45.0),))
    finding = lock_contention.evaluate(quiet, TH)
    assert finding is not None and "'migrate'" in finding.summary


def test_lock_contention_is_silent_on_a_short_block() -> None:
    brief = healthy_target(blocked_sessions=1.0, blockers=(Holder("appdb", "orders", 2.0),))
    assert lock_contention.evaluate(brief, TH) is None


# --- temp_spills -----------------------------------------------------------------------------
def spilling_target() -> TargetEvidence:
    return healthy_target(
        temp_bytes_per_s={"appdb": 30 * 2**20, "postgres": 0.0},
        work_mem_bytes=64 * 1024,
        statements=(
            Statement("appdb", "77", 2.0, 20.0, 28 * 2**20),  # 1.4 MiB per call
            Statement("appdb", "78", 1.0, 10.0, 2 * 2**20),
            Statement("postgres", "79", 1.0, 10.0, 0.0),
        ),
    )


def test_temp_spills_names_statements_and_the_work_mem_that_fits() -> None:
    finding = temp_spills.evaluate(spilling_target(), TH)
    assert finding is not None
    assert finding.subject == {"target": "main", "datname": "appdb"}
    assert "30 MiB/s written to temporary files (work_mem 64 kB)" in finding.summary
    assert "queryid 77 spills 1.4 MiB per call" in finding.summary
    assert "work_mem 2MB would keep the largest spill in memory" in finding.fix
    assert "100 x 2MB = 200 MiB" in finding.fix  # weighed against connections x work_mem
    assert finding.details[0] == "queryid 77: 28 MiB/s, 1.4 MiB per call -> work_mem 2MB"


def test_temp_spills_is_silent_below_the_rate() -> None:
    small = replace(spilling_target(), temp_bytes_per_s={"appdb": 512 * 1024.0})
    assert temp_spills.evaluate(small, TH) is None


# --- connection_churn ------------------------------------------------------------------------
def test_connection_churn_with_recycle_and_server_side_ends() -> None:
    target = healthy_target(sessions_ended_per_s={"abandoned": 0.0, "killed": 0.2})
    churning = healthy_pool(
        connects_per_s=21.0,
        closes_per_s={"recycle": 20.0, "overflow": 1.0},
        create_mean=0.008,
        checkouts_per_s=190.0,
        targets=(target,),
    )
    finding = connection_churn.evaluate(churning, TH)
    assert finding is not None
    assert "21 connections replaced per second (1 per 9.0 checkouts)" in finding.summary
    assert "95% closed for recycle" in finding.summary
    assert "0.2 sessions/s killed" in finding.summary
    assert "pool_recycle" in finding.fix
    assert finding.evidence["connecting_seconds_per_second"] == pytest.approx(0.168)


def test_connection_churn_is_silent_on_warm_up_and_rare_replacement() -> None:
    warm_up = healthy_pool(connects_per_s=0.5, closes_per_s={})  # opened, nothing closed
    assert connection_churn.evaluate(warm_up, TH) is None
    rare = healthy_pool(connects_per_s=1.0, closes_per_s={"recycle": 1.0}, checkouts_per_s=500.0)
    assert connection_churn.evaluate(rare, TH) is None


# --- pools_exceed_server ---------------------------------------------------------------------
def test_pools_exceed_server_sums_every_process_of_every_linked_pool() -> None:
    crowded = healthy_target(
        pools=(PoolLink("orders", "default", 120.0, 8.0), PoolLink("billing", "default", 15.0, 1.0))
    )
    finding = pools_exceed_server.evaluate(crowded, TH)
    assert finding is not None
    assert "can open 135 connections over 9 processes, above the 97" in finding.summary
    assert "about 10 per process" in finding.fix
    assert finding.details[0].startswith("orders/default")


def test_pools_exceed_server_with_an_unbounded_pool() -> None:
    finding = pools_exceed_server.evaluate(
        healthy_target(pools=(PoolLink("orders", "default", math.inf, 1.0),)), TH
    )
    assert finding is not None and "unbounded" in finding.summary


def test_pools_exceed_server_is_silent_without_links_or_max_connections() -> None:
    assert pools_exceed_server.evaluate(healthy_target(pools=()), TH) is None
    assert pools_exceed_server.evaluate(healthy_target(max_connections=None), TH) is None


# --- proxy_pinning ---------------------------------------------------------------------------
def test_proxy_pinning_names_the_reason_and_the_statement() -> None:
    pinned = healthy_proxy(
        pinned=18.0,
        pin_reasons={"session_settings": 410.0, "advisory_lock": 12.0, "listen": 0.0},
        risky_statements=(
            RiskyStatement("main", "appdb", ("session_settings",), 6.8, "SET search_path TO $1"),
            RiskyStatement("main", "appdb", ("sequence",), 50.0, "SELECT currval($1)"),
        ),
        pinned_trend=(17.0, 18.0, 19.0),
    )
    finding = proxy_pinning.evaluate(pinned, TH)
    assert finding is not None
    assert finding.subject == {"proxy": "orders-proxy"}
    assert "90% of its database connections pinned" in finding.summary
    assert "session_settings (410 pins), advisory_lock (12 pins)" in finding.summary
    assert "e.g. SET search_path TO $1 (6.8 calls/s)" in finding.summary
    assert "initialization query" in finding.fix
    assert finding.details == (
        "main/appdb: SET search_path TO $1 - session_settings (6.8 calls/s)",
    )
    assert finding.chart.values == (17.0, 18.0, 19.0)


def test_proxy_pinning_without_texts_names_the_reason() -> None:
    pinned = healthy_proxy(
        pinned=18.0,
        pin_reasons={},
        risky_statements=(RiskyStatement("main", "appdb", ("prepared_statement",), 2.0),),
    )
    finding = proxy_pinning.evaluate(pinned, TH)
    assert finding is not None and "e.g. prepared_statement" in finding.summary
    assert "statement_cache_size=0" in finding.fix


def test_proxy_pinning_is_silent_without_connections() -> None:
    assert proxy_pinning.evaluate(healthy_proxy(database_connections=0.0), TH) is None


# --- idle_in_transaction ---------------------------------------------------------------------
def test_idle_in_transaction_names_the_oldest_session_and_its_app() -> None:
    target = healthy_target(
        idle_in_transaction=(Holder("appdb", "orders", 75.0), Holder("appdb", "reports", 700.0))
    )
    finding = idle_in_transaction.evaluate(target, TH)
    assert finding is not None
    assert finding.subject == {"target": "main", "datname": "appdb", "app": "reports"}
    assert finding.severity == "critical"
    assert "application_name 'reports' sat idle in a transaction for 12 min" in finding.summary
    assert "idle_in_transaction_session_timeout" in finding.fix


def test_idle_in_transaction_is_silent_on_short_pauses() -> None:
    brief = healthy_target(idle_in_transaction=(Holder("appdb", "orders", 5.0),))
    assert idle_in_transaction.evaluate(brief, TH) is None


# --- the rule set ----------------------------------------------------------------------------
def test_incident_one_leads_with_cpu_saturation_and_not_pool_undersized() -> None:
    target = replace(
        saturated_target(),
        temp_bytes_per_s={"appdb": 20 * 2**20},
        work_mem_bytes=64 * 1024,
    )
    pool = healthy_pool(
        processes=1.0,
        max_connections=120.0,
        used=100.0,
        at_max_share=0.0,
        pending=0.0,
        connects_per_s=20.0,
        closes_per_s={"recycle": 20.0},
        targets=(target,),
    )
    found = rules.evaluate(Evidence(W, 0.0, (target,), (pool,)), TH)
    names = [f.rule for f in found]
    assert names[0] == "database_cpu_saturated"
    assert {"temp_spills", "connection_churn"} <= set(names)
    assert "pool_undersized" not in names


def test_thresholds_come_from_config_and_a_rule_can_be_turned_off() -> None:
    config = parse(
        "diagnosis:\n  thresholds:\n    database_cpu_saturated: {aas_over_vcpus: 50}\n"
        "    temp_spills: {enabled: false}\n"
    )
    th = config.diagnosis.thresholds
    assert database_cpu_saturated.evaluate(saturated_target(), th) is None
    evidence = Evidence(W, 0.0, (spilling_target(),))
    assert [f.rule for f in rules.evaluate(evidence, TH)] == ["temp_spills"]
    assert rules.evaluate(evidence, th) == []
    with pytest.raises(ConfigError, match=r"diagnosis\.thresholds\.pool_undersized\.at_max_share"):
        parse("diagnosis:\n  thresholds:\n    pool_undersized: {at_max_share: 2}\n")


def test_findings_are_json_with_a_runbook_per_rule() -> None:
    finding = temp_spills.evaluate(spilling_target(), TH)
    doc = finding.to_json()
    assert doc["runbook_url"].endswith("docs/diagnosis.md#temp_spills")
    assert doc["evidence"]["window_seconds"] == W
    assert doc["evidence"]["values"]["temp_bytes_per_second"] == 30 * 2**20
    assert type(finding).from_json(doc).summary == finding.summary
