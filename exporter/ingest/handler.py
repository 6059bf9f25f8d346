"""`POST wire.REPORTS_PATH`: the HTTP side of ingest, and where every push's result is counted.

A push is judged in the order that costs the daemon least: the token from the headers alone
(a push without one never holds an ingest slot nor gets time to send its body), then the
encoding (reports are small and sent uncompressed; inflating would let 1 MB on the wire
become 1 GB of work on the event loop), then a free slot (at most `max_concurrent_requests`
pushes are read at once, and a push waits a short while for one instead of queueing without
limit), then the body within a size and a time limit, then the report itself. Each outcome,
accepted or refused, is counted once in `pgpressure_reports_total{result}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from exporter.ingest.aggregator import IngestAggregator
from exporter.ingest.auth import BearerAuth
from exporter.ingest.model import parse
from exporter.ingest.results import Refused, Results

if TYPE_CHECKING:
    from exporter.config import IngestConfig

SLOT_WAIT = 2.0  # seconds a push may wait for a free ingest slot before a 503
READ_TIMEOUT = 10.0  # seconds a client gets to send a report body
RETRY_AFTER = "5"  # seconds, told to a push refused for want of a slot


class IngestHandler:
    def __init__(
        self,
        config: IngestConfig,
        aggregator: IngestAggregator,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.aggregator = aggregator
        self.auth = BearerAuth(config, clock)
        self.results = Results()
        self._clock = clock
        self._slots = asyncio.Semaphore(config.max_concurrent_requests)

    def reconfigure(self, config: IngestConfig) -> None:
        """New limits and token from the next push on (a reload); pushes already holding a
        slot release the one they took."""
        self.config = config
        self.auth = BearerAuth(config, self._clock)
        self._slots = asyncio.Semaphore(config.max_concurrent_requests)

    async def handle(self, request: web.Request) -> web.Response:
        """The aiohttp handler."""
        try:
            self.auth.check(request.headers.get("Authorization"))
            _identity_encoding(request)
            async with self._slot():
                body = await _read_body(request, self.config.max_body_bytes)
                status, doc = self.receive(body)
        except Refused as refused:
            status, doc = self._refuse(refused)
            return web.json_response(doc, status=status, headers=refused.headers or None)
        return web.json_response(doc, status=status)

    def receive(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """Parse and aggregate the body of an authorized push: the HTTP status and the answer
        for the client. Never raises for anything the body holds."""
        try:
            result, doc = self.aggregator.accept(parse(body, self.config.max_body_bytes))
        except Refused as refused:
            return self._refuse(refused)
        self.results.count(result)
        return 200, doc

    def _refuse(self, refused: Refused) -> tuple[int, dict[str, Any]]:
        self.results.count(refused.result)
        return refused.status, refused.answer()

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        slots = self._slots  # a reload may replace it while this push holds a slot
        try:
            async with asyncio.timeout(SLOT_WAIT):
                await slots.acquire()
        except TimeoutError:
            raise Refused(
                503, "busy", "too many concurrent reports; retry", {"Retry-After": RETRY_AFTER}
            ) from None
        try:
            yield
        finally:
            slots.release()


async def ingest_disabled(request: web.Request) -> web.Response:
    """The route when `ingest.enabled` is false: a clear 404, not counted."""
    return web.json_response({"error": "ingest is disabled"}, status=404)


def _identity_encoding(request: web.Request) -> None:
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise Refused(415, "unsupported_encoding", "send reports without Content-Encoding")


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body, or its first limit + 1 bytes (enough for a 413 without ever holding an
    oversized report), within READ_TIMEOUT. `content.read(n)` returns what has arrived so
    far, which for a report spread over several TCP segments is only a part of it."""
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            while size <= limit:
                chunk = await request.content.read(limit + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except TimeoutError:
        raise Refused(408, "timeout", "the report body was not received in time") from None
    return b"".join(chunks)
