"""Fault suite: the daemon stays up, fast and honest while PostgreSQL and the network break.

One real daemon (a subprocess, as users run it) samples two targets on one real PostgreSQL:
`main` through a TCP proxy in this test that can stop forwarding without closing, and
`direct` straight to the server. While a prober scrapes /metrics every 50 ms, PostgreSQL is
killed (`pg_ctl -m immediate`) and restarted five times and the proxy stalls the network.

After each fault and each recovery the test checks, from outside the process:
- every probe answered 200, and fast (each one timed; the figures are printed);
- pgpressure_source_up / errors_total tell the truth during the outage;
- recovery is automatic;
- exactly one `application_name='pgpressure'` session per target on the server;
- the daemon's asyncio task count, open file descriptors and threads do not grow
  (read through a small launcher that reports `asyncio.all_tasks()` of the daemon's loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import itertools
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from exporter.devtools.aws_emulator import (
    FaultProxy,
    clients,
    moto_server,
    put_datapoints,
    rds_proxy_only_config,
)
from exporter.devtools.cluster import Cluster
from exporter.devtools.daemon_process import DaemonProcess, free_port, run_daemon

# Per-probe bounds. The figure is 100 ms; a single probe on a 2-core CI runner that is
# busy restarting PostgreSQL can be descheduled for longer than that (1.07 s seen once with
# other test runs on the machine), so the hard per-request bound only separates "descheduled"
# from "waited on a source": a scrape that waited on a stalled database or AWS call would take
# the call's timeout, 5 s or more. The 100 ms figure is asserted on the 99th percentile.
PROBE_HARD_BOUND = 3.0
PROBE_P99_BOUND = 0.100

LAUNCHER = r"""
import asyncio, json, os, sys, threading, time

loops = []


class RecordingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self):
        loop = super().new_event_loop()
        loops.append(loop)
        return loop


asyncio.set_event_loop_policy(RecordingPolicy())
stats_path = os.environ["PGPRESSURE_TEST_STATS"]


async def _count():
    return len(asyncio.all_tasks()) - 1  # not this one


def report():
    while True:
        time.sleep(0.25)
        if not loops or loops[0].is_closed():
            continue
        try:
            n = asyncio.run_coroutine_threadsafe(_count(), loops[0]).result(2)
        except Exception:
            continue
        tmp = stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"tasks": n, "at": time.time()}, f)
        os.replace(tmp, stats_path)


threading.Thread(target=report, daemon=True, name="test-stats").start()
from exporter.cli import main

sys.exit(main(sys.argv[1:]))
"""


# -- a TCP proxy that can stall ----------------------------------------------------------------
class StallingProxy:
    """Forwards 127.0.0.1:<port> to the upstream port. stall() stops moving bytes in both
    directions (and connecting upstream) while keeping every connection open; resume() goes on.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._flowing: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="stalling-proxy")
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread.start()
        self._ready.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port)
        )
        self._ready.set()
        self.loop.run_forever()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(65536)
                await self._flowing.wait()
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self._writers.add(writer)
        try:
            await self._flowing.wait()
            try:
                up_reader, up_writer = await asyncio.open_connection(
                    "127.0.0.1", self.upstream_port
                )
            except OSError:
                return
            self._writers.add(up_writer)
            await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
            self._writers.discard(up_writer)
        finally:
            writer.close()
            self._writers.discard(writer)

    def stall(self) -> None:
        assert self._flowing is not None
        self.loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        assert self._flowing is not None
        self.loop.call_soon_threadsafe(self._flowing.set)

    def open_connections(self) -> int:
        return len(self._writers)

    def close(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            for w in list(self._writers):
                w.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


# -- the daemon, with the stats launcher -------------------------------------------------------
class FaultDaemon(DaemonProcess):
    stats_path: Path

    def tasks(self) -> int:
        """The daemon's asyncio task count: the least seen over 1.5 s of reports (every
        0.25 s), so a sampling job that happens to be in flight is not counted as a leak."""
        seen: list[int] = []
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline or not seen:
            with contextlib.suppress(OSError, ValueError):
                doc = json.loads(self.stats_path.read_text())
                if time.time() - doc["at"] < 1.0:
                    seen.append(int(doc["tasks"]))
            time.sleep(0.1)
            if time.monotonic() > deadline + 5:
                raise AssertionError("the daemon's task count is not being reported")
        return min(seen)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def threads(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
        raise AssertionError("no Threads line")


@contextlib.contextmanager
def fault_daemon(config_yaml: str) -> Iterator[FaultDaemon]:
    """run_daemon through LAUNCHER, which reports the daemon's asyncio task count."""
    tmp = Path(tempfile.mkdtemp(prefix="pgpressure-faults-"))
    (tmp / "launcher.py").write_text(LAUNCHER)
    env = {
        "PGPRESSURE_TEST_STATS": str(tmp / "stats.json"),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    with run_daemon(
        config_yaml, env=env, program=(str(tmp / "launcher.py"),), daemon_class=FaultDaemon
    ) as daemon:
        daemon.stats_path = tmp / "stats.json"
        yield daemon


class Prober:
    """Scrapes /metrics every 50 ms in a thread; records (monotonic, seconds, status)."""

    def __init__(self, url: str) -> None:
        self.url = url + "/metrics"
        self.results: list[tuple[float, float, int | str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="prober")

    def _run(self) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                status: int | str = session.get(self.url, timeout=5).status_code
            except requests.RequestException as exc:
                status = type(exc).__name__
            self.results.append((time.monotonic(), time.perf_counter() - started, status))
            time.sleep(0.05)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def worst_since(self, since: float) -> float:
        """Slowest probe (ms) that started after `since` (time.monotonic())."""
        return max((t * 1000 for at, t, _ in self.results if at - t >= since), default=0.0)

    def summary(self) -> dict[str, float]:
        times = sorted(t for _, t, _ in self.results)
        return {
            "probes": len(times),
            "max_ms": times[-1] * 1000,
            "p99_ms": times[int(len(times) * 0.99) - 1] * 1000,
            "median_ms": statistics.median(times) * 1000,
        }

    def check(self) -> dict[str, float]:
        bad = [(t, s) for _, t, s in self.results if s != 200]
        assert not bad, f"/metrics did not answer 200: {bad[:5]}"
        summary = self.summary()
        assert summary["probes"] > 50
        assert summary["max_ms"] < PROBE_HARD_BOUND * 1000, summary
        assert summary["p99_ms"] < PROBE_P99_BOUND * 1000, summary
        return summary


# -- the suite ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster() as c:
        yield c


def config_for(cluster: Cluster, proxy: StallingProxy) -> str:
    def target(name: str, port: int, db: str) -> str:
        return f"""
  - name: {name}
    dsn: postgresql://postgres@127.0.0.1:{port}/{db}
    activity: {{interval: 1s}}
    statements: {{interval: 1s, pinning_risk: false}}
    statement_timeout: 500ms
    lock_timeout: 200ms
    connect_timeout: 1s"""

    return f"""
databases:{target("main", proxy.port, "postgres")}{target("direct", cluster.port, "template1")}
ingest: {{enabled: false}}
"""


def sessions_by_db(cluster: Cluster) -> dict[str, int]:
    out = cluster.psql(
        "SELECT datname, count(*) FROM pg_stat_activity "
        "WHERE application_name = 'pgpressure' GROUP BY datname"
    )
    return {row.split("|")[0]: int(row.split("|")[1]) for row in out.splitlines() if row}


def up(daemon: FaultDaemon, target: str, source: str = "activity") -> float | None:
    return daemon.value("pgpressure_source_up", source=source, target=target)


def settle(daemon: FaultDaemon, cluster: Cluster) -> dict[str, int]:
    """Wait until every source is up and the server shows one session per target."""
    daemon.wait_for(
        lambda: all(
            up(daemon, t, s) == 1 for t in ("main", "direct") for s in ("activity", "database")
        ),
        timeout=20,
    )
    daemon.wait_for(lambda: sessions_by_db(cluster) == {"postgres": 1, "template1": 1}, timeout=10)
    # And it stays that way over a few samples: no second connection appears.
    for _ in range(3):
        time.sleep(0.4)
        assert sessions_by_db(cluster) == {"postgres": 1, "template1": 1}
    return {"tasks": daemon.tasks(), "fds": daemon.fds(), "threads": daemon.threads()}


def test_postgres_killed_five_times_and_network_stalled(cluster: Cluster) -> None:
    proxy = StallingProxy(cluster.port)
    try:
        with fault_daemon(config_for(cluster, proxy)) as d, Prober(d.url) as prober:
            baseline = settle(d, cluster)
            print(f"\nbaseline: {baseline}")
            resources = [baseline]
            recoveries = []

            # 1. PostgreSQL killed five times.
            for cycle in range(5):
                errors = {
                    t: d.value("pgpressure_source_errors_total", source="activity", target=t)
                    for t in ("main", "direct")
                }
                assert 'pg_max_connections{target="direct"}' in d.metrics_text()
                cluster.stop("immediate")
                d.wait_for(lambda: up(d, "main") == 0 and up(d, "direct") == 0, timeout=10)
                time.sleep(1.0)  # an outage of a few samples
                assert d.value("pgpressure_source_up", source="database", target="direct") == 0
                for t in ("main", "direct"):
                    assert (
                        d.value("pgpressure_source_errors_total", source="activity", target=t)
                        > errors[t]
                    )
                # Counters survive the outage; gauges from the dead server are gone.
                text = d.metrics_text()
                assert "pg_activity_samples_total" in text
                assert 'pg_max_connections{target="direct"}' not in text
                cluster.start()
                restarted = time.monotonic()
                d.wait_for(lambda: up(d, "main") == 1 and up(d, "direct") == 1, timeout=15)
                recoveries.append(time.monotonic() - restarted)
                resources.append(settle(d, cluster))
                print(f"kill cycle {cycle + 1}: recovered in {recoveries[-1]:.1f}s {resources[-1]}")

            # 2. The network to `main` stalls: no bytes move, nothing is closed.
            for cycle in range(2):
                errors = d.value("pgpressure_source_errors_total", source="activity", target="main")
                proxy.stall()
                stalled = time.monotonic()
                d.wait_for(lambda: up(d, "main") == 0, timeout=10)
                detected = time.monotonic() - stalled
                time.sleep(2.0)  # several reconnect attempts into the stalled network
                assert up(d, "main") == 0
                assert up(d, "direct") == 1  # the other target is unaffected
                assert (
                    d.value("pgpressure_source_errors_total", source="activity", target="main")
                    > errors
                )
                proxy.resume()
                resumed = time.monotonic()
                d.wait_for(lambda: up(d, "main") == 1, timeout=15)
                recoveries.append(time.monotonic() - resumed)
                resources.append(settle(d, cluster))
                print(
                    f"stall cycle {cycle + 1}: detected in {detected:.1f}s, recovered in "
                    f"{recoveries[-1]:.1f}s {resources[-1]}"
                )

        summary = prober.check()
        print(f"/metrics during faults: {summary}; recoveries (s): {recoveries}")
        assert "Traceback" not in d.log()
        # No leaks: after every recovery the process looks like it did at the start.
        for r in resources[1:]:
            assert r["tasks"] <= baseline["tasks"], resources
            assert r["fds"] <= baseline["fds"] + 2, resources
            assert r["threads"] <= baseline["threads"] + 2, resources
        assert max(recoveries) < 10, recoveries
    finally:
        proxy.close()


# -- AWS faults through the real daemon --------------------------------------------------------
# tests/test_rds_proxy.py drives the source directly with one fault at a time. Here the faults
# are sustained, hit the real daemon process, and include answers that are well-formed JSON of
# the wrong shape and oversized bodies: the daemon must back off (fewer attempts as the outage
# goes on), keep serving /metrics, keep its thread count flat, and recover by itself.
AWS_SECRET = "aws-canary-Secret-9f8e7d6c5b4a"
AWS_KEY_ID = "AKIAFAULTCANARY00001"
JSON10 = {"Content-Type": "application/x-amz-json-1.0"}
AWS_FAULTS = {
    "throttled": (
        400,
        b'{"__type": "com.amazonaws.cloudwatch#ThrottlingException", "message": "Rate exceeded"}',
        {**JSON10, "x-amzn-query-error": "Throttling;Sender"},
    ),
    "server error": (500, b"<html>Internal Server Error</html>", {"Content-Type": "text/html"}),
    "truncated json": (200, b'{"MetricDataResults": [{"Id": "m0", "Values": [1.0', JSON10),
    "wrong shape": (
        200,
        b'{"MetricDataResults": [{"Id": 7, "Values": ["x", null, {}], "Timestamps": ["no"]},'
        b' "junk", null], "Messages": 5}',
        JSON10,
    ),
    "empty 200": (200, b"", JSON10),
}
# Well-formed answers with absurd content: accepted or refused, but never a crash, and
# /metrics stays valid Prometheus text.
_NOW = int(time.time())
AWS_ODD_ANSWERS = {
    "huge and non-finite values": (
        200,
        (
            '{"MetricDataResults": ['
            + ",".join(
                f'{{"Id": "q{i}", "StatusCode": "Complete", "Values": [{v}], '
                f'"Timestamps": [{_NOW - 200}]}}'
                for i, v in enumerate(["1e308", "-1e308", "1e999", "NaN", "-5", "Infinity"])
            )
            + "]}"
        ).encode(),
        JSON10,
    ),
    "oversized body": (
        200,
        b'{"MetricDataResults": [' + b'{"Id": "x", "Values": []},' * 200_000 + b"{}]}",
        JSON10,
    ),
}


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    with moto_server() as url:
        yield url


def aws_config(endpoint: str) -> str:
    rds_proxy = "{enabled: true, proxies: [orders-proxy], interval: 1s, delay: 60s, logs: false}"
    return rds_proxy_only_config(endpoint, rds_proxy, AWS_KEY_ID, AWS_SECRET)


def put_connections(moto_url: str, value: float) -> None:
    put_datapoints(
        clients(moto_url, "cloudwatch")["cloudwatch"],
        "orders-proxy",
        "DatabaseConnections",
        [value],
        datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=200),
    )


def rds_up(d: FaultDaemon) -> float | None:
    return d.value("pgpressure_source_up", source="rds_proxy")


def test_aws_throttling_500s_and_malformed_answers_back_off_without_crashing(moto: str) -> None:
    put_connections(moto, 7.0)
    with (
        FaultProxy(moto) as proxy,
        fault_daemon(aws_config(proxy.url)) as d,
        Prober(d.url) as prober,
    ):
        d.wait_for(lambda: rds_up(d) == 1)
        d.wait_for(lambda: d.value("rds_proxy_database_connections", proxy="orders-proxy") == 7)
        baseline = {"tasks": d.tasks(), "threads": d.threads(), "fds": d.fds()}
        figures = {}
        for name, fault in AWS_FAULTS.items():
            errors = d.value("pgpressure_source_errors_total", source="rds_proxy") or 0
            proxy.inject_until_cleared("GetMetricData", *fault)
            started = time.monotonic()
            d.wait_for(lambda: rds_up(d) == 0, timeout=10)
            time.sleep(4.5)
            window = [t for t in proxy.times("GetMetricData") if t >= started]
            # Backing off: 1 s interval, doubling -> attempts at ~0, 1, 3 s, not 5.
            assert 2 <= len(window) <= 4, (name, len(window))
            gaps = [b - a for a, b in itertools.pairwise(window)]
            assert gaps == sorted(gaps) or max(gaps) >= 3, (name, gaps)
            assert d.value("pgpressure_source_errors_total", source="rds_proxy") > errors
            # The last good values stay exported (they are minutes old anyway).
            assert d.value("rds_proxy_database_connections", proxy="orders-proxy") == 7
            assert d.process.poll() is None, f"daemon died on {name}"
            proxy.clear("GetMetricData")
            cleared = time.monotonic()
            d.wait_for(lambda: rds_up(d) == 1, timeout=20)
            figures[name] = {
                "attempts_in_4.5s": len(window),
                "recovered_s": round(time.monotonic() - cleared, 1),
                "worst_scrape_ms": round(prober.worst_since(started)),
            }
            print(f"{name}: {figures[name]}")
        for name, answer in AWS_ODD_ANSWERS.items():
            before = len(proxy.times("GetMetricData"))
            started = time.monotonic()
            proxy.inject_until_cleared("GetMetricData", *answer)
            d.wait_for(lambda b=before: len(proxy.times("GetMetricData")) >= b + 2, timeout=15)
            proxy.clear("GetMetricData")
            assert d.process.poll() is None, f"daemon died on {name}"
            families = d.metrics()  # parses: valid text whatever the values
            assert "pgpressure_source_up" in families
            exported = families.get("rds_proxy_database_connections")
            print(
                f"{name}: up={rds_up(d)} exported={exported} "
                f"worst_scrape_ms={prober.worst_since(started):.0f}"
            )
            d.wait_for(lambda: rds_up(d) == 1, timeout=20)
            d.wait_for(
                lambda: d.value("rds_proxy_database_connections", proxy="orders-proxy") == 7,
                timeout=20,
            )
        after = {"tasks": d.tasks(), "threads": d.threads(), "fds": d.fds()}
        print(f"resources before {baseline} after {after}")
        # One more task is a poll or a scrape in flight on a loaded machine (seen in about
        # one run in three); a leak would add at least one per fault round, eight here.
        assert after["tasks"] <= baseline["tasks"] + 1
        assert after["threads"] <= baseline["threads"] + 2
        assert after["fds"] <= baseline["fds"] + 4
        log = d.log()
    summary = prober.check()
    print(f"/metrics during AWS faults: {summary}")
    assert "Traceback" not in log
    assert AWS_SECRET not in log and AWS_KEY_ID not in log
