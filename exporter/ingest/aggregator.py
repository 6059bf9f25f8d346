"""Aggregation of the pool reports that instrumented processes push (`POST /api/v1/reports`).

Each process pushes cumulative numbers per (app, pool). The aggregate of a counter is the sum
over live processes plus everything departed processes had counted, so it never goes
backwards when a gunicorn worker restarts, a pid is reused (the process id includes its start
time) or a process starts over from zero (its old totals are folded in first; a restart is
seen in the integer counts only, as the float sums of a process may wobble by an ulp). A
process silent for `stale_after` (or three of its push intervals, if longer) leaves the gauges
and its totals are folded in; it is remembered for ten times that long, so if it reports again
(a paused pod, a network partition) its folded totals are taken back out instead of being
counted twice. Exported histogram sums never go below what was exported before. Apps, pools
per app and live processes are capped; every refusal, including those of the HTTP route, is
counted in `pgpressure_reports_total{result}`.

Everything runs on the daemon's event loop without awaiting, so no locks are needed.
"""

from __future__ import annotations

import hmac
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from exporter import metrics as m
from exporter.config import IngestConfig
from exporter.core.source import Source
from exporter.ingest.wire import (
    BOUNDS,
    CLOSE_REASONS,
    HISTOGRAMS,
    MAX_NAME_LENGTH,
    MAX_POOLS_PER_REPORT,
    NBUCKETS,
    SCHEMA_VERSION,
)
from exporter.metrics import HistogramValue, Sample

RESULTS = (
    "accepted",
    "too_large",
    "unauthorized",
    "malformed",
    "invalid",
    "unsupported_version",
    "app_limit",
    "process_limit",
    "pool_limit",
    "out_of_order",
    "unsupported_encoding",  # 415, refused by the HTTP route
    "busy",  # 503: no free ingest slot
    "timeout",  # 408: the body did not arrive in time
)
TOKEN_TTL = 5.0  # seconds a token read from token_file is trusted before re-reading
INTERVALS_STALE = 3  # a process is stale after this many of its push intervals (or stale_after)
MAX_INTERVAL = 3600.0  # the longest push interval the instrumentation uses
GONE_KEEP = 10  # a departed process is remembered for this many times its staleness

# --- the report schema -------------------------------------------------------------------------
Name = Annotated[
    str, Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=r"^[^\x00-\x1f\x7f]+$")
]
Count = Annotated[int, Field(ge=0, le=2**53)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Model(BaseModel):
    # strict: "5" is not a number; extra keys are ignored so newer clients can add fields.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class HistogramReport(_Model):
    counts: list[Count] = Field(min_length=NBUCKETS, max_length=NBUCKETS)
    sum: Annotated[float, Field(ge=0, allow_inf_nan=False)]

    @field_validator("sum", mode="before")
    @classmethod
    def _int_sum(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


class PoolReport(_Model):
    pool: Name
    kind: str = Field("", max_length=64)
    used: Count
    idle: Count
    pending: Count
    size: Count | None = None
    max: Count | None = None  # None: unbounded
    checkouts: Count
    timeouts: Count
    closed: dict[Literal["recycle", "invalidated", "overflow", "other"], Count]
    wait: HistogramReport
    use: HistogramReport
    create: HistogramReport
    query: HistogramReport


class ProcessInfo(_Model):
    id: Name
    host: str = Field("", max_length=255)
    pid: Count = 0
    started: Seconds = 0.0


class Report(_Model):
    version: int
    app: Name
    process: ProcessInfo
    seq: Count
    interval: Seconds | None = None  # the process's push interval; older clients omit it
    pools: list[PoolReport] = Field(max_length=MAX_POOLS_PER_REPORT)

    @field_validator("pools")
    @classmethod
    def _unique_pools(cls, pools: list[PoolReport]) -> list[PoolReport]:
        names = [p.pool for p in pools]
        if len(set(names)) != len(names):
            raise ValueError("pool names must be unique within a report")
        return pools


# --- aggregation state ---------------------------------------------------------------------
@dataclass
class Totals:
    """Cumulative counters and histogram buckets of one (app, pool)."""

    checkouts: float = 0.0
    timeouts: float = 0.0
    closed: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CLOSE_REASONS, 0.0))
    counts: dict[str, list[float]] = field(
        default_factory=lambda: {h: [0.0] * NBUCKETS for h in HISTOGRAMS}
    )
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(HISTOGRAMS, 0.0))

    def add(self, p: PoolReport) -> None:
        self.checkouts += p.checkouts
        self.timeouts += p.timeouts
        for reason, n in p.closed.items():
            self.closed[reason] += n
        for h in HISTOGRAMS:
            hist: HistogramReport = getattr(p, h)
            counts = self.counts[h]
            for i, c in enumerate(hist.counts):
                counts[i] += c
            self.sums[h] += hist.sum

    def subtract(self, p: PoolReport) -> None:
        """Take back what `add(p)` put in (a departed process that reports again)."""
        self.checkouts -= p.checkouts
        self.timeouts -= p.timeouts
        for reason, n in p.closed.items():
            self.closed[reason] -= n
        for h in HISTOGRAMS:
            hist: HistogramReport = getattr(p, h)
            counts = self.counts[h]
            for i, c in enumerate(hist.counts):
                counts[i] -= c
            # (x + s) - s may differ from x by an ulp: the exported sums have a floor
            # (AppState.sum_floor), so that never shows as a decrease.
            self.sums[h] = max(self.sums[h] - hist.sum, 0.0)

    def copy(self) -> Totals:
        return Totals(
            self.checkouts,
            self.timeouts,
            dict(self.closed),
            {h: list(c) for h, c in self.counts.items()},
            dict(self.sums),
        )


def _went_backwards(old: PoolReport, new: PoolReport) -> bool:
    """Whether the process started over, judged by integer counts only: a float sum built
    from the same observations in another order can come out an ulp smaller."""
    if new.checkouts < old.checkouts or new.timeouts < old.timeouts:
        return True
    if any(new.closed.get(r, 0) < n for r, n in old.closed.items()):
        return True
    for h in HISTOGRAMS:
        a, b = getattr(old, h), getattr(new, h)
        if any(y < x for x, y in zip(a.counts, b.counts, strict=True)):
            return True
    return False


def _keep_sums(old: PoolReport, new: PoolReport) -> PoolReport:
    """`new` with each histogram sum at least the old one (a continuing process)."""
    update = {
        h: getattr(new, h).model_copy(update={"sum": getattr(old, h).sum})
        for h in HISTOGRAMS
        if getattr(new, h).sum < getattr(old, h).sum
    }
    return new.model_copy(update=update) if update else new


@dataclass
class Process:
    app: str
    id: str
    seq: int
    last_seen: float  # monotonic
    pools: dict[str, PoolReport]
    stale_after: float = 0.0  # seconds of silence after which it departs


@dataclass
class AppState:
    departed: dict[str, Totals] = field(default_factory=dict)  # pool -> folded-in totals
    pools: set[str] = field(default_factory=set)  # every pool ever accepted (the cap)
    live: int = 0
    idle_since: float = 0.0  # monotonic time the last live process left
    # (pool, histogram) -> the highest sum exported: float sums regrouped when a process
    # departs or comes back can come out an ulp lower, and a counter must not go backwards.
    sum_floor: dict[tuple[str, str], float] = field(default_factory=dict)


@dataclass
class Gone:
    """A departed process: what was folded into `app.departed` for it, until `until`."""

    app: AppState
    seq: int
    pools: dict[str, PoolReport]
    until: float  # monotonic


class Refused(Exception):
    def __init__(self, status: int, result: str, message: str) -> None:
        super().__init__(message)
        self.status, self.result, self.message = status, result, message


class AppsAggregator(Source):
    name = "apps"
    target = ""
    interval = 1.0

    def __init__(self, config: IngestConfig, clock: Any = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.processes: dict[tuple[str, str], Process] = {}
        self.apps: dict[str, AppState] = {}
        # recently departed processes, oldest first; at most max_processes of them
        self.gone: dict[tuple[str, str], Gone] = {}
        self.results: dict[str, float] = dict.fromkeys(("accepted",), 0.0)
        self._token: str | None = None
        self._token_read = -math.inf

    # -- ingest -------------------------------------------------------------------------------
    async def handle_report(self, body: bytes, authorization: str | None) -> tuple[int, dict]:
        try:
            doc = self._accept(body, authorization)
        except Refused as r:
            return self.refuse(r.status, r.result, r.message)
        return 200, doc

    def refuse(self, status: int, result: str, message: str) -> tuple[int, dict]:
        """Count a refusal (also those the HTTP route makes) and build its answer."""
        self._count(result)
        return status, {"status": "refused", "reason": result, "error": message}

    def authorize(self, authorization: str | None) -> tuple[int, dict] | None:
        """The 401 refusal (counted) for a push without a valid token, else None. The HTTP
        route asks this before it gives the push an ingest slot or reads its body."""
        try:
            self._check_token(authorization)
        except Refused as r:
            return self.refuse(r.status, r.result, r.message)
        return None

    def _count(self, result: str) -> None:
        self.results[result] = self.results.get(result, 0.0) + 1

    def _expected_token(self) -> str | None:
        if self.config.token_file is None:
            return self.config.token
        now = self.clock()
        if now - self._token_read > TOKEN_TTL:  # re-read now and then: rotation works
            try:
                self._token = self.config.bearer_token()
                self._token_read = now
            except (OSError, UnicodeDecodeError):
                pass  # keep the last token we could read
        return self._token

    def _check_token(self, authorization: str | None) -> None:
        expected = self._expected_token()
        if not expected:
            if self.config.token_file is None:
                return  # ingest configured open
            # Fail closed: an emptied or unreadable token file must not open the endpoint.
            raise Refused(401, "unauthorized", "the ingest token is not available")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), expected.encode()
        ):
            raise Refused(401, "unauthorized", "a valid bearer token is required")

    def _parse(self, body: bytes) -> Report:
        if len(body) > self.config.max_body_bytes:
            raise Refused(
                413,
                "too_large",
                f"report larger than ingest.max_body_bytes ({self.config.max_body_bytes})",
            )
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Refused(400, "malformed", f"not JSON: {exc}") from None
        except RecursionError:
            raise Refused(400, "malformed", "JSON nested too deeply") from None
        if not isinstance(data, dict):
            raise Refused(400, "malformed", "a report is a JSON object")
        version = data.get("version")
        if version != SCHEMA_VERSION or isinstance(version, bool):
            raise Refused(
                400,
                "unsupported_version",
                f"schema version {version!r} is not supported; this daemon "
                f"accepts version {SCHEMA_VERSION}",
            )
        try:
            return Report.model_validate(data)
        except (OverflowError, RecursionError):
            raise Refused(
                400, "invalid", "a number or nesting beyond what a report can hold"
            ) from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "report"
            raise Refused(
                400, "invalid", f"{where}: {first['msg']} ({exc.error_count()} problem(s))"
            ) from None

    def _accept(self, body: bytes, authorization: str | None) -> dict[str, Any]:
        self._check_token(authorization)
        report = self._parse(body)
        now = self.clock()
        key = (report.app, report.process.id)
        proc = self.processes.get(key)
        if proc is not None and report.seq <= proc.seq:
            # A late duplicate (a retry that overtook nothing): the newer totals are already in.
            proc.last_seen = now
            self._count("out_of_order")
            return {"status": "ignored", "reason": "out_of_order"}
        gone = self.gone.get(key) if proc is None else None
        if gone is not None and report.seq <= gone.seq:
            # Not newer than what was folded in when the process departed.
            self._count("out_of_order")
            return {"status": "ignored", "reason": "out_of_order"}
        app = self.apps.get(report.app)
        if app is None and len(self.apps) >= self.config.max_apps:
            self._expire(now)
            self._make_room_for_app()
            if len(self.apps) >= self.config.max_apps:
                raise Refused(
                    429,
                    "app_limit",
                    f"already aggregating ingest.max_apps ({self.config.max_apps}) apps",
                )
        if proc is None:
            if len(self.processes) >= self.config.max_processes:
                self._expire(now)
            if len(self.processes) >= self.config.max_processes:
                raise Refused(
                    429,
                    "process_limit",
                    "already tracking ingest.max_processes "
                    f"({self.config.max_processes}) live processes",
                )
        if app is None:
            app = self.apps[report.app] = AppState()
        refused: list[str] = []
        pools: dict[str, PoolReport] = {}
        for p in report.pools:
            if p.pool not in app.pools and len(app.pools) >= self.config.max_pools_per_app:
                refused.append(p.pool)
                continue
            app.pools.add(p.pool)
            pools[p.pool] = p
        if proc is None:
            proc = self.processes[key] = Process(report.app, report.process.id, 0, now, {})
            app.live += 1
            gone = self.gone.pop(key, None)
            if gone is not None and gone.app is app:
                # Back after a silence: take out what was folded in when it departed and
                # carry on from there, as if it had never left.
                for name, p in gone.pools.items():
                    app.departed[name].subtract(p)
                proc.pools, proc.seq = gone.pools, gone.seq
        for name, old in proc.pools.items():
            new = pools.get(name)
            if new is None or _went_backwards(old, new):
                # The process stopped reporting this pool or started over: keep what it had.
                app.departed.setdefault(name, Totals()).add(old)
            else:
                pools[name] = _keep_sums(old, new)
        proc.pools = pools
        proc.seq = report.seq
        proc.last_seen = now
        interval = min(report.interval or 0.0, MAX_INTERVAL)
        proc.stale_after = max(self.config.stale_after, INTERVALS_STALE * interval)
        result = "pool_limit" if refused else "accepted"
        self._count(result)
        doc: dict[str, Any] = {"status": "accepted", "pools": len(pools)}
        if refused:
            doc["refused_pools"] = refused
        return doc

    def _make_room_for_app(self) -> None:
        """At the app cap, forget the app whose processes all left longest ago (its series end;
        that is not a reset)."""
        if len(self.apps) < self.config.max_apps:
            return
        idle = [(a.idle_since, name) for name, a in self.apps.items() if a.live == 0]
        if idle:
            forgotten = self.apps.pop(min(idle)[1])
            for key in [k for k, g in self.gone.items() if g.app is forgotten]:
                del self.gone[key]

    # -- expiry and samples ---------------------------------------------------------------------
    def _expire(self, now: float) -> None:
        for key, proc in list(self.processes.items()):
            if proc.last_seen < now - max(proc.stale_after, self.config.stale_after):
                self._depart(key, proc, now)
        for key in [k for k, g in self.gone.items() if g.until < now]:
            del self.gone[key]

    def _depart(self, key: tuple[str, str], proc: Process, now: float) -> None:
        app = self.apps.get(proc.app)
        del self.processes[key]
        if app is None:
            return
        for name, p in proc.pools.items():
            app.departed.setdefault(name, Totals()).add(p)
        app.live -= 1
        if app.live == 0:
            app.idle_since = now
        # Remembered a while (bounded), so that a return is not counted twice.
        stale = max(proc.stale_after, self.config.stale_after)
        self.gone.pop(key, None)  # re-inserted last: the dict stays oldest first
        self.gone[key] = Gone(app, proc.seq, proc.pools, now + GONE_KEEP * stale)
        while len(self.gone) > self.config.max_processes:
            del self.gone[next(iter(self.gone))]

    async def sample(self) -> Iterable[Sample]:
        self._expire(self.clock())
        return self.samples()

    def samples(self) -> list[Sample]:
        out: list[Sample] = []
        live: dict[tuple[str, str], list[PoolReport]] = {}
        for proc in self.processes.values():
            for name, p in proc.pools.items():
                live.setdefault((proc.app, name), []).append(p)
        for app_name, app in self.apps.items():
            out.append(Sample(m.APP_PROCESSES, (app_name,), float(app.live)))
            for pool in sorted(set(app.departed) | {n for a, n in live if a == app_name}):
                reports = live.get((app_name, pool), [])
                totals = app.departed.get(pool, Totals()).copy()
                for p in reports:
                    totals.add(p)
                for h in HISTOGRAMS:
                    floor = max(totals.sums[h], app.sum_floor.get((pool, h), 0.0))
                    totals.sums[h] = app.sum_floor[(pool, h)] = floor
                out.extend(_pool_samples(app_name, pool, totals, reports))
        for result, n in self.results.items():
            out.append(Sample(m.REPORTS, (result,), n))
        return out

    def status(self) -> dict[str, object]:
        return {"processes": len(self.processes), "apps": len(self.apps)}


def _pool_samples(app: str, pool: str, totals: Totals, reports: list[PoolReport]) -> list[Sample]:
    labels = (app, pool)
    out = [
        Sample(m.POOL_CHECKOUTS, labels, totals.checkouts),
        Sample(m.POOL_TIMEOUTS, labels, totals.timeouts),
    ]
    for reason, n in totals.closed.items():
        out.append(Sample(m.POOL_CONNECTIONS_CLOSED, (*labels, reason), n))
    for h, spec in (
        ("wait", m.POOL_WAIT_SECONDS),
        ("use", m.POOL_USE_SECONDS),
        ("create", m.POOL_CREATE_SECONDS),
        ("query", m.QUERY_DURATION_SECONDS),
    ):
        out.append(Sample(spec, labels, _histogram(totals.counts[h], totals.sums[h])))
    if reports:  # gauges only while some process of this pool is alive
        out.append(
            Sample(m.POOL_CONNECTIONS, (*labels, "used"), float(sum(p.used for p in reports)))
        )
        out.append(
            Sample(m.POOL_CONNECTIONS, (*labels, "idle"), float(sum(p.idle for p in reports)))
        )
        out.append(Sample(m.POOL_PENDING_REQUESTS, labels, float(sum(p.pending for p in reports))))
        sizes = [p.size for p in reports if p.size is not None]
        if sizes:
            out.append(Sample(m.POOL_SIZE, labels, float(sum(sizes))))
        maxima = [math.inf if p.max is None else float(p.max) for p in reports]
        out.append(Sample(m.POOL_MAX_CONNECTIONS, labels, sum(maxima)))
    return out


def _histogram(counts: list[float], total: float) -> HistogramValue:
    cumulative = 0.0
    buckets = []
    for bound, c in zip((*BOUNDS, math.inf), counts, strict=True):
        cumulative += c
        buckets.append((bound, cumulative))
    return HistogramValue(tuple(buckets), total, cumulative)
