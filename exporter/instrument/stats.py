"""Per-pool counters and fixed-bucket histograms kept in the application's memory.

Everything is cumulative and fixed-size, so memory does not grow with traffic or with how
long the daemon has been unreachable: a push that fails is simply superseded by the next.
One lock per pool guards the numbers; the request path holds it for a few additions only.
"""

from __future__ import annotations

import threading
import weakref
from bisect import bisect_left
from collections import deque
from typing import Any

from exporter.instrument.schema import BOUNDS, CLOSE_REASONS, HISTOGRAMS, NBUCKETS


class Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * NBUCKETS
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left puts a value equal to a bound into that bound's bucket (le semantics).
        self.counts[bisect_left(BOUNDS, value)] += 1
        self.sum += value

    def add(self, other: Histogram) -> None:
        for i, c in enumerate(other.counts):
            self.counts[i] += c
        self.sum += other.sum

    def to_json(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.sum}


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
        """Zero everything: used in a forked child, which is a new process with its own totals."""
        self.lock = threading.Lock()
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
        """used/idle/pending/size/max now; `max` None means unbounded."""
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
        return {
            "kind": kind,
            "used": used,
            "idle": idle,
            "pending": len(self.waiting),
            "size": size,
            "max": maximum,
        }

    def snapshot(self, name: str) -> dict[str, Any]:
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
    """Two engines reporting under one (app, pool) in a process are one logical pool."""
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
            out[h]["sum"] += doc[h]["sum"]
    return out
