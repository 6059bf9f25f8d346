"""Overhead of the in-app instrumentation on a checkout, `SELECT 1`, checkin loop.

Three engines on the same real PostgreSQL run side by side in one process: bare,
instrumented by pgpressure, and instrumented by opentelemetry-instrumentation-sqlalchemy
(where it installs: it declares SQLAlchemy < 2.1, so on 2.1 it refuses unless forced, which
we do and say so). Rounds are interleaved so drift in the machine hits all three alike, and
the per-iteration median over rounds is compared.

    python bench/bench_instrument.py [--dsn postgresql://...] [--iterations 300] [--rounds 40]

Without --dsn a throwaway cluster is started. The goal is pgpressure/bare <= 1.03.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import sqlalchemy as sa

from pgpressure_sqlalchemy import instrument

GOAL = 1.03


@contextlib.contextmanager
def database(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    from exporter.devtools.cluster import Cluster

    with Cluster() as cluster:
        yield cluster.dsn()


def _driver_url(dsn: str, driver: str) -> str:
    return dsn.replace("postgresql://", f"postgresql+{driver}://", 1)


def make_loop(engine: sa.Engine, n: int) -> Callable[[], tuple[float, float]]:
    stmt = sa.text("SELECT 1")

    def run() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            with engine.connect() as conn:
                conn.execute(stmt).scalar()
        return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n

    return run


def otel_engine(url: str) -> tuple[sa.Engine | None, str]:
    try:
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    except ImportError:
        return None, "not installed"
    engine = sa.create_engine(url, pool_size=5)
    instrumentor = SQLAlchemyInstrumentor()
    note = "default"
    instrumentor.instrument(engine=engine, enable_commenter=False)
    if not sa.event.contains(engine, "before_cursor_execute", _any_listener(engine)):
        # It refused (dependency check against SQLAlchemy < 2.1): force it, and say so.
        instrumentor.instrument(engine=engine, enable_commenter=False, skip_dep_check=True)
        note = f"forced with skip_dep_check on SQLAlchemy {sa.__version__}"
    return engine, note


def _any_listener(engine: sa.Engine) -> Callable[..., None]:
    listeners = list(engine.dispatch.before_cursor_execute)
    return listeners[0] if listeners else (lambda *a: None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn")
    ap.add_argument("--driver", default="psycopg")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument(
        "--no-statements", action="store_true", help="instrument without statement timing"
    )
    args = ap.parse_args(argv)

    with database(args.dsn) as dsn:
        url = _driver_url(dsn, args.driver)
        bare = sa.create_engine(url, pool_size=5)
        ours = sa.create_engine(url, pool_size=5)
        # An endpoint nobody listens on: pushes fail in the background, as when the daemon
        # is down, which must not cost the loop anything either.
        instrument(
            ours,
            app="bench",
            endpoint="http://127.0.0.1:9",
            interval=1,
            statements=not args.no_statements,
        )
        otel, otel_note = otel_engine(url)
        loops: dict[str, Callable[[], tuple[float, float]]] = {
            "bare": make_loop(bare, args.iterations),
            "pgpressure": make_loop(ours, args.iterations),
        }
        if otel is not None:
            loops["opentelemetry"] = make_loop(otel, args.iterations)
        for loop in loops.values():  # warm up connections, caches, the first connect
            loop()
        times: dict[str, list[float]] = {k: [] for k in loops}
        cpu: dict[str, list[float]] = {k: [] for k in loops}
        for r in range(args.rounds):
            order = list(loops.items())
            order = order[r % len(order) :] + order[: r % len(order)]
            for name, loop in order:
                wall, proc = loop()
                times[name].append(wall)
                cpu[name].append(proc)

    # Per-round ratios pair each variant with the bare loop run right beside it, which
    # cancels most of the drift of a shared machine; the median drops outlier rounds. The
    # wall time includes the database round trips (noisy on a shared machine); the process
    # CPU time is what the instrumentation itself costs the app.
    def paired(series: dict[str, list[float]]) -> tuple[dict, dict, dict]:
        med = {k: statistics.median(v) for k, v in series.items()}
        ratio = {
            k: statistics.median(t / b for t, b in zip(v, series["bare"], strict=True))
            for k, v in series.items()
        }
        added = {
            k: statistics.median(t - b for t, b in zip(v, series["bare"], strict=True))
            for k, v in series.items()
        }
        return med, ratio, added

    med, ratios, added = paired(times)
    cmed, cratios, cadded = paired(cpu)
    print(
        f"SQLAlchemy {sa.__version__}, driver {args.driver}, Python {sys.version.split()[0]}, "
        f"{args.rounds} rounds x {args.iterations} iterations, medians over rounds"
    )
    print(
        f"{'variant':<16}{'wall us':>9}{'ratio':>8}{'added':>8}  |{'cpu us':>8}{'ratio':>8}"
        f"{'added':>8}"
    )
    for name in med:
        print(
            f"{name:<16}{med[name] * 1e6:>9.1f}{ratios[name]:>8.3f}{added[name] * 1e6:>8.2f}"
            f"  |{cmed[name] * 1e6:>8.1f}{cratios[name]:>8.3f}{cadded[name] * 1e6:>8.2f}"
        )
    if otel is not None:
        print(f"opentelemetry: {otel_note} (no SDK tracer provider: non-recording spans)")
    ratio = ratios["pgpressure"]
    verdict = "OK" if ratio <= GOAL else "ABOVE GOAL"
    print(
        f"pgpressure/bare wall = {ratio:.3f} (goal <= {GOAL}): {verdict}; "
        f"{added['pgpressure'] * 1e6:.2f} us wall, {cadded['pgpressure'] * 1e6:.2f} us CPU "
        "added per checkout"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
