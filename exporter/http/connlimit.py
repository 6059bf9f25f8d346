"""A cap on the HTTP connections the daemon holds open at once.

aiohttp bounds each request (line, header and body sizes) but not how many sockets it keeps.
Clients that open connections and never finish a request would use up the process's file
descriptors, and with them the database connections and the scrapes. Past the cap, a new
connection is closed as soon as it is accepted, and counted; the connections already open,
Prometheus' keep-alive scrape among them, carry on. A TLS handshake counts once it completes
and must complete within `TLS_HANDSHAKE_TIMEOUT`, so half-open handshakes cannot pile up
either.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from aiohttp import web

DEFAULT_MAX_CONNECTIONS = 512  # well under the usual 1024 open files, above any fleet's pushes
TLS_HANDSHAKE_TIMEOUT = 10.0  # seconds (asyncio's default is 60)


class _Refused(asyncio.Protocol):
    """Accepts, then closes at once: the client sees the connection reset, not a hang."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()


class CappedSite(web.BaseSite):
    """aiohttp's TCP site with a limit on open connections (aiohttp counts them: a handler
    joins `Server.connections` when its connection is made and leaves when it is lost). The
    loop makes connections just after accepting them, so a burst accepted at once may pass
    the cap by the part of the burst not yet made; the next burst sees them."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None,
        port: int,
        *,
        max_connections: int,
        on_refused: Callable[[], None],
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.host, self.port = host, port
        self.max_connections = max_connections
        self.on_refused = on_refused
        self.bound_port: int | None = None

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self.host or '0.0.0.0'}:{self.bound_port or self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None  # the runner is set up before its sites

        def accept() -> asyncio.BaseProtocol:
            if len(server.connections) >= self.max_connections:
                self.on_refused()
                return _Refused()
            return server()

        self._server = await asyncio.get_running_loop().create_server(
            accept,
            self.host,
            self.port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT if self._ssl_context else None,
            backlog=self._backlog,
            reuse_address=True,
        )
        if self._server.sockets:
            self.bound_port = self._server.sockets[0].getsockname()[1]
