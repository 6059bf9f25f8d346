"""Every outcome a push can have, and the counter `pgpressure_reports_total{result}`.

One vocabulary for the whole room: the auth check, the model, the aggregator and the HTTP
handler all refuse with `Refused`, and the handler counts every outcome in `Results`. All
results are exported from the start at 0, so `rate()` and `increase()` see the first refusal
of a kind as an increase rather than a new series.
"""

from __future__ import annotations

from exporter import metrics as m
from exporter.metrics import Sample

RESULTS = (
    "accepted",
    "too_large",  # 413
    "unauthorized",  # 401
    "malformed",  # 400: not a JSON object
    "invalid",  # 400: a JSON object that is not a report
    "unsupported_version",  # 400
    "app_limit",  # 429
    "process_limit",  # 429
    "pool_limit",  # 200, some pools left out
    "out_of_order",  # 200, ignored: not newer than what was counted
    "unsupported_encoding",  # 415
    "busy",  # 503: bodies being received fill ingest.memory_budget_bytes
    "timeout",  # 408: the body did not arrive in time
    "unsupported_media_type",  # 415: not Content-Type: application/json
    "over_budget",  # 429: a new process or pool past ingest.memory_budget_bytes
)


class Refused(Exception):
    """A push turned away: its HTTP status, its `result` label and a message for the client
    (never a secret: it is sent back as is)."""

    def __init__(
        self, status: int, result: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.result, self.message = status, result, message
        self.headers = headers or {}

    def answer(self) -> dict[str, str]:
        return {"status": "refused", "reason": self.result, "error": self.message}


class Results:
    """Cumulative count of each outcome."""

    def __init__(self) -> None:
        self._counts = dict.fromkeys(RESULTS, 0.0)

    def count(self, result: str) -> None:
        self._counts[result] += 1

    def samples(self) -> list[Sample]:
        return [Sample(m.REPORTS, (result,), n) for result, n in self._counts.items()]
