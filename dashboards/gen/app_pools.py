"""pgpressure / App pools: the SQLAlchemy pools of the instrumented apps, summed over every
process of each app."""

from __future__ import annotations

from .board import dashboard
from .panels import row, timeseries
from .queries import APP, Q, hq, quantiles, sum_rate

FILE = "app-pools.json"
POOL = "{{app}}/{{pool}}"


def build() -> dict:
    return dashboard(
        "pgpressure-app-pools",
        "pgpressure / App pools",
        "SQLAlchemy connection pools of the instrumented apps, aggregated over every "
        "process: connections vs capacity, callers waiting, how long a connection takes to "
        "get and is held, timeouts, and statement latency.",
        [
            row("Capacity"),
            *_capacity(),
            *_pressure(),
            row("Time to get and hold a connection"),
            *_times(),
            *_churn(),
            row("Statements"),
            *_statements(),
        ],
    )


def _capacity() -> list:
    return [
        timeseries(
            "Connections: used and idle vs max",
            "Open connections of each pool by state; the dashed line named after the pool is "
            "its pool_size + max_overflow summed over the app's processes. Lines are not "
            "stacked, so each pool is read against its own max: used reaching it means the "
            "pool is exhausted and new checkouts queue.",
            "short",
            [
                Q(
                    f"sum by (app, pool, state) (sqlalchemy_pool_connections{{{APP}}})",
                    f"{POOL} {{{{state}}}}",
                ),
                Q(
                    f"sum by (app, pool) (sqlalchemy_pool_max_connections{{{APP}}})",
                    f"{POOL} max",
                ),
            ],
            lines=("max",),
        ),
        timeseries(
            "Utilisation",
            "Used / (pool_size + max_overflow) per pool (recording rule job_app_pool:"
            "sqlalchemy_pool_utilisation:ratio). Staying at 100% with callers waiting "
            "fires SQLAlchemyPoolExhausted.",
            "percentunit",
            [Q(f"job_app_pool:sqlalchemy_pool_utilisation:ratio{{{APP}}}", POOL)],
        ),
    ]


def _pressure() -> list:
    return [
        timeseries(
            "Callers waiting (pending requests)",
            "Callers blocked in checkout waiting for a connection, at each report. Above 0 "
            "means requests queue in the app; compare with the checkout wait below.",
            "short",
            [Q(f"sum by (app, pool) (sqlalchemy_pool_pending_requests{{{APP}}})", POOL)],
            w=8,
        ),
        timeseries(
            "Checkout timeouts",
            "How many checkouts raised the pool TimeoutError after pool_timeout, per pool, "
            "in the window before each bar (Grafana's rate interval): a count, not a rate, so "
            "one timeout shows as 1. Each is a failed request; fires "
            "SQLAlchemyPoolCheckoutTimeouts.",
            "short",
            [
                Q(
                    sum_rate("app, pool", "sqlalchemy_pool_timeouts_total", APP, "increase"),
                    POOL,
                )
            ],
            w=8,
            bars=True,
        ),
        timeseries(
            "Processes reporting",
            "Live processes of each app that pushed a report within ingest.stale_after. "
            "Pool capacity above is summed over these.",
            "short",
            [Q(f"sum by (app) (sqlalchemy_app_processes{{{APP}}})", "{{app}}")],
            w=8,
        ),
        timeseries(
            "Exhausted processes",
            "Processes whose pool has every connection checked out while callers wait, and "
            "the busiest process's used / max. A sum over processes hides one exhausted "
            "worker among idle ones; above 0 for 2m fires SQLAlchemyPoolExhausted.",
            "short",
            [
                Q(
                    f"sum by (app, pool) (sqlalchemy_pool_exhausted_processes{{{APP}}})",
                    "{{app}}/{{pool}} exhausted processes",
                ),
                Q(
                    f"max by (app, pool) (sqlalchemy_pool_busiest_process_utilisation{{{APP}}})",
                    "{{app}}/{{pool}} busiest process used / max",
                ),
            ],
            w=12,
        ),
    ]


def _times() -> list:
    return [
        timeseries(
            "Checkout wait p50 / p95 / p99",
            "Time to obtain a connection: queueing for a free one, opening a new one, "
            "pre-ping. p95 above 100 ms for 5m fires SQLAlchemyPoolWaitHigh.",
            "s",
            quantiles("sqlalchemy_pool_wait_seconds"),
            w=8,
        ),
        timeseries(
            "Hold time p50 / p95 / p99",
            "Time from checkout to checkin. Much longer than statement time means the app "
            "holds connections across non-database work or idle transactions.",
            "s",
            quantiles("sqlalchemy_pool_use_seconds"),
            w=8,
        ),
        timeseries(
            "Connection open time p95",
            "Time to open a new DBAPI connection (TCP, TLS, authentication; RDS Proxy "
            "borrow). Slow opens make overflow connections expensive.",
            "s",
            [Q(hq(0.95, "sqlalchemy_pool_create_seconds", APP), POOL)],
            w=8,
        ),
    ]


def _churn() -> list:
    return [
        timeseries(
            "Checkouts per second",
            "Successful checkouts per second per pool: the demand on the pool.",
            "ops",
            [Q(sum_rate("app, pool", "sqlalchemy_pool_checkouts_total", APP), POOL)],
        ),
        timeseries(
            "Connections closed by reason",
            "Connections closed per second: recycle (pool_recycle), invalidated (errors, "
            "failed pre-ping), overflow (beyond pool_size, closed on checkin). Steady "
            "overflow closes mean pool_size is below the usual concurrency.",
            "ops",
            [
                Q(
                    sum_rate("app, pool, reason", "sqlalchemy_pool_connections_closed_total", APP),
                    f"{POOL} {{{{reason}}}}",
                )
            ],
            stack=True,
        ),
    ]


def _statements() -> list:
    return [
        timeseries(
            "Statement duration p50 / p95 / p99",
            "Statement execution time seen by the app. p95 above 500 ms for 10m fires "
            "SQLAlchemyQueryLatencyHigh; see the Database load dashboard for why.",
            "s",
            quantiles("sqlalchemy_query_duration_seconds"),
        ),
        timeseries(
            "Statements per second",
            "Statements executed per second per pool. A rise without more traffic points at "
            "N+1 query patterns (lazy loading in loops).",
            "ops",
            [Q(sum_rate("app, pool", "sqlalchemy_query_duration_seconds_count", APP), POOL)],
        ),
    ]
