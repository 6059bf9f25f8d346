"""The in-app side against a real PostgreSQL and a small report receiver (no daemon)."""

from __future__ import annotations

import asyncio
import gc
import http.server
import json
import logging
import math
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool, QueuePool, SingletonThreadPool, StaticPool

from pgpressure_sqlalchemy import flush, instrument
from pgpressure_sqlalchemy import pool as instrument_pool
from pgpressure_sqlalchemy import stats as instrument_stats
from pgpressure_sqlalchemy.reporter import REPORTER


class Receiver:
    """Collects pushed reports; `status` is what it answers, `delay` how long it stalls."""

    def __init__(self) -> None:
        self.reports: list[dict] = []
        self.headers: list[dict] = []
        self.status = 200
        self.delay = 0.0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                time.sleep(outer.delay)
                outer.reports.append(json.loads(body))
                outer.headers.append(dict(self.headers))
                try:
                    self.send_response(outer.status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                except OSError:  # the client gave up waiting: what a stalled daemon causes
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def last(self, app: str, pid: int | None = None) -> dict | None:
        for doc in reversed(self.reports):
            if doc["app"] == app and (pid is None or doc["process"]["pid"] == pid):
                return doc
        return None

    def pool(self, app: str, pool: str = "default") -> dict:
        doc = self.last(app)
        assert doc is not None, f"no report from {app}"
        return next(p for p in doc["pools"] if p["pool"] == pool)

    def wait_for(self, pred: Callable[[], object], timeout: float = 10.0) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = pred()
            except (AssertionError, StopIteration, KeyError):
                value = None
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError("condition not met")


def count(hist: dict) -> int:
    return sum(hist["counts"])


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def url(pg, driver: str = "psycopg") -> str:
    return pg.dsn().replace("postgresql://", f"postgresql+{driver}://", 1)


def app_name() -> str:
    return "t-" + uuid.uuid4().hex[:8]


def push(receiver: Receiver, app: str, pool: str = "default") -> dict:
    flush()
    return receiver.pool(app, pool)


def test_queuepool_reports_everything(pg, receiver):
    app = app_name()
    engine = sa.create_engine(url(pg), pool_size=2, max_overflow=1, pool_timeout=0.3)
    instrument(engine, app=app, endpoint=receiver.url, interval=60)
    for _ in range(5):
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    held = [engine.connect() for _ in range(3)]
    p = push(receiver, app)
    assert (p["used"], p["idle"], p["pending"], p["size"], p["max"]) == (3, 0, 0, 2, 3)
    waiter_errors = []

    def waiter():
        try:
            engine.connect().close()
        except sa.exc.TimeoutError as exc:
            waiter_errors.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.1)
    assert push(receiver, app)["pending"] == 1
    t.join()
    for conn in held:
        conn.close()
    p = push(receiver, app)
    assert len(waiter_errors) == 1
    assert p["timeouts"] == 1 and p["pending"] == 0
    assert p["checkouts"] == 8
    assert count(p["wait"]) == 9  # the timed-out wait is a wait too
    assert count(p["use"]) == 8
    assert count(p["create"]) == 3
    assert count(p["query"]) >= 5
    assert p["closed"]["overflow"] == 1  # the third connection did not fit back
    assert (p["used"], p["idle"]) == (0, 2)
    doc = receiver.last(app)
    assert doc["version"] == 1 and doc["process"]["pid"] == os.getpid()
    assert doc["process"]["id"].split(":")[1] == str(os.getpid())
    engine.dispose()


def test_recycle_and_invalidation_are_classified(pg, receiver):
    app = app_name()
    engine = sa.create_engine(url(pg), pool_size=1, pool_recycle=0)
    instrument(engine, app=app, endpoint=receiver.url, interval=60)
    for _ in range(3):  # pool_recycle=0: every later checkout recycles the connection
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    engine2 = sa.create_engine(url(pg), pool_size=1)
    app2 = app_name()
    instrument(engine2, app=app2, endpoint=receiver.url, interval=60)
    with engine2.connect() as conn:
        conn.invalidate()
    with engine2.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    flush()
    assert receiver.pool(app)["closed"]["recycle"] >= 2  # the first one too, usually
    assert receiver.pool(app2)["closed"]["invalidated"] == 1
    assert receiver.pool(app2)["checkouts"] == 2
    engine.dispose()
    engine2.dispose()


def test_wrapper_survives_dispose_and_instrumenting_twice_counts_once(pg, receiver):
    app = app_name()
    engine = sa.create_engine(url(pg))
    first = instrument(engine, app=app, endpoint=receiver.url, interval=60)
    assert instrument(engine, app="other", endpoint=receiver.url) is first
    assert instrument(engine.execution_options(isolation_level="AUTOCOMMIT")) is first
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    engine.dispose()
    engine.dispose()
    for _ in range(2):
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    p = push(receiver, app)
    assert p["checkouts"] == 3 and count(p["use"]) == 3
    assert count(p["create"]) == 2  # one before and one after the disposes
    assert p["closed"]["other"] == 1  # dispose closed the idle one
    assert "Instrumented" in type(engine.pool).__name__
    engine.dispose()


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_engine_plugin_from_the_url(pg, receiver, driver):
    app = app_name()
    engine = sa.create_engine(
        url(pg, driver) + f"?plugin=pgpressure&pgpressure_app={app}"
        f"&pgpressure_endpoint={receiver.url}&pgpressure_interval=60"
        "&pgpressure_pool=main&pgpressure_application_name=1"
    )
    assert "pgpressure" not in str(engine.url)  # never reaches the driver
    with engine.connect() as conn:
        name = conn.execute(sa.text("SELECT current_setting('application_name')")).scalar()
    assert name == app
    p = push(receiver, app, "main")
    assert p["checkouts"] == 1
    engine.dispose()


def test_environment_supplies_the_defaults(pg, receiver, monkeypatch):
    app = app_name()
    monkeypatch.setenv("PGPRESSURE_APP", app)
    monkeypatch.setenv("PGPRESSURE_ENDPOINT", receiver.url)
    monkeypatch.setenv("PGPRESSURE_TOKEN", "tok-123")
    monkeypatch.setenv("PGPRESSURE_INTERVAL", "60")
    engine = sa.create_engine(url(pg))
    handle = instrument(engine)
    assert (handle.app, handle.endpoint, handle.interval) == (app, receiver.url, 60.0)
    with engine.connect():
        pass
    push(receiver, app)
    assert receiver.headers[-1]["Authorization"] == "Bearer tok-123"
    engine.dispose()


@pytest.mark.parametrize("poolclass", [NullPool, StaticPool])
def test_other_pools_report_what_they_can(pg, receiver, poolclass):
    app = app_name()
    engine = sa.create_engine(url(pg), poolclass=poolclass)
    instrument(engine, app=app, endpoint=receiver.url, interval=60)
    for _ in range(3):
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    engine.dispose()
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    p = push(receiver, app)
    assert p["checkouts"] == 4 and count(p["use"]) == 4 and count(p["query"]) >= 4
    assert p["used"] == 0 and p["timeouts"] == 0
    if poolclass is NullPool:
        assert p["closed"]["other"] == 4 and count(p["create"]) == 4
        assert (p["size"], p["max"]) == (0, None)
    else:
        assert (p["size"], p["max"]) == (1, 1)
    engine.dispose()


def test_singleton_thread_pool(receiver):
    app = app_name()
    engine = sa.create_engine("sqlite://", poolclass=SingletonThreadPool)
    instrument(engine, app=app, endpoint=receiver.url, interval=60)
    with engine.connect() as outer:  # nested checkouts of the same connection
        outer.execute(sa.text("SELECT 1"))
        with engine.connect() as inner:
            inner.execute(sa.text("SELECT 1"))
    p = push(receiver, app)
    assert p["checkouts"] == 2 and p["used"] == 0 and count(p["query"]) == 2


async def test_async_engine_with_asyncpg(pg, receiver):
    from sqlalchemy.ext.asyncio import create_async_engine

    app = app_name()
    engine = create_async_engine(url(pg, "asyncpg"), pool_size=2, max_overflow=0, pool_timeout=0.3)
    instrument(engine, app=app, endpoint=receiver.url, interval=60, application_name=True)

    async def work():
        async with engine.connect() as conn:
            name = await conn.scalar(sa.text("SELECT current_setting('application_name')"))
            await asyncio.sleep(0.2)
            return name

    results = await asyncio.gather(*(work() for _ in range(6)), return_exceptions=True)
    timeouts = [r for r in results if isinstance(r, sa.exc.TimeoutError)]
    assert timeouts and all(r == app for r in results if isinstance(r, str))
    await asyncio.to_thread(flush)
    p = receiver.pool(app)
    assert p["kind"] == "AsyncAdaptedQueuePool"
    assert p["timeouts"] == len(timeouts)
    assert p["checkouts"] == 6 - len(timeouts)
    await engine.dispose()


def test_push_never_blocks_or_raises_into_the_app(pg, receiver):
    app = app_name()
    receiver.delay = 3.0  # a daemon that accepts the connection and then stalls
    engine = sa.create_engine(url(pg))
    instrument(engine, app=app, endpoint=receiver.url, interval=0.2)
    t0 = time.monotonic()
    for _ in range(20):
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        time.sleep(0.02)
    assert time.monotonic() - t0 < 2.0
    start = time.monotonic()
    assert flush(timeout=0.3).get(receiver.url, "not tried") in ("not tried", None)
    assert time.monotonic() - start < 1.5
    dead = sa.create_engine(url(pg))
    instrument(dead, app=app_name(), endpoint="http://127.0.0.1:9", interval=0.2)
    with dead.connect():
        pass
    receiver.delay = 0.0
    # flush() gives up on the push lock rather than wait behind a stalled push ({}), so
    # retry until a round reaches the dead endpoint: it is reported as down, not raised.
    receiver.wait_for(lambda: flush(timeout=0.5).get("http://127.0.0.1:9", "missing") is None)
    engine.dispose()
    dead.dispose()


def test_garbage_collected_engines_keep_their_totals_in_one_entry(pg, receiver):
    app = app_name()
    for _ in range(5):
        engine = sa.create_engine(url(pg))
        instrument(engine, app=app, endpoint=receiver.url, interval=60)
        with engine.connect():
            pass
        engine.dispose()
        del engine
    gc.collect()
    p = push(receiver, app)
    assert p["checkouts"] == 5 and p["used"] == 0
    assert sum(1 for r in REPORTER._regs if r.app == app) == 0
    assert sum(1 for k in REPORTER._retired if k[2] == app) == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_starts_over_with_its_own_identity(pg, receiver):
    app = app_name()
    engine = sa.create_engine(url(pg))
    instrument(engine, app=app, endpoint=receiver.url, interval=0.2)
    with engine.connect():
        pass
    parent_id = REPORTER.identity.id
    pid = os.fork()
    if pid == 0:  # child: like a gunicorn worker after --preload
        code = 1
        try:
            engine.dispose(close=False)
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            ok = REPORTER.identity.id != parent_id and REPORTER._thread.is_alive()
            time.sleep(0.6)  # let the child's own thread push
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    child = receiver.wait_for(lambda: receiver.last(app, pid=pid))
    assert child["process"]["id"] != parent_id
    assert child["pools"][0]["checkouts"] == 1  # not the parent's count
    assert push(receiver, app)["checkouts"] == 1
    assert receiver.last(app, pid=os.getpid())["process"]["id"] == parent_id
    engine.dispose()


HISTOGRAMS = ("wait", "use", "create", "query")


def test_capacity_is_reported_once_the_pool_has_checked_out(pg, receiver):
    """The master of `gunicorn --preload` instruments the engine and forks, but never checks
    out: it is not a process of the pool, so it reports nothing (no process counted, no
    capacity added to the app's max)."""
    app = app_name()
    engine = sa.create_engine(url(pg), pool_size=4, max_overflow=2)
    instrument(engine, app=app, endpoint=receiver.url, interval=60)
    flush()
    assert receiver.last(app) is None
    with engine.connect():
        pass
    p = push(receiver, app)
    assert (p["size"], p["max"], p["used"], p["idle"]) == (4, 6, 0, 1)
    engine.dispose()


class IrregularClock:
    """perf_counter readings from near zero, moving by irregular steps. Float differences of
    them are not all multiples of one quantum: so it goes in a long-running process once its
    sums outgrow 2**53 ulps of the clock, and then float additions regrouped can differ."""

    def __init__(self) -> None:
        self.t = 0.0
        self.rng = random.Random(7)
        self.base = time.perf_counter_ns()

    def seconds(self) -> float:
        self.t += self.rng.uniform(1e-4, 1e-2)
        return self.t

    def ns(self) -> int:
        return self.base + int(self.seconds() * 1e9)


def test_report_sums_never_decrease_as_engines_retire(pg, receiver, monkeypatch):
    """A retiring engine's totals move from the live engines to the retired ones: the same
    observations added in another grouping. The report's sums must not change by an ulp (the
    daemon would take a smaller sum for a restart)."""
    clock = IrregularClock()
    for module in (instrument_pool, instrument_stats):
        monkeypatch.setattr(module, "perf_counter", clock.seconds, raising=False)
        monkeypatch.setattr(module, "perf_counter_ns", clock.ns, raising=False)
    app = app_name()
    engines = []
    for _ in range(30):
        engine = sa.create_engine(url(pg), poolclass=NullPool)
        instrument(engine, app=app, endpoint=receiver.url, interval=60)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engines.append(engine)
        del engine
        before = push(receiver, app)
        if len(engines) > 3:
            engines.pop(0)
            gc.collect()  # the oldest engine retires; nothing new is observed
            after = push(receiver, app)
            assert after["checkouts"] == before["checkouts"]
            for h in HISTOGRAMS:
                assert after[h]["sum"] == before[h]["sum"], h
    assert sum(1 for k in REPORTER._retired if k[2] == app) == 1


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:99999", "http://pgpressure:port"])
def test_endpoint_with_a_bad_port_is_refused_by_instrument(endpoint):
    engine = sa.create_engine("sqlite://")
    with pytest.raises(ValueError, match="port"):
        instrument(engine, app=app_name(), endpoint=endpoint)
    assert not [r for r in REPORTER._regs if r.endpoint == endpoint]


def test_interval_is_checked_and_a_bad_environment_falls_back(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="pgpressure.instrument")
    with pytest.raises(ValueError, match="finite"):
        instrument(sa.create_engine("sqlite://"), app=app_name(), interval=float("nan"))
    for raw in ("nan", "inf", "five"):
        monkeypatch.setenv("PGPRESSURE_INTERVAL", raw)
        caplog.clear()
        handle = instrument(sa.create_engine("sqlite://"), app=app_name())
        assert handle.interval == 5.0, raw
        assert "PGPRESSURE_INTERVAL" in caplog.text
    monkeypatch.setenv("PGPRESSURE_INTERVAL", "600")
    caplog.clear()
    assert instrument(sa.create_engine("sqlite://"), app=app_name()).interval == 600.0
    assert "every 600s" in caplog.text
    assert all(math.isfinite(r.interval) for r in REPORTER._regs)


def test_push_failures_are_logged_when_they_start_or_change(pg, receiver, caplog):
    app = app_name()
    engine = sa.create_engine(url(pg))
    instrument(engine, app=app, endpoint=receiver.url, interval=60)
    with engine.connect():
        pass  # a pool in use: a process that never checked out has nothing to report
    caplog.set_level(logging.INFO, logger="pgpressure.instrument")
    for status in (500, 500, 401, 401, 200, 200):
        receiver.status = status
        flush()
    mine = [(r.levelname, r.getMessage()) for r in caplog.records if receiver.url in r.getMessage()]
    assert [(level, "HTTP 500" in m, "HTTP 401" in m) for level, m in mine] == [
        ("WARNING", True, False),
        ("WARNING", False, True),
        ("INFO", False, False),
    ]
    engine.dispose()


@pytest.mark.parametrize("poolclass", [NullPool, QueuePool])
def test_detached_connections_end_their_checkout(pg, receiver, poolclass):
    """`fairy.detach()` hands the record back through `_do_return_conn` only: the checkout
    ends there (NullPool's `used` grew by one per detach)."""
    app = app_name()
    engine = sa.create_engine(url(pg), poolclass=poolclass)
    instrument(engine, app=app, endpoint=receiver.url, interval=60)
    for _ in range(3):
        conn = engine.connect()
        conn.detach()
        conn.close()  # closes the detached DBAPI connection for real
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    p = push(receiver, app)
    assert (p["used"], p["checkouts"], count(p["use"])) == (0, 4, 4)
    assert p["closed"]["other"] >= 3
    engine.dispose()


def test_nested_singleton_checkout_keeps_the_outer_hold_time(receiver):
    app = app_name()
    engine = sa.create_engine("sqlite://", poolclass=SingletonThreadPool)
    instrument(engine, app=app, endpoint=receiver.url, interval=60)
    with engine.connect() as outer:
        time.sleep(0.2)
        with engine.connect() as inner:  # the same connection again
            inner.execute(sa.text("SELECT 1"))
        outer.execute(sa.text("SELECT 1"))
    p = push(receiver, app)
    assert (p["checkouts"], p["used"], count(p["use"])) == (2, 0, 1)
    assert p["use"]["sum"] >= 0.2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_connection_checked_out_before_a_fork_is_not_the_childs(receiver):
    """A connection held across the fork and returned in the child was the parent's
    checkout: the child's `used` must not go below zero (and then under-count)."""
    engine = sa.create_engine("sqlite://", poolclass=NullPool)
    handle = instrument(engine, app=app_name(), endpoint=receiver.url, interval=60)
    conn = engine.connect()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            conn.close()
            held = engine.connect()
            p = handle.snapshot()
            os.write(write_end, json.dumps([p["used"], p["checkouts"], count(p["use"])]).encode())
            held.close()
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        child = json.loads(pipe.read())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child == [1, 1, 0]
    conn.close()
    p = handle.snapshot()
    assert (p["used"], p["checkouts"], count(p["use"])) == (0, 1, 1)
