"""The landing page `/`, rendered by a real browser (headless Chromium) from a running daemon."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import tempfile

import pytest
from sqlalchemy import create_engine, text

from exporter import __version__
from exporter.devtools.daemon_process import run_daemon
from pgpressure_sqlalchemy import flush, instrument
from tests.conftest import MONITOR_PASSWORD

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
INGEST_TOKEN = "Ingest-canary-77c0d1"


def dump_dom(url: str) -> str:
    """The DOM after Chromium has parsed and laid out the page."""
    profile = tempfile.mkdtemp(prefix="pgpressure-chromium-")
    try:
        args = [
            CHROMIUM,
            "--headless",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=2000",
            "--dump-dom",
            url,
        ]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_landing_page_renders_targets_sources_and_no_secrets(pg):
    dsn = pg.dsn("monitor", password=MONITOR_PASSWORD)
    broken = "postgresql://monitor:Broken-canary-0a9e@127.0.0.1:1/postgres"
    config = f"""
databases:
  - name: main
    dsn: {dsn}
    vcpus: 2
  - name: broken
    dsn: {broken}
    connect_timeout: 1s
ingest:
  enabled: true
  token: {INGEST_TOKEN}
"""
    with run_daemon(config) as daemon:
        # one instrumented process reporting, with the bearer token
        engine = create_engine(pg.dsn().replace("://", "+psycopg://", 1))
        instrument(engine, app="landing", endpoint=daemon.url, token=INGEST_TOKEN, interval=0.5)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        assert 200 in set(flush().values())  # earlier tests may leave stale endpoints
        engine.dispose()
        daemon.wait_for(
            lambda: 'data-target="broken" data-state="failing"' in daemon.get("/").text, 15
        )
        dom = dump_dom(daemon.url + "/")

    assert "<h1>pgpressure</h1>" in dom
    assert f'<span id="version">{html.escape(__version__)}</span>' in dom
    # every configured target, with each of its sources and their state
    for target in ("main", "broken"):
        assert f'id="target-{target}"' in dom
    for source in ("activity", "database"):
        assert f'data-source="{source}" data-target="main" data-state="up"' in dom
        assert f'data-source="{source}" data-target="broken" data-state="failing"' in dom
    assert "s ago" in dom  # last success of the working target
    assert "never" in dom  # ... and of the broken one
    assert '<span id="processes">1</span>' in dom
    assert 'href="metrics"' in dom
    # no secrets, though both DSNs, a failing connection and the token are in play
    for secret in (MONITOR_PASSWORD, "Broken-canary-0a9e", INGEST_TOKEN):
        assert secret not in dom
    assert "127.0.0.1" in dom  # the host is shown, only the credentials are not
    assert "monitor@" not in dom and "monitor:" not in dom


def test_landing_page_shows_where_each_target_is_and_never_its_credentials():
    """host:port/dbname of each DSN as the page shows it; multi-host DSNs and ports urllib
    cannot parse as written; no user, no password, however the DSN is written."""
    dsns = {
        "plain": ("postgresql://u:Pw-canary-5f1e@db.invalid:6432/app", "db.invalid:6432/app"),
        "multi": (
            "postgresql://u:Pw-canary-5f1e@h1.invalid:5432,h2.invalid:5433/app",
            "h1.invalid:5432,h2.invalid:5433/app",
        ),
        "odd-port": ("postgresql://u:Pw-canary-5f1e@h.invalid:99999/app", "h.invalid:99999/app"),
        "no-host": ("postgresql:///app", "localhost:5432/app"),
    }
    targets = "".join(
        f"\n  - name: {name}\n    dsn: {dsn}\n    connect_timeout: 1s"
        for name, (dsn, _) in dsns.items()
    )
    with run_daemon(f"databases:{targets}\ningest: {{enabled: false}}\n") as daemon:
        page = daemon.get("/").text
    shown = dict(re.findall(r'id="target-([^"]+)">[^<]* <small>([^<]*)</small>', page))
    assert shown == {name: location for name, (_, location) in dsns.items()}
    assert "Pw-canary-5f1e" not in page
    assert "u@" not in page and "u:" not in page
    assert '<span id="processes">-</span> (ingest disabled)' in page
