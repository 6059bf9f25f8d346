"""pgpressure / Overview: one screen for the whole path app -> pool -> proxy -> PostgreSQL."""

from __future__ import annotations

from .board import dashboard
from .panels import row, stat, table, timeseries
from .queries import APP, PG, PROXY, Q, hq, sum_rate

FILE = "overview.json"


def build() -> dict:
    return dashboard(
        "pgpressure-overview",
        "pgpressure / Overview",
        "One screen: is the path app -> pool -> proxy -> PostgreSQL healthy, and where is the "
        "time going. Drill down with the App pools, Database load and RDS Proxy dashboards.",
        [
            row("What is the cause?"),
            _findings(),
            row("Is the path healthy?"),
            *_app_health(),
            *_database_health(),
            row("Where is the time going?"),
            *_time(),
            row("Proxy and exporter"),
            *_proxy(),
            *_alerts_and_sources(),
        ],
    )


def _app_health() -> list:
    return [
        stat(
            "Pool utilisation (worst pool)",
            "Connections checked out / (pool_size + max_overflow), for the fullest pool of "
            "the selected apps (recording rule job_app_pool:sqlalchemy_pool_utilisation:"
            "ratio). At 100% further requests queue for a connection; red means exhausted.",
            "percentunit",
            Q(f"max(job_app_pool:sqlalchemy_pool_utilisation:ratio{{{APP}}})"),
            thresholds=[(None, "green"), (0.8, "orange"), (1, "red")],
        ),
        stat(
            "Callers waiting for a connection",
            "Requests waiting in the application for a pool connection right now, summed "
            "over the selected apps. Anything above 0 for long means the pools are too "
            "small for the load or connections are held too long.",
            "short",
            Q(f"sum(sqlalchemy_pool_pending_requests{{{APP}}})"),
            thresholds=[(None, "green"), (1, "orange"), (10, "red")],
        ),
        stat(
            "Checkout timeouts (time range)",
            "Checkouts that failed with the pool TimeoutError ('QueuePool limit ... "
            "connection timed out') during the dashboard's time range. Each one is a "
            "failed request; anything above 0 needs attention.",
            "short",
            Q(f"sum(increase(sqlalchemy_pool_timeouts_total{{{APP}}}[$__range]))"),
            thresholds=[(None, "green"), (1, "red")],
            decimals=0,
        ),
    ]


def _database_health() -> list:
    return [
        stat(
            "Database load per vCPU (worst)",
            "Average active sessions / vCPUs over 5m for the busiest selected database "
            "(needs databases[].vcpus). Above 100% sessions queue for CPU or wait on "
            "locks/IO: the database is the bottleneck.",
            "percentunit",
            Q(f"max(job_target:pg_active_session_seconds_per_vcpu:ratio_rate5m{{{PG}}})"),
            thresholds=[(None, "green"), (0.7, "orange"), (1, "red")],
            no_value="no vcpus set",
        ),
        stat(
            "Blocked sessions",
            "Sessions waiting on a lock held by another session at the last activity "
            "sample. Blocked sessions hold their pool connections while they wait.",
            "short",
            Q(f"sum(pg_blocked_sessions{{{PG}}})"),
            thresholds=[(None, "green"), (1, "orange"), (5, "red")],
        ),
        stat(
            "Oldest idle in transaction",
            "The longest time any session of the selected databases has been idle inside "
            "an open transaction. Such sessions hold locks and pool connections; over 5 "
            "minutes is alerted on.",
            "s",
            Q(f"max(pg_oldest_idle_in_transaction_seconds{{{PG}}})"),
            thresholds=[(None, "green"), (60, "orange"), (300, "red")],
        ),
    ]


def _time() -> list:
    return [
        timeseries(
            "Checkout wait p95 by pool",
            "95th percentile time to obtain a connection from each pool (queueing for a "
            "free connection, opening one, pre-ping). Every request pays this before its "
            "first statement; above ~100 ms the pool is the bottleneck.",
            "s",
            [Q(hq(0.95, "sqlalchemy_pool_wait_seconds", APP), "{{app}}/{{pool}}")],
            w=8,
        ),
        timeseries(
            "Statement duration p95 by pool",
            "95th percentile statement execution time seen by each app. Compare with the "
            "checkout wait: if statements are fast but waits are long, the pool is too "
            "small or connections are held outside statements.",
            "s",
            [Q(hq(0.95, "sqlalchemy_query_duration_seconds", APP), "{{app}}/{{pool}}")],
            w=8,
        ),
        timeseries(
            "Database load vs vCPUs by target",
            "Average active sessions (AAS) of each database, with its vCPU count as a dashed "
            "line of the same name (needs databases[].vcpus): load above its own line queues "
            "for CPU or waits on locks/IO. What the sessions wait on is on the Database load "
            "dashboard.",
            "short",
            [
                Q(sum_rate("target", "pg_active_session_seconds_total", PG), "{{target}} load"),
                Q(f"max by (target) (pg_vcpus{{{PG}}})", "{{target}} vCPUs"),
            ],
            w=8,
            lines=("vCPUs",),
        ),
    ]


def _proxy() -> list:
    return [
        timeseries(
            "RDS Proxy pinned ratio",
            "Share of each proxy's database connections pinned to one client session "
            "(recording rule job_proxy:rds_proxy_database_connections_pinned:ratio). "
            "Pinned connections are not multiplexed; above 50% is alerted on.",
            "percentunit",
            [Q(f"job_proxy:rds_proxy_database_connections_pinned:ratio{{{PROXY}}}", "{{proxy}}")],
            w=6,
        ),
        timeseries(
            "RDS Proxy borrow latency",
            "Average time the proxy takes to hand a database connection to a request "
            "(CloudWatch, a few minutes behind). Rising latency means the proxy's own "
            "pool is exhausted or pinned.",
            "s",
            [
                Q(
                    "max by (proxy) "
                    f"(rds_proxy_database_connections_borrow_latency_seconds{{{PROXY}}})",
                    "{{proxy}}",
                )
            ],
            w=6,
        ),
    ]


def _alerts_and_sources() -> list:
    return [
        table(
            "Firing pgpressure alerts",
            "The pgpressure alerts firing now, with the pool, database or proxy they are "
            "about; Value is the number of firing instances. Each alert's runbook_url "
            "(docs/runbooks.md) says what to do.",
            "short",
            [
                Q(
                    "count by (alertname, severity, app, pool, target, datname, proxy) "
                    '(ALERTS{alertstate="firing", job=~"$job", '
                    'alertname=~"SQLAlchemy.*|Postgres.*|RDSProxy.*|PgPressure.*"})',
                    instant=True,
                )
            ],
            w=6,
        ),
        table(
            "Source health",
            "pgpressure's sources per target: 1 = the last run succeeded, 0 = it failed "
            "(its panels and alerts are stale; see the daemon's log).",
            "short",
            [Q('min by (source, target) (pgpressure_source_up{job=~"$job"})', instant=True)],
            w=6,
        ),
    ]


def _findings():
    return table(
        "Findings: the cause and the fix",
        "What the diagnosis rules conclude from the app pools, the database's sessions and "
        "the proxy together (pgpressure_finding; the numbers and the fix are on the "
        "exporter's landing page and at /api/v1/findings; docs/diagnosis.md). Empty when "
        "nothing is wrong.",
        "short",
        [
            Q(
                "max by (rule, severity, target, datname, app, pool, proxy) "
                '(pgpressure_finding{job=~"$job"})',
                instant=True,
            )
        ],
        w=24,
        h=6,
    )
