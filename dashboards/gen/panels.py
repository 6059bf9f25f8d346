"""Panel builders (grafana-foundation-sdk) with the conventions every pgpressure panel
follows: the data source the import dialog asks for, a unit, a description, a table legend,
and capacity lines drawn dashed and unstacked so load can be read against them."""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as pb
from grafana_foundation_sdk.builders import stat as statb
from grafana_foundation_sdk.builders import table as tableb
from grafana_foundation_sdk.builders import timeseries as tsb
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from .queries import Q

# The import dialog replaces ${DS_PROMETHEUS} with the Prometheus chosen there (`__inputs`);
# in a provisioned file the datasource variable of the same name resolves it (board.py).
DS_INPUT = "DS_PROMETHEUS"
DS = dm.DataSourceRef(type_val="prometheus", uid=f"${{{DS_INPUT}}}")
Steps = list[tuple[float | None, str]]
GREEN: Steps = [(None, "green")]


def _target(q: Q, ref: str, table: bool = False) -> pb.Dataquery:
    t = pb.Dataquery().expr(q.expr).legend_format(q.legend).ref_id(ref).datasource(DS)
    if q.instant:
        t = t.instant()
        if table:
            t = t.format(PromQueryFormat.TABLE)
    else:
        t = t.range()
    return t


def _targets(panel, queries: list[Q], table: bool = False):
    for i, q in enumerate(queries):
        panel = panel.with_target(_target(q, chr(ord("A") + i), table))
    return panel


def _thresholds(steps: Steps) -> db.ThresholdsConfig:
    return (
        db.ThresholdsConfig()
        .mode(dm.ThresholdsMode.ABSOLUTE)
        .steps([dm.Threshold(value=v, color=c) for v, c in steps])
    )


def _capacity_line() -> list[dm.DynamicConfigValue]:
    """A dashed red line outside any stack: the limit the other series are read against."""
    return [
        dm.DynamicConfigValue(id_val="custom.stacking", value={"mode": "none", "group": "A"}),
        dm.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
        dm.DynamicConfigValue(id_val="custom.lineWidth", value=2),
        dm.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}),
        dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": "red"}),
    ]


def _frame(panel, title: str, description: str, unit: str, w: int, h: int):
    """What every panel has: title, the description behind its (i), data source, unit, size."""
    return panel.title(title).description(description).datasource(DS).unit(unit).span(w).height(h)


def _timeseries_base(title: str, description: str, unit: str, w: int, h: int) -> tsb.Panel:
    return (
        _frame(tsb.Panel(), title, description, unit, w, h)
        .line_width(1)
        .show_points(cm.VisibilityMode.NEVER)
        .legend(
            cb.VizLegendOptions()
            .display_mode(cm.LegendDisplayMode.TABLE)
            .placement(cm.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["mean", "max", "lastNotNull"])
        )
        .tooltip(
            cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)
        )
    )


def timeseries(
    title: str,
    description: str,
    unit: str,
    queries: list[Q],
    *,
    w: int = 12,
    h: int = 8,
    stack: bool = False,
    lines: tuple[str, ...] = (),
    min0: bool = True,
    bars: bool = False,
) -> tsb.Panel:
    """A time series; series whose legend ends with one of `lines` (" max", " vCPUs") are
    drawn as dashed, unstacked capacity lines: one per app, database or proxy, each legend
    naming whose capacity it is."""
    p = _timeseries_base(title, description, unit, w, h).fill_opacity(35 if stack else 10)
    if min0:
        p = p.min(0)
    if stack:
        p = p.stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL))
    if bars:
        p = p.draw_style(cm.GraphDrawStyle.BARS)
    for suffix in lines:
        p = p.override_by_regexp(f"/ {suffix}$/", _capacity_line())
    return _targets(p, queries)


def stat(
    title: str,
    description: str,
    unit: str,
    query: Q,
    *,
    thresholds: Steps = GREEN,
    w: int = 4,
    h: int = 4,
    decimals: int | None = None,
    no_value: str = "0",
) -> statb.Panel:
    """A single number with a sparkline, coloured by `thresholds`."""
    p = (
        _frame(statb.Panel(), title, description, unit, w, h)
        .thresholds(_thresholds(thresholds))
        .color_mode(cm.BigValueColorMode.BACKGROUND)
        .graph_mode(cm.BigValueGraphMode.AREA)
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .no_value(no_value)
    )
    if decimals is not None:
        p = p.decimals(decimals)
    return _targets(p, [Q(query.expr, query.legend, instant=False)])


def table(
    title: str, description: str, unit: str, queries: list[Q], *, w: int = 12, h: int = 8
) -> tableb.Panel:
    """Instant queries as one table, largest value first."""
    p = (
        _frame(tableb.Panel(), title, description, unit, w, h)
        .with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(
            dm.DataTransformerConfig(id_val="organize", options={"excludeByName": {"Time": True}})
        )
        .sort_by([cb.TableSortByFieldState().display_name("Value").desc(True)])
    )
    return _targets(p, queries, table=True)


def row(title: str, repeat: str | None = None) -> db.Row:
    """A row; with `repeat`, the row and its panels are drawn once per value of that variable
    (every selected database), so each copy shows one of them."""
    r = db.Row(title)
    return r.repeat(repeat) if repeat else r
