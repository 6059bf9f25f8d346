"""The pg_stat_activity sampler: database load by wait event, like Performance Insights.

Every `interval` seconds one grouped query reads the client backends (our own session
excluded). Each active session adds `interval` seconds to a counter keyed by its wait event
(`CPU` when active without one), so rate() over any window is the average number of active
sessions (AAS) whatever the scrape interval. The query groups on the server (by database,
state, wait event and application), so its result stays small with hundreds of sessions,
and it calls pg_blocking_pids() only for sessions waiting on a heavyweight Lock (the
function takes the lock manager's locks).

A sample skipped because the previous one overran (its target's connection busy for longer
than the interval) adds nothing: each sample stands for one interval, so a long stall
under-counts load rather than guessing it. `pg_activity_samples_total` shows the gaps.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from exporter import metrics as m
from exporter.config import DatabaseConfig
from exporter.core.cardinality import OTHER, CappedCounters, LabelCap
from exporter.core.source import Source
from exporter.metrics import Sample
from exporter.postgres import holders
from exporter.postgres.connection import TargetConnection

QUERY = """
SELECT s.max_connections, s.reserved_connections, g.*
FROM (SELECT current_setting('max_connections')::int AS max_connections,
             current_setting('superuser_reserved_connections')::int
             + coalesce(current_setting('reserved_connections', true)::int, 0)
                 AS reserved_connections) s
LEFT JOIN (
    SELECT coalesce(a.datname, '') AS datname,
           coalesce(a.state, 'unknown') AS state,
           a.wait_event_type, a.wait_event,
           coalesce(a.application_name, '') AS application_name,
           count(*) AS sessions,
           count(*) FILTER (WHERE a.wait_event_type = 'Lock'
                            AND cardinality(pg_blocking_pids(a.pid)) > 0) AS blocked,
           max(extract(epoch FROM now() - a.xact_start)) AS xact_age,
           max(extract(epoch FROM now() - a.state_change))
               FILTER (WHERE a.state LIKE 'idle in transaction%') AS idle_in_xact_age,
           max(extract(epoch FROM now() - a.query_start))
               FILTER (WHERE a.state = 'active') AS query_age
    FROM pg_stat_activity a
    WHERE a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()
    GROUP BY 1, 2, 3, 4, 5
) g ON true
"""

STATES = (
    "active",
    "idle",
    "idle in transaction",
    "idle in transaction (aborted)",
    "fastpath function call",
    "disabled",
)


class ActivitySource(Source):
    name = "activity"
    backoff_max = 2.0  # a restarted database must be seen again within seconds

    def __init__(self, config: DatabaseConfig, conn: TargetConnection, datnames: LabelCap) -> None:
        self.config = config
        self.conn = conn
        self.target = config.name
        self.interval = config.activity.interval
        self.scope = (("target", config.name),)
        self._datname = datnames
        self._load: dict[tuple[str, str, str], float] = defaultdict(float)
        self._by_app = CappedCounters(
            config.activity.top_applications, other_key=("other", "other")
        )
        self._samples = 0
        # every active-session second sampled, all databases (the AWS DBLoad cross-check)
        self.active_seconds_total = 0.0
        self._aws_vcpus: float | None = None  # set by the target's rds_instance source

    async def sample(self) -> Iterable[Sample]:
        rows = await self.conn.fetch(QUERY)
        step = self.interval
        sessions: dict[tuple[str, str], float] = defaultdict(float)
        blocked: dict[str, float] = defaultdict(float)
        oldest_xact: dict[str, float] = defaultdict(float)
        oldest_idle: dict[str, float] = defaultdict(float)
        oldest_query: dict[str, float] = defaultdict(float)
        by_app: dict[tuple[str, str], float] = defaultdict(float)
        idle_by_app: dict[tuple[str, str], float] = defaultdict(float)
        max_connections = reserved = 0.0
        for row in rows:
            max_connections = float(row["max_connections"])
            reserved = float(row["reserved_connections"])
            if row["sessions"] is None:  # no client backends at all
                continue
            db = self._datname(row["datname"])
            n = float(row["sessions"])
            state = row["state"]
            sessions[(db, state)] += n
            app_key = (db, row["application_name"])
            by_app[app_key] += n
            if row["idle_in_xact_age"] is not None:
                idle = float(row["idle_in_xact_age"])
                idle_by_app[app_key] = max(idle_by_app[app_key], idle)
            blocked[db] += float(row["blocked"])
            for ages, key in (
                (oldest_xact, "xact_age"),
                (oldest_idle, "idle_in_xact_age"),
                (oldest_query, "query_age"),
            ):
                age = row[key]
                ages[db] = max(ages[db], float(age) if age is not None else 0.0)
            if state == "active":
                wait_type = row["wait_event_type"] or "CPU"
                wait_event = row["wait_event"] or "CPU"
                self._load[(db, wait_type, wait_event)] += n * step
                self.active_seconds_total += n * step
                self._by_app.add((db, row["application_name"]), n * step)
        self._by_app.commit()
        self._samples += 1
        # Series of databases dropped since (their cap slot released by the database
        # source) end here, so churning databases cannot grow the counters without bound.
        live = self._datname.seen() | {OTHER}
        for key in [k for k in self._load if k[0] not in live]:
            del self._load[key]
        out = list(
            self._render(sessions, blocked, oldest_xact, oldest_idle, oldest_query, max_connections)
        )
        # Which apps use the target and which hold locks or transactions (bounded).
        out += holders.application_sessions(by_app, self.config.activity.top_applications)
        out += holders.idle_in_transaction(idle_by_app)
        if any(blocked.values()):
            out += await holders.blockers(self.conn.fetch, self._datname)
        out.append(Sample(m.RESERVED_CONNECTIONS, (), reserved))
        return out

    def _render(
        self,
        sessions: dict[tuple[str, str], float],
        blocked: dict[str, float],
        oldest_xact: dict[str, float],
        oldest_idle: dict[str, float],
        oldest_query: dict[str, float],
        max_connections: float,
    ) -> Iterable[Sample]:
        for labels, seconds in self._load.items():
            yield Sample(m.ACTIVE_SESSION_SECONDS, labels, seconds)
        for (db, app), (seconds,) in self._by_app.items():
            yield Sample(m.APPLICATION_ACTIVE_SESSION_SECONDS, (db, app), seconds)
        # Every state of every database seen so far, so a gauge that empties reads 0 rather
        # than vanishing (the set is bounded by the datname cap).
        for db in self._datname.seen() | {db for db, _ in sessions}:
            for state in STATES:
                yield Sample(m.SESSIONS, (db, state), sessions.get((db, state), 0.0))
            yield Sample(m.BLOCKED_SESSIONS, (db,), blocked[db])
            yield Sample(m.OLDEST_TRANSACTION_SECONDS, (db,), oldest_xact[db])
            yield Sample(m.OLDEST_IDLE_IN_TRANSACTION_SECONDS, (db,), oldest_idle[db])
            yield Sample(m.OLDEST_QUERY_SECONDS, (db,), oldest_query[db])
        yield Sample(m.ACTIVITY_SAMPLES, (), float(self._samples))
        yield Sample(m.MAX_CONNECTIONS, (), max_connections)
        if self.config.vcpus is not None:
            yield Sample(m.VCPUS, ("config",), float(self.config.vcpus))
        elif self._aws_vcpus is not None:
            yield Sample(m.VCPUS, ("aws",), self._aws_vcpus)

    def vcpus(self) -> tuple[float | None, str]:
        """The vCPUs load is judged against, and where they come from ("config" or "aws"),
        as exported in pg_vcpus."""
        if self.config.vcpus is not None:
            return float(self.config.vcpus), "config"
        return self._aws_vcpus, "aws"

    def use_aws_vcpus(self, vcpus: float | None) -> None:
        """The vCPUs AWS gave for this target (None: unknown), exported as pg_vcpus with
        source="aws" beside the load it is compared with, unless `vcpus` is configured."""
        self._aws_vcpus = vcpus
