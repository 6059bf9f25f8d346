"""The whole chain, with real binaries: exporter -> Prometheus -> rules -> Alertmanager -> a page.

A real workload runs against the session's PostgreSQL while Prometheus (1 s scrape and rule
evaluation) scrapes the daemon:

- an instrumented SQLAlchemy app whose pool (1 + 1 overflow) is far too small for its six
  threads: the pool is exhausted, callers wait and checkouts time out;
- a session that updates a row and then sits idle in its transaction, and another that
  waits for that row's lock;
- a session that sorts with a tiny work_mem, so it spills to temporary files.

The rules Prometheus loads are the real alerts/pgpressure.rules.yml with every `for:` and
window divided by 60 (5m -> 5s) and the idle-in-transaction threshold 300 s -> 5 s, derived
by code, so the file under test is the file that ships. Alertmanager runs the routing of
alerts/alertmanager.example.yml with its receivers pointed at a webhook in this test: the
critical pool alerts must reach the pager route, the PostgreSQL warnings the ticket route,
with the labels that identify the pool and database. Then every dashboard query runs against
this Prometheus, and the panels for the sources in the scenario must return data. When the
workload stops, every alert must resolve.

A second scenario does the same for RDS Proxy: moto in server mode is the AWS endpoint, with
a proxy created through the RDS API, a minute of CloudWatch datapoints in which most database
connections are pinned and borrowing is slow, and pinning lines in the proxy's log group.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg
import pytest
import requests
import yaml

from exporter.devtools import aws_emulator as emulator
from exporter.devtools.cluster import Cluster
from exporter.devtools.daemon_process import free_port, logged_process, run_daemon
from tests.conftest import MONITOR_PASSWORD
from tests.promql_tools import (
    ROOT,
    PanelQuery,
    load_rules,
    panel_queries,
    shortened_rules,
    substitute,
    variable_queries,
)

# The only guard: the in-app instrumentation is built concurrently with this test.
instrument_module = pytest.importorskip(
    "pgpressure_sqlalchemy", reason="pgpressure_sqlalchemy (in-app instrumentation) not available"
)
sqlalchemy = pytest.importorskip("sqlalchemy")

pytestmark = pytest.mark.slow

APP = "orders"
TARGET = "main"
EXPECTED_ALERTS = {
    # alert -> (route, labels that identify what it is about)
    "SQLAlchemyPoolExhausted": ("pager", ("app", "pool")),
    # any timeout is a ticket; the page needs more than 10 and 1% of checkouts for 5 minutes
    "SQLAlchemyPoolCheckoutTimeouts": ("tickets", ("app", "pool")),
    "PostgresLockContention": ("tickets", ("target", "datname")),
    "PostgresIdleInTransaction": ("tickets", ("target", "datname")),
}
# Panels that neither scenario feeds: the RDS/Aurora instance under a target (tests/test_aurora.py
# covers its source), a diagnosis finding (tests/test_diagnosis_e2e.py), would-pin warnings and
# silent pinning logs (tests/test_pinning_drivers.py). Their queries still run here.
NOT_IN_A_SCENARIO = {
    ("overview", "Findings: the cause and the fix"),
    ("rds-proxy", "Would pin (prepared statements warned about) and silent logs"),
    *(
        ("database-load", title)
        for title in (
            "pgpressure AAS vs AWS DBLoad",
            "AAS / DBLoad (15m)",
            "Instance: CPU, DBLoad per vCPU",
            "Instance: DBLoad on CPU and waiting",
            "Instance: connections and freeable memory",
            "Serverless v2 capacity (ACUs)",
            "Instances",
        )
    ),
}
# Panels of the RDS Proxy source: the scenario of the second test.
RDS_PROXY_PANELS = {
    ("overview", "RDS Proxy pinned ratio"),
    ("overview", "RDS Proxy borrow latency"),
    *(
        ("rds-proxy", title)
        for title in (
            "Database connections: pinned vs total vs max allowed",
            "Pinned ratio",
            "Client, borrowed and in-transaction connections",
            "Borrow latency",
            "Query response latency",
            "Pinning reasons",
        )
    ),
}
RATE_INTERVAL = "15s"  # what $__rate_interval would be with a 1 s scrape interval, roughly
DEADLINE_FIRE = 60.0
DEADLINE_RESOLVE = 60.0


# --- processes ----------------------------------------------------------------------------
def _binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError(f"none of {names} on PATH: run scripts/setup.sh")


@contextlib.contextmanager
def _serve(name: str, binary: str, args: list[str], tmp: Path) -> Iterator[str]:
    """Start a Prometheus-project binary with `args` on a free port, logging to
    tmp/<name>.log; yields its URL once /-/ready answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / f"{name}.log"
    cmd = [binary, *args, f"--web.listen-address=127.0.0.1:{port}"]
    with logged_process(cmd, log, stop_timeout=10) as proc:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield url


@dataclass
class Webhook:
    """Receives Alertmanager's webhook notifications; the path names the route."""

    notifications: list[tuple[str, dict]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def alerts(self) -> list[tuple[str, dict]]:
        """(route, alert) for every alert of every notification, in arrival order."""
        with self.lock:
            return [(route, a) for route, n in self.notifications for a in n["alerts"]]

    def find(self, name: str, status: str) -> list[tuple[str, dict]]:
        return [
            (route, a)
            for route, a in self.alerts()
            if a["labels"].get("alertname") == name and a["status"] == status
        ]

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with hook.lock:
                    hook.notifications.append((self.path.strip("/"), json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()


def alertmanager_config(webhook_url: str) -> dict:
    """The example routing with its receivers replaced by the test's webhook, and fast."""
    config = yaml.safe_load((ROOT / "alerts" / "alertmanager.example.yml").read_text())
    config["receivers"] = [
        {
            "name": r["name"],
            "webhook_configs": [{"url": f"{webhook_url}/{r['name']}", "send_resolved": True}],
        }
        for r in config["receivers"]
    ]

    def fast(route: dict) -> None:
        for key in ("group_wait", "group_interval"):
            if key in route:
                route[key] = "1s"
        for child in route.get("routes", []):
            fast(child)

    config["route"].update(group_wait="1s", group_interval="1s")
    fast(config["route"])
    return config


@contextlib.contextmanager
def alertmanager(tmp: Path, webhook_url: str) -> Iterator[str]:
    config = tmp / "alertmanager.yml"
    config.write_text(yaml.safe_dump(alertmanager_config(webhook_url)))
    args = [
        f"--config.file={config}",
        f"--storage.path={tmp / 'am-data'}",
        "--cluster.listen-address=",
    ]
    binary = _binary("prometheus-alertmanager", "alertmanager")
    with _serve("alertmanager", binary, args, tmp) as url:
        yield url


@contextlib.contextmanager
def prometheus(tmp: Path, scrape: str, alertmanager_url: str) -> Iterator[str]:
    rules = shortened_rules(factor=60, thresholds={"PostgresIdleInTransaction": ("> 300", "> 5")})
    (tmp / "rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp / "rules.yml")],
        "alerting": {
            "alertmanagers": [
                {"static_configs": [{"targets": [alertmanager_url.removeprefix("http://")]}]}
            ]
        },
        "scrape_configs": [{"job_name": "pgpressure", "static_configs": [{"targets": [scrape]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    args = [
        f"--config.file={tmp / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp / 'prom-data'}",
        "--rules.alert.resend-delay=1s",
    ]
    with _serve("prometheus", _binary("prometheus"), args, tmp) as url:
        yield url


# --- workload -----------------------------------------------------------------------------
@dataclass
class Workload:
    dsn: str
    daemon_url: str
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    timeouts: int = 0

    def _thread(self, target: Callable[[], None]) -> None:
        def run() -> None:
            try:
                target()
            except BaseException as exc:  # reported by the test
                self.errors.append(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)

    def start_app(self) -> None:
        """Six threads on a pool of 1 + 1 overflow with a 0.5 s pool_timeout."""
        url = self.dsn.replace("postgresql://", "postgresql+psycopg://", 1)
        self.engine = sqlalchemy.create_engine(url, pool_size=1, max_overflow=1, pool_timeout=0.5)
        instrument_module.instrument(self.engine, app=APP, endpoint=self.daemon_url, interval=1)

        def worker() -> None:
            while not self.stop.is_set():
                try:
                    with self.engine.connect() as conn:
                        conn.execute(sqlalchemy.text("SELECT pg_sleep(0.7)"))
                except sqlalchemy.exc.TimeoutError:
                    self.timeouts += 1

        for _ in range(6):
            self._thread(worker)

    def start_database(self) -> None:
        """A blocker idle in transaction, a session waiting for its lock, a spilling sort."""
        with psycopg.connect(self.dsn, autocommit=True) as setup:
            setup.execute(
                "CREATE TABLE IF NOT EXISTS e2e_accounts (id int PRIMARY KEY, balance int);"
                "INSERT INTO e2e_accounts VALUES (1, 100) ON CONFLICT DO NOTHING"
            )
        self.blocker = psycopg.connect(self.dsn)  # not autocommit: the UPDATE opens a transaction
        self.blocker.execute("UPDATE e2e_accounts SET balance = balance + 1 WHERE id = 1")

        def waiter() -> None:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                conn.execute("UPDATE e2e_accounts SET balance = balance - 1 WHERE id = 1")

        def spiller() -> None:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                # A session-level SET: also what the pinning-risk panel looks for.
                conn.execute("SET work_mem = '64kB'")
                while not self.stop.is_set():
                    conn.execute(
                        "SELECT count(*) FROM (SELECT g FROM generate_series(1, 100000) g "
                        "ORDER BY g DESC) s"
                    )
                    self.stop.wait(0.5)

        self._thread(waiter)
        self._thread(spiller)

    def finish(self) -> None:
        self.stop.set()
        if hasattr(self, "blocker"):
            self.blocker.rollback()
            self.blocker.close()
        for t in self.threads:
            t.join(15)
        assert not [t for t in self.threads if t.is_alive()], "workload threads hung"
        assert not self.errors, self.errors

    def close(self) -> None:
        self.stop.set()
        if hasattr(self, "blocker") and not self.blocker.closed:
            self.blocker.close()
        if hasattr(self, "engine"):
            self.engine.dispose()


# --- Prometheus queries -------------------------------------------------------------------
def prom_query(url: str, expr: str) -> list[dict]:
    r = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def prom_query_range(url: str, expr: str, seconds: int = 60) -> list[dict]:
    end = time.time()
    r = requests.get(
        f"{url}/api/v1/query_range",
        params={"query": expr, "start": end - seconds, "end": end, "step": "1s"},
        timeout=10,
    )
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def wait_until(
    what: str,
    predicate: Callable[[], object],
    timeout: float,
    context: Callable[[], str] = lambda: "",
) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout}s. {context()}")


# --- the test -----------------------------------------------------------------------------
@pytest.fixture
def e2e_db(pg: Cluster) -> Iterator[str]:
    name = "e2e_" + os.urandom(4).hex()
    pg.psql(f"CREATE DATABASE {name}")
    pg.psql("CREATE EXTENSION pg_stat_statements", dbname=name)
    yield name
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_alerts_reach_alertmanager_and_resolve(pg: Cluster, e2e_db: str) -> None:
    config = f"""
databases:
  - name: {TARGET}
    dsn: {pg.dsn(user="monitor", password=MONITOR_PASSWORD, dbname=e2e_db)}
    vcpus: 4
    activity: {{interval: 1s}}
    statements: {{enabled: true, interval: 2s, top_n: 20}}
ingest:
  enabled: true
  stale_after: 30s
"""
    hook = Webhook()
    with (
        tempfile.TemporaryDirectory(prefix="pgpressure-e2e-") as tmpdir,
        hook.serve() as hook_url,
        run_daemon(config) as daemon,
        alertmanager(Path(tmpdir), hook_url) as am_url,
        prometheus(Path(tmpdir), daemon.url.removeprefix("http://"), am_url) as prom_url,
    ):
        tmp = Path(tmpdir)
        workload = Workload(pg.dsn(dbname=e2e_db), daemon.url)

        def context() -> str:
            firing = prom_query(prom_url, "ALERTS")
            received = [(r, a["labels"]["alertname"], a["status"]) for r, a in hook.alerts()]
            return (
                f"\nALERTS: {[a['metric'] for a in firing]}"
                f"\nwebhook: {received}"
                f"\nprometheus log: {(tmp / 'prometheus.log').read_text()[-1500:]}"
                f"\nalertmanager log: {(tmp / 'alertmanager.log').read_text()[-1500:]}"
                f"\ndaemon log: {daemon.log()[-1500:]}"
            )

        try:
            workload.start_app()
            workload.start_database()

            # 1. Each alert reaches the right route with the labels that identify it.
            identity = {"app": APP, "pool": None, "target": TARGET, "datname": e2e_db}
            expect_firing(hook, EXPECTED_ALERTS, identity, context)
            assert workload.timeouts > 0

            # 2. Every dashboard query runs; the scenario's panels return data.
            # Wait until the statements source has seen the spilling sort, so the statement
            # panels have something to show.
            wait_until(
                "statement temp bytes scraped",
                lambda: prom_query(prom_url, "pg_statement_temp_bytes_total > 0"),
                30,
            )
            check_dashboards(
                prom_url,
                lambda q: (q.dashboard, q.panel) not in RDS_PROXY_PANELS | NOT_IN_A_SCENARIO,
                {"job": "pgpressure", "target": TARGET, "app": APP},
            )

            # 3. With the workload gone, every alert resolves.
            workload.finish()
            expect_resolved(hook, EXPECTED_ALERTS, context)
        finally:
            workload.close()


def load_severity(name: str, route: str) -> str:
    """The severity of the rule `name` that Alertmanager's example routes to `route`."""
    wanted = "critical" if route == "pager" else "warning"
    return next(
        r["labels"]["severity"]
        for g in load_rules()["groups"]
        for r in g["rules"]
        if r.get("alert") == name and r["labels"]["severity"] == wanted
    )


def expect_firing(
    hook: Webhook,
    expected: dict[str, tuple[str, tuple[str, ...]]],
    identity: dict[str, str | None],
    context: Callable[[], str],
) -> None:
    """Each alert reaches its route, with its severity and the labels that identify what it
    is about (`identity`: the value each must have, None for any), and its annotations name
    them."""
    for name, (route, keys) in expected.items():
        got = wait_until(
            f"{name} firing at the webhook",
            lambda n=name, r=route: [g for g in hook.find(n, "firing") if g[0] == r],
            DEADLINE_FIRE,
            context,
        )
        got_route, alert = got[0]
        labels = alert["labels"]
        assert got_route == route, (name, got_route)
        assert labels["severity"] == load_severity(name, route)
        assert labels["job"] == "pgpressure"
        for key in keys:
            assert labels.get(key), f"{name} lacks label {key}: {labels}"
            assert identity[key] in (None, labels[key]), (name, key, labels)
        annotations = alert["annotations"]
        assert annotations["runbook_url"].endswith("#" + name.lower())
        assert all(labels[k] in annotations["description"] for k in keys), annotations


def expect_resolved(hook: Webhook, names: Iterable[str], context: Callable[[], str]) -> None:
    for name in names:
        wait_until(
            f"{name} resolved at the webhook",
            lambda n=name: hook.find(n, "resolved"),
            DEADLINE_RESOLVE,
            context,
        )


def check_dashboards(
    prom_url: str, in_scenario: Callable[[PanelQuery], bool], variables: dict[str, str]
) -> None:
    """Every dashboard query runs without error; those of the scenario's panels return data;
    each variable in `variables` offers the scenario's value."""
    empty: list[str] = []
    for q in panel_queries():
        expr = substitute(q.expr, RATE_INTERVAL, "1m")
        result = prom_query(prom_url, expr)  # raises on any error
        if not q.instant:
            result = result or prom_query_range(prom_url, expr)
        if not result and in_scenario(q):
            empty.append(f"{q}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)

    for board, var, selector in variable_queries():
        values = requests.get(
            f"{prom_url}/api/v1/label/{var}/values",
            params={"match[]": selector.replace("$job", ".*")},
            timeout=10,
        ).json()["data"]
        if var in variables:
            assert variables[var] in values, f"{board}: variable {var} offers {values}"


# --- RDS Proxy: CloudWatch metrics and logs from the AWS emulator --------------------------
PROXY = "orders-proxy"
RDS_PROXY_ALERTS = {
    "RDSProxySessionPinningHigh": ("tickets", ("proxy",)),
    "RDSProxyBorrowLatencyHigh": ("tickets", ("proxy",)),
}
PINS = {  # reason slug -> the pinning lines the proxy's log gets
    "sequence": [emulator.SETTINGS_REASON.format(digest="select nextval($1)")] * 2,
    "prepared_statement": ["A parse message was detected."],
    "advisory_lock": [emulator.SETTINGS_REASON.format(digest="select pg_advisory_lock($1)")],
}


def publish_minute(cw: object, when: datetime, pinned: float | None, borrow_us: float) -> None:
    """One minute of the proxy's CloudWatch metrics, as two proxy hosts report it. AWS does
    not publish the pinned count while nothing is pinned (`pinned` None)."""
    counts = {
        "DatabaseConnections": [6.0, 4.0],
        "MaxDatabaseConnectionsAllowed": [45.0],
        "ClientConnections": [18.0, 12.0],
        "DatabaseConnectionsCurrentlyBorrowed": [3.0, 3.0],
        "DatabaseConnectionsCurrentlyInTransaction": [2.0, 1.0],
    }
    if pinned is not None:
        counts["DatabaseConnectionsCurrentlySessionPinned"] = [pinned / 2, pinned / 2]
    for name, values in counts.items():
        emulator.put_datapoints(cw, PROXY, name, values, when)
    for name, value in (
        ("DatabaseConnectionsBorrowLatency", borrow_us),
        ("QueryDatabaseResponseLatency", 2500.0),
    ):
        emulator.put_datapoints(cw, PROXY, name, [value], when, unit="Microseconds")


def minute_read(delay: float, back: int = 0) -> datetime:
    """A time in the newest minute the rds_proxy source reads now (60 s periods ending
    `delay` ago, aligned to the minute), or in the one `back` minutes before it."""
    end = (time.time() - delay) // 60 * 60
    return datetime.fromtimestamp(end - 30 - 60 * back, UTC)


def test_rds_proxy_alerts_reach_alertmanager_and_resolve() -> None:
    """A proxy pins 8 of its 10 database connections and borrows slowly: both RDS Proxy
    alerts reach the ticket route with the proxy named, the RDS Proxy panels show data, the
    pinning reasons from the proxy's log arrive in Prometheus by reason. Then AWS publishes
    a healthy minute, without a pinned count as AWS does once nothing is pinned: both
    resolve."""
    delay = 60
    hook = Webhook()
    with (
        emulator.moto_server() as moto,
        tempfile.TemporaryDirectory(prefix="pgpressure-e2e-rds-") as tmpdir,
    ):
        aws = emulator.clients(moto, "ec2", "rds", "cloudwatch", "logs")
        subnets = emulator.create_subnets(aws["ec2"], emulator.REGION)
        emulator.create_proxy(aws["rds"], PROXY, subnets)
        # The minute before the newest, so the healthy one published later is newer even
        # when no minute has passed by then: the source reads the newest minute.
        publish_minute(aws["cloudwatch"], minute_read(delay, back=1), 8.0, 80_000.0)
        lines = [
            emulator.PIN_LINE.format(c=i, d=100 + i, reason=reason)
            for i, reason in enumerate(r for texts in PINS.values() for r in texts)
        ]
        emulator.put_log_lines(aws["logs"], PROXY, lines, time.time() - 30)
        rds_proxy = f"{{enabled: true, interval: 1s, delay: {delay}s, logs: true}}"
        config = emulator.rds_proxy_only_config(
            moto, rds_proxy, "AKIAPGPRESSUREE2E001", "pgpressure-e2e-secret"
        )
        tmp = Path(tmpdir)
        with (
            hook.serve() as hook_url,
            run_daemon(config) as daemon,
            alertmanager(tmp, hook_url) as am_url,
            prometheus(tmp, daemon.url.removeprefix("http://"), am_url) as prom_url,
        ):

            def context() -> str:
                received = [(r, a["labels"]["alertname"], a["status"]) for r, a in hook.alerts()]
                return (
                    f"\nALERTS: {[a['metric'] for a in prom_query(prom_url, 'ALERTS')]}"
                    f"\nwebhook: {received}\ndaemon log: {daemon.log()[-1500:]}"
                )

            expect_firing(hook, RDS_PROXY_ALERTS, {"proxy": PROXY}, context)
            pins = {
                r["metric"]["reason"]: float(r["value"][1])
                for r in prom_query(prom_url, f'rds_proxy_pinning_events_total{{proxy="{PROXY}"}}')
            }
            assert {k: v for k, v in pins.items() if v} == {k: len(v) for k, v in PINS.items()}
            check_dashboards(
                prom_url,
                lambda q: (q.dashboard, q.panel) in RDS_PROXY_PANELS,
                {"job": "pgpressure", "proxy": PROXY},
            )

            publish_minute(aws["cloudwatch"], minute_read(delay), None, 1_000.0)
            expect_resolved(hook, RDS_PROXY_ALERTS, context)
            ratio = prom_query(prom_url, "job_proxy:rds_proxy_database_connections_pinned:ratio")
            assert [float(r["value"][1]) for r in ratio] == [0.0]
