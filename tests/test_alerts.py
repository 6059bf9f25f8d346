"""The alert and recording rules and the Alertmanager example, checked with the real tools."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.promql_tools import (
    RULES,
    alert_rules,
    exported_series_names,
    load_rules,
    metric_names,
    recording_rule_names,
    shortened_rules,
)

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "alerts"
RUNBOOKS = ROOT / "docs" / "runbooks.md"

# CONTRACT.md: alert -> severity.
# (alert, severity): an alert may come as a warning/critical pair under one name.
CONTRACT_ALERTS = {
    ("SQLAlchemyPoolExhausted", "critical"),
    ("SQLAlchemyPoolCheckoutTimeouts", "warning"),
    ("SQLAlchemyPoolCheckoutTimeouts", "critical"),
    ("SQLAlchemyPoolWaitHigh", "warning"),
    ("SQLAlchemyQueryLatencyHigh", "warning"),
    ("SQLAlchemyAppStoppedReporting", "warning"),
    ("PostgresLoadAboveVCPUs", "warning"),
    ("PostgresLockContention", "warning"),
    ("PostgresTempSpillHigh", "warning"),
    ("PostgresIdleInTransaction", "warning"),
    ("PostgresConnectionsNearMax", "warning"),
    ("RDSProxySessionPinningHigh", "warning"),
    ("RDSProxyBorrowLatencyHigh", "warning"),
    ("PgPressureSourceDown", "warning"),
    ("PgPressureExporterDown", "critical"),
    ("PgPressureExporterAbsent", "warning"),
    ("PgPressureConfigReloadFailed", "warning"),
    ("PgPressureDiagnosis", "warning"),
    ("PgPressureDiagnosis", "critical"),
}
CONTRACT_NAMES = {name for name, _ in CONTRACT_ALERTS}
# Series that Prometheus itself makes, which the rules may use beside ours.
PROMETHEUS_SERIES = {"up"}

# Labels that identify what an alert is about; its description must name them.
IDENTIFYING = {"app", "pool", "target", "datname", "proxy", "source"}

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool")
needs_amtool = pytest.mark.skipif(shutil.which("amtool") is None, reason="needs amtool")


def run(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout}{result.stderr}"
    return result


@needs_promtool
def test_promtool_check_rules() -> None:
    out = run("promtool", "check", "rules", str(RULES)).stdout
    assert "SUCCESS" in out


@needs_promtool
def test_promtool_unit_tests() -> None:
    run("promtool", "test", "rules", "pgpressure.test.yml", cwd=ALERTS)


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    tests = yaml.safe_load((ALERTS / "pgpressure.test.yml").read_text())
    fires: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for t in case.get("alert_rule_test", []):
            (fires if t.get("exp_alerts") else silent).add(t["alertname"])
    assert fires >= CONTRACT_NAMES, sorted(CONTRACT_NAMES - fires)
    assert silent >= CONTRACT_NAMES, sorted(CONTRACT_NAMES - silent)


def test_contract_alerts_with_exact_names_and_severities() -> None:
    got = {(r["alert"], r["labels"]["severity"]) for r in alert_rules()}
    assert got == CONTRACT_ALERTS


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_annotations(rule: dict) -> None:
    annotations = rule["annotations"]
    assert set(annotations) >= {"summary", "description", "runbook_url"}
    # The description names what the alert is about through its labels.
    used = set(re.findall(r"\$labels\.(\w+)", annotations["description"]))
    by = re.findall(r"by \(([^)]*)\)", rule["expr"])
    kept = {label.strip() for group in by for label in group.split(",")} & IDENTIFYING
    assert kept <= used, f"description does not mention {kept - used}"
    # absent() has no labels to name: it fires on the lack of any series.
    assert used or rule["expr"].startswith("absent("), "description not templated with labels"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    for heading in re.findall(r"^#+\s+(.+)$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_runbook_section_exists(rule: dict) -> None:
    url = rule["annotations"]["runbook_url"]
    path, _, anchor = url.partition("#")
    assert path.endswith("docs/runbooks.md")
    assert anchor == rule["alert"].lower()
    assert anchor in _anchors(RUNBOOKS.read_text()), f"no section for {rule['alert']}"


def test_rules_reference_only_exported_metrics_or_recording_rules() -> None:
    rules = load_rules()
    known = exported_series_names() | recording_rule_names(rules) | PROMETHEUS_SERIES
    for group in rules["groups"]:
        for rule in group["rules"]:
            unknown = metric_names(rule["expr"]) - known
            assert not unknown, f"{rule.get('alert') or rule.get('record')}: {unknown}"


def test_recording_rules_follow_level_metric_operations() -> None:
    for name in recording_rule_names():
        assert re.fullmatch(r"[a-z_]+:[a-z_0-9]+:[a-z_0-9]+", name), name


def test_shortened_rules_scale_for_and_windows() -> None:
    short = shortened_rules(thresholds={"PostgresIdleInTransaction": ("> 300", "> 5")})
    alerts = {r["alert"]: r for r in alert_rules(short)}
    assert alerts["SQLAlchemyPoolExhausted"]["for"] == "2s"
    assert alerts["PostgresLockContention"]["for"] == "5s"
    assert "> 5" in alerts["PostgresIdleInTransaction"]["expr"]
    records = {r["record"]: r for g in short["groups"] for r in g["rules"] if "record" in r}
    assert "[5s]" in records["job_app_pool:sqlalchemy_pool_timeouts:increase5m"]["expr"]
    with pytest.raises(AssertionError):
        shortened_rules(thresholds={"PostgresIdleInTransaction": ("> 999", "> 5")})


@needs_amtool
def test_alertmanager_example_config() -> None:
    out = run("amtool", "check-config", str(ALERTS / "alertmanager.example.yml")).stdout
    assert "SUCCESS" in out


@needs_amtool
@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=SQLAlchemyPoolExhausted", "severity=critical"], "pager"),
        (["alertname=SQLAlchemyPoolCheckoutTimeouts", "severity=critical"], "pager"),
        (["alertname=PostgresLockContention", "severity=warning"], "tickets"),
        (["alertname=PgPressureSourceDown", "severity=warning"], "tickets"),
    ],
)
def test_alertmanager_routes_critical_to_pager_and_warnings_to_tickets(
    labels: list[str], receiver: str
) -> None:
    out = run(
        "amtool",
        "config",
        "routes",
        "test",
        "--config.file",
        str(ALERTS / "alertmanager.example.yml"),
        *labels,
    ).stdout
    assert out.strip() == receiver
