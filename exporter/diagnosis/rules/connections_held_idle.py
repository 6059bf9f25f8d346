"""`connections_held_idle` (app, pool): the app keeps connections while it does other work.

A connection checked out for 800 ms that runs 40 ms of statements is busy 5% of the time it
is held: the pool looks exhausted, but the database is idle and a bigger pool only hides it.
The share of held time spent in statements comes from the client's own timing (statement
time / hold time, both summed over processes). An app whose sessions sit idle inside a
transaction on a linked database is the same habit with locks held on top.
"""

from __future__ import annotations

from exporter.diagnosis.evidence import Holder, PoolEvidence
from exporter.diagnosis.finding import Chart, Finding
from exporter.diagnosis.text import num, pct, secs
from exporter.diagnosis.thresholds import Thresholds

NAME = "connections_held_idle"
SUBJECT = "pool"


def _idle_in_transaction(ev: PoolEvidence) -> Holder | None:
    """The app's longest idle-in-transaction session on any linked target."""
    mine = [h for x in ev.targets for h in x.idle_in_transaction if h.application_name == ev.app]
    return max(mine, key=lambda h: h.seconds, default=None)


def evaluate(ev: PoolEvidence, thresholds: Thresholds) -> Finding | None:
    t = thresholds.connections_held_idle
    busy = ev.busy_share
    held_idle = (
        busy is not None
        and ev.hold_mean is not None
        and ev.hold_mean >= t.min_hold_seconds
        and ev.checkouts_per_s >= t.min_checkouts_per_second
        and busy <= t.busy_share
    )
    idle_tx = _idle_in_transaction(ev)
    if idle_tx is not None and idle_tx.seconds < t.idle_in_transaction_seconds:
        idle_tx = None
    if not held_idle and idle_tx is None:
        return None
    parts = []
    if held_idle:
        parts.append(
            f"holds each connection {secs(ev.hold_mean)} on average but runs statements for "
            f"{pct(busy)} of it"
        )
    if idle_tx is not None:
        parts.append(
            f"its sessions sat idle in a transaction for up to {secs(idle_tx.seconds)} in "
            f"{idle_tx.datname}"
        )
    in_use = ev.hold_seconds_per_s
    fix = (
        "Check connections out late and return them early: do HTTP calls, file I/O and "
        "rendering outside `with engine.connect()` / the Session's transaction, commit before "
        "slow work and close the Session before building the response. "
        f"Now {num(in_use)} connections are held on average for {num(ev.statement_seconds_per_s)} "
        "connections' worth of statements. Set idle_in_transaction_session_timeout so a "
        "forgotten transaction cannot hold locks for long."
    )
    return Finding(
        rule=NAME,
        severity="warning",
        subject={"app": ev.app, "pool": ev.pool},
        summary=f"{ev.app}/{ev.pool}: " + "; ".join(parts) + ": the app holds connections idle",
        evidence={
            "hold_mean_seconds": ev.hold_mean,
            "statement_mean_seconds": ev.statement_mean,
            "busy_share": busy,
            "connections_held": in_use,
            "connections_in_statements": ev.statement_seconds_per_s,
            "idle_in_transaction_seconds": idle_tx.seconds if idle_tx else None,
        },
        window=ev.window,
        fix=fix,
        chart=Chart("connections checked out", ev.used_trend, "", ev.max_connections, "maximum"),
    )
