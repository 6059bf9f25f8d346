"""Known pinning statements: which driver or ORM sends them, and the fix its documentation gives.

"`SELECT set_config($2, $1, $3)` pins" tells a user nothing; "asyncpg's type introspection
turns JIT off for the session, and asyncpg documents no switch for it" does. Each entry names
a statement seen from a real driver (tests/test_pinning_drivers.py produces every one with the
driver and checks the attribution, and that the documented fix removes it), where it comes
from, and what to change - from the driver's, ORM's, PostgreSQL's or AWS's own documentation,
cited in `docs`, never invented; where the documentation has no fix, the entry says so.

Statements are matched by shape (`exporter.pinning.shapes`). Specific entries win over the
generic ones for the same statement, so `RESET ALL` from asyncpg's reset query is not also
"a session-level SET". Named prepared statements never show in pg_stat_statements: that entry
is found from the proxy's log reason ("A parse message was detected."), and from a prepared
statement's name where one is seen (`driver_of_prepared_statement`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from exporter.pinning import shapes, statements

_ASYNCPG_API = "https://magicstack.github.io/asyncpg/current/api/index.html"
_PG_DOCS = "https://www.postgresql.org/docs/current"
_PROXY_INIT_QUERY = (
    "https://docs.aws.amazon.com/AmazonRDS/latest/APIReference/API_ConnectionPoolConfiguration.html"
)
# What RDS Proxy answers to a startup packet with libpq `options` (public reports, verbatim).
_NO_OPTIONS = (
    "Not with `options=-c name=value` in the connection string or connect_args: RDS Proxy "
    "refuses the connection (\"Feature not supported: RDS Proxy currently doesn't support "
    'command-line options.").'
)


@dataclass(frozen=True, slots=True)
class Fingerprint:
    id: str
    title: str
    reason: str  # the statements.REASONS slug it pins under
    origin: str
    fix: str
    docs: tuple[str, ...]  # where the fix (and the origin) is documented
    matches: Callable[[shapes.Facts], bool] | None = field(default=None, repr=False)
    generic: bool = False  # applies only when no specific entry matched the statement
    log_reasons: tuple[str, ...] = ()  # lowercase words of the proxy log reasons it explains
    prepared_names: tuple[tuple[str, str], ...] = ()  # (prepared statement name prefix, driver)

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "title": self.title,
            "reason": self.reason,
            "origin": self.origin,
            "fix": self.fix,
            "docs": list(self.docs),
        }


ASYNCPG_JIT = Fingerprint(
    id="asyncpg_introspection_jit",
    title="asyncpg type introspection turns JIT off for the session",
    reason=statements.SESSION_SETTINGS,
    origin=(
        "asyncpg 0.29+ (bare, or under SQLAlchemy's postgresql+asyncpg dialect): the first "
        "time a connection meets a type it has no built-in codec for (an enum, a domain, a "
        "composite, an array of them) it runs `SELECT current_setting('jit') AS cur, "
        "set_config('jit', 'off', false) AS new`, its introspection query, then `SELECT "
        "set_config('jit', $1, false)` to put JIT back; once per connection and type. "
        "Normalized, the second is also the text of any `SELECT set_config($1, $2, false)`."
    ),
    fix=(
        "asyncpg documents no option to skip it. Turning JIT off for the session from the "
        "start (asyncpg's `server_settings={'jit': 'off'}`, which SQLAlchemy's asyncpg "
        "documentation gives as `connect_args={'server_settings': {'jit': 'off'}}` for the "
        "introspection's cost) removes the second set_config but not the first, so a "
        "connection that introspects a type still changes a session setting."
    ),
    docs=(
        "https://github.com/MagicStack/asyncpg/pull/1082",
        "https://docs.sqlalchemy.org/en/20/dialects/postgresql.html"
        "#disabling-the-postgresql-jit-to-improve-enum-datatype-handling",
        _ASYNCPG_API + "#connection",
    ),
    matches=shapes.asyncpg_jit,
)

ASYNCPG_RESET = Fingerprint(
    id="asyncpg_reset_query",
    title="asyncpg's pool reset query",
    reason=statements.SESSION_SETTINGS,
    origin=(
        "asyncpg's connection pool (asyncpg.create_pool, and libraries built on it) runs "
        "`SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;` "
        "(Connection.get_reset_query()) on every release; `RESET ALL` and "
        "`pg_advisory_unlock_all()` change session state, so nearly every session pins. "
        "SQLAlchemy's own pool does not send it."
    ),
    fix=(
        "asyncpg's documentation: Connection.reset() runs whatever get_reset_query() returns "
        "when Connection is subclassed (asyncpg 0.30+); pass the subclass as "
        "`create_pool(connection_class=...)` with a get_reset_query() that returns only what "
        "the application needs, '' when it keeps no session state. Or create_pool(reset=...): "
        "'a coroutine to reset a connection before it is returned to the pool', replacing the "
        "default."
    ),
    docs=(
        _ASYNCPG_API + "#asyncpg.connection.Connection.get_reset_query",
        _ASYNCPG_API + "#asyncpg.pool.create_pool",
        "https://github.com/MagicStack/asyncpg/issues/780",
    ),
    matches=shapes.asyncpg_reset,
)

NAMED_PREPARED = Fingerprint(
    id="named_prepared_statements",
    title="Named prepared statements (extended query protocol)",
    reason=statements.PREPARED_STATEMENT,
    origin=(
        "asyncpg's statement cache (statement_cache_size, 100 by default; names "
        "`__asyncpg_stmt_N__`), SQLAlchemy's asyncpg dialect (prepares every statement; "
        "prepared_statement_cache_size, 100 by default), psycopg 3 once a statement ran "
        'prepare_threshold times (5 by default; names `_pg3_N`). The proxy logs "A parse '
        'message was detected."; pg_stat_statements cannot show it. psycopg2 binds '
        "parameters on the client and does not prepare."
    ),
    fix=(
        "asyncpg: `statement_cache_size=0` (connect() and create_pool(); its FAQ gives the "
        "same for poolers). SQLAlchemy + asyncpg: the same asyncpg setting through "
        "`connect_args={'statement_cache_size': 0}`, with `?prepared_statement_cache_size=0` "
        "in the URL for the dialect's own cache (SQLAlchemy's asyncpg documentation); the "
        "dialect's setting alone still leaves asyncpg naming the statement it prepares. "
        "psycopg 3: `prepare_threshold=None` ('You can disable the use of "
        "prepared statements on a connection by setting its prepare_threshold attribute to "
        "None', a connect() argument since 3.1; with SQLAlchemy, connect_args). The drivers "
        "then send only unnamed statements."
    ),
    docs=(
        "https://magicstack.github.io/asyncpg/current/faq.html"
        "#why-am-i-getting-prepared-statement-errors",
        _ASYNCPG_API + "#asyncpg.connection.connect",
        "https://docs.sqlalchemy.org/en/20/dialects/postgresql.html#prepared-statement-cache",
        "https://www.psycopg.org/psycopg3/docs/advanced/prepare.html",
    ),
    log_reasons=("parse message",),
    prepared_names=(("__asyncpg_stmt_", "asyncpg"), ("_pg3_", "psycopg 3")),
)

SEARCH_PATH = Fingerprint(
    id="set_search_path",
    title="SET search_path on the session",
    reason=statements.SESSION_SETTINGS,
    origin=(
        "Code that picks the schema per connection, e.g. SQLAlchemy's documented recipe "
        "'Setting Alternate Search Paths on Connect' (a connect event running `SET SESSION "
        "search_path`), or ORMs that set it with the encoding (`set search_path = $1; set "
        "names $2;` in a proxy log)."
    ),
    fix=(
        "Make it the default instead of a session change: `ALTER ROLE ... SET search_path` / "
        "`ALTER DATABASE ... SET search_path` (PostgreSQL), or the proxy's initialization "
        "query, which the proxy's own log line suggests ('Consider moving session "
        "configuration to the proxy's initialization query'). With SQLAlchemy, the "
        "schema_translate_map execution option names the schema in the SQL instead. " + _NO_OPTIONS
    ),
    docs=(
        _PG_DOCS + "/sql-alterrole.html",
        _PROXY_INIT_QUERY,
        "https://docs.sqlalchemy.org/en/20/dialects/postgresql.html"
        "#setting-alternate-search-paths-on-connect",
        "https://docs.sqlalchemy.org/en/20/core/connections.html#translation-of-schema-names",
    ),
    matches=shapes.session_setting("search_path"),
)

TIME_ZONE = Fingerprint(
    id="set_time_zone",
    title="SET TIME ZONE on the session",
    reason=statements.SESSION_SETTINGS,
    origin=(
        "Code or frameworks that set the session time zone on each connection (`SET TIME "
        "ZONE`, `SET timezone`, `set_config('TimeZone', ...)`); asyncpg, psycopg 2 and 3 "
        "do not send it on their own."
    ),
    fix=(
        "Make it the default: `ALTER ROLE ... SET timezone = 'UTC'` or `ALTER DATABASE ... "
        "SET timezone` (PostgreSQL), or the proxy's initialization query, 'typically used "
        "with SET statements to make sure that each connection has identical settings such "
        "as time zone and character set' (AWS). " + _NO_OPTIONS
    ),
    docs=(_PG_DOCS + "/sql-alterrole.html", _PROXY_INIT_QUERY),
    matches=shapes.session_setting("timezone"),
)

CLIENT_ENCODING = Fingerprint(
    id="set_client_encoding",
    title="SET client_encoding / SET NAMES on the session",
    reason=statements.SESSION_SETTINGS,
    origin=(
        "psycopg2's connection.set_client_encoding(), which SQLAlchemy's psycopg2 dialect "
        "calls on every new connection when create_engine(..., client_encoding=...) is "
        "given: `SET client_encoding TO '...'`. `SET NAMES` is the same setting."
    ),
    fix=(
        "SQLAlchemy's psycopg2 documentation gives the other ways: `?client_encoding=utf8` in "
        "the URL or `connect_args={'client_encoding': 'utf8'}`, which libpq sends when it "
        "connects instead of a SET, or client_encoding in postgresql.conf. Or the proxy's "
        "initialization query ('such as time zone and character set', AWS)."
    ),
    docs=(
        "https://docs.sqlalchemy.org/en/20/dialects/postgresql.html#unicode-with-psycopg2",
        "https://www.psycopg.org/docs/connection.html#connection.set_client_encoding",
        _PROXY_INIT_QUERY,
    ),
    matches=shapes.session_setting("client_encoding"),
)

CURSOR_WITH_HOLD = Fingerprint(
    id="cursor_with_hold",
    title="DECLARE ... CURSOR WITH HOLD",
    reason=statements.CURSOR,
    origin=(
        "Server-side cursors that outlive their transaction: psycopg 3 "
        "`conn.cursor(name, withhold=True)` and psycopg2 `conn.cursor(name, withhold=True)` "
        'send `DECLARE "name" CURSOR WITH HOLD FOR ...`.'
    ),
    fix=(
        "Keep `withhold=False`, the default of both drivers, and read the cursor inside the "
        "transaction that declared it: PostgreSQL's WITHOUT HOLD, the default, 'specifies "
        "that the cursor cannot be used outside of the transaction that created it', so "
        "nothing is left in the session."
    ),
    docs=(
        _PG_DOCS + "/sql-declare.html",
        "https://www.psycopg.org/psycopg3/docs/api/cursors.html#psycopg.ServerCursor",
        "https://www.psycopg.org/docs/connection.html#connection.cursor",
    ),
    matches=shapes.with_hold,
)

SESSION_ADVISORY_LOCK = Fingerprint(
    id="session_advisory_lock",
    title="Session-level advisory lock",
    reason=statements.ADVISORY_LOCK,
    origin=(
        "pg_advisory_lock(), pg_try_advisory_lock(), their _shared forms and unlocks, from "
        "application code or libraries that hold a lock across transactions."
    ),
    fix=(
        "Use the transaction-level functions (pg_advisory_xact_lock(), "
        "pg_try_advisory_xact_lock()) inside a transaction: PostgreSQL releases them "
        "automatically at the end of the transaction, so nothing is left in the session and "
        "they do not pin."
    ),
    docs=(
        _PG_DOCS + "/functions-admin.html#FUNCTIONS-ADVISORY-LOCKS",
        _PG_DOCS + "/explicit-locking.html#ADVISORY-LOCKS",
    ),
    matches=shapes.session_advisory_lock,
    generic=True,
)

SESSION_SET = Fingerprint(
    id="session_set",
    title="SET (session) where SET LOCAL would do",
    reason=statements.SESSION_SETTINGS,
    origin=(
        "A setting changed for the session - `SET lock_timeout`, `SET statement_timeout`, "
        "`RESET`, `set_config(..., false)` - from application code or a connect event."
    ),
    fix=(
        "`SET LOCAL` inside the transaction (PostgreSQL: its effect lasts only until the end "
        "of the current transaction), or `set_config(name, value, true)`; a team moving to "
        "RDS Proxy fixed their `lock_timeout` this way. For a value every session needs: "
        "`ALTER ROLE ... SET` or the proxy's initialization query. " + _NO_OPTIONS
    ),
    docs=(_PG_DOCS + "/sql-set.html", _PG_DOCS + "/sql-alterrole.html", _PROXY_INIT_QUERY),
    matches=shapes.any_session_setting,
    generic=True,
)

OVERSIZED_STATEMENT = Fingerprint(
    id="statement_over_16kb",
    title="a statement larger than 16,384 bytes on the wire",
    reason=statements.STATEMENT_TOO_LARGE,
    origin=(
        "The application's own statements: long IN lists (SQLAlchemy's expanding `in_()` "
        "renders one placeholder per element), wide SELECTs, bulk INSERTs (SQLAlchemy's "
        "insertmanyvalues batches up to 1,000 rows into one statement). psycopg2 binds the "
        "parameters into the text on the client, so a short template with large values is "
        'over the limit too. The proxy logs "The connection ran a SQL query which exceeded '
        'the 16384 byte limit." without the statement, and pg_stat_statements keeps it '
        "normalized: only the in-app client (pgpressure-sqlalchemy, with statement timing "
        "on) sees the text as sent, and names the template under `apps` in this report."
    ),
    fix=(
        "Make the text smaller than 16 KB: pass a long list as one array parameter "
        "(`col = ANY(:ids)`, PostgreSQL's `= ANY (array)`; with SQLAlchemy "
        "`col == any_(bindparam('ids', type_=ARRAY(Integer)))`), or on psycopg 3 or asyncpg, "
        "which send parameters apart from the text; select the columns the code uses; for "
        "bulk INSERTs lower `insertmanyvalues_page_size` on create_engine()."
    ),
    docs=(
        "https://docs.aws.amazon.com/AmazonRDS/latest/UserGuide/rds-proxy-pinning.html",
        _PG_DOCS + "/functions-comparisons.html#FUNCTIONS-COMPARISONS-ANY-SOME",
        "https://docs.sqlalchemy.org/en/20/core/sqlelement.html#sqlalchemy.sql.expression.any_",
        "https://docs.sqlalchemy.org/en/20/core/connections.html#insertmanyvalues-page-size",
    ),
    log_reasons=("16384 byte limit",),
)

#: Not a pin: what the proxy does with a connection that carries libpq `options`. The in-app
#: client reports the settings its engine's connections are opened with.
LIBPQ_OPTIONS = Fingerprint(
    id="libpq_options",
    title="settings passed as libpq command-line options",
    reason=statements.OTHER,
    origin=(
        "`connect_args={'options': '-c statement_timeout=5000'}`, `?options=...` in the URL "
        "or `options=` in a DSN: psycopg2, psycopg 3 and libpq send them in the startup "
        'packet. RDS Proxy refuses the connection: "Feature not supported: RDS Proxy '
        "currently doesn't support command-line options.\""
    ),
    fix=(
        "Set them on the role instead, where every session of the role gets them without the "
        "connection asking: `ALTER ROLE app_user SET statement_timeout = '5s'` (PostgreSQL's "
        "ALTER ROLE ... SET), or in the proxy's initialization query; a setting meant for one "
        "transaction as `SET LOCAL` inside it."
    ),
    docs=(_PG_DOCS + "/sql-alterrole.html", _PROXY_INIT_QUERY),
)

#: Every entry, specific ones first.
FINGERPRINTS: tuple[Fingerprint, ...] = (
    ASYNCPG_JIT,
    ASYNCPG_RESET,
    NAMED_PREPARED,
    SEARCH_PATH,
    TIME_ZONE,
    CLIENT_ENCODING,
    CURSOR_WITH_HOLD,
    SESSION_ADVISORY_LOCK,
    SESSION_SET,
    OVERSIZED_STATEMENT,
)
BY_ID = {fp.id: fp for fp in FINGERPRINTS}


def _of_statement(f: shapes.Facts) -> list[Fingerprint]:
    found = [fp for fp in FINGERPRINTS if not fp.generic and fp.matches and fp.matches(f)]
    return found or [fp for fp in FINGERPRINTS if fp.generic and fp.matches and fp.matches(f)]


def match(sql: str) -> tuple[Fingerprint, ...]:
    """The known fingerprints of the statements in `sql`, in table order; () if none."""
    return _cached_match(sql) if len(sql) <= shapes.CACHED_CHARS else _match(sql)


@functools.lru_cache(maxsize=4096)
def _cached_match(sql: str) -> tuple[Fingerprint, ...]:
    return _match(sql)


def _match(sql: str) -> tuple[Fingerprint, ...]:
    found = {fp.id for f in shapes.facts(sql) for fp in _of_statement(f)}
    return tuple(fp for fp in FINGERPRINTS if fp.id in found)


def for_log_reason(reason_text: str) -> tuple[Fingerprint, ...]:
    """The fingerprints a proxy log reason names by itself (no Digest needed)."""
    text = reason_text.lower()
    return tuple(fp for fp in FINGERPRINTS if any(w in text for w in fp.log_reasons))


def driver_of_prepared_statement(name: str) -> str | None:
    """The driver that names its prepared statements like `name`, if known."""
    for fp in FINGERPRINTS:
        for prefix, driver in fp.prepared_names:
            if name.startswith(prefix):
                return driver
    return None
