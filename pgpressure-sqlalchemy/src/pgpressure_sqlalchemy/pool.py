"""Hooks into one engine's pool: a connect() wrapper and a few pool events.

No event fires before a checkout and `handle_error` never sees the pool's TimeoutError, so
wait time, pending callers and timeouts need a wrapper around `Pool.connect()`. We install it
by switching the pool instance to a generated subclass: `Pool.recreate()` builds the new pool
with `self.__class__(...)`, so the wrapper survives `engine.dispose()` with no engine-level
listener at all, and the events registered on the pool travel with its dispatch.

The checkout timestamp is taken in the wrapper (sparing the checkout event, whose presence
also makes SQLAlchemy take its slower checkout path) and the hold time in an override of
`_do_return_conn`, the step both a checkin and `fairy.detach()` go through (a detach skips
`_return_conn`); connect, invalidate and close are events. Times are integer nanoseconds.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from time import perf_counter_ns
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import Pool, QueuePool

from pgpressure_sqlalchemy.stats import PoolStats

_T_OUT = "_pgpressure_out"  # record.info: perf_counter_ns() at checkout
_INVALIDATED = "_pgpressure_invalidated"
_RETURNING = "_pgpressure_returning"  # record.info: being returned to a full QueuePool


def stats_of(pool: Pool) -> PoolStats | None:
    return getattr(type(pool), "_pgpressure_stats", None)


def wrap_pool(pool: Pool, stats: PoolStats) -> None:
    """Switch `pool` to an instrumented subclass of its own class and listen to its events."""
    if stats_of(pool) is not None:
        return
    base = type(pool)
    stats.kind = base.__name__
    namespace: dict[str, Any] = {
        "_pgpressure_stats": stats,
        "__init__": _make_init(base, stats),
        "connect": _make_connect(base, stats),
        "__module__": __name__,
    }
    namespace["_do_return_conn"] = _make_return(base, stats)
    sub = type(f"Instrumented{base.__name__}", (base,), namespace)
    pool.__class__ = sub
    _bind(pool, stats)
    _listen(pool, stats)


def _bind(pool: Pool, stats: PoolStats) -> None:
    stats.pool_ref = weakref.ref(pool)
    creator = getattr(pool, "_invoke_creator", None)
    if creator is None or getattr(creator, "_pgpressure", False):
        return

    def timed_creator(record: Any) -> Any:
        # Time the DBAPI connect itself; the connect event (dialect initialisation on the
        # first connection) is not part of it.
        t0 = perf_counter_ns()
        conn = creator(record)
        try:
            elapsed = perf_counter_ns() - t0
            with stats.lock:
                stats.create.observe(elapsed)
        except Exception:
            pass
        return conn

    timed_creator._pgpressure = True  # type: ignore[attr-defined]
    pool._invoke_creator = timed_creator  # type: ignore[method-assign]


def _make_init(base: type[Pool], stats: PoolStats) -> Any:
    def __init__(self: Pool, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, *args, **kwargs)  # type: ignore[misc]
        _bind(self, stats)

    return __init__


def _make_connect(base: type[Pool], stats: PoolStats) -> Any:
    base_connect = base.connect

    def connect(self: Pool) -> Any:
        t0 = perf_counter_ns()
        waiting = stats.waiting
        waiting.append(None)  # deque append/pop are atomic: pending needs no lock
        try:
            fairy = base_connect(self)
        except PoolTimeoutError:
            waiting.pop()
            with stats.lock:
                stats.timeouts += 1
                stats.wait.observe(perf_counter_ns() - t0)
            raise
        except BaseException:
            waiting.pop()
            raise
        t1 = perf_counter_ns()
        waiting.pop()
        try:
            info = fairy.info
            # SingletonThreadPool hands out the same fairy again to a nested checkout: the
            # hold time runs from the outer checkout, which alone is returned.
            fresh = _T_OUT not in info
            if fresh:
                info[_T_OUT] = t1
        except Exception:
            fresh = False
        with stats.lock:
            stats.checkouts += 1
            stats.wait.observe(t1 - t0)
            if fresh:
                stats.used += 1
        return fairy

    return connect


def _make_return(base: type[Pool], stats: PoolStats) -> Any:
    """Hold time and `used` when a connection goes back. `_do_return_conn` is what every
    checkin goes through (via `_return_conn`, right after the `checkin` event) and also
    `fairy.detach()`, which bypasses `_return_conn`; the record is not available to another
    checkout before it. Overriding it measured cheaper than listening to the checkin event
    (bench/bench_instrument.py: a no-op checkin listener alone added 2-4 us of CPU per
    checkout on psycopg), and the subclass is there anyway."""
    base_return = base._do_return_conn
    queue = issubclass(base, QueuePool)

    def _do_return_conn(self: Pool, record: Any) -> None:
        try:
            info = record.info
            t0 = info.pop(_T_OUT, None)
            if t0 is not None and t0 >= stats.born:  # else checked out before a fork
                elapsed = perf_counter_ns() - t0
                with stats.lock:
                    if stats.used > 0:
                        stats.used -= 1
                    stats.use.observe(elapsed)
        except Exception:
            info = None
        if not queue or info is None:
            base_return(self, record)
            return
        # A QueuePool closes a returned connection only when the queue is full: overflow.
        info[_RETURNING] = True
        try:
            base_return(self, record)
        finally:
            info.pop(_RETURNING, None)

    return _do_return_conn


def _listen(pool: Pool, stats: PoolStats) -> None:
    def on_connect(dbapi_connection: Any, record: Any) -> None:
        with stats.lock:
            stats.opened += 1

    def on_invalidate(dbapi_connection: Any, record: Any, exc: Any) -> None:
        with contextlib.suppress(Exception):
            record.info[_INVALIDATED] = True

    def on_close(dbapi_connection: Any, record: Any) -> None:
        try:
            reason = _close_reason(record, stats)
        except Exception:
            reason = "other"
        with stats.lock:
            stats.closed_count += 1
            stats.closed[reason] += 1

    def on_close_detached(dbapi_connection: Any) -> None:
        with stats.lock:
            stats.closed_count += 1
            stats.closed["other"] += 1

    event.listen(pool, "connect", on_connect)
    event.listen(pool, "invalidate", on_invalidate)
    event.listen(pool, "close", on_close)
    event.listen(pool, "close_detached", on_close_detached)


def _close_reason(record: Any, stats: PoolStats) -> str:
    """Why a connection is being closed, from the same facts the pool itself looks at."""
    info = record.info
    if info.get(_RETURNING):
        return "overflow"
    if info.get(_INVALIDATED):
        return "invalidated"
    pool = stats.pool_ref() if stats.pool_ref is not None else None
    started = getattr(record, "starttime", 0) or 0
    if getattr(record, "_soft_invalidate_time", 0) > started:
        return "invalidated"
    if pool is not None:
        recycle = getattr(pool, "_recycle", -1)
        if recycle > -1 and time.time() - started > recycle:
            return "recycle"
        if getattr(pool, "_invalidate_time", 0) > started:
            return "invalidated"
    return "other"


def time_statements(engine: Any, stats: PoolStats) -> None:
    """Statement time around the dialect's execute calls.

    The cursor execute events would do, but any engine-level listener switches SQLAlchemy to
    its event path for every connection and statement, which cost more than the rest of the
    instrumentation together in bench/bench_instrument.py. Wrapping `do_execute`,
    `do_execute_no_params` and `do_executemany` on this engine's dialect instance times the
    same `cursor.execute()` call without that. Failed statements are timed too.
    """
    dialect = engine.dialect
    if getattr(dialect, "_pgpressure_stats", None) is not None:
        return
    dialect._pgpressure_stats = stats
    for name in ("do_execute", "do_execute_no_params", "do_executemany"):
        original = getattr(dialect, name, None)
        if original is not None:
            setattr(dialect, name, _timed(original, stats))


def _timed(original: Any, stats: PoolStats) -> Any:
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = perf_counter_ns()
        try:
            return original(*args, **kwargs)
        finally:
            elapsed = perf_counter_ns() - t0
            with stats.lock:
                stats.query.observe(elapsed)

    return timed


def set_application_name(engine: Any, name: str) -> None:
    """Tag new connections with the app name unless the URL already sets one."""
    driver = engine.dialect.driver

    def do_connect(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        if driver == "asyncpg":
            settings = dict(cparams.get("server_settings") or {})
            settings.setdefault("application_name", name)
            cparams["server_settings"] = settings
        elif driver in ("psycopg", "psycopg2", "psycopg_async", "pg8000"):
            cparams.setdefault("application_name", name)

    event.listen(engine, "do_connect", do_connect)
