"""Evidence records from a window reader: the same questions, live or post mortem.

`collect(reader)` asks the reader (the daemon's history, or Prometheus) for the handful of
aggregates each record needs and assembles the records. Pools are linked to the targets
their app is seen on: the application_name of sessions, active sessions, lock holders and
idle transactions sampled on each target (the in-app client sets application_name to the
app's name), so `pool_undersized` can ask whether the database behind a pool is saturated and
`pools_exceed_server` can add up every pool a server serves.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

from exporter import metrics as m
from exporter.core.cardinality import OTHER
from exporter.diagnosis.evidence import (
    Evidence,
    Holder,
    PoolEvidence,
    PoolLink,
    ProxyEvidence,
    RiskyStatement,
    Statement,
    TargetEvidence,
)
from exporter.diagnosis.window import Key, WindowReader

POOL = ("app", "pool")
TARGET = ("target",)
APP = ("target", "datname", "application_name")
STATEMENT = ("target", "datname", "queryid")
PROXY = ("proxy",)
PROXY_WIDE = (("target_group", ""), ("target", ""))  # the whole proxy, not one of its targets
USED = (("state", "used"),)


def collect(reader: WindowReader, risky: tuple[RiskyStatement, ...] | None = None) -> Evidence:
    """Every record the reader has data for. `risky` is the live pinning-risk report (with
    statement texts); without it the risk counters give the reasons alone."""
    pools = _pools(reader)
    targets = _targets(reader, pools)
    linked = tuple(
        replace(pool, targets=tuple(t for t in targets if pool.app in t.applications))
        for pool in pools.values()
    )
    proxies = _proxies(reader, risky if risky is not None else _risk_counters(reader))
    return Evidence(reader.window, reader.at, targets, linked, proxies)


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _pools(r: WindowReader) -> dict[Key, PoolEvidence]:
    def histogram(spec: m.MetricSpec) -> tuple[dict[Key, float], dict[Key, float]]:
        return r.rate(f"{spec.name}_sum", POOL), r.rate(f"{spec.name}_count", POOL)

    maxima = r.max(m.POOL_MAX_CONNECTIONS.name, POOL)
    used = r.avg(m.POOL_CONNECTIONS.name, POOL, USED)
    pending = r.avg(m.POOL_PENDING_REQUESTS.name, POOL)
    at_max = r.share_at_least(
        (m.POOL_CONNECTIONS.name, USED), (m.POOL_MAX_CONNECTIONS.name, ()), POOL
    )
    pending_share = r.share_positive(m.POOL_PENDING_REQUESTS.name, POOL)
    wait95 = r.quantile(0.95, m.POOL_WAIT_SECONDS.name, POOL)
    statement95 = r.quantile(0.95, m.QUERY_DURATION_SECONDS.name, POOL)
    use_sum, use_count = histogram(m.POOL_USE_SECONDS)
    query_sum, query_count = histogram(m.QUERY_DURATION_SECONDS)
    create_sum, create_count = histogram(m.POOL_CREATE_SECONDS)
    wait_sum, wait_count = histogram(m.POOL_WAIT_SECONDS)
    checkouts = r.rate(m.POOL_CHECKOUTS.name, POOL)
    timeouts = r.rate(m.POOL_TIMEOUTS.name, POOL)
    closes: dict[Key, dict[str, float]] = defaultdict(dict)
    for (app, pool, reason), v in r.rate(m.POOL_CONNECTIONS_CLOSED.name, (*POOL, "reason")).items():
        closes[(app, pool)][reason] = v
    processes = r.max(m.APP_PROCESSES.name, ("app",))
    used_trend = r.trend(m.POOL_CONNECTIONS.name, POOL, USED)
    pending_trend = r.trend(m.POOL_PENDING_REQUESTS.name, POOL)
    out: dict[Key, PoolEvidence] = {}
    for key in sorted(set(maxima) | set(used) | set(checkouts)):
        app, pool = key
        out[key] = PoolEvidence(
            app=app,
            pool=pool,
            window=r.window,
            processes=processes.get((app,), 1.0) or 1.0,
            max_connections=maxima.get(key),
            used=used.get(key, 0.0),
            pending=pending.get(key, 0.0),
            at_max_share=at_max.get(key, 0.0),
            pending_share=pending_share.get(key, 0.0),
            wait_p95=wait95.get(key),
            wait_mean=_ratio(wait_sum.get(key), wait_count.get(key)),
            statement_p95=statement95.get(key),
            hold_mean=_ratio(use_sum.get(key), use_count.get(key)),
            statement_mean=_ratio(query_sum.get(key), query_count.get(key)),
            statements_per_s=query_count.get(key, 0.0),
            statement_seconds_per_s=query_sum.get(key, 0.0),
            hold_seconds_per_s=use_sum.get(key, 0.0),
            checkouts_per_s=checkouts.get(key, 0.0),
            timeouts_per_s=timeouts.get(key, 0.0),
            connects_per_s=create_count.get(key, 0.0),
            create_mean=_ratio(create_sum.get(key), create_count.get(key)),
            closes_per_s=closes.get(key, {}),
            used_trend=used_trend.get(key, ()),
            pending_trend=pending_trend.get(key, ()),
        )
    return out


def _by_target(values: dict[Key, float]) -> dict[str, dict[Key, float]]:
    """Split a grouping whose first label is `target` into one mapping per target."""
    out: dict[str, dict[Key, float]] = defaultdict(dict)
    for key, v in values.items():
        out[key[0]][key[1:]] = v
    return out


def _holders(values: dict[Key, float]) -> dict[str, tuple[Holder, ...]]:
    out: dict[str, list[Holder]] = defaultdict(list)
    for (target, datname, app), seconds in values.items():
        out[target].append(Holder(datname, app, seconds))
    return {t: tuple(sorted(hs, key=lambda h: -h.seconds)) for t, hs in out.items()}


def _statements(r: WindowReader) -> dict[str, tuple[Statement, ...]]:
    temp = r.rate(m.STATEMENT_TEMP_BYTES.name, STATEMENT)
    calls = r.rate(m.STATEMENT_CALLS.name, STATEMENT)
    seconds = r.rate(m.STATEMENT_EXEC_SECONDS.name, STATEMENT)
    out: dict[str, list[Statement]] = defaultdict(list)
    for key in sorted(set(temp) | set(calls) | set(seconds)):
        target, datname, queryid = key
        if queryid == OTHER:
            continue
        out[target].append(
            Statement(
                datname, queryid, seconds.get(key, 0.0), calls.get(key, 0.0), temp.get(key, 0.0)
            )
        )
    return {t: tuple(s) for t, s in out.items()}


def _target_inputs(r: WindowReader) -> dict[str, dict]:
    """Every aggregate the target records need, by name, each split per target."""
    apps = ("target", "application_name")
    blockers = r.max(m.LOCK_BLOCKER_SECONDS.name, APP)
    idle = r.max(m.APPLICATION_IDLE_IN_TRANSACTION_SECONDS.name, APP)
    waits = {"cpu": (("wait_event_type", "CPU"),), "lock": (("wait_event_type", "Lock"),)}
    inputs = {
        "aas": r.rate(m.ACTIVE_SESSION_SECONDS.name, ("target", "wait_event_type")),
        "vcpus": r.max(m.VCPUS.name, TARGET),
        "max_connections": r.max(m.MAX_CONNECTIONS.name, TARGET),
        "reserved": r.max(m.RESERVED_CONNECTIONS.name, TARGET),
        "sessions": r.avg(m.SESSIONS.name, TARGET),
        "blocked": r.max(m.BLOCKED_SESSIONS.name, ("target", "datname")),
        "temp": r.rate(m.TEMP_BYTES.name, ("target", "datname")),
        "ended": r.rate(m.SESSIONS_ENDED.name, ("target", "reason")),
        "work_mem": r.max(m.WORK_MEM_BYTES.name, TARGET),
        "active_apps": r.rate(m.APPLICATION_ACTIVE_SESSION_SECONDS.name, apps),
        "session_apps": r.max(m.APPLICATION_SESSIONS.name, apps),
        "aas_trend": r.trend(m.ACTIVE_SESSION_SECONDS.name, TARGET, counter=True),
        "temp_trend": r.trend(m.TEMP_BYTES.name, TARGET, counter=True),
        "sessions_trend": r.trend(m.SESSIONS.name, TARGET),
    }
    for name, where in waits.items():
        inputs[f"{name}_trend"] = r.trend(
            m.ACTIVE_SESSION_SECONDS.name, TARGET, where, counter=True
        )
    out: dict[str, dict] = {name: _by_target(values) for name, values in inputs.items()}
    out["blockers"] = _holders(blockers)
    out["idle"] = _holders(idle)
    out["statements"] = _statements(r)
    return out


def _applications(d: dict[str, dict], target: str) -> frozenset[str]:
    """application_name values seen on the target over the window (not `other` or empty)."""
    seen = {
        k[0] for part in ("active_apps", "session_apps") for k, v in _of(d, part, target) if v > 0
    }
    seen |= {
        h.application_name for h in (*d["blockers"].get(target, ()), *d["idle"].get(target, ()))
    }
    return frozenset(seen - {OTHER, ""})


def _of(d: dict[str, dict], part: str, target: str) -> list[tuple[Key, float]]:
    return list(d[part].get(target, {}).items())


def _one(d: dict[str, dict], part: str, target: str) -> float | None:
    return d[part].get(target, {}).get(())


def _target(
    r: WindowReader, d: dict[str, dict], name: str, pools: dict[Key, PoolEvidence]
) -> TargetEvidence:
    aas = dict(_of(d, "aas", name))
    apps = _applications(d, name)
    links = tuple(
        PoolLink(p.app, p.pool, p.max_connections or 0.0, p.processes)
        for p in pools.values()
        if p.app in apps
    )
    return TargetEvidence(
        target=name,
        window=r.window,
        aas=sum(aas.values()),
        aas_by_wait={k[0]: v for k, v in aas.items()},
        vcpus=_one(d, "vcpus", name),
        sessions=_one(d, "sessions", name) or 0.0,
        max_connections=_one(d, "max_connections", name),
        reserved_connections=_one(d, "reserved", name),
        blocked_sessions=sum(v for _, v in _of(d, "blocked", name)),
        blockers=d["blockers"].get(name, ()),
        idle_in_transaction=d["idle"].get(name, ()),
        temp_bytes_per_s={k[0]: v for k, v in _of(d, "temp", name)},
        sessions_ended_per_s={k[0]: v for k, v in _of(d, "ended", name)},
        statements=d["statements"].get(name, ()),
        work_mem_bytes=_one(d, "work_mem", name),
        applications=apps,
        pools=links,
        pools_capacity_sum=sum(link.max_connections for link in links),
        aas_trend=_one(d, "aas_trend", name) or (),
        cpu_trend=_one(d, "cpu_trend", name) or (),
        lock_trend=_one(d, "lock_trend", name) or (),
        temp_trend=_one(d, "temp_trend", name) or (),
        sessions_trend=_one(d, "sessions_trend", name) or (),
    )


def _targets(r: WindowReader, pools: dict[Key, PoolEvidence]) -> tuple[TargetEvidence, ...]:
    d = _target_inputs(r)
    names = set(d["vcpus"]) | set(d["max_connections"]) | set(d["sessions"]) | set(d["aas"])
    return tuple(_target(r, d, name, pools) for name in sorted(names))


def _risk_counters(r: WindowReader) -> tuple[RiskyStatement, ...]:
    """Post mortem: Prometheus keeps the pinning-risk calls by reason, not the texts."""
    rates = r.rate(m.PINNING_RISK_CALLS.name, ("target", "datname", "reason"))
    return tuple(
        RiskyStatement(target, datname, (reason,), v)
        for (target, datname, reason), v in sorted(rates.items())
        if v > 0
    )


def _proxies(r: WindowReader, risky: tuple[RiskyStatement, ...]) -> tuple[ProxyEvidence, ...]:
    pinned = r.avg(m.RDS_PROXY_PINNED.name, PROXY, PROXY_WIDE)
    connections = r.avg(m.RDS_PROXY_DATABASE_CONNECTIONS.name, PROXY, PROXY_WIDE)
    allowed = r.max(m.RDS_PROXY_MAX_ALLOWED.name, PROXY, PROXY_WIDE)
    reasons: dict[str, dict[str, float]] = defaultdict(dict)
    for (proxy, reason), v in r.rate(m.RDS_PROXY_PINNING_EVENTS.name, ("proxy", "reason")).items():
        reasons[proxy][reason] = v * r.window
    trend = r.trend(m.RDS_PROXY_PINNED.name, PROXY, PROXY_WIDE)
    return tuple(
        ProxyEvidence(
            proxy=key[0],
            window=r.window,
            pinned=pinned.get(key),
            database_connections=connections.get(key),
            max_allowed=allowed.get(key),
            pin_reasons=reasons.get(key[0], {}),
            risky_statements=risky,
            pinned_trend=trend.get(key, ()),
        )
        for key in sorted(set(pinned) | set(connections))
    )
