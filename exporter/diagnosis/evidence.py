"""Evidence records: what the rules know about one subject over one window, as plain numbers.

A record holds no clock, connection or query: the rules stay pure functions of it, and the
same record can be built from the daemon's history or from Prometheus (`collect`). Rates are
per second averaged over the window, gauges are averaged or their maximum taken over it, and a
value that could not be observed is None (or absent from a mapping), never a guess of 0.
`window` is the length in seconds every value in the record covers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: A value over the window at even steps, oldest first, for a finding's chart (NaN = no data).
Trend = tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Statement:
    """One pg_stat_statements entry, by queryid (its text is never a label)."""

    datname: str
    queryid: str
    exec_seconds_per_s: float = 0.0  # execution time per second of wall time
    calls_per_s: float = 0.0
    temp_bytes_per_s: float = 0.0
    text: str = ""  # normalized text when the source knows it (live pinning report)

    @property
    def temp_bytes_per_call(self) -> float | None:
        return self.temp_bytes_per_s / self.calls_per_s if self.calls_per_s > 0 else None


@dataclass(frozen=True, slots=True)
class Holder:
    """A session state attributed to an application: a lock blocker or an idle transaction."""

    datname: str
    application_name: str
    seconds: float  # the longest seen over the window (lock held / idle in transaction)


@dataclass(frozen=True, slots=True)
class PoolLink:
    """A pool that uses a target, with the capacity it can open against it."""

    app: str
    pool: str
    max_connections: float  # pool_size + max_overflow summed over processes (inf: unbounded)
    processes: float


@dataclass(frozen=True, slots=True)
class TargetEvidence:
    """One PostgreSQL server (a `target`)."""

    target: str
    window: float
    aas: float = 0.0  # average active sessions
    aas_by_wait: dict[str, float] = field(default_factory=dict)  # wait_event_type -> AAS
    vcpus: float | None = None
    sessions: float = 0.0  # client backends, mean
    max_connections: float | None = None
    reserved_connections: float | None = None  # superuser_reserved (+ reserved, PG 16)
    blocked_sessions: float = 0.0  # most sessions blocked on a lock at once
    blockers: tuple[Holder, ...] = ()  # longest holders first
    idle_in_transaction: tuple[Holder, ...] = ()  # longest first
    temp_bytes_per_s: dict[str, float] = field(default_factory=dict)  # datname -> rate
    statements: tuple[Statement, ...] = ()  # the top statements the source keeps
    work_mem_bytes: float | None = None
    sessions_per_s: float | None = None  # sessions established (pg_stat_database, PG 14+)
    sessions_ended_per_s: dict[str, float] = field(default_factory=dict)  # abandoned/fatal/killed
    applications: frozenset[str] = frozenset()  # application_name values seen in sessions
    pools: tuple[PoolLink, ...] = ()
    pools_capacity_sum: float | None = None  # sum of the pools' maxima, if precomputed
    aas_trend: Trend = ()
    cpu_trend: Trend = ()
    lock_trend: Trend = ()
    temp_trend: Trend = ()
    sessions_trend: Trend = ()

    @property
    def aas_cpu(self) -> float:
        return self.aas_by_wait.get("CPU", 0.0)

    @property
    def aas_lock(self) -> float:
        return self.aas_by_wait.get("Lock", 0.0)

    @property
    def usable_connections(self) -> float | None:
        """max_connections minus the slots ordinary roles cannot use (3 if not read)."""
        if self.max_connections is None:
            return None
        reserved = 3.0 if self.reserved_connections is None else self.reserved_connections
        return self.max_connections - reserved

    @property
    def pools_capacity(self) -> float:
        """Connections the linked pools can open together, over all their processes."""
        if self.pools_capacity_sum is not None:
            return self.pools_capacity_sum
        return sum(p.max_connections for p in self.pools)

    def top_by_exec(self, n: int = 3) -> list[Statement]:
        ranked = sorted(self.statements, key=lambda s: -s.exec_seconds_per_s)
        return [s for s in ranked[:n] if s.exec_seconds_per_s > 0]


@dataclass(frozen=True, slots=True)
class PoolEvidence:
    """One app's pool, summed over its processes."""

    app: str
    pool: str
    window: float
    processes: float = 1.0
    max_connections: float | None = None  # summed over processes; inf when unbounded
    used: float = 0.0  # checked out, mean
    pending: float = 0.0  # callers waiting, mean
    at_max_share: float = 0.0  # share of the window with every connection checked out
    pending_share: float = 0.0  # share of the window with callers waiting
    wait_p95: float | None = None
    wait_mean: float | None = None  # time to obtain a connection
    statement_p95: float | None = None
    hold_mean: float | None = None  # checkout to checkin
    statement_mean: float | None = None
    statements_per_s: float = 0.0
    statement_seconds_per_s: float = 0.0  # time in statements per second (over all processes)
    hold_seconds_per_s: float = 0.0  # time connections are held per second
    checkouts_per_s: float = 0.0
    timeouts_per_s: float = 0.0
    connects_per_s: float = 0.0
    create_mean: float | None = None
    closes_per_s: dict[str, float] = field(default_factory=dict)  # reason -> rate
    targets: tuple[TargetEvidence, ...] = ()  # the targets this pool's app is seen on
    used_trend: Trend = ()
    pending_trend: Trend = ()

    @property
    def busy_share(self) -> float | None:
        """Share of held time spent executing statements (None without statement timing)."""
        if self.hold_seconds_per_s <= 0 or self.statements_per_s <= 0:
            return None
        return min(1.0, self.statement_seconds_per_s / self.hold_seconds_per_s)

    @property
    def churn_per_s(self) -> float:
        """Connections replaced per second: opened while others are closed."""
        return min(self.connects_per_s, sum(self.closes_per_s.values()))

    @property
    def bounded(self) -> bool:
        return self.max_connections is not None and math.isfinite(self.max_connections)


@dataclass(frozen=True, slots=True)
class RiskyStatement:
    """A statement of the pinning-risk report: would pin an RDS Proxy session."""

    target: str
    datname: str
    reasons: tuple[str, ...]
    calls_per_s: float
    text: str = ""  # known live; Prometheus holds only the reason


@dataclass(frozen=True, slots=True)
class ProxyEvidence:
    """One RDS Proxy."""

    proxy: str
    window: float
    pinned: float | None = None  # pinned database connections, mean
    database_connections: float | None = None  # mean
    max_allowed: float | None = None
    pin_reasons: dict[str, float] = field(default_factory=dict)  # reason -> pins in window
    risky_statements: tuple[RiskyStatement, ...] = ()
    pinned_trend: Trend = ()

    @property
    def pinned_share(self) -> float | None:
        if self.pinned is None or not self.database_connections:
            return None
        return min(1.0, self.pinned / self.database_connections)


@dataclass(frozen=True, slots=True)
class Evidence:
    """Every record of one evaluation, all over the same window ending at `at` (unix time)."""

    window: float
    at: float
    targets: tuple[TargetEvidence, ...] = ()
    pools: tuple[PoolEvidence, ...] = ()
    proxies: tuple[ProxyEvidence, ...] = ()

    def of(self, subject: str) -> tuple[TargetEvidence, ...] | tuple[PoolEvidence, ...] | tuple:
        return {"target": self.targets, "pool": self.pools, "proxy": self.proxies}[subject]

    @property
    def empty(self) -> bool:
        return not (self.targets or self.pools or self.proxies)
