"""PromQL building blocks shared by every dashboard: label selectors that honour the dashboard
variables, and the few query shapes (rates, increases, histogram quantiles) the panels repeat.

Keeping them here means a selector or a quantile is written once, so every panel of every
dashboard filters the same way (tests/test_dashboards.py checks that)."""

from __future__ import annotations

from dataclasses import dataclass

# Label selectors shared by every query of a kind.
APP = 'job=~"$job", app=~"$app"'
PG = 'job=~"$job", target=~"$target"'
PROXY = 'job=~"$job", proxy=~"$proxy"'
RI = "$__rate_interval"


@dataclass(frozen=True)
class Q:
    """One query: PromQL, legend, and whether it is an instant query (stats, tables)."""

    expr: str
    legend: str = "__auto"
    instant: bool = False


def sum_rate(by: str, metric: str, sel: str, fn: str = "rate", window: str = RI) -> str:
    """sum by (<by>) (<fn>(<metric>{<sel>}[<window>]))"""
    return f"sum by ({by}) ({fn}({metric}{{{sel}}}[{window}]))"


def hq(q: float, metric: str, sel: str, by: str = "app, pool") -> str:
    """The q-quantile of a histogram, per `by` group."""
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{sel}}}[{RI}])))"


def quantiles(metric: str, by: str = "app, pool") -> list[Q]:
    """p50, p95 and p99 of an app histogram, one series per pool."""
    return [
        Q(hq(q, metric, APP, by), f"{{{{app}}}}/{{{{pool}}}} p{int(q * 100)}")
        for q in (0.5, 0.95, 0.99)
    ]


def by_proxy(metric: str) -> str:
    """The proxy-wide value of a CloudWatch metric.

    CloudWatch publishes a metric per proxy and per target group/target; max() over them is
    the proxy-wide value and never double counts."""
    return f"max by (proxy) ({metric}{{{PROXY}}})"
