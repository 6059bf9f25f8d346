"""Aggregation of pushed pool reports per (app, pool), across processes and hosts.

Each process pushes cumulative numbers per (app, pool). The aggregate of a counter is the sum
over live processes plus everything departed processes had counted, so it never goes
backwards when a gunicorn worker restarts, a pid is reused (the process id includes its start
time) or a process starts over from zero (its old totals are folded in first; a restart is
seen in the integer counts only, as the float sums of a process may wobble by an ulp). A
process silent for `stale_after` (or three of its push intervals, if longer) leaves the gauges
and its totals are folded in; it is remembered for ten times that long, so if it reports again
(a paused pod, a network partition) its folded totals are taken back out instead of being
counted twice. Exported histogram sums never go below what was exported before, unless one
overflows: a sum that is no longer finite (sums of sums near the float maximum) restarts from
the live processes' sums, a reset of that series, counted in
`pgpressure_ingest_sum_resets_total`. Apps, pools per app and live processes are capped, and
what is kept is within the ingest memory budget (`exporter.ingest.budget`): a pool's report is
kept as a compact snapshot (`exporter.ingest.totals`), not as the validated model.

Everything runs on the daemon's event loop without awaiting, so no locks are needed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from exporter import metrics as m
from exporter.ingest.budget import MemoryBudget
from exporter.ingest.model import PoolReport, Report
from exporter.ingest.proxy_warnings import ProxyWarnings
from exporter.ingest.results import Refused
from exporter.ingest.totals import PoolSnapshot, Totals, keep_sums, went_backwards
from exporter.ingest.wire import BOUNDS, HISTOGRAMS
from exporter.metrics import HistogramValue, Sample

if TYPE_CHECKING:
    from exporter.config import IngestConfig

INTERVALS_STALE = 3  # a process is stale after this many of its push intervals (or stale_after)
MAX_INTERVAL = 3600.0  # the longest push interval the instrumentation uses
GONE_KEEP = 10  # a departed process is remembered for this many times its staleness

Key = tuple[str, str]  # (app, process id)
HISTOGRAM_SPECS = (
    ("wait", m.POOL_WAIT_SECONDS),
    ("use", m.POOL_USE_SECONDS),
    ("create", m.POOL_CREATE_SECONDS),
    ("query", m.QUERY_DURATION_SECONDS),
)


@dataclass
class Process:
    app: str
    seq: int
    last_seen: float  # monotonic
    pools: dict[str, PoolSnapshot]
    stale_after: float = 0.0  # seconds of silence after which it departs


@dataclass
class AppState:
    departed: dict[str, Totals] = field(default_factory=dict)  # pool -> folded-in totals
    # every pool ever accepted (the cap), each name kept once for all the app's processes
    pools: dict[str, str] = field(default_factory=dict)
    live: int = 0
    idle_since: float = 0.0  # monotonic time the last live process left
    # (pool, histogram) -> the highest sum exported: float sums regrouped when a process
    # departs or comes back can come out an ulp lower, and a counter must not go backwards.
    sum_floor: dict[tuple[str, str], float] = field(default_factory=dict)
    overflowed: set[tuple[str, str]] = field(default_factory=set)  # (pool, histogram) at +Inf
    # pool -> statements over RDS Proxy's size limit and libpq options its processes named
    proxy: dict[str, ProxyWarnings] = field(default_factory=dict)


@dataclass
class Gone:
    """A departed process: what was folded into `app.departed` for it, until `until`."""

    app: AppState
    seq: int
    pools: dict[str, PoolSnapshot]
    until: float  # monotonic


class IngestAggregator:
    def __init__(self, config: IngestConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._processes: dict[Key, Process] = {}
        self._apps: dict[str, AppState] = {}
        # recently departed processes, oldest first; at most max_processes of them
        self._gone: dict[Key, Gone] = {}
        self._snapshots = 0  # pool snapshots held by live and departed processes
        self.budget = MemoryBudget(lambda: self.config.memory_budget_bytes, self.state_bytes)
        self.sum_resets = 0

    # -- a report arrives ---------------------------------------------------------------------
    def accept(self, report: Report) -> tuple[str, dict[str, Any]]:
        """Fold a validated report in. Returns its result (`accepted`, `pool_limit` when some
        pools were left out, `out_of_order` when ignored) and the answer for the client;
        raises `Refused` (429) at the app or process cap."""
        now = self.clock()
        key = (report.app, report.process.id)
        proc = self._processes.get(key)
        if proc is not None and report.seq <= proc.seq:
            proc.last_seen = now  # a late duplicate: the newer totals are already in
            return _ignored()
        if proc is None and self._folded_already(key, report.seq):
            return _ignored()
        app = self._admit_app(report.app, now)
        if proc is None:
            self._admit_process(now)
        self._within_budget(key, proc, len(report.pools))
        if app is None:
            app = self._apps[report.app] = AppState()
        pools, refused = self._within_pool_cap(app, report.pools)
        if proc is None:
            proc = self._arrive(key, app, now)
        self._update(proc, app, pools, now)
        proc.seq = report.seq
        proc.stale_after = self._staleness(report.interval)
        if report.leaving:
            # An exiting process (a recycled worker) stops counting now, not after
            # stale_after: its counters are folded in and its gauges leave the sums.
            self._depart(key, proc, now)
        doc: dict[str, Any] = {"status": "accepted", "pools": len(pools)}
        if refused:
            doc["refused_pools"] = refused
        return ("pool_limit" if refused else "accepted"), doc

    def _folded_already(self, key: Key, seq: int) -> bool:
        """Whether a departed process's report is not newer than what was folded in for it."""
        gone = self._gone.get(key)
        return gone is not None and seq <= gone.seq

    def _admit_app(self, name: str, now: float) -> AppState | None:
        """The app's state (None for a new app there is room for); `Refused` at the cap."""
        app = self._apps.get(name)
        if app is None and len(self._apps) >= self.config.max_apps:
            self._expire(now)
            self._forget_an_idle_app()
            if len(self._apps) >= self.config.max_apps:
                raise Refused(
                    429,
                    "app_limit",
                    f"already aggregating ingest.max_apps ({self.config.max_apps}) apps",
                )
        return app

    def _admit_process(self, now: float) -> None:
        """Room for one more live process, or `Refused` at the cap."""
        if len(self._processes) >= self.config.max_processes:
            self._expire(now)
        if len(self._processes) >= self.config.max_processes:
            raise Refused(
                429,
                "process_limit",
                f"already tracking ingest.max_processes ({self.config.max_processes}) "
                "live processes",
            )

    def _within_budget(self, key: Key, proc: Process | None, pools: int) -> None:
        """Room in the memory budget for what this report may add (a new process, more pools
        than it had), the oldest departed processes forgotten first; else `Refused`."""
        gone = self._gone.get(key) if proc is None else None
        held = proc.pools if proc is not None else gone.pools if gone is not None else {}
        more = self.budget.cost(int(proc is None and gone is None), max(pools - len(held), 0))
        while not self.budget.state_fits(more) and self._forget_oldest_gone(key):
            pass
        if not self.budget.state_fits(more):
            raise self.budget.over_budget("this report's process and pools")

    def state_bytes(self) -> int:
        """The estimated bytes of what is kept: live and departed processes, their pools."""
        return self.budget.cost(len(self._processes) + len(self._gone), self._snapshots)

    def _within_pool_cap(
        self, app: AppState, reports: list[PoolReport]
    ) -> tuple[dict[str, PoolSnapshot], list[str]]:
        """The pools the app may have (it keeps every pool it was ever accepted) and the
        names of those left out at `max_pools_per_app`."""
        pools: dict[str, PoolSnapshot] = {}
        refused: list[str] = []
        for p in reports:
            if p.pool not in app.pools and len(app.pools) >= self.config.max_pools_per_app:
                refused.append(p.pool)
                continue
            name = app.pools.setdefault(p.pool, p.pool)
            pools[name] = PoolSnapshot.of(p)
            if p.oversized_examples or p.connect_options:
                app.proxy.setdefault(name, ProxyWarnings()).add(p)
        return pools, refused

    def _arrive(self, key: Key, app: AppState, now: float) -> Process:
        """A live process for `key`. One back after a silence takes out what was folded in
        when it departed and carries on from there, as if it had never left."""
        proc = self._processes[key] = Process(key[0], 0, now, {})
        app.live += 1
        gone = self._gone.pop(key, None)
        if gone is None:
            return proc
        if gone.app is app:
            for name, p in gone.pools.items():
                app.departed[name].subtract(p)
            proc.pools, proc.seq = gone.pools, gone.seq
        else:
            self._snapshots -= len(gone.pools)
        return proc

    def _update(
        self, proc: Process, app: AppState, pools: dict[str, PoolSnapshot], now: float
    ) -> None:
        """Make `pools` the process's latest. A pool it stopped reporting, or whose counts
        went backwards (the process started over), keeps what it had: folded in."""
        for name, old in proc.pools.items():
            new = pools.get(name)
            if new is None or went_backwards(old, new):
                app.departed.setdefault(name, Totals()).add(old)
            else:
                pools[name] = keep_sums(old, new)
        self._snapshots += len(pools) - len(proc.pools)
        proc.pools = pools
        proc.last_seen = now

    def _staleness(self, interval: float | None) -> float:
        """Seconds of silence after which a process pushing every `interval` departs."""
        return max(self.config.stale_after, INTERVALS_STALE * min(interval or 0.0, MAX_INTERVAL))

    def _forget_an_idle_app(self) -> None:
        """At the app cap, forget the app whose processes all left longest ago (its series end;
        that is not a reset)."""
        idle = [(a.idle_since, name) for name, a in self._apps.items() if a.live == 0]
        if idle:
            forgotten = self._apps.pop(min(idle)[1])
            for key in [k for k, g in self._gone.items() if g.app is forgotten]:
                self._forget_gone(key)

    def _forget_gone(self, key: Key) -> None:
        """A departed process is no longer remembered: if it reports again, it is new."""
        self._snapshots -= len(self._gone.pop(key).pools)

    def _forget_oldest_gone(self, keep: Key) -> bool:
        """Forget the departed process that left first (not `keep`); False if none is left."""
        oldest = next((k for k in self._gone if k != keep), None)
        if oldest is None:
            return False
        self._forget_gone(oldest)
        return True

    # -- time passes ----------------------------------------------------------------------------
    def expire(self) -> None:
        """Fold in the processes that went silent; forget those departed long ago."""
        self._expire(self.clock())

    def _expire(self, now: float) -> None:
        for key, proc in list(self._processes.items()):
            if proc.last_seen < now - max(proc.stale_after, self.config.stale_after):
                self._depart(key, proc, now)
        for key in [k for k, g in self._gone.items() if g.until < now]:
            self._forget_gone(key)

    def _depart(self, key: Key, proc: Process, now: float) -> None:
        app = self._apps.get(proc.app)
        del self._processes[key]
        if app is None:
            self._snapshots -= len(proc.pools)
            return
        for name, p in proc.pools.items():
            app.departed.setdefault(name, Totals()).add(p)
        app.live -= 1
        if app.live == 0:
            app.idle_since = now
        # Remembered a while (bounded), so that a return is not counted twice.
        stale = max(proc.stale_after, self.config.stale_after)
        if key in self._gone:  # re-inserted last: the dict stays oldest first
            self._forget_gone(key)
        self._gone[key] = Gone(app, proc.seq, proc.pools, now + GONE_KEEP * stale)
        while len(self._gone) > self.config.max_processes:
            self._forget_gone(next(iter(self._gone)))

    # -- what is exported -----------------------------------------------------------------------
    def samples(self) -> list[Sample]:
        live = self._live_snapshots()
        out: list[Sample] = []
        for app_name, app in self._apps.items():
            out.append(Sample(m.APP_PROCESSES, (app_name,), float(app.live)))
            reports = live.get(app_name, {})
            for pool in sorted(set(app.departed) | set(reports)):
                totals, resets = _totals(app, pool, reports.get(pool, []))
                self.sum_resets += resets
                out.extend(_pool_samples(app_name, pool, totals, reports.get(pool, [])))
        out.append(Sample(m.INGEST_SUM_RESETS, (), float(self.sum_resets)))
        return [*out, *self.budget.samples()]

    def live_processes(self) -> int:
        return len(self._processes)

    def status(self) -> dict[str, object]:
        """Live processes and apps, for the landing page."""
        return {"processes": len(self._processes), "apps": len(self._apps)}

    def proxy_warnings(self) -> list[dict[str, object]]:
        """Per (app, pool) with something to say: its statements over RDS Proxy's size limit
        (the count since the daemon started, summed over processes, and a few examples) and
        the libpq options its connections are opened with."""
        out: list[dict[str, object]] = []
        live = self._live_snapshots()
        for app_name, app in self._apps.items():
            for pool, warnings in app.proxy.items():
                counted = _summed(app, pool, live.get(app_name, {}).get(pool, []))
                out.append(
                    {
                        "app": app_name,
                        "pool": pool,
                        "oversized": counted.oversized,
                        **warnings.as_json(),
                    }
                )
        return out

    def _live_snapshots(self) -> dict[str, dict[str, list[PoolSnapshot]]]:
        """app -> pool -> the last report of that pool from each live process."""
        live: dict[str, dict[str, list[PoolSnapshot]]] = {}
        for proc in self._processes.values():
            by_pool = live.setdefault(proc.app, {})
            for name, p in proc.pools.items():
                by_pool.setdefault(name, []).append(p)
        return live


def _totals(app: AppState, pool: str, reports: list[PoolSnapshot]) -> tuple[Totals, int]:
    """What departed processes counted plus the live processes' last reports, each histogram
    sum at least what was exported before; and how many sums overflowed just now."""
    departed = app.departed.get(pool)
    totals = _summed(app, pool, reports)
    resets = 0
    for h in HISTOGRAMS:
        key = (pool, h)
        if not math.isfinite(totals.sum(h)):
            resets += key not in app.overflowed
            app.overflowed.add(key)
            totals.restart_sum(h, _restart(app, key, departed, reports))
            continue
        app.overflowed.discard(key)
        floor = max(totals.sum(h), app.sum_floor.get(key, 0.0))
        totals.restart_sum(h, floor)
        app.sum_floor[key] = floor
    return totals, resets


def _summed(app: AppState, pool: str, reports: list[PoolSnapshot]) -> Totals:
    """What departed processes counted plus the live processes' last reports, as they are."""
    departed = app.departed.get(pool)
    totals = departed.copy() if departed is not None else Totals()
    for p in reports:
        totals.add(p)
    return totals


def _restart(
    app: AppState, key: tuple[str, str], departed: Totals | None, reports: list[PoolSnapshot]
) -> float:
    """A sum that is no longer finite starts over: what departed processes added and the
    floor are dropped, leaving the live processes' own sums (+Inf while they alone overflow,
    finite again once they restart or leave). A counter that drops is a reset to Prometheus,
    which `rate()` and `increase()` handle; a sum stuck at +Inf would never be useful again."""
    if departed is not None:
        departed.restart_sum(key[1])
    app.sum_floor[key] = 0.0
    return sum(p.sum(key[1]) for p in reports)


def _ignored() -> tuple[str, dict[str, Any]]:
    return "out_of_order", {"status": "ignored", "reason": "out_of_order"}


def _pool_samples(app: str, pool: str, totals: Totals, reports: list[PoolSnapshot]) -> list[Sample]:
    """Counters and histograms from the totals; gauges from the live processes' last reports,
    only while one is alive."""
    labels = (app, pool)
    out = [
        Sample(m.POOL_CHECKOUTS, labels, totals.checkouts),
        Sample(m.POOL_TIMEOUTS, labels, totals.timeouts),
        Sample(m.STATEMENTS_OVERSIZED, labels, totals.oversized),
    ]
    for reason, n in totals.closed().items():
        out.append(Sample(m.POOL_CONNECTIONS_CLOSED, (*labels, reason), n))
    for h, spec in HISTOGRAM_SPECS:
        out.append(Sample(spec, labels, _histogram(totals.counts(h), totals.sum(h))))
    if reports:
        out.extend(_gauges(labels, reports))
    return out


def _gauges(labels: tuple[str, str], reports: list[PoolSnapshot]) -> list[Sample]:
    """Summed over the live processes; an unbounded pool makes the maximum infinite. A sum
    hides one exhausted process among idle ones (one uvicorn worker with every connection in
    use and callers waiting, the other idle: 5 of 10 used), so the processes that are
    exhausted and the busiest one's utilisation are exported too, without a per-process
    label."""
    out = [
        Sample(m.POOL_CONNECTIONS, (*labels, "used"), float(sum(p.used for p in reports))),
        Sample(m.POOL_CONNECTIONS, (*labels, "idle"), float(sum(p.idle for p in reports))),
        Sample(m.POOL_PENDING_REQUESTS, labels, float(sum(p.pending for p in reports))),
    ]
    sizes = [p.size for p in reports if p.size is not None]
    if sizes:
        out.append(Sample(m.POOL_SIZE, labels, float(sum(sizes))))
    maxima = [math.inf if p.max is None else float(p.max) for p in reports]
    out.append(Sample(m.POOL_MAX_CONNECTIONS, labels, sum(maxima)))
    exhausted = sum(1 for p in reports if _exhausted(p))
    out.append(Sample(m.POOL_EXHAUSTED_PROCESSES, labels, float(exhausted)))
    out.append(Sample(m.POOL_BUSIEST_UTILISATION, labels, max(map(_utilisation, reports))))
    return out


def _exhausted(p: PoolSnapshot) -> bool:
    """Every connection the pool may open is checked out and callers wait for one."""
    return p.max is not None and p.max > 0 and p.used >= p.max and p.pending > 0


def _utilisation(p: PoolSnapshot) -> float:
    """Checked out / the pool's maximum; 0 for an unbounded or not yet used pool."""
    return p.used / p.max if p.max else 0.0


def _histogram(counts: list[float], total: float) -> HistogramValue:
    cumulative = 0.0
    buckets = []
    for bound, c in zip((*BOUNDS, math.inf), counts, strict=True):
        cumulative += c
        buckets.append((bound, cumulative))
    return HistogramValue(tuple(buckets), total, cumulative)
