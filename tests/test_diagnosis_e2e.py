"""Diagnosis end to end: real PostgreSQL, real apps, the real daemon and a real Prometheus.

The sampler's side first: which application holds a lock others wait on, which sits idle in
a transaction, and which apps use the target at all (how pools are linked to targets).
"""

from __future__ import annotations

import threading

import psycopg
import pytest

from exporter.devtools.daemon_process import one_target_config, run_daemon


@pytest.fixture(scope="module")
def daemon(pg):
    with run_daemon(one_target_config(pg.dsn())) as d:
        yield d


def test_the_sampler_names_the_blocker_and_the_idle_transactions_app(daemon, pg, fresh_db):
    dsn = pg.dsn(dbname=fresh_db)
    pg.psql(
        "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t VALUES (1, 0)", dbname=fresh_db
    )
    holder = psycopg.connect(dsn, application_name="nightly-batch")
    holder.execute("UPDATE t SET v = 1 WHERE id = 1")  # holds the row lock, then idles
    done = threading.Event()

    def wait() -> None:
        with psycopg.connect(dsn, autocommit=True, application_name="orders") as conn:
            conn.execute("UPDATE t SET v = 2 WHERE id = 1")
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    try:
        daemon.wait_for(
            lambda: (
                (
                    daemon.value(
                        "pg_lock_blocker_seconds",
                        datname=fresh_db,
                        application_name="nightly-batch",
                    )
                    or 0
                )
                >= 2
            ),
            timeout=10,
        )
        assert daemon.value("pg_lock_blocker_seconds", application_name="orders") is None
        idle = daemon.value(
            "pg_application_idle_in_transaction_seconds",
            datname=fresh_db,
            application_name="nightly-batch",
        )
        assert idle is not None and idle >= 1
        assert (
            daemon.value("pg_application_sessions", datname=fresh_db, application_name="orders")
            == 1
        )
    finally:
        holder.rollback()
        holder.close()
    assert done.wait(10)
    daemon.wait_for(lambda: daemon.value("pg_lock_blocker_seconds") is None, timeout=10)
    assert daemon.value("pg_reserved_connections") >= 3  # superuser_reserved_connections
