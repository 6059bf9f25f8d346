"""Every pinning fingerprint, produced by the real driver against a real PostgreSQL, attributed
to it with its documented fix - and the fix checked to remove it; the monitoring role's own
statements never in the report. Then the proxy's log lines as AWS writes them, through the AWS
emulator's log group: a warning is not a pin, an unknown reason is kept, a Digest names its
pinning-risk row, and a proxy that pins with a log group quiet for 24 hours (emulated time)
says that enhanced logging is off."""

from __future__ import annotations

import html
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import asyncpg
import psycopg
import psycopg2
import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.ext.asyncio import create_async_engine

from exporter import metrics as m
from exporter.aws.rds_proxy import RdsProxySource
from exporter.config import AwsConfig
from exporter.devtools.aws_emulator import (
    REGION,
    clients,
    create_proxy,
    create_subnets,
    moto_server,
    put_datapoints,
    put_log_lines,
    reset_moto,
)
from exporter.devtools.daemon_process import run_daemon
from exporter.http import pinning_section
from exporter.http.status import DaemonStatus, SourceStatus
from exporter.pinning import fingerprints, report
from exporter.pinning.risk import PinningRisk
from tests.conftest import MONITOR_PASSWORD

APP = "drv_app"


@pytest.fixture(scope="module")
def app_role(pg) -> str:
    pg.psql(
        f"DO $$ BEGIN CREATE ROLE {APP} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    )
    return APP


@pytest.fixture
def db(pg, fresh_db, app_role) -> str:
    """A fresh database with an enum (a type asyncpg must introspect) and a table."""
    pg.psql(
        "CREATE TYPE mood AS ENUM ('calm', 'busy'); CREATE TABLE t (id int, m mood);"
        "INSERT INTO t VALUES (1, 'calm'), (2, 'busy');"
        f"GRANT ALL ON t TO {app_role}",
        dbname=fresh_db,
    )
    return fresh_db


class Observer:
    """The daemon's side: the `monitor` role (pg_monitor only) reading the pinning-risk
    report, and an admin connection that resets pg_stat_statements between steps."""

    def __init__(self, monitor: asyncpg.Connection, admin: asyncpg.Connection) -> None:
        self.monitor, self.admin = monitor, admin

    async def reset(self) -> None:
        await self.admin.execute("SELECT pg_stat_statements_reset()")

    async def rows(self) -> list[dict]:
        """The pinning-risk rows; the daemon first does what pgpressure itself does through
        asyncpg (introspect a type, so set_config('jit') runs as `monitor`)."""
        await self.monitor.fetch("SELECT $1::bigint[]", [1])
        risk = PinningRisk(top_n=100)
        await risk.sample(self.monitor.fetch)
        rows = risk.top_offenders()
        assert "monitor" not in {row["role"] for row in rows}  # never the daemon's own
        return rows


@pytest.fixture
async def observer(pg, db) -> AsyncIterator[Observer]:
    admin = await asyncpg.connect(pg.dsn(dbname=db))
    monitor = await asyncpg.connect(pg.dsn(user="monitor", password=MONITOR_PASSWORD, dbname=db))
    obs = Observer(monitor, admin)
    await obs.reset()
    try:
        yield obs
    finally:
        await monitor.close()
        await admin.close()


def by_fingerprint(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        for fp in row["fingerprints"]:
            out.setdefault(fp["id"], []).append(row)
    return out


def fix_of(rows: list[dict], fp_id: str) -> str:
    return next(fp["fix"] for row in rows for fp in row["fingerprints"] if fp["id"] == fp_id)


# --- asyncpg, bare --------------------------------------------------------------------------


class NoResetConnection(asyncpg.Connection):
    """asyncpg's documented way to change the reset query: subclass, pass as
    connection_class. This application keeps no session state, so nothing to reset."""

    def get_reset_query(self) -> str:
        return ""


async def test_asyncpg_introspection_and_pool_reset_are_attributed_with_their_fix(
    pg, db, observer
) -> None:
    pool = await asyncpg.create_pool(pg.dsn(user=APP, dbname=db), min_size=1, max_size=1)
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT m FROM t WHERE m = $1::mood", "busy") == "busy"
    await pool.close()  # the release ran the reset query

    rows = await observer.rows()
    found = by_fingerprint(rows)
    jit = found["asyncpg_introspection_jit"]
    assert {row["role"] for row in jit} == {APP} and {row["datname"] for row in jit} == {db}
    assert any("current_setting" in row["query"] for row in jit)  # turns JIT off...
    assert any("current_setting" not in row["query"] for row in jit)  # ...and back on
    assert "documents no option" in fix_of(rows, "asyncpg_introspection_jit")
    reset = {row["query"] for row in found["asyncpg_reset_query"]}
    assert reset == {"SELECT pg_advisory_unlock_all()", "RESET ALL"}
    assert "get_reset_query" in fix_of(rows, "asyncpg_reset_query")

    # The documented fixes, checked: a Connection subclass with its own reset query leaves no
    # reset statement; jit=off from the start leaves the first set_config, as the fix says.
    await observer.reset()
    pool = await asyncpg.create_pool(
        pg.dsn(user=APP, dbname=db),
        min_size=1,
        max_size=1,
        connection_class=NoResetConnection,
        server_settings={"jit": "off"},
    )
    async with pool.acquire() as conn:
        await conn.fetchval("SELECT m FROM t WHERE m = $1::mood", "busy")
    await pool.close()
    found = by_fingerprint(await observer.rows())
    assert "asyncpg_reset_query" not in found
    assert [("current_setting" in r["query"]) for r in found["asyncpg_introspection_jit"]] == [True]


async def test_asyncpg_session_state_vs_its_transaction_scoped_twins(pg, db, observer) -> None:
    conn = await asyncpg.connect(pg.dsn(user=APP, dbname=db))
    try:
        await conn.execute("SET lock_timeout = '2s'")
        await conn.execute("SELECT pg_advisory_lock(42)")
        await conn.execute("SELECT pg_advisory_unlock(42)")
        async with conn.transaction():  # what the fixes say to use instead
            await conn.execute("SET LOCAL lock_timeout = '2s'")
            await conn.execute("SELECT pg_advisory_xact_lock(42)")
    finally:
        await conn.close()
    rows = await observer.rows()
    found = by_fingerprint(rows)
    assert [r["query"] for r in found["session_set"]] == ["SET lock_timeout = $1"]
    assert "SET LOCAL" in fix_of(rows, "session_set")
    locks = {r["query"] for r in found["session_advisory_lock"]}
    assert locks == {"SELECT pg_advisory_lock($1)", "SELECT pg_advisory_unlock($1)"}
    assert "pg_advisory_xact_lock" in fix_of(rows, "session_advisory_lock")
    texts = " ".join(r["query"] for r in rows)
    assert "LOCAL" not in texts and "xact" not in texts  # the twins do not pin


async def test_asyncpg_named_prepared_statements_and_statement_cache_size_0(pg, db) -> None:
    names = []
    for kwargs in ({}, {"statement_cache_size": 0}):
        conn = await asyncpg.connect(pg.dsn(user=APP, dbname=db), **kwargs)
        try:
            await conn.fetch("SELECT id FROM t WHERE id = $1", 1)
            names.append(
                [r["name"] for r in await conn.fetch("SELECT name FROM pg_prepared_statements")]
            )
        finally:
            await conn.close()
    cached, fixed = names
    assert cached and {fingerprints.driver_of_prepared_statement(n) for n in cached} == {"asyncpg"}
    assert fixed == []
    (fp,) = fingerprints.for_log_reason("A parse message was detected.")
    assert fp is fingerprints.NAMED_PREPARED and "statement_cache_size=0" in fp.fix


# --- asyncpg under SQLAlchemy -------------------------------------------------------------------


async def test_sqlalchemy_asyncpg_dialect(pg, db, observer) -> None:
    url = pg.dsn(user=APP, dbname=db).replace("postgresql://", "postgresql+asyncpg://")
    engine = create_async_engine(url)

    @event.listens_for(engine.sync_engine, "connect", insert=True)
    def set_search_path(dbapi_connection, connection_record) -> None:
        # SQLAlchemy's documented recipe "Setting Alternate Search Paths on Connect"
        existing_autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        cursor = dbapi_connection.cursor()
        cursor.execute("SET SESSION search_path='public'")
        cursor.close()
        dbapi_connection.autocommit = existing_autocommit

    async with engine.connect() as conn:
        result = await conn.execute(
            text("SELECT id FROM t WHERE m = CAST(:m AS mood)"), {"m": "busy"}
        )
        assert result.scalar() == 2
        prepared = (await conn.execute(text("SELECT name FROM pg_prepared_statements"))).all()
    await engine.dispose()

    rows = await observer.rows()
    found = by_fingerprint(rows)
    assert {r["role"] for r in found["asyncpg_introspection_jit"]} == {APP}
    assert [r["query"] for r in found["set_search_path"]] == ["SET SESSION search_path=$1"]
    assert "ALTER ROLE" in fix_of(rows, "set_search_path")
    assert "options" in fix_of(rows, "set_search_path")  # and why not the connection string
    # SQLAlchemy's pool rolls back on return; asyncpg's reset query is not sent
    assert "asyncpg_reset_query" not in found
    assert {fingerprints.driver_of_prepared_statement(name) for (name,) in prepared} == {"asyncpg"}

    # the documented fix leaves no named prepared statement
    fixed = create_async_engine(
        url + "?prepared_statement_cache_size=0", connect_args={"statement_cache_size": 0}
    )
    async with fixed.connect() as conn:
        for _ in range(3):
            await conn.execute(text("SELECT id FROM t WHERE id = :i"), {"i": 1})
        assert (await conn.execute(text("SELECT name FROM pg_prepared_statements"))).all() == []
    await fixed.dispose()


# --- psycopg 3 --------------------------------------------------------------------------------


async def test_psycopg3_prepare_threshold_and_with_hold_cursors(pg, db, observer) -> None:
    dsn = pg.dsn(user=APP, dbname=db)
    for threshold, expected in ((2, {"psycopg 3"}), (None, set())):
        with psycopg.connect(dsn, prepare_threshold=threshold) as conn:
            for _ in range(4):
                conn.execute("SELECT id FROM t WHERE id = %s", (1,))
            names = [name for (name,) in conn.execute("SELECT name FROM pg_prepared_statements")]
        assert {fingerprints.driver_of_prepared_statement(n) for n in names} == expected
    assert "prepare_threshold=None" in fingerprints.NAMED_PREPARED.fix

    with psycopg.connect(dsn) as conn:
        with conn.cursor("held", withhold=True) as cur:
            cur.execute("SELECT id FROM t")
            cur.fetchall()
        conn.commit()
        with conn.cursor("plain") as cur:  # the fix: withhold=False, read in its transaction
            cur.execute("SELECT id FROM t")
            cur.fetchall()
        conn.commit()
        conn.execute("SET TIME ZONE 'UTC'")
    rows = await observer.rows()
    found = by_fingerprint(rows)
    assert [r["query"] for r in found["cursor_with_hold"]] == [
        'DECLARE "held" CURSOR WITH HOLD FOR SELECT id FROM t'
    ]
    assert "withhold=False" in fix_of(rows, "cursor_with_hold")
    plain = [r for r in rows if r["query"].startswith('DECLARE "plain"')]
    assert plain and plain[0]["fingerprints"] == []  # a cursor, but no known fingerprint
    assert [r["query"] for r in found["set_time_zone"]] == ["SET TIME ZONE $1"]
    assert "ALTER ROLE" in fix_of(rows, "set_time_zone")


# --- psycopg2 ------------------------------------------------------------------------------------


async def test_psycopg2_client_encoding_and_named_cursors(pg, db, observer) -> None:
    url = pg.dsn(user=APP, dbname=db).replace("postgresql://", "postgresql+psycopg2://")
    engine = create_engine(url, client_encoding="latin1")  # psycopg2's set_client_encoding()
    with engine.connect() as conn:
        assert conn.execute(text("SHOW client_encoding")).scalar() == "LATIN1"
    engine.dispose()
    raw = psycopg2.connect(pg.dsn(user=APP, dbname=db))
    try:
        cur = raw.cursor("held2", withhold=True)
        cur.execute("SELECT id FROM t")
        cur.fetchall()
        raw.commit()
        cur.close()
    finally:
        raw.close()
    rows = await observer.rows()
    found = by_fingerprint(rows)
    assert [r["query"] for r in found["set_client_encoding"]] == ["SET client_encoding TO $1"]
    assert "?client_encoding=" in fix_of(rows, "set_client_encoding")
    assert [r["query"] for r in found["cursor_with_hold"]] == [
        'DECLARE "held2" CURSOR WITH HOLD FOR SELECT id FROM t'
    ]

    # SQLAlchemy's other documented way: libpq's client_encoding, no SET
    await observer.reset()
    engine = create_engine(url + "?client_encoding=latin1")
    with engine.connect() as conn:
        assert conn.execute(text("SHOW client_encoding")).scalar() == "LATIN1"
    engine.dispose()
    assert "set_client_encoding" not in by_fingerprint(await observer.rows())


# --- the proxy's log lines, through the AWS emulator -------------------------------------------

T0 = float(math.floor(time.time()))
DAY = 24 * 3600.0
DELAY = 120.0
PROXY = "orders-proxy"

_PINNED = (
    "The client session was pinned to the database connection [dbConnection={d}] for the "
    "remainder of the session. The proxy can't reuse this connection until the session ends. "
    "Reason: {reason}"
)
_WARNED = (
    "If this prepared statement runs, the client session will be pinned to the database "
    "connection [dbConnection={d}]. Reason: {reason}"
)
_SETTINGS = (
    "SQL changed session settings that the proxy doesn't track. Consider moving session "
    'configuration to the proxy\'s initialization query. Digest: "{digest}".'
)
RESET_DIGEST = "select pg_advisory_unlock_all(); close all; unlisten *; reset all;"
LINES = [
    # with and without [proxyEndpoint=...]
    "[WARN] [proxyEndpoint=default] [clientConnection=1] "
    + _PINNED.format(d=11, reason="A parse message was detected."),
    "[WARN] [clientConnection=2] " + _PINNED.format(d=12, reason="A parse message was detected."),
    "[WARN] [clientConnection=3] "
    + _PINNED.format(d=13, reason=_SETTINGS.format(digest="set search_path = $1; set names $2;")),
    "[WARN] [proxyEndpoint=default] [clientConnection=4] "
    + _PINNED.format(d=14, reason=_SETTINGS.format(digest=RESET_DIGEST)),
    "[WARN] [clientConnection=5] "
    + _PINNED.format(
        d=15,
        reason="SQL changed session settings that the proxy doesn't track. "
        'Digest: "set extra_float_digits = $1".',
    ),
    "[WARN] [clientConnection=6] "
    + _PINNED.format(
        d=16, reason="The connection ran a SQL query which exceeded the 16384 byte limit."
    ),
    # a warning, not a pin
    "[INFO] [proxyEndpoint=default] [clientConnection=7] "
    + _WARNED.format(d=17, reason="A parse message was detected."),
    # a reason nobody has seen yet, twice
    "[WARN] [clientConnection=8] " + _PINNED.format(d=18, reason="The moon was full."),
    "[WARN] [clientConnection=9] " + _PINNED.format(d=19, reason="The moon was full."),
    # chatter
    "[INFO] [proxyEndpoint=default] A new client connected from 10.0.1.17:52344.",
]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def aws(moto_url):
    reset_moto(moto_url)
    world = clients(moto_url, "ec2", "rds", "cloudwatch", "logs")
    create_proxy(world["rds"], PROXY, create_subnets(world["ec2"], REGION))
    return world


def make_source(url: str, clock: Clock) -> RdsProxySource:
    config = AwsConfig(
        region=REGION,
        endpoint_url=url,
        access_key_id="AKIAPGPRESSUREDRV001",
        secret_access_key="pgpressure-drivers-test-secret",
        rds_proxy={"enabled": True, "interval": 60, "delay": DELAY, "proxies": [PROXY]},
    )
    return RdsProxySource(config, clock=clock, log_call_spacing=0)


def put_pinned(cw, now: float, pinned: float) -> None:
    """The proxy's connections and pinned connections, in the minute a poll at `now` reads."""
    minute = datetime.fromtimestamp(math.floor((now - DELAY) / 60) * 60 - 60, UTC)
    put_datapoints(cw, PROXY, "DatabaseConnections", [6.0], minute)
    put_datapoints(cw, PROXY, "DatabaseConnectionsCurrentlySessionPinned", [pinned], minute)


def by_spec(samples, spec) -> dict[tuple[str, ...], float]:
    return {s.labels: s.value for s in samples if s.spec is spec}


async def test_log_lines_as_aws_writes_them(aws, moto_url, pg, db, observer, caplog) -> None:
    put_log_lines(aws["logs"], PROXY, LINES, T0 - 60)
    put_pinned(aws["cloudwatch"], T0, 3.0)
    source = make_source(moto_url, Clock(T0))
    caplog.set_level(logging.WARNING, logger="pgpressure.rds_proxy")
    samples = list(await source.sample())

    pins = {k[1]: v for k, v in by_spec(samples, m.RDS_PROXY_PINNING_EVENTS).items() if v}
    assert pins == {
        "prepared_statement": 2.0,
        "session_settings": 3.0,
        "statement_too_large": 1.0,
        "unknown": 2.0,
    }
    would = {k[1]: v for k, v in by_spec(samples, m.RDS_PROXY_WOULD_PIN_EVENTS).items() if v}
    assert would == {"prepared_statement": 1.0}  # the warning, apart, never a pin
    unknown = [r for r in caplog.records if "does not know" in r.getMessage()]
    assert len(unknown) == 1 and unknown[0].fields["reason"] == "The moon was full."

    (status,) = source.status()["proxies"]
    seen = status["pinning_log"]
    assert seen["pins_by_fingerprint"] == {
        "named_prepared_statements": 2.0,
        "set_search_path": 1.0,
        "set_client_encoding": 1.0,
        "asyncpg_reset_query": 1.0,
        "session_set": 1.0,
        "statement_over_16kb": 1.0,  # the size reason names its fingerprint by itself
    }
    by_digest = {s["digest"]: s for s in seen["pins_by_statement"]}
    assert by_digest[RESET_DIGEST]["fingerprints"] == ["asyncpg_reset_query"]

    # The Digest names its statement in the pinning-risk report of a real database, where
    # an asyncpg pool ran the same reset query.
    pool = await asyncpg.create_pool(pg.dsn(user=APP, dbname=db), min_size=1, max_size=1)
    async with pool.acquire() as conn:
        await conn.fetchval("SELECT 1")
    await pool.close()
    offenders = {"main": await observer.rows()}
    named = {s["digest"]: s for s in report.name_log_pins(seen["pins_by_statement"], offenders)}
    rows = named[RESET_DIGEST]["statements"]
    assert {(r["target"], r["role"], r["datname"]) for r in rows} == {("main", APP, db)}
    assert len(rows) == 2  # SELECT pg_advisory_unlock_all() and RESET ALL
    summary = {
        s["id"]: s for s in report.fingerprint_summary(offenders, seen["pins_by_fingerprint"])
    }
    assert summary["asyncpg_reset_query"]["roles"] == [APP]
    assert summary["asyncpg_reset_query"]["pins"] == 1.0 and summary["asyncpg_reset_query"]["fix"]
    assert summary["named_prepared_statements"]["pins"] == 2.0


async def test_a_pinning_proxy_with_a_quiet_log_group_says_logging_is_off(
    aws, moto_url, caplog
) -> None:
    """Enhanced logging turns itself off after 24 hours: the log group stays and gets no more
    pinning lines while CloudWatch still counts pinned connections."""
    line = "[WARN] [clientConnection=1] " + _PINNED.format(
        d=1, reason="A parse message was detected."
    )
    # emulated days in the past: the emulator, like AWS, refuses log lines from the future
    start = T0 - 2 * DAY - 3600
    put_log_lines(aws["logs"], PROXY, [line], start - 60)
    clock = Clock(start)
    source = make_source(moto_url, clock)
    caplog.set_level(logging.INFO, logger="pgpressure.rds_proxy")

    def poll_state(samples) -> tuple[float | None, str]:
        silent = by_spec(samples, m.RDS_PROXY_PINNING_LOGS_SILENT).get((PROXY,))
        return silent, source.status()["proxies"][0]["logs"]

    put_pinned(aws["cloudwatch"], clock.now, 3.0)
    assert poll_state(list(await source.sample())) == (0.0, "reading")

    clock.now = start + DAY - 120  # quiet for just under a day: not yet
    put_pinned(aws["cloudwatch"], clock.now, 3.0)
    assert poll_state(list(await source.sample())) == (0.0, "reading")

    clock.now = start + DAY + 60
    put_pinned(aws["cloudwatch"], clock.now, 3.0)
    silent, state = poll_state(list(await source.sample()))
    assert silent == 1.0 and state.startswith("silent: no pinning lines for 24 h")
    # ... and the landing page's pinning section says so, for this proxy
    status = SourceStatus("rds_proxy", "", True, 3, clock.now, "", source.status())
    page = pinning_section.section({}, DaemonStatus((), (status,), None))
    assert f'data-proxy="{PROXY}"' in page and "silent: no pinning lines for 24 h" in page
    warned = [r for r in caplog.records if "enhanced logging is probably off" in r.getMessage()]
    assert len(warned) == 1 and warned[0].fields["proxy"] == PROXY

    clock.now += 60  # still silent: said once, not every poll
    put_pinned(aws["cloudwatch"], clock.now, 3.0)
    assert poll_state(list(await source.sample()))[0] == 1.0
    assert len([r for r in caplog.records if "probably off" in r.getMessage()]) == 1

    clock.now += 60  # nothing pinned: quiet logs are expected, not silent
    put_pinned(aws["cloudwatch"], clock.now, 0.0)
    assert poll_state(list(await source.sample())) == (0.0, "reading")

    clock.now += 60  # pinned again, and the logs speak again: not silent
    put_pinned(aws["cloudwatch"], clock.now, 3.0)
    put_log_lines(aws["logs"], PROXY, [line], clock.now - 30, create=False)
    samples = list(await source.sample())
    assert poll_state(samples) == (0.0, "reading")
    assert by_spec(samples, m.RDS_PROXY_PINNING_EVENTS)[(PROXY, "prepared_statement")] == 2.0


async def test_the_pinning_report_names_log_side_pins_and_the_driver_fix(
    aws, moto_url, pg, db
) -> None:
    """GET /api/v1/pinning-risk of a running daemon: the proxy's log says asyncpg's reset
    query pinned; the report names who ran it (target, role, database, from
    pg_stat_statements) and the driver fingerprint with its fix."""
    pool = await asyncpg.create_pool(pg.dsn(user=APP, dbname=db), min_size=1, max_size=1)
    async with pool.acquire() as conn:
        await conn.fetchval("SELECT 1")
    await pool.close()
    reset = _PINNED.format(d=7, reason=_SETTINGS.format(digest=RESET_DIGEST))
    put_log_lines(aws["logs"], PROXY, [f"[WARN] [clientConnection=7] {reset}"], time.time() - 60)
    config = f"""
databases:
  - name: main
    dsn: {pg.dsn(user="monitor", password=MONITOR_PASSWORD, dbname=db)}
    vcpus: 2
    statements: {{enabled: true, interval: 1s}}
ingest: {{enabled: false}}
aws:
  region: {REGION}
  endpoint_url: {moto_url}
  access_key_id: AKIAPGPRESSUREDRV002
  secret_access_key: pgpressure-drivers-report-secret
  rds_proxy: {{enabled: true, interval: 2s, delay: {DELAY}s, proxies: [{PROXY}]}}
"""

    def reset_pins() -> list[dict]:
        found = daemon.get("/api/v1/pinning-risk").json()
        statements = found["proxies"].get(PROXY, {}).get("statements", [])
        rows = [s for s in statements if s["digest"] == RESET_DIGEST and s["statements"]]
        return rows and (rows, found["fingerprints"])

    with run_daemon(config) as daemon:
        rows, summary = daemon.wait_for(reset_pins, timeout=30)
        page = daemon.get("/").text
    # the landing page shows the fingerprint with its fix, and the proxy's log state
    row = page.split('data-fingerprint="asyncpg_reset_query"', 1)[1].split("</tr>", 1)[0]
    assert APP in row and html.escape(fingerprints.ASYNCPG_RESET.fix) in row
    assert f'data-proxy="{PROXY}"' in page
    named = {(r["target"], r["role"], r["datname"]) for r in rows[0]["statements"]}
    assert named == {("main", APP, db)}
    by_id = {fp["id"]: fp for fp in summary}
    assert by_id["asyncpg_reset_query"]["pins"] >= 1 and by_id["asyncpg_reset_query"]["fix"]
    assert APP in by_id["asyncpg_reset_query"]["roles"]
