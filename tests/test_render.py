"""The hand-written exposition writer against prometheus_client's own writers.

pgpressure writes the exposition text itself (exporter/core/render.py says why: about four
times faster than the library's writers at production scrape intervals). These tests hold
it to the library: for the same series, the text and OpenMetrics it writes must parse to
exactly what prometheus_client writes from metric families built by hand here, edge values
and hostile label values included, and `promtool check metrics` must accept it.
"""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics import exposition as openmetrics_exposition
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from exporter import metrics as m
from exporter.core.render import Renderer
from exporter.core.store import Store
from exporter.metrics import HistogramValue, Sample

HOSTILE = 'say "hi"\\ \n naïve {le="x"} # comment'
INF, NAN = math.inf, math.nan
HIST = HistogramValue(((0.005, 1.0), (0.1, 3.0), (2.5e6, 4.0), (INF, 5.0)), 0.75, 5.0)


def own_series() -> list[Sample]:
    return [Sample(m.BUILD_INFO, ("1.2.3",), 1.0)]


def store_with_edge_cases() -> Store:
    """Two targets sharing families, counters, ±Inf, NaN, big and tiny values, histograms."""
    store = Store()
    for target, sessions in (("a", NAN), ("b", 2.0)):
        store.publish(
            ("activity", target),
            [
                Sample(m.ACTIVITY_SAMPLES, (), 12345678901.0),
                Sample(m.SESSIONS, ("db", HOSTILE), sessions),
                Sample(m.SESSIONS, ("db", ""), 0.0),
                Sample(m.OLDEST_QUERY_SECONDS, ("db",), 1e-9),
            ],
            (("target", target),),
        )
    store.publish(
        ("apps", ""),
        [
            Sample(m.POOL_MAX_CONNECTIONS, ("shop", "default"), INF),
            Sample(m.POOL_MAX_CONNECTIONS, ("shop", "replica"), -INF),
            Sample(m.POOL_WAIT_SECONDS, ("shop", HOSTILE), HIST),
        ],
    )
    return store


def families_by_hand() -> list:
    """The same series as prometheus_client's custom collectors would build them."""
    build = GaugeMetricFamily("pgpressure_build_info", m.BUILD_INFO.help, labels=["version"])
    build.add_metric(["1.2.3"], 1.0)
    samples = CounterMetricFamily(
        "pg_activity_samples_total", m.ACTIVITY_SAMPLES.help, labels=["target"]
    )
    sessions = GaugeMetricFamily(
        "pg_sessions", m.SESSIONS.help, labels=("target", "datname", "state")
    )
    oldest = GaugeMetricFamily(
        "pg_oldest_query_seconds", m.OLDEST_QUERY_SECONDS.help, labels=("target", "datname")
    )
    for target, value in (("a", NAN), ("b", 2.0)):
        samples.add_metric([target], 12345678901.0)
        sessions.add_metric([target, "db", HOSTILE], value)
        sessions.add_metric([target, "db", ""], 0.0)
        oldest.add_metric([target, "db"], 1e-9)
    maximum = GaugeMetricFamily(
        "sqlalchemy_pool_max_connections", m.POOL_MAX_CONNECTIONS.help, labels=["app", "pool"]
    )
    maximum.add_metric(["shop", "default"], INF)
    maximum.add_metric(["shop", "replica"], -INF)
    wait = HistogramMetricFamily(
        "sqlalchemy_pool_wait_seconds", m.POOL_WAIT_SECONDS.help, labels=["app", "pool"]
    )
    wait.add_metric(
        ["shop", HOSTILE], [("0.005", 1.0), ("0.1", 3.0), ("2.5e+06", 4.0), ("+Inf", 5.0)], 0.75
    )
    return [build, samples, sessions, oldest, maximum, wait]


class _Registry:
    def collect(self) -> list:
        return families_by_hand()


def parsed(families) -> list[tuple]:
    """Every family with its type, HELP and samples; NaN compared by its repr. A bucket's
    `le` is compared as the number it is: from 1e6 up the library writes Go's `2.5e+06`
    where we write Python's `2500000.0`, the same bound (the client's largest is 60)."""

    def labels(s) -> list[tuple[str, object]]:
        return sorted((k, float(v) if k == "le" else v) for k, v in s.labels.items())

    return sorted(
        (
            f.name,
            f.type,
            f.documentation,
            sorted((s.name, labels(s), repr(s.value)) for s in f.samples),
        )
        for f in families
    )


def test_text_format_is_what_prometheus_client_writes():
    ours = Renderer(store_with_edge_cases(), own_series).render().decode()
    theirs = generate_latest(_Registry()).decode()
    assert parsed(text_string_to_metric_families(ours)) == parsed(
        text_string_to_metric_families(theirs)
    )


def test_openmetrics_is_what_prometheus_client_writes():
    ours = Renderer(store_with_edge_cases(), own_series).render(openmetrics=True).decode()
    theirs = openmetrics_exposition.generate_latest(_Registry()).decode()
    assert ours.endswith("\n# EOF\n") and ours.count("# EOF") == 1
    assert parsed(openmetrics_families(ours)) == parsed(openmetrics_families(theirs))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool")
def test_promtool_accepts_the_text_format():
    text = Renderer(store_with_edge_cases(), own_series).render()
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_replaced_snapshot_is_written_again_and_the_others_are_kept():
    store = store_with_edge_cases()
    renderer = Renderer(store, own_series)
    before = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(renderer.render().decode())
        for s in f.samples
    }
    store.keep_counters_only(("activity", "a"))  # a failed source: its gauges are dropped
    after = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(renderer.render().decode())
        for s in f.samples
    }
    gone = set(before) - set(after)
    assert gone == {
        ("pg_sessions", (("datname", "db"), ("state", HOSTILE), ("target", "a"))),
        ("pg_sessions", (("datname", "db"), ("state", ""), ("target", "a"))),
        ("pg_oldest_query_seconds", (("datname", "db"), ("target", "a"))),
    }
    assert not set(after) - set(before)
    assert after[("pg_activity_samples_total", (("target", "a"),))] == 12345678901.0


def test_text_reused_from_the_last_render_follows_new_values_series_and_bounds():
    """A source's next snapshot has mostly the same series: their label text is reused. The
    result must be what a renderer that never saw the source writes, whatever changed."""
    store = store_with_edge_cases()
    renderer = Renderer(store, own_series)
    renderer.render()
    other_bounds = HistogramValue(((0.5, 1.0), (INF, 4.0)), 2.0, 4.0)
    store.publish(
        ("apps", ""),
        [
            Sample(m.POOL_MAX_CONNECTIONS, ("shop", "default"), 7.0),  # a new value
            Sample(m.POOL_MAX_CONNECTIONS, ("shop", "new"), 1.0),  # a new series
            Sample(m.POOL_WAIT_SECONDS, ("shop", HOSTILE), other_bounds),  # other buckets
        ],
    )
    store.forget(("activity", "b"))  # a source that is gone
    again = renderer.render(openmetrics=True)
    assert again == Renderer(store, own_series).render(openmetrics=True)
    assert b'le="0.5"' in again and b'pool="new"' in again and b'target="b"' not in again
