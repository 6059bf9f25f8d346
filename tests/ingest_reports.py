"""Reports as apps push them to the daemon, and the daemon's ingest driven in-process with a
settable clock: pushes answered as the HTTP handler answers them, series as /metrics shows
them."""

from __future__ import annotations

import json

from exporter.config import IngestConfig
from exporter.ingest import Ingest
from pgpressure_sqlalchemy.wire import NBUCKETS, SCHEMA_VERSION


class Clock:
    """A settable clock: set or advance `now`."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def hist(n: int = 0, total: float = 0.0, bucket: int = 3) -> dict:
    """A histogram with its `n` observations in one bucket."""
    counts = [0] * NBUCKETS
    counts[bucket] = n
    return {"counts": counts, "sum": total}


def pool_doc(
    name: str = "default",
    checkouts: int = 0,
    timeouts: int = 0,
    used: int = 0,
    idle: int = 0,
    pending: int = 0,
    size: int | None = 5,
    maximum: int | None = 15,
    overflow: int = 0,
    bucket: int = 3,
) -> dict:
    """One pool of a report; its histograms count `checkouts` in `bucket`."""
    return {
        "pool": name,
        "kind": "QueuePool",
        "used": used,
        "idle": idle,
        "pending": pending,
        "size": size,
        "max": maximum,
        "checkouts": checkouts,
        "timeouts": timeouts,
        "closed": {"recycle": 0, "invalidated": 0, "overflow": overflow, "other": 0},
        "wait": hist(checkouts, checkouts * 0.001, bucket),
        "use": hist(checkouts, checkouts * 0.01, bucket),
        "create": hist(1, 0.003, bucket),
        "query": hist(checkouts, checkouts * 0.002, bucket),
    }


def report_doc(
    app: str = "orders", proc: str = "h:1:1", seq: int = 1, pools: list | None = None, **extra
) -> dict:
    """A report of one process; one default pool unless `pools` is given."""
    return {
        "version": SCHEMA_VERSION,
        "app": app,
        "process": {"id": proc, "host": "h", "pid": 1, "started": 1.0},
        "seq": seq,
        "interval": 5.0,
        "sent_at": 1.0,
        "pools": pools if pools is not None else [pool_doc()],
        **extra,
    }


# -- driving the daemon's ingest room in-process ------------------------------------------------
def make_ingest(**config) -> tuple[Ingest, Clock]:
    """An `Ingest` as the daemon builds it, with `config` and a settable clock."""
    clock = Clock()
    return Ingest(IngestConfig(**config), clock=clock), clock


def push(ingest: Ingest, body: bytes | dict) -> tuple[int, dict]:
    """What the handler answers to an authorized push of `body` (a dict is sent as JSON)."""
    if isinstance(body, dict):
        body = json.dumps(body, allow_nan=True).encode()
    return ingest.handler.receive(body)


def values(ingest: Ingest) -> dict[tuple, float]:
    """What /metrics shows of ingest now: (metric name, labels) -> value; histograms as
    their count."""
    out = {}
    for s in ingest.samples():
        v = s.value
        out[(s.spec.name, s.labels)] = v.count if hasattr(v, "count") else v
    return out


def sums(ingest: Ingest) -> dict[tuple, float]:
    """(metric name, labels) -> the sum of each histogram."""
    return {
        (s.spec.name, s.labels): s.value.sum for s in ingest.samples() if hasattr(s.value, "sum")
    }
