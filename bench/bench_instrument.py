"""Overhead of the in-app instrumentation on a checkout, `SELECT 1`, checkin loop.

The same loop runs against the same real PostgreSQL in one worker process per variant:

    bare                  plain SQLAlchemy engine
    bare (A/A control)    the same again, in another process: the noise floor of the method
    pgpressure            instrument(engine, ...), statement timing on, pushing every 1 s to a
                          port nobody listens on (as when the daemon is down)
    otel, no SDK          opentelemetry-instrumentation-sqlalchemy without an SDK: the API's
                          no-op providers, non-recording spans
    otel + SDK            the same with the SDK as in production: a TracerProvider with a
                          BatchSpanProcessor into an InMemorySpanExporter (spans recorded and
                          exported, then counted and dropped between rounds) and a
                          MeterProvider with a PeriodicExportingMetricReader collecting every
                          1 s into an in-memory exporter. An OTLP exporter would add
                          serialisation on top: this is a lower bound for OpenTelemetry.

One process per variant because OpenTelemetry's instrumentor wraps `Engine.connect` for every
engine of the process and its SDK runs threads of its own: in one process the bare loop would
pay for them. The instrumentor declares SQLAlchemy < 2.1; on 2.1 it refuses unless forced,
which we do and say so. Rounds are interleaved (one worker runs at a time, the order rotating)
so drift on the shared machine hits all variants alike.

Figures: each iteration is timed (wall, `perf_counter_ns`); a round's figure is the median of
its iterations; "added" is the median over rounds of (variant - bare) in the same round, and
"ratio" likewise. CPU is the worker's process CPU time per iteration (all its threads: the
reporter's pushes and the SDK's export threads count) with the same pairing. The A/A row shows
what the method reads when nothing differs.

    python bench/bench_instrument.py [--dsn postgresql://...] [--iterations 100] [--rounds 200]

Without --dsn a throwaway cluster is started. `--compare-src DIR` adds a pgpressure variant
imported from DIR (e.g. the `src` folder of a `git worktree` of an older commit), for a before
and after in one run. The goal is at most GOAL_ADDED_US of wall time added by pgpressure per
iteration (median); the exit status is 1 when it is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

GOAL_ADDED_US = 6.0  # wall time added per checkout + statement + checkin, median
ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("bare", "bare (A/A control)", "pgpressure", "otel, no SDK", "otel + SDK")


@contextlib.contextmanager
def database(dsn: str | None) -> Iterator[str]:
    if dsn:
        yield dsn
        return
    sys.path.insert(0, str(ROOT))
    try:  # the daemon package is being reorganised: take the cluster where it is
        from exporter.devtools.cluster import Cluster  # type: ignore[import-not-found]
    except ImportError:
        from exporter.devtools.cluster import Cluster

    with Cluster() as cluster:
        yield cluster.dsn()


def _driver_url(dsn: str, driver: str) -> str:
    return dsn.replace("postgresql://", f"postgresql+{driver}://", 1)


# -- worker side ----------------------------------------------------------------------------


def _otel_instrument(engine: Any) -> str:
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    instrumentor = SQLAlchemyInstrumentor()
    instrumentor.instrument(engine=engine, enable_commenter=False)
    if instrumentor.is_instrumented_by_opentelemetry:
        return "default"
    # It refused (dependency check against SQLAlchemy < 2.1): force it, and say so.
    instrumentor.instrument(engine=engine, enable_commenter=False, skip_dep_check=True)
    if not instrumentor.is_instrumented_by_opentelemetry:
        raise RuntimeError("opentelemetry-instrumentation-sqlalchemy did not instrument")
    import sqlalchemy as sa

    return f"forced with skip_dep_check on SQLAlchemy {sa.__version__}"


def _otel_sdk() -> tuple[Callable[[], None], Callable[[], dict[str, int]]]:
    """Install the SDK providers globally, as an application does. Returns a function that
    counts and drops the spans exported so far (run after each round, so memory stays flat)
    and one that flushes and reports the totals."""
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        MetricExporter,
        MetricExportResult,
        PeriodicExportingMetricReader,
    )
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    class InMemoryMetricExporter(MetricExporter):
        def __init__(self) -> None:
            super().__init__()
            self.points = 0

        def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kw: Any) -> Any:
            for rm in metrics_data.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        self.points += len(m.data.data_points)
            return MetricExportResult.SUCCESS

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return True

        def shutdown(self, timeout_millis: float = 30_000, **kw: Any) -> None:
            pass

    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(BatchSpanProcessor(spans))
    trace.set_tracer_provider(tracer_provider)
    metric_exporter = InMemoryMetricExporter()
    reader = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=1000)
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

    counted = {"spans": 0}

    def drop() -> None:
        counted["spans"] += len(spans.get_finished_spans())
        spans.clear()

    def totals() -> dict[str, int]:
        tracer_provider.force_flush()
        drop()
        return {
            "spans recorded": counted["spans"],
            "metric points exported": metric_exporter.points,
        }

    return drop, totals


def _pin(engine: Any, cpus: str | None) -> str:
    """Run this worker on the first CPU of `cpus` and its PostgreSQL backend on the second.

    Left to the scheduler, whether a worker and its backend share a core differs from process
    to process and stays so: two bare workers then differ by up to 9 us per iteration (on 300
    us), more than what is measured here. Pinned, the A/A difference stayed within 2 us. The
    backend is pinned only when it is a local `postgres` process."""
    if not cpus:
        return "not pinned"
    client, backend = (int(c) for c in cpus.split(","))
    os.sched_setaffinity(0, {client})
    with engine.connect() as conn:
        pid, addr = conn.exec_driver_sql("SELECT pg_backend_pid(), inet_server_addr()").one()
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        comm = ""
    if (addr is None or str(addr) in ("127.0.0.1", "::1")) and comm.startswith("postgres"):
        try:
            os.sched_setaffinity(pid, {backend})
            return f"worker on CPU {client}, its backend on CPU {backend}"
        except OSError as exc:
            return f"worker on CPU {client}, backend not pinned ({exc.strerror})"
    return f"worker on CPU {client}, backend not local"


def worker(variant: str, url: str, cpus: str | None) -> int:
    """Set up one variant, then run `run N` commands from stdin, one JSON line each."""
    import gc

    import sqlalchemy as sa

    logging.disable(logging.ERROR)  # expected: the refused pushes, OpenTelemetry's dep check
    note = ""
    extra: Callable[[], dict[str, Any]] = dict
    after_round: Callable[[], Any] = lambda: None  # noqa: E731
    if variant == "otel + SDK":
        after_round, extra = _otel_sdk()
    engine = sa.create_engine(url, pool_size=5)
    pinned = _pin(engine, cpus)
    if variant.startswith("pgpressure"):
        import pgpressure_sqlalchemy
        from pgpressure_sqlalchemy import instrument

        handle = instrument(engine, app="bench", endpoint="http://127.0.0.1:9", interval=1)
        note = f"from {Path(pgpressure_sqlalchemy.__file__).parent}"

        def extra() -> dict[str, Any]:
            p = handle.snapshot()
            return {"checkouts": p["checkouts"], "statements": sum(p["query"]["counts"])}

    elif variant.startswith("otel"):
        note = _otel_instrument(engine)
    stmt = sa.text("SELECT 1")
    now = time.perf_counter_ns

    def run(n: int) -> dict[str, Any]:
        walls = []
        c0 = time.process_time_ns()
        for _ in range(n):
            t0 = now()
            with engine.connect() as conn:
                conn.execute(stmt).scalar()
            walls.append(now() - t0)
        cpu = time.process_time_ns() - c0
        after_round()  # outside the figures: the SDK's exported spans are counted and dropped
        return {"wall": walls, "cpu": cpu}

    run(200)  # warm up: the first connect, the dialect, the statement cache
    gc.collect()
    print(json.dumps({"ready": note, "pinned": pinned}), flush=True)
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "run":
            print(json.dumps(run(int(rest[0]))), flush=True)
        elif cmd == "stats":
            print(json.dumps(extra()), flush=True)
        else:
            break
    engine.dispose()
    return 0


# -- coordinator side -----------------------------------------------------------------------


class Worker:
    def __init__(self, variant: str, url: str, cpus: str | None, src: str | None = None) -> None:
        # pgpressure from this checkout (or from `src`), whatever the environment has installed
        env = dict(os.environ)
        src = src or str(ROOT / "pgpressure-sqlalchemy" / "src")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        self.variant = variant
        pin = ["--cpus", cpus] if cpus else []
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", variant.split(" @ ")[0], "--url", url, *pin],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.variant!r} exited ({self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the worker's command loop ends, it disposes and exits
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def otel_available() -> bool:
    try:
        import opentelemetry.instrumentation.sqlalchemy
        import opentelemetry.sdk  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dsn")
    ap.add_argument("--driver", default="psycopg")
    ap.add_argument("--iterations", type=int, default=20, help="per round and variant")
    ap.add_argument("--rounds", type=int, default=600)
    ap.add_argument("--processes", type=int, default=4, help="worker processes per variant")
    ap.add_argument(
        "--no-pin", action="store_true", help="leave workers and backends to the scheduler"
    )
    ap.add_argument("--compare-src", metavar="DIR", help="also pgpressure imported from DIR")
    ap.add_argument("--dump", metavar="FILE", help="write every iteration's wall time (JSON)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--cpus", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.url, args.cpus)

    allowed = sorted(os.sched_getaffinity(0))
    cpus = None if args.no_pin or len(allowed) < 2 else f"{allowed[0]},{allowed[1]}"
    variants = [v for v in VARIANTS if otel_available() or not v.startswith("otel")]
    with database(args.dsn) as dsn:
        url = _driver_url(dsn, args.driver)
        sources: dict[str, str | None] = dict.fromkeys(variants)
        if args.compare_src:  # beside pgpressure, before the OpenTelemetry rows
            items = list(sources.items())
            compare = (f"pgpressure @ {args.compare_src}", str(Path(args.compare_src).resolve()))
            sources = dict([*items[:3], compare, *items[3:]])
        # `--processes` workers per variant, started together; round r uses the (r mod n)th
        # of each, so what one process happens to get (its memory layout, its backend) is
        # averaged over n rather than charged to its variant.
        pool = {
            name: [Worker(name, url, cpus, src) for _ in range(args.processes)]
            for name, src in sources.items()
        }
        everyone = [w for ws in pool.values() for w in ws]
        try:
            ready = {id(w): w.ask("") for w in everyone}
            notes = {name: ready[id(ws[0])]["ready"] for name, ws in pool.items()}
            pinned = sorted({r["pinned"] for r in ready.values()})
            wall: dict[str, list[float]] = {name: [] for name in pool}
            cpu: dict[str, list[float]] = {name: [] for name in pool}
            raw: dict[str, list[list[int]]] = {name: [] for name in pool}
            started = time.monotonic()
            names = list(pool)
            for r in range(args.rounds):
                k = r % len(names)
                for name in names[k:] + names[:k]:
                    result = pool[name][r % args.processes].ask(f"run {args.iterations}")
                    raw[name].append(result["wall"])
                    wall[name].append(statistics.median(result["wall"]) / 1000)
                    cpu[name].append(result["cpu"] / args.iterations / 1000)
            elapsed = time.monotonic() - started
            extras = {}
            for name, ws in pool.items():
                totals: dict[str, Any] = {}
                for w in ws:
                    for key, value in w.ask("stats").items():
                        totals[key] = totals.get(key, 0) + value
                extras[name] = totals
            if args.dump:
                Path(args.dump).write_text(json.dumps({"wall_ns": raw, "cpu_us": cpu}))
        finally:
            for w in everyone:
                w.close()

    import sqlalchemy as sa

    def paired(series: dict[str, list[float]], name: str) -> tuple[float, float, float]:
        """Median over rounds of the variant's figure, its ratio and its difference to the
        bare loop of the same round (pairing cancels most drift of a shared machine)."""
        v, b = series[name], series["bare"]
        return (
            statistics.median(v),
            statistics.median(x / y for x, y in zip(v, b, strict=True)),
            statistics.median(x - y for x, y in zip(v, b, strict=True)),
        )

    def spread(series: dict[str, list[float]], name: str) -> str:
        """Quartiles of the per-round differences: how much one round can be trusted."""
        d = [x - y for x, y in zip(series[name], series["bare"], strict=True)]
        q = statistics.quantiles(d, n=4)
        return f"[{q[0]:+.1f}, {q[2]:+.1f}]"

    print(
        f"SQLAlchemy {sa.__version__}, driver {args.driver}, Python {sys.version.split()[0]}, "
        f"{args.rounds} rounds x {args.iterations} iterations per variant, "
        f"{args.processes} processes each, {elapsed:.0f} s, "
        f"load average {os.getloadavg()[0]:.2f}; " + "; ".join(pinned)
    )
    print(
        f"{'variant':<26}{'wall us':>9}{'ratio':>8}{'added':>8}{'  round IQR':>16}  |"
        f"{'cpu us':>8}{'ratio':>8}{'added':>8}"
    )
    for name in wall:
        w_med, w_ratio, w_added = paired(wall, name)
        c_med, c_ratio, c_added = paired(cpu, name)
        print(
            f"{name:<26}{w_med:>9.1f}{w_ratio:>8.3f}{w_added:>8.2f}{spread(wall, name):>16}  |"
            f"{c_med:>8.1f}{c_ratio:>8.3f}{c_added:>8.2f}"
        )
    print(
        "wall: median per iteration within a round, then the median over rounds; added and "
        "ratio are paired with the bare round beside it. cpu: process CPU per iteration."
    )
    for name, note in notes.items():
        detail = ", ".join(f"{k} {v}" for k, v in extras[name].items())
        if note or detail:
            print(f"  {name}: {'; '.join(x for x in (note, detail) if x)}")
    added = paired(wall, "pgpressure")[2]
    ok = added <= GOAL_ADDED_US
    print(
        f"goal: pgpressure adds <= {GOAL_ADDED_US:g} us wall per iteration: {added:.2f} us "
        f"(ratio {paired(wall, 'pgpressure')[1]:.3f}, cpu {paired(cpu, 'pgpressure')[2]:.2f} us)"
        f": {'OK' if ok else 'MISSED'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
