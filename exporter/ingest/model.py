"""The report an instrumented process pushes, validated field by field.

The shapes come from the push format the client writes (`exporter.ingest.wire`, shared with
pgpressure-sqlalchemy): bucket count, histogram and close-reason names, name length, pools per
report and schema version. A report that does not fit is refused with 400 and a message that
says where, before anything is aggregated.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from exporter.ingest.results import Refused
from exporter.ingest.wire import (
    CLOSE_REASONS,
    HISTOGRAMS,
    MAX_CONNECT_OPTIONS,
    MAX_NAME_LENGTH,
    MAX_POOLS_PER_REPORT,
    MAX_SETTING_NAME,
    MAX_STATEMENT_EXAMPLES,
    NBUCKETS,
    SCHEMA_VERSION,
    STATEMENT_HEAD_CHARS,
)

Name = Annotated[
    str, Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=r"^[^\x00-\x1f\x7f]+$")
]
Count = Annotated[int, Field(ge=0, le=2**53)]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
CloseReason = Literal[CLOSE_REASONS]  # type: ignore[valid-type]
SettingName = Annotated[
    str, Field(min_length=1, max_length=MAX_SETTING_NAME, pattern=r"^[^\x00-\x20\x7f]+$")
]


class _Model(BaseModel):
    # strict: "5" is not a number; extra keys are ignored so newer clients can add fields.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class HistogramReport(_Model):
    counts: list[Count] = Field(min_length=NBUCKETS, max_length=NBUCKETS)
    sum: Annotated[float, Field(ge=0, allow_inf_nan=False)]

    @field_validator("sum", mode="before")
    @classmethod
    def _int_sum(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


class StatementExample(_Model):
    """A statement over RDS Proxy's size limit: the head of its template and its size."""

    head: str = Field(max_length=STATEMENT_HEAD_CHARS, pattern=r"^[^\x00-\x1f\x7f]*$")
    bytes: Count


class PoolReport(_Model):
    pool: Name
    kind: str = Field("", max_length=64)
    used: Count
    idle: Count
    pending: Count
    size: Count | None = None
    max: Count | None = None  # None: unbounded
    checkouts: Count
    timeouts: Count
    closed: dict[CloseReason, Count]
    wait: HistogramReport
    use: HistogramReport
    create: HistogramReport
    query: HistogramReport
    # What only the app sees of RDS Proxy's limits (clients before 0.3 omit them).
    oversized: Count = 0
    oversized_examples: list[StatementExample] = Field([], max_length=MAX_STATEMENT_EXAMPLES)
    connect_options: list[SettingName] = Field([], max_length=MAX_CONNECT_OPTIONS)

    def histogram(self, name: str) -> HistogramReport:
        return getattr(self, name)


# The histograms are fields of PoolReport: a name added to the wire format must be added here.
_missing = set(HISTOGRAMS) - set(PoolReport.model_fields)
if _missing:
    raise ImportError(f"PoolReport lacks the wire format's histograms {sorted(_missing)}")


class ProcessInfo(_Model):
    id: Name
    host: str = Field("", max_length=255)
    pid: Count = 0
    started: Seconds = 0.0


class Report(_Model):
    version: int
    app: Name
    process: ProcessInfo
    seq: Count
    interval: Seconds | None = None  # the process's push interval; older clients omit it
    pools: list[PoolReport] = Field(max_length=MAX_POOLS_PER_REPORT)
    leaving: bool = False  # the process's last report (it is exiting): fold it in at once

    @field_validator("pools")
    @classmethod
    def _unique_pools(cls, pools: list[PoolReport]) -> list[PoolReport]:
        names = [p.pool for p in pools]
        if len(set(names)) != len(names):
            raise ValueError("pool names must be unique within a report")
        return pools


def parse(body: bytes, max_bytes: int) -> Report:
    """The report in `body`, or `Refused` (413 or 400) saying what is wrong with it."""
    if len(body) > max_bytes:
        raise Refused(413, "too_large", f"report larger than ingest.max_body_bytes ({max_bytes})")
    data = _json_object(body)
    version = data.get("version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise Refused(
            400,
            "unsupported_version",
            f"schema version {version!r} is not supported; this daemon "
            f"accepts version {SCHEMA_VERSION}",
        )
    try:
        return Report.model_validate(data)
    except (OverflowError, RecursionError):
        raise Refused(400, "invalid", "a number or nesting beyond what a report can hold") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "report"
        raise Refused(
            400, "invalid", f"{where}: {first['msg']} ({exc.error_count()} problem(s))"
        ) from None


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refused(400, "malformed", f"not JSON: {exc}") from None
    except RecursionError:
        raise Refused(400, "malformed", "JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise Refused(400, "malformed", "a report is a JSON object")
    return data
