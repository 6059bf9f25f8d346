"""The slower database sampler: temp-file spills, work_mem, and the top statements.

Temp bytes are the tell-tale of a work_mem too small for the sorts and hashes the app runs;
pg_stat_database says that it happens, pg_stat_statements says which statement does it.
Statements are exported as counters for the top-N by growth since the previous sample
(plus `other`), keyed by queryid; query text is never a label. Without pg_stat_statements,
or with one that cannot be read (created but not preloaded, an old version's columns, no
permission), the source says so once and keeps exporting the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from exporter import metrics as m
from exporter.config import DatabaseConfig
from exporter.core.cardinality import CappedCounters, LabelCap
from exporter.core.deltas import CumulativeDeltas
from exporter.core.source import Source
from exporter.logs import kv
from exporter.metrics import Sample
from exporter.pinning.risk import PinningRisk
from exporter.postgres.connection import TargetConnection, TargetUnavailable

log = logging.getLogger("pgpressure.database")

#: SQLSTATEs that mean "pg_stat_statements exists but cannot be read here": not loaded by
#: shared_preload_libraries (55000), columns of another version (42703), not on the
#: search_path (42P01, 42883), no permission (42501). Anything else is a real failure.
STATEMENTS_UNUSABLE = frozenset({"55000", "42703", "42P01", "42883", "42501"})

# How sessions ended is PostgreSQL 14+ (`sessions_abandoned`, `_fatal`, `_killed`): read
# through the row as JSON, so older servers answer NULL instead of failing the query.
SESSIONS_ENDED = ("abandoned", "fatal", "killed")
DATABASES = """
SELECT datname, temp_bytes, temp_files,
       (to_jsonb(d) ->> 'sessions_abandoned')::float8 AS abandoned,
       (to_jsonb(d) ->> 'sessions_fatal')::float8 AS fatal,
       (to_jsonb(d) ->> 'sessions_killed')::float8 AS killed,
       (SELECT setting::bigint * CASE unit WHEN 'kB' THEN 1024 WHEN 'MB' THEN 1048576
                                          WHEN '8kB' THEN 8192 ELSE 1 END
        FROM pg_settings WHERE name = 'work_mem') AS work_mem_bytes,
       to_regclass('pg_stat_statements') IS NOT NULL AS has_statements
FROM pg_stat_database d
WHERE datname IS NOT NULL
"""

# Rows are split by userid and toplevel; we sum them per (database, queryid). Without the
# texts (`pg_stat_statements(false)`): loading them is the view's expensive part, and one
# text not valid in this database's encoding (run in a SQL_ASCII database) fails the call.
STATEMENTS = """
SELECT d.datname, s.queryid, sum(s.calls)::float8 AS calls,
       sum(s.total_exec_time)::float8 / 1000 AS exec_seconds,
       sum(s.temp_blks_written)::float8 * current_setting('block_size')::int AS temp_bytes
FROM pg_stat_statements(false) s JOIN pg_database d ON d.oid = s.dbid
WHERE s.queryid IS NOT NULL
GROUP BY 1, 2
"""


class DatabaseSource(Source):
    name = "database"
    backoff_max = 15.0

    def __init__(self, config: DatabaseConfig, conn: TargetConnection, datnames: LabelCap) -> None:
        self.config = config
        self.conn = conn
        self.target = config.name
        self.interval = config.statements.interval
        self.scope = (("target", config.name),)
        self._datname = datnames
        self._temp_deltas = CumulativeDeltas()
        self._temp_totals: dict[str, list[float]] = {}  # datname label -> [bytes, files]
        self._ended: dict[str, float] = dict.fromkeys(SESSIONS_ENDED, 0.0)  # over databases
        self._ended_known = False  # PostgreSQL 14+ says how sessions ended
        top_n = config.statements.top_n
        self._temp = CappedCounters(top_n, other_key=("other", "other"))
        self._exec = CappedCounters(top_n, fields=2, rank_field=1, other_key=("other", "other"))
        self._deltas = CumulativeDeltas()
        self._statements_available: bool | None = None
        self.pinning: PinningRisk | None = None
        if config.statements.enabled and config.statements.pinning_risk:
            self.pinning = PinningRisk(
                top_n, datnames, include_own=config.statements.pinning_own_statements
            )

    async def sample(self) -> Iterable[Sample]:
        rows = await self.conn.fetch(DATABASES)
        # pg_stat_database lists every database: free the cap's slots of dropped ones.
        present = {row["datname"] for row in rows}
        for gone in self._datname.release_missing(present):
            self._temp_totals.pop(gone, None)
        for row in rows:
            name = row["datname"]
            ended = tuple(float(row[r] or 0.0) for r in SESSIONS_ENDED)
            self._ended_known = self._ended_known or row["abandoned"] is not None
            growth = self._temp_deltas.update(
                (name, 0), (float(row["temp_bytes"]), float(row["temp_files"]), *ended)
            )
            totals = self._temp_totals.setdefault(self._datname(name), [0.0, 0.0])
            totals[0] += growth[0]
            totals[1] += growth[1]
            for reason, n in zip(SESSIONS_ENDED, growth[2:], strict=True):
                self._ended[reason] += n
        self._temp_deltas.forget_missing({(name, 0) for name in present})
        # Settings and extension presence are the same on every row.
        has_statements = bool(rows and rows[0]["has_statements"])
        samples = [Sample(m.WORK_MEM_BYTES, (), float(rows[0]["work_mem_bytes"]))] if rows else []
        samples += [Sample(m.TEMP_BYTES, (db,), t[0]) for db, t in self._temp_totals.items()]
        samples += [Sample(m.TEMP_FILES, (db,), t[1]) for db, t in self._temp_totals.items()]
        if self._ended_known:
            samples += [Sample(m.SESSIONS_ENDED, (r,), n) for r, n in self._ended.items()]
        samples.append(Sample(m.INVALID_UTF8_STRINGS, (), float(self.conn.invalid_strings)))
        if self.config.statements.enabled:
            unusable = ""
            if has_statements:
                try:
                    statement_samples = await self._statements()
                    if self.pinning is not None:
                        statement_samples += await self.pinning.sample(self.conn.fetch)
                    samples += statement_samples
                except TargetUnavailable as exc:
                    if exc.sqlstate not in STATEMENTS_UNUSABLE:
                        raise
                    has_statements, unusable = False, str(exc)
            if not has_statements and self.pinning is not None:
                self.pinning.mark_stale()  # what it reports is from before
            self._note_statements(has_statements, unusable)
            samples.append(Sample(m.STATEMENTS_AVAILABLE, (), float(has_statements)))
        return samples

    def _note_statements(self, available: bool, error: str = "") -> None:
        if available != self._statements_available:
            if error:
                log.warning(
                    "pg_stat_statements cannot be read; statement metrics are off until it "
                    "can (is it in shared_preload_libraries?)",
                    extra=kv(target=self.target, err=error),
                )
            elif not available:
                log.warning(
                    "pg_stat_statements is not installed in the target database; statement "
                    "metrics are off until it is (CREATE EXTENSION pg_stat_statements)",
                    extra=kv(target=self.target),
                )
            elif self._statements_available is False:
                log.info("pg_stat_statements is available again", extra=kv(target=self.target))
            self._statements_available = available

    async def _statements(self) -> list[Sample]:
        rows = await self.conn.fetch(STATEMENTS)
        seen: set[tuple[str, int]] = set()
        for row in rows:
            key = (row["datname"], int(row["queryid"]))
            seen.add(key)
            calls, seconds, temp = self._deltas.update(
                key, (row["calls"], row["exec_seconds"], row["temp_bytes"])
            )
            labels = (self._datname(key[0]), str(key[1]))
            self._temp.add(labels, temp)
            self._exec.add(labels, calls, seconds)
        self._deltas.forget_missing(seen)
        self._temp.commit()
        self._exec.commit()
        out = [Sample(m.STATEMENT_TEMP_BYTES, key, v) for key, (v,) in self._temp.items()]
        for key, (calls, seconds) in self._exec.items():
            out.append(Sample(m.STATEMENT_CALLS, key, calls))
            out.append(Sample(m.STATEMENT_EXEC_SECONDS, key, seconds))
        return out

    def status(self) -> dict[str, object]:
        return {"pg_stat_statements": self._statements_available}
