"""Wiring and lifecycle: store, sources, scheduler, web server, signals.

APScheduler's asyncio scheduler runs each source on its own interval, missed runs coalesced;
the runner skips a tick while the previous run of the same source is still going. All I/O is
awaited, so a slow database delays the samples of its own target (its activity and database
sources share one connection) and nothing else: /metrics is rendered from the store. SIGTERM
and SIGINT stop everything within a couple of seconds, cancelling runs in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import ssl
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from exporter.config import Config
from exporter.core.cardinality import LabelCap
from exporter.core.render import Renderer
from exporter.core.runner import SourceRunner
from exporter.core.selfmetrics import SelfMetrics
from exporter.core.source import Source
from exporter.core.store import Store
from exporter.http.connlimit import DEFAULT_MAX_CONNECTIONS, CappedSite
from exporter.http.routes import build_app
from exporter.http.status import DaemonStatus, SourceStatus, TargetStatus
from exporter.logs import kv
from exporter.postgres.activity import ActivitySource
from exporter.postgres.connection import TargetConnection
from exporter.postgres.database import DatabaseSource

log = logging.getLogger("pgpressure.daemon")

REFUSAL_LOG_EVERY = 60.0  # seconds between log lines about connections refused at the cap
SHUTDOWN_GRACE = 1.5  # seconds; SIGTERM must end the process within 2 s


def parse_listen_address(address: str) -> tuple[str | None, int]:
    """`:9188`, `0.0.0.0:9188`, `[::1]:9188` -> (host, port); host None means every
    interface, IPv4 and IPv6, as the Prometheus exporters do with `:9188`."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"invalid --web.listen-address {address!r}: expected HOST:PORT")
    return host.strip("[]") or None, int(port)


class Daemon:
    def __init__(
        self,
        config: Config,
        listen_address: str = ":9188",
        ssl_context: ssl.SSLContext | None = None,
        middlewares: list[Callable] | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.config = config
        self.listen_address = listen_address
        self.max_connections = max_connections
        self._refusal_logged_at = -math.inf
        self.ssl_context = ssl_context
        self.middlewares = middlewares or []
        self.store = Store()
        self.own_series = SelfMetrics(self.store)
        self.renderer = Renderer(self.store, self.own_series.samples)
        self.connections = [TargetConnection(db) for db in config.databases]
        self.sources: list[Source] = []
        self.database_sources: list[DatabaseSource] = []
        for conn in self.connections:
            # One datname cap per target, so its sources agree on which databases are other.
            datnames = LabelCap(conn.config.max_datnames)
            self.sources.append(ActivitySource(conn.config, conn, datnames))
            db_source = DatabaseSource(conn.config, conn, datnames)
            self.database_sources.append(db_source)
            self.sources.append(db_source)
        self.ingest = None
        if config.ingest.enabled:
            from exporter.ingest import Ingest

            self.ingest = Ingest(config.ingest)
            self.sources.append(self.ingest)
        if config.aws.rds_proxy.enabled or any(db.aws for db in config.databases):
            from exporter.aws.wiring import aws_sources  # boto3 only when AWS is configured

            self.sources += aws_sources(config, self.sources)
        self.runners = [SourceRunner(s, self.store) for s in self.sources]
        self._stop = asyncio.Event()
        self.bound_port: int | None = None

    # -- queries from the web layer ---------------------------------------------------------
    def ready(self) -> bool:
        return all(r.attempts > 0 for r in self.runners)

    def status(self) -> DaemonStatus:
        """Each target with its sources' state, the daemon-wide sources, the app processes."""
        sources = [self._source_status(runner) for runner in self.runners]
        targets = tuple(
            TargetStatus(
                db.name, db.dsn, db.vcpus, tuple(s for s in sources if s.target == db.name)
            )
            for db in self.config.databases
        )
        names = {db.name for db in self.config.databases}
        return DaemonStatus(
            targets=targets,
            daemon_wide=tuple(s for s in sources if s.target not in names),
            app_processes=None if self.ingest is None else self.ingest.live_processes(),
        )

    def _source_status(self, runner: SourceRunner) -> SourceStatus:
        health = self.store.health(runner.key)
        return SourceStatus(
            source=runner.key[0],
            target=runner.key[1],
            up=health.up,
            attempts=runner.attempts,
            last_success=health.last_success,
            last_error=health.last_error,
            details=runner.source.status(),
        )

    def pinning_offenders(self) -> dict[str, list[dict]]:
        return {
            s.target: s.pinning.top_offenders()
            for s in self.database_sources
            if s.pinning is not None
        }

    # -- lifecycle --------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        runner = await self._serve()
        scheduler = self._schedule(AsyncIOScheduler(event_loop=loop))
        scheduler.start()
        try:
            await self._stop.wait()
        finally:
            log.info("shutting down")
            scheduler.shutdown(wait=False)
            await self._close(runner)

    async def _serve(self) -> web.AppRunner:
        """Start answering HTTP on the listen address, connections capped."""
        runner = web.AppRunner(
            build_app(self, self.middlewares), access_log=None, shutdown_timeout=0.5
        )
        await runner.setup()
        host, port = parse_listen_address(self.listen_address)
        site = CappedSite(
            runner,
            host,
            port,
            max_connections=self.max_connections,
            on_refused=self._http_connection_refused,
            ssl_context=self.ssl_context,
        )
        await site.start()
        self.bound_port = site.bound_port
        log.info(
            "listening",
            extra=kv(
                address=f"{host or ''}:{self.bound_port or port}",
                tls=self.ssl_context is not None,
            ),
        )
        return runner

    def _schedule(self, scheduler: AsyncIOScheduler) -> AsyncIOScheduler:
        """One interval job per source, first runs staggered."""
        start = datetime.now()
        for i, source_runner in enumerate(self.runners):
            interval = source_runner.source.interval
            scheduler.add_job(
                source_runner.run_once,
                "interval",
                seconds=interval,
                # Stagger first runs slightly so targets do not all query in the same instant.
                next_run_time=start + timedelta(milliseconds=10 * i),
                # The runner skips ticks while a run is in flight (quietly: see runner.py);
                # APScheduler's own limit would log a warning on every skipped tick.
                max_instances=3,
                coalesce=True,
                misfire_grace_time=max(1, int(interval)),
                id=f"{source_runner.key[0]}:{source_runner.key[1]}",
            )
            log.info(
                "source scheduled",
                extra=kv(
                    source=source_runner.key[0],
                    target=source_runner.key[1],
                    interval=f"{interval:g}s",
                ),
            )
        return scheduler

    def _http_connection_refused(self) -> None:
        """Count a connection closed at the cap; say so in the log at most once a minute."""
        self.own_series.connection_refused()
        now = time.monotonic()
        if now - self._refusal_logged_at >= REFUSAL_LOG_EVERY:
            self._refusal_logged_at = now
            log.warning(
                "refusing connections: too many open",
                extra=kv(
                    max_connections=self.max_connections,
                    refused_total=self.own_series.http_connections_refused,
                ),
            )

    async def _close(self, runner: web.AppRunner) -> None:
        async def close_all() -> None:
            await asyncio.gather(*(r.stop() for r in self.runners), return_exceptions=True)
            await asyncio.gather(*(s.close() for s in self.sources), return_exceptions=True)
            await asyncio.gather(*(c.close() for c in self.connections), return_exceptions=True)
            await runner.cleanup()

        try:
            await asyncio.wait_for(close_all(), SHUTDOWN_GRACE)
        except TimeoutError:
            log.warning("shutdown grace period expired; exiting anyway")
