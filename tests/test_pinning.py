"""Statements that would pin an RDS Proxy session: the classifier, and the counts from a real
PostgreSQL workload read through pg_stat_statements."""

from __future__ import annotations

import asyncpg
import pytest

from exporter import metrics as m
from exporter.pinning.risk import PinningRisk
from exporter.pinning.statements import MAX_STATEMENT_BYTES, REASONS, classify, log_reason, primary

# --- the classifier ----------------------------------------------------------------------

PINS = {
    "SET statement_timeout = '5s'": {"session_settings"},
    "SET statement_timeout = $1": {"session_settings"},  # PostgreSQL 16+ normalizes SET
    "SET SESSION search_path TO $1, $2": {"session_settings"},
    "set role reporting": {"session_settings"},
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY": {"session_settings"},
    "RESET search_path": {"session_settings"},
    "RESET ALL": {"session_settings"},
    "DISCARD ALL": {"session_settings"},
    "SELECT set_config($1, $2, $3)": {"session_settings"},
    "SELECT set_config('app.user', 'x', false)": {"session_settings"},
    "PREPARE p (int) AS SELECT $1": {"prepared_statement"},
    "EXECUTE p(1)": {"prepared_statement"},
    "DEALLOCATE ALL": {"prepared_statement"},
    "CREATE TEMP TABLE t (a int)": {"temporary_object"},
    "CREATE TEMPORARY TABLE t AS SELECT $1 AS a": {"temporary_object"},
    "SELECT 1 AS a INTO TEMP t": {"temporary_object"},
    "CREATE TEMP SEQUENCE s": {"temporary_object"},
    "CREATE TEMP VIEW v AS SELECT 1": {"temporary_object"},
    "CREATE TABLE pg_temp.t (a int)": {"temporary_object"},
    "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM pg_class": {"cursor"},
    "LISTEN orders": {"listen"},
    "LOAD 'auto_explain'": {"other"},
    "SELECT nextval($1)": {"sequence"},
    "SELECT pg_catalog.setval('s', $1)": {"sequence"},
    "INSERT INTO t (id) VALUES (nextval('t_id_seq'))": {"sequence"},
    "SELECT currval($1)": {"sequence"},
    "SELECT pg_advisory_lock($1)": {"advisory_lock"},
    "SELECT pg_try_advisory_lock($1, $2)": {"advisory_lock"},
    "SELECT pg_advisory_unlock_all()": {"advisory_lock"},
    "SELECT nextval($1), pg_advisory_lock($2)": {"sequence", "advisory_lock"},
    "WITH x AS (SELECT nextval('s') AS id) SELECT id FROM x": {"sequence"},
}

DOES_NOT_PIN = [
    "SET LOCAL lock_timeout = '1s'",
    "SET LOCAL statement_timeout = $1",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SELECT set_config('app.user', 'x', true)",
    "SELECT pg_advisory_xact_lock($1)",
    "SELECT pg_try_advisory_xact_lock($1)",
    "CREATE TABLE t (a int)",
    "CREATE UNLOGGED TABLE t (a int)",
    "SELECT * FROM orders WHERE id = $1 AND status = ANY($2)",
    "NOTIFY orders",
    "UNLISTEN *",
    "BEGIN",
    "COMMIT",
    "SELECT 'SET statement_timeout = 1' AS text_not_a_statement",
    # SET clauses that store defaults elsewhere: they do not touch this session
    "ALTER ROLE app SET search_path = app, public",
    "ALTER DATABASE shop SET work_mem = '64MB'",
    "ALTER SYSTEM SET work_mem = '64MB'",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = app AS 'SELECT 1'",
    "ALTER FUNCTION f() SET search_path = app",
]


@pytest.mark.parametrize("sql", sorted(PINS))
def test_classifies_pinning_statements(sql: str) -> None:
    assert classify(sql) == frozenset(PINS[sql])


@pytest.mark.parametrize("sql", DOES_NOT_PIN)
def test_transaction_scoped_and_plain_statements_do_not_pin(sql: str) -> None:
    assert classify(sql) == frozenset()


def test_size_threshold_counts_bytes_not_characters() -> None:
    head = "SELECT '"
    fits = head + "x" * (MAX_STATEMENT_BYTES - len(head) - 1) + "'"
    assert len(fits.encode()) == MAX_STATEMENT_BYTES
    assert classify(fits) == frozenset()
    # The same number of characters, some of them two bytes in UTF-8: over the limit.
    wide = head + "é" * 10 + "x" * (MAX_STATEMENT_BYTES - len(head) - 11) + "'"
    assert len(wide) == MAX_STATEMENT_BYTES
    assert classify(wide) == {"statement_too_large"}


def test_unparseable_text_falls_back_to_keywords() -> None:
    # e.g. a normalized statement the grammar does not accept with $n in that position
    assert classify("SET x TO (((") == {"session_settings"}
    assert classify("SELECT nextval(((") == {"sequence"}
    assert classify("SET LOCAL x TO (((") == frozenset()
    assert classify("this is not sql") == frozenset()


def test_classify_is_cached_and_primary_is_stable() -> None:
    sql = "SELECT pg_advisory_lock(42), nextval('s')"
    assert classify(sql) is classify(sql)
    assert primary(classify(sql)) == "advisory_lock"  # REASONS order
    assert primary(frozenset()) is None
    assert set(REASONS) >= {r for reasons in PINS.values() for r in reasons}


# --- the workload against a real PostgreSQL ----------------------------------------------

BIG = "SELECT " + ", ".join(f"{i} AS generated_column_alias_{i}" for i in range(1, 700))


async def _run_workload(conn: asyncpg.Connection, times: int) -> dict[str, int]:
    """Runs each form `times` times over the simple query protocol (no prepared statements,
    which asyncpg would otherwise use) and returns the expected count per reason."""
    for _ in range(times):
        await conn.execute("SET statement_timeout = '5s'")
        async with conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '1s'")
            await conn.execute("SELECT pg_advisory_xact_lock(7)")
        await conn.execute("SELECT nextval('pin_seq')")
        await conn.execute("SELECT pg_advisory_lock(8)")
        await conn.execute("SELECT pg_advisory_unlock(8)")
        await conn.execute("CREATE TEMP TABLE pin_tmp (a int)")
        await conn.execute("DROP TABLE pin_tmp")
        await conn.execute("LISTEN pin_channel")
        await conn.execute(BIG)
    return {
        "session_settings": times,
        "sequence": times,
        "advisory_lock": 2 * times,  # lock and unlock are both session-level
        "temporary_object": times,
        "listen": times,
        "statement_too_large": times,
    }


def _by_reason(samples: list, datname: str) -> dict[str, float]:
    out = {}
    for s in samples:
        assert s.spec is m.PINNING_RISK_CALLS
        if s.labels[0] == datname:
            out[s.labels[1]] = s.value
    return out


async def test_workload_counts_every_pinning_form_under_its_reason(pg, fresh_db) -> None:
    assert len(BIG.encode()) > MAX_STATEMENT_BYTES
    pg.psql("CREATE SEQUENCE pin_seq", dbname=fresh_db)
    monitor = await asyncpg.connect(pg.dsn(dbname=fresh_db))
    app = await asyncpg.connect(pg.dsn(dbname=fresh_db))
    try:
        # asyncpg introspects a type the first time it meets it, with a session-level
        # set_config('jit', 'off', false) - which would pin too, and be counted. Warm the
        # monitor's codec for bigint[] first so the counts below are the workload's alone.
        await monitor.fetch("SELECT $1::bigint[]", [1])
        await monitor.execute("SELECT pg_stat_statements_reset()")
        risk = PinningRisk()
        expected = await _run_workload(app, 3)
        first = _by_reason(await risk.sample(monitor.fetch), fresh_db)
        assert first == expected  # and nothing for SET LOCAL or pg_advisory_xact_lock

        more = await _run_workload(app, 2)
        second = _by_reason(await risk.sample(monitor.fetch), fresh_db)
        assert second == {r: expected[r] + more[r] for r in expected}

        offenders = risk.top_offenders()
        texts = " | ".join(o["query"] for o in offenders if o["datname"] == fresh_db)
        assert "SET statement_timeout = $1" in texts  # constants never shown (before PG 16
        assert "'5s'" not in texts  # pg_stat_statements keeps them for utility statements)
        assert "LOCAL" not in texts and "xact" not in texts
        top = offenders[0]
        assert set(top) >= {"datname", "queryid", "reasons", "calls", "query", "query_bytes"}
        assert top["calls"] >= 5
        big = next(o for o in offenders if o["reasons"] == ["statement_too_large"])
        assert big["query_bytes"] > MAX_STATEMENT_BYTES and big["truncated"]
    finally:
        await app.close()
        await monitor.close()


async def test_counts_never_decrease_across_resets_and_evictions(pg, fresh_db) -> None:
    monitor = await asyncpg.connect(pg.dsn(dbname=fresh_db))
    app = await asyncpg.connect(pg.dsn(dbname=fresh_db))
    try:
        risk = PinningRisk()
        for _ in range(4):
            await app.execute("SET work_mem = '8MB'")
        before = _by_reason(await risk.sample(monitor.fetch), fresh_db)["session_settings"]
        assert before >= 4

        # A full reset empties the view: nothing new happened, so nothing is added...
        await monitor.execute("SELECT pg_stat_statements_reset()")
        after_reset = _by_reason(await risk.sample(monitor.fetch), fresh_db)
        assert after_reset.get("session_settings") == before
        # ...and calls made after the reset are counted from zero, not lost or doubled.
        for _ in range(3):
            await app.execute("SET work_mem = '8MB'")
        grown = _by_reason(await risk.sample(monitor.fetch), fresh_db)["session_settings"]
        assert grown == before + 3
    finally:
        await app.close()
        await monitor.close()


async def test_statements_classified_late_add_only_their_growth(pg, fresh_db, monkeypatch):
    """Texts are fetched for a bounded number of new statements per sample. One classified a
    few samples late must add the calls it grew by since it was first seen, not its whole
    lifetime in one step, which would be a fake spike in a series that already exists."""
    monkeypatch.setattr("exporter.pinning.risk.MAX_NEW_PER_SAMPLE", 1)
    pg.psql("CREATE SEQUENCE pin_seq", dbname=fresh_db)
    monitor = await asyncpg.connect(pg.dsn(dbname=fresh_db))
    app = await asyncpg.connect(pg.dsn(dbname=fresh_db))
    try:
        await monitor.fetch("SELECT $1::bigint[]", [1])  # see the workload test
        await monitor.execute("SELECT pg_stat_statements_reset()")
        risk = PinningRisk()
        await _run_workload(app, 3)
        series = [_by_reason(await risk.sample(monitor.fetch), fresh_db) for _ in range(25)]
        # One statement is classified per sample. Whatever the first sample counted, the
        # totals must not move while the app is idle and the rest are classified.
        assert all(s == series[0] for s in series), series
        # ...and new calls are counted exactly once they happen.
        more = await _run_workload(app, 2)
        grown = _by_reason(await risk.sample(monitor.fetch), fresh_db)
        assert {r: grown[r] - series[-1].get(r, 0.0) for r in more} == more
    finally:
        await app.close()
        await monitor.close()


# --- the proxy's log lines -----------------------------------------------------------------

_LINE = (
    "[WARN] [proxyEndpoint=default] [clientConnection=2125203372] The client session was "
    "pinned to the database connection [dbConnection=1953961465] for the remainder of the "
    "session. The proxy can't reuse this connection until the session ends. Reason: "
)
_SETTINGS = (
    "SQL changed session settings that the proxy doesn't track. Consider moving session "
    "configuration to the proxy's initialization query. Digest: "
)

LOG_LINES = {
    _LINE + "A parse message was detected.": "prepared_statement",
    _LINE + "Running a prepared statement.": "prepared_statement",
    _LINE + "A SET statement was detected.": "session_settings",
    _LINE + _SETTINGS + '"set search_path to $1,$2,$3".': "session_settings",
    _LINE + _SETTINGS + '"set client_encoding to $1".': "session_settings",
    # the generic settings reason is refined by its digest, the statement that pinned
    _LINE + _SETTINGS + '"select nextval($1)".': "sequence",
    _LINE + _SETTINGS + '"select pg_advisory_lock($1)".': "advisory_lock",
    _LINE + _SETTINGS + '"create temp table t (a int)".': "temporary_object",
    _LINE + _SETTINGS + '"listen orders".': "listen",
    _LINE + "The statement text size exceeded 16384 bytes.": "statement_too_large",
    _LINE + "A temporary table was created.": "temporary_object",
    _LINE + "A cursor was declared.": "cursor",
    _LINE + "Something the proxy will say in a future version.": "other",
    _LINE + "The session is blocked by the clock.": "other",  # "lock" alone is not a lock
    _LINE.removesuffix(" Reason: "): "other",
}


@pytest.mark.parametrize("line", sorted(LOG_LINES))
def test_classifies_proxy_pinning_log_lines(line: str) -> None:
    assert log_reason(line) == LOG_LINES[line]


def test_lines_that_are_not_pins_are_not_counted() -> None:
    assert (
        log_reason(
            "[INFO] [proxyEndpoint=default] [clientConnection=1] If this prepared statement runs, "
            "the client session will be pinned. Reason: SQL changed session settings that the "
            "proxy doesn't track."
        )
        is None
    )
    assert log_reason("[INFO] A new client connected from 10.0.1.17:52344.") is None
