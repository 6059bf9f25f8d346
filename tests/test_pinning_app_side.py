"""What only the application can see of RDS Proxy's limits, from real apps on a real
PostgreSQL through the real daemon: statements over 16,384 bytes on the wire (a long IN list
and a large value through psycopg2, which binds parameters into the text; a wide SELECT
through asyncpg) counted per app and pool with the template's head and never a value, and an
engine whose connections pass libpq `options`, which the proxy refuses. Both reach the
pinning report, the landing page and `sqlalchemy_statements_oversized_total`."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from exporter.devtools.daemon_process import run_daemon
from pgpressure_sqlalchemy import flush, instrument
from pgpressure_sqlalchemy.proxy_checks import option_settings, statement_head
from pgpressure_sqlalchemy.wire import PROXY_MAX_STATEMENT_BYTES

CONFIG = "ingest:\n  enabled: true\n"
SECRET_VALUE = "s3cret-" + "x" * 20_000  # a parameter value: must never leave the app


def url(pg, driver: str) -> str:
    return pg.dsn().replace("postgresql://", f"postgresql+{driver}://", 1)


def app_entry(daemon, app: str, pool: str) -> dict:
    report = daemon.get("/api/v1/pinning-risk").json()
    found = [a for a in report["apps"] if (a["app"], a["pool"]) == (app, pool)]
    assert found, report["apps"]
    return found[0]


def oversized(daemon, app: str, pool: str) -> float | None:
    return daemon.value("sqlalchemy_statements_oversized_total", app=app, pool=pool)


@pytest.mark.slow
def test_psycopg2_long_in_list_and_large_value_are_counted_without_values(pg):
    app = "big-" + uuid.uuid4().hex[:6]
    with run_daemon(CONFIG) as daemon:
        engine = sa.create_engine(url(pg, "psycopg2"), pool_size=2)
        instrument(engine, app=app, pool="main", endpoint=daemon.url, interval=0.2)
        ids = list(range(100_000, 103_000))  # 3,000 ids: about 20 KB of text with them bound
        query = sa.text("SELECT count(*) FROM generate_series(1, 10) g WHERE g IN :ids")
        query = query.bindparams(sa.bindparam("ids", expanding=True))
        with engine.connect() as conn:
            assert conn.execute(query, {"ids": ids}).scalar() == 0
            # a short template with one large value: small in the database, large on the wire
            assert conn.execute(sa.text("SELECT length(:v)"), {"v": SECRET_VALUE}).scalar()
            conn.execute(
                sa.text("SELECT 1 WHERE 1 IN :few").bindparams(sa.bindparam("few", expanding=True)),
                {"few": [1, 2, 3]},
            )
        flush()
        daemon.wait_for(lambda: oversized(daemon, app, "main") == 2)

        entry = app_entry(daemon, app, "main")
        heads = {ex["head"]: ex["bytes"] for ex in entry["oversized_examples"]}
        assert len(heads) == 2, heads
        in_list = next(h for h in heads if "IN (" in h)
        assert in_list.startswith("SELECT count(*) FROM generate_series(1, 10) g WHERE g IN (")
        assert "%(ids_1)s" in in_list and "100000" not in in_list  # the template, not the ids
        assert heads[in_list] > PROXY_MAX_STATEMENT_BYTES
        value = next(h for h in heads if "length" in h)
        assert value == "SELECT length(%(v)s)" and heads[value] > 20_000
        assert [w["id"] for w in entry["warnings"]] == ["statement_over_16kb"]
        assert entry["connect_options"] == []

        page = daemon.get("/").text
        assert "SELECT length(%(v)s)" in page and "Seen by the apps" in page
        everything = page + daemon.get("/api/v1/pinning-risk").text + daemon.metrics_text()
        assert "s3cret" not in everything and "100001, 100002" not in everything  # the bound ids
        fingerprints = daemon.get("/api/v1/pinning-risk").json()["fingerprints"]
        assert {fp["id"]: fp["calls"] for fp in fingerprints}["statement_over_16kb"] == 2
        engine.dispose()


@pytest.mark.slow
def test_asyncpg_wide_select_is_counted_with_its_head(pg):
    app = "wide-" + uuid.uuid4().hex[:6]
    columns = ", ".join(f"{i} AS a_rather_long_column_name_{i}" for i in range(500))
    wide = f"SELECT {columns}"
    assert len(wide.encode()) > PROXY_MAX_STATEMENT_BYTES

    async def run(endpoint: str) -> None:
        engine = create_async_engine(url(pg, "asyncpg"))
        instrument(engine, app=app, pool="async", endpoint=endpoint, interval=0.2)
        async with engine.connect() as conn:
            row = (await conn.execute(sa.text(wide))).one()
            assert row[499] == 499
            await conn.execute(sa.text("SELECT 1"))
        await engine.dispose()

    with run_daemon(CONFIG) as daemon:
        asyncio.run(run(daemon.url))
        flush()
        daemon.wait_for(lambda: oversized(daemon, app, "async") == 1)
        entry = app_entry(daemon, app, "async")
        [example] = entry["oversized_examples"]
        assert example["head"] == statement_head(wide)
        assert example["head"].startswith("SELECT 0 AS a_rather_long_column_name_0, 1 AS")
        assert example["bytes"] == len(wide.encode())


@pytest.mark.slow
def test_libpq_options_in_connect_args_are_reported_with_the_fix(pg):
    app = "opts-" + uuid.uuid4().hex[:6]
    with run_daemon(CONFIG) as daemon:
        engine = sa.create_engine(
            url(pg, "psycopg2"), connect_args={"options": "-c statement_timeout=5000"}
        )
        plain = sa.create_engine(url(pg, "psycopg"))
        instrument(engine, app=app, pool="opts", endpoint=daemon.url, interval=0.2)
        instrument(plain, app=app, pool="plain", endpoint=daemon.url, interval=0.2)
        for e in (engine, plain):
            with e.connect() as conn:
                timeout = conn.execute(sa.text("SHOW statement_timeout")).scalar()
                assert timeout == ("5s" if e is engine else "0")
        flush()
        daemon.wait_for(lambda: oversized(daemon, app, "plain") == 0)
        entry = app_entry(daemon, app, "opts")
        assert entry["connect_options"] == ["statement_timeout"]
        [warning] = entry["warnings"]
        assert warning["id"] == "libpq_options" and "ALTER ROLE" in warning["fix"]
        assert oversized(daemon, app, "opts") == 0
        report = daemon.get("/api/v1/pinning-risk").json()
        assert not [a for a in report["apps"] if a["pool"] == "plain"]  # nothing to say
        page = daemon.get("/").text
        assert "statement_timeout" in page and "5000" not in page
        engine.dispose()
        plain.dispose()


# --- pure logic ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cargs", "cparams", "names"),
    [
        ((), {"options": "-c statement_timeout=5000 -c lock_timeout=2s"},
         ["statement_timeout", "lock_timeout"]),
        ((), {"options": "--search_path=app"}, ["search_path"]),
        (("host=db options='-c TimeZone=UTC' dbname=x",), {}, ["timezone"]),
        ((), {"dsn": "postgresql://h/db?options=-c%20work_mem%3D64MB&sslmode=require"},
         ["work_mem"]),
        ((), {"options": "-j"}, ["options"]),
        ((), {"options": ""}, []),
        ((), {"host": "db", "application_name": "orders"}, []),
    ],
)  # fmt: skip
def test_option_settings_names_what_libpq_options_would_set(cargs, cparams, names):
    assert option_settings(cargs, cparams) == names


def test_statement_head_keeps_the_template_and_hides_literals():
    assert statement_head("SELECT\n  a,\n\tb FROM t WHERE c = 'secret'") == (
        "SELECT a, b FROM t WHERE c = '?'"
    )
    assert statement_head("SELECT 1\x00\x1b --\x7f") == "SELECT 1 --"
    cut = statement_head("SELECT '" + "x" * 1000 + "'")
    assert cut == "SELECT '?'"  # a literal the head cuts off is hidden all the same
