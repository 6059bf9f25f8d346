"""`connection_churn` (app, pool): connections are closed and opened again all the time.

Each new PostgreSQL connection forks a backend, authenticates (TLS, SCRAM) and warms caches:
milliseconds on the request path and CPU on the server. `pool_recycle=30` re-opens every
connection every 30 s; an overflow sized for bursts opens and closes one per burst. The close
reason (from the client: recycle, overflow, invalidated) says which, and on PostgreSQL 14+
pg_stat_database says how sessions ended (abandoned, fatal, killed).
"""

from __future__ import annotations

from exporter.diagnosis.evidence import PoolEvidence
from exporter.diagnosis.finding import Chart, Finding
from exporter.diagnosis.text import num, pct, secs
from exporter.diagnosis.thresholds import Thresholds

NAME = "connection_churn"
SUBJECT = "pool"

_FIXES = {
    "recycle": "raise pool_recycle (e.g. 1800 s; only below the server's or a proxy's idle "
    "timeout) - every connection is re-opened once per pool_recycle seconds",
    "overflow": "raise pool_size to the usual concurrency, so overflow connections are not "
    "opened and closed for every burst",
    "invalidated": "look for disconnects in the app's log (failovers, network resets, "
    "statement errors that invalidate); pool_pre_ping finds dead connections before use",
    "other": "look for code that closes or detaches connections (engine.dispose, NullPool)",
}


def evaluate(ev: PoolEvidence, thresholds: Thresholds) -> Finding | None:
    t = thresholds.connection_churn
    replaced = ev.churn_per_s
    if replaced < t.replaced_per_second:
        return None
    if ev.checkouts_per_s > 0 and replaced / ev.checkouts_per_s < t.replaced_per_checkout:
        return None
    closes = sum(ev.closes_per_s.values())
    reason, by_reason = max(ev.closes_per_s.items(), key=lambda kv: kv[1])
    connecting = ev.connects_per_s * (ev.create_mean or 0.0)
    ended = {r: v for x in ev.targets for r, v in x.sessions_ended_per_s.items() if v > 0}
    server = (
        "; server side: " + ", ".join(f"{num(v)} sessions/s {r}" for r, v in sorted(ended.items()))
        if ended
        else ""
    )
    per_checkout = (
        f"1 per {num(ev.checkouts_per_s / replaced)} checkouts"
        if ev.checkouts_per_s
        else "with no checkouts"
    )
    return Finding(
        rule=NAME,
        severity="warning",
        subject={"app": ev.app, "pool": ev.pool},
        summary=(
            f"{ev.app}/{ev.pool}: {num(replaced)} connections replaced per second "
            f"({per_checkout}), {pct(by_reason / closes)} closed for {reason}; each connect "
            f"takes {secs(ev.create_mean)}, {secs(connecting)} of connecting per second" + server
        ),
        evidence={
            "connects_per_second": ev.connects_per_s,
            "closes_per_second": closes,
            "checkouts_per_second": ev.checkouts_per_s,
            "top_close_reason": reason,
            "top_close_reason_share": by_reason / closes,
            "create_mean_seconds": ev.create_mean,
            "connecting_seconds_per_second": connecting,
            **{f"sessions_{r}_per_second": v for r, v in sorted(ended.items())},
        },
        window=ev.window,
        fix=f"Mostly {reason}: {_FIXES.get(reason, _FIXES['other'])}.",
        chart=Chart("connections checked out", ev.used_trend, "", ev.max_connections, "maximum"),
        details=tuple(
            f"closed for {r}: {num(v)}/s" for r, v in sorted(ev.closes_per_s.items()) if v > 0
        ),
    )
