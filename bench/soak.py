"""Soak: the daemon for 10 minutes at 1 s sampling with 200 app processes pushing and churning.

    python bench/soak.py [--duration 600] [--warmup 120] [--processes 200] [--workers 4]

A throwaway PostgreSQL with a few busy sessions is sampled every second (activity and
statements). A few OS worker processes push reports over HTTP on behalf of `--processes`
simulated app processes (each identified by its own process id, as the instrumentation does),
every 5 s like the real reporter; simulated processes restart now and then (a new id; the old
one goes silent and expires after `stale_after`), so the aggregator keeps folding departed
processes in. /metrics is scraped every second.

Resident memory of the daemon is sampled every 5 s. The pass mark is growth below 5% from
the end of the warm-up to the end of the run, comparing medians of the minute after warm-up
and the last minute (single readings are noisy). Not run in CI; prints the figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exporter.devtools.cluster import Cluster
from pgpressure_sqlalchemy.wire import NBUCKETS, SCHEMA_VERSION

PUSH_INTERVAL = 5.0
TOKEN = "soak-token"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- simulated app processes -------------------------------------------------------------------
class SimProcess:
    def __init__(self, app: str, slot: int, generation: int) -> None:
        self.app = app
        self.id = f"soakhost-{slot}:{os.getpid()}:{generation}:{time.time():.3f}"
        self.seq = 0
        self.checkouts = 0
        self.buckets = {h: [0] * NBUCKETS for h in ("wait", "use", "create", "query")}
        self.sums = dict.fromkeys(self.buckets, 0.0)

    def report(self) -> bytes:
        self.seq += 1
        n = random.randint(20, 200)
        self.checkouts += n
        for h in self.buckets:
            for _ in range(3):
                self.buckets[h][random.randrange(NBUCKETS - 1)] += n // 3
            self.sums[h] += n * 0.004
        pools = []
        for name in ("default", "replica"):
            pools.append(
                {
                    "pool": name,
                    "kind": "QueuePool",
                    "used": random.randint(0, 5),
                    "idle": random.randint(0, 5),
                    "pending": random.randint(0, 2),
                    "size": 5,
                    "max": 15,
                    "checkouts": self.checkouts,
                    "timeouts": self.checkouts // 1000,
                    "closed": {
                        "recycle": self.seq // 10,
                        "invalidated": 0,
                        "overflow": self.seq // 5,
                        "other": 0,
                    },
                    "wait": {"counts": self.buckets["wait"], "sum": self.sums["wait"]},
                    "use": {"counts": self.buckets["use"], "sum": self.sums["use"]},
                    "create": {"counts": self.buckets["create"], "sum": self.sums["create"]},
                    "query": {"counts": self.buckets["query"], "sum": self.sums["query"]},
                }
            )
        doc = {
            "version": SCHEMA_VERSION,
            "app": self.app,
            "process": {"id": self.id, "host": "soakhost", "pid": os.getpid(), "started": 0.0},
            "seq": self.seq,
            "interval": PUSH_INTERVAL,
            "sent_at": time.time(),
            "pools": pools,
        }
        return json.dumps(doc).encode()


def worker(url: str, slots: range, deadline: float, churn: float, out: mp.Queue) -> None:
    apps = ["orders", "billing", "search", "auth", "reports"]
    procs = {s: SimProcess(apps[s % len(apps)], s, 0) for s in slots}
    generation = dict.fromkeys(slots, 0)
    stats = {"sent": 0, "ok": 0, "errors": 0, "restarts": 0}
    # Spread pushes over the interval, as unsynchronised workers would.
    offsets = {s: random.uniform(0, PUSH_INTERVAL) for s in slots}
    start = time.monotonic()
    next_push = {s: start + offsets[s] for s in slots}
    while time.monotonic() < deadline:
        s = min(next_push, key=next_push.get)
        delay = next_push[s] - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if random.random() < churn:  # the process restarts: new id, old one goes silent
            generation[s] += 1
            procs[s] = SimProcess(procs[s].app, s, generation[s])
            stats["restarts"] += 1
        req = urllib.request.Request(
            url + "/api/v1/reports",
            data=procs[s].report(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
        )
        stats["sent"] += 1
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                stats["ok"] += resp.status == 200
        except Exception:
            stats["errors"] += 1
        next_push[s] += PUSH_INTERVAL
    out.put(stats)


# -- the run -----------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600)
    parser.add_argument("--warmup", type=float, default=120)
    parser.add_argument("--processes", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--churn", type=float, default=0.02, help="restart chance per push")
    args = parser.parse_args()

    with Cluster() as pg:
        pg.psql("CREATE EXTENSION pg_stat_statements")
        tmp = Path(tempfile.mkdtemp(prefix="pgpressure-soak-"))
        config = tmp / "config.yaml"
        config.write_text(f"""
databases:
  - name: main
    dsn: {pg.dsn()}
    activity: {{interval: 1s}}
    statements: {{interval: 1s, top_n: 20}}
ingest:
  enabled: true
  token: {TOKEN}
  stale_after: 30s
""")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(tmp / "daemon.log", "w")  # noqa: SIM115
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exporter",
                "--config.file",
                str(config),
                "--web.listen-address",
                f"127.0.0.1:{port}",
                "--log.level",
                "info",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
        )
        # Some database activity to sample: sessions running short queries and sleeps.
        load = [
            subprocess.Popen(
                [
                    "psql",
                    pg.dsn(),
                    "-q",
                    "-c",
                    f"SELECT count(*) FROM generate_series(1, 20000) g, pg_sleep(0.0{i})",
                    "-c",
                    "\\watch 0.5",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for i in range(1, 4)
        ]
        try:
            for _ in range(100):
                try:
                    urllib.request.urlopen(url + "/-/ready", timeout=1)
                    break
                except Exception:
                    time.sleep(0.2)
            started = time.monotonic()
            deadline = started + args.duration
            out: mp.Queue = mp.Queue()
            per = args.processes // args.workers
            workers = [
                mp.Process(
                    target=worker,
                    args=(url, range(w * per, (w + 1) * per), deadline, args.churn, out),
                )
                for w in range(args.workers)
            ]
            for w in workers:
                w.start()

            rss: list[tuple[float, int]] = []
            scrapes: list[float] = []
            stop = threading.Event()

            def scraper() -> None:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    try:
                        urllib.request.urlopen(url + "/metrics", timeout=5).read()
                        scrapes.append(time.perf_counter() - t0)
                    except Exception:
                        scrapes.append(float("inf"))
                    time.sleep(1.0)

            threading.Thread(target=scraper, daemon=True).start()
            while time.monotonic() < deadline:
                rss.append((time.monotonic() - started, rss_kib(daemon.pid)))
                time.sleep(5)
            stop.set()
            totals = {"sent": 0, "ok": 0, "errors": 0, "restarts": 0}
            for _ in workers:
                for k, v in out.get(timeout=30).items():
                    totals[k] += v
            for w in workers:
                w.join(10)
            metrics = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
        finally:
            daemon.terminate()
            daemon.wait(10)
            for p in load:
                p.terminate()
            log.close()

    after_warmup = [k for t, k in rss if args.warmup <= t < args.warmup + 60]
    last_minute = [k for t, k in rss if t >= args.duration - 60]
    base = statistics.median(after_warmup)
    end = statistics.median(last_minute)
    growth = (end - base) / base * 100
    finite = sorted(s for s in scrapes if s != float("inf"))
    reports = {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("pgpressure_reports_total{")
    }
    print(
        f"soak: {args.duration:.0f}s, {args.processes} simulated app processes "
        f"from {args.workers} OS processes, push every {PUSH_INTERVAL:g}s, 1s sampling"
    )
    print(f"pushes: {totals}; daemon counted {reports}")
    live = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("sqlalchemy_app_processes{")
    )
    print(f"live app processes at the end (sqlalchemy_app_processes, summed): {live:.0f}")
    print(
        f"RSS KiB: first {rss[0][1]}, median minute after warm-up ({args.warmup:.0f}s) "
        f"{base:.0f}, median last minute {end:.0f}, max {max(k for _, k in rss)}"
    )
    print(f"RSS growth after warm-up: {growth:+.2f}% (pass mark < 5%)")
    print(
        f"/metrics: {len(scrapes)} scrapes, failures {len(scrapes) - len(finite)}, "
        f"median {statistics.median(finite) * 1000:.1f} ms, "
        f"p99 {finite[int(len(finite) * 0.99) - 1] * 1000:.1f} ms, max {finite[-1] * 1000:.1f} ms"
    )
    print(
        "RSS timeline (s, KiB): "
        + ", ".join(f"{t:.0f}:{k}" for t, k in rss[:: max(1, len(rss) // 12)])
    )
    return 0 if growth < 5 and totals["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
