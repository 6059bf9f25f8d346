"""`instrument(engine, ...)`: the one call an application makes.

Settings come from the arguments, then the PGPRESSURE_* environment variables, then
defaults, so the same code runs unchanged in every environment. Instrumenting an engine twice
returns the first handle: no second wrapper, no double counting.

A bad argument raises ValueError (the endpoint must be an http(s) URL with a valid port, the
interval a finite number); a bad PGPRESSURE_INTERVAL is logged and the default used, so a
deployment's environment cannot stop the app from starting.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pgpressure_sqlalchemy.dialect import instrument_dialect
from pgpressure_sqlalchemy.pool import stats_of, wrap_pool
from pgpressure_sqlalchemy.reporter import PUSH_TIMEOUT, REPORTER, Registration
from pgpressure_sqlalchemy.stats import PoolStats
from pgpressure_sqlalchemy.wire import MAX_NAME_LENGTH

log = logging.getLogger("pgpressure.instrument")

DEFAULT_ENDPOINT = "http://127.0.0.1:9188"
DEFAULT_INTERVAL = 5.0
MIN_INTERVAL, MAX_INTERVAL = 0.1, 3600.0
LONG_INTERVAL = 60.0  # above this, warn: the gauges are that old between pushes
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_lock = threading.Lock()
_instrumented: weakref.WeakKeyDictionary[Any, Instrumentation] = weakref.WeakKeyDictionary()


@dataclass
class Instrumentation:
    """The handle `instrument()` returns; mostly useful to tests and to flush at shutdown."""

    app: str
    pool: str
    endpoint: str
    interval: float
    stats: PoolStats

    def snapshot(self) -> dict[str, Any]:
        return self.stats.snapshot(self.pool)

    def flush(self, timeout: float = PUSH_TIMEOUT) -> dict[str, int | None]:
        return flush(timeout)


def flush(timeout: float = PUSH_TIMEOUT) -> dict[str, int | None]:
    """Push now (e.g. before a short-lived process exits); endpoint -> HTTP status or None.
    Never raises: monitoring must not break the app."""
    try:
        return REPORTER.push_all(timeout)
    except Exception:
        log.warning("pgpressure: flush failed", exc_info=True)
        return {}


def _name(value: str) -> str:
    return _CONTROL.sub("", value).strip()[:MAX_NAME_LENGTH] or "default"


# Servers that run someone else's code: their binary's name says nothing about the service.
_SERVERS = frozenset(
    {"gunicorn", "uvicorn", "hypercorn", "daphne", "granian", "celery", "waitress-serve",
     "uwsgi", "rq", "dramatiq", "huey_consumer", "python", "python3"}
)  # fmt: skip


def _default_app(argv: list[str] | None = None) -> str:
    """The service's own name where the command line says it, never the bare server binary
    (every service under gunicorn would be one app called "gunicorn"): gunicorn's
    `-n/--name` (its proc_name), Celery's `-A/--app`, the module of the WSGI/ASGI app
    (`orders.wsgi:application` -> `orders`), the package run with `python -m`, else the
    script's name."""
    argv = list(sys.argv if argv is None else argv)
    program = os.path.basename(argv[0] or "") if argv else ""
    if program == "__main__.py":  # python -m package
        return os.path.basename(os.path.dirname(argv[0])) or "python"
    if program.removesuffix(".py") not in _SERVERS:
        return program.removesuffix(".py") or "python"
    args = argv[1:]
    for i, arg in enumerate(args):
        for flag in ("-n", "--name", "-A", "--app"):
            if arg == flag and i + 1 < len(args):
                return args[i + 1].split(":")[0].split(".")[0]
            if arg.startswith(f"{flag}=") and flag.startswith("--"):
                return arg.split("=", 1)[1].split(":")[0].split(".")[0]
    for arg in args:
        if ":" in arg and not arg.startswith("-") and "/" not in arg:
            return arg.split(":")[0].split(".")[0]  # the app's module: orders.wsgi:app
    return program.removesuffix(".py")


def _endpoint(endpoint: str) -> str:
    endpoint = endpoint.strip()
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"pgpressure endpoint must be an http(s) URL, got {endpoint!r}")
    try:
        parts.port  # noqa: B018 -- raises ValueError for a port out of range or not a number
    except ValueError:
        raise ValueError(f"pgpressure endpoint has an invalid port: {endpoint!r}") from None
    return endpoint


def _interval(interval: float | None) -> float:
    """The argument (which must be a finite number), else PGPRESSURE_INTERVAL (the default,
    with a warning, when it is not one), clamped to [MIN_INTERVAL, MAX_INTERVAL]."""
    if interval:
        value = float(interval)
        if not math.isfinite(value):
            raise ValueError(f"pgpressure interval must be a finite number, got {interval!r}")
    else:
        raw = os.environ.get("PGPRESSURE_INTERVAL", "").strip()
        try:
            value = float(raw) if raw else DEFAULT_INTERVAL
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            log.warning(
                "pgpressure: PGPRESSURE_INTERVAL=%r is not a number of seconds; using %g",
                raw,
                DEFAULT_INTERVAL,
            )
            value = DEFAULT_INTERVAL
    value = min(max(value, MIN_INTERVAL), MAX_INTERVAL)
    if value > LONG_INTERVAL:
        log.warning(
            "pgpressure: pushing pool stats every %gs: the pool gauges lag by up to that "
            "long (the daemon keeps a process for 3 push intervals or ingest.stale_after)",
            value,
        )
    return value


def instrument(
    engine: Any,
    app: str | None = None,
    pool: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    interval: float | None = None,
    statements: bool = True,
    application_name: bool | str = True,
) -> Instrumentation:
    """Instrument an `Engine` or `AsyncEngine` and start pushing its pool stats.

    `statements=False` skips statement timing. New connections are tagged with the app name
    as PostgreSQL's `application_name` (or with the given string) unless the URL or
    connect_args already set one, so pg_stat_activity, the runbooks' queries and the load by
    application can be joined to the app; `application_name=False` opts out.
    """
    sync = getattr(engine, "sync_engine", engine)
    with _lock:
        existing = _instrumented.get(sync)
        if existing is None:  # another Engine over the same pool (engine.execution_options())
            existing = next(
                (h for h in _instrumented.values() if h.stats is stats_of(sync.pool)), None
            )
        if existing is not None:
            return existing
        env = os.environ
        app = _name(app or env.get("PGPRESSURE_APP") or _default_app())
        endpoint = _endpoint(endpoint or env.get("PGPRESSURE_ENDPOINT") or DEFAULT_ENDPOINT)
        token = token or env.get("PGPRESSURE_TOKEN") or None
        interval = _interval(interval)
        pool_name = _name(pool or getattr(sync.pool, "logging_name", None) or "default")

        stats = PoolStats()
        wrap_pool(sync.pool, stats)
        tag = app if application_name is True else str(application_name or "") or None
        instrument_dialect(sync, stats, statements, tag)
        handle = Instrumentation(app, pool_name, endpoint, interval, stats)
        _instrumented[sync] = handle
    REPORTER.add(Registration(weakref.ref(sync), stats, app, pool_name, endpoint, token, interval))
    return handle
