"""The findings on the web: `GET /api/v1/findings` and the landing page's first section.

The landing page leads with the findings because that is what someone opening it during an
incident needs first: the cause, the fix, and a small chart of the evidence over the window
(inline SVG, no JavaScript). Every value shown is HTML-escaped and redacted: application
names and statement texts come from the database.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from exporter.diagnosis.engine import DiagnosisSource
from exporter.redaction import html_text as _e

FINDINGS_PATH = "/api/v1/findings"
WIDTH, HEIGHT, PAD = 240, 48, 2


def document(source: DiagnosisSource | None) -> dict[str, Any]:
    """The body of `GET /api/v1/findings`; `disabled` when `diagnosis.enabled` is false."""
    if source is None:
        return {"status": "disabled", "findings": [], "links": []}
    return source.to_json()


def _points(values: Sequence[float | None], top: float) -> list[list[tuple[float, float]]]:
    """Polyline segments of the values scaled into the chart; a gap (None, NaN) splits."""
    n = max(len(values) - 1, 1)
    segments: list[list[tuple[float, float]]] = [[]]
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            if segments[-1]:
                segments.append([])
            continue
        x = PAD + (WIDTH - 2 * PAD) * i / n
        y = HEIGHT - PAD - (HEIGHT - 2 * PAD) * min(max(float(v), 0.0) / top, 1.0)
        segments[-1].append((x, y))
    return [s for s in segments if s]


def chart_svg(chart: Mapping[str, Any]) -> str:
    """A sparkline of the evidence and, dashed, the line it is judged against."""
    values = list(chart.get("values") or [])
    finite = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    reference = chart.get("reference")
    reference = float(reference) if isinstance(reference, int | float) else None
    if not finite:
        return ""
    top = max([*finite, reference or 0.0]) or 1.0
    lines = []
    for segment in _points(values, top):
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in segment)
        lines.append(
            f'<polyline points="{coords}" fill="none" stroke="#b00020" stroke-width="1.5"/>'
        )
    if reference is not None and math.isfinite(reference) and reference > 0:
        y = HEIGHT - PAD - (HEIGHT - 2 * PAD) * min(reference / top, 1.0)
        lines.append(
            f'<line x1="{PAD}" y1="{y:.1f}" x2="{WIDTH - PAD}" y2="{y:.1f}" stroke="#555" '
            f'stroke-dasharray="4 3"><title>{_e(chart.get("reference_label", ""))} '
            f"{reference:g}</title></line>"
        )
    label = f"{chart.get('label', '')} over the window, last {finite[-1]:g}"
    return (
        f'<svg class="chart" role="img" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" aria-label="{_e(label)}">'
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#fafafa" stroke="#ddd"/>'
        + "".join(lines)
        + f"<title>{_e(label)}</title></svg>"
    )


def _finding(f: Mapping[str, Any]) -> str:
    subject = " ".join(f"{k}={v}" for k, v in dict(f.get("subject") or {}).items() if v)
    values = dict(dict(f.get("evidence") or {}).get("values") or {})
    evidence = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in values.items()
        if v is not None
    )
    details = "".join(f"<li>{_e(d)}</li>" for d in f.get("details") or ())
    chart = chart_svg(f["chart"]) if f.get("chart") else ""
    severity = _e(f.get("severity", ""))
    return (
        f'<div class="finding {severity}" data-rule="{_e(f.get("rule", ""))}">'
        f'<h3><span class="severity">{severity}</span> {_e(f.get("rule", ""))} '
        f"<small>{_e(subject)}</small></h3>{chart}"
        f'<p class="summary">{_e(f.get("summary", ""))}</p>'
        f'<p class="fix"><b>Fix.</b> {_e(f.get("fix", ""))}</p>'
        + (f'<ul class="details">{details}</ul>' if details else "")
        + f'<p class="evidence">Evidence: {_e(evidence)}. '
        f'<a href="{_e(f.get("runbook_url", ""))}">About this rule</a></p></div>'
    )


def _links(links: Sequence[Mapping[str, Any]]) -> str:
    if not links:
        return ""
    rows = "".join(
        f"<tr><td>{_e(link['app'])}/{_e(link['pool'])}</td>"
        f"<td>{_e(', '.join(link['targets'])) or '<i>not seen on a target</i>'}</td></tr>"
        for link in links
    )
    return (
        "<h3>Pools and the databases they use</h3>"
        f'<table class="links"><tr><th>app/pool</th><th>targets</th></tr>{rows}</table>'
    )


def section(doc: Mapping[str, Any]) -> str:
    """The landing page's findings section, from the findings document."""
    status = doc.get("status")
    findings = list(doc.get("findings") or ())
    window = doc.get("window_seconds") or 0
    if status == "disabled":
        body = "<p>Diagnosis is off (<code>diagnosis.enabled: false</code>).</p>"
    elif status != "ok":
        body = "<p>Diagnosis is warming up: it needs a few evaluations of history first.</p>"
    elif not findings:
        body = (
            f'<p class="healthy">No finding: no rule names a cause of pressure in the last '
            f"{window / 60:g} minutes.</p>"
        )
    else:
        body = "".join(_finding(f) for f in findings)
    return (
        f'<h2 id="findings">Findings</h2>{body}'
        + _links(doc.get("links") or ())
        + '<p><a href="api/v1/findings">Findings as JSON</a></p>'
    )
