"""The live window: the history answers as PromQL would, stays bounded, and the diagnosis
source turns it into findings, `pgpressure_finding` series and the findings JSON."""

from __future__ import annotations

import math

import pytest

from exporter import metrics as m
from exporter.config import DiagnosisConfig, parse
from exporter.core.store import Store
from exporter.diagnosis.engine import MIN_TICKS, DiagnosisSource
from exporter.diagnosis.history import History
from exporter.diagnosis.window import histogram_quantile
from exporter.metrics import HistogramValue, Sample

T0 = 1_700_000_000.0
POOL = ("orders", "default")


def tick(history: History, store: Store, i: int, step: float = 15.0) -> None:
    history.record(T0 + i * step, store)


def test_rate_folds_counter_resets_in_like_increase() -> None:
    history, store = History(window=60, step=15), Store()
    # 0, 30, 60, then the process restarts (5), then 35: growth 60 + 5 + 30 over 60 s.
    for i, value in enumerate((0.0, 30.0, 60.0, 5.0, 35.0)):
        store.publish(("apps", ""), [Sample(m.POOL_CHECKOUTS, POOL, value)])
        tick(history, store, i)
    assert history.rate(m.POOL_CHECKOUTS.name, ("app",)) == {("orders",): 95.0 / 60.0}


def test_a_counter_born_inside_the_window_counts_from_zero_over_the_whole_window() -> None:
    """As rate() over [60s]: a load counter that appears with the load, 15 s before the end,
    averages 30 growth over 60 s, not over the 15 s it existed."""
    history, store = History(window=60, step=15), Store()
    for i in range(5):
        samples = [Sample(m.POOL_CHECKOUTS, ("old", "p"), 100.0 + i)]
        if i >= 3:
            samples.append(Sample(m.POOL_CHECKOUTS, ("new", "p"), 15.0 * (i - 2)))
        store.publish(("apps", ""), samples)
        tick(history, store, i)
    rates = history.rate(m.POOL_CHECKOUTS.name, ("app",))
    assert rates == {("old",): 4 / 60, ("new",): 30 / 60}


def test_a_counter_that_appears_large_and_stays_flat_is_no_growth() -> None:
    """A lifetime total read once (temp bytes of a database when the daemon starts) is not a
    burst inside the window: rate() only extrapolates toward zero in proportion to growth."""
    history, store = History(window=60, step=15), Store()
    for i in range(5):
        samples = [Sample(m.TEMP_BYTES, ("appdb",), 0.0)]
        if i >= 2:
            samples.append(Sample(m.TEMP_BYTES, ("olddb",), 1.5e9))
        store.publish(("database", "main"), samples, (("target", "main"),))
        tick(history, store, i)
    assert history.rate(m.TEMP_BYTES.name, ("datname",)) == {("appdb",): 0.0, ("olddb",): 0.0}


def test_the_window_slides_and_a_series_without_points_in_it_is_dropped() -> None:
    history, store = History(window=30, step=15), Store()
    for i in range(3):
        store.publish(("apps", ""), [Sample(m.POOL_PENDING_REQUESTS, POOL, float(i))])
        tick(history, store, i)
    assert history.avg(m.POOL_PENDING_REQUESTS.name, ("app", "pool")) == {POOL: 1.0}
    store.publish(("apps", ""), [])
    for i in range(3, 6):
        tick(history, store, i)
    assert history.series == 0
    assert history.avg(m.POOL_PENDING_REQUESTS.name, ("app",)) == {}


def test_shares_quantiles_and_trends_over_the_window() -> None:
    history, store = History(window=60, step=15), Store()
    bounds = (0.01, 0.1, 1.0, math.inf)
    for i in range(5):
        used = 15.0 if i >= 2 else 5.0  # at its maximum for 3 of the 5 ticks
        waits = HistogramValue(
            tuple(zip(bounds, (0.0, 10.0 * i, 20.0 * i, 20.0 * i), strict=True)), i, 20.0 * i
        )
        store.publish(
            ("apps", ""),
            [
                Sample(m.POOL_CONNECTIONS, (*POOL, "used"), used),
                Sample(m.POOL_CONNECTIONS, (*POOL, "idle"), 15.0 - used),
                Sample(m.POOL_MAX_CONNECTIONS, POOL, 15.0),
                Sample(m.POOL_PENDING_REQUESTS, POOL, 4.0 if i == 4 else 0.0),
                Sample(m.POOL_WAIT_SECONDS, POOL, waits),
            ],
        )
        tick(history, store, i)
    by = ("app", "pool")
    used = (m.POOL_CONNECTIONS.name, (("state", "used"),))
    assert history.share_at_least(used, (m.POOL_MAX_CONNECTIONS.name, ()), by) == {POOL: 0.6}
    assert history.share_positive(m.POOL_PENDING_REQUESTS.name, by) == {POOL: 0.2}
    # 80 observations in the window, half under 0.1 s: the p95 is inside the (0.1, 1] bucket.
    expected = histogram_quantile(0.95, [(0.01, 0.0), (0.1, 40.0), (1.0, 80.0), (math.inf, 80.0)])
    assert history.quantile(0.95, m.POOL_WAIT_SECONDS.name, by) == {POOL: pytest.approx(expected)}
    assert history.trend(m.POOL_CONNECTIONS.name, by, used[1]) == {POOL: (5, 5, 15, 15, 15)}
    rates = history.trend(m.POOL_WAIT_SECONDS.name + "_count", by, counter=True)[POOL]
    assert math.isnan(rates[0]) and rates[1:] == pytest.approx((20 / 15,) * 4)


def test_the_history_is_bounded_by_max_series() -> None:
    history, store = History(window=60, step=15, max_series=100), Store()
    store.publish(
        ("apps", ""), [Sample(m.POOL_CHECKOUTS, (f"app{i}", "p"), 1.0) for i in range(250)]
    )
    for i in range(3):
        tick(history, store, i)
    assert history.series == 100
    assert history.dropped == 150 * 3
    assert history.nbytes() == 100 * history.points * 8  # one float per point per series


def test_histogram_quantile_matches_prometheus_edge_cases() -> None:
    assert histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None
    # in the +Inf bucket: the highest finite bound
    assert histogram_quantile(0.99, [(1.0, 1.0), (2.0, 1.0), (math.inf, 10.0)]) == 2.0
    # the first bucket starts at 0
    assert histogram_quantile(0.5, [(1.0, 10.0), (math.inf, 10.0)]) == 0.5


# --- the diagnosis source ----------------------------------------------------------------------
def saturated_store(store: Store, i: int) -> None:
    """A target with 2 vCPUs and 10 sessions on CPU, and one pool using it."""
    store.publish(
        ("activity", "main"),
        [
            Sample(m.ACTIVE_SESSION_SECONDS, ("appdb", "CPU", "CPU"), 150.0 * i),
            Sample(m.VCPUS, ("config",) * len(m.VCPUS.labels), 2.0),
            Sample(m.MAX_CONNECTIONS, (), 100.0),
            Sample(m.APPLICATION_SESSIONS, ("appdb", "orders"), 10.0),
        ],
        (("target", "main"),),
    )
    store.publish(("apps", ""), [Sample(m.POOL_MAX_CONNECTIONS, POOL, 120.0)])


def test_the_source_warms_up_then_exports_findings_and_their_json() -> None:
    store, clock = Store(), [T0]
    source = DiagnosisSource(DiagnosisConfig(interval=15, window=60), store, clock=lambda: clock[0])
    for i in range(MIN_TICKS - 1):
        saturated_store(store, i)
        assert source.evaluate() == []
        assert source.to_json()["status"] == "warming_up"
        clock[0] += 15
    saturated_store(store, MIN_TICKS - 1)
    samples = source.evaluate()
    rules_seen = {s.labels[0]: s for s in samples}
    assert set(rules_seen) == {"database_cpu_saturated", "pools_exceed_server"}
    cpu = rules_seen["database_cpu_saturated"]
    assert cpu.spec is m.FINDING and cpu.value == 1.0
    assert dict(zip(m.FINDING.labels, cpu.labels, strict=True)) == {
        "rule": "database_cpu_saturated",
        "severity": "critical",
        "target": "main",
        "datname": "",
        "app": "",
        "pool": "",
        "proxy": "",
    }
    doc = source.to_json()
    assert doc["status"] == "ok"
    assert doc["findings"][0]["rule"] == "database_cpu_saturated"
    # 10 sessions for the 30 s the history holds, averaged over its 60 s window, as rate() does
    assert "5 active sessions on 2 vCPUs" in doc["findings"][0]["summary"]
    assert doc["links"] == [{"app": "orders", "pool": "default", "targets": ["main"]}]
    assert doc["history"]["series"] == 5  # the five series above, nothing else


def test_the_config_turns_diagnosis_settings() -> None:
    config = parse("diagnosis: {interval: 5s, window: 2m, max_series: 1000}").diagnosis
    source = DiagnosisSource(config, Store())
    assert source.interval == 5.0
    assert source.history.points == 25 and source.history.max_series == 1000
