"""The Kubernetes manifests as kustomize renders them: the single install, the fleet overlays
and the rules, each checked where it matters (selectors, secrets, names, the image, labels).

`kubectl kustomize` (Debian's kubectl) renders them, as `kubectl apply -k` would. The
Prometheus Operator CRD schemas are not vendored (they cannot be downloaded in the test
environment), so ServiceMonitor and PrometheusRule are checked against small JSON schemas of
the fields we use, strict about unknown keys; the built-in kinds with kubernetes-validate.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from exporter import __version__
from exporter.config import parse

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
GROUPS = ("orders", "payments")
CONFIG_PATH = "/etc/pgpressure/config.yaml"
SECRETS_PATH = "/run/secrets/pgpressure"


def render(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is missing: scripts/setup.sh installs it")
        pytest.skip("kubectl not installed (apt-get install kubectl)")
    result = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    (found,) = of_kind(docs, kind)
    return found


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


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


# --- the single install ------------------------------------------------------------------------
def test_builtin_kinds_validate_against_the_kubernetes_schema(tmp_path):
    tool = shutil.which("kubernetes-validate")
    if tool is None:
        pytest.skip("kubernetes-validate not installed")
    docs = [
        d
        for d in render(K8S)
        if d["apiVersion"].count("/") <= 1 and "coreos" not in d["apiVersion"]
    ]
    docs.append(yaml.safe_load((K8S / "base" / "secret.example.yaml").read_text()))
    files = []
    for n, doc in enumerate(docs):
        path = tmp_path / f"{n}-{doc['kind']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        files.append(str(path))
    result = subprocess.run([tool, "--strict", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(files), result.stdout


def test_servicemonitor_and_prometheusrule_match_their_schemas():
    docs = render(K8S)
    monitor, rule = one(docs, "ServiceMonitor"), one(docs, "PrometheusRule")
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    jsonschema.validate(rule, PROMETHEUS_RULE_SCHEMA)
    service = one(docs, "Service")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
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
    assert one(render(K8S / "rules"), "PrometheusRule")["spec"]["groups"] == source["groups"]


def test_deployment_wiring(monkeypatch):
    docs = render(K8S)
    deployment = one(docs, "Deployment")
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
    configmap = one(docs, "ConfigMap")
    secret = yaml.safe_load((K8S / "base" / "secret.example.yaml").read_text())
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert volumes["secrets"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert secret["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert mounts["config"] == str(Path(CONFIG_PATH).parent)

    # The region is set once, in the Deployment's environment; the configuration reads it.
    env = {e["name"]: e["value"] for e in container["env"]}
    monkeypatch.setenv("AWS_REGION", env["AWS_REGION"])
    config = parse(configmap["data"]["config.yaml"], "configmap.yaml")
    assert config.aws.region == env["AWS_REGION"]
    assert "${AWS_REGION}" in configmap["data"]["config.yaml"]
    # Every *_file the configuration names is a key of the Secret under its mount path.
    files = [d.password_file for d in config.databases if d.password_file]
    files += [config.ingest.token_file] if config.ingest.token_file else []
    assert files
    for path in files:
        assert str(path.parent) == mounts["secrets"], path
        assert path.name in secret["stringData"], path


def test_the_image_is_the_one_scripts_build():
    (container,) = one(render(K8S), "Deployment")["spec"]["template"]["spec"]["containers"]
    script = (ROOT / "scripts" / "build-image.sh").read_text()
    repository = container["image"].rpartition(":")[0]
    assert repository in script, f"{repository} is not what scripts/build-image.sh tags"
    assert container["image"] == f"{repository}:{__version__}"


def test_the_prometheus_release_label_is_set_in_one_place():
    places = [
        path.relative_to(K8S)
        for path in K8S.rglob("*.yaml")
        if re.search(r"^\s*release:", path.read_text(), re.M)
    ]
    assert places == [Path("components/prometheus-release/kustomization.yaml")], places
    for path in (K8S, K8S / "rules", *(K8S / "overlays" / g for g in GROUPS)):
        for doc in render(path):
            if doc["kind"] in ("ServiceMonitor", "PrometheusRule"):
                assert doc["metadata"]["labels"]["release"] == "prometheus", (path, doc["kind"])


# --- fleets: one exporter per group of databases -------------------------------------------------
def test_fleet_overlays_render_with_disjoint_selectors_secrets_and_configs(monkeypatch):
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    groups = {group: render(K8S / "overlays" / group) for group in GROUPS}
    everything = [doc for docs in groups.values() for doc in docs]
    pods = {g: one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
            for g, docs in groups.items()}  # fmt: skip
    services = of_kind(everything, "Service")
    for group, docs in groups.items():
        assert not of_kind(docs, "PrometheusRule"), "rules are applied once, not per group"
        deployment, service = one(docs, "Deployment"), one(docs, "Service")
        monitor, configmap = one(docs, "ServiceMonitor"), one(docs, "ConfigMap")
        assert deployment["metadata"]["name"] == f"pgpressure-{group}"
        assert selects(deployment["spec"]["selector"]["matchLabels"], pods[group])
        # Each Service selects its own group's pods and no other's ...
        chosen = [g for g, labels in pods.items() if selects(service["spec"]["selector"], labels)]
        assert chosen == [group], (group, chosen)
        # ... and each ServiceMonitor its own group's Service and no other's.
        selector = monitor["spec"]["selector"]["matchLabels"]
        scraped = [
            s["metadata"]["name"] for s in services if selects(selector, s["metadata"]["labels"])
        ]
        assert scraped == [f"pgpressure-{group}"], (group, scraped)
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["secrets"]["secret"]["secretName"] == f"pgpressure-{group}"
        assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
        config = parse(configmap["data"]["config.yaml"], f"overlays/{group}/config.yaml")
        assert [d.name for d in config.databases] == [f"{group}-db"]
        for path in [d.password_file for d in config.databases] + [config.ingest.token_file]:
            assert str(path.parent) == SECRETS_PATH, path
    names = [(d["kind"], d["metadata"]["name"]) for d in everything]
    assert len(names) == len(set(names)), "two groups' objects share a name"


def test_the_single_install_has_the_rules_once():
    docs = render(K8S)
    assert len(of_kind(docs, "PrometheusRule")) == 1
    assert len(of_kind(docs, "Deployment")) == 1
