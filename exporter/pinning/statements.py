"""Which SQL statements would pin an RDS Proxy session, and why.

RDS Proxy multiplexes client sessions over shared database connections at transaction
boundaries. A statement that leaves state behind in the session (a setting, a prepared
statement, a temporary table, a session advisory lock, a LISTEN, a cursor, a sequence's
`currval` state, ...) makes the proxy pin the client to one database connection for the rest
of the session. AWS lists the PostgreSQL conditions in "Avoiding pinning an RDS Proxy"; this
module recognises them in statement text with PostgreSQL's own parser (pglast), so that
`SET LOCAL` and `pg_advisory_xact_lock()` - the transaction-scoped forms that do *not* pin -
are told apart from their session-level twins, which a regular expression gets wrong.

The input is usually pg_stat_statements text, where constants are normalized to `$1`; the
parser accepts parameters wherever the grammar allows expressions, and a statement it cannot
parse falls back to a conservative keyword check rather than being ignored.

Reason slugs are the ones the proxy's own log lines are classified into (see
`exporter.pinning.logline`), so a dashboard can put "statements that would pin" beside
"pins the proxy saw" reason by reason. Two AWS conditions have no slug of their own on purpose:

- `DISCARD` (ALL, PLANS, SEQUENCES, TEMP) resets session state, which the proxy treats like a
  settings change, so it counts as `session_settings`.
- `LOAD 'library'` is rare and has no log counterpart, so it is `other`.

No slug for the extended query protocol ("A parse message was detected"): pg_stat_statements
cannot tell how a statement was sent, so that cause is only visible in the proxy's logs.
"""

from __future__ import annotations

import functools
import re

import pglast
from pglast import ast
from pglast.enums import VariableSetKind
from pglast.visitors import Visitor

SESSION_SETTINGS = "session_settings"
PREPARED_STATEMENT = "prepared_statement"
STATEMENT_TOO_LARGE = "statement_too_large"
TEMPORARY_OBJECT = "temporary_object"
ADVISORY_LOCK = "advisory_lock"
SEQUENCE = "sequence"
LISTEN = "listen"
CURSOR = "cursor"
OTHER = "other"
#: Only the proxy's log lines have it: a reason text pgpressure does not recognise.
UNKNOWN = "unknown"

#: Every reason, in the order used for display and for breaking ties.
REASONS: tuple[str, ...] = (
    SESSION_SETTINGS,
    PREPARED_STATEMENT,
    STATEMENT_TOO_LARGE,
    TEMPORARY_OBJECT,
    ADVISORY_LOCK,
    SEQUENCE,
    LISTEN,
    CURSOR,
    OTHER,
    UNKNOWN,
)

#: RDS Proxy pins any statement whose text is larger than 16 KB.
MAX_STATEMENT_BYTES = 16384

_SEQUENCE_FUNCTIONS = frozenset({"nextval", "setval", "currval", "lastval"})
# Session-level advisory lock functions; the pg_advisory_xact_* family is released at the end
# of the transaction and does not pin.
SESSION_ADVISORY_FUNCTIONS = frozenset(
    {
        "pg_advisory_lock",
        "pg_advisory_lock_shared",
        "pg_try_advisory_lock",
        "pg_try_advisory_lock_shared",
        "pg_advisory_unlock",
        "pg_advisory_unlock_shared",
        "pg_advisory_unlock_all",
    }
)
# SET forms that only ever last for the transaction.
_TRANSACTION_SCOPED_SET = frozenset({"transaction", "transaction snapshot"})
_TEMP = "t"  # RangeVar.relpersistence for TEMPORARY


def func_name(node: ast.FuncCall) -> str:
    return node.funcname[-1].sval.lower() if node.funcname else ""


def is_true_constant(node: object) -> bool:
    """True only for a literal boolean true ('true', true, 't', 1...) - not for `$3`."""
    if isinstance(node, ast.TypeCast):
        node = node.arg
    if not isinstance(node, ast.A_Const) or node.isnull:
        return False
    value = node.val
    if isinstance(value, ast.Boolean):
        return bool(value.boolval)
    if isinstance(value, ast.String):
        return value.sval.strip().lower() in ("t", "true", "on", "yes", "y", "1")
    if isinstance(value, ast.Integer):
        return value.ival != 0
    return False


def _is_temp_relation(rel: ast.RangeVar | None) -> bool:
    if rel is None:
        return False
    return rel.relpersistence == _TEMP or (rel.schemaname or "").lower() == "pg_temp"


class _Finder(Visitor):
    """Collects reasons from every node of one parsed statement list."""

    def __init__(self) -> None:
        super().__init__()
        self.reasons: set[str] = set()

    # -- settings ------------------------------------------------------------------------
    def visit_VariableSetStmt(self, ancestors, node: ast.VariableSetStmt) -> None:
        if node.is_local or not isinstance(ancestors.node, ast.RawStmt):
            # SET LOCAL, or the SET clause of ALTER ROLE/DATABASE/SYSTEM or of a function's
            # definition: those change defaults stored elsewhere, not this session.
            return
        if node.kind == VariableSetKind.VAR_SET_MULTI and (node.name or "").lower() in (
            _TRANSACTION_SCOPED_SET
        ):
            return  # SET TRANSACTION ...: this transaction only
        self.reasons.add(SESSION_SETTINGS)  # SET, SET SESSION, RESET, RESET ALL, SET ROLE

    def visit_DiscardStmt(self, ancestors, node: ast.DiscardStmt) -> None:
        self.reasons.add(SESSION_SETTINGS)

    # -- prepared statements, cursors, LISTEN, LOAD -----------------------------------------
    def visit_PrepareStmt(self, ancestors, node) -> None:
        self.reasons.add(PREPARED_STATEMENT)

    def visit_ExecuteStmt(self, ancestors, node) -> None:
        self.reasons.add(PREPARED_STATEMENT)

    def visit_DeallocateStmt(self, ancestors, node) -> None:
        self.reasons.add(PREPARED_STATEMENT)

    def visit_DeclareCursorStmt(self, ancestors, node) -> None:
        self.reasons.add(CURSOR)

    def visit_ListenStmt(self, ancestors, node) -> None:
        self.reasons.add(LISTEN)

    def visit_LoadStmt(self, ancestors, node) -> None:
        self.reasons.add(OTHER)

    # -- temporary objects ---------------------------------------------------------------
    def visit_CreateStmt(self, ancestors, node: ast.CreateStmt) -> None:
        if _is_temp_relation(node.relation):
            self.reasons.add(TEMPORARY_OBJECT)

    def visit_CreateSeqStmt(self, ancestors, node: ast.CreateSeqStmt) -> None:
        if _is_temp_relation(node.sequence):
            self.reasons.add(TEMPORARY_OBJECT)

    def visit_ViewStmt(self, ancestors, node: ast.ViewStmt) -> None:
        if _is_temp_relation(node.view):
            self.reasons.add(TEMPORARY_OBJECT)

    def visit_IntoClause(self, ancestors, node: ast.IntoClause) -> None:
        # CREATE TEMP TABLE ... AS, SELECT ... INTO TEMP
        if _is_temp_relation(node.rel):
            self.reasons.add(TEMPORARY_OBJECT)

    # -- functions -----------------------------------------------------------------------
    def visit_FuncCall(self, ancestors, node: ast.FuncCall) -> None:
        name = func_name(node)
        if name in _SEQUENCE_FUNCTIONS:
            self.reasons.add(SEQUENCE)
        elif name in SESSION_ADVISORY_FUNCTIONS:
            self.reasons.add(ADVISORY_LOCK)
        elif name == "set_config":
            args = node.args or ()
            # set_config(name, value, is_local): only a literal true is transaction-scoped;
            # a normalized `$3` could be either, and false is the common case.
            if len(args) < 3 or not is_true_constant(args[2]):
                self.reasons.add(SESSION_SETTINGS)


# Fallback for text the parser rejects (a truncated or unusual statement): keywords at the
# start of a statement or function names followed by "(".
_FALLBACK = (
    (
        re.compile(r"^\s*(set|reset|discard)\b(?!\s+(local|transaction)\b)", re.I | re.M),
        SESSION_SETTINGS,
    ),
    (re.compile(r"^\s*(prepare|execute|deallocate)\b", re.I | re.M), PREPARED_STATEMENT),
    (re.compile(r"\bcreate\s+(global\s+|local\s+)?(temp|temporary)\b", re.I), TEMPORARY_OBJECT),
    (
        re.compile(
            r"\b(pg_advisory_(un)?lock(_shared|_all)?|pg_try_advisory_lock(_shared)?)\s*\(", re.I
        ),
        ADVISORY_LOCK,
    ),
    (re.compile(r"\b(nextval|setval|currval|lastval)\s*\(", re.I), SEQUENCE),
    (re.compile(r"^\s*listen\b", re.I | re.M), LISTEN),
    (re.compile(r"^\s*declare\b", re.I | re.M), CURSOR),
    (re.compile(r"^\s*load\b", re.I | re.M), OTHER),
)


def _fallback(sql: str) -> set[str]:
    return {reason for pattern, reason in _FALLBACK if pattern.search(sql)}


@functools.lru_cache(maxsize=8192)
def classify(sql: str) -> frozenset[str]:
    """The reasons `sql` (one or more statements) would pin an RDS Proxy session; empty if
    it would not. Pure and cached: the same normalized text always gives the same answer."""
    reasons: set[str] = set()
    if len(sql.encode("utf-8", "surrogatepass")) > MAX_STATEMENT_BYTES:
        reasons.add(STATEMENT_TOO_LARGE)
    try:
        tree = pglast.parse_sql(sql)
    except (pglast.parser.ParseError, ValueError, RecursionError):
        reasons |= _fallback(sql)
    else:
        finder = _Finder()
        finder(tree)
        reasons |= finder.reasons
    return frozenset(reasons)


def primary(reasons: frozenset[str] | set[str]) -> str | None:
    """The first reason in `REASONS` order; a stable single answer for display."""
    return next((r for r in REASONS if r in reasons), None)
