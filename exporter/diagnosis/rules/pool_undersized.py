"""`pool_undersized` (app, pool): callers wait for connections the database could serve.

Three conditions, because each alone misleads: the pool is at its maximum most of the window,
callers wait (and on average longer than their statement then takes, so the wait is for a
connection and not for a slow server; means, because a 90 ms wait and a 50 ms statement land
in the same histogram bucket), and the database behind it is not saturated - when it
is, `database_cpu_saturated` says so and a bigger pool would only make it worse.

The suggested size is Little's law: checkouts/s x mean hold = connections busy, plus the
callers that waited on average, with some headroom, per process; and the sum over processes
and the other linked pools is checked against what the server accepts.
"""

from __future__ import annotations

import math

from exporter.diagnosis.evidence import PoolEvidence
from exporter.diagnosis.finding import Chart, Finding
from exporter.diagnosis.rules.database_cpu_saturated import saturated
from exporter.diagnosis.text import num, pct, secs
from exporter.diagnosis.thresholds import Thresholds

NAME = "pool_undersized"
SUBJECT = "pool"


def _waiting(ev: PoolEvidence, thresholds: Thresholds) -> bool:
    t = thresholds.pool_undersized
    if not ev.bounded or ev.at_max_share < t.at_max_share or ev.pending_share < t.pending_share:
        return False
    if ev.wait_mean is None or ev.wait_mean < t.min_wait_seconds:
        return False
    return ev.statement_mean is None or ev.wait_mean >= t.wait_over_statement * ev.statement_mean


def _server_room(ev: PoolEvidence, wanted: float) -> str:
    """What the linked servers say about the new total, one clause per target."""
    clauses = []
    for target in ev.targets:
        usable = target.usable_connections
        if usable is None:
            continue
        own = (p.max_connections for p in target.pools if (p.app, p.pool) == (ev.app, ev.pool))
        others = target.pools_capacity - next(own, 0.0)
        total = others + wanted
        verdict = "within" if total <= usable else "ABOVE"
        clauses.append(
            f"with the other pools {num(total)} connections, {verdict} the {num(usable)} "
            f"{target.target} accepts"
        )
    return "; ".join(clauses)


def evaluate(ev: PoolEvidence, thresholds: Thresholds) -> Finding | None:
    if not _waiting(ev, thresholds) or any(saturated(x, thresholds) for x in ev.targets):
        return None
    busy = ev.checkouts_per_s * ev.hold_mean if ev.hold_mean is not None else ev.used
    wanted = math.ceil((busy + ev.pending) * thresholds.pool_undersized.headroom)
    processes = max(ev.processes, 1.0)
    per_process = math.ceil(wanted / processes)
    room = _server_room(ev, per_process * processes)
    linked = ", ".join(
        f"{x.target} not saturated ({num(x.aas)} active sessions on {num(x.vcpus)} vCPUs)"
        for x in ev.targets
    )
    fix = (
        f"Little's law: {num(ev.checkouts_per_s)} checkouts/s x {secs(ev.hold_mean)} mean hold "
        f"= {num(busy)} connections busy, and {num(ev.pending)} callers waited on average. "
        f"Set pool_size + max_overflow to about {per_process} per process "
        f"({num(processes)} processes: {num(per_process * processes)} in all"
        + (f"; {room}" if room else "")
        + "). If that is above what the server accepts, put PgBouncer or RDS Proxy in front "
        "or shorten the time each request holds a connection."
    )
    return Finding(
        rule=NAME,
        severity="critical" if ev.timeouts_per_s > 0 else "warning",
        subject={"app": ev.app, "pool": ev.pool},
        summary=(
            f"{ev.app}/{ev.pool}: at its maximum of {num(ev.max_connections)} for "
            f"{pct(ev.at_max_share)} of the window with {num(ev.pending)} callers waiting on "
            f"average; a wait of {secs(ev.wait_mean)} for a statement of {secs(ev.statement_mean)} "
            f"(p95 {secs(ev.wait_p95)} and {secs(ev.statement_p95)})"
            + (f"; {linked}" if linked else "; no linked database seen")
        ),
        evidence={
            "at_max_share": ev.at_max_share,
            "pending": ev.pending,
            "wait_mean_seconds": ev.wait_mean,
            "statement_mean_seconds": ev.statement_mean,
            "wait_p95_seconds": ev.wait_p95,
            "statement_p95_seconds": ev.statement_p95,
            "checkouts_per_second": ev.checkouts_per_s,
            "hold_mean_seconds": ev.hold_mean,
            "max_connections": ev.max_connections,
            "processes": processes,
            "suggested_per_process": float(per_process),
            "timeouts_per_second": ev.timeouts_per_s,
        },
        window=ev.window,
        fix=fix,
        chart=Chart("connections checked out", ev.used_trend, "", ev.max_connections, "maximum"),
    )
