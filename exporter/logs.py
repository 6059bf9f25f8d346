"""Structured logging in logfmt or JSON, redacted.

Call `log.info("message", extra={"fields": {...}})` or use `kv()`; the formatter renders the
fields as key=value pairs (logfmt) or JSON members, as Prometheus' own daemons do.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time

from exporter.redaction import RedactingFilter

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}


def kv(**fields: object) -> dict[str, dict[str, object]]:
    return {"fields": fields}


def _ts(record: logging.LogRecord) -> str:
    t = time.gmtime(record.created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z"


_NAMED_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(c: str) -> str:
    """One character as it may appear inside a quoted logfmt value: quotes, backslashes and
    anything a terminal could act on (ESC starts colour and cursor sequences, a bare CR
    overwrites the line) written out as an escape, as Go's logfmt does."""
    if c in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[c]
    if c.isprintable():
        return c
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _logfmt_value(value: object) -> str:
    """Values with spaces, `=`, quotes or unprintable characters are quoted and escaped:
    logged strings come from clients and databases, and must not be able to forge a field, a
    line or a terminal escape sequence."""
    s = str(value)
    if s == "" or any(c in ' ="' or not c.isprintable() for c in s):
        return '"' + "".join(map(_escape_char, s)) + '"'
    return s


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname.lower().replace("warning", "warn")
        parts = [
            f"ts={_ts(record)}",
            f"level={level}",
            f"logger={record.name}",
            f"msg={_logfmt_value(record.getMessage())}",
        ]
        for k, v in (getattr(record, "fields", None) or {}).items():
            parts.append(f"{k}={_logfmt_value(v)}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname.lower().replace("warning", "warn")
        doc = {"ts": _ts(record), "level": level, "logger": record.name, "msg": record.getMessage()}
        doc.update({k: str(v) for k, v in (getattr(record, "fields", None) or {}).items()})
        # json.dumps escapes C0 controls (ESC included) and, ASCII-only, everything past
        # U+007F; DEL is the one control character JSON lets through raw.
        return json.dumps(doc).replace("\x7f", "\\u007f")


class RateLimit(logging.Filter):
    """At most `burst` records per `window` seconds from a logger that clients can trigger
    (aiohttp logs every malformed request), so a scanner cannot flood the log. The number
    suppressed is added to the next record let through."""

    def __init__(self, burst: int = 10, window: float = 60.0) -> None:
        super().__init__()
        self.burst, self.window = burst, window
        self._start = -math.inf
        self._count = 0
        self._dropped = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._start >= self.window:
                self._start, self._count = now, 0
            self._count += 1
            if self._count > self.burst:
                self._dropped += 1
                return False
            dropped, self._dropped = self._dropped, 0
        if dropped:
            record.msg = f"{record.getMessage()} ({dropped} similar messages suppressed)"
            record.args = None
        return True


def setup(level: str = "info", fmt: str = "logfmt") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    # Library chatter (apscheduler job runs, botocore wire logs) only at our debug level,
    # and botocore's wire logs never: they carry signed headers.
    logging.getLogger("apscheduler").setLevel(max(LEVELS[level], logging.WARNING))
    logging.getLogger("botocore").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(max(LEVELS[level], logging.WARNING))
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, RateLimit) for f in server.filters):
        server.addFilter(RateLimit())
