"""Statements in pg_stat_statements that would pin an RDS Proxy session.

AWS shows how many connections are pinned but not which statements pin them. The database
already knows every statement the application runs; classifying them (`exporter.pinning.statements`)
turns "pinning is high" into "this `SET search_path` from orders runs 4,000 times a minute".

This is a helper of the database source, not a source: it reads through the connection the
database source already holds (`fetch(sql, *args)`, which carries statement_timeout), so the
target still sees a single pgpressure session. Each sample:

1. reads (user, database, queryid, calls) for top-level statements *without* text -
   `pg_stat_statements(false)` - because loading every query text each interval is the
   expensive part of pg_stat_statements;
2. fetches the text only for entries it has not classified yet, classifies each once and
   remembers the answer per (database, queryid);
3. turns pg_stat_statements' cumulative calls into growth since the last sample, per entry,
   so `pg_pinning_risk_calls_total{datname,reason}` never goes backwards when an entry is
   evicted, re-created or the whole view is reset.

Only top-level statements count (PostgreSQL 14+): a `nextval()` inside a PL/pgSQL function
never reaches the proxy as text. The text of the worst offenders is kept for
`top_offenders()` (served as JSON by the web layer), never as a label. pg_stat_statements
keeps the constants of utility statements before PostgreSQL 16 (`SET app.token = 'abc'`),
and SET is what this list is about, so the text is normalized again with PostgreSQL's own
normalizer (constants become `$n`) and redacted before it is kept.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pglast.parser import ParseError, normalize

from exporter import metrics as m
from exporter.core.cardinality import OTHER, LabelCap
from exporter.core.deltas import CumulativeDeltas
from exporter.metrics import Sample
from exporter.pinning import statements as pinning
from exporter.redaction import redact

Fetch = Callable[..., Awaitable[Sequence[Any]]]

_VERSION = "SELECT current_setting('server_version_num')::int AS v"

# One row per pg_stat_statements entry; `toplevel` splits entries since PostgreSQL 14.
_ENTRIES = """
SELECT s.userid, s.dbid, d.datname, s.queryid, sum(s.calls)::float8 AS calls{reset}
FROM pg_stat_statements(false) s JOIN pg_database d ON d.oid = s.dbid
WHERE s.queryid IS NOT NULL{toplevel}
GROUP BY s.userid, s.dbid, d.datname, s.queryid
"""
_RESET_COL = ", (SELECT stats_reset FROM pg_stat_statements_info)::text AS stats_reset"

_TEXTS = """
SELECT DISTINCT ON (s.dbid, s.queryid) s.dbid, s.queryid, s.query
FROM pg_stat_statements(true) s
WHERE s.queryid = ANY($1::bigint[]) AND s.query IS NOT NULL{toplevel}
"""

#: Longest query text kept per offender for the JSON endpoint.
MAX_TEXT_CHARS = 4096
#: Most texts fetched in one sample; the rest wait for the next (bounded work per interval).
MAX_NEW_PER_SAMPLE = 2000


@dataclass
class _Statement:
    """What we know about one (database, queryid): its reasons and, if it pins, its text."""

    datname: str
    reasons: frozenset[str]
    text: str = ""
    text_bytes: int = 0
    truncated: bool = False
    calls: float = 0.0  # cumulative, as pg_stat_statements reports it (summed over users)
    recent_calls: float = 0.0  # growth in the last sample
    last_seen: float = field(default_factory=time.time)


class PinningRisk:
    """Cumulative calls of pinning statements by (datname, reason), from pg_stat_statements.

    A statement with two reasons (e.g. `SELECT nextval(...), pg_advisory_lock(...)`) counts
    under both, so the sum over reasons can exceed the calls of pinning statements.
    """

    def __init__(self, top_n: int = 20, datnames: LabelCap | None = None) -> None:
        self.top_n = top_n
        self._datname = datnames if datnames is not None else LabelCap(50)
        self._queries: tuple[str, str] | None = None
        self._tracks_resets = False
        self._statements: dict[tuple[int, int], _Statement] = {}  # (dbid, queryid)
        self._calls = CumulativeDeltas()  # (userid, dbid, queryid) -> (calls,)
        self._stats_reset: str | None = None
        self._totals: dict[tuple[str, str], float] = {}

    async def _prepare(self, fetch: Fetch) -> tuple[str, str]:
        if self._queries is None:
            rows = await fetch(_VERSION)
            version = int(rows[0]["v"]) if rows else 0
            modern = version >= 140000  # toplevel column and pg_stat_statements_info
            self._tracks_resets = modern
            toplevel = " AND s.toplevel" if modern else ""
            self._queries = (
                _ENTRIES.format(reset=_RESET_COL if modern else "", toplevel=toplevel),
                _TEXTS.format(toplevel=toplevel),
            )
        return self._queries

    async def sample(self, fetch: Fetch) -> list[Sample]:
        entries_sql, texts_sql = await self._prepare(fetch)
        rows = await fetch(entries_sql)
        now = time.time()

        if rows and self._tracks_resets:
            reset = rows[0]["stats_reset"]
            if self._stats_reset is not None and reset != self._stats_reset:
                self._calls.clear()
            self._stats_reset = reset

        unknown = {(int(r["dbid"]), int(r["queryid"])) for r in rows}
        unknown -= self._statements.keys()
        if unknown:
            await self._classify(fetch, texts_sql, rows, unknown)

        for stmt in self._statements.values():
            stmt.recent_calls = 0.0
            stmt.calls = 0.0
        seen: set[tuple[int, int, int]] = set()
        for row in rows:
            stmt_key = (int(row["dbid"]), int(row["queryid"]))
            stmt = self._statements.get(stmt_key)
            key = (int(row["userid"]), *stmt_key)
            seen.add(key)
            calls = float(row["calls"])
            if stmt is None:
                # Text not fetched yet (over the per-sample bound): keep its calls as the
                # baseline, so that once classified it adds what it grew by, not its whole
                # lifetime in one step (a fake spike in an existing series).
                self._calls.baseline(key, (calls,))
                continue
            (delta,) = self._calls.update(key, (calls,))
            stmt.calls += calls
            stmt.recent_calls += delta
            stmt.last_seen = now
            if delta > 0:
                for reason in stmt.reasons:
                    total_key = (stmt.datname, reason)
                    self._totals[total_key] = self._totals.get(total_key, 0.0) + delta

        self._calls.forget_missing(seen)
        present = {(k[1], k[2]) for k in seen}
        for stmt_key in self._statements.keys() - present:
            del self._statements[stmt_key]  # evicted: classify again if it comes back

        live = self._datname.seen() | {OTHER}  # dropped databases' series end
        for total_key in [k for k in self._totals if k[0] not in live]:
            del self._totals[total_key]
        return [
            Sample(m.PINNING_RISK_CALLS, key, value) for key, value in sorted(self._totals.items())
        ]

    async def _classify(
        self, fetch: Fetch, texts_sql: str, rows: Sequence[Any], unknown: set[tuple[int, int]]
    ) -> None:
        wanted = sorted(unknown)[:MAX_NEW_PER_SAMPLE]
        texts = await fetch(texts_sql, sorted({q for _, q in wanted}))
        datnames = {int(r["dbid"]): r["datname"] for r in rows}
        wanted_set = set(wanted)
        for row in texts:
            key = (int(row["dbid"]), int(row["queryid"]))
            if key not in wanted_set:
                continue
            text = row["query"]
            reasons = pinning.classify(text)
            stmt = _Statement(self._datname(datnames.get(key[0], "")), reasons)
            if reasons:
                shown = _shown(text)
                stmt.text, stmt.truncated = shown[:MAX_TEXT_CHARS], len(shown) > MAX_TEXT_CHARS
                stmt.text_bytes = len(text.encode("utf-8", "surrogatepass"))
            self._statements[key] = stmt
            wanted_set.discard(key)
        for key in wanted_set:  # text not visible to this role, or gone meanwhile
            self._statements[key] = _Statement(self._datname(datnames.get(key[0], "")), frozenset())

    def top_offenders(self) -> list[dict[str, object]]:
        """The pinning statements with the most calls, with their normalized text."""
        offenders = [(key, stmt) for key, stmt in self._statements.items() if stmt.reasons]
        offenders.sort(key=lambda item: (-item[1].calls, item[0]))
        return [
            {
                "datname": stmt.datname,
                "queryid": str(queryid),
                "reasons": [r for r in pinning.REASONS if r in stmt.reasons],
                "calls": stmt.calls,
                "recent_calls": stmt.recent_calls,
                "query": stmt.text,
                "query_bytes": stmt.text_bytes,
                "truncated": stmt.truncated,
            }
            for (_, queryid), stmt in offenders[: self.top_n]
        ]


def _shown(text: str) -> str:
    """The text a person may read: constants replaced by `$n`, registered secrets masked.
    Text the parser refuses is kept as pg_stat_statements has it, redacted."""
    with contextlib.suppress(ParseError):
        text = normalize(text)
    return redact(text)
