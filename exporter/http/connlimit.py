"""A cap on the HTTP connections the daemon holds open at once, a share of it per client
address, and a deadline for request headers.

aiohttp bounds each request (line, header and body sizes) but not how many sockets it keeps,
nor how long a client may take to send a request's headers: a connection that sends a byte
of a header now and then is only closed by the keep-alive timeout (75 s). Clients that open
connections and never finish a request would use up the process's file descriptors, and
with them the database connections and the scrapes; clients that trickle headers would hold
every connection of the cap, and new scrapes, health probes and pushes, which share the
listener, would all be turned away.

So every accepted connection is guarded (`_Guarded`):

- past `max_connections` open, or past the client address's share of them
  (`max_connections // CLIENT_SHARE`: one client cannot hold all of it), it is closed as soon
  as it is accepted, and counted; the connections already open, Prometheus' keep-alive
  scrape among them, carry on;
- a request's headers must be complete within `HEADER_TIMEOUT` of the connection opening, or
  of the first byte of the next request on a kept-alive one, or the connection is closed. A
  request "has its headers" when it reaches the application (`headers_received`, the
  outermost middleware). Bodies have their own deadlines (the ingest handler's); idle
  keep-alive connections the keep-alive timeout. Each such close is counted
  (`on_header_timeout`).

A TLS handshake counts once it completes and must complete within `TLS_HANDSHAKE_TIMEOUT`, so
half-open handshakes cannot pile up either.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable

from aiohttp import web

DEFAULT_MAX_CONNECTIONS = 512  # well under the usual 1024 open files, above any fleet's pushes
TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds (asyncio's default is 60)
HEADER_TIMEOUT = 10.0  # seconds for a request's headers (Prometheus sends them in one packet)
CLIENT_SHARE = 4  # one client address may hold at most 1/CLIENT_SHARE of the connections


class _Guarded(asyncio.Protocol):
    """One accepted connection: admitted (or closed) by its site, the aiohttp handler behind
    it, and the deadline of the request headers it is sending."""

    def __init__(self, site: CappedSite) -> None:
        self.site = site
        self.handler: asyncio.Protocol | None = None
        self.client = ""
        self.transport: asyncio.BaseTransport | None = None
        self.in_request = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if not self.site.admit(self.client):
            transport.abort()  # the client sees the connection reset, not a hang
            return
        self.transport = transport
        self.handler = self.site.new_handler()
        self._arm()
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.handler is None:
            return
        if self._timer is None and not self.in_request:
            self._arm()  # the next request on a kept-alive connection starts
        self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self.handler.eof_received() if self.handler is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.handler is None:
            return
        self._disarm()
        self.site.release(self.client)
        handler, self.handler = self.handler, None
        handler.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()

    def request_started(self) -> None:
        self.in_request = True
        self._disarm()

    def request_finished(self) -> None:
        self.in_request = False

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(HEADER_TIMEOUT, self._headers_late)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        if not self.in_request and self.transport is not None:
            self.site.on_header_timeout()
            self.transport.abort()


@web.middleware
async def headers_received(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The outermost middleware: the request's headers are in, so its connection's header
    deadline stops until the response is done."""
    transport = request.transport
    guard = transport.get_protocol() if transport is not None else None
    if not isinstance(guard, _Guarded):  # a server without CappedSite (tests' TestServer)
        return await handler(request)
    guard.request_started()
    try:
        return await handler(request)
    finally:
        guard.request_finished()


class CappedSite(web.BaseSite):
    """aiohttp's TCP site with a limit on open connections, per client address too. The
    loop makes connections just after accepting them, and they are counted when made."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None,
        port: int,
        *,
        max_connections: int,
        on_refused: Callable[[], None],
        on_header_timeout: Callable[[], None] = lambda: None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.host, self.port = host, port
        self.max_connections = max_connections
        self.max_per_client = max(1, max_connections // CLIENT_SHARE)
        self.on_refused = on_refused
        self.on_header_timeout = on_header_timeout
        self.bound_port: int | None = None
        self._open = 0
        self._by_client: Counter[str] = Counter()

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self.host or '0.0.0.0'}:{self.bound_port or self.port}"

    def admit(self, client: str) -> bool:
        """Count a new connection from `client`, or refuse it (counted) at either cap."""
        if self._open >= self.max_connections or self._by_client[client] >= self.max_per_client:
            self.on_refused()
            return False
        self._open += 1
        self._by_client[client] += 1
        return True

    def release(self, client: str) -> None:
        self._open -= 1
        self._by_client[client] -= 1
        if self._by_client[client] <= 0:
            del self._by_client[client]

    def new_handler(self) -> asyncio.Protocol:
        """aiohttp's handler for one connection (it joins `Server.connections` when made)."""
        server = self._runner.server
        assert server is not None  # the runner is set up before its sites
        return server()

    async def start(self) -> None:
        await super().start()
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Guarded(self),
            self.host,
            self.port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if self._ssl_context else None,
            backlog=self._backlog,
            reuse_address=True,
        )
        if self._server.sockets:
            self.bound_port = self._server.sockets[0].getsockname()[1]
