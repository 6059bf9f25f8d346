"""The generated Grafana dashboards: up to date, well formed, and every query valid PromQL over
metrics the exporter or the recording rules produce."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from exporter.metrics import CATALOGUE
from tests.promql_tools import (
    DASHBOARDS,
    PROMETHEUS_BUILTINS,
    dashboard_files,
    exported_series_names,
    load_rules,
    metric_names,
    panel_queries,
    promtool_parse,
    recording_rule_names,
    variable_queries,
)

EXPECTED = {"overview", "app-pools", "database-load", "rds-proxy"}


def test_committed_json_equals_regeneration() -> None:
    result = subprocess.run(
        [sys.executable, str(DASHBOARDS / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-5000:]


def test_generate_writes_every_dashboard(tmp_path) -> None:
    subprocess.run(
        [sys.executable, str(DASHBOARDS / "generate.py"), "--out", str(tmp_path)],
        check=True,
        timeout=120,
    )
    assert {p.stem for p in tmp_path.glob("*.json")} == EXPECTED
    for path in tmp_path.glob("*.json"):
        assert path.read_text() == (DASHBOARDS / path.name).read_text()


def test_every_dashboard_is_present() -> None:
    assert {p.stem for p in dashboard_files()} == EXPECTED


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.stem)
def test_dashboard_structure(path) -> None:
    board = json.loads(path.read_text())
    assert board["uid"] == f"pgpressure-{path.stem}"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert {"datasource", "job", "target", "app", "proxy"} <= set(variables)
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        title = panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", title
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        assert len(panel.get("description", "")) > 40, f"{title}: describe how to read it"
        assert panel["targets"], f"{title}: no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", title
            assert 'job=~"$job"' in target["expr"], (
                f"{title}: query ignores the job variable: {target['expr']}"
            )
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, title


def test_dashboard_queries_filter_by_their_variable() -> None:
    """Queries on app metrics honour $app, on PostgreSQL metrics $target, on proxies $proxy."""
    for q in panel_queries():
        for name in metric_names(q.concrete()):
            if name.startswith(("sqlalchemy_", "job_app_pool")):
                assert 'app=~"$app"' in q.expr, str(q)
            elif name.startswith(("pg_", "job_target")):
                assert 'target=~"$target"' in q.expr, str(q)
            elif name.startswith(("rds_proxy_", "job_proxy")):
                assert 'proxy=~"$proxy"' in q.expr, str(q)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool")
def test_every_query_parses_with_prometheus_parser() -> None:
    exprs = [q.concrete() for q in panel_queries()]
    exprs += [selector.replace("$job", ".*") for _, _, selector in variable_queries()]
    assert len(exprs) > 40
    promtool_parse(exprs)


def test_queries_reference_only_known_metrics() -> None:
    known = exported_series_names() | recording_rule_names() | PROMETHEUS_BUILTINS
    problems = []
    for q in panel_queries():
        unknown = metric_names(q.concrete()) - known
        if unknown:
            problems.append(f"{q}: {sorted(unknown)}")
    for board, var, selector in variable_queries():
        unknown = metric_names(selector.replace("$job", ".*")) - known
        if unknown:
            problems.append(f"{board} / variable {var}: {sorted(unknown)}")
    assert not problems, "\n".join(problems)


def test_dashboards_cover_the_catalogue() -> None:
    """Every exported metric appears on some dashboard (directly or via a recording rule)."""
    used: set[str] = set()
    for q in panel_queries():
        used |= metric_names(q.concrete())
    for group in load_rules()["groups"]:
        for rule in group["rules"]:
            if rule.get("record") in used:
                used |= metric_names(rule["expr"])
    base = {n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for n in used}
    # Exporter self-metrics are for the exporter's own dashboards/alerts, not these.
    ignored = {
        "pgpressure_build_info",
        "pgpressure_source_last_success_timestamp_seconds",
        "pgpressure_source_duration_seconds",
        "pgpressure_source_errors_total",
        "pgpressure_reports_total",
        "pgpressure_cloudwatch_metrics_requested_total",
        "pgpressure_http_connections_refused_total",
        "pg_activity_samples_total",
        "pg_stat_statements_available",
        "sqlalchemy_pool_size",
    }
    missing = set(CATALOGUE) - base - used - ignored
    assert not missing, sorted(missing)
