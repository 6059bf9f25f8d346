"""/metrics latency with ~5,000 series: pgpressure's hand-written exposition writer, the same
daemon with prometheus_client writing the text, and prometheus-postgres-exporter.

One throwaway PostgreSQL 15; against it, in the same run:

- "hand-written": pgpressure as shipped, started through bench/synthetic_daemon.py: the real
  daemon (real activity and database sources on their schedules) with a synthetic snapshot of
  ~5,000 series (pg_statement_* per queryid, sqlalchemy_pool_* per app/pool) in its store;
- "client_python": the same daemon whose renderer lets prometheus_client write the text
  (`ClientPythonRenderer` below: metric families built from the store, written by the
  library's exposition and OpenMetrics writers, with the same per-snapshot cache). It is the
  candidate the review asked for, measured here and not shipped (exporter/core/render.py
  says why);
- Debian's prometheus-postgres-exporter with its default collectors ("pe").

Scrapes rotate between the three (A, B, C, B, C, A, ...) over one keep-alive connection each,
so drift on the shared 2-core machine hits all alike. Two phases, each with fresh daemons:

- static: the synthetic snapshot is published once, so a paced scrape finds only the small
  snapshots changed (activity, the exporter's own series): --scrapes back-to-back, --paced
  one round per --pace seconds, the same paced with Prometheus's own request headers
  (OpenMetrics preferred, gzip; "prom");
- republished: the synthetic snapshots are replaced every second, as the sources behind
  those series replace theirs (apps every 1 s, database every 15 s), so every scrape writes
  all 5,000 series again: what a Prometheus scraping every 15 s or more meets. Paced and
  prom as above, then --scrapes-down after `pg_ctl stop` (postgres_exporter then takes ~1 s
  per scrape, which paces the run).

The time is request sent to last body byte read; "bytes" are on the wire. Then, in-process,
both renderers on the same store: after `store.touch()` (only the exporter's own series
written again) and after every snapshot is replaced.

    python bench/bench_metrics.py [--scrapes 500] [--paced 60] [--series 5000]

Exit status 1 if, in a republished paced or prom run, the shipped writer's p99 is above 1.25x
the other writer's: whichever writes the text must not make production scrapes slower than
that. The static runs are not gated: there the writer formats only a hundred series a scrape,
and their p99 ratio swings both ways with the machine's load (0.77 to 1.30 over three runs).

Goal (issue 2): p99 below 20 ms with the database up and down.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import http.client
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics import exposition as openmetrics_exposition
from prometheus_client.utils import floatToGoString

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from exporter.core.render import Renderer  # noqa: E402
from exporter.core.store import Snapshot, Store  # noqa: E402
from exporter.devtools.cluster import Cluster, free_port  # noqa: E402
from exporter.devtools.daemon_process import logged_process, one_target_config  # noqa: E402
from exporter.metrics import HistogramValue, Sample  # noqa: E402

GOAL_P99_MS = 20.0
MAX_P99_RATIO = 1.25
SHIPPED, CANDIDATE, PE = "hand-written", "client_python", "postgres_exporter"
POSTGRES_EXPORTER = "/usr/bin/prometheus-postgres-exporter"
ACCEPT = "text/plain;version=0.0.4;q=0.9,*/*;q=0.1"
#: What Prometheus 2.x/3.x sends by default: OpenMetrics first, and gzip.
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
    "Accept-Encoding": "gzip",
}

# --- The candidate: prometheus_client writes the text (measured here, not shipped) -----------

#: name -> (HELP and TYPE lines, sample lines) of one snapshot's families in one format.
Written = dict[str, tuple[str, str]]
_FAMILY = {
    "counter": CounterMetricFamily,  # named without `_total`, its samples with it
    "gauge": GaugeMetricFamily,
    "histogram": HistogramMetricFamily,
}


def families(samples: Iterable[Sample], scope: tuple[tuple[str, str], ...]) -> dict[str, Metric]:
    """client_python's custom-collector model: fresh families built from the data, the
    scope's labels first. A histogram's `_count` is its +Inf bucket; no `_created` samples."""
    scope_names = tuple(n for n, _ in scope)
    scope_values = tuple(v for _, v in scope)
    out: dict[str, Metric] = {}
    for s in samples:
        spec = s.spec
        family = out.get(spec.name)
        if family is None:
            labels = scope_names + spec.labels
            family = out[spec.name] = _FAMILY[spec.kind](spec.name, spec.help, labels=labels)
        if isinstance(s.value, HistogramValue):
            buckets = [(floatToGoString(bound), count) for bound, count in s.value.buckets]
            family.add_metric(scope_values + s.labels, buckets, s.value.sum)
        else:
            family.add_metric(scope_values + s.labels, s.value)
    return out


class _Collector:
    """The writers take a registry; any object whose collect() yields families will do."""

    def __init__(self, family: Metric) -> None:
        self.family = family

    def collect(self) -> list[Metric]:
        return [self.family]


def write(family: Metric, openmetrics: bool) -> tuple[str, str]:
    """(HELP and TYPE lines, sample lines) of one family as prometheus_client writes it.

    OpenMetrics with `allow-utf-8` name escaping: for legacy names (all of the catalogue's)
    the text is that of the default `underscores`, which rewrites every sample name one
    character at a time and doubles the cost. `# EOF` is added once, after the last family.
    """
    if openmetrics:
        text = openmetrics_exposition.generate_latest(
            _Collector(family), escaping=openmetrics_exposition.ALLOWUTF8
        )
        text = text.decode().removesuffix("# EOF\n")
    else:
        text = generate_latest(_Collector(family)).decode()
    help_line, type_line, sample_lines = text.split("\n", 2)
    return f"{help_line}\n{type_line}\n", sample_lines


def write_samples(samples: Iterable[Sample], scope, openmetrics: bool) -> Written:
    return {name: write(f, openmetrics) for name, f in families(samples, scope).items()}


class ClientPythonRenderer(Renderer):
    """The shipped Renderer (its store-version and gzip cache) with prometheus_client
    writing each snapshot's text, once per snapshot and format, joined under one header per
    family as the shipped one does."""

    def __init__(self, store: Store, own_series=None) -> None:
        super().__init__(store, own_series)
        self._written: dict[int, tuple[Snapshot, dict[bool, Written]]] = {}

    def _render(self, openmetrics: bool) -> bytes:
        headers: dict[str, str] = {}
        lines: dict[str, list[str]] = {}
        own = write_samples(self.own_series(), (), openmetrics)
        for written in (own, *self._snapshots_written(openmetrics)):
            for name, (header, sample_lines) in written.items():
                headers.setdefault(name, header)
                lines.setdefault(name, []).append(sample_lines)
        parts: list[str] = []
        for name, header in headers.items():
            parts.append(header)
            parts.extend(lines[name])
        if openmetrics:
            parts.append("# EOF\n")
        return "".join(parts).encode()

    def _snapshots_written(self, openmetrics: bool) -> list[Written]:
        live: dict[int, tuple[Snapshot, dict[bool, Written]]] = {}
        out: list[Written] = []
        for _, snap in self.store.snapshots():
            entry = self._written.get(id(snap))
            if entry is None or entry[0] is not snap:
                entry = (snap, {})
            if openmetrics not in entry[1]:
                entry[1][openmetrics] = write_samples(snap.samples, snap.scope, openmetrics)
            live[id(snap)] = entry
            out.append(entry[1][openmetrics])
        self._written = live
        return out


# --- Scraping ------------------------------------------------------------------------------


class Scraper:
    """One keep-alive HTTP connection to an exporter's /metrics."""

    def __init__(self, name: str, port: int) -> None:
        self.name, self.port = name, port
        self.conn: http.client.HTTPConnection | None = None
        self.last_body = b""
        self.last_wire_bytes = 0
        self.headers = {"Accept": ACCEPT}

    def scrape(self) -> float:
        """Seconds from request to the last byte of the body (decompressing not included)."""
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                self.conn.connect()
            try:
                t0 = time.perf_counter()
                self.conn.request("GET", "/metrics", headers=self.headers)
                response = self.conn.getresponse()
                body = response.read()
                elapsed = time.perf_counter() - t0
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
                continue
            if response.status != 200:
                raise RuntimeError(f"{self.name}: /metrics returned {response.status}")
            self.last_wire_bytes = len(body)
            if response.getheader("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            self.last_body = body
            return elapsed
        raise AssertionError("unreachable")

    def series(self) -> int:
        return sum(1 for line in self.last_body.splitlines() if line and not line.startswith(b"#"))

    def value(self, name: bytes) -> float | None:
        for line in self.last_body.splitlines():
            if line.startswith(name):
                return float(line.rsplit(b" ", 1)[1])
        return None

    def wait_up(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, RuntimeError, http.client.HTTPException):
                self.scrape()
                return
            self.conn = None
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer on 127.0.0.1:{self.port}")


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"p50": q[49], "p95": q[94], "p99": q[98], "max": max(ms)}


def rotated(scrapers: list[Scraper], n: int, pace: float = 0.0) -> dict[str, list[float]]:
    """n scrapes of each, the order rotating each round; with `pace`, one round per `pace` s."""
    for _ in range(10):  # warm-up, not counted
        for scraper in scrapers:
            scraper.scrape()
    times: dict[str, list[float]] = {s.name: [] for s in scrapers}
    start = time.monotonic()
    for i in range(n):
        if pace:
            delay = start + i * pace - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        k = i % len(scrapers)
        for scraper in scrapers[k:] + scrapers[:k]:
            times[scraper.name].append(scraper.scrape())
    return times


@dataclass(frozen=True)
class Run:
    phase: str  # "static" or "republished"
    database: str  # "up" or "down"
    mode: str
    n: int
    pace: float
    prom: bool = False  # Prometheus's own headers (OpenMetrics preferred, gzip)

    @property
    def gated(self) -> bool:
        """Paced runs where every series is written again, as in production."""
        return self.phase == "republished" and self.pace > 0 and self.database == "up"


def runs(args: argparse.Namespace) -> list[Run]:
    paced, prom = f"paced {args.pace:g}s", f"prom {args.pace:g}s"
    return [
        Run("static", "up", "back-to-back", args.scrapes, 0.0),
        Run("static", "up", paced, args.paced, args.pace),
        Run("static", "up", prom, args.paced, args.pace, prom=True),
        Run("republished", "up", paced, args.paced, args.pace),
        Run("republished", "up", prom, args.paced, args.pace, prom=True),
        Run("republished", "down", "back-to-back", args.scrapes_down, 0.0),
    ]


@contextlib.contextmanager
def pgpressure_pair(args, config: Path, tmp: Path, republish: bool) -> Iterator[list[Scraper]]:
    """Both pgpressure daemons (shipped and candidate renderer), answering."""
    with contextlib.ExitStack() as stack:
        scrapers = []
        for name, renderer in ((SHIPPED, "product"), (CANDIDATE, "client_python")):
            scraper = Scraper(name, free_port())
            cmd = [
                *(sys.executable, str(BENCH / "synthetic_daemon.py"), "--series", str(args.series)),
                *("--config.file", str(config), "--renderer", renderer),
                *("--web.listen-address", f"127.0.0.1:{scraper.port}"),
                *("--republish", "1" if republish else "0"),
            ]
            stack.enter_context(logged_process(cmd, tmp / f"pgpressure-{renderer}.log"))
            scrapers.append(scraper)
        for scraper in scrapers:
            scraper.wait_up()
        time.sleep(3)  # let the sources take their first samples
        yield scrapers


@dataclass
class Results:
    stats: dict[tuple[str, Run], dict[str, float]]
    sizes: dict[tuple[str, Run], tuple[int, int]]
    notes: list[str]


def measure(args: argparse.Namespace, cluster: Cluster, tmp: Path) -> Results:
    config = tmp / "config.yaml"
    config.write_text(one_target_config(cluster.dsn(), statements="{interval: 15s, top_n: 20}"))
    results = Results({}, {}, [])
    pe = Scraper(PE, free_port())
    pe_cmd = [POSTGRES_EXPORTER, f"--web.listen-address=127.0.0.1:{pe.port}"]
    pe_env = {"DATA_SOURCE_NAME": cluster.dsn() + "?sslmode=disable"}
    with logged_process(pe_cmd, tmp / "postgres_exporter.log", pe_env):
        pe.wait_up()
        for phase in ("static", "republished"):
            with pgpressure_pair(args, config, tmp, phase == "republished") as ours:
                for run in (r for r in runs(args) if r.phase == phase):
                    if run.database == "down":
                        cluster.stop()
                        time.sleep(4)  # all notice: failed samples, refused connections
                    measure_run(run, [*ours, pe], results)
    return results


def measure_run(run: Run, scrapers: list[Scraper], results: Results) -> None:
    for scraper in scrapers:
        scraper.headers = PROMETHEUS_HEADERS if run.prom else {"Accept": ACCEPT}
    times = rotated(scrapers, run.n, run.pace)
    for scraper in scrapers:
        results.stats[(scraper.name, run)] = percentiles(times[scraper.name])
        results.sizes[(scraper.name, run)] = (scraper.series(), scraper.last_wire_bytes)
    ups = [s.value(b'pgpressure_source_up{source="activity"') for s in scrapers[:2]]
    results.notes.append(
        f"{run.phase}, database {run.database} ({run.mode}): "
        f"pgpressure_source_up{{source=activity}}={ups}, pg_up={scrapers[2].value(b'pg_up')}"
    )


# --- In-process ----------------------------------------------------------------------------


IN_PROCESS_ROUNDS = 40


def in_process(series: int, rounds: int = IN_PROCESS_ROUNDS) -> dict[tuple[str, str], dict]:
    """Render times of both renderers on one store, alternating who goes first: after
    store.touch() (only the own series written again) and after every snapshot is replaced."""
    from synthetic_daemon import publish_synthetic, republish

    store = Store()
    publish_synthetic(store, series)
    store.health(("activity", "main")).up = True
    renderers = {SHIPPED: Renderer(store), CANDIDATE: ClientPythonRenderer(store)}
    out: dict[tuple[str, str], dict[str, float]] = {}
    for case, change, openmetrics in (
        ("touched, text", store.touch, False),
        ("replaced, text", lambda: republish(store), False),
        ("replaced, prom", lambda: republish(store), True),
    ):
        times: dict[str, list[float]] = {name: [] for name in renderers}
        for renderer in renderers.values():  # each snapshot written once, as in a daemon
            renderer.render(openmetrics, gzipped=openmetrics)
        for i in range(rounds):
            for name in list(renderers)[:: 1 if i % 2 else -1]:
                change()
                t0 = time.perf_counter()
                renderers[name].render(openmetrics, gzipped=openmetrics)
                times[name].append(time.perf_counter() - t0)
        for name, seconds in times.items():
            out[(case, name)] = percentiles(seconds)
    return out


# --- Report --------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scrapes", type=int, default=500, help="back-to-back, database up")
    parser.add_argument("--paced", type=int, default=60, help="paced scrapes per paced run")
    parser.add_argument("--pace", type=float, default=1.1, help="seconds between paced rounds")
    parser.add_argument("--scrapes-down", type=int, default=100, help="database down")
    parser.add_argument("--series", type=int, default=5000)
    args = parser.parse_args()
    if not Path(POSTGRES_EXPORTER).exists():
        raise SystemExit(
            f"{POSTGRES_EXPORTER} not found: apt-get install prometheus-postgres-exporter"
        )
    tmp = Path(tempfile.mkdtemp(prefix="pgpressure-bench-"))
    try:
        with Cluster() as cluster:
            cluster.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            results = measure(args, cluster, tmp)
        render = in_process(args.series)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(args, results, render)
    return 0 if verdict(args, results) else 1


KEYS = ("p50", "p95", "p99", "max")


def report(args, results: Results, render) -> None:
    print(
        f"\n== bench_metrics: pgpressure with ~{args.series} series, hand-written writer vs"
        " prometheus_client's, vs prometheus-postgres-exporter; rotating scrapes,"
        f" {os.cpu_count()} cores, latency in ms =="
    )
    head = f"{'exporter':<18} {'phase':<11} {'db':<4} {'mode':<13} {'series':>6} {'bytes':>7}"
    print(head + "".join(f" {k:>7}" for k in KEYS))
    for run in runs(args):
        for name in (SHIPPED, CANDIDATE, PE):
            r, (series, size) = results.stats[(name, run)], results.sizes[(name, run)]
            row = f"{name:<18} {run.phase:<11} {run.database:<4} {run.mode:<13} {series:>6}"
            print(f"{row} {size:>7}" + "".join(f" {r[k]:>7.2f}" for k in KEYS))
        for label, a, b in (("  client_python/hw", CANDIDATE, SHIPPED), ("  hw/pe", SHIPPED, PE)):
            ra, rb = results.stats[(a, run)], results.stats[(b, run)]
            row = f"{label:<18} {run.phase:<11} {run.database:<4} {run.mode:<13} {'':>6} {'':>7}"
            print(row + "".join(f" {ra[k] / rb[k]:>7.2f}" for k in KEYS))
    for note in results.notes:
        print(note)
    print(f"\nin-process render, {IN_PROCESS_ROUNDS} rounds each, ms:")
    for case in dict.fromkeys(c for c, _ in render):
        ours, theirs = render[(case, SHIPPED)], render[(case, CANDIDATE)]
        print(
            f"  {case:<15} hand-written p50 {ours['p50']:6.2f} p99 {ours['p99']:6.2f}"
            f" | client_python p50 {theirs['p50']:6.2f} p99 {theirs['p99']:6.2f}"
            f" | ratio p50 {theirs['p50'] / ours['p50']:5.2f}"
        )
    for run in runs(args):
        p99 = results.stats[(SHIPPED, run)]["p99"]
        ok = "OK" if p99 < GOAL_P99_MS else "ABOVE GOAL"
        print(f"goal: p99 < {GOAL_P99_MS:g} ms, {run.phase}, database {run.database},", end="")
        print(f" {run.mode}: {p99:.2f} ms {ok}")


def verdict(args, results: Results) -> bool:
    """Print the writers' p99 ratio in every gated run; False if the shipped one is above
    MAX_P99_RATIO times the other in any of them."""
    ok = True
    for run in (r for r in runs(args) if r.gated):
        shipped = results.stats[(SHIPPED, run)]["p99"]
        candidate = results.stats[(CANDIDATE, run)]["p99"]
        fine = shipped <= MAX_P99_RATIO * candidate
        ok &= fine
        print(
            f"p99 {run.phase} {run.mode}: client_python {candidate:.2f} ms /"
            f" hand-written {shipped:.2f} ms = {candidate / shipped:.2f};"
            f" shipped within {MAX_P99_RATIO:g}x of the other: {'yes' if fine else 'NO'}"
        )
    return ok


if __name__ == "__main__":
    raise SystemExit(main())
