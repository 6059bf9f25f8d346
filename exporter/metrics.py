"""The metric catalogue: every name, type, label set and HELP string pgpressure exposes.

Dashboards, alert rules and users' queries depend on these names (docs/metrics.md lists them,
generated from here), so they live in exactly one place, each with the module that produces
it (`producer`). Sources build `Sample`s against these specs; `core/render.py` turns whatever
the store holds into metric families without knowing any name itself.
HELP strings say where a value is sampled, because a scrape never reads a source directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str  # full exposition name; counters end in _total
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    # The module that builds this series' samples: any series is one hop from its source.
    producer: str = ""


@dataclass(frozen=True, slots=True)
class HistogramValue:
    """Cumulative bucket counts keyed by upper bound (the last bound is +Inf)."""

    buckets: tuple[tuple[float, float], ...]
    sum: float
    count: float


@dataclass(frozen=True, slots=True)
class Sample:
    spec: MetricSpec
    labels: tuple[str, ...]  # values in the order of spec.labels; the source adds `target`
    value: float | HistogramValue


CATALOGUE: dict[str, MetricSpec] = {}


def _spec(
    name: str, kind: Kind, help: str, labels: tuple[str, ...] = (), *, producer: str
) -> MetricSpec:
    spec = MetricSpec(name, kind, help, labels, producer)
    if name in CATALOGUE:
        raise ValueError(f"metric {name} declared twice")
    CATALOGUE[name] = spec
    return spec


_POOL = ("app", "pool")
_ACT = "sampled from pg_stat_activity by the activity source"
_DB = "read from pg_stat_database by the database source"
_STMT = "read from pg_stat_statements by the database source"
_CW = "read from CloudWatch (AWS/RDS) by the rds_proxy source, shifted by aws.rds_proxy.delay"
_PUSH = "aggregated from reports pushed by instrumented processes"

# --- application pools (pushed by pgpressure_sqlalchemy) -------------------------------------
POOL_CONNECTIONS = _spec(
    "sqlalchemy_pool_connections",
    "gauge",
    f"Open pool connections by state (used = checked out, idle = in the pool); {_PUSH}.",
    (*_POOL, "state"),
    producer="exporter.ingest.aggregator",
)
POOL_SIZE = _spec(
    "sqlalchemy_pool_size",
    "gauge",
    f"Configured pool_size summed over live processes; {_PUSH}.",
    _POOL,
    producer="exporter.ingest.aggregator",
)
POOL_MAX_CONNECTIONS = _spec(
    "sqlalchemy_pool_max_connections",
    "gauge",
    f"pool_size + max_overflow summed over live processes (+Inf if unbounded); {_PUSH}.",
    _POOL,
    producer="exporter.ingest.aggregator",
)
POOL_PENDING_REQUESTS = _spec(
    "sqlalchemy_pool_pending_requests",
    "gauge",
    f"Callers waiting for a connection at the last report; {_PUSH}.",
    _POOL,
    producer="exporter.ingest.aggregator",
)
POOL_WAIT_SECONDS = _spec(
    "sqlalchemy_pool_wait_seconds",
    "histogram",
    f"Time to obtain a connection: queue wait, connect and pre-ping; {_PUSH}.",
    _POOL,
    producer="exporter.ingest.aggregator",
)
POOL_USE_SECONDS = _spec(
    "sqlalchemy_pool_use_seconds",
    "histogram",
    f"Time a connection was held, checkout to checkin; {_PUSH}.",
    _POOL,
    producer="exporter.ingest.aggregator",
)
POOL_CREATE_SECONDS = _spec(
    "sqlalchemy_pool_create_seconds",
    "histogram",
    f"Time to open a new DBAPI connection; {_PUSH}.",
    _POOL,
    producer="exporter.ingest.aggregator",
)
POOL_CHECKOUTS = _spec(
    "sqlalchemy_pool_checkouts_total",
    "counter",
    f"Successful connection checkouts; {_PUSH}.",
    _POOL,
    producer="exporter.ingest.aggregator",
)
POOL_TIMEOUTS = _spec(
    "sqlalchemy_pool_timeouts_total",
    "counter",
    f"Checkouts that raised the pool TimeoutError; {_PUSH}.",
    _POOL,
    producer="exporter.ingest.aggregator",
)
STATEMENTS_OVERSIZED = _spec(
    "sqlalchemy_statements_oversized_total",
    "counter",
    "Statements whose text on the wire (parameters bound in, for psycopg2) was larger than "
    "RDS Proxy's 16,384-byte limit: each pins its session behind the proxy. The pool's "
    f"examples are in /api/v1/pinning-risk; {_PUSH}.",
    _POOL,
    producer="exporter.ingest.aggregator",
)
POOL_CONNECTIONS_CLOSED = _spec(
    "sqlalchemy_pool_connections_closed_total",
    "counter",
    f"Connections closed by reason (recycle, invalidated, overflow, other); {_PUSH}.",
    (*_POOL, "reason"),
    producer="exporter.ingest.aggregator",
)
POOL_EXHAUSTED_PROCESSES = _spec(
    "sqlalchemy_pool_exhausted_processes",
    "gauge",
    "Live processes whose pool has every connection checked out while callers wait for one "
    f"(a sum over processes hides one exhausted worker among idle ones); {_PUSH}.",
    _POOL,
    producer="exporter.ingest.aggregator",
)
POOL_BUSIEST_UTILISATION = _spec(
    "sqlalchemy_pool_busiest_process_utilisation",
    "gauge",
    "Checked-out connections / the pool's maximum in the busiest live process (0 for an "
    f"unbounded pool); {_PUSH}.",
    _POOL,
    producer="exporter.ingest.aggregator",
)
QUERY_DURATION_SECONDS = _spec(
    "sqlalchemy_query_duration_seconds",
    "histogram",
    f"Statement execution time seen by the application; {_PUSH}.",
    _POOL,
    producer="exporter.ingest.aggregator",
)
APP_PROCESSES = _spec(
    "sqlalchemy_app_processes",
    "gauge",
    "Processes of the app that reported within ingest.stale_after.",
    ("app",),
    producer="exporter.ingest.aggregator",
)

# --- PostgreSQL (every sample also gets the `target` label) -------------------------------
ACTIVE_SESSION_SECONDS = _spec(
    "pg_active_session_seconds_total",
    "counter",
    f"Active-session seconds, {_ACT} (interval x sessions per sample); CPU/CPU when active "
    "without a wait event. rate() gives average active sessions (AAS).",
    ("datname", "wait_event_type", "wait_event"),
    producer="exporter.postgres.activity",
)
APPLICATION_ACTIVE_SESSION_SECONDS = _spec(
    "pg_application_active_session_seconds_total",
    "counter",
    f"Active-session seconds by application_name (top-K plus other), {_ACT}.",
    ("datname", "application_name"),
    producer="exporter.postgres.activity",
)
SESSIONS = _spec(
    "pg_sessions",
    "gauge",
    f"Client backends by state at the last sample, {_ACT}.",
    ("datname", "state"),
    producer="exporter.postgres.activity",
)
BLOCKED_SESSIONS = _spec(
    "pg_blocked_sessions",
    "gauge",
    f"Sessions waiting on a lock held by another session at the last sample, {_ACT}.",
    ("datname",),
    producer="exporter.postgres.activity",
)
OLDEST_TRANSACTION_SECONDS = _spec(
    "pg_oldest_transaction_seconds",
    "gauge",
    f"Age of the oldest open transaction at the last sample, {_ACT}.",
    ("datname",),
    producer="exporter.postgres.activity",
)
OLDEST_IDLE_IN_TRANSACTION_SECONDS = _spec(
    "pg_oldest_idle_in_transaction_seconds",
    "gauge",
    f"Longest time a session has been idle in transaction at the last sample, {_ACT}.",
    ("datname",),
    producer="exporter.postgres.activity",
)
OLDEST_QUERY_SECONDS = _spec(
    "pg_oldest_query_seconds",
    "gauge",
    f"Age of the longest-running active query at the last sample, {_ACT}.",
    ("datname",),
    producer="exporter.postgres.activity",
)
ACTIVITY_SAMPLES = _spec(
    "pg_activity_samples_total",
    "counter",
    f"Activity samples taken, {_ACT}.",
    producer="exporter.postgres.activity",
)
MAX_CONNECTIONS = _spec(
    "pg_max_connections",
    "gauge",
    "The max_connections setting, read by the activity source.",
    producer="exporter.postgres.activity",
)
VCPUS = _spec(
    "pg_vcpus",
    "gauge",
    "vCPUs of the database server, exported with the activity samples: source=config is "
    "databases[].vcpus; source=aws, without it, is the RDS instance class's vCPUs (or, on "
    "Aurora Serverless v2, Performance Insights' os.general.numVCPUs) read by the rds_instance "
    "source.",
    ("source",),
    producer="exporter.postgres.activity",
)
APPLICATION_SESSIONS = _spec(
    "pg_application_sessions",
    "gauge",
    f"Client backends by application_name (top-K plus other) at the last sample, {_ACT}.",
    ("datname", "application_name"),
    producer="exporter.postgres.holders",
)
APPLICATION_IDLE_IN_TRANSACTION_SECONDS = _spec(
    "pg_application_idle_in_transaction_seconds",
    "gauge",
    "Longest time a session of the application_name has been idle in transaction, for the 5 "
    f"longest, at the last sample, {_ACT}.",
    ("datname", "application_name"),
    producer="exporter.postgres.holders",
)
LOCK_BLOCKER_SECONDS = _spec(
    "pg_lock_blocker_seconds",
    "gauge",
    "Age of the transaction of a session others wait on for a lock, by its application_name, "
    f"for the 5 longest, at the last sample, {_ACT}.",
    ("datname", "application_name"),
    producer="exporter.postgres.holders",
)
RESERVED_CONNECTIONS = _spec(
    "pg_reserved_connections",
    "gauge",
    "Connection slots ordinary roles cannot use (superuser_reserved_connections plus "
    "reserved_connections on PostgreSQL 16+), read by the activity source.",
    producer="exporter.postgres.activity",
)
TEMP_BYTES = _spec(
    "pg_temp_bytes_total",
    "counter",
    f"Bytes written to temporary files, {_DB}.",
    ("datname",),
    producer="exporter.postgres.database",
)
TEMP_FILES = _spec(
    "pg_temp_files_total",
    "counter",
    f"Temporary files created, {_DB}.",
    ("datname",),
    producer="exporter.postgres.database",
)
SESSIONS_ENDED = _spec(
    "pg_sessions_ended_total",
    "counter",
    "Sessions of all databases of the target that ended other than by the client's "
    "disconnect, from pg_stat_database (PostgreSQL 14+): `abandoned` (the client went away "
    "without saying so), `fatal` (a fatal error), `killed` (an operator, or a timeout "
    "such as idle_in_transaction_session_timeout). Absent on older servers.",
    ("reason",),
    producer="exporter.postgres.database",
)
INVALID_UTF8_STRINGS = _spec(
    "pg_invalid_utf8_strings_total",
    "counter",
    "Strings read from the target that were not valid UTF-8 (a SQL_ASCII database, a name "
    "with stray bytes) and were shown with U+FFFD for the invalid bytes; read through the "
    "target's connection, exported by the database source.",
    producer="exporter.postgres.database",
)
WORK_MEM_BYTES = _spec(
    "pg_work_mem_bytes",
    "gauge",
    "The work_mem setting in bytes, read by the database source.",
    producer="exporter.postgres.database",
)
STATEMENTS_AVAILABLE = _spec(
    "pg_stat_statements_available",
    "gauge",
    "1 if pg_stat_statements is installed and readable in the target database, else 0.",
    producer="exporter.postgres.database",
)
STATEMENT_TEMP_BYTES = _spec(
    "pg_statement_temp_bytes_total",
    "counter",
    f"Temp bytes written by the top-N statements by recent temp writes, {_STMT}.",
    ("datname", "queryid"),
    producer="exporter.postgres.database",
)
STATEMENT_CALLS = _spec(
    "pg_statement_calls_total",
    "counter",
    f"Calls of the top-N statements by recent execution time, {_STMT}.",
    ("datname", "queryid"),
    producer="exporter.postgres.database",
)
STATEMENT_EXEC_SECONDS = _spec(
    "pg_statement_exec_seconds_total",
    "counter",
    f"Execution time of the top-N statements by recent execution time, {_STMT}.",
    ("datname", "queryid"),
    producer="exporter.postgres.database",
)
PINNING_RISK_CALLS = _spec(
    "pg_pinning_risk_calls_total",
    "counter",
    f"Calls of statements that would pin an RDS Proxy session, by reason, {_STMT}.",
    ("datname", "reason"),
    producer="exporter.pinning.risk",
)

# --- RDS Proxy ----------------------------------------------------------------------------
_PROXY = ("proxy", "target_group", "target")
RDS_PROXY_PINNED = _spec(
    "rds_proxy_database_connections_currently_session_pinned",
    "gauge",
    f"DatabaseConnectionsCurrentlySessionPinned (Sum), {_CW}. 0 until AWS publishes a pin.",
    _PROXY,
    producer="exporter.aws.rds_proxy",
)
RDS_PROXY_DATABASE_CONNECTIONS = _spec(
    "rds_proxy_database_connections",
    "gauge",
    f"DatabaseConnections (Sum), {_CW}.",
    _PROXY,
    producer="exporter.aws.rds_proxy",
)
RDS_PROXY_BORROWED = _spec(
    "rds_proxy_database_connections_currently_borrowed",
    "gauge",
    f"DatabaseConnectionsCurrentlyBorrowed (Sum), {_CW}.",
    _PROXY,
    producer="exporter.aws.rds_proxy",
)
RDS_PROXY_IN_TRANSACTION = _spec(
    "rds_proxy_database_connections_currently_in_transaction",
    "gauge",
    f"DatabaseConnectionsCurrentlyInTransaction (Sum), {_CW}.",
    _PROXY,
    producer="exporter.aws.rds_proxy",
)
RDS_PROXY_MAX_ALLOWED = _spec(
    "rds_proxy_max_database_connections_allowed",
    "gauge",
    f"MaxDatabaseConnectionsAllowed (Sum), {_CW}.",
    _PROXY,
    producer="exporter.aws.rds_proxy",
)
RDS_PROXY_CLIENT_CONNECTIONS = _spec(
    "rds_proxy_client_connections",
    "gauge",
    f"ClientConnections (Sum), {_CW}.",
    _PROXY,
    producer="exporter.aws.rds_proxy",
)
RDS_PROXY_BORROW_LATENCY = _spec(
    "rds_proxy_database_connections_borrow_latency_seconds",
    "gauge",
    f"DatabaseConnectionsBorrowLatency (Average), converted from microseconds, {_CW}.",
    _PROXY,
    producer="exporter.aws.rds_proxy",
)
RDS_PROXY_QUERY_LATENCY = _spec(
    "rds_proxy_query_database_response_latency_seconds",
    "gauge",
    f"QueryDatabaseResponseLatency (Average), converted from microseconds, {_CW}.",
    _PROXY,
    producer="exporter.aws.rds_proxy",
)
RDS_PROXY_PINNING_EVENTS = _spec(
    "rds_proxy_pinning_events_total",
    "counter",
    "Pinning lines in the proxy's CloudWatch Logs by reason, read by the rds_proxy source.",
    ("proxy", "reason"),
    producer="exporter.aws.rds_proxy",
)
RDS_PROXY_WOULD_PIN_EVENTS = _spec(
    "rds_proxy_pinning_would_pin_events_total",
    "counter",
    "Lines in the proxy's CloudWatch Logs warning that a prepared statement would pin the "
    "session if it ran, by reason. Warnings, not pins.",
    ("proxy", "reason"),
    producer="exporter.pinning.log_totals",
)
RDS_PROXY_PINNING_LOGS_SILENT = _spec(
    "rds_proxy_pinning_logs_silent",
    "gauge",
    "1 if the proxy reports pinned connections but its log group has had no pinning lines for "
    "24 hours (enhanced logging turns itself off after 24 hours), else 0.",
    ("proxy",),
    producer="exporter.pinning.log_totals",
)

# --- RDS and Aurora instances (databases[].aws; every sample also gets the `target` label) --
_RDS = (
    "read from CloudWatch (AWS/RDS, DBInstanceIdentifier) by the rds_instance source, "
    "shifted by aws.rds_proxy.delay"
)
_DBLOAD = "AWS publishes it only with Performance Insights on; a minute without is 0"
RDS_INSTANCE_INFO = _spec(
    "aws_rds_instance_info",
    "gauge",
    "Always 1: the RDS instance a target is on, its class, its Aurora cluster and role "
    "(writer, reader, or instance outside a cluster), from DescribeDBInstances.",
    ("db_instance", "db_instance_class", "db_cluster", "role"),
    producer="exporter.aws.rds_instances",
)
RDS_DB_LOAD = _spec(
    "aws_rds_db_load",
    "gauge",
    f"DBLoad (Average): AWS's average active sessions, {_RDS}. {_DBLOAD}.",
    ("db_instance",),
    producer="exporter.aws.rds_instances",
)
RDS_DB_LOAD_CPU = _spec(
    "aws_rds_db_load_cpu",
    "gauge",
    f"DBLoadCPU (Average): active sessions on CPU, {_RDS}. {_DBLOAD}.",
    ("db_instance",),
    producer="exporter.aws.rds_instances",
)
RDS_DB_LOAD_NON_CPU = _spec(
    "aws_rds_db_load_non_cpu",
    "gauge",
    f"DBLoadNonCPU (Average): active sessions waiting, {_RDS}. {_DBLOAD}.",
    ("db_instance",),
    producer="exporter.aws.rds_instances",
)
RDS_DB_LOAD_RELATIVE_TO_VCPUS = _spec(
    "aws_rds_db_load_relative_to_num_vcpus",
    "gauge",
    f"DBLoadRelativeToNumVCPUs (Average): DBLoad per vCPU, {_RDS}. {_DBLOAD}.",
    ("db_instance",),
    producer="exporter.aws.rds_instances",
)
RDS_CPU_UTILIZATION = _spec(
    "aws_rds_cpu_utilization_ratio",
    "gauge",
    f"CPUUtilization (Average) as a ratio (0-1), {_RDS}.",
    ("db_instance",),
    producer="exporter.aws.rds_instances",
)
RDS_DATABASE_CONNECTIONS = _spec(
    "aws_rds_database_connections",
    "gauge",
    f"DatabaseConnections (Average), {_RDS}.",
    ("db_instance",),
    producer="exporter.aws.rds_instances",
)
RDS_FREEABLE_MEMORY = _spec(
    "aws_rds_freeable_memory_bytes",
    "gauge",
    f"FreeableMemory (Average), {_RDS}.",
    ("db_instance",),
    producer="exporter.aws.rds_instances",
)
RDS_SERVERLESS_CAPACITY = _spec(
    "aws_rds_serverless_database_capacity_acus",
    "gauge",
    f"ServerlessDatabaseCapacity (Average) in ACUs, Aurora Serverless v2 only, {_RDS}.",
    ("db_instance",),
    producer="exporter.aws.rds_instances",
)
RDS_ACU_UTILIZATION = _spec(
    "aws_rds_acu_utilization_ratio",
    "gauge",
    f"ACUUtilization (Average) as a ratio (0-1) of the maximum ACUs, Serverless v2 only, {_RDS}.",
    ("db_instance",),
    producer="exporter.aws.rds_instances",
)
RDS_SERVERLESS_MIN_ACUS = _spec(
    "aws_rds_serverless_min_capacity_acus",
    "gauge",
    "The cluster's Serverless v2 MinCapacity in ACUs (DescribeDBClusters), read by the "
    "rds_instance source.",
    ("db_instance",),
    producer="exporter.aws.rds_instances",
)
RDS_SERVERLESS_MAX_ACUS = _spec(
    "aws_rds_serverless_max_capacity_acus",
    "gauge",
    "The cluster's Serverless v2 MaxCapacity in ACUs (DescribeDBClusters), read by the "
    "rds_instance source.",
    ("db_instance",),
    producer="exporter.aws.rds_instances",
)

# --- the exporter itself -------------------------------------------------------------------
BUILD_INFO = _spec(
    "pgpressure_build_info",
    "gauge",
    "Always 1; the version label.",
    ("version",),
    producer="exporter.core.selfmetrics",
)
SOURCE_UP = _spec(
    "pgpressure_source_up",
    "gauge",
    "1 if the source's last run succeeded, else 0.",
    ("source", "target"),
    producer="exporter.core.selfmetrics",
)
SOURCE_LAST_SUCCESS = _spec(
    "pgpressure_source_last_success_timestamp_seconds",
    "gauge",
    "Unix time of the source's last successful run; values it exported date from then.",
    ("source", "target"),
    producer="exporter.core.selfmetrics",
)
SOURCE_DURATION = _spec(
    "pgpressure_source_duration_seconds",
    "gauge",
    "Duration of the source's last run.",
    ("source", "target"),
    producer="exporter.core.selfmetrics",
)
SOURCE_ERRORS = _spec(
    "pgpressure_source_errors_total",
    "counter",
    "Failed runs of the source (connection errors, timeouts, API errors).",
    ("source", "target"),
    producer="exporter.core.selfmetrics",
)
REPORTS = _spec(
    "pgpressure_reports_total",
    "counter",
    "Pushed app reports by result (accepted, or the reason they were refused).",
    ("result",),
    producer="exporter.ingest.results",
)
INGEST_SUM_RESETS = _spec(
    "pgpressure_ingest_sum_resets_total",
    "counter",
    "Histogram sums of pushed reports that overflowed (+Inf, sums of sums near the float "
    "maximum) and restarted from the live processes' sums: a counter reset of that series.",
    producer="exporter.ingest.aggregator",
)
INGEST_MEMORY = _spec(
    "pgpressure_ingest_memory_bytes",
    "gauge",
    "Estimated bytes ingest holds against ingest.memory_budget_bytes: state (the last "
    "report of each live and recently departed process) and bodies (reports being received).",
    ("part",),
    producer="exporter.ingest.budget",
)
INGEST_MEMORY_BUDGET = _spec(
    "pgpressure_ingest_memory_budget_bytes",
    "gauge",
    "ingest.memory_budget_bytes: past it pushes are refused (pgpressure_reports_total "
    "result over_budget or busy).",
    producer="exporter.ingest.budget",
)
HTTP_CONNECTIONS_REFUSED = _spec(
    "pgpressure_http_connections_refused_total",
    "counter",
    "Connections closed on accept because --web.max-connections were already open, or "
    "because the client's address already held its share of them (a quarter).",
    producer="exporter.core.selfmetrics",
)
HTTP_HEADER_TIMEOUTS = _spec(
    "pgpressure_http_header_timeouts_total",
    "counter",
    "Connections closed because a request's headers were not complete within 10 s of the "
    "connection opening (or of the next request's first byte): slow or stalled clients, or a "
    "slow-header flood.",
    producer="exporter.core.selfmetrics",
)
CONFIG_LAST_RELOAD_SUCCESSFUL = _spec(
    "pgpressure_config_last_reload_successful",
    "gauge",
    "1 if the last reload of --config.file (SIGHUP or POST /-/reload) succeeded, else 0: "
    "the daemon then runs on the configuration it had before.",
    producer="exporter.reload",
)
CONFIG_LAST_RELOAD_SUCCESS = _spec(
    "pgpressure_config_last_reload_success_timestamp_seconds",
    "gauge",
    "Unix time the configuration in use was loaded: at start or by the last good reload.",
    producer="exporter.reload",
)
CLOUDWATCH_METRICS_REQUESTED = _spec(
    "pgpressure_cloudwatch_metrics_requested_total",
    "counter",
    "Metric queries sent to CloudWatch GetMetricData (what AWS bills for), counted for the "
    "source that asked for them (rds_proxy, or rds_instance with its target).",
    producer="exporter.aws.cloudwatch",
)

# --- diagnosis ----------------------------------------------------------------------------
FINDING = _spec(
    "pgpressure_finding",
    "gauge",
    "1 for each finding of the diagnosis rules at their last evaluation; its numbers, cause "
    "and fix are at /api/v1/findings. Subject labels a rule does not use are empty.",
    ("rule", "severity", "target", "datname", "app", "pool", "proxy"),
    producer="exporter.diagnosis.engine",
)
