"""Statements that would pin an RDS Proxy session: the classifier, the counts from a real
PostgreSQL workload read through pg_stat_statements (by role, without the monitoring role's own
statements), and the proxy's log lines as AWS writes them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from exporter import metrics as m
from exporter.pinning import fingerprints, logline
from exporter.pinning.risk import PinningRisk
from exporter.pinning.statements import MAX_STATEMENT_BYTES, REASONS, classify, primary
from tests.conftest import MONITOR_PASSWORD

ROOT = Path(__file__).resolve().parents[1]

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

APP_ROLE = "pin_app"


@pytest.fixture(scope="module")
def app_role(pg) -> str:
    """A login role for the application, apart from `monitor` (the daemon's role)."""
    pg.psql(
        f"DO $$ BEGIN CREATE ROLE {APP_ROLE} LOGIN; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    )
    return APP_ROLE


class Conns:
    """The app (its own role), the daemon (`monitor`, pg_monitor only) and an admin (to
    reset pg_stat_statements), each a real connection to one fresh database."""

    app: asyncpg.Connection
    monitor: asyncpg.Connection
    admin: asyncpg.Connection


@pytest.fixture
async def conns(pg, fresh_db, app_role) -> AsyncIterator[Conns]:
    pg.psql(
        f"CREATE SEQUENCE pin_seq; GRANT ALL ON SEQUENCE pin_seq TO {app_role}", dbname=fresh_db
    )
    c = Conns()
    c.admin = await asyncpg.connect(pg.dsn(dbname=fresh_db))
    c.monitor = await asyncpg.connect(
        pg.dsn(user="monitor", password=MONITOR_PASSWORD, dbname=fresh_db)
    )
    c.app = await asyncpg.connect(pg.dsn(user=app_role, dbname=fresh_db))
    await c.admin.execute("SELECT pg_stat_statements_reset()")
    try:
        yield c
    finally:
        for conn in (c.app, c.monitor, c.admin):
            await conn.close()


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


async def test_workload_counts_every_pinning_form_under_its_reason(conns, fresh_db) -> None:
    assert len(BIG.encode()) > MAX_STATEMENT_BYTES
    risk = PinningRisk()
    expected = await _run_workload(conns.app, 3)
    first = _by_reason(await risk.sample(conns.monitor.fetch), fresh_db)
    assert first == expected  # and nothing for SET LOCAL or pg_advisory_xact_lock

    more = await _run_workload(conns.app, 2)
    second = _by_reason(await risk.sample(conns.monitor.fetch), fresh_db)
    assert second == {r: expected[r] + more[r] for r in expected}

    offenders = risk.top_offenders()
    texts = " | ".join(o["query"] for o in offenders if o["datname"] == fresh_db)
    assert "SET statement_timeout = $1" in texts  # constants never shown (before PG 16
    assert "'5s'" not in texts  # pg_stat_statements keeps them for utility statements)
    assert "LOCAL" not in texts and "xact" not in texts
    top = offenders[0]
    assert set(top) >= {"role", "datname", "queryid", "reasons", "calls", "query", "query_bytes"}
    assert top["calls"] >= 5
    assert {o["role"] for o in offenders} == {APP_ROLE}
    big = next(o for o in offenders if o["reasons"] == ["statement_too_large"])
    assert big["query_bytes"] > MAX_STATEMENT_BYTES and big["truncated"]


async def test_rows_name_their_role_and_the_monitoring_role_is_left_out(
    conns, fresh_db, app_role
) -> None:
    """asyncpg - which the daemon itself reads through - turns JIT off for the session the
    first time a connection meets a type it must introspect (here bigint[]): a `set_config`
    that would pin. The app's is reported with its role; the daemon's own is not, unless
    asked for."""
    await conns.monitor.fetch("SELECT $1::bigint[]", [1])  # the daemon's own introspection
    await conns.app.fetch("SELECT $1::bigint[]", [1])
    await conns.app.execute("SET work_mem = '8MB'")

    def jit_roles(offenders: list[dict]) -> set[str]:
        return {
            o["role"]
            for o in offenders
            if any(fp["id"] == "asyncpg_introspection_jit" for fp in o["fingerprints"])
        }

    default = PinningRisk()
    await default.sample(conns.monitor.fetch)
    rows = default.top_offenders()
    assert jit_roles(rows) == {app_role}
    assert {(o["role"], o["datname"]) for o in rows} == {(app_role, fresh_db)}
    set_row = next(o for o in rows if o["query"].startswith("SET work_mem"))
    assert [fp["id"] for fp in set_row["fingerprints"]] == ["session_set"]
    assert "SET LOCAL" in set_row["fingerprints"][0]["fix"]

    everyone = PinningRisk(include_own=True)
    await everyone.sample(conns.monitor.fetch)
    assert jit_roles(everyone.top_offenders()) == {app_role, "monitor"}


async def test_counts_never_decrease_across_resets_and_evictions(conns, fresh_db) -> None:
    risk = PinningRisk()
    for _ in range(4):
        await conns.app.execute("SET work_mem = '8MB'")
    before = _by_reason(await risk.sample(conns.monitor.fetch), fresh_db)["session_settings"]
    assert before >= 4

    # A full reset empties the view: nothing new happened, so nothing is added...
    await conns.admin.execute("SELECT pg_stat_statements_reset()")
    after_reset = _by_reason(await risk.sample(conns.monitor.fetch), fresh_db)
    assert after_reset.get("session_settings") == before
    # ...and calls made after the reset are counted from zero, not lost or doubled.
    for _ in range(3):
        await conns.app.execute("SET work_mem = '8MB'")
    grown = _by_reason(await risk.sample(conns.monitor.fetch), fresh_db)["session_settings"]
    assert grown == before + 3


async def test_statements_classified_late_add_only_their_growth(conns, fresh_db, monkeypatch):
    """Texts are fetched for a bounded number of new statements per sample. One classified a
    few samples late must add the calls it grew by since it was first seen, not its whole
    lifetime in one step, which would be a fake spike in a series that already exists."""
    monkeypatch.setattr("exporter.pinning.risk.MAX_NEW_PER_SAMPLE", 1)
    risk = PinningRisk()
    await _run_workload(conns.app, 3)
    series = [_by_reason(await risk.sample(conns.monitor.fetch), fresh_db) for _ in range(25)]
    # One statement is classified per sample. Whatever the first sample counted, the
    # totals must not move while the app is idle and the rest are classified.
    assert all(s == series[0] for s in series), series
    # ...and new calls are counted exactly once they happen.
    more = await _run_workload(conns.app, 2)
    grown = _by_reason(await risk.sample(conns.monitor.fetch), fresh_db)
    assert {r: grown[r] - series[-1].get(r, 0.0) for r in more} == more


# --- the proxy's log lines -----------------------------------------------------------------

_WITH_ENDPOINT = "[WARN] [proxyEndpoint=default] [clientConnection=2125203372] "
_WITHOUT_ENDPOINT = "[WARN] [clientConnection=2125203372] "
_PINNED = (
    "The client session was pinned to the database connection [dbConnection=1953961465] for "
    "the remainder of the session. The proxy can't reuse this connection until the session "
    "ends. Reason: "
)
_SETTINGS = (
    "SQL changed session settings that the proxy doesn't track. Consider moving session "
    "configuration to the proxy's initialization query. Digest: "
)
_SETTINGS_SHORT = "SQL changed session settings that the proxy doesn't track. Digest: "

# (reason as written after "Reason: ", slug, digest)
REASON_TEXTS = [
    # verbatim from public reports
    ("A parse message was detected.", "prepared_statement", ""),
    (
        _SETTINGS + '"set search_path = $1; set names $2;".',
        "session_settings",
        "set search_path = $1; set names $2;",
    ),
    (
        _SETTINGS + '"select pg_advisory_unlock_all(); close all; unlisten *; reset all;".',
        "session_settings",
        "select pg_advisory_unlock_all(); close all; unlisten *; reset all;",
    ),
    (_SETTINGS_SHORT + '"set extra_float_digits = $1".', "session_settings", ""),
    (
        "The connection ran a SQL query which exceeded the 16384 byte limit.",
        "statement_too_large",
        "",
    ),
    # the generic settings reason is refined by its digest, the statement that pinned
    (_SETTINGS + '"select nextval($1)".', "sequence", "select nextval($1)"),
    (_SETTINGS + '"select pg_advisory_lock($1)".', "advisory_lock", ""),
    (_SETTINGS + '"create temp table t (a int)".', "temporary_object", ""),
    (_SETTINGS + '"listen orders".', "listen", ""),
    (_SETTINGS + '"select * from "Orders" where id = $1".', "session_settings", ""),
    # keyword matches for wordings reported but not verified
    ("A SET statement was detected.", "session_settings", ""),
    ("A temporary table was created.", "temporary_object", ""),
    ("A cursor was declared.", "cursor", ""),
    # nothing recognised: its own label, never a guess
    ("Something the proxy will say in a future version.", "unknown", ""),
    ("The session is blocked by the clock.", "unknown", ""),  # "lock" alone is not a lock
]


@pytest.mark.parametrize("envelope", [_WITH_ENDPOINT, _WITHOUT_ENDPOINT])
@pytest.mark.parametrize(("reason", "slug", "digest"), REASON_TEXTS)
def test_parses_pin_lines_as_aws_writes_them(envelope, reason, slug, digest) -> None:
    line = logline.parse(envelope + _PINNED + reason)
    assert line is not None and line.kind == logline.PIN
    assert line.reason == slug
    if digest:
        assert line.digest == digest
    assert line.endpoint == ("default" if "proxyEndpoint" in envelope else "")


def test_digest_keeps_quotes_inside_it() -> None:
    line = logline.parse(
        _WITH_ENDPOINT + _PINNED + _SETTINGS + '"select * from "Orders" where id = $1".'
    )
    assert line is not None and line.digest == 'select * from "Orders" where id = $1'
    assert line.reason_text == _SETTINGS.removesuffix(" Digest: ")


def test_a_pin_line_without_a_reason_is_unknown() -> None:
    line = logline.parse(_WITH_ENDPOINT + _PINNED.removesuffix(" Reason: "))
    assert line is not None and (line.kind, line.reason) == (logline.PIN, "unknown")


def test_the_prepared_statement_warning_is_a_would_pin_not_a_pin() -> None:
    warning = (
        "[INFO] [proxyEndpoint=default] [clientConnection=1] If this prepared statement runs, "
        "the client session will be pinned to the database connection [dbConnection=7]. "
        "Reason: A parse message was detected."
    )
    line = logline.parse(warning)
    assert line is not None
    assert (line.kind, line.reason) == (logline.WOULD_PIN, "prepared_statement")


def test_lines_that_are_not_about_pinning_are_ignored() -> None:
    assert logline.parse("[INFO] A new client connected from 10.0.1.17:52344.") is None
    assert logline.parse("") is None


# --- the fingerprint table and its documentation --------------------------------------------


@pytest.mark.parametrize("fp", fingerprints.FINGERPRINTS, ids=lambda fp: fp.id)
def test_every_fingerprint_has_a_cited_fix_and_is_in_the_runbook(fp) -> None:
    assert fp.origin and fp.fix and fp.docs
    assert all(url.startswith("https://") for url in fp.docs)
    assert fp.reason in REASONS
    runbook = (ROOT / "docs" / "runbooks.md").read_text()
    section = runbook.split("## RDSProxySessionPinningHigh", 1)[1].split("\n## ", 1)[0]
    assert f"`{fp.id}`" in section
    assert f"`{fp.id}`" in (ROOT / "docs" / "rds-proxy.md").read_text()
