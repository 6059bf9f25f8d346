"""`temp_spills` (target, database): sorts and hashes spill to temporary files.

A sort or hash that does not fit in work_mem writes to disk and reads back, often ten times
slower. The fix is a work_mem that fits the statements that spill - their temp bytes per call
say how much - set for those statements rather than globally, because every sort or hash
node of every connection may use work_mem at once.
"""

from __future__ import annotations

from exporter.diagnosis.evidence import Statement, TargetEvidence
from exporter.diagnosis.finding import Chart, Finding
from exporter.diagnosis.text import num, size, work_mem, work_mem_bytes
from exporter.diagnosis.thresholds import Thresholds

NAME = "temp_spills"
SUBJECT = "target"


def _detail(s: Statement) -> str:
    per_call = s.temp_bytes_per_call
    if per_call is None:
        return f"queryid {s.queryid}: {size(s.temp_bytes_per_s)}/s, calls unknown"
    return (
        f"queryid {s.queryid}: {size(s.temp_bytes_per_s)}/s, {size(per_call)} per call -> "
        f"work_mem {work_mem(per_call)}"
    )


def evaluate(ev: TargetEvidence, thresholds: Thresholds) -> Finding | None:
    t = thresholds.temp_spills
    if not ev.temp_bytes_per_s:
        return None
    datname, rate = max(ev.temp_bytes_per_s.items(), key=lambda kv: kv[1])
    if rate < t.bytes_per_second:
        return None
    spilling = sorted(
        (s for s in ev.statements if s.datname == datname and s.temp_bytes_per_s > 0),
        key=lambda s: -s.temp_bytes_per_s,
    )[: t.top_statements]
    per_call = [s.temp_bytes_per_call for s in spilling if s.temp_bytes_per_call]
    need = max(per_call, default=None)
    current = size(ev.work_mem_bytes)
    if need is not None:
        worst = ev.max_connections or 0.0
        fix = (
            f"work_mem {work_mem(need)} would keep the largest spill in memory (now {current}). "
            f"Set it for those statements (SET LOCAL work_mem = '{work_mem(need)}' in their "
            "transaction, or ALTER ROLE ... SET for the role that runs them) rather than "
            f"globally: with max_connections {num(worst)}, {num(worst)} x {work_mem(need)} = "
            f"{size(worst * work_mem_bytes(need))} "
            "could be in use at once, more with several sort or hash nodes per statement. "
            "Or make them sort less: an index that returns rows in order, fewer columns."
        )
    else:
        fix = (
            f"Raise work_mem (now {current}) for the statements that spill - pg_stat_statements "
            "temp_blks_written names them - rather than globally, or make them sort less."
        )
    return Finding(
        rule=NAME,
        severity="warning",
        subject={"target": ev.target, "datname": datname},
        summary=(
            f"{ev.target}/{datname}: {size(rate)}/s written to temporary files "
            f"(work_mem {current})"
            + (f"; queryid {spilling[0].queryid} spills {size(need)} per call" if need else "")
        ),
        evidence={
            "temp_bytes_per_second": rate,
            "work_mem_bytes": ev.work_mem_bytes,
            "largest_temp_bytes_per_call": need,
            "max_connections": ev.max_connections,
        },
        window=ev.window,
        fix=fix,
        chart=Chart("temp bytes/s", ev.temp_trend, "bytes/s", t.bytes_per_second, "threshold"),
        details=tuple(_detail(s) for s in spilling),
    )
