"""`proxy_pinning` (proxy): RDS Proxy pins client sessions to database connections.

A pinned session keeps its database connection until the client disconnects, so the proxy
cannot multiplex and the database sees as many connections as there are clients: the reason
to have the proxy is gone. CloudWatch says how many are pinned; the proxy's log says why
(reasons), and the pinning-risk report says which of our statements would do it.
"""

from __future__ import annotations

from exporter.diagnosis.evidence import ProxyEvidence, RiskyStatement
from exporter.diagnosis.finding import Chart, Finding
from exporter.diagnosis.text import num, pct
from exporter.diagnosis.thresholds import Thresholds

NAME = "proxy_pinning"
SUBJECT = "proxy"

_FIXES = {
    "session_settings": "move SET to the proxy's initialization query or use SET LOCAL "
    "inside transactions",
    "prepared_statement": "turn off driver-side prepared statements through the proxy "
    "(asyncpg statement_cache_size=0, psycopg prepare_threshold=None)",
    "temporary_object": "replace temporary tables with CTEs or real tables",
    "advisory_lock": "use transaction-level advisory locks (pg_advisory_xact_lock)",
    "sequence": "avoid currval()/lastval() across statements; use RETURNING",
    "listen": "LISTEN on a direct database connection, not through the proxy",
    "cursor": "use WITH HOLD cursors only on a direct connection",
    "statement_too_large": "keep statements under 16 KB (smaller batches, bind arrays)",
}


def _matching(ev: ProxyEvidence, reasons: list[str]) -> list[RiskyStatement]:
    """The risk report's statements with a reason the proxy logged (all of them if the logs
    gave none), busiest first."""
    wanted = set(reasons)
    found = [s for s in ev.risky_statements if not wanted or wanted & set(s.reasons)]
    return sorted(found, key=lambda s: -s.calls_per_s)[:5]


def _rate(statement: RiskyStatement) -> str:
    return f" ({num(statement.calls_per_s)} calls/s)" if statement.calls_per_s > 0 else ""


def evaluate(ev: ProxyEvidence, thresholds: Thresholds) -> Finding | None:
    t = thresholds.proxy_pinning
    share = ev.pinned_share
    if share is None or share < t.pinned_share:
        return None
    ranked = sorted(ev.pin_reasons.items(), key=lambda kv: -kv[1])
    reasons = [r for r, n in ranked[: t.top_reasons] if n > 0]
    statements = _matching(ev, reasons)
    said = ", ".join(f"{r} ({ev.pin_reasons[r]:.0f} pins)" for r in reasons)
    fixes = [f"{r}: {_FIXES[r]}" for r in reasons if r in _FIXES]
    if not fixes:
        fixes = [f"{r}: {_FIXES[r]}" for s in statements for r in s.reasons if r in _FIXES][:3]
    first = statements[0] if statements else None
    return Finding(
        rule=NAME,
        severity="warning",
        subject={"proxy": ev.proxy},
        summary=(
            f"RDS Proxy {ev.proxy}: {pct(share)} of its database connections pinned "
            f"({num(ev.pinned)} of {num(ev.database_connections)})"
            + (f"; reasons: {said}" if said else "; no reasons in the proxy's log")
            + (f"; e.g. {first.text or first.reasons[0]}{_rate(first)}" if first else "")
        ),
        evidence={
            "pinned_share": share,
            "pinned": ev.pinned,
            "database_connections": ev.database_connections,
            "top_reason": reasons[0] if reasons else None,
            **{f"pins_{r}": ev.pin_reasons[r] for r in reasons},
        },
        window=ev.window,
        fix="; ".join(fixes) + "." if fixes else "Turn on the proxy's enhanced logging to see why.",
        chart=Chart("pinned connections", ev.pinned_trend, "", ev.database_connections, "all"),
        details=tuple(
            f"{s.target}/{s.datname}: {s.text or '(text not kept)'} - {', '.join(s.reasons)}"
            + _rate(s)
            for s in statements
        ),
    )
