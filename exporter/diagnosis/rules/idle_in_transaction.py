"""`idle_in_transaction` (target, app): a session sits inside an open transaction, doing
nothing.

It keeps its locks (others queue behind them) and its snapshot (vacuum cannot remove what
changed since), and it holds a connection of its pool. The activity sampler records the
longest such session per application_name, so the finding names the app.
"""

from __future__ import annotations

from exporter.diagnosis.evidence import TargetEvidence
from exporter.diagnosis.finding import Finding
from exporter.diagnosis.text import secs
from exporter.diagnosis.thresholds import Thresholds

NAME = "idle_in_transaction"
SUBJECT = "target"


def evaluate(ev: TargetEvidence, thresholds: Thresholds) -> Finding | None:
    t = thresholds.idle_in_transaction
    oldest = max(ev.idle_in_transaction, key=lambda h: h.seconds, default=None)
    if oldest is None or oldest.seconds < t.seconds:
        return None
    app = oldest.application_name
    who = f"application_name '{app}'" if app else "a session without application_name"
    return Finding(
        rule=NAME,
        severity="critical" if oldest.seconds >= t.critical_seconds else "warning",
        subject={"target": ev.target, "datname": oldest.datname, "app": app},
        summary=(
            f"{ev.target}/{oldest.datname}: {who} sat idle in a transaction for "
            f"{secs(oldest.seconds)}, holding its locks and snapshot"
        ),
        evidence={
            "idle_in_transaction_seconds": oldest.seconds,
            "application_name": app,
            "blocked_sessions": ev.blocked_sessions,
        },
        window=ev.window,
        fix=(
            f"Find where {app or 'the app'} opens a transaction and then waits (a request that "
            "commits late, a Session left open across an API call, a worker that begins and "
            "then sleeps) and commit or roll back first. Set idle_in_transaction_session_timeout "
            "(e.g. ALTER ROLE ... SET idle_in_transaction_session_timeout = '60s') so such a "
            "session is ended by the server."
        ),
        details=tuple(
            f"'{h.application_name}' in {h.datname}: idle in transaction {secs(h.seconds)}"
            for h in sorted(ev.idle_in_transaction, key=lambda h: -h.seconds)[:5]
        ),
    )
