"""The real fleet of issue 15, reproduced: gunicorn and uvicorn workers, a daemon, Prometheus.

Real servers run small instrumented services (tests/fleet_apps/) against the session's
PostgreSQL and push to a real daemon, which a real Prometheus scrapes every second with the
shipped rules, every `for:` and window divided by 60 (tests/promql_tools.py):

- gunicorn `-w 4 --preload --max-requests` under load recycles its workers many times over;
  at every moment the daemon must count each worker that has been serving for a few seconds
  and never more processes than the master has workers (it once counted every recycled
  worker until `stale_after`, 33 processes for 4, and the master besides), with connections
  within one process's pool of what `pg_stat_activity` shows; the checkouts counted must
  equal the requests served, and when the app stops, SQLAlchemyAppStoppedReporting must fire;
- uvicorn `--workers 2` with one worker holding every connection of its pool while callers
  wait, the other idle: SQLAlchemyPoolExhausted must fire though the sum over both workers
  is only half used;
- a second exporter that stops fires PgPressureExporterDown;
- a reload changes a target without a counter reset of the apps, and a bad file keeps the
  configuration in use and fires PgPressureConfigReloadFailed.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from exporter.devtools.cluster import Cluster
from exporter.devtools.daemon_process import DaemonProcess, free_port, logged_process, run_daemon
from tests.conftest import MONITOR_PASSWORD
from tests.promql_tools import ROOT, shortened_rules
from tests.test_e2e_alerting import _binary, _serve, prom_query, wait_until

pytest.importorskip("pgpressure_sqlalchemy", reason="the in-app client is not installed")
pytest.importorskip("gunicorn", reason="pip install gunicorn (the test extra)")
pytest.importorskip("uvicorn", reason="pip install uvicorn (the test extra)")

pytestmark = pytest.mark.slow

APPS = ROOT / "tests" / "fleet_apps"
BIN = Path(sys.executable).parent  # the servers' own scripts: their argv[0] names them
PUSH_INTERVAL = "0.5"  # seconds between an app process's reports
WORKERS, POOL_MAX = 4, 3  # gunicorn workers; wsgi_orders' pool_size + max_overflow
CHURN_SECONDS = 12.0
ALERT_WAIT = 45.0  # seconds for an alert to fire: scrape, rules, `for:` shortened to seconds


@dataclass
class Fleet:
    pg: Cluster
    dbname: str
    daemon: DaemonProcess  # what the apps push to; job "pgpressure"
    spare: DaemonProcess  # a second exporter, stopped by one test; job "pgpressure-spare"
    prometheus: str
    tmp: Path
    config: str  # the daemon's configuration as it started

    def app_env(self, app: str | None = None) -> dict[str, str]:
        env = {
            "FLEET_DSN": self.pg.dsn(dbname=self.dbname).replace(
                "postgresql://", "postgresql+psycopg://", 1
            ),
            "PGPRESSURE_ENDPOINT": self.daemon.url,
            "PGPRESSURE_INTERVAL": PUSH_INTERVAL,
        }
        return env | ({"PGPRESSURE_APP": app} if app else {})

    def query(self, expr: str) -> list[float]:
        return [float(r["value"][1]) for r in prom_query(self.prometheus, expr)]

    def firing(self, alert: str, **labels: str) -> bool:
        matchers = "".join(f',{k}="{v}"' for k, v in labels.items())
        return bool(self.query(f'ALERTS{{alertname="{alert}",alertstate="firing"{matchers}}}'))

    def sessions(self, app: str) -> dict[str, int]:
        """pg_stat_activity's sessions of the app (its application_name), by state."""
        out = self.pg.psql(
            "SELECT state, count(*) FROM pg_stat_activity "
            f"WHERE application_name = '{app}' GROUP BY state"
        )
        return {state: int(n) for state, n in (line.split("|") for line in out.splitlines())}

    def end_sessions(self, app: str) -> None:
        self.pg.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE application_name = '{app}'"
        )


# --- the world: PostgreSQL database, two exporters, Prometheus ----------------------------------
@contextlib.contextmanager
def prometheus(tmp: Path, jobs: dict[str, str]) -> Iterator[str]:
    (tmp / "rules.yml").write_text(yaml.safe_dump(shortened_rules(factor=60), sort_keys=False))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp / "rules.yml")],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [address]}]}
            for job, address in jobs.items()
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    args = [f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}"]
    with _serve("prometheus", _binary("prometheus"), args, tmp) as url:
        yield url


@pytest.fixture(scope="module")
def fleet(pg: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    dbname = "fleet_" + str(free_port())
    pg.psql(f"CREATE DATABASE {dbname}")
    config = f"""
databases:
  - name: main
    dsn: {pg.dsn(user="monitor", password=MONITOR_PASSWORD, dbname=dbname)}
    vcpus: 2
    activity: {{interval: 1s}}
    statements: {{enabled: false}}
ingest:
  enabled: true
  stale_after: 30s
"""
    tmp = tmp_path_factory.mktemp("fleet")
    try:
        with (
            run_daemon(config) as daemon,
            run_daemon("databases: []\ningest: {enabled: false}\n") as spare,
            prometheus(
                tmp,
                {
                    "pgpressure": daemon.url.removeprefix("http://"),
                    "pgpressure-spare": spare.url.removeprefix("http://"),
                },
            ) as prom,
        ):
            yield Fleet(pg, dbname, daemon, spare, prom, tmp, config)
    finally:
        pg.psql(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")


# --- the servers ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Server:
    url: str
    pid: int  # gunicorn's master, uvicorn's supervisor

    def workers(self) -> frozenset[str]:
        """Its worker processes now (its children), each with a pool of its own."""
        return frozenset(Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split())


@contextlib.contextmanager
def server(fleet: Fleet, name: str, cmd: list[str], env: dict[str, str]) -> Iterator[Server]:
    """Run a server on a free port in the fleet apps' folder, until it answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [arg.replace("{port}", str(port)) for arg in cmd]
    log = fleet.tmp / f"{name}.log"
    with logged_process(cmd, log, env, stop_timeout=20, cwd=APPS) as proc:
        try:
            wait_until(f"{name} answers", lambda: answers(url + "/ready"), 60)
        except AssertionError:
            raise AssertionError(f"{name} did not start:\n{log.read_text()[-3000:]}") from None
        yield Server(url, proc.pid)
        assert proc.poll() is None, f"{name} died:\n{log.read_text()[-3000:]}"


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


def gunicorn(fleet: Fleet, app: str, *args: str) -> contextlib.AbstractContextManager[Server]:
    cmd = [str(BIN / "gunicorn"), "-w", str(WORKERS), "--preload", "--name", app]
    cmd += ["-b", "127.0.0.1:{port}", *args, "wsgi_orders:app"]
    return server(fleet, app, cmd, fleet.app_env())  # the app is named by --name


def uvicorn(fleet: Fleet, app: str) -> contextlib.AbstractContextManager[Server]:
    cmd = [str(BIN / "uvicorn"), "--workers", "2", "--host", "127.0.0.1", "--port", "{port}"]
    cmd += ["--lifespan", "off", "--log-level", "warning", "asgi_orders:app"]
    return server(fleet, app, cmd, fleet.app_env(app))


def reach_workers(url: str, count: int) -> int:
    """Ping until `count` different workers have answered; returns the requests made (each
    one checkout)."""
    pids: list[str] = []

    def more() -> bool:
        pids.append(requests.get(url, timeout=5).text)
        return len(set(pids)) >= count

    wait_until(f"{count} workers answer", more, 60)
    return len(pids)


# --- load -----------------------------------------------------------------------------------
@dataclass
class Load:
    """Client threads requesting `url` as fast as the workers answer."""

    url: str
    threads: int = 6

    def __post_init__(self) -> None:
        self.served: collections.Counter[str] = collections.Counter()  # worker pid -> answers
        self.spans: dict[str, tuple[float, float]] = {}  # pid -> its first and last answer
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(self.threads)]

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            try:
                r = session.get(self.url, timeout=10)
            except requests.RequestException as exc:
                self.failures.append(repr(exc))
                continue
            with self._lock:
                if r.ok:
                    self.served[r.text] += 1
                    now = time.monotonic()
                    self.spans[r.text] = (self.spans.get(r.text, (now, now))[0], now)
                else:
                    self.failures.append(f"{r.status_code} {r.text[:200]}")

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def serving(self, since: float, until: float) -> int:
        """Workers that answered both by `since` and after `until`: in use all along."""
        return sum(1 for first, last in self.spans.values() if first <= since and last >= until)


LAG = 3.0  # seconds the daemon's view may trail: a push interval, the apps source's 1 s, a busy CPU


@dataclass(frozen=True)
class Truth:
    """What the app really has at `t`: worker processes, and its sessions in PostgreSQL."""

    t: float
    workers: frozenset[str]  # their pids
    pg_open: int
    pg_idle: int


@dataclass(frozen=True)
class View:
    """The daemon's view of the app's pool at `t`, from /metrics."""

    t: float
    processes: float
    maximum: float
    open: float  # used + idle
    idle: float


class Watch(threading.Thread):
    """Records the truth every 0.25 s while it runs."""

    def __init__(self, fleet: Fleet, app: str, server: Server) -> None:
        super().__init__(daemon=True)
        self.fleet, self.app, self.server = fleet, app, server
        self.truths: list[Truth] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.25):
            sessions = self.fleet.sessions(self.app)
            workers = self.server.workers()
            self.truths.append(
                Truth(time.monotonic(), workers, sum(sessions.values()), sessions.get("idle", 0))
            )

    def around(self, view: View) -> list[Truth] | None:
        """The truths the view may stand for: those of the LAG seconds before it; None for a
        view from before the load had run that long."""
        if not self.truths or view.t - LAG < self.truths[0].t:
            return None
        return [x for x in self.truths if view.t - LAG <= x.t <= view.t]


def view(fleet: Fleet, app: str) -> View:
    series = fleet.daemon.metrics()

    def value(name: str, **labels: str) -> float:
        return sum(
            v
            for ls, v in series.get(name, [])
            if ls.get("app") == app and all(ls.get(k) == w for k, w in labels.items())
        )

    idle = value("sqlalchemy_pool_connections", state="idle")
    return View(
        t=time.monotonic(),
        processes=value("sqlalchemy_app_processes"),
        maximum=value("sqlalchemy_pool_max_connections"),
        open=idle + value("sqlalchemy_pool_connections", state="used"),
        idle=idle,
    )


def within_one_pool(v: View, truths: list[Truth], serving: int) -> None:
    """The daemon's view against the truth of the LAG seconds before it: it counts every
    worker that served requests all that time, and never more processes than were alive at
    once (it once counted every recycled worker until stale_after, and the --preload master
    besides); its connections are at most PostgreSQL's plus one process's pool."""
    at_once = max(len(x.workers) for x in truths)
    assert serving <= v.processes <= at_once, (v, serving, truths)
    assert v.maximum == v.processes * POOL_MAX, v
    assert v.open <= max(x.pg_open for x in truths) + POOL_MAX, (v, truths)
    assert v.idle <= max(x.pg_idle for x in truths) + POOL_MAX, (v, truths)


# --- the tests ------------------------------------------------------------------------------
def test_gunicorn_worker_churn_tracks_pg_stat_activity_and_its_silence_fires(fleet: Fleet):
    app = "fleet-orders"
    views: list[View] = []
    # each worker lives for a few push intervals (as under --max-requests 1000 in production)
    recycle = ("--max-requests", "150", "--max-requests-jitter", "30")
    with gunicorn(fleet, app, *recycle) as srv, Load(srv.url) as load:
        watch = Watch(fleet, app, srv)
        watch.start()
        deadline = time.monotonic() + CHURN_SECONDS
        while time.monotonic() < deadline:
            time.sleep(0.5)
            views.append(view(fleet, app))
        watch.done.set()
        watch.join(10)
    served = sum(load.served.values())
    assert not load.failures, load.failures[:5]
    # workers were recycled many times over: the churn of the issue
    assert len(load.served) >= 2 * WORKERS, f"only {len(load.served)} worker pids served"
    judged = [(v, watch.around(v)) for v in views if watch.around(v)]
    assert len(judged) >= len(views) // 2, (views, watch.truths)
    for v, truths in judged:
        within_one_pool(v, truths, load.serving(v.t - LAG, v.t))
    # every checkout of every recycled worker counted, none twice
    wait_until(
        f"checkouts counted as the {served} requests served",
        lambda: fleet.daemon.value("sqlalchemy_pool_checkouts_total", app=app) == served,
        10,
    )
    # the stopped workers said they were leaving: gone now, not after stale_after (30 s)
    assert not fleet.daemon.value("sqlalchemy_app_processes", app=app)
    # and an app whose processes all stopped pages
    wait_until(
        "SQLAlchemyAppStoppedReporting fires",
        lambda: fleet.firing("SQLAlchemyAppStoppedReporting", app=app, job="pgpressure"),
        ALERT_WAIT,
    )


def test_one_exhausted_uvicorn_worker_fires_pool_exhausted(fleet: Fleet):
    app = "fleet-async"
    try:
        with uvicorn(fleet, app) as srv:
            url = srv.url
            reach_workers(url, 2)
            fleet.daemon.wait_for(
                lambda: fleet.daemon.value("sqlalchemy_app_processes", app=app) == 2
            )
            requests.get(url + "/exhaust", timeout=5).raise_for_status()
            wait_until(
                "SQLAlchemyPoolExhausted fires",
                lambda: fleet.firing("SQLAlchemyPoolExhausted", app=app),
                ALERT_WAIT,
            )
            # one worker: 5 of its 5 connections in use, 7 callers waiting; the other idle
            d = fleet.daemon
            assert d.value("sqlalchemy_pool_exhausted_processes", app=app) == 1
            assert d.value("sqlalchemy_pool_busiest_process_utilisation", app=app) == 1
            assert d.value("sqlalchemy_pool_pending_requests", app=app) == 7
            # which the sum over both workers hid: half the capacity used
            ratio = f'job_app_pool:sqlalchemy_pool_utilisation:ratio{{app="{app}"}}'
            assert fleet.query(ratio) == [0.5]
    finally:
        fleet.end_sessions(app)


def test_a_stopped_exporter_fires_exporter_down(fleet: Fleet):
    wait_until("the spare is scraped", lambda: fleet.query('up{job="pgpressure-spare"} == 1'), 20)
    fleet.spare.process.terminate()
    assert fleet.spare.process.wait(10) == 0
    wait_until(
        "PgPressureExporterDown fires",
        lambda: fleet.firing("PgPressureExporterDown", job="pgpressure-spare"),
        ALERT_WAIT,
    )
    assert not fleet.firing("PgPressureExporterDown", job="pgpressure")


def test_reload_changes_a_target_and_keeps_the_apps_counters(fleet: Fleet):
    """The apps' counters live in the daemon once their processes are gone: gunicorn recycles
    a worker every 4 requests here, so a reload that lost the aggregates would lose counts."""
    app = "fleet-reload"
    d = fleet.daemon
    # a target and ingest changed: new vCPUs for `main`, a longer stale_after
    changed = fleet.config.replace("vcpus: 2", "vcpus: 4").replace("after: 30s", "after: 40s")
    bad = changed.replace("activity: {interval: 1s}", "activity: {interval: 1s, top: 5}")
    job = '{job="pgpressure"}'
    counted = f'sqlalchemy_pool_checkouts_total{{app="{app}",job="pgpressure"}}'

    def pings(n: int, expected: int) -> None:
        for _ in range(n):
            requests.get(url, timeout=5).raise_for_status()
        wait_until(f"{expected} checkouts", lambda: fleet.query(counted) == [expected], 15)

    try:
        with gunicorn(fleet, app, "--max-requests", "4") as srv:
            url = srv.url
            pings(20, 20)  # 20 requests over 4 workers: at least one was recycled

            d.config_path.write_text(changed)
            assert d.session.post(d.url + "/-/reload", timeout=10).status_code == 200
            wait_until("the new vCPUs", lambda: fleet.query('pg_vcpus{target="main"}') == [4], 15)
            pings(10, 30)

            d.config_path.write_text(bad)
            answer = d.session.post(d.url + "/-/reload", timeout=10)
            assert answer.status_code == 500
            line = 1 + bad.splitlines().index("    activity: {interval: 1s, top: 5}")
            assert f"line {line}:" in answer.text, answer.text
            assert "databases[0].activity.top: unknown key" in answer.text
            wait_until(
                "the failed reload is seen",
                lambda: fleet.query(f"pgpressure_config_last_reload_successful{job}") == [0],
                15,
            )
            wait_until(
                "PgPressureConfigReloadFailed fires",
                lambda: fleet.firing("PgPressureConfigReloadFailed", job="pgpressure"),
                ALERT_WAIT,
            )
            pings(10, 40)
            assert fleet.query('pg_vcpus{target="main"}') == [4]  # the configuration in use
            # Prometheus saw the counter grow through both reloads, never start over
            assert fleet.query(f"resets({counted}[5m])") == [0]
    finally:
        d.config_path.write_text(fleet.config)
        d.session.post(d.url + "/-/reload", timeout=10)
