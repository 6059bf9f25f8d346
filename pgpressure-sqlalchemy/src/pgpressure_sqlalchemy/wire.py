"""The report format shared by the in-app side and the daemon (standard library only).

Both sides import these constants, so the histogram bucket bounds can never disagree: a
report carries only per-bucket counts, and the schema version pins the bounds. Changing a
bound means a new SCHEMA_VERSION, which old daemons refuse with a clear 400.
"""

from __future__ import annotations

SCHEMA_VERSION = 1
REPORTS_PATH = "/api/v1/reports"

#: Upper bounds in seconds for every pool histogram (wait, use, create, query); +Inf is implied
#: as the last bucket. 100 µs covers an idle-pool checkout, 60 s a stuck transaction, and the
#: alert thresholds (100 ms wait, 500 ms statement) fall exactly on bounds.
BOUNDS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
NBUCKETS = len(BOUNDS) + 1

HISTOGRAMS = ("wait", "use", "create", "query")
CLOSE_REASONS = ("recycle", "invalidated", "overflow", "other")

MAX_NAME_LENGTH = 128
MAX_POOLS_PER_REPORT = 100

#: RDS Proxy pins the session of a statement whose text is larger than this; its log says only
#: "The connection ran a SQL query which exceeded the 16384 byte limit.", and
#: pg_stat_statements normalizes the statement below it, so only the app can name it.
PROXY_MAX_STATEMENT_BYTES = 16384
#: Per pool: how many of those statements a report names (the head of each, and its size).
MAX_STATEMENT_EXAMPLES = 5
STATEMENT_HEAD_CHARS = 160
#: Per pool: how many setting names from libpq `options` a report carries.
MAX_CONNECT_OPTIONS = 16
MAX_SETTING_NAME = 63  # PostgreSQL's NAMEDATALEN - 1
