"""What only the application can see of two RDS Proxy problems, found before the move.

- A statement whose text is larger than 16,384 bytes pins the session. The proxy logs only
  "The connection ran a SQL query which exceeded the 16384 byte limit.", and
  pg_stat_statements keeps the normalized text (a long IN list of constants becomes one `$n`
  per element, but psycopg2 binds parameters into the text on the client: a short template
  with one large JSON value is over the limit on the wire and small in the database). The
  client sees each statement as the driver sends it, so it counts them per pool and keeps a
  few examples: the template's head and the size on the wire, never a parameter's value.
- libpq `options` (`-c statement_timeout=5000` in connect_args or the URL) make RDS Proxy
  refuse the connection ("Feature not supported: RDS Proxy currently doesn't support
  command-line options."). The client sees its connect arguments, so it reports the names
  of the settings there (not their values) for the daemon's pinning report.

Both run off the request path: a statement is looked at only when it is long (pool.py checks
a length the interpreter already has), a connection's options once when it opens.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote

from pgpressure_sqlalchemy.wire import (
    MAX_CONNECT_OPTIONS,
    MAX_SETTING_NAME,
    MAX_STATEMENT_EXAMPLES,
    PROXY_MAX_STATEMENT_BYTES,
    STATEMENT_HEAD_CHARS,
)

#: A str of at most this many characters is at most the proxy's limit in UTF-8 (4 bytes per
#: character at most), so the request path looks no further at shorter ones.
LONG_CHARS = PROXY_MAX_STATEMENT_BYTES // 4

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # the daemon refuses a head with one
_STRING_LITERAL = re.compile(r"'(?:[^']|'')*(?:'|$)")  # a literal cut by the head ends at $
_SETTING = re.compile(r"(?:-c\s*|--)([A-Za-z_][\w.]*)\s*=")
_DSN_OPTIONS = re.compile(r"(?:^|[\s?&])options\s*=\s*('(?:[^'\\]|\\.)*'|[^\s&]+)")


def wire_size(statement: str) -> int:
    """Bytes of `statement` in UTF-8 (`isascii` is a flag CPython keeps: no scan for ASCII)."""
    if statement.isascii():
        return len(statement)
    return len(statement.encode("utf-8", "surrogatepass"))


def statement_head(statement: str) -> str:
    """The start of a statement template as shown in a report: whitespace and control
    characters collapsed to single spaces and any string literal written into the template
    replaced by '?', so no value leaves the app."""
    text = " ".join(_CONTROL.sub(" ", statement[: 4 * STATEMENT_HEAD_CHARS]).split())
    return _STRING_LITERAL.sub("'?'", text)[:STATEMENT_HEAD_CHARS]


def option_settings(cargs: Sequence[Any], cparams: Mapping[str, Any]) -> list[str]:
    """The names of the settings that libpq `options` would set on a connection opened with
    these DBAPI arguments: `options=` itself (connect_args, or the URL's query), or inside a
    DSN string. "options" when it holds something that names no setting."""
    texts = [cparams.get("options")]
    for dsn in (cparams.get("dsn"), cparams.get("conninfo"), *cargs):
        if isinstance(dsn, str):
            texts.extend(unquote(found.strip("'")) for found in _DSN_OPTIONS.findall(dsn))
    names: list[str] = []
    for text in texts:
        if isinstance(text, str) and text.strip():
            found = _SETTING.findall(text) or ["options"]
            names.extend(n.lower()[:MAX_SETTING_NAME] for n in found)
    return list(dict.fromkeys(names))[:MAX_CONNECT_OPTIONS]


class ProxyChecks:
    """One pool's statements over the proxy's limit and the option settings of its
    connections. Its own lock: it is touched on rare paths only."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.settings: dict[str, None] = {}  # engine configuration: kept across `reset`
        self.reset()

    def reset(self) -> None:
        """Zero the counts (a forked child counts its own statements)."""
        self.lock = threading.Lock()
        self.oversized = 0
        self.examples: dict[str, int] = {}  # statement head -> largest size seen, in bytes

    def statement(self, statement: str, size: int | None = None) -> None:
        """A long statement was sent (`size`: its bytes on the wire when the driver says, as
        psycopg2 does with the parameters bound in). Never raises into the app."""
        try:
            size = wire_size(statement) if size is None else size
            if size <= PROXY_MAX_STATEMENT_BYTES:
                return
            head = statement_head(statement)
            with self.lock:
                self.oversized += 1
                if head in self.examples or len(self.examples) < MAX_STATEMENT_EXAMPLES:
                    self.examples[head] = max(size, self.examples.get(head, 0))
        except Exception:
            pass

    def connected_with(self, settings: Iterable[str]) -> None:
        with self.lock:
            for name in settings:
                if len(self.settings) < MAX_CONNECT_OPTIONS:
                    self.settings.setdefault(name)

    def add(self, other: ProxyChecks) -> None:
        """Fold in a retired engine's counts (its examples too, within the bound)."""
        merged = merge([self.to_json(), other.to_json()])
        with self.lock:
            self.oversized = merged["oversized"]
            self.examples = {e["head"]: e["bytes"] for e in merged["oversized_examples"]}
            self.settings = dict.fromkeys(merged["connect_options"])

    def to_json(self) -> dict[str, Any]:
        with self.lock:
            return {
                "oversized": self.oversized,
                "oversized_examples": [{"head": h, "bytes": n} for h, n in self.examples.items()],
                "connect_options": list(self.settings),
            }


def merge(docs: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Several pools' `to_json()` as one: counts added, examples and settings united within
    their bounds (the largest size per head)."""
    oversized = 0
    examples: dict[str, int] = {}
    settings: dict[str, None] = {}
    for doc in docs:
        oversized += doc["oversized"]
        for example in doc["oversized_examples"]:
            head = example["head"]
            if head in examples or len(examples) < MAX_STATEMENT_EXAMPLES:
                examples[head] = max(example["bytes"], examples.get(head, 0))
        settings.update(dict.fromkeys(doc["connect_options"]))
    return {
        "oversized": oversized,
        "oversized_examples": [{"head": h, "bytes": n} for h, n in examples.items()],
        "connect_options": list(settings)[:MAX_CONNECT_OPTIONS],
    }
