"""Shared fixtures: one real PostgreSQL cluster per test session, with pg_stat_statements."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from exporter.devtools.cluster import Cluster

MONITOR_PASSWORD = "Mon-canary-5e1f9a"  # a canary: tests assert it never leaks


@pytest.fixture(scope="session")
def pg() -> Iterator[Cluster]:
    """A running cluster; `monitor` is a pg_monitor-only role with a password."""
    with Cluster() as cluster:
        cluster.psql("CREATE EXTENSION pg_stat_statements")
        cluster.psql(
            f"CREATE ROLE monitor LOGIN PASSWORD '{MONITOR_PASSWORD}'; GRANT pg_monitor TO monitor"
        )
        yield cluster


@pytest.fixture
def fresh_db(pg: Cluster) -> Iterator[str]:
    """A new database for one test, dropped afterwards; returns its name."""
    name = "t_" + uuid.uuid4().hex[:10]
    pg.psql(f"CREATE DATABASE {name}")
    pg.psql("CREATE EXTENSION pg_stat_statements", dbname=name)
    yield name
    pg.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
