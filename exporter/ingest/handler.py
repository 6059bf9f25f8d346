"""`POST wire.REPORTS_PATH`: the HTTP side of ingest, and where every push's result is counted.

A push is judged in the order that costs the daemon least: the token from the headers alone
(a push without one never gets time to send its body), then the encoding (reports are small
and sent uncompressed; inflating would let 1 MB on the wire become 1 GB of work on the event
loop), then the media type (`application/json` only: a form or `text/plain` post is what a
browser sends cross-origin without asking first, so a web page could otherwise push into an
endpoint without a token), then the body within a size limit, a deadline and the ingest
memory budget (`exporter.ingest.body`: nothing is queued for, so slow bodies cannot starve
real pushes), then the report itself. Each outcome, accepted or refused, is counted once in
`pgpressure_reports_total{result}`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from exporter.ingest.aggregator import IngestAggregator
from exporter.ingest.auth import BearerAuth
from exporter.ingest.body import received
from exporter.ingest.model import parse
from exporter.ingest.results import Refused, Results

if TYPE_CHECKING:
    from exporter.config import IngestConfig


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

    def reconfigure(self, config: IngestConfig) -> None:
        """New limits and token from the next push on (a reload); the memory budget follows
        the aggregator's config."""
        self.config = config
        self.auth = BearerAuth(config, self._clock)

    async def handle(self, request: web.Request) -> web.Response:
        """The aiohttp handler."""
        try:
            self.auth.check(request.headers.get("Authorization"))
            _identity_encoding(request)
            _json(request)
            limit = self.config.max_body_bytes
            async with received(request, limit, self.aggregator.budget) as body:
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


async def ingest_disabled(request: web.Request) -> web.Response:
    """The route when `ingest.enabled` is false: a clear 404, not counted."""
    return web.json_response({"error": "ingest is disabled"}, status=404)


def _identity_encoding(request: web.Request) -> None:
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise Refused(415, "unsupported_encoding", "send reports without Content-Encoding")


def _json(request: web.Request) -> None:
    if request.content_type != "application/json":
        raise Refused(
            415, "unsupported_media_type", "send reports with Content-Type: application/json"
        )
