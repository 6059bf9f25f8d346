"""A dashboard around its panels: the variables every pgpressure dashboard shares, the links
between the dashboards and to the runbooks, panel ids, and the JSON Grafana imports."""

from __future__ import annotations

import json

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm

from .panels import DS

RUNBOOKS = "https://github.com/pgpressure/pgpressure/blob/main/docs/runbooks.md"

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
        db.DatasourceVariable("datasource")
        .label("Data source")
        .type("prometheus")
        .description("The Prometheus that scrapes pgpressure.")
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
    return json.loads(json.dumps(d.build(), cls=JSONEncoder))
