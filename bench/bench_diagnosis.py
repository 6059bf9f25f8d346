"""Cost of the live diagnosis: 50 targets and 500 pools, a full 15-minute history.

A real `Store` is filled as the sources would fill it - per target 2 databases, 6 wait
events, 10 applications, 20 statements, pinning-risk reasons; per pool (50 apps x 10 pools)
every `sqlalchemy_*` series with real histograms; 5 RDS Proxies - with values that grow
tick by tick (some pools exhausted, some targets saturated, so rules do their full work).
The diagnosis source then runs 61 ticks (15 min at 15 s), as in the daemon.

Printed: CPU time (process time, so other load on the shared machine does not count) of the
rules alone on the evidence (the issue's goal: under 50 ms), of building the evidence from
the history, and of recording one tick; the history's series, its ring bytes, what
tracemalloc sees it hold, and the bound (max_series x points).

    python bench/bench_diagnosis.py [--targets 50] [--pools 500] [--repeat 20]
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter import metrics as m  # noqa: E402
from exporter.config import DiagnosisConfig, IngestConfig  # noqa: E402
from exporter.core.store import Store  # noqa: E402
from exporter.diagnosis import rules  # noqa: E402
from exporter.diagnosis.collect import collect  # noqa: E402
from exporter.diagnosis.engine import DiagnosisSource  # noqa: E402
from exporter.ingest.wire import BOUNDS  # noqa: E402
from exporter.metrics import HistogramValue, Sample  # noqa: E402

GOAL_RULES_SECONDS = 0.050
WAITS = (
    ("CPU", "CPU"),
    ("IO", "DataFileRead"),
    ("Lock", "transactionid"),
    ("LWLock", "BufferMapping"),
    ("Client", "ClientRead"),
    ("Timeout", "PgSleep"),
)


def histogram(tick: int, scale: float, per_tick: float) -> HistogramValue:
    """A cumulative histogram that grows by `per_tick` observations around `scale` s."""
    count = tick * per_tick
    cumulative, seen = [], 0.0
    for bound in (*BOUNDS, float("inf")):
        seen = count if bound >= scale else count * 0.1 * (bound / scale)
        cumulative.append((bound, seen))
    return HistogramValue(tuple(cumulative), count * scale, count)


def target_samples(i: int, tick: int) -> list[Sample]:
    busy = 60.0 if i % 10 == 0 else 1.0  # every tenth target saturated, on CPU
    out = [
        Sample(m.MAX_CONNECTIONS, (), 500.0),
        Sample(m.VCPUS, ("config",) * len(m.VCPUS.labels), 4.0),
    ]
    out += [Sample(m.RESERVED_CONNECTIONS, (), 3.0), Sample(m.WORK_MEM_BYTES, (), 4194304.0)]
    for db in ("appdb", "postgres"):
        for j, (kind, event) in enumerate(WAITS):
            per_tick = busy if kind == "CPU" else 1.0 / (j + 1)
            out.append(Sample(m.ACTIVE_SESSION_SECONDS, (db, kind, event), tick * per_tick))
        for state in ("active", "idle", "idle in transaction"):
            out.append(Sample(m.SESSIONS, (db, state), 10.0))
        out += [
            Sample(m.BLOCKED_SESSIONS, (db,), 0.0),
            Sample(m.TEMP_BYTES, (db,), tick * 2e6),
        ]
        for reason in ("session_settings", "sequence", "advisory_lock"):
            out.append(Sample(m.PINNING_RISK_CALLS, (db, reason), tick * 3.0))
    for a in range(10):
        app = f"app{(i + a) % 50}"
        out.append(Sample(m.APPLICATION_ACTIVE_SESSION_SECONDS, ("appdb", app), tick * 0.5))
        out.append(Sample(m.APPLICATION_SESSIONS, ("appdb", app), 3.0))
    for a in range(5):
        out.append(Sample(m.APPLICATION_IDLE_IN_TRANSACTION_SECONDS, ("appdb", f"app{a}"), 2.0))
        out.append(Sample(m.LOCK_BLOCKER_SECONDS, ("appdb", f"app{a}"), 1.0))
    for q in range(20):
        key = ("appdb", str(1000 + q))
        out += [
            Sample(m.STATEMENT_TEMP_BYTES, key, tick * 1e5 * q),
            Sample(m.STATEMENT_CALLS, key, tick * 10.0),
            Sample(m.STATEMENT_EXEC_SECONDS, key, tick * 0.1 * q),
        ]
    return out


def pool_samples(app: str, pool: str, tick: int, exhausted: bool) -> list[Sample]:
    key = (app, pool)
    used, pending = (15.0, 20.0) if exhausted else (4.0, 0.0)
    out = [
        Sample(m.POOL_CONNECTIONS, (*key, "used"), used),
        Sample(m.POOL_CONNECTIONS, (*key, "idle"), 15.0 - used),
        Sample(m.POOL_SIZE, key, 5.0),
        Sample(m.POOL_MAX_CONNECTIONS, key, 15.0),
        Sample(m.POOL_PENDING_REQUESTS, key, pending),
        Sample(m.POOL_CHECKOUTS, key, tick * 100.0),
        Sample(m.POOL_TIMEOUTS, key, 0.0),
    ]
    for reason in ("recycle", "invalidated", "overflow", "other"):
        out.append(Sample(m.POOL_CONNECTIONS_CLOSED, (*key, reason), tick * 0.1))
    wait = 0.3 if exhausted else 0.0005
    for spec, scale in (
        (m.POOL_WAIT_SECONDS, wait),
        (m.POOL_USE_SECONDS, 0.05),
        (m.POOL_CREATE_SECONDS, 0.008),
        (m.QUERY_DURATION_SECONDS, 0.04),
    ):
        out.append(Sample(spec, key, histogram(tick, scale, 100.0)))
    return out


def publish(store: Store, targets: int, pools: int, tick: int) -> None:
    for i in range(targets):
        store.publish(("activity", f"t{i}"), target_samples(i, tick), (("target", f"t{i}"),))
    samples = []
    for p in range(pools):
        app, pool = f"app{p % 50}", f"pool{p // 50}"
        samples += pool_samples(app, pool, tick, exhausted=p % 7 == 0)
    samples += [Sample(m.APP_PROCESSES, (f"app{a}",), 4.0) for a in range(50)]
    for x in range(5):
        proxy = (f"proxy{x}", "", "")
        samples += [
            Sample(m.RDS_PROXY_PINNED, proxy, 10.0 * x),
            Sample(m.RDS_PROXY_DATABASE_CONNECTIONS, proxy, 40.0),
            Sample(m.RDS_PROXY_MAX_ALLOWED, proxy, 90.0),
            Sample(m.RDS_PROXY_PINNING_EVENTS, (f"proxy{x}", "session_settings"), tick * 5.0),
        ]
    store.publish(("apps", ""), samples)


def cpu(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        started = time.process_time()
        result = fn()
        best = min(best, time.process_time() - started)
    return best, result


def fill(args: argparse.Namespace, config: DiagnosisConfig) -> tuple[DiagnosisSource, list]:
    """A diagnosis source whose history holds a full window; the CPU of each record()."""
    store = Store()
    clock = [1_700_000_000.0]
    source = DiagnosisSource(config, store, clock=lambda: clock[0])
    record_cpu = []
    for tick in range(source.history.points):
        publish(store, args.targets, args.pools, tick)
        clock[0] += config.interval
        started = time.process_time()
        source.record()
        record_cpu.append(time.process_time() - started)
    return source, record_cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=50)
    parser.add_argument("--pools", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    config = DiagnosisConfig()
    source, record_cpu = fill(args, config)
    collect_cpu, evidence = cpu(lambda: collect(source.history), max(1, args.repeat // 5))
    rules_cpu, findings = cpu(lambda: rules.evaluate(evidence, config.thresholds), args.repeat)
    del source
    tracemalloc.start()  # a second fill, traced: what the history holds once the window is full
    before = tracemalloc.get_traced_memory()[0]
    source, _ = fill(args, config)
    store_bytes = sum(  # the store's own snapshots are not the history's: subtract them
        stat.size
        for stat in tracemalloc.take_snapshot().statistics("filename")
        if "bench_diagnosis" in stat.traceback[0].filename
        or "store.py" in stat.traceback[0].filename
    )
    held = tracemalloc.get_traced_memory()[0] - before - store_bytes
    tracemalloc.stop()
    report(args, source, evidence, findings, record_cpu, collect_cpu, rules_cpu, held)
    return 0 if rules_cpu < GOAL_RULES_SECONDS else 1


def report(args, source, evidence, findings, record_cpu, collect_cpu, rules_cpu, held) -> None:
    history = source.history
    widest = 8 * (2 + len(BOUNDS) + 1)  # a histogram with buckets: sum, count, buckets
    by_rule: dict[str, int] = {}
    for f in findings:
        by_rule[f.rule] = by_rule.get(f.rule, 0) + 1
    print(
        f"== bench_diagnosis: {args.targets} targets, {args.pools} pools, "
        f"{history.points} ticks of {source.interval:g} s, CPU = process time, best of runs =="
    )
    print(
        f"records: {len(evidence.targets)} targets, {len(evidence.pools)} pools, "
        f"{len(evidence.proxies)} proxies; findings: {len(findings)} {by_rule}"
    )
    print(f"rules.evaluate (all {len(rules.RULES)} rules)   {rules_cpu * 1000:8.2f} ms CPU")
    print(f"collect (evidence from history)  {collect_cpu * 1000:8.2f} ms CPU")
    print(
        f"history.record, one tick (mean)  {sum(record_cpu) / len(record_cpu) * 1000:8.2f} ms CPU"
    )
    print(
        f"history: {history.series} series x {history.points} points, rings "
        f"{history.nbytes() / 2**20:.2f} MiB, tracemalloc {held / 2**20:.2f} MiB held"
    )
    # Buckets are kept only for the wait and statement histograms of each pool, and pools are
    # capped by ingest (max_apps x max_pools_per_app); everything else is one float a tick.
    ingest = IngestConfig()
    bucketed = 2 * ingest.max_apps * ingest.max_pools_per_app
    scalar = 8 * history.points
    bound = bucketed * widest * history.points + (history.max_series - bucketed) * scalar
    print(
        f"history bound: max_series {history.max_series} x {history.points} points; "
        f"{bucketed} bucketed histograms at most (ingest caps) -> {bound / 2**20:.0f} MiB of rings "
        f"({scalar} B per scalar series, {widest * history.points} B per bucketed one)"
    )
    verdict = "OK" if rules_cpu < GOAL_RULES_SECONDS else "OVER"
    goal = f"rules under {GOAL_RULES_SECONDS * 1000:.0f} ms CPU"
    print(f"goal: {goal} -> {rules_cpu * 1000:.2f} ms: {verdict}")


if __name__ == "__main__":
    raise SystemExit(main())
