"""A small ASGI service on an async engine (pool 3 + 2 overflow per worker), as uvicorn
--workers runs it. GET / checks a connection out once; GET /exhaust makes this one worker hold
every connection of its pool while more callers wait (the other workers stay idle), which is
the normal case of one overloaded worker in a multi-worker async app; GET /ready does
nothing. Every answer is the worker's pid. App name, endpoint and interval come from the
PGPRESSURE_* environment."""

from __future__ import annotations

import asyncio
import os

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from pgpressure_sqlalchemy import instrument

POOL_SIZE, MAX_OVERFLOW = 3, 2
HOLDERS = 12  # more than the pool's 5 connections: 7 callers wait
HOLD_SECONDS = 30

engine = create_async_engine(
    os.environ["FLEET_DSN"], pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, pool_timeout=60
)
instrument(engine)
_holding: set[asyncio.Task] = set()


async def _hold() -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT pg_sleep(:s)"), {"s": HOLD_SECONDS})


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/exhaust":
        for _ in range(HOLDERS):
            task = asyncio.get_running_loop().create_task(_hold())
            _holding.add(task)
            task.add_done_callback(_holding.discard)
    elif scope["path"] != "/ready":
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    headers = [(b"content-type", b"text/plain")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
