"""`pools_exceed_server` (target): the linked pools can open more than the server accepts.

Each process's pool is sized alone; the server sees the sum over every process of every app.
When traffic makes them all open at once, the last ones are refused ("sorry, too many
clients already", "remaining connection slots are reserved"): an outage that no single
pool's numbers show.
"""

from __future__ import annotations

import math

from exporter.diagnosis.evidence import TargetEvidence
from exporter.diagnosis.finding import Chart, Finding
from exporter.diagnosis.text import num
from exporter.diagnosis.thresholds import Thresholds

NAME = "pools_exceed_server"
SUBJECT = "target"
MAX_DETAILS = 10  # the largest pools; the summary has the totals


def evaluate(ev: TargetEvidence, thresholds: Thresholds) -> Finding | None:
    t = thresholds.pools_exceed_server
    usable = ev.usable_connections
    if usable is None or not ev.pools:
        return None
    total = ev.pools_capacity
    if total <= t.share * usable:
        return None
    processes = sum(p.processes for p in ev.pools)
    reserved = (ev.max_connections or 0.0) - usable
    per_process = math.floor(usable / processes) if processes >= 1 else None
    each = f"about {per_process} per process for these {num(processes)} processes, "
    fix = (
        f"Keep the sum of pool_size + max_overflow over every process under {num(usable)}: "
        + (each if per_process else "")
        + "or put a connection pooler (PgBouncer, RDS Proxy) between the apps and the server "
        "and size the pools against it. Raising max_connections costs memory per backend and "
        "does not add CPU."
    )
    return Finding(
        rule=NAME,
        severity="warning",
        subject={"target": ev.target},
        summary=(
            f"{ev.target}: the {len(ev.pools)} pools linked to it can open {num(total)} "
            f"connections over {num(processes)} processes, above the {num(usable)} it accepts "
            f"(max_connections {num(ev.max_connections)} - {num(reserved)} reserved)"
        ),
        evidence={
            "pools_max_connections": total,
            "processes": processes,
            "max_connections": ev.max_connections,
            "reserved_connections": reserved,
            "sessions": ev.sessions,
        },
        window=ev.window,
        fix=fix,
        chart=Chart("client sessions", ev.sessions_trend, "", usable, "usable connections"),
        details=tuple(
            f"{p.app}/{p.pool}: up to {num(p.max_connections)} over {num(p.processes)} processes"
            for p in sorted(ev.pools, key=lambda p: -p.max_connections)[:MAX_DETAILS]
        ),
    )
