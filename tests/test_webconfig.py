"""--web.config.file: TLS and basic auth enforced on the real daemon, scraped by real Prometheus."""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from exporter.devtools.daemon_process import (
    free_port,
    logged_process,
    run_daemon,
    slowest_scrape_while,
)
from exporter.http.webconfig import WebConfigError, parse_web_config

PASSWORD = "scrape-s3cret-pw"
# Cost 12 (~0.2 s a check): slow enough that an uncached check per request would show.
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=12)).decode()
PROMETHEUS = "/usr/bin/prometheus"

CONFIG = """
databases: []
ingest: {enabled: false}
"""


# -- a test PKI ------------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


class Pki:
    """A CA, and leaf certificates it signs, written as PEM files in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("pgpressure test CA"))
            .issuer_name(_name("pgpressure test CA"))
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_file = root / "ca.crt"
        self.ca_file.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))

    def leaf(self, name: str, *, client: bool = False) -> tuple[Path, Path, int]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        sans: list[x509.GeneralName] = [x509.DNSName(name)]
        if not client:
            import ipaddress

            sans += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        cert_file, key_file = self.root / f"{name}.crt", self.root / f"{name}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_file, key)
        return cert_file, key_file, serial


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def https_daemon(web_yaml: str, root: Path, config: str = CONFIG):
    """run_daemon with a web config; waits for readiness over HTTPS itself."""
    web_file = root / f"web-{time.monotonic_ns()}.yml"
    web_file.write_text(web_yaml)
    return run_daemon(config, "--web.config.file", str(web_file), wait_ready=False)


def wait_https(daemon, pki: Pki, **kwargs) -> str:
    url = daemon.url.replace("http://", "https://")
    daemon.wait_for(
        lambda: (
            requests.get(
                url + "/-/healthy", verify=str(pki.ca_file), timeout=2, **kwargs
            ).status_code
            in (200, 401, 403)
        ),
        timeout=20,
    )
    return url


def peer_serial(port: int, ca_file: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


# -- parsing: errors name the key ------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tls_server_config: {cert_file: a.crt}", "tls_server_config.key_file: required"),
        ("tls_server_config: {key_file: a.key}", "tls_server_config.cert_file: required"),
        ("tls_server_config: {cert_file: a, key_file: b, min_version: TLS9}", "min_version"),
        (
            "tls_server_config: {cert_file: a, key_file: b, client_auth_type: Bogus}",
            "client_auth_type: invalid value 'Bogus'",
        ),
        (
            "tls_server_config: {cert_file: a, key_file: b, "
            "client_auth_type: RequireAndVerifyClientCert}",
            "client_ca_file: required",
        ),
        ("tls_server_config: {cert_file: a, key_file: b, certfile: c}", "certfile: unknown key"),
        ("basic_auth: {}", "basic_auth: unknown key"),
        ("basic_auth_users: {alice: plaintext-pw}", "basic_auth_users.alice: expected a bcrypt"),
        ("basic_auth_users: {alice: $2b$12$short}", "basic_auth_users.alice: invalid bcrypt"),
        (  # the right length, but cost 99 and a character outside bcrypt's alphabet
            "basic_auth_users: {alice: $2b$99$" + "a" * 52 + "!}",
            "basic_auth_users.alice: invalid bcrypt",
        ),
        ("http_server_config: {headers: {Server: x}}", "headers.Server: header not allowed"),
        ("tls_server_config: [1]", "tls_server_config: expected a mapping"),
    ],
)
def test_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(WebConfigError) as err:
        parse_web_config(text, "web.yml")
    assert message in str(err.value)
    assert "plaintext-pw" not in str(err.value)


def test_cli_refuses_unreadable_certificate_with_the_key_named(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(CONFIG)
    (tmp_path / "web.yml").write_text("tls_server_config: {cert_file: nope.crt, key_file: k}\n")
    result = subprocess.run(
        [
            "python",
            "-m",
            "exporter",
            "--config.file",
            str(tmp_path / "config.yaml"),
            "--web.config.file",
            str(tmp_path / "web.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "tls_server_config.cert_file: cannot read" in result.stderr
    assert str(tmp_path / "nope.crt") in result.stderr  # relative to the web config file


@pytest.mark.parametrize(
    ("web_yaml", "ingest", "warned"),
    [
        (f"basic_auth_users: {{prometheus: {HASH}}}", "{enabled: true}", True),
        (f"basic_auth_users: {{prometheus: {HASH}}}", "{enabled: true, token: t0ken-9c}", False),
        (f"basic_auth_users: {{prometheus: {HASH}}}", "{enabled: false}", False),
        ("http_server_config: {headers: {X-Frame-Options: deny}}", "{enabled: true}", False),
    ],
)
def test_basic_auth_with_an_ingest_endpoint_that_has_no_token_is_warned_about(
    tmp_path: Path, web_yaml: str, ingest: str, warned: bool
) -> None:
    """Basic auth does not cover POST /api/v1/reports: with it on and no ingest.token, the
    scrapes are protected but anyone who reaches the daemon can push, so it says so."""
    web_file = tmp_path / "web.yml"
    web_file.write_text(web_yaml + "\n")
    config = f"databases: []\ningest: {ingest}\n"
    with run_daemon(config, "--web.config.file", str(web_file), wait_ready=False) as d:
        d.wait_for(lambda: "msg=listening" in d.log())
        log = d.log()
    assert ("do not cover the ingest endpoint" in log) is warned


# -- TLS and basic auth on the real daemon ---------------------------------------------------
@pytest.fixture(scope="module")
def secured(pki: Pki):
    cert, key, serial = pki.leaf("server")
    web_yaml = f"""
tls_server_config:
  cert_file: {cert.name}
  key_file: {key.name}
http_server_config:
  headers: {{Strict-Transport-Security: max-age=31536000}}
basic_auth_users:
  prometheus: {HASH}
"""
    with https_daemon(web_yaml, pki.root) as d:
        d.https = wait_https(d, pki)
        d.serial = serial
        yield d


def test_plain_http_is_refused(secured) -> None:
    with pytest.raises(requests.ConnectionError):
        requests.get(secured.url + "/metrics", timeout=3, auth=("prometheus", PASSWORD))


def test_untrusted_certificate_is_rejected_by_clients(secured) -> None:
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(secured.https + "/metrics", timeout=3)


@pytest.mark.parametrize(
    "path", ["/metrics", "/", "/-/healthy", "/-/ready", "/api/v1/pinning-risk"]
)
def test_every_endpoint_needs_the_right_password(secured, pki: Pki, path: str) -> None:
    url, ca = secured.https + path, str(pki.ca_file)
    anonymous = requests.get(url, verify=ca, timeout=5)
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"].startswith("Basic ")
    for auth in [("prometheus", "wrong"), ("nobody", PASSWORD), ("prometheus", PASSWORD + "x")]:
        assert requests.get(url, verify=ca, timeout=5, auth=auth).status_code == 401
    garbled = requests.get(url, verify=ca, timeout=5, headers={"Authorization": "Basic !!!"})
    assert garbled.status_code == 401
    ok = requests.get(url, verify=ca, timeout=5, auth=("prometheus", PASSWORD))
    assert ok.status_code == 200
    assert ok.headers["Strict-Transport-Security"] == "max-age=31536000"
    if path == "/metrics":
        assert "pgpressure_build_info" in ok.text


def test_ingest_is_not_behind_basic_auth(secured, pki: Pki) -> None:
    """POST /api/v1/reports keeps its own bearer token: basic auth does not answer it."""
    response = requests.post(
        secured.https + "/api/v1/reports", data=b"{}", verify=str(pki.ca_file), timeout=5
    )
    assert response.status_code != 401  # ingest is disabled in this config: 404 from the handler
    assert "WWW-Authenticate" not in response.headers
    # Only POST is exempt: a GET on the same path is answered by basic auth first.
    get = requests.get(secured.https + "/api/v1/reports", verify=str(pki.ca_file), timeout=5)
    assert get.status_code == 401


def test_bcrypt_results_are_cached_and_guessing_does_not_stall_scrapes(secured, pki) -> None:
    ca = str(pki.ca_file)
    session = requests.Session()
    session.auth = ("prometheus", PASSWORD)
    session.get(secured.https + "/metrics", verify=ca, timeout=5).raise_for_status()
    single = time.perf_counter()
    bcrypt.checkpw(PASSWORD.encode(), HASH.encode())
    bcrypt_cost = time.perf_counter() - single
    started = time.perf_counter()
    for _ in range(20):
        assert session.get(secured.https + "/metrics", verify=ca, timeout=5).status_code == 200
    elapsed = time.perf_counter() - started
    print(f"bcrypt check {bcrypt_cost * 1000:.0f} ms; 20 cached scrapes {elapsed * 1000:.0f} ms")
    assert elapsed < 20 * bcrypt_cost / 2

    # 12 distinct wrong guesses at once (each a real bcrypt check): scrapes keep answering.
    def guess(i: int) -> None:
        with contextlib.suppress(requests.RequestException):
            requests.get(
                secured.https + "/metrics", verify=ca, timeout=30, auth=("prometheus", f"g{i}")
            )

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(12)]
    worst = slowest_scrape_while(
        threads, lambda: session.get(secured.https + "/metrics", verify=ca, timeout=5)
    )
    print(f"worst cached scrape while 12 guesses were checked: {worst * 1000:.0f} ms")
    assert worst < max(0.5, bcrypt_cost * 2)


def test_certificate_rotation_without_restart(pki: Pki) -> None:
    cert, key, first = pki.leaf("rotating")
    web_yaml = f"tls_server_config: {{cert_file: {cert}, key_file: {key}}}\n"
    with https_daemon(web_yaml, pki.root) as d:
        url = wait_https(d, pki)
        port = int(url.rsplit(":", 1)[1])
        assert peer_serial(port, pki.ca_file) == first
        # Rotate: a broken pair first (new cert, old key) must not take the listener down.
        staging_cert, staging_key, second = pki.leaf("rotating-next")
        cert.write_bytes(staging_cert.read_bytes())
        time.sleep(1.2)
        assert peer_serial(port, pki.ca_file) == first
        assert "web config not reloaded" in d.log()
        key.write_bytes(staging_key.read_bytes())
        d.wait_for(lambda: peer_serial(port, pki.ca_file) == second, timeout=10)
        assert "web config reloaded" in d.log()


@contextlib.contextmanager
def mtls_daemon(pki: Pki, server: str, client: str) -> Iterator[tuple[str, tuple[str, str]]]:
    """The daemon requiring client certificates signed by `pki` with the SAN `scraper`;
    yields its HTTPS URL and (cert, key) of a client certificate named `client`."""
    cert, key, _ = pki.leaf(server)
    client_cert, client_key, _ = pki.leaf(client, client=True)
    web_yaml = f"""
tls_server_config:
  cert_file: {cert}
  key_file: {key}
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: {pki.ca_file}
  client_allowed_sans: [scraper]
"""
    with https_daemon(web_yaml, pki.root) as d:
        client_files = (str(client_cert), str(client_key))
        yield wait_https(d, pki, cert=client_files), client_files


def test_client_certificates_required_and_verified(pki: Pki) -> None:
    other = Pki(Path(tempfile.mkdtemp(prefix="other-ca-")))
    rogue_cert, rogue_key, _ = other.leaf("scraper", client=True)
    with mtls_daemon(pki, "mtls-server", client="scraper") as (url, client):
        ok = requests.get(url + "/metrics", verify=str(pki.ca_file), cert=client, timeout=5)
        assert ok.status_code == 200
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(url + "/metrics", verify=str(pki.ca_file), timeout=5)
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(
                url + "/metrics",
                verify=str(pki.ca_file),
                cert=(str(rogue_cert), str(rogue_key)),
                timeout=5,
            )


def test_client_san_not_allowed_is_forbidden(pki: Pki) -> None:
    with mtls_daemon(pki, "san-server", client="intruder") as (url, client):
        response = requests.get(url + "/metrics", verify=str(pki.ca_file), cert=client, timeout=5)
        assert response.status_code == 403


# -- a real Prometheus scrapes it ------------------------------------------------------------
@pytest.mark.skipif(not Path(PROMETHEUS).exists(), reason="prometheus binary not installed")
def test_prometheus_scrapes_over_tls_with_basic_auth(secured, pki: Pki, tmp_path: Path) -> None:
    target = secured.https.removeprefix("https://")
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD)
    (tmp_path / "prometheus.yml").write_text(f"""
global: {{scrape_interval: 1s, scrape_timeout: 1s}}
scrape_configs:
  - job_name: pgpressure
    scheme: https
    tls_config: {{ca_file: {pki.ca_file}}}
    basic_auth: {{username: prometheus, password_file: {password_file}}}
    static_configs: [{{targets: ["{target}"]}}]
  - job_name: wrong-password
    scheme: https
    tls_config: {{ca_file: {pki.ca_file}}}
    basic_auth: {{username: prometheus, password: not-it}}
    static_configs: [{{targets: ["{target}"]}}]
  - job_name: plain-http
    static_configs: [{{targets: ["{target}"]}}]
""")
    port = free_port()
    cmd = [
        PROMETHEUS,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with logged_process(cmd, tmp_path / "prometheus.log", stop_timeout=10):
        deadline = time.monotonic() + 30
        health: dict[str, tuple[str, str]] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException, ValueError, KeyError):
                doc = requests.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=2).json()
                health = {
                    t["labels"]["job"]: (t["health"], t["lastError"])
                    for t in doc["data"]["activeTargets"]
                }
                if len(health) == 3 and all(h != "unknown" for h, _ in health.values()):
                    break
            time.sleep(0.3)
        assert health["pgpressure"] == ("up", ""), health
        assert health["wrong-password"][0] == "down" and "401" in health["wrong-password"][1]
        assert health["plain-http"][0] == "down", health
        # The samples really arrived.
        query = requests.get(
            f"http://127.0.0.1:{port}/api/v1/query",
            params={"query": 'pgpressure_build_info{job="pgpressure"}'},
            timeout=5,
        ).json()
        deadline = time.monotonic() + 10
        while not query["data"]["result"] and time.monotonic() < deadline:
            time.sleep(0.5)
            query = requests.get(
                f"http://127.0.0.1:{port}/api/v1/query",
                params={"query": 'pgpressure_build_info{job="pgpressure"}'},
                timeout=5,
            ).json()
        assert query["data"]["result"], query
