"""Per-pool counters and fixed-bucket histograms kept in the application's memory.

Everything is cumulative and fixed-size, so memory does not grow with traffic or with how
long the daemon has been unreachable: a push that fails is simply superseded by the next.
One lock per pool guards the numbers; the request path holds it for a few additions only.

Times are integer nanoseconds (`perf_counter_ns`) and histogram sums are kept as integers, so
adding up engines, retired engines and processes in any order gives the same total: a float
sum regrouped can come out an ulp smaller, which the daemon would see as a counter going
backwards. Seconds appear only in the report.
"""

from __future__ import annotations

import threading
import weakref
from bisect import bisect_left
from collections import deque
from time import perf_counter_ns
from typing import Any

from pgpressure_sqlalchemy.wire import BOUNDS, CLOSE_REASONS, HISTOGRAMS, NBUCKETS

NS = 1_000_000_000
BOUNDS_NS: tuple[int, ...] = tuple(round(b * NS) for b in BOUNDS)


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

    def add(self, other: Histogram) -> None:
        for i, c in enumerate(other.counts):
            self.counts[i] += c
        self.sum_ns += other.sum_ns

    def to_json(self) -> dict[str, Any]:
        """Counts and the sum in nanoseconds (`merge_snapshots` makes it seconds)."""
        return {"counts": list(self.counts), "sum_ns": self.sum_ns}


class PoolStats:
    """What one instrumented engine's pool has done in this process.

    `pool_ref` points at the engine's current pool (it changes on `engine.dispose()`); the
    gauges of a QueuePool are read from it at report time rather than tracked on every event.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pool_ref: weakref.ref[Any] | None = None
        self.kind = "none"
        self.reset()

    def reset(self) -> None:
        """Zero everything: used in a forked child, which is a new process with its own totals.
        A connection checked out before `born` (in the parent, before the fork) is not this
        process's: returning it changes neither `used` nor the hold times."""
        self.lock = threading.Lock()
        self.born = perf_counter_ns()
        self.waiting: deque[None] = deque()  # one entry per caller inside connect()
        self.used = 0
        self.opened = 0
        self.closed_count = 0
        self.checkouts = 0
        self.timeouts = 0
        self.closed = dict.fromkeys(CLOSE_REASONS, 0)
        self.wait = Histogram()
        self.use = Histogram()
        self.create = Histogram()
        self.query = Histogram()

    def add_counters(self, other: PoolStats) -> None:
        """Fold another engine's totals in (a garbage-collected engine's last numbers)."""
        self.checkouts += other.checkouts
        self.timeouts += other.timeouts
        for reason, n in other.closed.items():
            self.closed[reason] += n
        for name in HISTOGRAMS:
            getattr(self, name).add(getattr(other, name))

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
            doc: dict[str, Any] = {
                "pool": name,
                "checkouts": self.checkouts,
                "timeouts": self.timeouts,
                "closed": dict(self.closed),
            }
            for h in HISTOGRAMS:
                doc[h] = getattr(self, h).to_json()
        doc.update(self.gauges())
        return doc


def merge_snapshots(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Raw snapshots (`PoolStats.raw_snapshot`) of engines reporting under one (app, pool) in
    a process, as the one logical pool of the report. Every sum is added as an integer and
    turned into seconds once, so the order of `docs` cannot change the result."""
    out = docs[0]
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
