"""`pgpressure demo`: a throwaway PostgreSQL, a small instrumented workload, and the daemon.

Everything runs in this one process and under one temporary directory, which Ctrl-C (or
`--duration`) removes:

- PostgreSQL from the system's binaries (`exporter.devtools.cluster.Cluster`), with a deliberately
  small `work_mem` (64kB) so sorts and hashes spill to temporary files, and a `pgpressure`
  role that has only `pg_monitor`, as in production. Without system binaries the optional
  `pgserver` package (a pip-installable PostgreSQL) is tried; it has no pg_stat_statements
  preloaded, so the statement metrics stay empty there.
- A SQLAlchemy workload, instrumented with `pgpressure_sqlalchemy` when that is available,
  cycling through phases: CPU load, lock waits (a row held `FOR UPDATE`), temp spills and
  pool pressure (more threads than the pool has connections, a short `pool_timeout`). Each
  phase is light (at most a couple of busy sessions) so a 2-core laptop stays usable.
- With `moto[server]` installed, a local AWS emulator with one RDS Proxy, synthetic
  CloudWatch datapoints and pinning log lines, polled by the rds_proxy source.
- The daemon itself, in the main thread's event loop; it handles SIGINT/SIGTERM.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from exporter.devtools import aws_emulator as emulator
from exporter.logs import kv

log = logging.getLogger("pgpressure.demo")

PHASES = ("cpu", "spill", "locks", "pool")
PHASE_SECONDS = 20.0  # long enough to tell phases apart on a dashboard; shorter with --duration
PROXY = "demo-proxy"
WORK_MEM = "64kB"
# The emulator accepts any keys; these are registered as secrets by the config like real ones.
FAKE_KEY_ID = "AKIAPGPRESSUREDEMO00"
FAKE_SECRET = "pgpressure-demo-fake-secret-key"


def _say(line: str = "") -> None:
    print(line, flush=True)


def _public_host(host: str | None) -> str:
    return "localhost" if host in (None, "", "0.0.0.0", "::") else host


# --- PostgreSQL ------------------------------------------------------------------------------
class _Database:
    """The throwaway server: system binaries first, the `pgserver` package as a fallback."""

    def __init__(self, base: Path) -> None:
        from exporter.devtools.cluster import Cluster, ClusterError

        self.statements = True
        self._pgserver: Any = None
        try:
            self.cluster: Any = Cluster(
                base=base / "pg",
                settings={"work_mem": f"'{WORK_MEM}'", "max_connections": "100"},
            )
        except ClusterError as exc:
            if importlib.util.find_spec("pgserver") is None:
                raise ClusterError(
                    f"{exc}; or install the optional fallback: pip install pgserver"
                ) from None
            self.cluster = None
            self.statements = False
            self._base = base / "pgserver"

    def start(self) -> None:
        if self.cluster is not None:
            self.cluster.init().start()
            self.cluster.wait_ready()
            return
        import pgserver  # optional extra: a PostgreSQL build shipped as a wheel

        logging.getLogger("pgserver").setLevel(logging.WARNING)  # it logs every command

        self._pgserver = pgserver.get_server(str(self._base), cleanup_mode="delete")
        self._pgserver.psql(f"ALTER SYSTEM SET work_mem = '{WORK_MEM}'; SELECT pg_reload_conf()")

    def psql(self, sql: str, dbname: str = "postgres") -> None:
        if self.cluster is not None:
            self.cluster.psql(sql, dbname=dbname)
        else:
            self._pgserver.psql(sql if dbname == "postgres" else f"\\c {dbname}\n{sql}")

    def url(self, user: str, dbname: str, driver: str = "postgresql") -> str:
        if self.cluster is not None:
            dsn = self.cluster.dsn(user=user, dbname=dbname)
        else:
            # postgresql://postgres:@/db?host=/socket/dir -> the same as `user`
            parts = urlsplit(self._pgserver.get_uri(dbname))
            dsn = urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc.rpartition('@')[2]}"))
        return dsn.replace("postgresql://", f"{driver}://", 1)

    def destroy(self) -> None:
        if self.cluster is not None:
            self.cluster.destroy()
        elif self._pgserver is not None:
            with contextlib.suppress(Exception):
                self._pgserver.cleanup()


_SCHEMA = """
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, 10) g;
CREATE TABLE orders (id bigserial PRIMARY KEY, account int NOT NULL, amount int NOT NULL,
                     note text NOT NULL);
INSERT INTO orders (account, amount, note)
  SELECT 1 + g % 10, g % 997, md5(g::text) FROM generate_series(1, 40000) g;
ANALYZE;
"""


def _setup_database(db: _Database) -> None:
    db.psql("CREATE ROLE pgpressure LOGIN; GRANT pg_monitor TO pgpressure")
    db.psql("CREATE ROLE shop LOGIN")
    db.psql("CREATE DATABASE shop OWNER shop")
    if db.statements:
        db.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements", dbname="shop")
    db.psql("SET ROLE shop;" + _SCHEMA, dbname="shop")


# --- the workload ------------------------------------------------------------------------------
class Workload:
    """Threads that run one phase at a time; every phase also keeps a trickle of OLTP."""

    def __init__(
        self,
        url: str,
        endpoint: str | None,
        stop: threading.Event,
        phase_seconds: float = PHASE_SECONDS,
    ) -> None:
        from sqlalchemy import create_engine

        self.stop = stop
        self.phase_seconds = phase_seconds
        self.phase = PHASES[0]
        self.errors = 0
        connect_args = {
            "application_name": "shop",
            "options": "-c lock_timeout=4s -c statement_timeout=10s",
        }
        # Small on purpose: 3 + 2 connections and a 0.5 s pool timeout make the pool phase
        # wait and occasionally raise "QueuePool limit ... connection timed out".
        self.engine = create_engine(
            url,
            pool_size=3,
            max_overflow=2,
            pool_timeout=0.5,
            pool_pre_ping=False,
            connect_args=connect_args,
        )
        self.instrumented = False
        if endpoint is not None:
            from pgpressure_sqlalchemy import instrument

            instrument(self.engine, app="shop", endpoint=endpoint, interval=1)
            self.instrumented = True
        self.threads: list[threading.Thread] = []

    # each worker: (phase it runs in or None for always, function)
    def start(self) -> None:
        workers: list[tuple[str | None, Callable[[], None]]] = [
            (None, self._oltp),
            ("cpu", self._cpu),
            ("cpu", self._cpu),
            ("locks", self._lock_holder),
            ("locks", self._lock_waiter),
            ("locks", self._lock_waiter),
            ("spill", self._spill),
            *[("pool", self._pool_user) for _ in range(8)],
        ]
        self.threads.append(threading.Thread(target=self._cycle, name="demo-phases", daemon=True))
        for i, (phase, fn) in enumerate(workers):
            self.threads.append(
                threading.Thread(
                    target=self._loop, args=(phase, fn), name=f"demo-{phase}-{i}", daemon=True
                )
            )
        for t in self.threads:
            t.start()

    def join(self, timeout: float = 12.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.engine.dispose()

    def _cycle(self) -> None:
        i = 0
        while not self.stop.wait(self.phase_seconds):
            i += 1
            self.phase = PHASES[i % len(PHASES)]
            log.info("demo phase", extra=kv(phase=self.phase))

    def _loop(self, phase: str | None, fn: Callable[[], None]) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        while not self.stop.is_set():
            if phase is not None and self.phase != phase:
                self.stop.wait(0.2)
                continue
            try:
                fn()
            except SQLAlchemyError:
                # lock_timeout, pool timeouts, shutdown: expected here, and what we want to see
                self.errors += 1
                self.stop.wait(0.1)

    def _run(self, sql: str, **params: Any) -> None:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            conn.execute(text(sql), params)
            conn.commit()

    # -- phases --
    def _oltp(self) -> None:
        from sqlalchemy import text

        with self.engine.begin() as conn:
            account = random.randint(1, 10)
            conn.execute(
                text("INSERT INTO orders (account, amount, note) VALUES (:a, :m, 'demo')"),
                {"a": account, "m": random.randint(1, 500)},
            )
            conn.execute(
                text("SELECT count(*), sum(amount) FROM orders WHERE account = :a AND id > :i"),
                {"a": account, "i": random.randint(1, 39000)},
            )
        self.stop.wait(0.2)

    def _cpu(self) -> None:
        # The set-returning function in the select list runs value-per-call: CPU, no temp file.
        self._run("SELECT sum(x) FROM (SELECT sqrt(generate_series(1, 1500000)) AS x) s")
        self.stop.wait(0.05)

    def _lock_holder(self) -> None:
        from sqlalchemy import text

        with self.engine.begin() as conn:
            conn.execute(text("SELECT balance FROM accounts WHERE id = 1 FOR UPDATE"))
            self.stop.wait(2.5)  # idle in transaction while holding the row lock
        self.stop.wait(0.2)

    def _lock_waiter(self) -> None:
        self._run("UPDATE accounts SET balance = balance + 1 WHERE id = 1")
        self.stop.wait(0.1)

    def _spill(self) -> None:
        # Sorting ~40k rows with 64kB of work_mem writes temporary files.
        self._run("SELECT account, note FROM orders ORDER BY note DESC LIMIT 5")
        self._run("SELECT count(DISTINCT note) FROM orders")
        self.stop.wait(0.3)

    def _pool_user(self) -> None:
        self._run("SELECT pg_sleep(0.4)")
        self.stop.wait(0.05)


# --- the AWS emulator ------------------------------------------------------------------------
class AwsEmulator:
    """The tests' AWS emulator (moto's server, exporter.devtools.aws_emulator) with one RDS
    Proxy, CloudWatch datapoints every whole minute and pinning log lines every few seconds."""

    REGION = emulator.REGION

    def __init__(self, stop: threading.Event) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.stop = stop
        self._server = contextlib.ExitStack()
        self.url = ""
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.url = self._server.enter_context(emulator.moto_server())
        world = emulator.clients(self.url, "ec2", "rds", "logs", "cloudwatch")
        emulator.create_proxy(
            world["rds"], PROXY, emulator.create_subnets(world["ec2"], self.REGION)
        )
        self.logs, self.cloudwatch = world["logs"], world["cloudwatch"]
        self._fed: set[int] = set()
        self._feed(create_log_group=True)
        self.thread = threading.Thread(target=self._run, name="demo-aws", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(3.0):
            with contextlib.suppress(Exception):
                self._feed()

    def _feed(self, create_log_group: bool = False) -> None:
        """One datapoint per metric for each of the last five whole minutes not fed yet (the
        source reads a delayed window of 60 s periods), and two pinning log lines now."""
        base = int(time.time() // 60 * 60)
        for minute in (base - 60 * k for k in range(1, 6)):
            if minute in self._fed:
                continue
            self._fed.add(minute)
            when = datetime.fromtimestamp(minute, UTC)
            for name, value in _proxy_minute().items():
                emulator.put_datapoints(self.cloudwatch, PROXY, name, [value], when)
        lines = random.sample(_PIN_LINES, 2)
        emulator.put_log_lines(self.logs, PROXY, lines, time.time(), create=create_log_group)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._server.close()


def _proxy_minute() -> dict[str, float]:
    """One minute of a busy proxy that pins about half of its database connections."""
    connections = random.randint(18, 24)
    return {
        "DatabaseConnections": connections,
        "DatabaseConnectionsCurrentlySessionPinned": random.randint(8, connections),
        "DatabaseConnectionsCurrentlyBorrowed": random.randint(4, 12),
        "DatabaseConnectionsCurrentlyInTransaction": random.randint(1, 6),
        "MaxDatabaseConnectionsAllowed": 90,
        "ClientConnections": random.randint(40, 60),
        "DatabaseConnectionsBorrowLatency": random.randint(800, 30_000),  # microseconds
        "QueryDatabaseResponseLatency": random.randint(2_000, 9_000),
    }


_PIN_LINES = [
    emulator.PIN_LINE.format(c=101, d=9001, reason="A parse message was detected."),
    emulator.PIN_LINE.format(
        c=102, d=9002, reason=emulator.SETTINGS_REASON.format(digest="set search_path to $1")
    ),
    emulator.PIN_LINE.format(c=103, d=9003, reason="A temporary table was created."),
    emulator.PIN_LINE.format(c=104, d=9004, reason="The session acquired an advisory lock."),
]


# --- wiring ------------------------------------------------------------------------------------
def _config_yaml(target_dsn: str, vcpus: int, ingest: bool, aws_url: str | None) -> str:
    aws = ""
    if aws_url is not None:
        aws = f"""
aws:
  region: {AwsEmulator.REGION}
  endpoint_url: {aws_url}
  access_key_id: {FAKE_KEY_ID}
  secret_access_key: {FAKE_SECRET}
  rds_proxy:
    enabled: true
    interval: 5s
    delay: 1s
    discovery_interval: 60s
"""
    return f"""
databases:
  - name: demo
    dsn: {target_dsn}
    vcpus: {vcpus}
    activity: {{interval: 1s}}
    statements: {{enabled: true, top_n: 20, interval: 5s}}
ingest:
  enabled: {"true" if ingest else "false"}
  stale_after: 15s
{aws}"""


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def run_demo(listen_address: str, duration: float | None) -> int:
    from exporter.config import ConfigError
    from exporter.daemon import parse_listen_address
    from exporter.devtools.cluster import ClusterError

    try:
        parse_listen_address(listen_address)
    except ValueError as exc:
        print(f"pgpressure: {exc}", file=sys.stderr)
        return 1
    missing = [m for m in ("sqlalchemy", "psycopg") if not _available(m)]
    if missing:
        print(
            f"pgpressure demo: needs {', '.join(missing)}: "
            "pip install '.[demo]' (scripts/setup.sh does)",
            file=sys.stderr,
        )
        return 1
    demo = _Demo()
    try:
        demo.start_backends()
        demo.serve(listen_address, duration)
        return 0
    except OSError as exc:
        print(f"pgpressure: cannot listen on {listen_address}: {exc}", file=sys.stderr)
        return 1
    except (ClusterError, ConfigError) as exc:
        print(f"pgpressure demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        demo.close()


class _Demo:
    """The demo's parts, each started at most once and all removed by close()."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="pgpressure-demo-"))
        os.chmod(self.workdir, 0o755)  # PostgreSQL runs as `postgres` when we are root
        self.stop = threading.Event()
        self.db: _Database | None = None
        self.workload: Workload | None = None
        self.aws: AwsEmulator | None = None
        # The in-app client is its own distribution: without it the workload runs
        # uninstrumented and the banner says how to add it.
        self.instrumented = _available("pgpressure_sqlalchemy")
        _say(f"pgpressure demo: temporary data in {self.workdir}")

    def start_backends(self) -> None:
        _say("starting a throwaway PostgreSQL ...")
        self.db = _Database(self.workdir)
        self.db.start()
        _setup_database(self.db)
        if _available("moto"):
            _say(f"starting the AWS emulator (moto) with RDS Proxy '{PROXY}' ...")
            self.aws = AwsEmulator(self.stop)
            self.aws.start()
        else:
            _say(
                "AWS emulator not installed (pip install 'moto[server]'): "
                "skipping the RDS Proxy part."
            )

    def serve(self, listen_address: str, duration: float | None) -> None:
        """The daemon in this thread's event loop, the workload once it listens."""
        import asyncio

        from exporter.config import parse
        from exporter.daemon import Daemon, parse_listen_address

        assert self.db is not None
        yaml = _config_yaml(
            self.db.url("pgpressure", "shop"),
            os.cpu_count() or 2,
            self.instrumented,
            self.aws.url if self.aws else None,
        )
        # The address exactly as given: host None (":9188") means every interface.
        daemon = Daemon(parse(yaml, "<demo config>"), listen_address)
        host, port = parse_listen_address(listen_address)
        shown = _public_host(host)
        endpoint = f"http://{'127.0.0.1' if shown == 'localhost' else shown}:{port}"

        async def main() -> None:
            loop = asyncio.get_running_loop()
            serving = loop.create_task(daemon.run())
            await asyncio.sleep(0.3)
            if serving.done():
                serving.result()  # e.g. the port is taken: raise now
            self.start_workload(endpoint, duration)
            _banner(f"http://{shown}:{port}", self.db, self.workload, self.aws, duration)
            if duration is not None:
                loop.call_later(duration, daemon.stop)
            await serving

        asyncio.run(main())

    def start_workload(self, endpoint: str, duration: float | None) -> None:
        assert self.db is not None
        # With --duration, every phase gets its turn within it.
        phase_seconds = PHASE_SECONDS if duration is None else duration / len(PHASES)
        self.workload = Workload(
            self.db.url("shop", "shop", "postgresql+psycopg"),
            endpoint if self.instrumented else None,
            self.stop,
            max(3.0, min(PHASE_SECONDS, phase_seconds)),
        )
        self.workload.start()

    def close(self) -> None:
        _say("stopping the demo ...")
        self.stop.set()
        if self.workload is not None:
            self.workload.join()
        if self.aws is not None:
            self.aws.close()
        if self.db is not None:
            self.db.destroy()
        shutil.rmtree(self.workdir, ignore_errors=True)
        _say(f"removed {self.workdir}")


def _banner(
    base: str, db: _Database, workload: Workload, aws: AwsEmulator | None, duration: float | None
) -> None:
    lines = [
        "",
        "pgpressure demo is running.",
        f"  landing page   {base}/",
        f"  metrics        {base}/metrics",
        f"  pinning risk   {base}/api/v1/pinning-risk",
        f"  database       {db.url('shop', 'shop')}   (work_mem {WORK_MEM})",
    ]
    if aws is not None:
        lines.append(f"  AWS emulator   {aws.url}   (RDS Proxy '{PROXY}')")
    if not workload.instrumented:
        lines.append(
            "  (no pool metrics: the in-app client is not installed: "
            "pip install ./pgpressure-sqlalchemy)"
        )
    lines += [
        "",
        f"The workload cycles {' -> '.join(PHASES)}, {workload.phase_seconds:g} s each. Try:",
        f"  curl -s {base}/metrics | grep -E "
        "'^(pg_active_session_seconds_total|pg_temp_bytes_total|sqlalchemy_pool_)'",
        "  PromQL: sum by (wait_event_type) (rate(pg_active_session_seconds_total[1m]))",
        "Point a Prometheus at it (README: 'Prometheus scrape config') and import dashboards/.",
        f"Stops after {duration:g} s." if duration is not None else "Ctrl-C stops everything.",
        "",
    ]
    _say("\n".join(lines))
