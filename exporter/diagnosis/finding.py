"""A finding: a rule's verdict on one subject, in the shape every output shares.

`/api/v1/findings`, `pgpressure doctor`, the landing page and `pgpressure_finding` all show
the same object, so what the on-call engineer reads at 3 a.m. and what the post mortem says
the next morning cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["warning", "critical"]
SEVERITY_RANK = {"critical": 0, "warning": 1}
RUNBOOK_BASE = "https://github.com/pgpressure/pgpressure/blob/main/docs/diagnosis.md"

#: Labels a finding's subject can carry; `pgpressure_finding` has all of them ("" if unused).
SUBJECT_LABELS = ("target", "datname", "app", "pool", "proxy")


@dataclass(frozen=True, slots=True)
class Chart:
    """The evidence to draw beside the finding: one series over the window, and the line it
    is judged against (vCPUs, the pool's maximum, a threshold), if any."""

    label: str
    values: tuple[float, ...]
    unit: str = ""
    reference: float | None = None
    reference_label: str = ""


@dataclass(frozen=True, slots=True)
class Finding:
    rule: str
    severity: Severity
    subject: dict[str, str]  # labels from SUBJECT_LABELS
    summary: str  # one line, with the numbers
    evidence: dict[str, float | str | None]  # the values the rule judged, over `window`
    window: float
    fix: str
    chart: Chart | None = None
    details: tuple[str, ...] = field(default=())  # statements, reasons, holders: one per line

    @property
    def runbook_url(self) -> str:
        return f"{RUNBOOK_BASE}#{self.rule}"  # the heading is the rule's name

    @property
    def key(self) -> tuple[str, ...]:
        """Identity across evaluations: the rule and its subject, not the numbers."""
        return (self.rule, *(self.subject.get(label, "") for label in SUBJECT_LABELS))

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "rule": self.rule,
            "severity": self.severity,
            "subject": dict(self.subject),
            "summary": self.summary,
            "evidence": {
                "window_seconds": self.window,
                "values": {k: _json_number(v) for k, v in self.evidence.items()},
            },
            "details": list(self.details),
            "fix": self.fix,
            "runbook_url": self.runbook_url,
        }
        if self.chart is not None:
            doc["chart"] = {
                "label": self.chart.label,
                "unit": self.chart.unit,
                "values": [_json_number(v) for v in self.chart.values],
                "reference": _json_number(self.chart.reference),
                "reference_label": self.chart.reference_label,
            }
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Finding:
        """A finding read back from `/api/v1/findings` (for `pgpressure doctor --url`)."""
        chart = doc.get("chart")
        return cls(
            rule=str(doc["rule"]),
            severity=doc["severity"],
            subject={str(k): str(v) for k, v in dict(doc.get("subject") or {}).items()},
            summary=str(doc.get("summary", "")),
            evidence=dict(doc.get("evidence", {}).get("values", {})),
            window=float(doc.get("evidence", {}).get("window_seconds") or 0.0),
            fix=str(doc.get("fix", "")),
            details=tuple(str(d) for d in doc.get("details", ())),
            chart=None
            if not chart
            else Chart(
                label=str(chart.get("label", "")),
                values=tuple(math.nan if v is None else float(v) for v in chart["values"]),
                unit=str(chart.get("unit", "")),
                reference=chart.get("reference"),
                reference_label=str(chart.get("reference_label", "")),
            ),
        )


def _json_number(value: Any) -> Any:
    """JSON has no NaN or infinity: NaN becomes null, infinity a string."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return round(value, 6)
    return value


def ordered(findings: list[Finding], rule_order: list[str]) -> list[Finding]:
    """Critical first; within a severity, causes before consequences (the rules' order)."""
    rank = {name: i for i, name in enumerate(rule_order)}
    return sorted(
        findings,
        key=lambda f: (SEVERITY_RANK[f.severity], rank.get(f.rule, len(rank)), f.key),
    )
