"""The PostgreSQL sources against a real server, through the real daemon's /metrics."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time

import psycopg
import pytest

from exporter import __version__
from exporter.devtools.cluster import Cluster
from exporter.devtools.daemon_process import one_target_config, run_daemon
from tests.conftest import MONITOR_PASSWORD


def daemon_config(
    dsn: str, *, statements_interval: str = "1s", extra: str = "", pinning: bool = False
) -> str:
    statements = (
        f"{{interval: {statements_interval}, top_n: 50, pinning_risk: {str(pinning).lower()}}}"
    )
    return one_target_config(dsn, statements=statements, extra=extra)


@pytest.fixture(scope="module")
def daemon(pg):
    with run_daemon(daemon_config(pg.dsn())) as d:
        yield d


def counter_by_db(daemon, name: str, datname: str, **labels: str) -> float:
    return daemon.value(name, datname=datname, **labels) or 0.0


BURN_CPU_HALF_A_SECOND = """
DO $$BEGIN
  WHILE clock_timestamp() < statement_timestamp() + interval '0.5 s' LOOP END LOOP;
END$$
"""


class Sessions:
    """Client sessions running statements in threads until stopped."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.threads: list[threading.Thread] = []
        self.stop = threading.Event()
        self.errors: list[BaseException] = []

    def loop(self, sql: str, count: int) -> None:
        def run() -> None:
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    while not self.stop.is_set():
                        conn.execute(sql)
            except BaseException as exc:  # surfaced by join()
                self.errors.append(exc)

        for _ in range(count):
            t = threading.Thread(target=run, daemon=True)
            t.start()
            self.threads.append(t)

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not self.errors, self.errors


def test_load_by_wait_event_matches_the_sessions_running(daemon, pg, fresh_db):
    """4 sessions in pg_sleep and 2 burning CPU for 10 s: AAS 4 (PgSleep) and 2 (CPU)."""
    dsn = pg.dsn(dbname=fresh_db)
    work = Sessions(dsn)
    work.loop("SELECT pg_sleep(0.5)", 4)
    # A busy PL/pgSQL loop is pure CPU. generate_series() would materialise its rows in a
    # tuplestore that spills past work_mem, so part of the time would show as BufFile IO.
    work.loop(BURN_CPU_HALF_A_SECOND, 2)
    time.sleep(1.5)  # every session is in its loop
    before = daemon.metrics()
    time.sleep(10)
    after = daemon.metrics()
    work.join()

    def total(snapshot, wait_event_type, wait_event):
        return sum(
            v
            for ls, v in snapshot.get("pg_active_session_seconds_total", [])
            if ls["datname"] == fresh_db
            and ls["wait_event_type"] == wait_event_type
            and ls["wait_event"] == wait_event
        )

    def samples(snapshot):
        return sum(v for _, v in snapshot["pg_activity_samples_total"])

    # Samples x 1 s interval: the window the counters grew over, read from the same two
    # scrapes as the counters so a sample landing between two reads cannot skew the ratio.
    elapsed = samples(after) - samples(before)
    assert elapsed >= 8
    sleep_aas = (total(after, "Timeout", "PgSleep") - total(before, "Timeout", "PgSleep")) / elapsed
    cpu_aas = (total(after, "CPU", "CPU") - total(before, "CPU", "CPU")) / elapsed
    assert sleep_aas == pytest.approx(4, abs=0.4)
    assert cpu_aas == pytest.approx(2, abs=0.3)
    by_app = [
        v
        for ls, v in after["pg_application_active_session_seconds_total"]
        if ls["datname"] == fresh_db
    ]
    assert sum(by_app) > 0


def test_sampled_load_agrees_with_pg_stat_database_active_time(daemon, pg, fresh_db):
    """Short statements for 20 s: sampled session-seconds within 10% of active_time."""

    def active_time() -> float:
        return (
            float(pg.psql(f"SELECT active_time FROM pg_stat_database WHERE datname = '{fresh_db}'"))
            / 1000
        )

    def sampled() -> float:
        return sum(
            v
            # absent until the database has had an active session
            for ls, v in daemon.metrics().get("pg_active_session_seconds_total", [])
            if ls["datname"] == fresh_db
        )

    pg.psql("SELECT pg_stat_clear_snapshot()")
    time.sleep(1.2)
    sampled_before, active_before = sampled(), active_time()
    work = Sessions(pg.dsn(dbname=fresh_db))
    work.loop("SELECT pg_sleep(0.05)", 8)
    time.sleep(20)
    work.join()  # the sessions disconnect, which flushes their active_time
    time.sleep(2.5)
    sampled_growth = sampled() - sampled_before
    exact_growth = active_time() - active_before
    print(f"sampled {sampled_growth:.1f} s vs active_time {exact_growth:.1f} s")
    assert exact_growth > 100  # 8 sessions nearly always active for 20 s
    assert sampled_growth == pytest.approx(exact_growth, rel=0.10)


def test_row_lock_conflict_shows_blocked_session_and_lock_wait(daemon, pg, fresh_db):
    dsn = pg.dsn(dbname=fresh_db)
    pg.psql(
        "CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t VALUES (1, 0)", dbname=fresh_db
    )
    holder = psycopg.connect(dsn)
    holder.execute("UPDATE t SET v = 1 WHERE id = 1")  # open transaction holds the row lock
    waiter_done = threading.Event()

    def wait() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE t SET v = 2 WHERE id = 1")
        waiter_done.set()

    threading.Thread(target=wait, daemon=True).start()
    try:
        daemon.wait_for(
            lambda: daemon.value("pg_blocked_sessions", datname=fresh_db) == 1, timeout=5
        )
        lock_waits = daemon.wait_for(
            lambda: daemon.value(
                "pg_active_session_seconds_total",
                datname=fresh_db,
                wait_event_type="Lock",
                wait_event="transactionid",
            )
        )
        assert lock_waits >= 1
    finally:
        holder.rollback()
        holder.close()
    assert waiter_done.wait(10)
    daemon.wait_for(lambda: daemon.value("pg_blocked_sessions", datname=fresh_db) == 0)


def test_idle_in_transaction_shows_in_oldest_age(daemon, pg, fresh_db):
    with psycopg.connect(pg.dsn(dbname=fresh_db)) as conn:
        conn.execute("SELECT 1")  # transaction open, then idle
        daemon.wait_for(
            lambda: (
                (daemon.value("pg_oldest_idle_in_transaction_seconds", datname=fresh_db) or 0) >= 3
            ),
            timeout=10,
        )
        assert daemon.value("pg_oldest_transaction_seconds", datname=fresh_db) >= 3
        assert daemon.value("pg_sessions", datname=fresh_db, state="idle in transaction") == 1
        conn.rollback()
    daemon.wait_for(
        lambda: daemon.value("pg_oldest_idle_in_transaction_seconds", datname=fresh_db) == 0,
        timeout=10,
    )


def test_sort_spilling_to_disk_is_counted_per_database_and_statement(daemon, pg, fresh_db):
    before = daemon.value("pg_temp_bytes_total", datname=fresh_db) or 0.0
    with psycopg.connect(pg.dsn(dbname=fresh_db), autocommit=True) as conn:
        conn.execute("SET work_mem = '64kB'")
        conn.execute("SELECT g FROM generate_series(1, 200000) g ORDER BY g DESC").fetchall()
        queryid = conn.execute(
            "SELECT queryid FROM pg_stat_statements WHERE query LIKE '%ORDER BY g DESC%'"
        ).fetchone()[0]
    daemon.wait_for(
        lambda: (daemon.value("pg_temp_bytes_total", datname=fresh_db) or 0) > before + 1_000_000
    )
    spilled = daemon.wait_for(
        lambda: daemon.value(
            "pg_statement_temp_bytes_total", datname=fresh_db, queryid=str(queryid)
        )
    )
    assert spilled > 1_000_000
    assert daemon.value("pg_temp_files_total", datname=fresh_db) >= 1
    assert daemon.value("pg_work_mem_bytes") == 4 * 1024 * 1024
    assert daemon.value("pg_stat_statements_available") == 1


def test_a_killed_session_is_counted_as_ended(daemon, pg, fresh_db):
    """pg_stat_database's sessions_killed (and _abandoned, _fatal: PostgreSQL 14+), summed over
    the target's databases, for the connection_churn finding."""
    before = {"killed": daemon.value("pg_sessions_ended_total", reason="killed") or 0.0}
    victim = psycopg.connect(pg.dsn(dbname=fresh_db), autocommit=True)
    pid = victim.info.backend_pid
    with psycopg.connect(pg.dsn(dbname=fresh_db), autocommit=True) as conn:
        assert conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]
    with contextlib.suppress(psycopg.Error):
        victim.close()
    daemon.wait_for(
        lambda: (
            (daemon.value("pg_sessions_ended_total", reason="killed") or 0.0)
            >= before["killed"] + 1
        ),
        timeout=15,
    )
    assert daemon.value("pg_sessions_ended_total", reason="abandoned") is not None
    assert daemon.value("pg_sessions_ended_total", reason="fatal") is not None


def test_capacity_and_health_metrics(daemon):
    assert daemon.value("pg_max_connections") == 300
    assert daemon.value("pg_vcpus") == 2
    assert daemon.value("pgpressure_source_up", source="activity", target="main") == 1
    assert daemon.value("pgpressure_source_up", source="database", target="main") == 1
    assert daemon.value("pgpressure_build_info", version=__version__) == 1


def test_promtool_check_metrics_is_clean(daemon):
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=daemon.metrics_text(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


def test_openmetrics_is_served_when_asked(daemon):
    response = daemon.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_daemon_excludes_its_own_session(pg):
    """The exporter's session must not show up as activity, not even while it samples."""
    with run_daemon(daemon_config(pg.dsn(dbname="template1"), pinning=False)) as d:
        time.sleep(3)
        mine = [v for ls, v in d.metrics().get("pg_sessions", []) if ls["datname"] == "template1"]
        assert sum(mine) == 0
        assert (
            pg.psql(
                "SELECT count(*) FROM pg_stat_activity WHERE "
                "application_name = 'pgpressure' AND datname = 'template1'"
            )
            == "1"
        )


def test_monitor_role_with_password_file_and_no_leak(pg, tmp_path):
    """A pg_monitor-only role sees everything we need; its password never leaks."""
    secret = tmp_path / "pgpass"
    secret.write_text(MONITOR_PASSWORD + "\n")
    config = daemon_config(pg.dsn(user="monitor"), extra=f"    password_file: {secret}")
    with run_daemon(config) as d:
        d.wait_for(lambda: d.value("pgpressure_source_up", source="database") == 1)
        d.wait_for(lambda: d.value("pg_stat_statements_available") == 1)
        assert d.value("pg_max_connections") == 300
        text = d.metrics_text() + d.get("/").text
        assert MONITOR_PASSWORD not in text
        assert MONITOR_PASSWORD not in d.log()
    # A wrong password in the DSN: the failure is logged, the password is not.
    wrong = "Wr0ng-canary-pw"
    with run_daemon(daemon_config(pg.dsn(user="monitor", password=wrong))) as d:
        d.wait_for(lambda: d.value("pgpressure_source_errors_total", source="activity") >= 1)
        assert d.value("pgpressure_source_up", source="activity") == 0
        assert "password authentication failed" in d.log()
        assert wrong not in d.log() + d.metrics_text() + d.get("/").text


@pytest.fixture
def own_cluster():
    """A cluster of its own: these tests stop it or lock its shared catalogs."""
    with Cluster() as cluster:
        yield cluster


def test_database_restart_keeps_metrics_served_and_recovers(own_cluster):
    with run_daemon(daemon_config(own_cluster.dsn(), pinning=False)) as d:
        d.wait_for(lambda: d.value("pgpressure_source_up", source="activity") == 1)
        own_cluster.stop("immediate")
        d.wait_for(lambda: d.value("pgpressure_source_up", source="activity") == 0)
        for _ in range(5):
            response = d.get("/metrics", timeout=1)
            assert response.status_code == 200
            assert "pg_activity_samples_total" in response.text  # counters kept
            time.sleep(0.3)
        errors_down = d.value("pgpressure_source_errors_total", source="activity")
        assert errors_down >= 1
        own_cluster.start()
        restarted = time.monotonic()
        d.wait_for(lambda: d.value("pgpressure_source_up", source="activity") == 1, timeout=5)
        assert time.monotonic() - restarted < 5
        assert "source recovered" in d.log()


def test_hanging_source_query_is_cut_by_server_timeouts(own_cluster):
    """A locked shared catalog makes the sampling queries wait: the server cuts them."""
    extra = "    statement_timeout: 300ms\n    lock_timeout: 10s"
    with run_daemon(daemon_config(own_cluster.dsn(), extra=extra, pinning=False)) as d:
        d.wait_for(lambda: d.value("pgpressure_source_up", source="activity") == 1)
        locker = psycopg.connect(own_cluster.dsn())
        try:
            # pg_stat_activity joins pg_database: our sampling query now has to wait.
            locker.execute("LOCK TABLE pg_catalog.pg_database IN ACCESS EXCLUSIVE MODE")
            errors = d.value("pgpressure_source_errors_total", source="activity")
            d.wait_for(
                lambda: d.value("pgpressure_source_errors_total", source="activity") >= errors + 2
            )
            started = time.monotonic()
            assert d.get("/metrics", timeout=2).status_code == 200
            assert time.monotonic() - started < 1
            assert d.value("pgpressure_source_up", source="activity") == 0
            assert "statement timeout" in d.log()
        finally:
            with contextlib.suppress(Exception):
                locker.rollback()
            locker.close()
        d.wait_for(lambda: d.value("pgpressure_source_up", source="activity") == 1)


def test_pg_stat_statements_created_but_not_preloaded_keeps_the_rest_exported():
    """CREATE EXTENSION works without shared_preload_libraries, reading it then fails with
    SQLSTATE 55000: the database source says so once and keeps the temp-file metrics."""
    with Cluster(settings={"shared_preload_libraries": "''"}) as cluster:
        cluster.psql("CREATE EXTENSION pg_stat_statements")
        with run_daemon(daemon_config(cluster.dsn(), pinning=True)) as d:
            d.wait_for(lambda: d.value("pgpressure_source_up", source="database") == 1)
            assert d.value("pg_stat_statements_available") == 0
            assert d.value("pg_temp_bytes_total", datname="postgres") is not None
            assert d.value("pg_work_mem_bytes") is not None
            time.sleep(2.5)  # more samples: still up, and said once
            assert d.value("pgpressure_source_errors_total", source="database") == 0
            assert d.log().count("pg_stat_statements cannot be read") == 1
            assert "shared_preload_libraries" in d.log()


def test_datname_cap_keeps_other_monotonic_and_frees_slots_of_dropped_databases(own_cluster):
    """Databases over `max_datnames` are summed into `other`. Dropping one of them must not
    make that counter go down (Prometheus would read a reset and rate() a spike), and
    dropping an admitted one frees its slot for the next database."""
    c = own_cluster
    names = {r for r in c.psql("SELECT string_agg(datname, ',') FROM pg_database").split(",")}
    cap = len(names) + 1  # room for exactly one more database: "a"
    for db in ("a", "b", "x"):
        c.psql(f"CREATE DATABASE {db}")

    def spill(db: str) -> None:
        with psycopg.connect(c.dsn(dbname=db), autocommit=True) as conn:
            conn.execute("SET work_mem = '64kB'")
            conn.execute("SELECT g FROM generate_series(1, 200000) g ORDER BY g DESC").fetchall()

    with run_daemon(daemon_config(c.dsn(), pinning=False, extra=f"    max_datnames: {cap}")) as d:

        def temp(db: str) -> float | None:
            return d.value("pg_temp_bytes_total", datname=db)

        d.wait_for(lambda: d.value("pgpressure_source_up", source="database") == 1)
        for db in ("b", "x"):
            spill(db)
        other = d.wait_for(lambda: (temp("other") or 0) > 0 and temp("other"), timeout=10)
        assert temp("a") is not None and temp("b") is None and temp("x") is None
        samples = d.value("pg_activity_samples_total")

        c.psql("DROP DATABASE x")  # in other: its temp bytes stay counted
        d.wait_for(lambda: d.value("pg_activity_samples_total") >= samples + 3)
        assert temp("other") == other

        c.psql("DROP DATABASE a")  # admitted: its series ends and its slot is free
        d.wait_for(lambda: temp("a") is None, timeout=10)
        d.wait_for(lambda: temp("b") is not None, timeout=10)
        assert temp("other") == other
        spill("b")
        d.wait_for(lambda: temp("b") > 0, timeout=10)  # counted under its own name now
        assert temp("other") == other
