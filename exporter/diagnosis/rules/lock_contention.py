"""`lock_contention` (target): sessions wait on locks another session holds.

The load is spent waiting, not working, and more connections only queue behind the same
lock. What helps is the holder: which application holds the lock and for how long, which
the activity sampler records for the longest blockers (`pg_lock_blocker_seconds`).
"""

from __future__ import annotations

from exporter.diagnosis.evidence import TargetEvidence
from exporter.diagnosis.finding import Chart, Finding
from exporter.diagnosis.text import num, pct, secs
from exporter.diagnosis.thresholds import Thresholds

NAME = "lock_contention"
SUBJECT = "target"


def evaluate(ev: TargetEvidence, thresholds: Thresholds) -> Finding | None:
    t = thresholds.lock_contention
    share = ev.aas_lock / ev.aas if ev.aas > 0 else 0.0
    top = ev.blockers[0] if ev.blockers else None
    by_load = ev.aas_lock >= t.min_lock_aas and share >= t.lock_share
    by_holder = ev.blocked_sessions >= 1 and top is not None and top.seconds >= t.held_seconds
    if not (by_load or by_holder):
        return None
    if top is not None:
        holder = (
            f"blocker: application_name '{top.application_name}' in {top.datname}, "
            f"its transaction open for {secs(top.seconds)}"
        )
    else:
        holder = "the blocker was not captured"
    subject = {"target": ev.target}
    if top is not None:
        subject["datname"] = top.datname
    fix = (
        "Find the blocking transaction and make it end: "
        + (f"the session of '{top.application_name}' " if top else "the session ")
        + "(SELECT pid, query FROM pg_stat_activity WHERE pid = ANY(pg_blocking_pids(<waiting "
        "pid>)); pg_terminate_backend(pid) if it is stuck). Then keep transactions short in "
        "the holder, take row locks in one order, use lock_timeout for DDL and SKIP LOCKED "
        "for queue tables. A larger pool only adds sessions to the queue."
    )
    return Finding(
        rule=NAME,
        severity="critical" if top and top.seconds >= t.critical_held_seconds else "warning",
        subject=subject,
        summary=(
            f"{ev.target}: lock waits are {pct(share)} of the load ({num(ev.aas_lock)} of "
            f"{num(ev.aas)} active sessions), up to {num(ev.blocked_sessions)} sessions "
            f"blocked; {holder}"
        ),
        evidence={
            "aas": ev.aas,
            "aas_lock": ev.aas_lock,
            "lock_share": share,
            "blocked_sessions": ev.blocked_sessions,
            "blocker_application_name": top.application_name if top else None,
            "blocker_held_seconds": top.seconds if top else None,
        },
        window=ev.window,
        fix=fix,
        chart=Chart("sessions waiting on locks", ev.lock_trend),
        details=tuple(
            f"'{h.application_name}' in {h.datname}: held {secs(h.seconds)}" for h in ev.blockers
        ),
    )
