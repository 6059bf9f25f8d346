"""Start, readiness, landing, logs and stopping of the real daemon process."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import signal
import socket
import threading
from urllib.parse import urlsplit

import pytest

from exporter import __version__
from exporter.devtools.aws_emulator import rds_proxy_only_config
from exporter.devtools.daemon_process import run_daemon


def config(dsn: str) -> str:
    return f"""
databases:
  - name: main
    dsn: {dsn}
    statements: {{pinning_risk: false}}
ingest: {{enabled: false}}
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_the_daemon_cleanly_within_two_seconds(pg, sig):
    with run_daemon(config(pg.dsn())) as d:
        d.wait_for(lambda: d.value("pgpressure_source_up", source="activity") == 1)
        d.process.send_signal(sig)
        assert d.process.wait(timeout=2) == 0  # the 2 s budget is the contract, not a timing
        assert "shutting down" in d.log()
        assert "Traceback" not in d.log()


def test_stopping_while_the_database_is_unreachable(tmp_path):
    """Sources stuck connecting to an address that never answers must not delay exit."""
    with run_daemon(config("postgresql://u@127.0.0.1:9/db")) as d:
        d.wait_for(lambda: d.value("pgpressure_source_errors_total", source="activity"))
        d.process.send_signal(signal.SIGTERM)
        assert d.process.wait(timeout=2) == 0


def test_stopping_while_a_cloudwatch_call_hangs():
    """An AWS endpoint that accepts and never answers must not hold SIGTERM for the read
    timeout (20 s): the boto3 call runs in a thread that is abandoned at exit."""
    accepted = threading.Event()
    held: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0)) as black_hole:

        def accept() -> None:
            with contextlib.suppress(OSError):
                while True:
                    held.append(black_hole.accept()[0])
                    accepted.set()

        threading.Thread(target=accept, daemon=True).start()
        endpoint = f"http://127.0.0.1:{black_hole.getsockname()[1]}"
        rds_proxy = "{enabled: true, proxies: [orders-proxy], interval: 1s, logs: false}"
        aws = rds_proxy_only_config(endpoint, rds_proxy, "AKIDEXAMPLE", "not-a-real-secret")
        with run_daemon(aws) as d:
            assert accepted.wait(15), "the source never called the endpoint"
            d.process.send_signal(signal.SIGTERM)
            assert d.process.wait(timeout=2) == 0
            assert "Traceback" not in d.log()
        for conn in held:
            conn.close()


def test_json_logs_are_one_object_per_line(pg):
    with run_daemon(config(pg.dsn()), "--log.format", "json") as d:
        d.wait_for(lambda: d.value("pgpressure_source_up", source="activity") == 1)
        d.process.send_signal(signal.SIGTERM)
        d.process.wait(timeout=2)
        docs = [json.loads(line) for line in d.log().splitlines() if line.strip()]
    messages = {doc["msg"] for doc in docs}
    assert {"starting pgpressure", "listening", "connected to target"} <= messages
    assert all({"ts", "level", "msg"} <= set(doc) for doc in docs)


def test_metrics_are_gzipped_when_the_scraper_accepts_it(pg):
    """Prometheus asks for gzip (the body shrinks about tenfold); others get plain text."""
    with run_daemon(config(pg.dsn())) as d:
        d.wait_for(lambda: d.value("pgpressure_source_up", source="activity") == 1)
        host, port = urlsplit(d.url).hostname, urlsplit(d.url).port

        def scrape(accept_encoding: str | None) -> tuple[str | None, bytes]:
            conn = http.client.HTTPConnection(host, port, timeout=10)
            headers = {"Accept-Encoding": accept_encoding} if accept_encoding else {}
            conn.request("GET", "/metrics", headers=headers)
            response = conn.getresponse()
            body = response.read()
            conn.close()
            assert response.status == 200
            return response.getheader("Content-Encoding"), body

        encoding, packed = scrape("gzip")
        assert encoding == "gzip"
        text = gzip.decompress(packed).decode()
        assert "# TYPE pg_activity_samples_total counter" in text
        assert "pgpressure_source_up{" in text
        assert f'pgpressure_build_info{{version="{__version__}"}} 1.0' in text
        assert "\npgpressure_http_connections_refused_total 0.0\n" in text  # there from 0
        for refused in (None, "identity", "gzip;q=0, identity"):
            encoding, plain = scrape(refused)
            assert encoding is None, refused
            assert b"# TYPE pg_activity_samples_total counter" in plain
        encoding, _ = scrape("deflate, gzip;q=0.5")
        assert encoding == "gzip"


def test_health_and_readiness_endpoints(pg):
    with run_daemon(config(pg.dsn())) as d:
        assert d.get("/-/healthy").status_code == 200
        assert d.get("/-/ready").status_code == 200
        assert d.get("/nope").status_code == 404


def test_bad_listen_address_is_a_clear_error(pg, tmp_path):
    import subprocess
    import sys

    path = tmp_path / "c.yaml"
    path.write_text(config(pg.dsn()))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "exporter",
            "--config.file",
            str(path),
            "--web.listen-address",
            "nonsense",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 1
    assert "invalid --web.listen-address" in result.stderr
