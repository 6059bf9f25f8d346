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

The request path (a checkout, a checkin, a statement) is what the application pays for, so
it takes no lock (it queues its numbers: see stats.py), marks nothing in shared state, and
makes no Python call it can avoid: on this 2-core machine a Python-level call costs about
0.3 us, the lock and the bisect of one observation 0.5 us (bench/bench_instrument.py,
valgrind instruction counts per checkout). How the subclass is made and where it inlines
SQLAlchemy's own bodies: subclass.py. Statement timing is the dialect's (dialect.py).
"""

from __future__ import annotations

import contextlib
import sys
import time
import weakref
from time import perf_counter_ns
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.pool import Pool, QueuePool

from pgpressure_sqlalchemy.stats import DRAIN_AT, PoolStats
from pgpressure_sqlalchemy.subclass import adopt, same_code

# Attributes of the connection record (`_ConnectionRecord`), not keys of its `info` dict: the
# first use of `record.info` gives the record a dict of its own, and CPython then no longer
# specialises SQLAlchemy's `rec.get_connection()` and `rec.checkin()` on every checkout.
_T_OUT = "_pgpressure_out"  # perf_counter_ns() at checkout, None when not checked out
_INVALIDATED = "_pgpressure_invalidated"
_RETURN_CODES: set[Any] = set()  # code objects of the `_do_return_conn` overrides
_STACK_DEPTH = 32  # frames searched from the close event up: the override is 6 or 7 up


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
    adopt(pool, sub)
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


# The request-path functions below take what they use as default arguments: subclass.py says why.


def _make_connect(base: type[Pool], stats: PoolStats) -> Any:
    base_connect = base.connect
    if same_code(base_connect, "connect"):  # Pool.connect: call what it calls, one call fewer
        base_connect = base_connect.__globals__["_ConnectionFairy"]._checkout
    waiting = stats.waiting  # PoolStats keeps its deques for life (`reset` empties them)

    def connect(
        self: Pool,
        _now: Any = perf_counter_ns,
        _checkout: Any = base_connect,
        _enter: Any = waiting.append,
        _leave: Any = waiting.pop,
        _queue: Any = stats.wait_q,
        _stats: PoolStats = stats,
        _len: Any = len,
    ) -> Any:
        t0 = _now()
        _enter(None)  # deque append/pop are atomic: pending needs no lock
        try:
            fairy = _checkout(self)
        except PoolTimeoutError:
            _leave()
            _stats.timed_out(_now() - t0)
            raise
        except BaseException:
            _leave()
            raise
        t1 = _now()
        _leave()
        try:
            record = fairy._connection_record  # set on a fairy just checked out
            try:
                fresh = record._pgpressure_out is None
            except AttributeError:  # the record's first checkout
                fresh = True
            # SingletonThreadPool hands out the same fairy again to a nested checkout: the
            # hold time runs from the outer checkout, which alone is returned.
            if fresh:
                record._pgpressure_out = t1
                _queue.append(t1 - t0)  # drained: a checkout, a wait, one more connection used
                if _len(_queue) > DRAIN_AT:
                    _stats.drain()
                return fairy
        except Exception:
            pass
        _stats.checked_out_again(t1 - t0)
        return fairy

    return connect


def _make_return(base: type[Pool], stats: PoolStats) -> Any:
    """Hold time and `used` when a connection goes back. `_do_return_conn` is what every
    checkin goes through (via `_return_conn`, right after the `checkin` event) and also
    `fairy.detach()`, which bypasses `_return_conn`; the record is not available to another
    checkout before it. Overriding it measured cheaper than listening to the checkin event
    (bench/bench_instrument.py: a no-op checkin listener alone added 2-4 us of CPU per
    checkout on psycopg), and the subclass is there anyway. It marks nothing for the close
    that a full QueuePool does inside it: `_close_reason` finds this frame on the stack."""
    base_return = base._do_return_conn
    if same_code(base_return, "queue_return"):  # QueuePool's: its body inlined, one call fewer
        do_return = _inlined_queue_return(base_return, stats)
    else:
        do_return = _wrapped_return(base_return, stats)
    _RETURN_CODES.add(do_return.__code__)  # one code object per branch, for all pools
    return do_return


def _inlined_queue_return(base_return: Any, stats: PoolStats) -> Any:
    def _do_return_conn(
        self: Pool,
        record: Any,
        _now: Any = perf_counter_ns,
        _queue: Any = stats.use_q,
        _stats: PoolStats = stats,
        _full: Any = base_return.__globals__["sqla_queue"].Full,
        _len: Any = len,
    ) -> None:
        try:
            t0 = record._pgpressure_out
            if t0 is not None:
                record._pgpressure_out = None
                if t0 >= _stats.born:  # else checked out before a fork
                    _queue.append(_now() - t0)  # drained: a hold time, one fewer used
                    if _len(_queue) > DRAIN_AT:
                        _stats.drain()
        except Exception:  # a record checked out before instrument(), say
            pass
        try:
            self._pool.put(record, False)  # type: ignore[attr-defined]
        except _full:
            try:
                record.close()  # the queue is full: overflow
            finally:
                self._dec_overflow()  # type: ignore[attr-defined]

    return _do_return_conn


def _wrapped_return(base_return: Any, stats: PoolStats) -> Any:
    def ended(record: Any, now: Any, queue: Any, stats: PoolStats) -> None:
        """The hold time (only on the rare paths: QueuePool's is inlined above)."""
        t0 = getattr(record, _T_OUT, None)
        record._pgpressure_out = None
        if t0 is not None and t0 >= stats.born:  # else checked out before a fork
            queue.append(now() - t0)
            if len(queue) > DRAIN_AT:
                stats.drain()

    def _do_return_conn(
        self: Pool,
        record: Any,
        _now: Any = perf_counter_ns,
        _queue: Any = stats.use_q,
        _stats: PoolStats = stats,
    ) -> None:
        with contextlib.suppress(Exception):
            ended(record, _now, _queue, _stats)
        base_return(self, record)

    return _do_return_conn


def _listen(pool: Pool, stats: PoolStats) -> None:
    def on_connect(dbapi_connection: Any, record: Any) -> None:
        with contextlib.suppress(Exception):
            # A record reconnects after an invalidation: its next close is not one (as the
            # mark in `record.info`, which SQLAlchemy clears on reconnect, used to be).
            if getattr(record, _INVALIDATED, False):
                record._pgpressure_invalidated = False
        with stats.lock:
            stats.opened += 1

    def on_invalidate(dbapi_connection: Any, record: Any, exc: Any) -> None:
        with contextlib.suppress(Exception):
            record._pgpressure_invalidated = True

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
    if _closed_on_return_to_a_full_queue(record):
        return "overflow"
    if getattr(record, _INVALIDATED, False):
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


def _closed_on_return_to_a_full_queue(record: Any) -> bool:
    """Whether this close happens inside our `_do_return_conn` for this very record on a
    QueuePool, which closes a returned connection only when its queue is full: overflow.

    Read off this thread's call stack, on the rare close, rather than marked in the record
    on every checkin (a dict store and a try/finally pop measured at 0.1-0.2 us per checkout
    in bench/bench_instrument.py). The stack is the thread's own, so another thread's checkin
    or checkout of the record cannot blur it, as it could a mark on the shared record.
    """
    getframe = getattr(sys, "_getframe", None)
    if getframe is None:  # not CPython or PyPy: no overflow classification
        return False
    frame = getframe(1)
    for _ in range(_STACK_DEPTH):
        if frame is None:
            return False
        if frame.f_code in _RETURN_CODES:
            local = frame.f_locals
            if local.get("record") is record:
                return isinstance(local.get("self"), QueuePool)
        frame = frame.f_back
    return False
