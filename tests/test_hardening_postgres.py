"""The PostgreSQL sources against what an outside probe did to them (issue 16): bytes that
are not valid UTF-8 in a statement and in a database's name, and a pinning-risk report that
outlived pg_stat_statements.

The hostile objects are made in the session cluster and removed afterwards, their
pg_stat_statements entries with them (one such entry fails every read of statement texts
from a UTF-8 database, other tests' included).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator

import psycopg2

from exporter.devtools.cluster import Cluster
from exporter.devtools.daemon_process import DaemonProcess, one_target_config, run_daemon
from tests.conftest import MONITOR_PASSWORD

ASCII_DB = "h16_ascii"
ODD_DB = b"h16_odd\xffname"  # not UTF-8: the byte 0xff
ODD_SHOWN = "h16_odd\ufffdname"
LISTEN = b'LISTEN "ch\xffan"'  # a statement that pins an RDS Proxy session, with 0xff in it
LISTEN_SHOWN = 'LISTEN "ch\ufffdan"'


def raw(pg: Cluster, sql: bytes, dbname: str = ASCII_DB) -> None:
    """Run `sql` as bytes, unconverted (client encoding SQL_ASCII), autocommit."""
    conn = psycopg2.connect(pg.dsn(dbname=dbname))
    try:
        conn.set_client_encoding("SQL_ASCII")
        conn.autocommit = True
        conn.cursor().execute(sql)
    finally:
        conn.close()


@contextlib.contextmanager
def hostile_databases(pg: Cluster) -> Iterator[None]:
    """A SQL_ASCII database where a pinning statement with 0xff ran, and a database named
    with 0xff that a session is connected to."""
    pg.psql(
        f"CREATE DATABASE {ASCII_DB} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' "
        "TEMPLATE template0"
    )
    session = None
    try:
        pg.psql("CREATE EXTENSION pg_stat_statements", dbname=ASCII_DB)
        raw(pg, b'CREATE DATABASE "' + ODD_DB + b'"')
        for _ in range(3):
            raw(pg, LISTEN)
        psql = [pg.bindir / "psql", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres"]
        session = subprocess.Popen(
            [*psql, b"-d", ODD_DB, "-c", "SELECT pg_sleep(600)"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        yield
    finally:
        if session is not None:
            session.kill()
            session.wait()
        with contextlib.suppress(psycopg2.Error):
            raw(pg, b'DROP DATABASE IF EXISTS "' + ODD_DB + b'" WITH (FORCE)')
        # Last, as the DROP above is one of them: every statement run in the SQL_ASCII
        # database (the odd one's were its pg_sleep and the pgpressure reads, all ASCII).
        pg.psql(
            "SELECT pg_stat_statements_reset(0, oid, 0) FROM pg_database "
            f"WHERE datname = '{ASCII_DB}'"
        )
        pg.psql(f"DROP DATABASE IF EXISTS {ASCII_DB} WITH (FORCE)")


def target(name: str, pg: Cluster, dbname: str) -> str:
    dsn = pg.dsn(user="monitor", password=MONITOR_PASSWORD, dbname=dbname)
    return f"""
  - name: {name}
    dsn: {dsn}
    vcpus: 2
    activity: {{interval: 1s}}
    statements: {{interval: 1s}}"""


def all_up(d: DaemonProcess) -> bool:
    up = {
        (ls["source"], ls["target"]): v
        for ls, v in d.metrics().get("pgpressure_source_up", [])
        if ls["source"] in ("activity", "database")
    }
    return len(up) == 4 and set(up.values()) == {1.0}


def odd_sessions(d: DaemonProcess) -> set[str]:
    """The targets whose pg_sessions show the odd database with a session in it."""
    return {
        ls["target"]
        for ls, v in d.metrics().get("pg_sessions", [])
        if ls["datname"] == ODD_SHOWN and v > 0
    }


def listen_rows(d: DaemonProcess, name: str) -> list[dict]:
    rows = d.get("/api/v1/pinning-risk").json()["targets"].get(name, [])
    return [row for row in rows if row["query"] == LISTEN_SHOWN]


def test_bytes_that_are_not_utf8_are_replaced_and_counted_never_fatal(pg: Cluster) -> None:
    """The probe: in a SQL_ASCII database one statement with the byte 0xff failed the
    database source every run (`invalid byte sequence for encoding "UTF8"`), and a database
    named with such bytes failed the database source and, once a session connected to it,
    the activity source. Now every source stays up, the odd name is a `datname` with U+FFFD,
    the statement shows in the pinning-risk report with U+FFFD (read from the SQL_ASCII
    database; a UTF-8 one cannot read its text at all, and says so in its log), and each
    replaced string is counted."""
    with hostile_databases(pg):
        config = f"databases:{target('ascii', pg, ASCII_DB)}{target('main', pg, 'postgres')}\n"
        with run_daemon(config + "ingest: {enabled: false}\n") as d:
            d.wait_for(lambda: all_up(d) and odd_sessions(d) == {"ascii", "main"}, timeout=30)
            d.wait_for(lambda: listen_rows(d, "ascii"), timeout=30)
            for name in ("ascii", "main"):
                assert d.value("pg_invalid_utf8_strings_total", target=name) > 0
                assert d.value("pg_temp_bytes_total", target=name, datname=ODD_SHOWN) == 0
            assert all_up(d)
            assert "not valid in this database's encoding" in d.log()
            assert "Traceback" not in d.log()


def test_pinning_risk_rows_are_marked_stale_once_pg_stat_statements_is_gone(
    pg: Cluster, fresh_db: str
) -> None:
    """The probe: /api/v1/pinning-risk kept serving its offenders after pg_stat_statements
    was dropped, with no sign that they were old. Each row says when it was sampled and,
    once the statements cannot be read, that it is stale."""
    dsn = pg.dsn(user="monitor", password=MONITOR_PASSWORD, dbname=fresh_db)
    with run_daemon(one_target_config(dsn, statements="{interval: 1s}")) as d:
        for _ in range(3):
            pg.psql("LISTEN stale_check", dbname=fresh_db)

        def rows() -> list[dict]:
            got = d.get("/api/v1/pinning-risk").json()["targets"].get("main", [])
            return [row for row in got if row["query"] == "LISTEN stale_check"]

        fresh = d.wait_for(lambda: rows() and rows()[0]["stale"] is False and rows(), 30)
        assert fresh[0]["sampled_at"] > 0
        pg.psql("DROP EXTENSION pg_stat_statements", dbname=fresh_db)
        stale = d.wait_for(lambda: rows() and rows()[0]["stale"] is True and rows(), 30)
        assert stale[0]["sampled_at"] >= fresh[0]["sampled_at"]
        assert d.value("pgpressure_source_up", source="database") == 1
        later = d.wait_for(lambda: rows()[0]["sampled_at"] == stale[0]["sampled_at"] and rows())
        assert later[0]["stale"] is True
