"""Real applications for the diagnosis end-to-end tests, each run as its own process.

    python -m tests.diagnosis_apps KIND --dsn URL --endpoint URL --seconds N [--port P]

- `healthy`: a sync SQLAlchemy app (psycopg), the default pool (5 + 10), 3 threads running
  short statements with pauses: moderate load, the pool never full.
- `shop`: a sync FastAPI app (uvicorn, FastAPI's default thread pool) with the default pool,
  each request a 50 ms query (`pg_sleep(0.05)`); `load` sends it 48 concurrent requests.
- `crowd`: the field report: 100 concurrent asyncpg clients through SQLAlchemy's async engine,
  pool 20 + overflow 100, `pool_recycle=5`; each statement sorts more than `work_mem` holds.
- `locker`: a session of `nightly-batch` holds a row lock, idle in its transaction, while 3
  sessions of `orders` wait for it.

Every pool is instrumented with pgpressure_sqlalchemy (pushing every second, application_name
set to the app's name), as an application would be.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time

import psycopg
import requests
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine

from pgpressure_sqlalchemy import instrument

#: A sort of 5,000 md5 strings: CPU, and ~300 kB, more than a 64 kB work_mem holds.
SPILL_SQL = (
    "SELECT count(*) FROM (SELECT md5(g::text) AS h FROM generate_series(1, 5000) g ORDER BY 1) s"
)


def _url(dsn: str, driver: str) -> str:
    return dsn.replace("postgresql://", f"postgresql+{driver}://", 1)


def healthy(args: argparse.Namespace) -> None:
    engine = create_engine(_url(args.dsn, "psycopg"))
    instrument(engine, app="healthy", endpoint=args.endpoint, interval=1, application_name=True)
    stop = time.monotonic() + args.seconds

    def work() -> None:
        while time.monotonic() < stop:
            with engine.connect() as conn:
                conn.execute(text("SELECT count(*) FROM pg_class"))
            time.sleep(0.1)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def shop(args: argparse.Namespace) -> None:
    import uvicorn
    from fastapi import FastAPI

    engine = create_engine(_url(args.dsn, "psycopg"))  # the default pool: 5 + 10
    instrument(engine, app="shop", endpoint=args.endpoint, interval=1, application_name=True)
    app = FastAPI()

    @app.get("/order")
    def order() -> dict[str, str]:  # sync: FastAPI runs it in its thread pool
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(0.05)"))
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def load(args: argparse.Namespace) -> None:
    """48 clients, each sending the next request as soon as the last one is answered."""
    stop = time.monotonic() + args.seconds
    url = f"http://127.0.0.1:{args.port}/order"

    def client() -> None:
        with requests.Session() as session:
            while time.monotonic() < stop:
                session.get(url, timeout=60).raise_for_status()

    threads = [threading.Thread(target=client) for _ in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


async def _crowd(args: argparse.Namespace) -> None:
    engine = create_async_engine(
        _url(args.dsn, "asyncpg"), pool_size=20, max_overflow=100, pool_recycle=5
    )
    instrument(engine, app="crowd", endpoint=args.endpoint, interval=1, application_name=True)
    stop = time.monotonic() + args.seconds

    async def client() -> None:
        while time.monotonic() < stop:
            async with engine.connect() as conn:
                await conn.execute(text(SPILL_SQL))
            await asyncio.sleep(0.5)

    await asyncio.gather(*(client() for _ in range(100)))
    await engine.dispose()


def crowd(args: argparse.Namespace) -> None:
    asyncio.run(_crowd(args))


def locker(args: argparse.Namespace) -> None:
    with psycopg.connect(args.dsn, autocommit=True) as setup:
        setup.execute("CREATE TABLE IF NOT EXISTS stock (id int PRIMARY KEY, n int)")
        setup.execute("INSERT INTO stock VALUES (1, 0) ON CONFLICT DO NOTHING")
    holder = psycopg.connect(args.dsn, application_name="nightly-batch")
    holder.execute("UPDATE stock SET n = n + 1 WHERE id = 1")  # holds the row lock

    def wait() -> None:
        with psycopg.connect(args.dsn, autocommit=True, application_name="orders") as conn:
            conn.execute("UPDATE stock SET n = n - 1 WHERE id = 1")

    waiters = [threading.Thread(target=wait) for _ in range(3)]
    for t in waiters:
        t.start()
    time.sleep(args.seconds)
    holder.rollback()
    holder.close()
    for t in waiters:
        t.join()


KINDS = {"healthy": healthy, "shop": shop, "load": load, "crowd": crowd, "locker": locker}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--endpoint", default="")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    KINDS[args.kind](args)


if __name__ == "__main__":
    main()
