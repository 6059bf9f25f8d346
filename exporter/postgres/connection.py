"""One long-lived, safe connection per PostgreSQL target.

Safety on the database is the point: the daemon must never be the thing that makes a
struggling server worse. So the connection identifies itself (`application_name=pgpressure`),
is read-only, and carries server-side `statement_timeout` and `lock_timeout`, so a query stuck
behind a locked catalog is cut by the server. A client-side deadline a little longer than the
statement timeout covers what the server cannot: a network that stops forwarding.
Both sources of a target share the connection; a lock serialises them.

Strings from the database are not trusted to be UTF-8: a `SQL_ASCII` database stores whatever
bytes clients sent, and names of databases and roles are shared across databases of any
encoding. asyncpg would raise on the first invalid byte (and the server itself refuses to
send a `SQL_ASCII` database's bytes as UTF-8), failing every sample while one such string
exists. So every string type is read as bytes and decoded here, invalid bytes replaced by
U+FFFD and counted (`invalid_strings`, exported as `pg_invalid_utf8_strings_total`),
and on a `SQL_ASCII` server the session's client_encoding is `SQL_ASCII` too, so the server
passes bytes through instead of failing the query. Other encodings are converted to UTF-8 by
the server, as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg

from exporter.config import DatabaseConfig
from exporter.logs import kv
from exporter.redaction import redact

log = logging.getLogger("pgpressure.pg")

#: PostgreSQL's string types, read as bytes and decoded leniently (`TargetConnection._text`).
TEXT_TYPES = ("text", "name", "varchar", "bpchar", "char")


class TargetUnavailable(Exception):
    """The target could not be reached or the query failed; the message is redacted.

    `sqlstate` is the server's error code when the server refused the query, so a caller
    can tell "this view is unusable here" from "the database is down"."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def _ms(seconds: float) -> str:
    return str(max(1, int(seconds * 1000)))


class TargetConnection:
    def __init__(self, config: DatabaseConfig) -> None:
        self.config = config
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self.backend_pid: int | None = None
        self.invalid_strings = 0  # strings read that were not valid UTF-8

    @property
    def name(self) -> str:
        return self.config.name

    async def _connect(self) -> asyncpg.Connection:
        cfg = self.config
        conn = await asyncpg.connect(
            dsn=cfg.dsn,
            password=cfg.password(),
            timeout=cfg.connect_timeout,
            command_timeout=None,
            # Unnamed statements only: a named one would pin this session if the DSN goes
            # through RDS Proxy. Planning each sample costs about a quarter of 1 ms, against
            # a sampler budget of 0.2% of one core. (Targets are meant to be the server
            # itself: PgBouncer refuses the startup settings below, and pg_stat_activity
            # read through any pooler cannot exclude our own session.)
            statement_cache_size=0,
            server_settings={
                "application_name": "pgpressure",
                "statement_timeout": _ms(cfg.statement_timeout),
                "lock_timeout": _ms(cfg.lock_timeout),
                "idle_in_transaction_session_timeout": _ms(max(cfg.statement_timeout, 5.0)),
                "default_transaction_read_only": "on",
            },
        )
        try:
            await self._lenient_text(conn)
        except BaseException:
            conn.terminate()
            raise
        self.backend_pid = conn.get_server_pid()
        log.info("connected to target", extra=kv(target=cfg.name, backend_pid=self.backend_pid))
        return conn

    async def _lenient_text(self, conn: asyncpg.Connection) -> None:
        """Strings as bytes, decoded by `_text`; a SQL_ASCII server's bytes passed through."""
        if conn.get_settings().server_encoding.upper() == "SQL_ASCII":
            await conn.execute("SET client_encoding = 'SQL_ASCII'")
        for name in TEXT_TYPES:
            await conn.set_type_codec(
                name, schema="pg_catalog", encoder=str.encode, decoder=self._text, format="binary"
            )

    def _text(self, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.invalid_strings += 1
            if self.invalid_strings == 1:
                log.warning(
                    "the target returned strings that are not valid UTF-8; they are shown with "
                    "U+FFFD for the invalid bytes and counted",
                    extra=kv(target=self.config.name),
                )
            return data.decode("utf-8", "replace")

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """Run one read-only query; reconnect lazily, drop the connection on any failure."""
        deadline = self.config.statement_timeout + self.config.connect_timeout + 1.0
        async with self._lock:
            if self._closed:  # a run that was waiting for the lock at shutdown
                raise TargetUnavailable("the exporter is shutting down")
            try:
                async with asyncio.timeout(deadline):
                    if self._conn is None or self._conn.is_closed():
                        self._conn = await self._connect()
                    return await self._conn.fetch(query, *args)
            except asyncpg.QueryCanceledError as exc:
                # Server-side timeout: the connection is healthy, keep it.
                raise TargetUnavailable(f"query cancelled by the server: {exc}") from None
            except asyncpg.PostgresError as exc:
                # An error from the server (lock_timeout, shutdown, permissions): keep the
                # session unless the server ended it.
                if self._conn is not None and self._conn.is_closed():
                    await self._drop()
                message = redact(str(exc) or type(exc).__name__)
                raise TargetUnavailable(message, getattr(exc, "sqlstate", None)) from None
            except (OSError, asyncpg.InterfaceError, TimeoutError, UnicodeError) as exc:
                # UnicodeError: a server message asyncpg could not decode (names with stray
                # bytes in an error); the protocol state is unknown, so start over.
                await self._drop()
                reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
                raise TargetUnavailable(redact(reason or type(exc).__name__)) from None

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self.backend_pid = None
        if conn is not None:
            conn.terminate()

    async def close(self) -> None:
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 1.0)
            if not conn.is_closed():
                conn.terminate()
