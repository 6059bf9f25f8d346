"""Diagnosis end to end: real PostgreSQL, real apps, the real daemon and a real Prometheus.

The incidents that motivated pgpressure are replayed by real applications in their own
processes (`tests/diagnosis_apps.py`) against one database, in order, while the daemon
diagnoses live (every 2 s over 60 s) and Prometheus scrapes it every second:

1. a healthy workload: no finding at all;
2. a lock holder: `lock_contention` naming `nightly-batch`;
3. a sync FastAPI app, default pool (5 + 10), 48 concurrent requests of 50 ms queries:
   `pool_undersized` with a suggested size, the database not saturated;
4. 100 asyncpg clients, pool 20 + overflow 100, `pool_recycle=5`, `work_mem` 64 kB, 2 vCPUs:
   `database_cpu_saturated` first, with `temp_spills` and `connection_churn`, and not
   `pool_undersized`;
5. an app running pinning statements behind an RDS Proxy (the AWS emulator's CloudWatch and
   proxy log): `proxy_pinning` with the reason and the statement.

After each, `pgpressure doctor --prometheus` at the time of the live verdict, over the same
window, must give the same findings from what Prometheus stored.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
import requests
import yaml

from exporter.devtools import aws_emulator as emulator
from exporter.devtools.daemon_process import (
    DaemonProcess,
    free_port,
    logged_process,
    one_target_config,
    run_daemon,
)

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 60
Key = tuple[str, tuple[tuple[str, str], ...]]


# --- the sampler's side ----------------------------------------------------------------------
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
        sessions = daemon.value(
            "pg_application_sessions", datname=fresh_db, application_name="orders"
        )
        assert sessions == 1
    finally:
        holder.rollback()
        holder.close()
    assert done.wait(10)
    daemon.wait_for(lambda: daemon.value("pg_lock_blocker_seconds") is None, timeout=10)
    assert daemon.value("pg_reserved_connections") >= 3  # superuser_reserved_connections


# --- the world of the incidents ----------------------------------------------------------------
@dataclass
class World:
    dsn: str
    daemon: DaemonProcess
    prometheus: str
    tmp: Path

    def findings(self) -> dict:
        response = self.daemon.get("/api/v1/findings")
        response.raise_for_status()
        return response.json()

    def wait(self, predicate: Callable[[dict], bool], timeout: float, what: str) -> dict:
        """Poll the live findings until `predicate` holds; fail with what was seen."""
        deadline = time.monotonic() + timeout
        doc: dict = {}
        while time.monotonic() < deadline:
            doc = self.findings()
            if doc.get("status") == "ok" and predicate(doc):
                return doc
            time.sleep(1)
        seen = [f["summary"] for f in doc.get("findings", [])]
        raise AssertionError(f"{what} not found in {timeout:.0f}s; live findings: {seen}")

    def post_mortem(self, at: float) -> tuple[int, list[dict]]:
        """`pgpressure doctor --prometheus` at `at` over the live window, as a command."""
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "exporter",
                "doctor",
                "--prometheus",
                self.prometheus,
                "--at",
                f"{at:.3f}",
                "--window",
                f"{WINDOW}s",
                "--step",
                "1s",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert result.returncode in (0, 1), result.stdout + result.stderr
        return result.returncode, json.loads(result.stdout)

    @contextlib.contextmanager
    def app(self, kind: str, seconds: float, port: int = 0) -> Iterator[subprocess.Popen]:
        log = self.tmp / f"{kind}.log"
        cmd = [sys.executable, "-m", "tests.diagnosis_apps", kind, "--dsn", self.dsn]
        cmd += ["--endpoint", self.daemon.url, "--seconds", str(seconds), "--port", str(port)]
        with logged_process(cmd, log, cwd=ROOT, stop_timeout=10) as proc:
            yield proc
        assert proc.returncode in (0, -15), f"{kind} failed:\n{log.read_text()[-3000:]}"


def keys(findings: list[dict]) -> set[Key]:
    return {
        (f["rule"], tuple(sorted((k, v) for k, v in f["subject"].items() if v))) for f in findings
    }


def of(doc: dict, rule: str, **subject: str) -> dict | None:
    return next(
        (
            f
            for f in doc["findings"]
            if f["rule"] == rule and all(f["subject"].get(k) == v for k, v in subject.items())
        ),
        None,
    )


def daemon_config(dsn: str, *, ingest: bool = True, extra: str = "") -> str:
    """One target, `main` (2 vCPUs), sampled every second; diagnosis every 2 s over WINDOW."""
    return f"""
databases:
  - name: main
    dsn: {dsn}
    vcpus: 2
    activity: {{interval: 1s}}
    statements: {{interval: 1s, top_n: 50, pinning_risk: true}}
ingest: {{enabled: {str(ingest).lower()}, stale_after: 10s}}
diagnosis:
  interval: 2s
  window: {WINDOW}s
{extra}"""


@contextlib.contextmanager
def prometheus(tmp: Path, scrape: str) -> Iterator[str]:
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "pgpressure", "static_configs": [{"targets": [scrape]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    cmd = [
        "prometheus",
        f"--config.file={tmp / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp / 'prom-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    url = f"http://127.0.0.1:{port}"
    with logged_process(cmd, tmp / "prometheus.log", stop_timeout=10) as proc:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "prometheus did not start"
            time.sleep(0.2)
        yield url


@pytest.fixture(scope="module")
def world(pg) -> Iterator[World]:
    name = "diag_" + uuid.uuid4().hex[:8]
    pg.psql(f"CREATE DATABASE {name}")
    pg.psql("CREATE EXTENSION pg_stat_statements", dbname=name)
    pg.psql(f"ALTER DATABASE {name} SET work_mem = '64kB'")  # the field report's setting
    dsn = pg.dsn(dbname=name)
    with (
        tempfile.TemporaryDirectory(prefix="pgpressure-diagnosis-") as tmpdir,
        run_daemon(daemon_config(dsn)) as d,
        prometheus(Path(tmpdir), d.url.removeprefix("http://")) as prom,
    ):
        yield World(dsn, d, prom, Path(tmpdir))
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def quiet(world: World) -> None:
    """Wait until the previous incident has left the window: each starts from no finding."""
    world.wait(lambda d: not d["findings"], timeout=WINDOW + 30, what="no finding left")


def settled(world: World, predicate: Callable[[dict], bool], timeout: float, what: str) -> dict:
    """The live verdict once it has held for 10 s, so that its numbers are clear of the
    thresholds they crossed when it first appeared (Prometheus scrapes a second behind)."""
    world.wait(predicate, timeout, what)
    time.sleep(10)
    return world.wait(predicate, 10, f"{what}, still")


def same_as_post_mortem(world: World, doc: dict) -> None:
    """Prometheus's view at the live verdict's time gives the live verdict."""
    time.sleep(3)  # the last scrapes of that moment are in Prometheus
    _, findings = world.post_mortem(doc["evaluated_at"])
    assert keys(findings) == keys(doc["findings"]), (
        f"live: {[f['summary'] for f in doc['findings']]}\n"
        f"post mortem: {[f['summary'] for f in findings]}"
    )


# --- the incidents, in order ---------------------------------------------------------------------
def test_a_healthy_workload_gives_no_finding(world: World) -> None:
    with world.app("healthy", seconds=40):
        time.sleep(30)  # half the window of moderate load, the pool never full
        doc = world.wait(lambda d: True, timeout=10, what="a verdict")
        assert doc["findings"] == [], [f["summary"] for f in doc["findings"]]
        assert {"app": "healthy", "pool": "default", "targets": ["main"]} in doc["links"]
        doctor = subprocess.run(
            [sys.executable, "-m", "exporter", "doctor", "--url", world.daemon.url],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert doctor.stdout.startswith("healthy")
    code, findings = world.post_mortem(doc["evaluated_at"])
    assert (code, findings) == (0, [])
    page = world.daemon.get("/").text
    assert "No finding" in page and page.index('id="findings"') < page.index("<h2>Targets")


def test_a_lock_holder_is_named(world: World) -> None:
    quiet(world)
    with world.app("locker", seconds=45):
        doc = settled(
            world,
            lambda d: (
                of(d, "lock_contention") is not None
                and "nightly-batch" in of(d, "lock_contention")["summary"]
            ),
            timeout=40,
            what="lock_contention naming nightly-batch",
        )
        finding = of(doc, "lock_contention")
        assert finding["evidence"]["values"]["blocker_application_name"] == "nightly-batch"
        assert finding["subject"]["target"] == "main"
        same_as_post_mortem(world, doc)


def test_a_sync_fastapi_app_with_the_default_pool_is_undersized(world: World) -> None:
    pytest.importorskip("fastapi", reason="the test extra installs FastAPI")
    quiet(world)
    port = free_port()
    with world.app("shop", seconds=150, port=port) as shop:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                requests.get(f"http://127.0.0.1:{port}/order", timeout=5).raise_for_status()
                break
            assert shop.poll() is None, "the shop did not start"
            time.sleep(0.3)
        with world.app("load", seconds=100, port=port):
            doc = settled(
                world,
                lambda d: of(d, "pool_undersized", app="shop") is not None,
                timeout=75,
                what="pool_undersized for shop/default",
            )
            finding = of(doc, "pool_undersized", app="shop", pool="default")
            values = finding["evidence"]["values"]
            assert values["max_connections"] == 15  # the default pool: 5 + 10
            assert values["suggested_per_process"] > 15
            assert f"about {int(values['suggested_per_process'])} per process" in finding["fix"]
            assert "main not saturated" in finding["summary"]
            assert of(doc, "database_cpu_saturated") is None
            same_as_post_mortem(world, doc)


def test_the_field_report_is_the_database_saturated_not_the_pool(world: World) -> None:
    quiet(world)
    with world.app("crowd", seconds=90):
        doc = settled(
            world,
            lambda d: (
                d["findings"][:1]
                and d["findings"][0]["rule"] == "database_cpu_saturated"
                and of(d, "temp_spills") is not None
                and of(d, "connection_churn", app="crowd") is not None
            ),
            timeout=80,
            what="database_cpu_saturated first, with temp_spills and connection_churn",
        )
        first = doc["findings"][0]
        assert "a larger pool would make it worse" in first["summary"]
        assert of(doc, "pool_undersized", app="crowd") is None
        # Overflow closes (a full queue of 20 on checkin) or recycling (pool_recycle=5),
        # whichever comes first to each connection: the finding names the main one.
        churn = of(doc, "connection_churn", app="crowd")
        reason = churn["evidence"]["values"]["top_close_reason"]
        assert reason in ("overflow", "recycle") and f"closed for {reason}" in churn["summary"]
        spills = of(doc, "temp_spills")
        assert "work_mem 64 kB" in spills["summary"]
        assert spills["details"], "the statements that spill are named"
        same_as_post_mortem(world, doc)


# --- pinning behind the RDS Proxy emulator --------------------------------------------------------
PROXY = "orders-proxy"
DIGEST = "set search_path to $1"


def proxy_world(moto: str, delay: float) -> None:
    """A proxy pinning 8 of its 10 database connections, and its log saying why."""
    aws = emulator.clients(moto, "ec2", "rds", "cloudwatch", "logs")
    emulator.create_proxy(aws["rds"], PROXY, emulator.create_subnets(aws["ec2"], emulator.REGION))
    # a time inside the newest minute the source reads (60 s periods ending `delay` ago)
    when = datetime.fromtimestamp((time.time() - delay) // 60 * 60 - 30, UTC)
    for name, values in (("DatabaseConnections", [6.0, 4.0]), ("ClientConnections", [30.0])):
        emulator.put_datapoints(aws["cloudwatch"], PROXY, name, values, when)
    emulator.put_datapoints(
        aws["cloudwatch"], PROXY, "DatabaseConnectionsCurrentlySessionPinned", [4.0, 4.0], when
    )
    emulator.put_log_lines(aws["logs"], PROXY, [pin_line(0)], time.time() - 1)


def pin_line(i: int) -> str:
    reason = emulator.SETTINGS_REASON.format(digest=DIGEST)
    return emulator.PIN_LINE.format(c=i, d=100 + i, reason=reason)


def pinning_log(moto: str, stop: threading.Event) -> None:
    """The proxy keeps pinning: a line in its log every second."""
    logs = emulator.clients(moto, "logs")["logs"]
    i = 1
    while not stop.wait(1.0):
        emulator.put_log_lines(logs, PROXY, [pin_line(i)], time.time(), create=False)
        i += 1


def aws_config(moto: str, delay: float) -> str:
    return f"""
aws:
  region: {emulator.REGION}
  endpoint_url: {moto}
  access_key_id: AKIAPGPRESSUREDIAG01
  secret_access_key: pgpressure-diagnosis-secret
  rds_proxy: {{enabled: true, interval: 1s, delay: {delay:.0f}s, logs: true}}
"""


def test_pinning_behind_the_proxy_names_the_reason_and_the_statement(pg, fresh_db) -> None:
    delay = 60
    dsn = pg.dsn(dbname=fresh_db)
    # the app's own role: the daemon leaves its own statements out of the pinning report
    pg.psql("DO $$BEGIN CREATE ROLE orders_app LOGIN; EXCEPTION WHEN duplicate_object THEN END$$")
    app_dsn = pg.dsn(user="orders_app", dbname=fresh_db)
    stop = threading.Event()

    def app() -> None:  # the statements that pin, as the app sends them through the proxy
        with psycopg.connect(app_dsn, autocommit=True, application_name="orders") as conn:
            while not stop.is_set():
                conn.execute("SET search_path TO public")
                conn.execute("SELECT 1")
                time.sleep(0.05)

    worker = threading.Thread(target=app)
    with (
        emulator.moto_server() as moto,
        tempfile.TemporaryDirectory(prefix="pgpressure-diagnosis-proxy-") as tmpdir,
    ):
        proxy_world(moto, delay)
        worker.start()
        log_writer = threading.Thread(target=pinning_log, args=(moto, stop))
        log_writer.start()
        try:
            with (
                run_daemon(daemon_config(dsn, ingest=False, extra=aws_config(moto, delay))) as d,
                prometheus(Path(tmpdir), d.url.removeprefix("http://")) as prom,
            ):
                world = World(dsn, d, prom, Path(tmpdir))
                doc = settled(
                    world,
                    lambda d: (
                        of(d, "proxy_pinning", proxy=PROXY) is not None
                        and "SET search_path" in of(d, "proxy_pinning", proxy=PROXY)["summary"]
                    ),
                    timeout=60,
                    what="proxy_pinning naming the statement",
                )
                finding = of(doc, "proxy_pinning", proxy=PROXY)
                assert "80% of its database connections pinned" in finding["summary"]
                assert "reasons: session_settings (" in finding["summary"]
                assert finding["details"][0].startswith(f"main/{fresh_db}: SET search_path TO $1")
                assert "initialization query" in finding["fix"]
                same_as_post_mortem(world, doc)
        finally:
            stop.set()
            worker.join(10)
            log_writer.join(10)
