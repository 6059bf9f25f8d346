"""HTTP: /metrics, the landing page, health and readiness, and the app-report ingest.

Nothing here touches PostgreSQL or AWS: /metrics renders the store, so it answers in
milliseconds while the database is down, which is when people look.
"""

from __future__ import annotations

import contextlib
import html
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import web

from exporter import __version__
from exporter.ingest import REPORTS_PATH, reports_handler

if TYPE_CHECKING:
    from exporter.daemon import Daemon

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
TEXT = "text/plain; version=0.0.4; charset=utf-8"

DAEMON: web.AppKey[Daemon] = web.AppKey("daemon")


def _wants_openmetrics(request: web.Request) -> bool:
    return "application/openmetrics-text" in request.headers.get("Accept", "")


def _accepts_gzip(request: web.Request) -> bool:
    """Prometheus sends `Accept-Encoding: gzip`; honour `gzip;q=0` as a refusal."""
    for coding in request.headers.get("Accept-Encoding", "").split(","):
        name, _, params = coding.partition(";")
        if name.strip().lower() == "gzip":
            return params.replace(" ", "").lower() not in {"q=0", "q=0.0", "q=0.00", "q=0.000"}
    return False


async def metrics(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    openmetrics = _wants_openmetrics(request)
    gzipped = _accepts_gzip(request)
    body = daemon.renderer.render(openmetrics=openmetrics, gzipped=gzipped)
    response = web.Response(body=body)
    response.headers["Content-Type"] = OPENMETRICS if openmetrics else TEXT
    response.headers["Vary"] = "Accept-Encoding"
    if gzipped:
        response.headers["Content-Encoding"] = "gzip"
    return response


async def healthy(request: web.Request) -> web.Response:
    return web.Response(text="pgpressure is healthy.\n")


async def ready(request: web.Request) -> web.Response:
    """Ready once every source has been tried once: the first scrape then has data."""
    daemon = request.app[DAEMON]
    if daemon.ready():
        return web.Response(text="pgpressure is ready.\n")
    return web.Response(status=503, text="pgpressure is starting: sources not tried yet.\n")


async def pinning_risk(request: web.Request) -> web.Response:
    """Normalized text of the statements that would pin RDS Proxy sessions (never a label)."""
    daemon = request.app[DAEMON]
    return web.json_response({"targets": daemon.pinning_offenders()})


def _where(dsn: str) -> str:
    """host:port/db of a DSN for the landing page; never the user or password. Multi-host
    DSNs (`h1:5432,h2:5432`) and ports urllib cannot parse are shown as written."""
    parts = urlsplit(dsn)
    hosts = parts.netloc.rpartition("@")[2] or "localhost"
    if "," not in hosts:
        # an out-of-range port is shown as written: asyncpg says so in the source's error
        with contextlib.suppress(ValueError):
            hosts = f"{parts.hostname or 'localhost'}:{parts.port or 5432}"
    return f"{hosts}{parts.path or ''}"


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    return f"{time.time() - ts:.1f}s ago"


async def landing(request: web.Request) -> web.Response:
    """Version, each configured target with its sources' state, app processes, links.

    Never shows a secret: DSNs are reduced to host:port/dbname, and every string that reaches
    the page goes through `secrets.redact` and HTML escaping.
    """
    from exporter.redaction import redact

    daemon = request.app[DAEMON]

    def esc(value: object) -> str:
        return html.escape(redact(str(value)))

    def detail(value: object) -> str:
        if isinstance(value, list):
            names = [str(v.get("name")) for v in value if isinstance(v, dict) and "name" in v]
            return ", ".join(names) if names else str(len(value))
        if isinstance(value, dict):
            return ", ".join(f"{k}={v}" for k, v in value.items() if not isinstance(v, list | dict))
        return "-" if value is None else str(value)

    def source_row(source: dict) -> str:
        state = "up" if source["up"] else ("failing" if source["attempts"] else "starting")
        error = source["last_error"]
        error_html = f'<div class="error">{esc(error)}</div>' if error and not source["up"] else ""
        extra = "; ".join(f"{esc(k)}: {esc(detail(v))}" for k, v in source["status"].items())
        return (
            f'<tr class="source {state}" data-source="{esc(source["source"])}" '
            f'data-target="{esc(source["target"])}" data-state="{state}">'
            f'<td>{esc(source["source"])}</td><td class="state">{state}{error_html}</td>'
            f"<td>{esc(_ago(source['last_success']))}</td><td>{extra or '-'}</td></tr>"
        )

    header = "<tr><th>source</th><th>state</th><th>last success</th><th>details</th></tr>"
    sources = daemon.status()["sources"]
    sections = []
    for db in daemon.config.databases:
        where = _where(db.dsn)
        vcpus = f", {db.vcpus:g} vCPUs" if db.vcpus else ""
        rows = "".join(source_row(s) for s in sources if s["target"] == db.name)
        sections.append(
            f'<h3 class="target" id="target-{esc(db.name)}">{esc(db.name)} '
            f"<small>{esc(where)}{esc(vcpus)}</small></h3>\n"
            f"<table>{header}{rows}</table>"
        )
    if not daemon.config.databases:
        sections.append("<p>No PostgreSQL targets configured (<code>databases:</code>).</p>")
    names = {db.name for db in daemon.config.databases}
    others = "".join(source_row(s) for s in sources if s["target"] not in names)
    if others:
        sections.append(f"<h3>Daemon-wide sources</h3>\n<table>{header}{others}</table>")

    if daemon.ingest is None:
        processes, apps_note = "-", " (ingest disabled)"
    else:
        processes, apps_note = daemon.ingest.live_processes(), ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pgpressure</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 70em }}
table {{ border-collapse: collapse; margin-bottom: 1em }}
td, th {{ border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top }}
tr.up .state {{ color: #186a1f }} tr.failing .state {{ color: #b00020 }}
tr.starting .state {{ color: #8a6d00 }} .error {{ font-size: .85em; color: #555 }}
h3 small {{ font-weight: normal; color: #555 }}
</style></head><body>
<h1>pgpressure</h1>
<p>Prometheus exporter for SQLAlchemy pools, PostgreSQL load and RDS Proxy pinning.
Version <span id="version">{esc(__version__)}</span>.</p>
<ul>
<li><a href="metrics">Metrics</a> (Prometheus text; OpenMetrics when asked)</li>
<li><a href="api/v1/pinning-risk">Statements that would pin RDS Proxy sessions</a></li>
<li><a href="-/healthy">Health</a> · <a href="-/ready">Readiness</a></li>
</ul>
<h2>Targets</h2>
{"".join(sections)}
<h2>Applications</h2>
<p>App processes reporting: <span id="processes">{esc(processes)}</span>{esc(apps_note)}</p>
</body></html>
"""
    return web.Response(text=page, content_type="text/html")


def build_app(daemon: Daemon, middlewares: list | None = None) -> web.Application:
    app = web.Application(
        middlewares=middlewares or [],
        # Bodies are only read by the ingest handler, with its own limit; nothing else may
        # buffer more than a report.
        client_max_size=daemon.config.ingest.max_body_bytes + 1,
        handler_args={
            "max_field_size": 8190,  # bytes per header line
            "max_line_size": 8190,  # request line
            "max_headers": 128,
            "auto_decompress": False,  # no inflating of request bodies: see exporter.ingest.handler
            "keepalive_timeout": 75.0,  # idle keep-alive connections are not kept for an hour
        },
    )
    app[DAEMON] = daemon
    app.router.add_get("/", landing)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    app.router.add_post(REPORTS_PATH, reports_handler(daemon.ingest))
    app.router.add_get("/api/v1/pinning-risk", pinning_risk)
    return app
