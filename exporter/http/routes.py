"""HTTP: /metrics, the landing page, health and readiness, and the app-report ingest.

Nothing here touches PostgreSQL or AWS: /metrics renders the store, so it answers in
milliseconds while the database is down, which is when people look.
"""

from __future__ import annotations

from aiohttp import web

from exporter.diagnosis.web import FINDINGS_PATH
from exporter.diagnosis.web import document as findings_document
from exporter.diagnosis.web import section as findings_section
from exporter.http import landing
from exporter.http.connlimit import headers_received
from exporter.http.pinning_section import section as pinning_section
from exporter.http.status import DaemonView
from exporter.ingest import REPORTS_PATH, reports_handler

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
TEXT = "text/plain; version=0.0.4; charset=utf-8"

DAEMON: web.AppKey[DaemonView] = web.AppKey("daemon")


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
    """The statements that would pin RDS Proxy sessions (normalized text, never a label), the
    proxies' pins named by statement, and the driver fingerprints with their fix."""
    daemon = request.app[DAEMON]
    return web.json_response(daemon.pinning_report())


async def reload(request: web.Request) -> web.Response:
    """POST /-/reload, as in Prometheus: re-read --config.file like SIGHUP does. 200 when
    applied; 500 with the reason (file, line, key) when the configuration in use is kept."""
    error = await request.app[DAEMON].reload()
    if error is None:
        return web.Response(text="configuration reloaded\n")
    return web.Response(status=500, text=f"failed to reload config: {error}\n")


async def reports(request: web.Request) -> web.Response:
    """POST REPORTS_PATH, to the ingest of the configuration in use (a reload may turn it on
    or off)."""
    return await reports_handler(request.app[DAEMON].ingest)(request)


async def findings(request: web.Request) -> web.Response:
    """What the diagnosis rules found: cause, numbers, fix, per subject (exporter.diagnosis)."""
    return web.json_response(findings_document(request.app[DAEMON].diagnosis))


async def landing_page(request: web.Request) -> web.Response:
    """The landing page, from the daemon's status (see `exporter.http.landing`), led by the
    diagnosis findings."""
    daemon = request.app[DAEMON]
    lead = landing.Html(findings_section(findings_document(daemon.diagnosis)))
    status = daemon.status()
    pinning = landing.Html(pinning_section(daemon.pinning_report(), status))
    page = landing.render(status, lead, pinning)
    return web.Response(text=page, content_type="text/html")


def build_app(daemon: DaemonView, middlewares: list | None = None) -> web.Application:
    app = web.Application(
        # outermost: a request past its headers stops its connection's header deadline
        middlewares=[headers_received, *(middlewares or [])],
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
    app.router.add_get("/", landing_page)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    app.router.add_post("/-/reload", reload)
    app.router.add_put("/-/reload", reload)
    app.router.add_post(REPORTS_PATH, reports)
    app.router.add_get("/api/v1/pinning-risk", pinning_risk)
    app.router.add_get(FINDINGS_PATH, findings)
    return app
