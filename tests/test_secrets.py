"""Canary secrets never leave the daemon: not in logs (debug level, logfmt and JSON), metrics,
the landing page, the JSON endpoints, error messages or error answers.

One daemon is given every kind of secret at once, working and failing:
- a password in a DSN that works, and a wrong one (with URL-escaped characters) that fails;
- a password in a password_file that works, and a wrong one that fails;
- AWS keys (access_key_id, secret_access_key) against an AWS endpoint that fails every call
  with an error message quoting the request's credentials back, and an unreachable one;
- the ingest bearer token, with pushes that get it wrong.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from exporter.devtools.aws_emulator import Answer, LocalHttpServer
from exporter.devtools.daemon_process import free_port, run_daemon
from tests.conftest import MONITOR_PASSWORD

WRONG_DSN_PASSWORD = "Wr0ng:c@nary/dsn#1"  # needs URL escaping
WRONG_FILE_PASSWORD = "Wr0ng-canary-file-77"
AWS_KEY_ID = "AKIACANARYSECRETS001"
AWS_SECRET = "aws/Canary+Secret-Key-0123456789abcdef"
INGEST_TOKEN = "ingest-canary-token-4242"

CANARIES = [
    MONITOR_PASSWORD,
    WRONG_DSN_PASSWORD,
    quote(WRONG_DSN_PASSWORD, safe=""),
    WRONG_FILE_PASSWORD,
    AWS_KEY_ID,
    AWS_SECRET,
    INGEST_TOKEN,
]


def assert_clean(where: str, text: str) -> None:
    for canary in CANARIES:
        assert canary not in text, f"secret {canary[:6]}... leaked in {where}"


class EchoingAws(LocalHttpServer):
    """An AWS endpoint that refuses every call and quotes the caller's credentials back."""

    def __init__(self) -> None:
        self.calls = 0
        super().__init__()

    def answer(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Answer:
        self.calls += 1
        auth = headers.get("Authorization", "")
        refusal = {
            "__type": "UnrecognizedClientException",
            "message": f"The security token included in the request is invalid: "
            f"{auth} (secret {AWS_SECRET}, key {AWS_KEY_ID})",
        }
        return 400, {"Content-Type": "application/x-amz-json-1.0"}, json.dumps(refusal).encode()


@pytest.fixture(scope="module")
def aws() -> Iterator[EchoingAws]:
    with EchoingAws() as server:
        yield server


def config(pg, tmp_path: Path, aws_endpoint: str) -> str:
    good_file = tmp_path / "good-password"
    good_file.write_text(MONITOR_PASSWORD + "\n")
    bad_file = tmp_path / "bad-password"
    bad_file.write_text(WRONG_FILE_PASSWORD + "\n")
    wrong = quote(WRONG_DSN_PASSWORD, safe="")
    return f"""
databases:
  - name: dsn-ok
    dsn: postgresql://monitor:{MONITOR_PASSWORD}@127.0.0.1:{pg.port}/postgres
    statements: {{interval: 1s}}
  - name: dsn-wrong
    dsn: postgresql://monitor:{wrong}@127.0.0.1:{pg.port}/postgres
    statements: {{interval: 1s}}
  - name: file-ok
    dsn: postgresql://monitor@127.0.0.1:{pg.port}/template1
    password_file: {good_file}
    statements: {{interval: 1s}}
  - name: file-wrong
    dsn: postgresql://monitor@127.0.0.1:{pg.port}/postgres
    password_file: {bad_file}
    statements: {{interval: 1s}}
ingest:
  enabled: true
  token: {INGEST_TOKEN}
aws:
  region: us-east-1
  endpoint_url: {aws_endpoint}
  access_key_id: {AWS_KEY_ID}
  secret_access_key: {AWS_SECRET}
  rds_proxy: {{enabled: true, interval: 1s, logs: true}}
"""


def exercise(d) -> str:
    """Everything a user or a scraper can see, concatenated."""
    d.wait_for(lambda: d.value("pgpressure_source_up", source="activity", target="dsn-ok") == 1)
    d.wait_for(lambda: d.value("pgpressure_source_up", source="activity", target="file-ok") == 1)
    for target in ("dsn-wrong", "file-wrong"):
        d.wait_for(
            lambda t=target: (
                (d.value("pgpressure_source_errors_total", source="activity", target=t) or 0) >= 2
            )
        )
    d.wait_for(lambda: (d.value("pgpressure_source_errors_total", source="rds_proxy") or 0) >= 2)
    seen = [
        d.metrics_text(),
        d.get("/metrics", headers={"Accept": "application/openmetrics-text"}).text,
    ]
    for path in ("/", "/-/healthy", "/-/ready", "/api/v1/pinning-risk"):
        seen.append(d.get(path).text)
    # Pushes with a wrong or misplaced token, or a bad body: the answers never quote the
    # expected token. (An answer may quote what the caller itself sent; that is no leak.)
    for headers, body in [
        ({"Authorization": "Bearer wrong"}, b"{}"),
        ({"Authorization": f"Basic {INGEST_TOKEN}"}, b"{}"),
        ({"Authorization": f"Bearer {INGEST_TOKEN[:-1]}"}, b"{}"),
        ({"Authorization": f"Bearer {INGEST_TOKEN}"}, b'{"app": "x"'),
        ({"Authorization": f"Bearer {INGEST_TOKEN}"}, json.dumps({"version": 9}).encode()),
    ]:
        r = requests.post(d.url + "/api/v1/reports", data=body, headers=headers, timeout=5)
        assert 400 <= r.status_code < 500
        seen.append(r.text)
    return "\n".join(seen)


@pytest.mark.parametrize("log_format", ["logfmt", "json"])
def test_canaries_never_leak(pg, aws: EchoingAws, tmp_path: Path, log_format: str) -> None:
    with run_daemon(config(pg, tmp_path, aws.url), "--log.format", log_format) as d:
        visible = exercise(d)
        log = d.log()
    # The failures really happened, and were explained...
    assert "password authentication failed" in log
    assert "UnrecognizedClientException" in log
    assert "level=debug" in log or '"level": "debug"' in log  # debug logging was on
    assert aws.calls >= 2
    # ...without the secrets.
    assert_clean("the log", log)
    assert_clean("HTTP answers", visible)


def test_unreachable_aws_endpoint_with_credentials_in_its_url(pg, tmp_path: Path) -> None:
    """An endpoint URL carrying credentials (a proxy with basic auth) is masked too."""
    port = free_port()  # nothing listens there
    endpoint = f"http://{AWS_KEY_ID}:{quote(AWS_SECRET, safe='')}@127.0.0.1:{port}"
    cfg = f"""
databases: []
ingest: {{enabled: false}}
aws:
  endpoint_url: {endpoint}
  access_key_id: {AWS_KEY_ID}
  secret_access_key: {AWS_SECRET}
  rds_proxy: {{enabled: true, interval: 1s, proxies: [p1]}}
"""
    with run_daemon(cfg) as d:
        d.wait_for(
            lambda: (d.value("pgpressure_source_errors_total", source="rds_proxy") or 0) >= 1
        )
        visible = d.metrics_text() + d.get("/").text
        log = d.log()
    assert "source failed" in log
    assert_clean("the log", log)
    assert_clean("HTTP answers", visible)
    assert quote(AWS_SECRET, safe="") not in log + visible


def test_config_errors_do_not_echo_secrets(tmp_path: Path) -> None:
    cases = {
        "not a postgres URL": f"databases: [{{name: a, dsn: 'mysql://u:{INGEST_TOKEN}@h/db'}}]",
        "unknown key beside a password": (
            f"databases: [{{name: a, dsn: 'postgresql://u:{INGEST_TOKEN}@h/db', bogus: 1}}]"
        ),
        "bad type for a token": f"ingest: {{token: {INGEST_TOKEN}, stale_after: {INGEST_TOKEN}}}",
        "secret key with a bad neighbour": (
            f"aws: {{secret_access_key: {AWS_SECRET}, region: [1]}}"
        ),
        "unreadable password file": (
            f"databases: [{{name: a, dsn: 'postgresql://u:{INGEST_TOKEN}@h/db', "
            f"password_file: {tmp_path}/missing}}]"
        ),
    }
    for name, text in cases.items():
        path = tmp_path / "config.yaml"
        path.write_text(text)
        for command in (["check-config"], ["run"]):
            result = subprocess.run(
                [sys.executable, "-m", "exporter", *command, "--config.file", str(path)],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert result.returncode == 1, (name, result.stderr)
            assert result.stderr.strip(), name
            assert_clean(f"{name} ({command[0]})", result.stdout + result.stderr)
