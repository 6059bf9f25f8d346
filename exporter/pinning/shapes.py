"""Statement shapes: what the pinning fingerprints (`exporter.pinning.fingerprints`) match on.

Matching is on the statement, not on its spelling: text is parsed with PostgreSQL's parser
(pglast) and compared by the pg_query fingerprint, which ignores constants, `$n` numbering,
aliases, case and whitespace, so pg_stat_statements' normalized text, the driver's own text and
the proxy's lowercased Digest of the same statement all match. A Digest the parser refuses
because a `$n` stands where the grammar wants a literal (`set names $2`) is parsed again with
the parameters quoted.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import pglast
from pglast import ast
from pglast.enums import VariableSetKind
from pglast.enums.parsenodes import CURSOR_OPT_HOLD
from pglast.parser import ParseError, fingerprint, split
from pglast.visitors import Visitor

from exporter.pinning import statements

_PARAM = re.compile(r"\$\d+")


@dataclass(frozen=True, slots=True)
class Facts:
    """What matters about one statement for telling fingerprints apart."""

    key: str  # pg_query fingerprint: the statement's shape
    settings: tuple[tuple[str, bool], ...]  # (name, or "*" for ALL, "?" for $n; local?)
    functions: frozenset[str]
    with_hold: bool


# --- reading statements ------------------------------------------------------------------


class _FactFinder(Visitor):
    def __init__(self) -> None:
        super().__init__()
        self.settings: list[tuple[str, bool]] = []
        self.functions: set[str] = set()
        self.with_hold = False

    def visit_VariableSetStmt(self, ancestors, node: ast.VariableSetStmt) -> None:
        if not isinstance(ancestors.node, ast.RawStmt):
            return  # the SET clause of ALTER ROLE/DATABASE/FUNCTION: not this session
        name = (node.name or "*").lower()
        if node.kind == VariableSetKind.VAR_SET_MULTI and name.startswith("transaction"):
            return  # SET TRANSACTION ...: this transaction only
        self.settings.append((name, bool(node.is_local)))

    def visit_FuncCall(self, ancestors, node: ast.FuncCall) -> None:
        name = statements.func_name(node)
        self.functions.add(name)
        args = node.args or ()
        if name == "set_config" and args:
            first = args[0]
            setting = "?"
            if isinstance(first, ast.A_Const) and isinstance(first.val, ast.String):
                setting = first.val.sval.lower()
            local = len(args) >= 3 and statements.is_true_constant(args[2])
            self.settings.append((setting, local))

    def visit_DeclareCursorStmt(self, ancestors, node: ast.DeclareCursorStmt) -> None:
        self.with_hold = self.with_hold or bool((node.options or 0) & CURSOR_OPT_HOLD)


def _parts(sql: str) -> tuple[str, ...]:
    """The statements of `sql`; with `$n` quoted if the parser refuses them where they are
    (a normalized Digest); () if it cannot be parsed at all."""
    for text in (sql, _PARAM.sub(lambda m: f"'{m.group(0)}'", sql)):
        try:
            return tuple(part for part in split(text) if part.strip())
        except ParseError:
            continue
    return ()


#: Texts up to this long are cached: Digests and pinning statements repeat; a statement over
#: RDS Proxy's 16 KB limit is classified once per queryid anyway and would only fill memory.
CACHED_CHARS = 4096


def facts(sql: str) -> tuple[Facts, ...]:
    """The facts of each statement in `sql`."""
    return _cached_facts(sql) if len(sql) <= CACHED_CHARS else _facts(sql)


@functools.lru_cache(maxsize=4096)
def _cached_facts(sql: str) -> tuple[Facts, ...]:
    return _facts(sql)


def _facts(sql: str) -> tuple[Facts, ...]:
    out = []
    for part in _parts(sql):
        finder = _FactFinder()
        finder(pglast.parse_sql(part))
        out.append(
            Facts(
                fingerprint(part),
                tuple(finder.settings),
                frozenset(finder.functions),
                finder.with_hold,
            )
        )
    return tuple(out)


def statement_keys(sql: str) -> tuple[str, ...]:
    """The shape of each statement in `sql`: equal for the same statement however it was
    normalized or spelled, so a proxy Digest finds its pinning-risk row."""
    return tuple(f.key for f in facts(sql))


def _keys(*texts: str) -> frozenset[str]:
    return frozenset(key for text in texts for key in statement_keys(text))


# --- the matchers of exporter.pinning.fingerprints ---------------------------------------

_JIT = _keys(
    # asyncpg/connection.py, Connection._introspect_types (asyncpg >= 0.29)
    "SELECT current_setting('jit') AS cur, set_config('jit', 'off', false) AS new",
    "SELECT set_config('jit', $1, false)",
)
# asyncpg/connection.py, Connection.get_reset_query
_RESET = _keys("SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;")


def asyncpg_jit(f: Facts) -> bool:
    # normalized, the name is `$n` ("?"); a set_config of any other literal name is not it
    return f.key in _JIT and any(name in ("jit", "?") for name, _ in f.settings)


def asyncpg_reset(f: Facts) -> bool:
    return f.key in _RESET


def session_setting(*names: str) -> Callable[[Facts], bool]:
    def matches(f: Facts) -> bool:
        return any(name in names and not local for name, local in f.settings)

    return matches


def with_hold(f: Facts) -> bool:
    return f.with_hold


def session_advisory_lock(f: Facts) -> bool:
    return bool(f.functions & statements.SESSION_ADVISORY_FUNCTIONS)


def any_session_setting(f: Facts) -> bool:
    return any(not local for _, local in f.settings)
