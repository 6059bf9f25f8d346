"""Who holds what, by application_name: the activity sample's answer to "which app?".

Load by wait event says that sessions wait on locks or sit idle in transactions; the
diagnosis needs to say which application does it, and which apps use the target at all (the
link from an app's pool to its database). These gauges carry application_name, so they are
bounded: sessions per app are the top `top_applications` (the rest summed as `other`), and the
holders - lock blockers and idle-in-transaction sessions - only the `MAX_HOLDERS` longest.

The blockers need a second query, run only when the first saw a blocked session: it expands
pg_blocking_pids() of the sessions waiting on a heavyweight lock, which takes the lock
manager's locks, so it is not run when nothing waits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from exporter import metrics as m
from exporter.core.cardinality import OTHER
from exporter.metrics import Sample

MAX_HOLDERS = 5

#: The longest-held blockers: the transaction age of every session some waiter is blocked by.
BLOCKERS = f"""
SELECT coalesce(b.datname, '') AS datname,
       coalesce(b.application_name, '') AS application_name,
       max(extract(epoch FROM now() - coalesce(b.xact_start, b.query_start, b.backend_start)))
           AS held
FROM pg_stat_activity w
CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS bp(pid)
JOIN pg_stat_activity b ON b.pid = bp.pid
WHERE w.wait_event_type = 'Lock' AND w.backend_type = 'client backend'
GROUP BY 1, 2
ORDER BY held DESC NULLS LAST
LIMIT {MAX_HOLDERS}
"""

Fetch = Callable[[str], Awaitable[Sequence[Any]]]
AppKey = tuple[str, str]  # (datname label, application_name)


def application_sessions(sessions: dict[AppKey, float], top: int) -> Iterable[Sample]:
    """Client backends per (datname, application_name): the `top` largest, the rest `other`."""
    ranked = sorted(sessions.items(), key=lambda kv: (-kv[1], kv[0]))
    other: dict[str, float] = {}
    for i, ((db, app), n) in enumerate(ranked):
        if i < top and app != OTHER:
            yield Sample(m.APPLICATION_SESSIONS, (db, app), n)
        else:
            other[db] = other.get(db, 0.0) + n
    for db, n in other.items():
        yield Sample(m.APPLICATION_SESSIONS, (db, OTHER), n)


def idle_in_transaction(ages: dict[AppKey, float]) -> Iterable[Sample]:
    """The longest idle-in-transaction time of the apps that have one, longest first."""
    ranked = sorted(((k, v) for k, v in ages.items() if v > 0), key=lambda kv: -kv[1])
    for key, age in ranked[:MAX_HOLDERS]:
        yield Sample(m.APPLICATION_IDLE_IN_TRANSACTION_SECONDS, key, age)


async def blockers(fetch: Fetch, datname: Callable[[str], str]) -> list[Sample]:
    """How long each of the longest blockers' transactions has been open, by application."""
    rows = await fetch(BLOCKERS)
    return [
        Sample(
            m.LOCK_BLOCKER_SECONDS,
            (datname(row["datname"]), row["application_name"]),
            float(row["held"] or 0.0),
        )
        for row in rows
    ]
