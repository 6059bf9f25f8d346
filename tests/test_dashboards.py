"""The generated Grafana dashboards: up to date, well formed, every query valid PromQL over
metrics the exporter or the recording rules produce, and fit for a fleet: the import dialog asks
for the Prometheus, every line says which app, pool, database or proxy it is, capacity is drawn
per database instead of summed over them, and rare events are counts, not per-second rates."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import promql_parser
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
    substitute,
    variable_queries,
)

EXPECTED = {"overview", "app-pools", "database-load", "rds-proxy"}

# The import dialog's data source input; a datasource variable of the same name resolves it in
# provisioned files, which Grafana does not run through the import's substitution.
INPUT = "DS_PROMETHEUS"
DS_REF = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# The first Grafana release whose dashboards carry each schemaVersion we generate (v41 came with
# the removal of timepicker.time_options, grafana/grafana#100135, released in 11.6.0).
FIRST_GRAFANA = {41: "11.6.0"}
# Capacity of one PostgreSQL server: adding it up over servers means nothing.
PG_CAPACITY = {"pg_vcpus", "pg_max_connections", "job_target:pg_vcpus:max"}
CAPACITY = PG_CAPACITY | {
    "sqlalchemy_pool_max_connections",
    "rds_proxy_max_database_connections_allowed",
    "aws_rds_serverless_min_capacity_acus",
    "aws_rds_serverless_max_capacity_acus",
}
# Events rare enough that a per-second rate reads as 0.0033 instead of "1".
RARE_EVENTS = {"sqlalchemy_pool_timeouts_total", "rds_proxy_pinning_events_total"}


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
    assert {INPUT, "job", "target", "app", "proxy"} <= set(variables)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        title = panel["title"]
        assert panel["datasource"] == DS_REF, title
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{title}: no unit"
        assert len(panel.get("description", "")) > 40, f"{title}: describe how to read it"
        assert panel["targets"], f"{title}: no query"
        for target in panel["targets"]:
            assert target["datasource"] == DS_REF, title
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
        "pgpressure_http_header_timeouts_total",
        "pg_activity_samples_total",
        "pg_stat_statements_available",
        "sqlalchemy_pool_size",
        # the exporter's own health and limits, and what only the diagnosis reads
        "pg_invalid_utf8_strings_total",
        "pg_reserved_connections",
        "pgpressure_ingest_sum_resets_total",
        "pgpressure_ingest_memory_bytes",
        "pgpressure_ingest_memory_budget_bytes",
        "pgpressure_config_last_reload_successful",
        "pgpressure_config_last_reload_success_timestamp_seconds",
    }
    missing = set(CATALOGUE) - base - used - ignored
    assert not missing, sorted(missing)


# --- fit for a fleet -------------------------------------------------------------------------
def boards() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in dashboard_files()}


def panels_with_repeat(board: dict) -> list[tuple[dict, str | None]]:
    """Each panel with the variable it is repeated over, its own or its row's."""
    out, row_repeat = [], None
    for panel in board["panels"]:
        if panel["type"] == "row":
            row_repeat = panel.get("repeat")
            continue
        out.append((panel, panel.get("repeat") or row_repeat))
    return out


def timeseries_panels() -> list[tuple[str, dict, str | None]]:
    return [
        (name, panel, repeat)
        for name, board in boards().items()
        for panel, repeat in panels_with_repeat(board)
        if panel["type"] == "timeseries"
    ]


def ast(expr: str):
    return promql_parser.parse(substitute(expr))


def nodes(node):
    """Every node of a PromQL AST."""
    yield node
    children = []
    if isinstance(node, promql_parser.BinaryExpr):
        children = [node.lhs, node.rhs]
    elif isinstance(node, promql_parser.AggregateExpr):
        children = [node.expr] + ([node.param] if node.param is not None else [])
    elif isinstance(node, promql_parser.Call):
        children = list(node.args)
    elif isinstance(node, promql_parser.MatrixSelector):
        children = [node.vector_selector]
    elif isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr):
        children = [node.expr]
    for child in children:
        yield from nodes(child)


def series_labels(node) -> set[str] | None:
    """The labels that tell a query's series apart; None when they are those of raw series."""
    if isinstance(node, promql_parser.AggregateExpr):
        if str(node.op) in ("topk", "bottomk"):
            return series_labels(node.expr)
        if node.modifier is None:
            return set()
        if node.modifier.type == promql_parser.AggModifierType.By:
            return set(node.modifier.labels)
        return None
    if isinstance(node, promql_parser.Call):
        if node.func.name == "histogram_quantile":
            labels = series_labels(node.args[1])
            return None if labels is None else labels - {"le"}
        return series_labels(node.args[0]) if node.args else set()
    if isinstance(node, promql_parser.BinaryExpr):
        if isinstance(node.lhs, promql_parser.NumberLiteral):
            return series_labels(node.rhs)
        return series_labels(node.lhs)
    if isinstance(node, promql_parser.ParenExpr):
        return series_labels(node.expr)
    return None


def grafana_regex_matches(pattern: str, name: str) -> bool:
    """Grafana's byRegexp matcher: /re/ searches, a bare pattern must match the whole name."""
    if pattern.startswith("/") and pattern.endswith("/"):
        return re.search(pattern[1:-1], name) is not None
    return re.fullmatch(pattern, name) is not None


def dashed_matchers(panel: dict) -> list[dict]:
    return [
        o["matcher"]
        for o in panel["fieldConfig"].get("overrides", [])
        if any(p["id"] == "custom.lineStyle" for p in o["properties"])
    ]


def matches(matcher: dict, legend: str) -> bool:
    """Whether an override matcher applies to the series a legend names (labels filled in)."""
    name = re.sub(r"\{\{\s*(\w+)\s*\}\}", r"\1-value", legend)
    if matcher["id"] == "byName":
        return matcher["options"] == name
    return matcher["id"] == "byRegexp" and grafana_regex_matches(matcher["options"], name)


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.stem)
def test_import_asks_for_the_prometheus_data_source(path) -> None:
    """`__inputs` makes the import dialog ask for a Prometheus, and every data source in the
    dashboard is that input; a datasource variable of the same name resolves it when the file
    is provisioned instead of imported."""
    text = path.read_text()
    board = json.loads(text)
    inputs = [(i["name"], i["type"], i["pluginId"]) for i in board.get("__inputs", [])]
    assert inputs == [(INPUT, "datasource", "prometheus")]
    assert set(re.findall(r"\$\{(DS_\w+)\}", text)) == {INPUT}
    requires = {(r["type"], r["id"]): r for r in board["__requires"]}
    assert requires[("grafana", "grafana")]["version"] == FIRST_GRAFANA[board["schemaVersion"]]
    assert ("datasource", "prometheus") in requires
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert ("panel", panel["type"]) in requires, panel["type"]
            assert panel["datasource"] == DS_REF, panel["title"]
            assert all(t["datasource"] == DS_REF for t in panel["targets"]), panel["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables[INPUT]["type"] == "datasource"
    assert variables[INPUT]["query"] == "prometheus"
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == DS_REF, var["name"]


def test_readme_states_the_minimum_grafana() -> None:
    """schemaVersion is what Grafana reads first; the README says which release reads ours."""
    readme = (DASHBOARDS / "README.md").read_text()
    for name, board in boards().items():
        version = FIRST_GRAFANA[board["schemaVersion"]]
        major_minor = ".".join(version.split(".")[:2])
        assert f"Grafana {major_minor}" in readme, name
        assert f"schemaVersion {board['schemaVersion']}" in readme, name


def test_legends_name_their_series() -> None:
    """Each line of a time series says which app/pool, database or proxy it is: the legend
    names every label the query keeps, and no query folds the whole selection into one line."""
    problems = []
    for name, panel, _ in timeseries_panels():
        for target in panel["targets"]:
            legend, labels = target["legendFormat"], series_labels(ast(target["expr"]))
            where = f"{name} / {panel['title']} / {target['refId']} ({legend!r})"
            if "{{" not in legend:
                problems.append(f"{where}: the legend names no label")
            if labels == set():
                problems.append(f"{where}: adds up the whole selection into one line")
            missing = sorted(lbl for lbl in labels or () if f"{{{{{lbl}}}}}" not in legend)
            if missing:
                problems.append(f"{where}: legend lacks {missing}")
    assert not problems, "\n".join(problems)


def test_database_capacity_is_never_added_up_over_targets() -> None:
    """vCPUs and max_connections are per server: with target=All two servers of 2 vCPUs are
    two lines of 2, not one of 4."""
    problems = []
    for q in panel_queries():
        for node in nodes(ast(q.expr)):
            if not isinstance(node, promql_parser.AggregateExpr):
                continue
            if not metric_names(str(node.expr)) & PG_CAPACITY:
                continue
            by = node.modifier
            if (
                by is None
                or by.type != promql_parser.AggModifierType.By
                or "target" not in by.labels
            ):
                problems.append(f"{q}: {node}")
    assert not problems, "\n".join(problems)


def test_capacity_lines_are_drawn_against_load_of_the_same_entity() -> None:
    """Every capacity query is drawn as the dashed line, and each line is read against the
    load of its own database: a stack of load shows one target (the panel or its row repeats
    per target), and unstacked load next to per-target capacity is itself per target."""
    problems, seen = [], 0
    for name, panel, repeat in timeseries_panels():
        where = f"{name} / {panel['title']}"
        dashed = dashed_matchers(panel)
        capacity, load = [], []
        for t in panel["targets"]:
            (capacity if metric_names(substitute(t["expr"])) & CAPACITY else load).append(t)
        seen += len(capacity)
        for t in capacity:
            if not any(matches(m, t["legendFormat"]) for m in dashed):
                problems.append(f"{where}: {t['legendFormat']!r} is not drawn as a dashed line")
        for m in dashed:
            if not any(matches(m, t["legendFormat"]) for t in capacity):
                problems.append(f"{where}: dashed line {m} matches no capacity query")
        pg = any(metric_names(substitute(t["expr"])) & PG_CAPACITY for t in capacity)
        stacked = panel["fieldConfig"]["defaults"]["custom"].get("stacking", {}).get("mode")
        if capacity and stacked == "normal" and not (pg and repeat == "target"):
            problems.append(f"{where}: load of several entities stacked against one capacity")
        if pg and repeat != "target":
            for t in load:
                if "target" not in (series_labels(ast(t["expr"])) or set()):
                    problems.append(f"{where}: {t['refId']} is not per target")
    assert seen >= 4, "expected the vCPU, max_connections, pool max and proxy max lines"
    assert not problems, "\n".join(problems)


def test_rare_events_are_counts() -> None:
    """Checkout timeouts and pinning events are drawn as how many happened (increase, bars),
    not as a per-second rate that reads 0.0033 for one timeout a five minutes."""
    found, problems = set(), []
    for name, board in boards().items():
        for panel, _ in panels_with_repeat(board):
            for t in panel["targets"]:
                for node in nodes(ast(t["expr"])):
                    if not isinstance(node, promql_parser.Call):
                        continue
                    rare = {
                        a.vector_selector.name
                        for a in node.args
                        if isinstance(a, promql_parser.MatrixSelector)
                    } & RARE_EVENTS
                    if not rare:
                        continue
                    found |= rare
                    where = f"{name} / {panel['title']}: {t['expr']}"
                    if node.func.name != "increase":
                        problems.append(f"{where}: {node.func.name}, not increase")
                    unit = panel["fieldConfig"]["defaults"]["unit"]
                    if unit == "ops" or unit.endswith("ps"):
                        problems.append(f"{where}: unit {unit} is per second")
                    custom = panel["fieldConfig"]["defaults"].get("custom", {})
                    if panel["type"] == "timeseries" and custom.get("drawStyle") != "bars":
                        problems.append(f"{where}: counts per interval are drawn as bars")
    assert found == RARE_EVENTS
    assert not problems, "\n".join(problems)
