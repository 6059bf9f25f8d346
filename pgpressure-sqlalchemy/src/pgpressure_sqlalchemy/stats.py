"""Per-pool counters and fixed-bucket histograms kept in the application's memory.

Everything is cumulative and fixed-size, so memory does not grow with traffic or with how
long the daemon has been unreachable: a push that fails is simply superseded by the next.

The request path takes no lock. A checkout, a checkin and a statement each append one integer
to a deque (`deque.append` is thread-safe and atomic, documented as such, with or without the
GIL), and whoever reads the numbers folds what is queued into the counters and histograms under
the pool's lock (`PoolStats.drain`): the report, or the request path itself once a queue holds
`DRAIN_AT` values, which bounds the memory. Every value is folded exactly once (only the lock
holder pops, and it pops only what was there when it looked), so the counts stay exact under
threads; folding a batch sorts it once and bisects it once per bucket bound, cheaper per value
than a bisect per observation. bench/bench_instrument.py measured the lock, the method call
and the bisect of one observation at 0.5 us on this 2-core machine, three times per checkout.

Times are integer nanoseconds (`perf_counter_ns`) and histogram sums are kept as integers, so
adding up engines, retired engines and processes in any order gives the same total: a float
sum regrouped can come out an ulp smaller, which the daemon would see as a counter going
backwards. Seconds appear only in the report.
"""

from __future__ import annotations

import threading
import weakref
from bisect import bisect_left, bisect_right
from collections import deque
from itertools import repeat, starmap
from time import perf_counter_ns
from typing import Any

from pgpressure_sqlalchemy import proxy_checks
from pgpressure_sqlalchemy.proxy_checks import ProxyChecks
from pgpressure_sqlalchemy.wire import BOUNDS, CLOSE_REASONS, HISTOGRAMS, NBUCKETS

NS = 1_000_000_000
BOUNDS_NS: tuple[int, ...] = tuple(round(b * NS) for b in BOUNDS)
#: The request path folds the queues in itself when one holds more than this many values (a few
#: hundred us once per thousand checkouts), so neither a long push interval nor a stalled
#: reporter grows memory, and the garbage collector's walks over the deques stay short.
DRAIN_AT = 1024


class Histogram:
    __slots__ = ("counts", "sum_ns")

    def __init__(self) -> None:
        self.counts = [0] * NBUCKETS
        self.sum_ns = 0

    def observe(self, ns: int) -> None:
        """One observation, in integer nanoseconds."""
        # bisect_left puts a value equal to a bound into that bound's bucket (le semantics).
        self.counts[bisect_left(BOUNDS_NS, ns)] += 1
        self.sum_ns += ns

    def observe_many(self, values: list[int]) -> None:
        """Many observations at once (sorts `values` in place): the same buckets as `observe`
        for each, with one sort and one bisect per bound instead of one bisect per value."""
        if not values:
            return
        n = len(values)
        counts = self.counts
        self.sum_ns += sum(values)
        first = bisect_left(BOUNDS_NS, min(values))
        if first == bisect_left(BOUNDS_NS, max(values)):  # one bucket: the usual wait times
            counts[first] += n
            return
        values.sort()
        below = 0  # values <= the previous bound (none below bucket `first`)
        for i in range(first, len(BOUNDS_NS)):
            upto = bisect_right(values, BOUNDS_NS[i], below)  # values <= bound: le semantics
            counts[i] += upto - below
            below = upto
            if below == n:
                return
        counts[-1] += n - below

    def add(self, other: Histogram) -> None:
        for i, c in enumerate(other.counts):
            self.counts[i] += c
        self.sum_ns += other.sum_ns

    def to_json(self) -> dict[str, Any]:
        """Counts and the sum in nanoseconds (`merge_snapshots` makes it seconds)."""
        return {"counts": list(self.counts), "sum_ns": self.sum_ns}


def _take(queue: deque[int]) -> list[int]:
    """Pop exactly the values queued now, oldest first; values appended meanwhile stay. The
    caller holds the pool's lock, so nobody else pops: `popleft` cannot find the deque empty."""
    return list(starmap(queue.popleft, repeat((), len(queue))))


class PoolStats:
    """What one instrumented engine's pool has done in this process.

    `pool_ref` points at the engine's current pool (it changes on `engine.dispose()`); the
    gauges of a QueuePool are read from it at report time rather than tracked on every event.

    The request path (pool.py) appends to `wait_q` (the wait of a first checkout of a
    connection), `use_q` (a hold time, when it ends) and `query_q` (a statement time) without
    the lock; `drain` folds them in. The rare cases (a pool timeout, a nested checkout, a new
    connection, a close) take the lock and update the numbers directly.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pool_ref: weakref.ref[Any] | None = None
        self.kind = "none"
        # The same deques for the life of the object: the request path keeps their bound
        # `append` methods, so `reset` empties them rather than replacing them.
        self.waiting: deque[None] = deque()  # one entry per caller inside connect()
        self.wait_q: deque[int] = deque()
        self.use_q: deque[int] = deque()
        self.query_q: deque[int] = deque()
        self.proxy = ProxyChecks()  # statements over RDS Proxy's limit, libpq options
        self.reset()

    def reset(self) -> None:
        """Zero everything: used in a forked child, which is a new process with its own totals.
        A connection checked out before `born` (in the parent, before the fork) is not this
        process's: returning it changes neither `used` nor the hold times."""
        self.lock = threading.Lock()  # the parent's may have been held by another thread
        self.born = perf_counter_ns()
        for queue in (self.waiting, self.wait_q, self.use_q, self.query_q):
            queue.clear()
        self.used = 0  # connections out, as of the last drain
        self.opened = 0
        self.closed_count = 0
        self.checkouts = 0
        self.timeouts = 0
        self.closed = dict.fromkeys(CLOSE_REASONS, 0)
        self.wait = Histogram()
        self.use = Histogram()
        self.create = Histogram()
        self.query = Histogram()
        self.proxy.reset()

    def _drain_locked(self) -> None:
        """Fold the queued observations in; the caller holds `self.lock`.

        Hold times before waits: a checkout's wait is queued before its hold time can be, so
        every hold time folded here has its checkout folded too and `used` (first checkouts
        minus ended ones) never dips below zero in between."""
        use = _take(self.use_q)
        wait = _take(self.wait_q)
        query = _take(self.query_q)
        self.used += len(wait) - len(use)
        self.checkouts += len(wait)
        self.use.observe_many(use)
        self.wait.observe_many(wait)
        self.query.observe_many(query)

    def drain(self) -> None:
        """Fold the queued observations in (the request path calls this when a queue is long:
        it must never raise into the app)."""
        try:
            with self.lock:
                self._drain_locked()
        except Exception:  # pragma: no cover - sorting and adding integers
            pass

    def timed_out(self, waited_ns: int) -> None:
        """A checkout that gave up with the pool's TimeoutError: a wait, not a checkout."""
        with self.lock:
            self.timeouts += 1
            self.wait.observe(waited_ns)

    def checked_out_again(self, waited_ns: int) -> None:
        """A checkout of a connection that is already out (SingletonThreadPool's nested
        checkout): a checkout and a wait, but not one more connection in use."""
        with self.lock:
            self.checkouts += 1
            self.wait.observe(waited_ns)

    def add_counters(self, other: PoolStats) -> None:
        """Fold another engine's totals in (a garbage-collected engine's last numbers). The
        caller holds `other.lock` (the reporter does), so what `other` has queued is folded."""
        other._drain_locked()
        self.checkouts += other.checkouts
        self.timeouts += other.timeouts
        for reason, n in other.closed.items():
            self.closed[reason] += n
        for name in HISTOGRAMS:
            getattr(self, name).add(getattr(other, name))
        self.proxy.add(other.proxy)

    def gauges(self) -> dict[str, Any]:
        """used/idle/pending/size/max now; `max` None means unbounded.

        Capacity (size and max) is reported as 0 until the pool has checked out a connection
        in this process: the master of `gunicorn --preload` instruments the engine and forks
        its workers, never serves a request itself, and must not add a pool's worth of idle
        capacity to the app (SQLAlchemyPoolExhausted compares used with max).
        """
        pool = self.pool_ref() if self.pool_ref is not None else None
        used = max(self.used, 0)
        idle = max(self.opened - self.closed_count - used, 0)
        size: int | None = None
        maximum: int | None = None
        kind = self.kind
        if pool is not None and hasattr(pool, "checkedout") and hasattr(pool, "_max_overflow"):
            # QueuePool and AsyncAdaptedQueuePool know their state exactly.
            try:
                used = int(pool.checkedout())
                idle = int(pool.checkedin())
                size = int(pool.size())
                overflow = int(pool._max_overflow)
                maximum = None if overflow < 0 else size + overflow
            except Exception:  # a pool we do not understand: keep the tracked numbers
                pass
        elif pool is None:  # the engine is gone: its totals stay, its connections do not
            size, maximum, used, idle = 0, 0, 0, 0
        elif kind == "StaticPool":
            size, maximum = 1, 1
        elif kind == "NullPool":
            size, idle = 0, 0
        if not (self.checkouts or self.timeouts):
            size, maximum = 0, 0
        return {
            "kind": kind,
            "used": used,
            "idle": idle,
            "pending": len(self.waiting),
            "size": size,
            "max": maximum,
        }

    def snapshot(self, name: str) -> dict[str, Any]:
        """This pool's part of a report, as sent."""
        return merge_snapshots([self.raw_snapshot(name)])

    def raw_snapshot(self, name: str) -> dict[str, Any]:
        """The same with the histogram sums still in integer nanoseconds (`sum_ns`)."""
        with self.lock:
            self._drain_locked()
            doc: dict[str, Any] = {
                "pool": name,
                "checkouts": self.checkouts,
                "timeouts": self.timeouts,
                "closed": dict(self.closed),
            }
            for h in HISTOGRAMS:
                doc[h] = getattr(self, h).to_json()
        doc.update(self.gauges())
        doc.update(self.proxy.to_json())
        return doc


def merge_snapshots(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Raw snapshots (`PoolStats.raw_snapshot`) of engines reporting under one (app, pool) in
    a process, as the one logical pool of the report. Every sum is added as an integer and
    turned into seconds once, so the order of `docs` cannot change the result."""
    out = docs[0]
    out.update(proxy_checks.merge(docs))
    for doc in docs[1:]:
        for key in ("used", "idle", "pending", "checkouts", "timeouts"):
            out[key] += doc[key]
        for key in ("size", "max"):
            out[key] = None if out[key] is None or doc[key] is None else out[key] + doc[key]
        for reason, n in doc["closed"].items():
            out["closed"][reason] += n
        for h in HISTOGRAMS:
            out[h]["counts"] = [
                a + b for a, b in zip(out[h]["counts"], doc[h]["counts"], strict=True)
            ]
            out[h]["sum_ns"] += doc[h]["sum_ns"]
    for h in HISTOGRAMS:
        out[h]["sum"] = out[h].pop("sum_ns") / NS  # int / int: correctly rounded, monotonic
    return out
