"""/metrics latency: pgpressure holding ~5,000 series vs prometheus-postgres-exporter.

One throwaway PostgreSQL 15; against it, in the same run:

- pgpressure, started through bench/synthetic_daemon.py: the real daemon (real activity and
  database sources on their schedules) with a synthetic snapshot of ~5,000 series
  (pg_statement_* per queryid, sqlalchemy_pool_* per app/pool) pre-published in its store;
- Debian's prometheus-postgres-exporter with its default collectors.

Scrapes alternate between the two (A, B, A, B, ...) over one keep-alive connection each, so
drift on the shared 2-core machine hits both alike: --scrapes per exporter with the database
up back-to-back, --paced one pair per --pace seconds (every pgpressure scrape then finds a
changed store, as a real Prometheus does), the same paced run with Prometheus's own request
headers (OpenMetrics preferred, gzip; "prom" in the table), then again after `pg_ctl stop`
(database unreachable). The time is request sent to last body byte read; "bytes" are on the
wire. Finally, in-process, the uncached render time of the same snapshot
(Renderer.render after store.touch()).

    python bench/bench_metrics.py [--scrapes 500] [--series 5000]

Goal (issue 2): pgpressure p99 below 20 ms with the database up and down.
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
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from exporter.devtools.cluster import Cluster, free_port  # noqa: E402
from exporter.devtools.daemon_process import logged_process, one_target_config  # noqa: E402

GOAL_P99_MS = 20.0
POSTGRES_EXPORTER = "/usr/bin/prometheus-postgres-exporter"
ACCEPT = "text/plain;version=0.0.4;q=0.9,*/*;q=0.1"
#: What Prometheus 2.x/3.x sends by default: OpenMetrics first, and gzip.
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2",
    "Accept-Encoding": "gzip",
}


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


def interleaved(
    a: Scraper, b: Scraper, n: int, pace: float = 0.0
) -> tuple[list[float], list[float]]:
    """n scrapes of each, alternating who goes first; with `pace`, one pair per `pace` s."""
    for _ in range(10):  # warm-up, not counted
        a.scrape()
        b.scrape()
    ta, tb = [], []
    start = time.monotonic()
    for i in range(n):
        if pace:
            delay = start + i * pace - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        first, second = (a, b) if i % 2 == 0 else (b, a)
        t1, t2 = first.scrape(), second.scrape()
        (ta if first is a else tb).append(t1)
        (tb if second is b else ta).append(t2)
    return ta, tb


def uncached_render(series: int, rounds: int = 50) -> tuple[dict[str, float], int, int]:
    from synthetic_daemon import publish_synthetic

    from exporter.core.render import Renderer
    from exporter.core.store import Store

    store = Store()
    publish_synthetic(store, series)
    store.health(("activity", "main")).up = True
    renderer = Renderer(store)
    times = []
    body = b""
    for _ in range(rounds):
        store.touch()
        t0 = time.perf_counter()
        body = renderer.render()
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    renderer.render()  # cached
    cached = time.perf_counter() - t0
    lines = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    stats = percentiles(times)
    stats["cached"] = cached * 1000
    return stats, lines, len(body)


def RUNS(args: argparse.Namespace) -> list[tuple[str, str, int, float]]:
    """(database state, mode, scrapes, pace in seconds between pairs). Plain text unless
    the mode says `prom`: Prometheus's own headers (OpenMetrics preferred, gzip)."""
    return [
        ("up", "back-to-back", args.scrapes, 0.0),
        ("up", f"paced {args.pace:g}s", args.paced, args.pace),
        ("up", f"prom {args.pace:g}s", args.paced, args.pace),
        # postgres_exporter takes about 1 s per scrape with the database down, which paces
        # this run by itself: every pgpressure scrape finds a changed store.
        ("down", "back-to-back", args.scrapes_down, 0.0),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scrapes", type=int, default=500, help="back-to-back, database up")
    parser.add_argument("--paced", type=int, default=60, help="paced scrapes, database up")
    parser.add_argument("--pace", type=float, default=1.1, help="seconds between paced pairs")
    parser.add_argument("--scrapes-down", type=int, default=100, help="database down")
    parser.add_argument("--series", type=int, default=5000)
    args = parser.parse_args()
    if not Path(POSTGRES_EXPORTER).exists():
        raise SystemExit(
            f"{POSTGRES_EXPORTER} not found: apt-get install prometheus-postgres-exporter"
        )

    tmp = Path(tempfile.mkdtemp(prefix="pgpressure-bench-"))
    results: dict[tuple[str, str], dict[str, float]] = {}
    sizes: dict[tuple[str, str], tuple[int, int]] = {}
    notes: list[str] = []
    try:
        with Cluster() as cluster:
            cluster.psql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            config = tmp / "config.yaml"
            config.write_text(
                one_target_config(cluster.dsn(), statements="{interval: 15s, top_n: 20}")
            )
            ours = Scraper("pgpressure", free_port())
            theirs = Scraper("postgres_exporter", free_port())
            ours_cmd = [
                sys.executable,
                str(BENCH / "synthetic_daemon.py"),
                "--config.file",
                str(config),
                "--web.listen-address",
                f"127.0.0.1:{ours.port}",
                "--series",
                str(args.series),
            ]
            theirs_cmd = [POSTGRES_EXPORTER, f"--web.listen-address=127.0.0.1:{theirs.port}"]
            theirs_env = {"DATA_SOURCE_NAME": cluster.dsn() + "?sslmode=disable"}
            with (
                logged_process(ours_cmd, tmp / "pgpressure.log"),
                logged_process(theirs_cmd, tmp / "postgres_exporter.log", theirs_env),
            ):
                ours.wait_up()
                theirs.wait_up()
                time.sleep(3)  # let the sources take their first samples
                cluster_running = True
                for state, mode, n, pace in RUNS(args):
                    if state == "down" and cluster_running:
                        cluster.stop()
                        cluster_running = False
                        time.sleep(4)  # both notice: failed samples, refused connections
                    for scraper in (ours, theirs):
                        prom = mode.startswith("prom")
                        scraper.headers = PROMETHEUS_HEADERS if prom else {"Accept": ACCEPT}
                    ta, tb = interleaved(ours, theirs, n, pace)
                    for name, times, scraper in (
                        ("pgpressure", ta, ours),
                        ("postgres_exporter", tb, theirs),
                    ):
                        results[(name, state, mode)] = percentiles(times)
                        sizes[(name, state, mode)] = (scraper.series(), scraper.last_wire_bytes, n)
                    up_ours = ours.value(b'pgpressure_source_up{source="activity"')
                    up_theirs = theirs.value(b"pg_up")
                    notes.append(
                        f"database {state} ({mode}): "
                        f"pgpressure_source_up{{source=activity}}={up_ours}, "
                        f"postgres_exporter pg_up={up_theirs}"
                    )
        render, render_lines, render_bytes = uncached_render(args.series)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    report(args, results, sizes, notes, render, render_lines, render_bytes)
    return 0


def report(args, results, sizes, notes, render, render_lines, render_bytes) -> None:
    keys = ("p50", "p95", "p99", "max")
    print(
        f"\n== bench_metrics: pgpressure with ~{args.series} series vs"
        " prometheus-postgres-exporter,"
        f" interleaved scrapes, {os.cpu_count()} cores, latency in ms =="
    )
    head = f"{'exporter':<18} {'database':<8} {'mode':<13} {'n':>4} {'series':>6} {'bytes':>7}"
    print(head + "".join(f" {k:>7}" for k in keys))
    for state, mode, _, _ in RUNS(args):
        for name in ("pgpressure", "postgres_exporter"):
            r, (series, size, n) = results[(name, state, mode)], sizes[(name, state, mode)]
            row = f"{name:<18} {state:<8} {mode:<13} {n:>4} {series:>6} {size:>7}"
            print(row + "".join(f" {r[k]:>7.2f}" for k in keys))
        ours, theirs = (
            results[("pgpressure", state, mode)],
            results[("postgres_exporter", state, mode)],
        )
        row = f"{'  ratio pgp/pe':<18} {state:<8} {mode:<13} {'':>4} {'':>6} {'':>7}"
        print(row + "".join(f" {ours[k] / theirs[k]:>7.2f}" for k in keys))
    for note in notes:
        print(note)
    print(
        f"uncached render in-process ({render_lines} series, {render_bytes} bytes):"
        f" p50 {render['p50']:.2f} ms, p95 {render['p95']:.2f} ms, max {render['max']:.2f} ms;"
        f" cached {render['cached'] * 1000:.1f} us"
    )
    for state, mode, _, _ in RUNS(args):
        p99 = results[("pgpressure", state, mode)]["p99"]
        verdict = "OK" if p99 < GOAL_P99_MS else "ABOVE GOAL"
        print(
            f"goal: pgpressure p99 < {GOAL_P99_MS:g} ms, database {state}, {mode}:"
            f" {p99:.2f} ms {verdict}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
