"""Bench-only entry: the real daemon with a synthetic snapshot of ~N series pre-published.

    python bench/synthetic_daemon.py --config.file X --web.listen-address 127.0.0.1:PORT \
        [--series 5000] [--republish SECONDS] [--renderer product|client_python]

The snapshot looks like a busy installation: pg_statement_* counters per queryid (target
`main`) and the full set of sqlalchemy_pool_* series (histograms with the real bucket
bounds) per app/pool. The real sources still run against the configured database on their
schedule, so the store changes every second and the renderer's cache is invalidated as in
production. With --republish the synthetic snapshots are replaced (same samples, new
snapshots) every SECONDS too, as their real sources would replace them (apps every 1 s,
database every 15 s): what a Prometheus scraping every 15 s or more finds each time.
--renderer client_python swaps in bench_metrics.py's prometheus_client writer. Used by
bench_metrics.py; not part of the package.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter import logs
from exporter import metrics as m
from exporter.config import load
from exporter.metrics import HistogramValue, Sample
from pgpressure_sqlalchemy.wire import BOUNDS, CLOSE_REASONS

POOL_HISTOGRAMS = (m.POOL_WAIT_SECONDS, m.POOL_USE_SECONDS, m.POOL_CREATE_SECONDS)
SERIES_PER_POOL = 2 + 5 + len(CLOSE_REASONS) + 4 * (len(BOUNDS) + 1 + 2)  # 95
STATEMENT_SPECS = (m.STATEMENT_CALLS, m.STATEMENT_EXEC_SECONDS, m.STATEMENT_TEMP_BYTES)
SYNTHETIC_KEYS = (("synthetic_pools", ""), ("synthetic_statements", "main"))


def _histogram(rng: random.Random, total: int) -> HistogramValue:
    buckets, cumulative = [], 0.0
    for bound in (*BOUNDS, float("inf")):
        cumulative += rng.randint(0, total // 10 + 1)
        buckets.append((bound, cumulative))
    return HistogramValue(tuple(buckets), cumulative * 0.01, cumulative)


def pool_samples(pools: int, seed: int = 1) -> list[Sample]:
    rng = random.Random(seed)
    out: list[Sample] = []
    for i in range(pools):
        labels = (f"service-{i // 2:02d}", "default" if i % 2 == 0 else "replica")
        out += [
            Sample(m.POOL_CONNECTIONS, (*labels, "used"), float(rng.randint(0, 10))),
            Sample(m.POOL_CONNECTIONS, (*labels, "idle"), float(rng.randint(0, 10))),
            Sample(m.POOL_SIZE, labels, 20.0),
            Sample(m.POOL_MAX_CONNECTIONS, labels, 40.0),
            Sample(m.POOL_PENDING_REQUESTS, labels, float(rng.randint(0, 3))),
            Sample(m.POOL_CHECKOUTS, labels, float(rng.randint(10_000, 10_000_000))),
            Sample(m.POOL_TIMEOUTS, labels, float(rng.randint(0, 50))),
        ]
        out += [
            Sample(m.POOL_CONNECTIONS_CLOSED, (*labels, reason), float(rng.randint(0, 500)))
            for reason in CLOSE_REASONS
        ]
        out += [
            Sample(spec, labels, _histogram(rng, 100_000))
            for spec in (*POOL_HISTOGRAMS, m.QUERY_DURATION_SECONDS)
        ]
    return out


def statement_samples(queryids: int, seed: int = 2) -> list[Sample]:
    rng = random.Random(seed)
    out: list[Sample] = []
    for _ in range(queryids):
        labels = ("app", str(rng.randint(-(2**63), 2**63 - 1)))
        calls = float(rng.randint(1, 10_000_000))
        out += [
            Sample(m.STATEMENT_CALLS, labels, calls),
            Sample(m.STATEMENT_EXEC_SECONDS, labels, calls * rng.random() * 0.05),
            Sample(m.STATEMENT_TEMP_BYTES, labels, float(rng.randint(0, 2**34))),
        ]
    return out


def publish_synthetic(store, series: int) -> int:
    """Publish about `series` samples (histograms counted as their rendered lines)."""
    pools = max(1, round(series * 0.57 / SERIES_PER_POOL))
    queryids = max(1, (series - pools * SERIES_PER_POOL) // len(STATEMENT_SPECS))
    pools_key, statements_key = SYNTHETIC_KEYS
    store.publish(pools_key, pool_samples(pools))
    store.publish(statements_key, statement_samples(queryids), (("target", "main"),))
    return pools * SERIES_PER_POOL + queryids * len(STATEMENT_SPECS)


def republish(store) -> None:
    """Replace the synthetic snapshots with equal new ones, as a source run does."""
    for key, snapshot in store.snapshots():
        if key in SYNTHETIC_KEYS:
            store.publish(key, snapshot.samples, snapshot.scope)


async def republish_every(store, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        republish(store)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config.file", dest="config_file", required=True)
    parser.add_argument("--web.listen-address", dest="listen_address", required=True)
    parser.add_argument("--series", type=int, default=5000)
    parser.add_argument("--log.level", dest="log_level", default="warn")
    parser.add_argument("--republish", type=float, default=0.0, help="seconds; 0: never")
    parser.add_argument("--renderer", choices=("product", "client_python"), default="product")
    args = parser.parse_args()
    logs.setup(args.log_level, "logfmt")

    from exporter.daemon import Daemon

    async def run() -> None:
        daemon = Daemon(load(args.config_file), args.listen_address)
        publish_synthetic(daemon.store, args.series)
        if args.renderer == "client_python":
            from bench_metrics import ClientPythonRenderer

            daemon.renderer = ClientPythonRenderer(daemon.store, daemon.renderer.own_series)
        tasks = []
        if args.republish:
            tasks.append(asyncio.create_task(republish_every(daemon.store, args.republish)))
        await daemon.run()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
