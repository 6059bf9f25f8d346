"""The landing page `/`: version, each target with its sources' state, app processes, links.

It is what someone opens when the database is in trouble, so it is built from the daemon's
status alone and never waits on PostgreSQL or AWS. It must never show a secret: a DSN is
reduced to host:port/dbname, and every value that reaches the page goes through
`redaction.redact` and HTML escaping. The markup lives in the templates below; `_fill`
escapes every value put into them unless it is `Html` the page built itself.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping
from string import Template
from urllib.parse import urlsplit

from exporter import __version__
from exporter.http.status import DaemonStatus, SourceStatus, TargetStatus
from exporter.redaction import html_text

PAGE = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pgpressure</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 70em }
table { border-collapse: collapse; margin-bottom: 1em }
td, th { border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top }
tr.up .state { color: #186a1f } tr.failing .state { color: #b00020 }
tr.starting .state { color: #8a6d00 } .error { font-size: .85em; color: #555 }
h3 small { font-weight: normal; color: #555 }
.finding { border-left: 4px solid #8a6d00; padding: 0 1em; margin-bottom: 1em }
.finding.critical { border-color: #b00020 } .finding .severity { text-transform: uppercase }
.finding .chart { float: right; margin-left: 1em } .finding .evidence { font-size: .85em }
</style></head><body>
<h1>pgpressure</h1>
<p>Prometheus exporter for SQLAlchemy pools, PostgreSQL load and RDS Proxy pinning.
Version <span id="version">$version</span>.</p>
<ul>
<li><a href="metrics">Metrics</a> (Prometheus text; OpenMetrics when asked)</li>
<li><a href="api/v1/pinning-risk">Statements that would pin RDS Proxy sessions</a></li>
<li><a href="-/healthy">Health</a> · <a href="-/ready">Readiness</a></li>
</ul>
$lead
<h2>Targets</h2>
$sections
<h2>Applications</h2>
<p>App processes reporting: <span id="processes">$processes</span>$apps_note</p>
$pinning
</body></html>
""")
TARGET = Template(
    '<h3 class="target" id="target-$name">$name <small>$where$vcpus</small></h3>\n$table'
)
NO_TARGETS = "<p>No PostgreSQL targets configured (<code>databases:</code>).</p>"
DAEMON_WIDE = Template("<h3>Daemon-wide sources</h3>\n$table")
TABLE = Template(
    "<table><tr><th>source</th><th>state</th><th>last success</th><th>details</th></tr>"
    "$rows</table>"
)
ROW = Template(
    '<tr class="source $state" data-source="$source" data-target="$target" '
    'data-state="$state"><td>$source</td><td class="state">$state$error</td>'
    "<td>$ago</td><td>$details</td></tr>"
)
ERROR = Template('<div class="error">$error</div>')


class Html(str):
    """Markup the page built from escaped parts: `_fill` inserts it as it is."""


def _fill(template: Template, **values: object) -> Html:
    """The template with every value redacted and escaped, except `Html` ones."""
    safe = {
        key: value if isinstance(value, Html) else html_text(value) for key, value in values.items()
    }
    return Html(template.substitute(safe))


def where(dsn: str) -> str:
    """host:port/db of a DSN; never the user or password. Multi-host DSNs (`h1:5432,h2:5432`)
    and ports urllib cannot parse are shown as written."""
    parts = urlsplit(dsn)
    hosts = parts.netloc.rpartition("@")[2] or "localhost"
    if "," not in hosts:
        # an out-of-range port is shown as written: asyncpg says so in the source's error
        with contextlib.suppress(ValueError):
            hosts = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
    return f"{hosts}{parts.path or ''}"


def _ago(ts: float | None) -> str:
    return "never" if ts is None else f"{time.time() - ts:.1f}s ago"


def _detail(value: object) -> str:
    """One source fact as text: the names of a list of named things, else its length; the
    scalar fields of a mapping; a scalar as it is."""
    if isinstance(value, list):
        names = [str(v.get("name")) for v in value if isinstance(v, dict) and "name" in v]
        return ", ".join(names) if names else str(len(value))
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items() if not isinstance(v, list | dict))
    return "-" if value is None else str(value)


def _details(details: Mapping[str, object]) -> str:
    return "; ".join(f"{key}: {_detail(value)}" for key, value in details.items()) or "-"


def _row(source: SourceStatus) -> Html:
    failing = source.last_error and not source.up
    return _fill(
        ROW,
        state=source.state,
        source=source.source,
        target=source.target,
        error=_fill(ERROR, error=source.last_error) if failing else Html(""),
        ago=_ago(source.last_success),
        details=_details(source.details),
    )


def _table(sources: Iterable[SourceStatus]) -> Html:
    return _fill(TABLE, rows=Html("".join(_row(s) for s in sources)))


def _target(target: TargetStatus) -> Html:
    return _fill(
        TARGET,
        name=target.name,
        where=where(target.dsn),
        vcpus=_vcpus(target),
        table=_table(target.sources),
    )


def _vcpus(target: TargetStatus) -> str:
    if not target.vcpus:
        return ""
    return f", {target.vcpus:g} vCPUs" + (" (from AWS)" if target.vcpus_source == "aws" else "")


def render(status: DaemonStatus, lead: Html | None = None, pinning: Html | None = None) -> str:
    """The whole page for this status; `lead` (markup built and escaped by its author, the
    diagnosis findings) comes before the targets, `pinning` (likewise) at the end."""
    sections = [_target(t) for t in status.targets] or [Html(NO_TARGETS)]
    if status.daemon_wide:
        sections.append(_fill(DAEMON_WIDE, table=_table(status.daemon_wide)))
    ingest_off = status.app_processes is None
    return _fill(
        PAGE,
        version=__version__,
        lead=lead or Html(""),
        pinning=pinning or Html(""),
        sections=Html("".join(sections)),
        processes="-" if ingest_off else status.app_processes,
        apps_note=" (ingest disabled)" if ingest_off else "",
    )
