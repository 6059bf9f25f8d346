"""What the HTTP layer asks of the daemon, typed: the routes import this, never the daemon.

The daemon builds the web app, so it imports the routes; were the routes to import the
daemon back, the two would form a circle and any handler could reach into any part of it.
Instead the handlers see `DaemonView`, the few things they need, and the daemon's state as
the frozen records below rather than dicts read by string keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from exporter.config import Config
    from exporter.core.render import Renderer
    from exporter.diagnosis.engine import DiagnosisSource
    from exporter.ingest import Ingest

State = Literal["up", "failing", "starting"]


@dataclass(frozen=True, slots=True)
class SourceStatus:
    source: str  # the `source` label value, e.g. "activity"
    target: str  # the `target` label value; "" for daemon-wide sources
    up: bool
    attempts: int  # runs tried so far; 0 while the source is still starting
    last_success: float | None  # Unix time of the last successful run
    last_error: str  # already redacted by the runner; "" when the last run succeeded
    details: Mapping[str, object]  # the source's own facts (`Source.status()`), no secrets

    @property
    def state(self) -> State:
        if self.up:
            return "up"
        return "failing" if self.attempts else "starting"


@dataclass(frozen=True, slots=True)
class TargetStatus:
    name: str
    dsn: str  # as configured, credentials included: only ever shown reduced (landing.where)
    vcpus: float | None  # as in pg_vcpus: configured, or learnt from AWS
    vcpus_source: str  # "config" or "aws"
    sources: tuple[SourceStatus, ...]


@dataclass(frozen=True, slots=True)
class DaemonStatus:
    targets: tuple[TargetStatus, ...]  # in the order of the configuration
    daemon_wide: tuple[SourceStatus, ...]  # sources of no target: apps, rds_proxy
    app_processes: int | None  # processes pushing reports; None when ingest is disabled


class DaemonView(Protocol):
    """The daemon as the handlers see it."""

    config: Config
    renderer: Renderer
    ingest: Ingest | None
    diagnosis: DiagnosisSource | None  # None when diagnosis.enabled is false

    def ready(self) -> bool:
        """Every source has been tried once, so the first scrape has data."""
        ...

    def status(self) -> DaemonStatus: ...

    async def reload(self) -> str | None:
        """Re-read the configuration file: None when applied, else why it was not."""
        ...

    def pinning_report(self) -> dict[str, object]:
        """Per target the statements that would pin RDS Proxy sessions, per proxy those its
        logs say pinned, and the driver fingerprints seen with their fix."""
        ...
