"""End to end: instrumented apps on a real PostgreSQL pushing to the real daemon process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest
import requests
import sqlalchemy as sa
from ingest_reports import report_doc

from exporter.devtools.daemon_process import free_port, run_daemon
from pgpressure_sqlalchemy import flush, instrument
from pgpressure_sqlalchemy.wire import NBUCKETS

CONFIG = "ingest:\n  enabled: true\n  stale_after: {stale}\n{extra}"
DOWN_SECONDS = float(os.environ.get("PGPRESSURE_TEST_DOWN_SECONDS", "8"))


def config(stale: str = "30s", extra: str = "") -> str:
    return CONFIG.format(stale=stale, extra=extra)


def url(pg, driver: str = "psycopg") -> str:
    return pg.dsn().replace("postgresql://", f"postgresql+{driver}://", 1)


class Watcher:
    """Scrapes the daemon in the background and keeps the highest gauges it saw."""

    def __init__(self, daemon, app: str) -> None:
        self.daemon, self.app = daemon, app
        self.max_used = self.max_pending = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                used = self.daemon.value("sqlalchemy_pool_connections", app=self.app, state="used")
                pending = self.daemon.value("sqlalchemy_pool_pending_requests", app=self.app)
            except requests.RequestException:
                continue
            self.max_used = max(self.max_used, used or 0)
            self.max_pending = max(self.max_pending, pending or 0)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def settle(daemon, app: str, name: str, want: float) -> None:
    """Push now and wait for the daemon's next sample to show `want`."""
    flush()
    daemon.wait_for(lambda: daemon.value(name, app=app) == want, timeout=10)


@pytest.mark.slow
def test_sync_pool_exhaustion_as_in_the_field(pg):
    app = "exhaust-" + uuid.uuid4().hex[:6]
    with run_daemon(config()) as daemon:
        engine = sa.create_engine(url(pg), pool_size=5, max_overflow=10, pool_timeout=1)
        instrument(engine, app=app, endpoint=daemon.url, interval=0.2)
        caught, done = [], []
        lock = threading.Lock()
        stop_at = time.monotonic() + 3.5

        def worker() -> None:
            while time.monotonic() < stop_at:
                try:
                    with engine.connect() as conn:
                        conn.execute(sa.text("SELECT 1"))
                        time.sleep(0.3)  # the request holds its connection for 300 ms
                    with lock:
                        done.append(1)
                except sa.exc.TimeoutError:
                    with lock:
                        caught.append(1)

        with Watcher(daemon, app) as watcher:
            threads = [threading.Thread(target=worker) for _ in range(48)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert caught, "the scenario should produce pool timeouts"
        settle(daemon, app, "sqlalchemy_pool_timeouts_total", len(caught))
        assert watcher.max_used == 15
        assert watcher.max_pending > 0
        assert daemon.value("sqlalchemy_pool_checkouts_total", app=app) == len(done)
        assert daemon.value("sqlalchemy_pool_max_connections", app=app) == 15
        assert daemon.value("sqlalchemy_pool_size", app=app) == 5
        # every timed-out caller waited at least pool_timeout: they are in the top buckets
        assert daemon.value("sqlalchemy_pool_wait_seconds_bucket", app=app, le="0.5") <= len(done)
        assert daemon.value("sqlalchemy_pool_connections", app=app, state="used") == 0
        engine.dispose()


@pytest.mark.slow
def test_async_pool_exhaustion_with_asyncpg(pg):
    from sqlalchemy.ext.asyncio import create_async_engine

    app = "async-" + uuid.uuid4().hex[:6]
    with run_daemon(config()) as daemon:

        async def scenario() -> tuple[int, int]:
            engine = create_async_engine(
                url(pg, "asyncpg"), pool_size=5, max_overflow=10, pool_timeout=1
            )
            instrument(engine, app=app, endpoint=daemon.url, interval=0.2)

            stop_at = time.monotonic() + 3.5
            ok = timed_out = 0

            async def task() -> None:
                nonlocal ok, timed_out
                while time.monotonic() < stop_at:
                    try:
                        async with engine.connect() as conn:
                            await conn.execute(sa.text("SELECT 1"))
                            await asyncio.sleep(0.3)
                        ok += 1
                    except sa.exc.TimeoutError:
                        timed_out += 1

            await asyncio.gather(*(task() for _ in range(100)))
            await engine.dispose()
            return ok, timed_out

        with Watcher(daemon, app) as watcher:
            ok, timed_out = asyncio.run(scenario())
        assert timed_out > 0 and ok > 0
        settle(daemon, app, "sqlalchemy_pool_timeouts_total", timed_out)
        assert daemon.value("sqlalchemy_pool_checkouts_total", app=app) == ok
        assert watcher.max_used == 15
        assert watcher.max_pending > 0


WORKER = textwrap.dedent("""
    import sys, time
    import sqlalchemy as sa
    from pgpressure_sqlalchemy import flush, instrument
    dsn, endpoint, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    engine = sa.create_engine(dsn, pool_size=2)
    instrument(engine, app="workers", endpoint=endpoint, interval=0.2)
    for _ in range(n):
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    flush()
    print("done", n, flush=True)
    time.sleep(120)
""")


@pytest.mark.slow
def test_worker_processes_aggregate_and_never_decrease(pg, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}

    def start(n: int) -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, str(script), url(pg), daemon.url, str(n)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert p.stdout.readline().split() == ["done", str(n)]
        return p

    with run_daemon(config(stale="2s")) as daemon:
        counts = [11, 23, 37, 51]
        workers = [start(n) for n in counts]
        try:
            total = sum(counts)
            daemon.wait_for(
                lambda: daemon.value("sqlalchemy_pool_checkouts_total", app="workers") == total
            )
            assert daemon.value("sqlalchemy_app_processes", app="workers") == 4
            assert daemon.value("sqlalchemy_pool_use_seconds_count", app="workers") == total
            seen = []

            def record() -> float:
                v = daemon.value("sqlalchemy_pool_checkouts_total", app="workers")
                seen.append(v)
                return v

            workers[1].kill()  # a gunicorn worker dies without saying goodbye
            workers[1].wait()
            workers.append(start(7))
            total += 7
            daemon.wait_for(
                lambda: (
                    record() == total
                    and daemon.value("sqlalchemy_app_processes", app="workers") == 4
                ),
                timeout=15,
            )
            # the killed worker is gone from the gauges once stale, its counts stay
            daemon.wait_for(
                lambda: daemon.value("sqlalchemy_app_processes", app="workers") == 4, timeout=10
            )
            for _ in range(10):
                record()
                time.sleep(0.1)
            assert seen == sorted(seen), seen
            assert seen[-1] == total
            assert daemon.value("sqlalchemy_pool_size", app="workers") == 8  # 4 live x 2
        finally:
            for p in workers:
                p.kill()
                p.wait()


@pytest.mark.slow
def test_daemon_down_then_back(pg):
    app = "down-" + uuid.uuid4().hex[:6]
    port = free_port()
    engine = sa.create_engine(url(pg), pool_size=3)
    errors: list[BaseException] = []
    latencies: dict[str, list[float]] = {"up": [], "down": [], "back": []}
    phase = ["up"]
    done = [0]
    stop = threading.Event()

    def app_loop() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
                done[0] += 1
            except BaseException as exc:
                errors.append(exc)
            latencies[phase[0]].append(time.perf_counter() - t0)
            time.sleep(0.005)

    loop = threading.Thread(target=app_loop, daemon=True)
    try:
        with run_daemon(config(), port=port) as daemon:
            instrument(engine, app=app, endpoint=daemon.url, interval=0.2)
            loop.start()
            daemon.wait_for(
                lambda: (daemon.value("sqlalchemy_pool_checkouts_total", app=app) or 0) > 50
            )
        phase[0] = "down"
        time.sleep(DOWN_SECONDS)
        phase[0] = "back"
        with run_daemon(config(), port=port) as daemon:
            daemon.wait_for(
                lambda: (daemon.value("sqlalchemy_pool_checkouts_total", app=app) or 0) > 0,
                timeout=10,
            )
            time.sleep(0.5)
            stop.set()
            loop.join()
            # A new daemon knows nothing, yet gets the whole cumulative total at once.
            settle(daemon, app, "sqlalchemy_pool_checkouts_total", done[0])
    finally:
        stop.set()
        if loop.is_alive():
            loop.join()
        engine.dispose()
    assert errors == []
    up, down = statistics.median(latencies["up"]), statistics.median(latencies["down"])
    assert len(latencies["down"]) > 100
    assert down < up * 1.5 + 0.001, (up, down)


def test_bad_pushes_get_4xx_are_counted_and_the_daemon_carries_on(tmp_path):
    token = "tok-" + uuid.uuid4().hex
    with run_daemon(config(extra=f"  token: {token}\n  max_body_bytes: 4096\n")) as daemon:
        endpoint = daemon.url + "/api/v1/reports"
        auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        good = {
            "version": 1,
            "app": "bad-pushes",
            "seq": 1,
            "process": {"id": "h:1:1", "host": "h", "pid": 1, "started": 1.0},
            "pools": [
                {
                    "pool": "default",
                    "used": 0,
                    "idle": 0,
                    "pending": 0,
                    "checkouts": 1,
                    "timeouts": 0,
                    "closed": {},
                    **{
                        h: {"counts": [0] * NBUCKETS, "sum": 0.0}
                        for h in ("wait", "use", "create", "query")
                    },
                }
            ],
        }
        cases = [
            (b"{oops", auth, 400, "malformed"),
            (b"x" * 10_000, auth, 413, "too_large"),
            (json.dumps(good).encode(), {}, 401, "unauthorized"),
            (json.dumps(good).encode(), {"Authorization": "Bearer nope"}, 401, "unauthorized"),
            (json.dumps({**good, "version": 99}).encode(), auth, 400, "unsupported_version"),
            (json.dumps({**good, "seq": "one"}).encode(), auth, 400, "invalid"),
        ]
        for body, headers, status, reason in cases:
            r = requests.post(endpoint, data=body, headers=headers, timeout=5)
            assert r.status_code == status, (reason, r.text)
            assert r.json()["reason"] == reason
            assert token not in r.text
        r = requests.post(endpoint, data=json.dumps(good), headers=auth, timeout=5)
        assert r.status_code == 200
        daemon.wait_for(lambda: daemon.value("pgpressure_reports_total", result="accepted") == 1)
        for reason, n in [
            ("malformed", 1),
            ("too_large", 1),
            ("unauthorized", 2),
            ("unsupported_version", 1),
            ("invalid", 1),
        ]:
            assert daemon.value("pgpressure_reports_total", result=reason) == n, reason
        assert daemon.get("/-/healthy").status_code == 200
        assert daemon.value("sqlalchemy_pool_checkouts_total", app="bad-pushes") == 1
        assert daemon.value("pgpressure_source_up", source="apps") == 1


@pytest.mark.slow
def test_paused_worker_is_not_counted_twice(pg, tmp_path):
    """A worker paused past stale_after (SIGSTOP: a frozen pod, a partition) departs and its
    totals are folded in; when it resumes under the same id, they are not added again."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with run_daemon(config(stale="1s")) as daemon:
        worker = subprocess.Popen(
            [sys.executable, str(script), url(pg), daemon.url, "13"],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        try:
            assert worker.stdout.readline().split() == ["done", "13"]

            def state() -> tuple:
                return (
                    daemon.value("sqlalchemy_pool_checkouts_total", app="workers"),
                    daemon.value("sqlalchemy_app_processes", app="workers"),
                )

            daemon.wait_for(lambda: state() == (13, 1))
            worker.send_signal(signal.SIGSTOP)
            daemon.wait_for(lambda: state() == (13, 0), timeout=10)
            worker.send_signal(signal.SIGCONT)
            daemon.wait_for(lambda: state()[1] == 1, timeout=10)
            seen = set()
            for _ in range(10):
                seen.add(state())
                time.sleep(0.1)
            assert seen == {(13, 1)}
        finally:
            worker.kill()
            worker.wait()


PRELOAD = textwrap.dedent("""
    import os, sys, threading, time
    import sqlalchemy as sa
    from pgpressure_sqlalchemy import instrument
    dsn, endpoint = sys.argv[1], sys.argv[2]
    # the master of gunicorn --preload: instruments the engine, forks, serves nothing
    engine = sa.create_engine(dsn, pool_size=2, max_overflow=1, pool_timeout=60)
    instrument(engine, app="preload", endpoint=endpoint, interval=0.2)
    for _ in range(2):
        if os.fork() == 0:  # a worker, exhausted: every connection held, one caller waiting
            engine.dispose(close=False)
            held = [engine.connect() for _ in range(3)]
            threading.Thread(target=engine.connect, daemon=True).start()
            os.write(1, b"worker\\n")  # one write: print() may split it under PYTHONUNBUFFERED
            time.sleep(120)
            os._exit(0)
    os.write(1, b"master\\n")
    time.sleep(120)
""")


@pytest.mark.slow
def test_preloading_master_does_not_dilute_pool_capacity(pg, tmp_path):
    """Under gunicorn --preload the master instruments the engine too; it never checks out, so
    it is not a process of the pool: counted, it added to the app's processes (5 with 4
    workers) and could add to its capacity, so used/max never reached 1
    (SQLAlchemyPoolExhausted could never fire)."""
    script = tmp_path / "preload.py"
    script.write_text(PRELOAD)
    with run_daemon(config()) as daemon:
        master = subprocess.Popen(
            [sys.executable, str(script), url(pg), daemon.url],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
            start_new_session=True,
        )
        try:
            assert sorted(master.stdout.readline().strip() for _ in range(3)) == [
                "master",
                "worker",
                "worker",
            ]

            def gauges() -> tuple:
                return tuple(
                    daemon.value(name, app="preload", **labels)
                    for name, labels in (
                        ("sqlalchemy_app_processes", {}),
                        ("sqlalchemy_pool_connections", {"state": "used"}),
                        ("sqlalchemy_pool_pending_requests", {}),
                        ("sqlalchemy_pool_size", {}),
                        ("sqlalchemy_pool_max_connections", {}),
                    )
                )

            daemon.wait_for(lambda: gauges()[:3] == (2, 6, 2), timeout=10)
            time.sleep(0.5)  # a few more rounds in which the master could have pushed
            assert gauges() == (2, 6, 2, 4, 6)  # two workers; used == max: exhausted
        finally:
            os.killpg(master.pid, signal.SIGKILL)
            master.wait()


def test_emptied_token_file_refuses_pushes(tmp_path):
    """The daemon fails closed: an emptied token file refuses every push with 401 (never
    opens the endpoint), and a token written to it again works at once."""
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    with run_daemon(config(extra=f"  token_file: {token_file}\n")) as daemon:
        token_file.write_text("")
        endpoint = daemon.url + "/api/v1/reports"
        body = json.dumps(report_doc(app="token-file"))
        for headers in ({}, {"Authorization": "Bearer first-token"}, {"Authorization": "Bearer"}):
            r = requests.post(endpoint, data=body, headers=headers, timeout=5)
            assert (r.status_code, r.json()["reason"]) == (401, "unauthorized"), headers
        token_file.write_text("second-token\n")
        auth = {"Authorization": "Bearer second-token", "Content-Type": "application/json"}
        assert requests.post(endpoint, data=body, headers=auth, timeout=5).status_code == 200
        token_file.write_text("")  # emptied again: still closed to pushes without the token
        r = requests.post(endpoint, data=body, timeout=5)
        assert r.status_code == 401
        daemon.wait_for(
            lambda: daemon.value("pgpressure_reports_total", result="unauthorized") == 4
        )
        assert daemon.value("sqlalchemy_pool_checkouts_total", app="token-file") == 0
