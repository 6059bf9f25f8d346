"""Receiving a push's body: within a deadline that scales with its size, its bytes counted
against the ingest memory budget as they arrive.

No slot or queue position is held while a body arrives, so clients trickling their bodies a
byte a second cannot keep real pushes out: each holds only its own connection (capped per
client address, `exporter.http.connlimit`) and the bytes it actually sent, and only until its
deadline. A report is a few kilobytes sent in one go; the deadline gives any body
`BODY_GRACE` seconds plus one second per `BODY_RATE` bytes, at most `READ_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from exporter.ingest.budget import MemoryBudget
from exporter.ingest.results import Refused

BODY_GRACE = 2.0  # seconds any body gets, whatever its size
BODY_RATE = 64 * 1024  # bytes per second a body must at least arrive at, past the grace
READ_TIMEOUT = 10.0  # seconds the largest body gets


def deadline(length: int) -> float:
    """Seconds a body of `length` bytes may take to arrive."""
    return min(READ_TIMEOUT, BODY_GRACE + length / BODY_RATE)


@contextlib.asynccontextmanager
async def received(request: web.Request, limit: int, budget: MemoryBudget) -> AsyncIterator[bytes]:
    """The body, or its first limit + 1 bytes (enough for a 413 without ever holding an
    oversized report), counted in `budget` until the block ends. `content.read(n)` returns
    what has arrived so far, which for a report spread over several TCP segments is only a
    part of it. A declared length over the limit is refused before anything is read."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise Refused(413, "too_large", f"report larger than ingest.max_body_bytes ({limit})")
    chunks: list[bytes] = []
    held = 0
    try:
        async with asyncio.timeout(deadline(declared if declared is not None else limit)):
            while held <= limit:
                chunk = await request.content.read(limit + 1 - held)
                if not chunk:
                    break
                budget.take_body(len(chunk))
                held += len(chunk)
                chunks.append(chunk)
    except TimeoutError:
        budget.give_body(held)
        raise Refused(408, "timeout", "the report body was not received in time") from None
    except BaseException:
        budget.give_body(held)
        raise
    try:
        yield b"".join(chunks)
    finally:
        budget.give_body(held)
