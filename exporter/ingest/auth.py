"""The bearer token a push must carry (`ingest.token` or `ingest.token_file`).

The handler checks it once per push, from the headers alone, before the push gets an ingest
slot or any time to send its body. A token file is re-read every few seconds, so rotating the
secret needs no restart; a file that becomes empty or unreadable keeps the last token read,
and if there never was one the endpoint stays closed: a missing secret must not open it.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from exporter.ingest.results import Refused

if TYPE_CHECKING:
    from exporter.config import IngestConfig

TOKEN_TTL = 5.0  # seconds a token read from token_file is trusted before re-reading


class BearerAuth:
    def __init__(self, config: IngestConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._token: str | None = None
        self._read_at = -math.inf

    def check(self, authorization: str | None) -> None:
        """Return if the `Authorization` header value may push, else raise `Refused` (401)."""
        expected = self._expected()
        if not expected:
            if self._config.token_file is None:
                return  # ingest configured open
            raise Refused(401, "unauthorized", "the ingest token is not available")
        scheme, _, given = (authorization or "").partition(" ")
        # Header values that are not UTF-8 arrive with surrogate escapes: compare their bytes.
        given_bytes = given.strip().encode("utf-8", "surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given_bytes, expected.encode()):
            raise Refused(401, "unauthorized", "a valid bearer token is required")

    def _expected(self) -> str | None:
        if self._config.token_file is None:
            return self._config.token
        now = self._clock()
        if now - self._read_at > TOKEN_TTL:
            try:
                self._token = self._config.bearer_token()
                self._read_at = now
            except (OSError, UnicodeDecodeError):
                pass  # keep the last token we could read
        return self._token
