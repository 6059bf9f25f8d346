"""One line of an RDS Proxy log group, as AWS writes it: is it a pin, a warning of a pin that
has not happened, or neither; for which reason; and which statement (the Digest).

With enhanced logging on, the proxy writes to `/aws/rds/proxy/<proxy>`, e.g.

    [WARN] [proxyEndpoint=default] [clientConnection=2125203372] The client session was pinned
    to the database connection [dbConnection=1953961465] for the remainder of the session. The
    proxy can't reuse this connection until the session ends. Reason: SQL changed session
    settings that the proxy doesn't track. Consider moving session configuration to the
    proxy's initialization query. Digest: "set search_path = $1; set names $2;".

The envelope may or may not carry `[proxyEndpoint=...]`, the session-settings reason comes with
and without its "Consider moving" sentence, and the Digest is the statement, normalized by the
proxy. Reasons seen verbatim in public reports: "A parse message was detected.", the settings
one above, and "The connection ran a SQL query which exceeded the 16384 byte limit.". AWS does
not publish the full list, so a reason is also matched by keywords, a settings reason is
refined by classifying its Digest, and a reason nothing matches is `unknown` - counted under
that one label, never under its own text, so a new AWS wording cannot grow the series.

An INFO line "If this prepared statement runs, the client session will be pinned to the
database connection [dbConnection=N]. Reason: ..." is a warning, not a pin: it is a
`WOULD_PIN` line, counted apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from exporter.pinning import statements

PIN = "pin"
WOULD_PIN = "would_pin"

PIN_MARKER = "was pinned"
WOULD_PIN_MARKER = "will be pinned"
#: FilterLogEvents pattern for both kinds of line: `?term` is CloudWatch Logs' OR.
FILTER_PATTERN = f'?"{PIN_MARKER}" ?"{WOULD_PIN_MARKER}"'

_ENVELOPE = re.compile(
    r"^\s*(?:\[(?P<level>[A-Z]+)\]\s*)?"
    r"(?:\[proxyEndpoint=(?P<endpoint>[^\]]*)\]\s*)?"
    r"(?:\[clientConnection=(?P<client>[^\]]*)\]\s*)?"
)
_DIGEST = re.compile(r"\s*Digest:\s*\"(?P<sql>.*)\"\s*\.?\s*$", re.S)

_KEYWORDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        ("text size", "too large", "larger than", "exceed", "16 kb", "16384", "size limit"),
        statements.STATEMENT_TOO_LARGE,
    ),
    (("parse message", "prepare"), statements.PREPARED_STATEMENT),
    (("temporary", "temp table"), statements.TEMPORARY_OBJECT),
    (("advisory",), statements.ADVISORY_LOCK),  # not "lock": it matches "blocked", "clock"
    (("sequence", "nextval", "setval", "currval"), statements.SEQUENCE),
    (("listen", "notification channel"), statements.LISTEN),
    (("cursor",), statements.CURSOR),
    (
        (
            "session setting",
            "set statement",
            "set command",
            "session state",
            "parameter",
            "variable",
            "discard",
            "configuration",
        ),
        statements.SESSION_SETTINGS,
    ),
)


@dataclass(frozen=True, slots=True)
class LogLine:
    """What one pinning line says. `reason_text` is the proxy's own words (Digest removed),
    kept to show an unknown reason; `digest` is the statement, "" when the line has none."""

    kind: str  # PIN or WOULD_PIN
    reason: str  # a statements.REASONS slug
    reason_text: str
    digest: str
    endpoint: str  # "" when the envelope has no [proxyEndpoint=...]


def parse(message: str) -> LogLine | None:
    """The pin or would-pin line in `message`; None for any other line."""
    if PIN_MARKER in message:
        kind = PIN
    elif WOULD_PIN_MARKER in message:
        kind = WOULD_PIN
    else:
        return None
    envelope = _ENVELOPE.match(message)
    endpoint = (envelope.group("endpoint") if envelope else None) or ""
    _, found, after = message.partition("Reason:")
    reason_text, digest = _split_digest(after.strip() if found else "")
    return LogLine(kind, _reason(reason_text, digest), reason_text, digest, endpoint)


def _split_digest(text: str) -> tuple[str, str]:
    """("reason words", "statement"): the Digest is the last part, quoted, and may itself
    contain quotes (identifiers), so it is taken greedily up to the closing quote."""
    head, found, tail = text.partition("Digest:")
    if not found:
        return text, ""
    match = _DIGEST.match("Digest:" + tail)
    digest = match.group("sql").strip() if match else tail.strip().strip('."').strip()
    return head.strip(), digest


def _reason(reason_text: str, digest: str) -> str:
    """The slug of a reason: by keywords, and a settings reason (or one nothing matches)
    refined by what its Digest statement does."""
    text = reason_text.lower()
    slug = next((s for keys, s in _KEYWORDS if any(k in text for k in keys)), None)
    if slug in (None, statements.SESSION_SETTINGS) and digest:
        refined = statements.primary(statements.classify(digest) - {statements.STATEMENT_TOO_LARGE})
        if refined is not None:
            return refined
    return slug or statements.UNKNOWN


def digest_reason(digest: str) -> str:
    """The reason a settings pin with this Digest is counted under."""
    return _reason("SQL changed session settings", digest)
