"""A dashboard around its panels: the variables every pgpressure dashboard shares, the links
between the dashboards and to the runbooks, panel ids, and the JSON Grafana imports with what
the import dialog needs (`__inputs`, `__requires`)."""

from __future__ import annotations

import json

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm

from .panels import DS, DS_INPUT

RUNBOOKS = "https://github.com/pgpressure/pgpressure/blob/main/docs/runbooks.md"
# The first Grafana release that reads the schemaVersion the SDK writes (41: Grafana 11.6.0,
# which removed timepicker.time_options); dashboards/README.md says so too.
MIN_GRAFANA = "11.6.0"
PANEL_NAMES = {"timeseries": "Time series", "stat": "Stat", "table": "Table"}

# name, label, label_values() query, description; multi-value with "All" = `.*`, so every
# query can filter with =~"$name".
QUERY_VARIABLES = [
    (
        "job",
        "Job",
        "label_values(pgpressure_build_info, job)",
        "The Prometheus job(s) scraping pgpressure.",
    ),
    (
        "target",
        "Database",
        'label_values(pgpressure_source_up{job=~"$job"}, target)',
        "PostgreSQL targets (databases[].name in the pgpressure config).",
    ),
    (
        "app",
        "App",
        'label_values(sqlalchemy_pool_size{job=~"$job"}, app)',
        "Instrumented applications (the `app` they report under).",
    ),
    (
        "proxy",
        "RDS Proxy",
        'label_values(rds_proxy_database_connections{job=~"$job"}, proxy)',
        "RDS Proxies read from CloudWatch.",
    ),
]


def _query_variable(name: str, label: str, query: str, description: str) -> db.QueryVariable:
    return (
        db.QueryVariable(name)
        .label(label)
        .description(description)
        .datasource(DS)
        .query(query)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(dm.VariableOption(selected=True, text="All", value="$__all"))
    )


def _variables(d: db.Dashboard) -> db.Dashboard:
    d = d.with_variable(
        db.DatasourceVariable(DS_INPUT)
        .label("Data source")
        .type("prometheus")
        .description(
            "The Prometheus that scrapes pgpressure. Imported through the dialog, the panels "
            "use the one chosen there; provisioned from files, the one picked here."
        )
    )
    for spec in QUERY_VARIABLES:
        d = d.with_variable(_query_variable(*spec))
    return d


def _links(d: db.Dashboard) -> db.Dashboard:
    return d.link(
        db.DashboardLink("pgpressure")
        .type(dm.DashboardLinkType.DASHBOARDS)
        .tags(["pgpressure"])
        .as_dropdown(True)
        .include_vars(True)
        .keep_time(True)
    ).link(
        db.DashboardLink("Runbooks")
        .type(dm.DashboardLinkType.LINK)
        .url(RUNBOOKS)
        .icon("doc")
        .target_blank(True)
    )


def dashboard(uid: str, title: str, description: str, items: list) -> dict:
    """The dashboard as the JSON model Grafana imports; panels get ids in order."""
    d = (
        db.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["pgpressure", "postgresql", "sqlalchemy"])
        .editable()
        .timezone("browser")
        .time("now-1h", "now")
        .refresh("30s")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
    )
    d = _variables(_links(d))
    for next_id, item in enumerate(items, start=1):
        item = item.id(next_id)
        d = d.with_row(item) if isinstance(item, db.Row) else d.with_panel(item)
    return _importable(json.loads(json.dumps(d.build(), cls=JSONEncoder)))


def _importable(board: dict) -> dict:
    """Add what Grafana's import dialog reads: `__inputs` makes it ask for a Prometheus and
    put its uid wherever ${DS_PROMETHEUS} stands; `__requires` lists the Grafana version and
    plugins the dashboard needs."""
    board["__inputs"] = [
        {
            "name": DS_INPUT,
            "label": "Prometheus",
            "description": "The Prometheus that scrapes pgpressure and has its recording rules.",
            "type": "datasource",
            "pluginId": "prometheus",
            "pluginName": "Prometheus",
        }
    ]
    panel_types = sorted({p["type"] for p in board["panels"]} - {"row"})
    board["__requires"] = [
        {"type": "grafana", "id": "grafana", "name": "Grafana", "version": MIN_GRAFANA},
        {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
    ] + [{"type": "panel", "id": t, "name": PANEL_NAMES[t], "version": ""} for t in panel_types]
    return board
