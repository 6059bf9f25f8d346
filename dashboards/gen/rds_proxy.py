"""pgpressure / RDS Proxy: the proxy's CloudWatch metrics and CloudWatch Logs, and which of
our statements would pin a session."""

from __future__ import annotations

from .board import dashboard
from .panels import row, timeseries
from .queries import APP, PG, PROXY, Q, by_proxy, sum_rate

FILE = "rds-proxy.json"


def build() -> dict:
    return dashboard(
        "pgpressure-rds-proxy",
        "pgpressure / RDS Proxy",
        "RDS Proxy from CloudWatch (a few minutes behind) and its CloudWatch Logs: "
        "database connections vs pinned vs allowed, borrow and query latency, why sessions "
        "get pinned, and which of our statements would pin.",
        [
            row("Connections"),
            *_connections(),
            row("Latency"),
            *_latency(),
            row("Pinning"),
            *_pinning(),
        ],
    )


def _connections() -> list:
    return [
        timeseries(
            "Database connections: pinned vs total vs max allowed",
            "Connections from the proxy to the database, those pinned to a single client "
            "session, and the maximum the proxy may open (dashed). Pinned close to total "
            "means the proxy cannot multiplex; total at max means clients wait to borrow.",
            "short",
            [
                Q(by_proxy("rds_proxy_database_connections"), "{{proxy}} database"),
                Q(
                    by_proxy("rds_proxy_database_connections_currently_session_pinned"),
                    "{{proxy}} pinned",
                ),
                Q(
                    by_proxy("rds_proxy_max_database_connections_allowed"),
                    "{{proxy}} max allowed",
                ),
            ],
            lines=("max allowed",),
        ),
        timeseries(
            "Pinned ratio",
            "Pinned / database connections of the whole proxy (recording rule). "
            "Above 50% for 15m fires RDSProxySessionPinningHigh.",
            "percentunit",
            [Q(f"job_proxy:rds_proxy_database_connections_pinned:ratio{{{PROXY}}}", "{{proxy}}")],
        ),
        timeseries(
            "Client, borrowed and in-transaction connections",
            "Client connections to the proxy, database connections currently borrowed by "
            "a client, and those inside a transaction. Many clients per borrowed "
            "connection is the multiplexing the proxy is for.",
            "short",
            [
                Q(by_proxy("rds_proxy_client_connections"), "{{proxy}} clients"),
                Q(
                    by_proxy("rds_proxy_database_connections_currently_borrowed"),
                    "{{proxy}} borrowed",
                ),
                Q(
                    by_proxy("rds_proxy_database_connections_currently_in_transaction"),
                    "{{proxy}} in transaction",
                ),
            ],
            w=24,
        ),
    ]


def _latency() -> list:
    return [
        timeseries(
            "Borrow latency",
            "Average time to borrow a database connection from the proxy's pool. Above "
            "50 ms for 10m fires RDSProxyBorrowLatencyHigh.",
            "s",
            [Q(by_proxy("rds_proxy_database_connections_borrow_latency_seconds"), "{{proxy}}")],
        ),
        timeseries(
            "Query response latency",
            "Average time between the proxy sending a query and the database answering: "
            "the database's part of statement time.",
            "s",
            [Q(by_proxy("rds_proxy_query_database_response_latency_seconds"), "{{proxy}}")],
        ),
    ]


def _pinning() -> list:
    return [
        timeseries(
            "Pinning reasons",
            "How many sessions got pinned, by reason, in the window before each bar "
            "(Grafana's rate interval): a count, not a rate. From the proxy's CloudWatch "
            "Logs: session_settings (SET -> use SET LOCAL), prepared_statement, "
            "temporary_object, advisory_lock, statement_too_large, sequence, listen, cursor.",
            "short",
            [
                Q(
                    sum_rate("proxy, reason", "rds_proxy_pinning_events_total", PROXY, "increase"),
                    "{{proxy}} {{reason}}",
                )
            ],
            stack=True,
            bars=True,
        ),
        timeseries(
            "Would pin (prepared statements warned about) and silent logs",
            "INFO lines warning that a prepared statement would pin the session if it ran, "
            "counted apart from pins (a count per bar); and 1 while the proxy reports pinned "
            "connections but its log group has had no pinning line for 24 h (enhanced "
            "logging turns itself off after 24 hours: turn it on again to see reasons).",
            "short",
            [
                Q(
                    sum_rate(
                        "proxy, reason",
                        "rds_proxy_pinning_would_pin_events_total",
                        PROXY,
                        "increase",
                    ),
                    "{{proxy}} would pin: {{reason}}",
                ),
                Q(
                    f"max by (proxy) (rds_proxy_pinning_logs_silent{{{PROXY}}})",
                    "{{proxy}} logging silent",
                ),
            ],
            bars=True,
        ),
        timeseries(
            "Pinning-risk statements by reason",
            "Calls per second of statements in pg_stat_statements of the selected "
            "databases that would pin an RDS Proxy session, by reason; and statements the "
            "instrumented apps sent over the proxy's 16,384-byte limit, which the database "
            "cannot show (their templates: /api/v1/pinning-risk, `apps`). Fix these before "
            "(or while) moving behind a proxy.",
            "ops",
            [
                Q(
                    sum_rate("target, datname, reason", "pg_pinning_risk_calls_total", PG),
                    "{{target}}/{{datname}} {{reason}}",
                ),
                Q(
                    sum_rate("app, pool", "sqlalchemy_statements_oversized_total", APP),
                    "{{app}}/{{pool}} over 16 KB (seen by the app)",
                ),
            ],
            stack=True,
        ),
    ]
