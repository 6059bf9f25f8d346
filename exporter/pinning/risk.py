"""Statements in pg_stat_statements that would pin an RDS Proxy session.

AWS shows how many connections are pinned but not which statements pin them. The database
already knows every statement the application runs; classifying them (`exporter.pinning.statements`)
turns "pinning is high" into "this `SET search_path` from orders runs 4,000 times a minute".

This is a helper of the database source, not a source: it reads through the connection the
database source already holds (`fetch(sql, *args)`, which carries statement_timeout), so the
target still sees a single pgpressure session. Each sample:

1. reads (role, database, queryid, calls) for top-level statements *without* text -
   `pg_stat_statements(false)` - because loading every query text each interval is the
   expensive part of pg_stat_statements;
2. fetches the text only for entries it has not classified yet, classifies each once and
   remembers the answer per (database, queryid);
3. turns pg_stat_statements' cumulative calls into growth since the last sample, per entry
   (role, database, queryid), so `pg_pinning_risk_calls_total{datname,reason}` never goes
   backwards when an entry is evicted, re-created or the whole view is reset.

Who: every entry is kept per role (pg_stat_statements' `userid`, named from `pg_roles`) and
database, so a row says which role ran it. The daemon's own statements are left out unless
`include_own` (config `statements.pinning_own_statements`): pgpressure reads through asyncpg,
whose type introspection turns JIT off for the session with `set_config` - a statement that
would pin, which a user would otherwise find at the top of their report and take for theirs.
They are told apart by role (`current_user` of the daemon's connection), so the daemon needs a
role of its own (the README's `pgpressure` role with `pg_monitor`). Each pinning statement is
matched against the known driver fingerprints (`exporter.pinning.fingerprints`), so a row also
says which driver sends it and what its documentation says to change.

Only top-level statements count (PostgreSQL 14+): a `nextval()` inside a PL/pgSQL function
never reaches the proxy as text. The text of the worst offenders is kept for
`top_offenders()` (served as JSON by the web layer), never as a label. pg_stat_statements
keeps the constants of utility statements before PostgreSQL 16 (`SET app.token = 'abc'`),
and SET is what this list is about, so the text is normalized again with PostgreSQL's own
normalizer (constants become `$n`) and redacted before it is kept.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pglast.parser import ParseError, normalize

from exporter import metrics as m
from exporter.core.cardinality import OTHER, LabelCap
from exporter.core.deltas import CumulativeDeltas
from exporter.logs import kv
from exporter.metrics import Sample
from exporter.pinning import fingerprints
from exporter.pinning import statements as pinning
from exporter.postgres.connection import TargetUnavailable
from exporter.redaction import redact

log = logging.getLogger("pgpressure.pinning")

Fetch = Callable[..., Awaitable[Sequence[Any]]]

_VERSION = "SELECT current_setting('server_version_num')::int AS v"

# One row per (role, database, queryid); `toplevel` splits entries since PostgreSQL 14.
_ENTRIES = """
SELECT s.userid, COALESCE(r.rolname, s.userid::text) AS rolname, s.dbid, d.datname, s.queryid,
       sum(s.calls)::float8 AS calls{reset}
FROM pg_stat_statements(false) s
JOIN pg_database d ON d.oid = s.dbid
LEFT JOIN pg_roles r ON r.oid = s.userid
WHERE s.queryid IS NOT NULL{toplevel}{others}
GROUP BY s.userid, r.rolname, s.dbid, d.datname, s.queryid
"""
_RESET_COL = ", (SELECT stats_reset FROM pg_stat_statements_info)::text AS stats_reset"
# The daemon's own statements: those of the role its connection logged in as.
_NOT_OWN = " AND s.userid <> (SELECT oid FROM pg_roles WHERE rolname = current_user)"

_TEXTS = """
SELECT DISTINCT ON (s.dbid, s.queryid) s.dbid, s.queryid, s.query
FROM pg_stat_statements(true) s
WHERE s.queryid = ANY($1::bigint[]) AND s.query IS NOT NULL{toplevel}
"""

#: Longest query text kept per offender for the JSON endpoint.
MAX_TEXT_CHARS = 4096
#: Most texts fetched in one sample; the rest wait for the next (bounded work per interval).
MAX_NEW_PER_SAMPLE = 2000
#: SQLSTATE 22021 (character_not_in_repertoire): pg_stat_statements(true) holds a text that is
#: not valid in the connected database's encoding (a statement run in a SQL_ASCII database),
#: and the server fails the whole call, for every text, until pg_stat_statements_reset().
TEXT_NOT_IN_ENCODING = "22021"


@dataclass
class _Statement:
    """One (database, queryid), whoever runs it: its reasons and, if it pins, its text."""

    datname: str  # as PostgreSQL names it, for the report
    label: str  # the datname label value (capped), for the counter
    reasons: frozenset[str]
    fingerprints: tuple[fingerprints.Fingerprint, ...] = ()
    text: str = ""
    text_bytes: int = 0
    truncated: bool = False


@dataclass
class _Row:
    """One pinning statement as one role runs it."""

    role: str
    calls: float = 0.0  # cumulative, as pg_stat_statements reports it
    recent_calls: float = 0.0  # growth in the last sample


class PinningRisk:
    """Cumulative calls of pinning statements by (datname, reason), from pg_stat_statements,
    and the statements themselves per role for `top_offenders()`.

    A statement with two reasons (e.g. `SELECT nextval(...), pg_advisory_lock(...)`) counts
    under both, so the sum over reasons can exceed the calls of pinning statements.
    """

    def __init__(
        self, top_n: int = 20, datnames: LabelCap | None = None, *, include_own: bool = False
    ) -> None:
        self.top_n = top_n
        self.include_own = include_own
        self._datname = datnames if datnames is not None else LabelCap(50)
        self._queries: tuple[str, str] | None = None
        self._tracks_resets = False
        self._statements: dict[tuple[int, int], _Statement] = {}  # (dbid, queryid)
        self._rows: dict[tuple[int, int, int], _Row] = {}  # (userid, dbid, queryid)
        self._calls = CumulativeDeltas()  # (userid, dbid, queryid) -> (calls,)
        self._stats_reset: str | None = None
        self._totals: dict[tuple[str, str], float] = {}
        self.sampled_at: float | None = None  # Unix time of the last sample that succeeded
        self._stale = False  # the database source could not sample since
        self._texts_unreadable = False

    async def _prepare(self, fetch: Fetch) -> tuple[str, str]:
        if self._queries is None:
            rows = await fetch(_VERSION)
            version = int(rows[0]["v"]) if rows else 0
            modern = version >= 140000  # toplevel column and pg_stat_statements_info
            self._tracks_resets = modern
            toplevel = " AND s.toplevel" if modern else ""
            self._queries = (
                _ENTRIES.format(
                    reset=_RESET_COL if modern else "",
                    toplevel=toplevel,
                    others="" if self.include_own else _NOT_OWN,
                ),
                _TEXTS.format(toplevel=toplevel),
            )
        return self._queries

    async def sample(self, fetch: Fetch) -> list[Sample]:
        entries_sql, texts_sql = await self._prepare(fetch)
        rows = await fetch(entries_sql)
        if rows and self._tracks_resets:
            reset = rows[0]["stats_reset"]
            if self._stats_reset is not None and reset != self._stats_reset:
                self._calls.clear()
            self._stats_reset = reset

        unknown = {(int(r["dbid"]), int(r["queryid"])) for r in rows}
        unknown -= self._statements.keys()
        if unknown:
            await self._classify(fetch, texts_sql, rows, unknown)
        self._forget(self._count(rows))
        self.sampled_at, self._stale = time.time(), False

        live = self._datname.seen() | {OTHER}  # dropped databases' series end
        for total_key in [k for k in self._totals if k[0] not in live]:
            del self._totals[total_key]
        return [
            Sample(m.PINNING_RISK_CALLS, key, value) for key, value in sorted(self._totals.items())
        ]

    def _count(self, rows: Sequence[Any]) -> set[tuple[int, int, int]]:
        """Growth of every pinning entry since the last sample, into its row and the totals;
        returns the entries seen."""
        seen: set[tuple[int, int, int]] = set()
        for row in rows:
            key = (int(row["userid"]), int(row["dbid"]), int(row["queryid"]))
            seen.add(key)
            calls = float(row["calls"])
            stmt = self._statements.get(key[1:])
            if stmt is None:
                # Text not fetched yet (over the per-sample bound): keep its calls as the
                # baseline, so that once classified it adds what it grew by, not its whole
                # lifetime in one step (a fake spike in an existing series).
                self._calls.baseline(key, (calls,))
                continue
            if not stmt.reasons:
                continue
            (delta,) = self._calls.update(key, (calls,))
            entry = self._rows.setdefault(key, _Row(row["rolname"]))
            entry.role, entry.calls, entry.recent_calls = row["rolname"], calls, delta
            for reason in stmt.reasons if delta > 0 else ():
                total_key = (stmt.label, reason)
                self._totals[total_key] = self._totals.get(total_key, 0.0) + delta
        return seen

    def _forget(self, seen: set[tuple[int, int, int]]) -> None:
        """Entries gone from pg_stat_statements (evicted, reset): classify again if back."""
        self._calls.forget_missing(seen)
        for key in self._rows.keys() - seen:
            del self._rows[key]
        present = {key[1:] for key in seen}
        for stmt_key in self._statements.keys() - present:
            del self._statements[stmt_key]

    async def _classify(
        self, fetch: Fetch, texts_sql: str, rows: Sequence[Any], unknown: set[tuple[int, int]]
    ) -> None:
        wanted = sorted(unknown)[:MAX_NEW_PER_SAMPLE]
        try:
            texts = await fetch(texts_sql, sorted({q for _, q in wanted}))
        except TargetUnavailable as exc:
            if exc.sqlstate != TEXT_NOT_IN_ENCODING:
                raise
            self._note_texts(str(exc))  # unknown entries stay unclassified: tried again
            return
        self._note_texts("")
        datnames = {int(r["dbid"]): r["datname"] for r in rows}
        wanted_set = set(wanted)
        for row in texts:
            key = (int(row["dbid"]), int(row["queryid"]))
            if key not in wanted_set:
                continue
            self._statements[key] = self._statement(datnames.get(key[0], ""), row["query"])
            wanted_set.discard(key)
        for key in wanted_set:  # text not visible to this role, or gone meanwhile
            datname = datnames.get(key[0], "")
            self._statements[key] = _Statement(datname, self._datname(datname), frozenset())

    def _statement(self, datname: str, text: str) -> _Statement:
        stmt = _Statement(datname, self._datname(datname), pinning.classify(text))
        if stmt.reasons:
            shown = _shown(text)
            stmt.text, stmt.truncated = shown[:MAX_TEXT_CHARS], len(shown) > MAX_TEXT_CHARS
            stmt.text_bytes = len(text.encode("utf-8", "surrogatepass"))
            stmt.fingerprints = fingerprints.match(text)
        return stmt

    def _note_texts(self, error: str) -> None:
        """Say once when texts become unreadable, and when they can be read again."""
        if bool(error) == self._texts_unreadable:
            return
        self._texts_unreadable = bool(error)
        if error:
            log.warning(
                "pg_stat_statements holds a statement text that is not valid in this "
                "database's encoding (run in a SQL_ASCII database?): new statements cannot be "
                "classified until pg_stat_statements_reset(), or read from that database",
                extra=kv(err=error),
            )
        else:
            log.info("pg_stat_statements texts can be read again")

    def mark_stale(self) -> None:
        """The database source could not read pg_stat_statements (dropped, unusable): what
        `top_offenders()` reports is from `sampled_at`, and says so."""
        self._stale = True

    def top_offenders(self) -> list[dict[str, object]]:
        """The pinning statements with the most calls, per role and database, with their
        normalized text and the driver fingerprints they match (origin and documented fix),
        each marked `stale` when pg_stat_statements could not be read since `sampled_at`."""
        ranked = sorted(self._rows.items(), key=lambda item: (-item[1].calls, item[0]))
        out = []
        for (_, dbid, queryid), row in ranked[: self.top_n]:
            stmt = self._statements[(dbid, queryid)]
            out.append(
                {
                    "role": row.role,
                    "datname": stmt.datname,
                    "queryid": str(queryid),
                    "reasons": [r for r in pinning.REASONS if r in stmt.reasons],
                    "calls": row.calls,
                    "recent_calls": row.recent_calls,
                    "query": stmt.text,
                    "query_bytes": stmt.text_bytes,
                    "truncated": stmt.truncated,
                    "fingerprints": [fp.as_json() for fp in stmt.fingerprints],
                    "stale": self._stale,
                    "sampled_at": self.sampled_at,
                }
            )
        return out


def _shown(text: str) -> str:
    """The text a person may read: constants replaced by `$n`, registered secrets masked.
    Text the parser refuses is kept as pg_stat_statements has it, redacted."""
    with contextlib.suppress(ParseError):
        text = normalize(text)
    return redact(text)
