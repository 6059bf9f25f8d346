"""The rule set: one module per rule, each `evaluate(record, thresholds) -> Finding | None`.

Each module names its rule (`NAME`) and the kind of record it reads (`SUBJECT`: target, pool
or proxy). The order below is the order findings are shown in within a severity: causes
(the database saturated, locks, too many connections) before the pool-side consequences.
"""

from __future__ import annotations

from types import ModuleType

from exporter.diagnosis.evidence import Evidence
from exporter.diagnosis.finding import Finding, ordered
from exporter.diagnosis.rules import (
    connection_churn,
    connections_held_idle,
    database_cpu_saturated,
    idle_in_transaction,
    lock_contention,
    pool_undersized,
    pools_exceed_server,
    proxy_pinning,
    temp_spills,
)
from exporter.diagnosis.thresholds import Thresholds

RULES: tuple[ModuleType, ...] = (
    database_cpu_saturated,
    lock_contention,
    pools_exceed_server,
    pool_undersized,
    connections_held_idle,
    idle_in_transaction,
    connection_churn,
    temp_spills,
    proxy_pinning,
)
NAMES = [rule.NAME for rule in RULES]


def evaluate(evidence: Evidence, thresholds: Thresholds) -> list[Finding]:
    """Every enabled rule on every record of its subject, in the order findings are shown."""
    found: list[Finding] = []
    for rule in RULES:
        if not thresholds.enabled(rule.NAME):
            continue
        for record in evidence.of(rule.SUBJECT):
            finding = rule.evaluate(record, thresholds)
            if finding is not None:
                found.append(finding)
    return ordered(found, NAMES)
