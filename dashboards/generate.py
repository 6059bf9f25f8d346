"""Generate pgpressure's Grafana dashboards with grafana-foundation-sdk.

    python dashboards/generate.py            # write dashboards/*.json
    python dashboards/generate.py --check    # exit 1 if the committed JSON is out of date

Every dashboard has a `datasource` variable and `job`, `target`, `app` and `proxy` variables
(multi-value, "All" = `.*`), so every query filters with `=~"$var"`. Every panel has a unit and
a description that says how to read it. Queries use the metrics in exporter/metrics.py and the
recording rules in alerts/pgpressure.rules.yml; tests/test_dashboards.py checks both, and that
every query parses.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as pb
from grafana_foundation_sdk.builders import stat as statb
from grafana_foundation_sdk.builders import table as tableb
from grafana_foundation_sdk.builders import timeseries as tsb
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT_DIR = Path(__file__).resolve().parent
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Label selectors shared by every query of a kind.
APP = 'job=~"$job", app=~"$app"'
PG = 'job=~"$job", target=~"$target"'
PROXY = 'job=~"$job", proxy=~"$proxy"'
RI = "$__rate_interval"

RUNBOOKS = "https://github.com/pgpressure/pgpressure/blob/main/docs/runbooks.md"


# --- building blocks ------------------------------------------------------------------------
@dataclass(frozen=True)
class Q:
    """One query: PromQL, legend, and whether it is an instant query (stats, tables)."""

    expr: str
    legend: str = "__auto"
    instant: bool = False


def _target(q: Q, ref: str, table: bool = False) -> pb.Dataquery:
    t = pb.Dataquery().expr(q.expr).legend_format(q.legend).ref_id(ref).datasource(DS)
    if q.instant:
        t = t.instant()
        if table:
            t = t.format(PromQueryFormat.TABLE)
    else:
        t = t.range()
    return t


def _targets(panel, queries: list[Q], table: bool = False):
    for i, q in enumerate(queries):
        panel = panel.with_target(_target(q, chr(ord("A") + i), table))
    return panel


def _thresholds(steps: list[tuple[float | None, str]]) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=v, color=c) for v, c in steps])
    )


GREEN = [(None, "green")]


def timeseries(
    title: str,
    description: str,
    unit: str,
    queries: list[Q],
    *,
    w: int = 12,
    h: int = 8,
    stack: bool = False,
    lines: tuple[str, ...] = (),
    min0: bool = True,
    bars: bool = False,
) -> tsb.Panel:
    """A time series; `lines` are legend names drawn as dashed, unstacked capacity lines."""
    p = (
        tsb.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .span(w)
        .height(h)
        .fill_opacity(35 if stack else 10)
        .line_width(1)
        .show_points(cm.VisibilityMode.NEVER)
        .legend(
            cb.VizLegendOptions()
            .display_mode(cm.LegendDisplayMode.TABLE)
            .placement(cm.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["mean", "max", "lastNotNull"])
        )
        .tooltip(
            cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)
        )
    )
    if min0:
        p = p.min(0)
    if stack:
        p = p.stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL))
    if bars:
        p = p.draw_style(cm.GraphDrawStyle.BARS)
    for name in lines:
        p = p.override_by_name(
            name,
            [
                dm.DynamicConfigValue(
                    id_val="custom.stacking", value={"mode": "none", "group": "A"}
                ),
                dm.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
                dm.DynamicConfigValue(id_val="custom.lineWidth", value=2),
                dm.DynamicConfigValue(
                    id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}
                ),
                dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "red"}),
            ],
        )
    return _targets(p, queries)


def stat(
    title: str,
    description: str,
    unit: str,
    query: Q,
    *,
    thresholds: list[tuple[float | None, str]] = GREEN,
    w: int = 4,
    h: int = 4,
    decimals: int | None = None,
    no_value: str = "0",
) -> statb.Panel:
    p = (
        statb.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .span(w)
        .height(h)
        .thresholds(_thresholds(thresholds))
        .color_mode(cm.BigValueColorMode.BACKGROUND)
        .graph_mode(cm.BigValueGraphMode.AREA)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .no_value(no_value)
    )
    if decimals is not None:
        p = p.decimals(decimals)
    return _targets(p, [Q(query.expr, query.legend, instant=False)])


def table(
    title: str, description: str, unit: str, queries: list[Q], *, w: int = 12, h: int = 8
) -> tableb.Panel:
    p = (
        tableb.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .span(w)
        .height(h)
        .with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            dm.DataTransformerConfig(id_val="organize", options={"excludeByName": {"Time": True}})
        )
        .sort_by([cb.TableSortByFieldState().display_name("Value").desc(True)])
    )
    return _targets(p, queries, table=True)


def row(title: str) -> db.Row:
    return db.Row(title)


def variables(d: db.Dashboard) -> db.Dashboard:
    d = d.with_variable(
        db.DatasourceVariable("datasource")
        .label("Data source")
        .type("prometheus")
        .description("The Prometheus that scrapes pgpressure.")
    )

    def query_var(name: str, label: str, query: str, description: str) -> db.QueryVariable:
        return (
            db.QueryVariable(name)
            .label(label)
            .description(description)
            .datasource(DS)
            .query(query)
            .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dm.VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(dm.VariableOption(selected=True, text="All", value="$__all"))
        )

    d = d.with_variable(
        query_var(
            "job",
            "Job",
            "label_values(pgpressure_build_info, job)",
            "The Prometheus job(s) scraping pgpressure.",
        )
    )
    d = d.with_variable(
        query_var(
            "target",
            "Database",
            'label_values(pgpressure_source_up{job=~"$job"}, target)',
            "PostgreSQL targets (databases[].name in the pgpressure config).",
        )
    )
    d = d.with_variable(
        query_var(
            "app",
            "App",
            'label_values(sqlalchemy_pool_size{job=~"$job"}, app)',
            "Instrumented applications (the `app` they report under).",
        )
    )
    d = d.with_variable(
        query_var(
            "proxy",
            "RDS Proxy",
            'label_values(rds_proxy_database_connections{job=~"$job"}, proxy)',
            "RDS Proxies read from CloudWatch.",
        )
    )
    return d


def dashboard(uid: str, title: str, description: str, items: list) -> dict:
    d = (
        db.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["pgpressure", "postgresql", "sqlalchemy"])
        .editable()
        .timezone("browser")
        .time("now-1h", "now")
        .refresh("30s")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .link(
            db.DashboardLink("pgpressure")
            .type(dm.DashboardLinkType.DASHBOARDS)
            .tags(["pgpressure"])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
        .link(
            db.DashboardLink("Runbooks")
            .type(dm.DashboardLinkType.LINK)
            .url(RUNBOOKS)
            .icon("doc")
            .target_blank(True)
        )
    )
    d = variables(d)
    next_id = 1
    for item in items:
        item = item.id(next_id)
        next_id += 1
        d = d.with_row(item) if isinstance(item, db.Row) else d.with_panel(item)
    return json.loads(json.dumps(d.build(), cls=JSONEncoder))


def sum_rate(by: str, metric: str, sel: str, fn: str = "rate", window: str = RI) -> str:
    """sum by (<by>) (<fn>(<metric>{<sel>}[<window>]))"""
    return f"sum by ({by}) ({fn}({metric}{{{sel}}}[{window}]))"


def hq(q: float, metric: str, sel: str, by: str = "app, pool") -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{sel}}}[{RI}])))"


def quantiles(metric: str, by: str = "app, pool") -> list[Q]:
    return [
        Q(hq(q, metric, APP, by), f"{{{{app}}}}/{{{{pool}}}} p{int(q * 100)}")
        for q in (0.5, 0.95, 0.99)
    ]


# --- Overview -------------------------------------------------------------------------------
def overview() -> dict:
    return dashboard(
        "pgpressure-overview",
        "pgpressure / Overview",
        "One screen: is the path app -> pool -> proxy -> PostgreSQL healthy, and where is the "
        "time going. Drill down with the App pools, Database load and RDS Proxy dashboards.",
        [
            row("Is the path healthy?"),
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
            row("Where is the time going?"),
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
                "Database load by wait event type",
                "Average active sessions (AAS) stacked by what they wait on, like Performance "
                "Insights; CPU means running. The dashed line is the vCPU count: load above it "
                "queues. A growing Lock band means blocking, IO means reads or temp files.",
                "short",
                [
                    Q(
                        sum_rate("wait_event_type", "pg_active_session_seconds_total", PG),
                        "{{wait_event_type}}",
                    ),
                    Q(f"sum(pg_vcpus{{{PG}}})", "vCPUs"),
                ],
                w=8,
                stack=True,
                lines=("vCPUs",),
            ),
            row("Proxy and exporter"),
            timeseries(
                "RDS Proxy pinned ratio",
                "Share of each proxy's database connections pinned to one client session "
                "(recording rule job_proxy:rds_proxy_database_connections_pinned:ratio). "
                "Pinned connections are not multiplexed; above 50% is alerted on.",
                "percentunit",
                [
                    Q(
                        f"job_proxy:rds_proxy_database_connections_pinned:ratio{{{PROXY}}}",
                        "{{proxy}}",
                    )
                ],
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
                [
                    Q(
                        'min by (source, target) (pgpressure_source_up{job=~"$job"})',
                        instant=True,
                    )
                ],
                w=6,
            ),
        ],
    )


# --- App pools ------------------------------------------------------------------------------
def app_pools() -> dict:
    return dashboard(
        "pgpressure-app-pools",
        "pgpressure / App pools",
        "SQLAlchemy connection pools of the instrumented apps, aggregated over every "
        "process: connections vs capacity, callers waiting, how long a connection takes to "
        "get and is held, timeouts, and statement latency.",
        [
            row("Capacity"),
            timeseries(
                "Connections: used and idle vs max",
                "Open connections by state, stacked, per pool; the dashed line is pool_size + "
                "max_overflow summed over processes. Used reaching the line means the pool is "
                "exhausted and new checkouts queue.",
                "short",
                [
                    Q(
                        f"sum by (app, pool, state) (sqlalchemy_pool_connections{{{APP}}})",
                        "{{app}}/{{pool}} {{state}}",
                    ),
                    Q(
                        f"sum by (app, pool) (sqlalchemy_pool_max_connections{{{APP}}})",
                        "max",
                    ),
                ],
                stack=True,
                lines=("max",),
            ),
            timeseries(
                "Utilisation",
                "Used / (pool_size + max_overflow) per pool (recording rule job_app_pool:"
                "sqlalchemy_pool_utilisation:ratio). Staying at 100% with callers waiting "
                "fires SQLAlchemyPoolExhausted.",
                "percentunit",
                [Q(f"job_app_pool:sqlalchemy_pool_utilisation:ratio{{{APP}}}", "{{app}}/{{pool}}")],
            ),
            timeseries(
                "Callers waiting (pending requests)",
                "Callers blocked in checkout waiting for a connection, at each report. Above 0 "
                "means requests queue in the app; compare with the checkout wait below.",
                "short",
                [
                    Q(
                        f"sum by (app, pool) (sqlalchemy_pool_pending_requests{{{APP}}})",
                        "{{app}}/{{pool}}",
                    )
                ],
                w=8,
            ),
            timeseries(
                "Checkout timeouts",
                "Checkouts per second that raised the pool TimeoutError after pool_timeout. "
                "Each is a failed request; fires SQLAlchemyPoolCheckoutTimeouts.",
                "ops",
                [
                    Q(
                        sum_rate("app, pool", "sqlalchemy_pool_timeouts_total", APP),
                        "{{app}}/{{pool}}",
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
            row("Time to get and hold a connection"),
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
                [Q(hq(0.95, "sqlalchemy_pool_create_seconds", APP), "{{app}}/{{pool}}")],
                w=8,
            ),
            timeseries(
                "Checkouts per second",
                "Successful checkouts per second per pool: the demand on the pool.",
                "ops",
                [
                    Q(
                        sum_rate("app, pool", "sqlalchemy_pool_checkouts_total", APP),
                        "{{app}}/{{pool}}",
                    )
                ],
            ),
            timeseries(
                "Connections closed by reason",
                "Connections closed per second: recycle (pool_recycle), invalidated (errors, "
                "failed pre-ping), overflow (beyond pool_size, closed on checkin). Steady "
                "overflow closes mean pool_size is below the usual concurrency.",
                "ops",
                [
                    Q(
                        sum_rate(
                            "app, pool, reason", "sqlalchemy_pool_connections_closed_total", APP
                        ),
                        "{{app}}/{{pool}} {{reason}}",
                    )
                ],
                stack=True,
            ),
            row("Statements"),
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
                [
                    Q(
                        sum_rate("app, pool", "sqlalchemy_query_duration_seconds_count", APP),
                        "{{app}}/{{pool}}",
                    )
                ],
            ),
        ],
    )


# --- Database load --------------------------------------------------------------------------
def database_load() -> dict:
    return dashboard(
        "pgpressure-database-load",
        "pgpressure / Database load",
        "PostgreSQL seen from pg_stat_activity (sampled every second) and pg_stat_database / "
        "pg_stat_statements: load by wait event against vCPUs, sessions, blocking, old "
        "transactions, temp files and the statements behind them.",
        [
            row("Load"),
            timeseries(
                "Database load (AAS) by wait event type",
                "Average active sessions stacked by wait event type, like Performance "
                "Insights: CPU = running, Lock = blocked by another session, IO = reading or "
                "writing, Client = waiting for the app, LWLock = internal contention. The "
                "dashed line is the vCPU count; load above it queues.",
                "short",
                [
                    Q(
                        sum_rate("wait_event_type", "pg_active_session_seconds_total", PG),
                        "{{wait_event_type}}",
                    ),
                    Q(f"sum(pg_vcpus{{{PG}}})", "vCPUs"),
                ],
                w=16,
                h=9,
                stack=True,
                lines=("vCPUs",),
            ),
            stat(
                "Load per vCPU (5m)",
                "AAS / vCPUs over 5m per target (recording rule). Above 100% for 10m fires "
                "PostgresLoadAboveVCPUs. Empty when databases[].vcpus is not configured.",
                "percentunit",
                Q(f"max(job_target:pg_active_session_seconds_per_vcpu:ratio_rate5m{{{PG}}})"),
                thresholds=[(None, "green"), (0.7, "orange"), (1, "red")],
                w=8,
                h=9,
                no_value="no vcpus set",
            ),
            timeseries(
                "Top wait events",
                "The ten wait events with the most average active sessions. Look the names up "
                "in the PostgreSQL docs (Wait Event tables) to see what sessions wait for.",
                "short",
                [
                    Q(
                        "topk(10, "
                        + sum_rate(
                            "wait_event_type, wait_event",
                            "pg_active_session_seconds_total",
                            PG,
                            "rate",
                            RI,
                        )
                        + ")",
                        "{{wait_event_type}}:{{wait_event}}",
                    )
                ],
            ),
            timeseries(
                "Load by application",
                "Average active sessions by application_name (top-K plus other): which app "
                "brings the load.",
                "short",
                [
                    Q(
                        sum_rate(
                            "application_name", "pg_application_active_session_seconds_total", PG
                        ),
                        "{{application_name}}",
                    )
                ],
                stack=True,
            ),
            row("Sessions"),
            timeseries(
                "Sessions by state vs max_connections",
                "Client backends by state, stacked; the dashed line is max_connections. Many "
                "idle sessions are open pool connections; above 80% of the line fires "
                "PostgresConnectionsNearMax.",
                "short",
                [
                    Q(f"sum by (state) (pg_sessions{{{PG}}})", "{{state}}"),
                    Q(f"sum(pg_max_connections{{{PG}}})", "max_connections"),
                ],
                w=8,
                stack=True,
                lines=("max_connections",),
            ),
            timeseries(
                "Blocked sessions",
                "Sessions waiting on a lock held by another session, per database. Sustained "
                "blocking for 5m fires PostgresLockContention; find the blocker with "
                "pg_blocking_pids().",
                "short",
                [
                    Q(
                        f"sum by (target, datname) (pg_blocked_sessions{{{PG}}})",
                        "{{target}}/{{datname}}",
                    )
                ],
                w=8,
            ),
            timeseries(
                "Oldest transaction, idle in transaction, query",
                "Age of the oldest open transaction, the longest idle-in-transaction session "
                "and the longest-running query. Long transactions hold locks and hold back "
                "vacuum; idle in transaction over 5m fires PostgresIdleInTransaction.",
                "s",
                [
                    Q(
                        f"max by (target) (pg_oldest_transaction_seconds{{{PG}}})",
                        "{{target}} transaction",
                    ),
                    Q(
                        f"max by (target) (pg_oldest_idle_in_transaction_seconds{{{PG}}})",
                        "{{target}} idle in transaction",
                    ),
                    Q(f"max by (target) (pg_oldest_query_seconds{{{PG}}})", "{{target}} query"),
                ],
                w=8,
            ),
            row("Temporary files and statements"),
            timeseries(
                "Temp bytes written",
                "Bytes per second written to temporary files per database: sorts and hashes "
                "that did not fit in work_mem. Above 10 MiB/s for 15m fires "
                "PostgresTempSpillHigh.",
                "binBps",
                [
                    Q(
                        sum_rate("target, datname", "pg_temp_bytes_total", PG),
                        "{{target}}/{{datname}}",
                    )
                ],
                w=8,
            ),
            timeseries(
                "Temp files created",
                "Temporary files created per second per database.",
                "ops",
                [
                    Q(
                        sum_rate("target, datname", "pg_temp_files_total", PG),
                        "{{target}}/{{datname}}",
                    )
                ],
                w=8,
            ),
            stat(
                "work_mem",
                "The work_mem setting: memory a sort or hash node may use before spilling. "
                "Raise it per statement or role (SET LOCAL work_mem), not globally.",
                "bytes",
                Q(f"max(pg_work_mem_bytes{{{PG}}})"),
                no_value="unknown",
                w=8,
                h=8,
            ),
            table(
                "Top statements by temp bytes (time range)",
                "Statements (pg_stat_statements queryid) that wrote the most temporary bytes "
                "in the time range. Look the text up with SELECT query FROM "
                "pg_stat_statements WHERE queryid = ...; EXPLAIN (ANALYZE, BUFFERS) it.",
                "bytes",
                [
                    Q(
                        "topk(10, "
                        + sum_rate(
                            "target, datname, queryid",
                            "pg_statement_temp_bytes_total",
                            PG,
                            "increase",
                            "$__range",
                        )
                        + ")",
                        instant=True,
                    )
                ],
            ),
            table(
                "Top statements by execution time (time range)",
                "Statements that spent the most execution time in the time range, with their "
                "queryid. These are where tuning pays off first.",
                "s",
                [
                    Q(
                        "topk(10, "
                        + sum_rate(
                            "target, datname, queryid",
                            "pg_statement_exec_seconds_total",
                            PG,
                            "increase",
                            "$__range",
                        )
                        + ")",
                        instant=True,
                    )
                ],
            ),
            timeseries(
                "Mean statement time of the top statements",
                "Execution seconds per call for the top-N statements: a statement whose mean "
                "time grows is getting a worse plan or more data.",
                "s",
                [
                    Q(
                        sum_rate("target, datname, queryid", "pg_statement_exec_seconds_total", PG)
                        + " / "
                        + sum_rate("target, datname, queryid", "pg_statement_calls_total", PG),
                        "{{datname}} {{queryid}}",
                    )
                ],
                w=24,
            ),
        ],
    )


# --- RDS Proxy ------------------------------------------------------------------------------
def rds_proxy() -> dict:
    def by_proxy(metric: str) -> str:
        # CloudWatch publishes a metric per proxy and per target group/target; max() over
        # them is the proxy-wide value and never double counts.
        return f"max by (proxy) ({metric}{{{PROXY}}})"

    return dashboard(
        "pgpressure-rds-proxy",
        "pgpressure / RDS Proxy",
        "RDS Proxy from CloudWatch (a few minutes behind) and its CloudWatch Logs: "
        "database connections vs pinned vs allowed, borrow and query latency, why sessions "
        "get pinned, and which of our statements would pin.",
        [
            row("Connections"),
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
                    Q(by_proxy("rds_proxy_max_database_connections_allowed"), "max allowed"),
                ],
                lines=("max allowed",),
            ),
            timeseries(
                "Pinned ratio",
                "Pinned / database connections of the whole proxy (recording rule). "
                "Above 50% for 15m fires RDSProxySessionPinningHigh.",
                "percentunit",
                [
                    Q(
                        f"job_proxy:rds_proxy_database_connections_pinned:ratio{{{PROXY}}}",
                        "{{proxy}}",
                    )
                ],
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
            row("Latency"),
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
            row("Pinning"),
            timeseries(
                "Pinning reasons",
                "Pinning events per second by reason, from the proxy's CloudWatch Logs: "
                "session_settings (SET -> use SET LOCAL), prepared_statement, "
                "temporary_object, advisory_lock, statement_too_large, sequence, listen, "
                "cursor.",
                "ops",
                [
                    Q(
                        sum_rate("proxy, reason", "rds_proxy_pinning_events_total", PROXY),
                        "{{proxy}} {{reason}}",
                    )
                ],
                stack=True,
                bars=True,
            ),
            timeseries(
                "Pinning-risk statements by reason",
                "Calls per second of statements in pg_stat_statements of the selected "
                "databases that would pin an RDS Proxy session, by reason. Fix these before "
                "(or while) moving behind a proxy.",
                "ops",
                [
                    Q(
                        sum_rate("target, datname, reason", "pg_pinning_risk_calls_total", PG),
                        "{{target}}/{{datname}} {{reason}}",
                    )
                ],
                stack=True,
            ),
        ],
    )


DASHBOARDS: dict[str, Callable[[], dict]] = {
    "overview.json": overview,
    "app-pools.json": app_pools,
    "database-load.json": database_load,
    "rds-proxy.json": rds_proxy,
}


def render() -> dict[str, str]:
    return {
        name: json.dumps(build(), indent=2, sort_keys=True) + "\n"
        for name, build in DASHBOARDS.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if committed JSON differs")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory")
    args = parser.parse_args(argv)
    stale = []
    for name, text in render().items():
        path = args.out / name
        if args.check:
            current = path.read_text() if path.exists() else ""
            if current != text:
                stale.append(name)
                sys.stderr.writelines(
                    difflib.unified_diff(
                        current.splitlines(True),
                        text.splitlines(True),
                        f"{name} (committed)",
                        f"{name} (generated)",
                        n=2,
                    )
                )
        else:
            path.write_text(text)
    if stale:
        print(
            f"out of date: {', '.join(stale)}; run python dashboards/generate.py",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
