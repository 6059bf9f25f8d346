"""PromQL helpers shared by the alert, dashboard and end-to-end tests.

- the queries of the committed dashboards, with Grafana's variables substituted;
- parsing with Prometheus' own parser (`promtool check rules` on a generated rules file) and
  metric-name extraction with a real PromQL parser (promql-parser);
- the rules file with shortened `for:` and windows for the end-to-end test.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import promql_parser
import yaml

from exporter.metrics import CATALOGUE

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "alerts" / "pgpressure.rules.yml"
DASHBOARDS = ROOT / "dashboards"

# Series Prometheus itself produces that dashboards may use.
PROMETHEUS_BUILTINS = {"ALERTS", "ALERTS_FOR_STATE", "up"}


def load_rules(path: Path = RULES) -> dict:
    return yaml.safe_load(path.read_text())


def recording_rule_names(rules: dict | None = None) -> set[str]:
    rules = rules or load_rules()
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def alert_rules(rules: dict | None = None) -> list[dict]:
    rules = rules or load_rules()
    return [r for g in rules["groups"] for r in g["rules"] if "alert" in r]


def exported_series_names() -> set[str]:
    """Every series name the exporter can expose (histograms expand to their series)."""
    names: set[str] = set()
    for spec in CATALOGUE.values():
        if spec.kind == "histogram":
            names |= {f"{spec.name}_bucket", f"{spec.name}_sum", f"{spec.name}_count"}
        else:
            names.add(spec.name)
    return names


# --- dashboards -----------------------------------------------------------------------------
@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref: str
    expr: str  # as committed, with Grafana variables
    instant: bool

    def concrete(self, rate_interval: str = "1m", range_: str = "1h") -> str:
        return substitute(self.expr, rate_interval, range_)

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref}"


def substitute(expr: str, rate_interval: str = "1m", range_: str = "1h") -> str:
    """Replace Grafana's variables the way Grafana would with every variable on "All"."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)
    out = out.replace("$__range", range_)
    return re.sub(r"\$\{?(job|target|app|proxy|pool)\}?", ".*", out)


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def panel_queries() -> Iterator[PanelQuery]:
    for path in dashboard_files():
        board = json.loads(path.read_text())
        for panel in board.get("panels", []):
            for target in panel.get("targets", []):
                yield PanelQuery(
                    path.stem,
                    panel["title"],
                    target["refId"],
                    target["expr"],
                    bool(target.get("instant")) and not target.get("range"),
                )


def variable_queries() -> Iterator[tuple[str, str, str]]:
    """(dashboard, variable, PromQL series selector inside label_values())."""
    for path in dashboard_files():
        board = json.loads(path.read_text())
        for var in board["templating"]["list"]:
            if var["type"] != "query":
                continue
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"])
            assert m, f"{path.name}: variable {var['name']} is not label_values(selector, label)"
            yield path.stem, var["name"], m.group(1)


# --- parsing ------------------------------------------------------------------------------
def promtool_parse(exprs: list[str]) -> None:
    """Parse every expression with Prometheus' parser; raise with promtool's message."""
    rules = {
        "groups": [
            {
                "name": "parse",
                "rules": [{"record": f"parse:check:{i}", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump(rules, f, sort_keys=False)
    try:
        result = subprocess.run(
            ["promtool", "check", "rules", f.name], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise AssertionError(f"promtool rejected queries:\n{result.stdout}{result.stderr}")
    finally:
        Path(f.name).unlink()


def metric_names(expr: str) -> set[str]:
    """Names of all series selected by the expression (walks a real PromQL AST)."""
    names: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            for m in node.matchers.matchers:
                if m.name == "__name__":
                    names.add(m.value)
        elif isinstance(node, promql_parser.MatrixSelector):
            walk(node.vector_selector)
        elif isinstance(node, promql_parser.BinaryExpr):
            walk(node.lhs)
            walk(node.rhs)
        elif isinstance(node, promql_parser.AggregateExpr):
            walk(node.expr)
            if node.param is not None:
                walk(node.param)
        elif isinstance(node, promql_parser.Call):
            for arg in node.args:
                walk(arg)
        elif isinstance(
            node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)
        ):
            walk(node.expr)

    walk(promql_parser.parse(expr))
    return names


# --- shortened rules for the end-to-end test ----------------------------------------------------
_DURATION = re.compile(r"^(\d+)([smh])$")


def _scale_duration(value: str, factor: int) -> str:
    m = _DURATION.match(value)
    assert m, f"unexpected duration {value!r}"
    seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]
    return f"{max(1, seconds // factor)}s"


def shortened_rules(
    factor: int = 60,
    thresholds: dict[str, tuple[str, str]] | None = None,
    rules: dict | None = None,
) -> dict:
    """The real rules with every `for:` and range window divided by `factor` (5m -> 5s).

    `thresholds` maps an alert name to (old, new) text replaced in its expr, for thresholds
    that are durations themselves (idle in transaction > 300 s); each must match exactly once,
    so a change to the real rules breaks the end-to-end test loudly instead of silently.
    """
    rules = json.loads(json.dumps(rules or load_rules()))
    thresholds = dict(thresholds or {})
    window = re.compile(r"\[(\d+[smh])\]")
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["expr"] = window.sub(
                lambda m: f"[{_scale_duration(m.group(1), factor)}]", rule["expr"]
            )
            if "for" in rule:
                rule["for"] = _scale_duration(rule["for"], factor)
            name = rule.get("alert")
            if name in thresholds:
                old, new = thresholds.pop(name)
                assert rule["expr"].count(old) == 1, f"{name}: {old!r} not found once in expr"
                rule["expr"] = rule["expr"].replace(old, new)
    assert not thresholds, f"alerts not found in the rules: {sorted(thresholds)}"
    return rules
