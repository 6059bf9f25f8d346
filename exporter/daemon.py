"""Wiring and lifecycle: store, sources, scheduler, web server, signals.

APScheduler's asyncio scheduler runs each source on its own interval, missed runs coalesced;
the runner skips a tick while the previous run of the same source is still going. All I/O is
awaited, so a slow database delays the samples of its own target (its activity and database
sources share one connection) and nothing else: /metrics is rendered from the store. SIGTERM
and SIGINT stop everything within a couple of seconds, cancelling runs in flight; SIGHUP (or
POST /-/reload) re-reads the configuration file and applies what changed (`exporter.reload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import signal
import ssl
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from exporter.aws.rds_proxy import RdsProxySource
from exporter.config import Config
from exporter.core.cardinality import LabelCap
from exporter.core.render import Renderer
from exporter.core.runner import SourceRunner
from exporter.core.selfmetrics import SelfMetrics
from exporter.core.source import Source
from exporter.core.store import Store
from exporter.diagnosis.engine import DiagnosisSource, risky_reader
from exporter.http.connlimit import DEFAULT_MAX_CONNECTIONS, CappedSite
from exporter.http.routes import build_app
from exporter.http.status import DaemonStatus, SourceStatus, TargetStatus
from exporter.logs import kv
from exporter.metrics import Sample
from exporter.pinning import report
from exporter.postgres.activity import ActivitySource
from exporter.postgres.connection import TargetConnection
from exporter.postgres.database import DatabaseSource
from exporter.reload import Build, Part, Plan, Reloader, ReloadStatus, plan

if TYPE_CHECKING:
    from exporter.ingest import Ingest

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


def config_slices(config: Config) -> dict[str, object]:
    """The configuration cut into the parts that are built, and on reload replaced, together
    (see `exporter.reload`): each target, ingest, the AWS sources. Targets come first: the
    AWS sources are given their activity sources."""
    slices: dict[str, object] = {f"target:{db.name}": db for db in config.databases}
    if config.ingest.enabled:
        slices["ingest"] = config.ingest
    aws_targets = tuple(db for db in config.databases if db.aws is not None)
    if config.aws.rds_proxy.enabled or aws_targets:
        # with the targets it reads for, whose activity sources it feeds
        slices["aws"] = (config.aws, aws_targets)
    if config.diagnosis.enabled:
        slices["diagnosis"] = config.diagnosis  # last: it reads what every other part samples
    return slices


def build_part(
    config: Config,
    key: str,
    piece: Any,
    sources: list[Source],
    store: Store | None = None,
    running: Callable[[], list[Source]] | None = None,
) -> Part:
    """The sources (and connection) of one part of the configuration; no I/O. `sources`:
    those of the parts built before it; `running`: the daemon's sources as they are now."""
    if key.startswith("target:"):
        conn = TargetConnection(piece)
        # One datname cap per target, so its sources agree on which databases are other.
        datnames = LabelCap(piece.max_datnames)
        activity = ActivitySource(piece, conn, datnames)
        return Part(piece, [activity, DatabaseSource(piece, conn, datnames)], [conn])
    if key == "ingest":
        from exporter.ingest import Ingest

        ingest = Ingest(piece)
        return Part(piece, [ingest], update=ingest.reconfigure)
    if key == "aws":
        from exporter.aws.wiring import aws_sources  # boto3 only when AWS is configured

        return Part(piece, aws_sources(config, sources))
    if key == "diagnosis" and store is not None:
        # The pinning-risk reports of the targets running at each evaluation, not of those at
        # build time: a reload replaces targets and keeps the diagnosis (and its history).
        current = running or (lambda: sources)
        return Part(piece, [DiagnosisSource(piece, store, lambda: risky_reader(current())())])
    raise ValueError(f"no part of the configuration is called {key!r}")


class Daemon:
    def __init__(
        self,
        config: Config,
        listen_address: str = ":9188",
        ssl_context: ssl.SSLContext | None = None,
        middlewares: list[Callable] | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        config_file: str | Path | None = None,
    ) -> None:
        """`config_file`: where SIGHUP and POST /-/reload re-read the configuration from."""
        self.config = config
        self.listen_address = listen_address
        self.max_connections = max_connections
        self._refusal_logged_at = -math.inf
        self.ssl_context = ssl_context
        self.middlewares = middlewares or []
        self.store = Store()
        self.own_series = SelfMetrics(self.store)
        self.reloader = Reloader(config_file, self._prepare, self._commit, ReloadStatus(self.store))
        self.renderer = Renderer(self.store, self._own_samples)
        self.parts = plan({}, config_slices(config), self._builder(config)).parts
        for part in self.parts.values():
            part.runners = [SourceRunner(s, self.store) for s in part.sources]
        self._stop = asyncio.Event()
        self._scheduler: AsyncIOScheduler | None = None
        self._background: set[asyncio.Task] = set()
        self.bound_port: int | None = None

    # -- what runs, across the parts ----------------------------------------------------------
    @property
    def runners(self) -> list[SourceRunner]:
        return [r for part in self.parts.values() for r in part.runners]

    @property
    def sources(self) -> list[Source]:
        return [s for part in self.parts.values() for s in part.sources]

    @property
    def ingest(self) -> Ingest | None:
        part = self.parts.get("ingest")
        return None if part is None else part.sources[0]

    @property
    def diagnosis(self) -> DiagnosisSource | None:
        part = self.parts.get("diagnosis")
        return None if part is None else part.sources[0]

    def _own_samples(self) -> list[Sample]:
        return [*self.own_series.samples(), *self.reloader.status.samples()]

    # -- queries from the web layer ---------------------------------------------------------
    def ready(self) -> bool:
        return all(r.attempts > 0 for r in self.runners)

    def status(self) -> DaemonStatus:
        """Each target with its sources' state, the daemon-wide sources, the app processes."""
        sources = [self._source_status(runner) for runner in self.runners]
        vcpus = {s.target: s.vcpus() for s in self.sources if isinstance(s, ActivitySource)}
        targets = tuple(
            TargetStatus(
                db.name,
                db.dsn,
                *vcpus.get(db.name, (db.vcpus, "config")),
                tuple(s for s in sources if s.target == db.name),
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

    def pinning_report(self) -> dict[str, object]:
        """`/api/v1/pinning-risk`: per target the statements that would pin; per proxy the
        statements its logs say pinned, joined to those rows; the driver fingerprints seen,
        with their fix."""
        offenders = {
            s.target: s.pinning.top_offenders()
            for s in self.sources
            if isinstance(s, DatabaseSource) and s.pinning is not None
        }
        logs: dict[str, dict[str, object]] = {}
        for source in self.sources:
            if isinstance(source, RdsProxySource):
                logs.update(source.pinning_logs())
        pins: dict[str, float] = {}
        for proxy in logs.values():
            for fp_id, n in proxy["pins_by_fingerprint"].items():
                pins[fp_id] = pins.get(fp_id, 0.0) + n
        apps = report.app_warnings(
            self.ingest.aggregator.proxy_warnings() if self.ingest is not None else []
        )
        return {
            "targets": offenders,
            "proxies": {
                name: {"statements": report.name_log_pins(proxy["statements"], offenders)}
                for name, proxy in logs.items()
            },
            "apps": apps,
            "fingerprints": report.fingerprint_summary(offenders, pins, apps),
        }

    # -- lifecycle --------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, self._reload_in_background)
        runner = await self._serve()
        scheduler = self._scheduler = AsyncIOScheduler(event_loop=loop)
        self._schedule(self.runners)
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
            on_header_timeout=self.own_series.header_timeout,
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

    def _schedule(self, runners: list[SourceRunner]) -> None:
        """One interval job per source, first runs staggered."""
        start = datetime.now()
        for i, source_runner in enumerate(runners):
            interval = source_runner.source.interval
            self._scheduler.add_job(
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

    # -- reload -------------------------------------------------------------------------------
    async def reload(self) -> str | None:
        """Re-read the configuration file and apply what changed (see `exporter.reload`):
        None when done, else why not, the configuration in use kept."""
        return await self.reloader.reload()

    def _reload_in_background(self) -> None:
        """SIGHUP: reload as a task of its own (a signal handler must not block the loop)."""
        task = asyncio.get_running_loop().create_task(self.reload())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _prepare(self, config: Config) -> Plan:
        """The new parts of this configuration, built but not started; raises if one cannot
        be built, before anything has changed."""
        return plan(self.parts, config_slices(config), self._builder(config))

    def _builder(self, config: Config) -> Build:
        return functools.partial(build_part, config, store=self.store, running=lambda: self.sources)

    async def _commit(self, config: Config, change: Plan) -> None:
        """Stop what the plan drops or replaces (their series leave the store), update what
        takes its change in place, then start the new parts. Never raises."""
        stopping = [r for part in change.stop.values() for r in part.runners]
        for r in stopping:
            if self._scheduler is not None:
                with contextlib.suppress(JobLookupError):
                    self._scheduler.remove_job(f"{r.key[0]}:{r.key[1]}")
        await asyncio.gather(*(r.stop() for r in stopping), return_exceptions=True)
        for part in change.stop.values():
            await asyncio.gather(*(s.close() for s in part.sources), return_exceptions=True)
            await asyncio.gather(*(c.close() for c in part.connections), return_exceptions=True)
        for r in stopping:
            self.store.forget(r.key)
        for _, part, piece in change.updates:
            part.update(piece)
            part.slice = piece
        self.parts = change.parts
        self.config = config
        for part in change.start:
            part.runners = [SourceRunner(s, self.store) for s in part.sources]
            if self._scheduler is not None:
                self._schedule(part.runners)

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
            connections = [c for part in self.parts.values() for c in part.connections]
            await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
            await runner.cleanup()

        try:
            await asyncio.wait_for(close_all(), SHUTDOWN_GRACE)
        except TimeoutError:
            log.warning("shutdown grace period expired; exiting anyway")
