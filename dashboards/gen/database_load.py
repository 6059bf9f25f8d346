"""pgpressure / Database load: PostgreSQL seen from pg_stat_activity samples and
pg_stat_database / pg_stat_statements."""

from __future__ import annotations

from .board import dashboard
from .panels import row, stat, table, timeseries
from .queries import PG, Q, sum_rate

FILE = "database-load.json"
DB = "{{target}}/{{datname}}"
STATEMENT = "target, datname, queryid"


def build() -> dict:
    return dashboard(
        "pgpressure-database-load",
        "pgpressure / Database load",
        "PostgreSQL seen from pg_stat_activity (sampled every second) and pg_stat_database / "
        "pg_stat_statements: load by wait event against vCPUs, sessions, blocking, old "
        "transactions, temp files and the statements behind them.",
        [
            # Stacked load and sessions are read against one server's vCPUs and
            # max_connections, so this row is drawn once per selected database.
            row("$target: load and sessions", repeat="target"),
            *_load(),
            *_load_breakdown(),
            *_sessions(),
            *_old_transactions(),
            row("pgpressure AAS vs AWS DBLoad"),
            *_aws_load(),
            *_aws_instance(),
            row("Temporary files and statements"),
            *_temp(),
            *_top_statements(),
            _mean_statement_time(),
        ],
    )


def _load() -> list:
    return [
        timeseries(
            "Database load (AAS) by wait event type",
            "Average active sessions stacked by wait event type, like Performance "
            "Insights: CPU = running, Lock = blocked by another session, IO = reading or "
            "writing, Client = waiting for the app, LWLock = internal contention. The "
            "dashed line is this database's vCPU count; load above it queues.",
            "short",
            [
                Q(
                    sum_rate("wait_event_type", "pg_active_session_seconds_total", PG),
                    "{{wait_event_type}}",
                ),
                Q(f"max by (target) (pg_vcpus{{{PG}}})", "{{target}} vCPUs"),
            ],
            w=16,
            h=9,
            stack=True,
            lines=("vCPUs",),
        ),
        stat(
            "Load per vCPU (5m)",
            "AAS / vCPUs of this database over 5m (recording rule). Above 100% for 10m fires "
            "PostgresLoadAboveVCPUs. Empty when databases[].vcpus is not configured.",
            "percentunit",
            Q(f"max(job_target:pg_active_session_seconds_per_vcpu:ratio_rate5m{{{PG}}})"),
            thresholds=[(None, "green"), (0.7, "orange"), (1, "red")],
            w=8,
            h=9,
            no_value="no vcpus set",
        ),
    ]


def _aws_load() -> list:
    """pgpressure's sampled load beside Performance Insights' own (the `aws:` block of a
    target): both are average active sessions, so over 15 minutes they should agree."""
    return [
        timeseries(
            "pgpressure AAS vs AWS DBLoad",
            "Both are average active sessions over 15 minutes: pgpressure's from its "
            "pg_stat_activity samples, DBLoad from Performance Insights (CloudWatch AWS/RDS, "
            "aws.rds_proxy.delay late). More than 25% apart means pgpressure misses samples or "
            "cannot see some sessions (docs/aurora.md). Empty without an `aws:` block on the "
            "target or without Performance Insights.",
            "short",
            [
                Q(
                    f"job_target:pg_active_session_seconds:rate15m{{{PG}}}",
                    "{{target}} pgpressure AAS",
                ),
                Q(f"job_target:aws_rds_db_load:avg15m{{{PG}}}", "{{target}} AWS DBLoad"),
            ],
            w=16,
            h=8,
        ),
        stat(
            "AAS / DBLoad (15m)",
            "pgpressure's load over AWS's; 1 when they agree, outside 0.75-1.25 they disagree.",
            "percentunit",
            Q(f"max(job_target:pg_active_sessions_per_aws_db_load:ratio15m{{{PG}}})"),
            thresholds=[(None, "orange"), (0.75, "green"), (1.25, "orange")],
            w=8,
            h=8,
            no_value="no DBLoad",
        ),
    ]


def _aws_instance() -> list:
    """What AWS says about the instance under each target (databases[].aws): its CPU, memory
    and connections, DBLoad split CPU / non-CPU, and a Serverless v2 instance's capacity."""
    instance = "{{target}} ({{db_instance}})"

    def per_instance(metric: str) -> str:
        return f"max by (target, db_instance) ({metric}{{{PG}}})"

    return [
        timeseries(
            "Instance: CPU, DBLoad per vCPU",
            "CPUUtilization and DBLoadRelativeToNumVCPUs from CloudWatch AWS/RDS; DBLoad per "
            "vCPU above 100% means sessions queue for CPU, as AAS per vCPU does here.",
            "percentunit",
            [
                Q(
                    per_instance("aws_rds_cpu_utilization_ratio"),
                    f"{instance} CPU",
                ),
                Q(
                    per_instance("aws_rds_db_load_relative_to_num_vcpus"),
                    f"{instance} DBLoad per vCPU",
                ),
            ],
            w=8,
        ),
        timeseries(
            "Instance: DBLoad on CPU and waiting",
            "DBLoadCPU and DBLoadNonCPU (Performance Insights): AWS's split of the load.",
            "short",
            [
                Q(
                    per_instance("aws_rds_db_load_cpu"),
                    f"{instance} on CPU",
                ),
                Q(
                    per_instance("aws_rds_db_load_non_cpu"),
                    f"{instance} waiting",
                ),
            ],
            w=8,
        ),
        timeseries(
            "Instance: connections and freeable memory",
            "DatabaseConnections and FreeableMemory from CloudWatch, per instance.",
            "short",
            [
                Q(
                    per_instance("aws_rds_database_connections"),
                    f"{instance} connections",
                ),
                Q(
                    per_instance("aws_rds_freeable_memory_bytes") + " / 2^30",
                    f"{instance} freeable GiB",
                ),
            ],
            w=8,
        ),
        timeseries(
            "Serverless v2 capacity (ACUs)",
            "ServerlessDatabaseCapacity against the configured minimum and maximum, and "
            "ACUUtilization (capacity / maximum). AWS gives no ACU-to-vCPU ratio: judge load "
            "against Performance Insights' vCPUs (docs/aurora.md).",
            "short",
            [
                Q(
                    per_instance("aws_rds_serverless_database_capacity_acus"),
                    f"{instance} ACUs",
                ),
                Q(
                    per_instance("aws_rds_serverless_min_capacity_acus"),
                    f"{instance} min",
                ),
                Q(
                    per_instance("aws_rds_serverless_max_capacity_acus"),
                    f"{instance} max",
                ),
                Q(
                    "100 * " + per_instance("aws_rds_acu_utilization_ratio"),
                    f"{instance} ACU utilisation %",
                ),
            ],
            w=12,
            lines=("max", "min"),
        ),
        table(
            "Instances",
            "The RDS instance under each target: class, Aurora cluster and role.",
            "short",
            [
                Q(
                    "max by (target, db_instance, db_instance_class, db_cluster, role) "
                    f"(aws_rds_instance_info{{{PG}}})",
                    instant=True,
                )
            ],
        ),
    ]


def _load_breakdown() -> list:
    return [
        timeseries(
            "Top wait events",
            "The ten wait events with the most average active sessions. Look the names up "
            "in the PostgreSQL docs (Wait Event tables) to see what sessions wait for.",
            "short",
            [
                Q(
                    "topk(10, "
                    + sum_rate("wait_event_type, wait_event", "pg_active_session_seconds_total", PG)
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
                    sum_rate("application_name", "pg_application_active_session_seconds_total", PG),
                    "{{application_name}}",
                )
            ],
            stack=True,
        ),
    ]


def _sessions() -> list:
    return [
        timeseries(
            "Sessions by state vs max_connections",
            "Client backends by state, stacked; the dashed line is this database's "
            "max_connections. Many idle sessions are open pool connections; above 80% of the "
            "line fires PostgresConnectionsNearMax.",
            "short",
            [
                Q(f"sum by (state) (pg_sessions{{{PG}}})", "{{state}}"),
                Q(
                    f"max by (target) (pg_max_connections{{{PG}}})",
                    "{{target}} max_connections",
                ),
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
            [Q(f"sum by (target, datname) (pg_blocked_sessions{{{PG}}})", DB)],
            w=8,
        ),
    ]


def _old_transactions() -> list:
    by_app = "{{target}}/{{datname}} {{application_name}}"
    return [
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
        timeseries(
            "Sessions, lock holders and idle transactions by application",
            "Client backends by application_name (instrumented apps set it to their app "
            "name), the age of the transaction of a session others wait on for a lock (the "
            "blocker), and the longest idle-in-transaction session, by application.",
            "short",
            [
                Q(
                    f"sum by (target, datname, application_name) (pg_application_sessions{{{PG}}})",
                    f"{by_app} sessions",
                ),
                Q(
                    f"max by (target, datname, application_name) (pg_lock_blocker_seconds{{{PG}}})",
                    f"{by_app} holding a lock (s)",
                ),
                Q(
                    "max by (target, datname, application_name) "
                    f"(pg_application_idle_in_transaction_seconds{{{PG}}})",
                    f"{by_app} idle in transaction (s)",
                ),
            ],
            w=16,
        ),
        timeseries(
            "Sessions ended abnormally",
            "Sessions that did not end by their client's disconnect, per bar (PostgreSQL "
            "14+): abandoned (the client vanished: crashed or killed workers, network "
            "resets), killed (an operator or a timeout such as "
            "idle_in_transaction_session_timeout), fatal. With connection churn the "
            "connection_churn finding names them.",
            "short",
            [
                Q(
                    sum_rate("target, reason", "pg_sessions_ended_total", PG, "increase"),
                    "{{target}} {{reason}}",
                )
            ],
            w=8,
            bars=True,
        ),
    ]


def _temp() -> list:
    return [
        timeseries(
            "Temp bytes written",
            "Bytes per second written to temporary files per database: sorts and hashes "
            "that did not fit in work_mem. Above 10 MiB/s for 15m fires "
            "PostgresTempSpillHigh.",
            "binBps",
            [Q(sum_rate("target, datname", "pg_temp_bytes_total", PG), DB)],
            w=8,
        ),
        timeseries(
            "Temp files created",
            "Temporary files created per second per database.",
            "ops",
            [Q(sum_rate("target, datname", "pg_temp_files_total", PG), DB)],
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
    ]


def _top(metric: str) -> Q:
    """The ten statements with the largest increase of `metric` over the time range."""
    return Q(f"topk(10, {sum_rate(STATEMENT, metric, PG, 'increase', '$__range')})", instant=True)


def _top_statements() -> list:
    return [
        table(
            "Top statements by temp bytes (time range)",
            "Statements (pg_stat_statements queryid) that wrote the most temporary bytes "
            "in the time range. Look the text up with SELECT query FROM "
            "pg_stat_statements WHERE queryid = ...; EXPLAIN (ANALYZE, BUFFERS) it.",
            "bytes",
            [_top("pg_statement_temp_bytes_total")],
        ),
        table(
            "Top statements by execution time (time range)",
            "Statements that spent the most execution time in the time range, with their "
            "queryid. These are where tuning pays off first.",
            "s",
            [_top("pg_statement_exec_seconds_total")],
        ),
    ]


def _mean_statement_time():
    return timeseries(
        "Mean statement time of the top statements",
        "Execution seconds per call for the top-N statements: a statement whose mean "
        "time grows is getting a worse plan or more data.",
        "s",
        [
            Q(
                sum_rate(STATEMENT, "pg_statement_exec_seconds_total", PG)
                + " / "
                + sum_rate(STATEMENT, "pg_statement_calls_total", PG),
                f"{DB} {{{{queryid}}}}",
            )
        ],
        w=24,
    )
