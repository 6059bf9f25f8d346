"""Hooks into one engine's dialect: statement time, and what each new connection is opened with.

The cursor execute events would time statements, but any engine-level listener switches
SQLAlchemy to its event path for every connection and statement (for a `do_connect` listener
too: the dialect then runs its event loop around every execute), which cost more than the
rest of the instrumentation together in bench/bench_instrument.py. Overriding `do_execute`,
`do_execute_no_params`, `do_executemany` and `connect` in a subclass that this engine's
dialect is switched to (`subclass.adopt`) does the same without that. (Attributes set on the
dialect instance did it too, but an instance attribute in place of a method keeps CPython
from specialising every `dialect.<method>()` call SQLAlchemy makes.) Failed statements are
timed too.

The execute overrides also look at the statement's length, an attribute the interpreter has:
only one longer than `LONG_CHARS` can be over RDS Proxy's 16,384-byte limit, and only that
is measured (proxy_checks.py). psycopg2 binds parameters into the text on the client, so for
it the bytes it sent (`cursor.query`) are what is compared.
"""

from __future__ import annotations

from time import perf_counter_ns
from typing import Any

from pgpressure_sqlalchemy.proxy_checks import LONG_CHARS, option_settings
from pgpressure_sqlalchemy.stats import DRAIN_AT, PoolStats
from pgpressure_sqlalchemy.subclass import adopt, same_code
from pgpressure_sqlalchemy.wire import PROXY_MAX_STATEMENT_BYTES

#: Drivers that bind parameters into the statement text on the client.
_CLIENT_BOUND = frozenset({"psycopg2"})
#: Drivers whose connect arguments take `application_name` (asyncpg: in `server_settings`).
_APPLICATION_NAME_ARG = frozenset({"psycopg", "psycopg2", "psycopg_async", "pg8000"})


def instrument_dialect(
    engine: Any, stats: PoolStats, statements: bool, application_name: str | None
) -> None:
    """Switch the engine's dialect to a subclass that watches new connections' arguments
    (tagging them with `application_name` unless they have one) and, with `statements`,
    times statements."""
    dialect = engine.dialect
    base = type(dialect)
    if getattr(base, "_pgpressure_stats", None) is not None:
        return
    namespace: dict[str, Any] = {"_pgpressure_stats": stats, "__module__": __name__}
    # SQLAlchemy reads this one from the dialect's own class dict, not through inheritance:
    # without it a subclass gets no compiled statement cache (and a warning).
    if "supports_statement_cache" in vars(base):
        namespace["supports_statement_cache"] = vars(base)["supports_statement_cache"]
    namespace["connect"] = _connect(base.connect, dialect.driver, stats, application_name)
    if statements:
        client_bound = dialect.driver in _CLIENT_BOUND
        for name in ("do_execute", "do_execute_no_params", "do_executemany"):
            method = getattr(base, name, None)
            if method is not None:
                namespace[name] = _timed(name, method, stats, client_bound)
    adopt(dialect, type(f"Instrumented{base.__name__}", (base,), namespace))


def _connect(base_connect: Any, driver: str, stats: PoolStats, name: str | None) -> Any:
    """`Dialect.connect`, called with the DBAPI arguments of every new connection."""

    def connect(self: Any, *cargs: Any, **cparams: Any) -> Any:
        try:
            if name is not None:
                _tag(driver, cparams, name)
            settings = option_settings(cargs, cparams)
            if settings:
                stats.proxy.connected_with(settings)
        except Exception:  # monitoring must not stop the app from connecting
            pass
        return base_connect(self, *cargs, **cparams)

    return connect


def _tag(driver: str, cparams: dict[str, Any], name: str) -> None:
    """Set `application_name` unless the URL or connect_args already did."""
    if driver == "asyncpg":
        settings = dict(cparams.get("server_settings") or {})
        settings.setdefault("application_name", name)
        cparams["server_settings"] = settings
    elif driver in _APPLICATION_NAME_ARG:
        cparams.setdefault("application_name", name)


def _timed(name: str, method: Any, stats: PoolStats, client_bound: bool) -> Any:
    """The dialect's `method` (a function of its class), timed. Where it is exactly
    SQLAlchemy's default `do_execute` or `do_execute_no_params`, the request path of every
    statement, its body (the cursor call) is inlined with SQLAlchemy's own parameters: one
    call fewer, and no `*args` packing (60 ns per statement here). Anything else (executemany,
    a dialect's override) is called through `_wrapped`. Statement times are queued without a
    lock: PoolStats.drain folds them in."""
    if name == "do_execute" and same_code(method, name):
        timed = (_inlined_execute_client_bound if client_bound else _inlined_execute)(stats)
    elif name == "do_execute_no_params" and same_code(method, name):
        timed = _inlined_execute_no_params(stats)
    else:
        timed = _wrapped(method, stats, client_bound)
    timed.__name__ = timed.__qualname__ = name
    return timed


def _inlined_execute(stats: PoolStats) -> Any:
    def timed(
        self: Any,
        cursor: Any,
        statement: Any,
        parameters: Any,
        context: Any = None,
        _now: Any = perf_counter_ns,
        _queue: Any = stats.query_q,
        _stats: PoolStats = stats,
        _len: Any = len,
        _long: int = LONG_CHARS,
    ) -> None:
        if _len(statement) > _long:
            _stats.proxy.statement(statement)
        t0 = _now()
        try:
            cursor.execute(statement, parameters)
        finally:
            _queue.append(_now() - t0)
            if _len(_queue) > DRAIN_AT:
                _stats.drain()

    return timed


def _inlined_execute_client_bound(stats: PoolStats) -> Any:
    def timed(
        self: Any,
        cursor: Any,
        statement: Any,
        parameters: Any,
        context: Any = None,
        _now: Any = perf_counter_ns,
        _queue: Any = stats.query_q,
        _stats: PoolStats = stats,
        _len: Any = len,
        _limit: int = PROXY_MAX_STATEMENT_BYTES,
    ) -> None:
        t0 = _now()
        try:
            cursor.execute(statement, parameters)
        finally:
            _queue.append(_now() - t0)
            if _len(_queue) > DRAIN_AT:
                _stats.drain()
            sent = cursor.query  # psycopg2: the bytes sent, parameters bound in (or None)
            if sent is not None and _len(sent) > _limit:
                _stats.proxy.statement(statement, _len(sent))

    return timed


def _inlined_execute_no_params(stats: PoolStats) -> Any:
    def timed(
        self: Any,
        cursor: Any,
        statement: Any,
        context: Any = None,
        _now: Any = perf_counter_ns,
        _queue: Any = stats.query_q,
        _stats: PoolStats = stats,
        _long: int = LONG_CHARS,
    ) -> None:
        if len(statement) > _long:
            _stats.proxy.statement(statement)
        t0 = _now()
        try:
            cursor.execute(statement)
        finally:
            _queue.append(_now() - t0)
            if len(_queue) > DRAIN_AT:
                _stats.drain()

    return timed


def _wrapped(method: Any, stats: PoolStats, client_bound: bool) -> Any:
    """Any other execute method, timed and size-checked: called as `method(self, cursor,
    statement, ...)`, as SQLAlchemy calls all three."""
    queue = stats.query_q

    def timed(self: Any, cursor: Any, statement: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = perf_counter_ns()
        try:
            return method(self, cursor, statement, *args, **kwargs)
        finally:
            queue.append(perf_counter_ns() - t0)
            if len(queue) > DRAIN_AT:
                stats.drain()
            _check_size(stats, statement, cursor, client_bound)

    return timed


def _check_size(stats: PoolStats, statement: Any, cursor: Any, client_bound: bool) -> None:
    """The size check of the inlined paths, for the wrapped ones."""
    sent = getattr(cursor, "query", None) if client_bound else None
    if isinstance(sent, bytes):
        if len(sent) > PROXY_MAX_STATEMENT_BYTES:
            stats.proxy.statement(str(statement), len(sent))
    elif isinstance(statement, str) and len(statement) > LONG_CHARS:
        stats.proxy.statement(statement)
