"""Secrets that must never reach logs, metrics, error messages or the landing page.

Config loading registers every password, token and key it sees; `redact()` replaces them in
any text, and the logging filter applies it to every record, so a driver error that quotes a
DSN cannot leak it. Passwords inside URLs are masked even when we never saw them.
"""

from __future__ import annotations

import html
import logging
import re
import threading

_lock = threading.Lock()
_secrets: set[str] = set()
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)([^@\s]+)(@)", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)
MASK = "***"


def register(value: str | None) -> None:
    if value and len(value) >= 3:
        with _lock:
            _secrets.add(value)


def redact(text: str) -> str:
    text = _URL_PASSWORD.sub(rf"\1{MASK}\3", text)
    text = _KEYWORD_PASSWORD.sub(rf"\1{MASK}", text)
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def html_text(value: object) -> str:
    """`value` as text for an HTML page: redacted, then escaped (attribute-safe)."""
    return html.escape(redact(str(value)))


def redact_dsn(dsn: str) -> str:
    return _URL_PASSWORD.sub(rf"\1{MASK}\3", dsn)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # bad %-args from a library: logging reports those, we must not raise
            message = f"{record.msg} {record.args!r}"
        record.msg = redact(message)
        record.args = None
        fields = getattr(record, "fields", None)
        if fields:
            record.fields = {k: redact(str(v)) for k, v in fields.items()}
        if record.exc_info and record.exc_info[1] is not None:
            # Keep the exception type and a redacted message; tracebacks carry locals' reprs.
            exc = record.exc_info[1]
            record.msg = f"{record.msg}: {type(exc).__name__}: {redact(str(exc))}"
            record.exc_info = None
            record.exc_text = None
        return True
