"""The landing page's "RDS Proxy pinning" section: what `/api/v1/pinning-risk` says, readable.

Someone paged for pinning opens the landing page first, so it answers there: which known
driver or ORM statement pins and the fix (the fingerprints seen), what the apps themselves saw
that the database cannot (statements over 16 KB, libpq options the proxy refuses), and whether
a proxy's pinning log has gone silent (enhanced logging turns itself off after 24 hours), so an
empty reason table is not read as "no pins". Built from the daemon's own state: it never waits
on PostgreSQL or AWS. Every value is redacted and escaped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from exporter.http.status import DaemonStatus
from exporter.redaction import html_text as _e

NOTHING = "<p>No pinning statements, driver fingerprints or app warnings seen yet.</p>"


def proxy_log_states(status: DaemonStatus) -> list[tuple[str, str]]:
    """(proxy, state of its pinning log) from the RDS Proxy source's details."""
    out = []
    for source in status.daemon_wide:
        for proxy in source.details.get("proxies") or ():
            if isinstance(proxy, Mapping) and "logs" in proxy:
                out.append((str(proxy.get("name")), str(proxy["logs"])))
    return out


def _logs(states: Iterable[tuple[str, str]]) -> str:
    rows = "".join(
        f'<tr class="proxy-log" data-proxy="{_e(name)}"><td>{_e(name)}</td>'
        f'<td class="log-state">{_e(state)}</td></tr>'
        for name, state in states
    )
    return f"<h3>Proxy pinning logs</h3><table><tr><th>proxy</th><th>log</th></tr>{rows}</table>"


def _fingerprints(found: Iterable[Mapping[str, Any]]) -> str:
    rows = "".join(
        f'<tr class="fingerprint" data-fingerprint="{_e(fp["id"])}"><td>{_e(fp["title"])}'
        f'<div class="error">{_e(fp["origin"])}</div></td>'
        f"<td>{_e(', '.join(fp.get('roles') or ()) or '-')}</td>"
        f"<td>{float(fp.get('calls') or 0):g}</td><td>{float(fp.get('pins') or 0):g}</td>"
        f"<td>{_e(fp['fix'])}</td></tr>"
        for fp in found
    )
    return (
        "<h3>Known pinning statements seen</h3><table><tr><th>fingerprint</th><th>roles</th>"
        f"<th>calls</th><th>pins</th><th>fix</th></tr>{rows}</table>"
    )


def _apps(warnings: Iterable[Mapping[str, Any]]) -> str:
    rows = []
    for item in warnings:
        examples = "".join(
            f"<li><code>{_e(ex['head'])}</code> ({int(ex['bytes'])} bytes)</li>"
            for ex in item.get("oversized_examples") or ()
        )
        options = ", ".join(item.get("connect_options") or ()) or "-"
        fixes = "".join(f"<p>{_e(w['title'])}: {_e(w['fix'])}</p>" for w in item["warnings"])
        rows.append(
            f'<tr class="app-warning" data-app="{_e(item["app"])}" data-pool="{_e(item["pool"])}">'
            f"<td>{_e(item['app'])} / {_e(item['pool'])}</td>"
            f"<td>{float(item.get('oversized') or 0):g}<ul>{examples}</ul></td>"
            f'<td class="connect-options">{_e(options)}</td><td>{fixes}</td></tr>'
        )
    return (
        "<h3>Seen by the apps</h3><table><tr><th>app / pool</th><th>statements over 16 KB</th>"
        f"<th>libpq options (refused by RDS Proxy)</th><th>fix</th></tr>{''.join(rows)}</table>"
    )


def section(report: Mapping[str, Any], status: DaemonStatus) -> str:
    """The section for a `pinning_report()` and the daemon's status."""
    parts = []
    states = proxy_log_states(status)
    if states:
        parts.append(_logs(states))
    if report.get("fingerprints"):
        parts.append(_fingerprints(report["fingerprints"]))
    if report.get("apps"):
        parts.append(_apps(report["apps"]))
    body = "".join(parts) or NOTHING
    return f'<h2 id="pinning">RDS Proxy pinning</h2>\n{body}\n'
