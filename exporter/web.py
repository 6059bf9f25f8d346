"""HTTP: /metrics, the landing page, health and readiness, and the app-report ingest.

Nothing here touches PostgreSQL or AWS: /metrics renders the store, so it answers in
milliseconds while the database is down, which is when people look.
"""

from __future__ import annotations

import html
import time
from typing import TYPE_CHECKING

from aiohttp import web

from exporter import __version__

if TYPE_CHECKING:
    from exporter.daemon import Daemon

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
TEXT = "text/plain; version=0.0.4; charset=utf-8"

DAEMON: web.AppKey[Daemon] = web.AppKey("daemon")


def _wants_openmetrics(request: web.Request) -> bool:
    return "application/openmetrics-text" in request.headers.get("Accept", "")


async def metrics(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    openmetrics = _wants_openmetrics(request)
    body = daemon.renderer.render(openmetrics=openmetrics)
    response = web.Response(body=body)
    response.headers["Content-Type"] = OPENMETRICS if openmetrics else TEXT
    return response


async def healthy(request: web.Request) -> web.Response:
    return web.Response(text="pgpressure is healthy.\n")


async def ready(request: web.Request) -> web.Response:
    """Ready once every source has been tried once: the first scrape then has data."""
    daemon = request.app[DAEMON]
    if daemon.ready():
        return web.Response(text="pgpressure is ready.\n")
    return web.Response(status=503, text="pgpressure is starting: sources not tried yet.\n")


async def reports(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    apps = daemon.apps
    if apps is None:
        return web.json_response({"error": "ingest is disabled"}, status=404)
    async with daemon.ingest_slots:
        # Read at most one byte past the limit: enough for the aggregator to refuse an
        # oversized report with 413 without ever holding it in memory.
        body = await request.content.read(daemon.config.ingest.max_body_bytes + 1)
        status, doc = await apps.handle_report(body, request.headers.get("Authorization"))
    return web.json_response(doc, status=status)


async def pinning_risk(request: web.Request) -> web.Response:
    """Normalized text of the statements that would pin RDS Proxy sessions (never a label)."""
    daemon = request.app[DAEMON]
    return web.json_response({"targets": daemon.pinning_offenders()})


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    return f"{time.time() - ts:.1f}s ago"


async def landing(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    esc = html.escape
    rows = []
    for source in daemon.status()["sources"]:
        state = "up" if source["up"] else ("failing" if source["attempts"] else "starting")
        error = f"<br><small>{esc(source['last_error'])}</small>" if source["last_error"] else ""
        extra = ", ".join(f"{esc(str(k))}: {esc(str(v))}" for k, v in source["status"].items())
        rows.append(
            f'<tr class="{state}"><td>{esc(source["source"])}</td>'
            f"<td>{esc(source['target'])}</td><td>{state}{error}</td>"
            f"<td>{_ago(source['last_success'])}</td><td>{extra}</td></tr>"
        )
    processes = daemon.apps.status().get("processes", 0) if daemon.apps else "ingest disabled"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pgpressure</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222 }}
table {{ border-collapse: collapse }} td, th {{ border: 1px solid #ccc; padding: .3em .6em }}
tr.up td:nth-child(3) {{ color: #186a1f }} tr.failing td:nth-child(3) {{ color: #b00020 }}
</style></head><body>
<h1>pgpressure</h1>
<p>Prometheus exporter for SQLAlchemy pools, PostgreSQL load and RDS Proxy pinning.
Version <span id="version">{esc(__version__)}</span>.</p>
<ul><li><a href="metrics">Metrics</a></li>
<li><a href="api/v1/pinning-risk">Statements that would pin RDS Proxy sessions</a></li>
<li><a href="-/healthy">Health</a> · <a href="-/ready">Readiness</a></li></ul>
<h2>Sources</h2>
<table id="sources"><tr><th>source</th><th>target</th><th>state</th><th>last success</th>
<th>details</th></tr>
{"".join(rows)}
</table>
<h2>Applications</h2>
<p>App processes reporting: <span id="processes">{esc(str(processes))}</span></p>
</body></html>
"""
    return web.Response(text=page, content_type="text/html")


def build_app(daemon: Daemon, middlewares: list | None = None) -> web.Application:
    app = web.Application(
        middlewares=middlewares or [],
        client_max_size=64 * 1024 * 1024,
        handler_args={"max_field_size": 8190, "max_line_size": 8190},
    )
    app[DAEMON] = daemon
    app.router.add_get("/", landing)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    app.router.add_post("/api/v1/reports", reports)
    app.router.add_get("/api/v1/pinning-risk", pinning_risk)
    return app
