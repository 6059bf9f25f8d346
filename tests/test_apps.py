"""The apps aggregator, driven directly: validation, auth, caps, and monotonic aggregation."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.config import IngestConfig
from exporter.sources.apps import AppsAggregator
from tests.ingest_reports import Clock, pool_doc, report_doc


def report(**fields) -> bytes:
    """A report (tests.ingest_reports.report_doc) as pushed: JSON bytes."""
    return json.dumps(report_doc(**fields)).encode()


def values(agg: AppsAggregator) -> dict[tuple, float]:
    """(metric name, labels) -> value; histograms as their count."""
    out = {}
    for s in agg.samples():
        v = s.value
        out[(s.spec.name, s.labels)] = v.count if hasattr(v, "count") else v
    return out


def make(**kw) -> tuple[AppsAggregator, Clock]:
    clock = Clock()
    return AppsAggregator(IngestConfig(**kw), clock=clock), clock


async def test_accepts_and_aggregates_gauges_and_counters():
    agg, _ = make()
    for i, proc in enumerate(["a:1:1", "a:2:1", "b:1:1"]):
        status, doc = await agg.handle_report(
            report(proc=proc, pools=[pool_doc(checkouts=10 * (i + 1), used=i, idle=1, pending=i)]),
            None,
        )
        assert (status, doc["status"]) == (200, "accepted")
    v = values(agg)
    key = ("orders", "default")
    assert v[("sqlalchemy_pool_checkouts_total", key)] == 60
    assert v[("sqlalchemy_pool_wait_seconds", key)] == 60
    assert v[("sqlalchemy_pool_connections", (*key, "used"))] == 3
    assert v[("sqlalchemy_pool_connections", (*key, "idle"))] == 3
    assert v[("sqlalchemy_pool_pending_requests", key)] == 3
    assert v[("sqlalchemy_pool_size", key)] == 15
    assert v[("sqlalchemy_pool_max_connections", key)] == 45
    assert v[("sqlalchemy_app_processes", ("orders",))] == 3
    assert v[("pgpressure_reports_total", ("accepted",))] == 3
    assert agg.status() == {"processes": 3, "apps": 1}


async def test_histogram_buckets_are_cumulative_and_end_in_inf():
    agg, _ = make()
    await agg.handle_report(report(pools=[pool_doc(checkouts=4)]), None)
    wait = next(s.value for s in agg.samples() if s.spec.name == "sqlalchemy_pool_wait_seconds")
    bounds = [b for b, _ in wait.buckets]
    counts = [c for _, c in wait.buckets]
    assert math.isinf(bounds[-1]) and bounds == sorted(bounds)
    assert counts == sorted(counts) and counts[-1] == wait.count == 4
    assert wait.sum == 0.004


async def test_unbounded_pool_makes_max_infinite():
    agg, _ = make()
    await agg.handle_report(report(proc="p1", pools=[pool_doc(maximum=None, size=0)]), None)
    await agg.handle_report(report(proc="p2", pools=[pool_doc()]), None)
    assert math.isinf(values(agg)[("sqlalchemy_pool_max_connections", ("orders", "default"))])


async def test_departed_process_is_folded_in_and_leaves_the_gauges():
    agg, clock = make(stale_after=30)
    await agg.handle_report(report(proc="p1", pools=[pool_doc(checkouts=100, used=4)]), None)
    await agg.handle_report(report(proc="p2", pools=[pool_doc(checkouts=50, used=1)]), None)
    clock.now += 20
    await agg.handle_report(report(proc="p2", seq=2, pools=[pool_doc(checkouts=70, used=2)]), None)
    clock.now += 15  # p1 silent for 35 s: gone
    await agg.sample()
    v = values(agg)
    key = ("orders", "default")
    assert v[("sqlalchemy_pool_checkouts_total", key)] == 170
    assert v[("sqlalchemy_pool_connections", (*key, "used"))] == 2
    assert v[("sqlalchemy_app_processes", ("orders",))] == 1
    clock.now += 60  # everyone gone: counters stay, gauges leave
    await agg.sample()
    v = values(agg)
    assert v[("sqlalchemy_pool_checkouts_total", key)] == 170
    assert ("sqlalchemy_pool_connections", (*key, "used")) not in v
    assert v[("sqlalchemy_app_processes", ("orders",))] == 0


async def test_process_starting_over_does_not_decrease_counters():
    agg, _ = make()
    await agg.handle_report(report(seq=1, pools=[pool_doc(checkouts=100)]), None)
    await agg.handle_report(report(seq=2, pools=[pool_doc(checkouts=3)]), None)  # reset
    assert values(agg)[("sqlalchemy_pool_checkouts_total", ("orders", "default"))] == 103


async def test_late_duplicate_is_ignored_and_counted():
    agg, _ = make()
    await agg.handle_report(report(seq=5, pools=[pool_doc(checkouts=100)]), None)
    status, doc = await agg.handle_report(report(seq=4, pools=[pool_doc(checkouts=90)]), None)
    assert status == 200 and doc["reason"] == "out_of_order"
    v = values(agg)
    assert v[("sqlalchemy_pool_checkouts_total", ("orders", "default"))] == 100
    assert v[("pgpressure_reports_total", ("out_of_order",))] == 1


async def test_bad_reports_get_4xx_with_a_reason_and_are_counted():
    agg, _ = make(max_body_bytes=2048)
    good = report()
    cases = [
        (b"{not json", 400, "malformed"),
        (b"[1, 2]", 400, "malformed"),
        (report(version=2), 400, "unsupported_version"),
        (json.dumps({"app": "x"}).encode(), 400, "unsupported_version"),
        (report(app=""), 400, "invalid"),
        (report(app="a\nb"), 400, "invalid"),
        (report(pools=[{**pool_doc(), "checkouts": "5"}]), 400, "invalid"),
        (report(pools=[{**pool_doc(), "checkouts": -1}]), 400, "invalid"),
        (report(pools=[{**pool_doc(), "wait": {"counts": [1, 2], "sum": 0.0}}]), 400, "invalid"),
        (report(pools=[pool_doc(), pool_doc()]), 400, "invalid"),
        (good + b" " * 4096, 413, "too_large"),
    ]
    for body, status, reason in cases:
        got, doc = await agg.handle_report(body, None)
        assert (got, doc["reason"]) == (status, reason), body[:80]
        assert doc["error"]
    v = values(agg)
    assert v[("pgpressure_reports_total", ("invalid",))] == 6
    assert v[("pgpressure_reports_total", ("malformed",))] == 2
    assert v[("pgpressure_reports_total", ("too_large",))] == 1
    assert v[("pgpressure_reports_total", ("accepted",))] == 0
    assert (await agg.handle_report(good, None))[0] == 200  # and it still works


async def test_bearer_token(tmp_path):
    agg, clock = make(token="s3cret-token")
    for auth in (None, "Bearer wrong", "Basic s3cret-token", "s3cret-token"):
        status, doc = await agg.handle_report(report(), auth)
        assert (status, doc["reason"]) == (401, "unauthorized")
        assert "s3cret" not in json.dumps(doc)
    assert (await agg.handle_report(report(), "Bearer s3cret-token"))[0] == 200
    # token_file: re-read after a while, so rotating the secret works without a restart
    path = tmp_path / "token"
    path.write_text("first-token\n")
    agg, clock = make(token_file=path)
    assert (await agg.handle_report(report(seq=1), "Bearer first-token"))[0] == 200
    path.write_text("second-token\n")
    clock.now += 10
    assert (await agg.handle_report(report(seq=2), "Bearer first-token"))[0] == 401
    assert (await agg.handle_report(report(seq=3), "bearer second-token"))[0] == 200


async def test_caps_on_apps_pools_and_processes():
    agg, clock = make(max_apps=2, max_pools_per_app=2, max_processes=3, stale_after=30)
    assert (await agg.handle_report(report(app="a", proc="1"), None))[0] == 200
    assert (await agg.handle_report(report(app="b", proc="2"), None))[0] == 200
    status, doc = await agg.handle_report(report(app="c", proc="3"), None)
    assert (status, doc["reason"]) == (429, "app_limit")
    pools = [pool_doc("p1"), pool_doc("p2"), pool_doc("p3")]
    status, doc = await agg.handle_report(report(app="a", proc="1", seq=2, pools=pools), None)
    assert status == 200 and doc["refused_pools"] == ["p2", "p3"]  # "default" was the 1st
    assert (await agg.handle_report(report(app="a", proc="4"), None))[0] == 200
    status, doc = await agg.handle_report(report(app="a", proc="5"), None)
    assert (status, doc["reason"]) == (429, "process_limit")
    v = values(agg)
    for result in ("app_limit", "pool_limit", "process_limit"):
        assert v[("pgpressure_reports_total", (result,))] == 1
    assert ("sqlalchemy_pool_checkouts_total", ("a", "p3")) not in v
    # once stale processes leave, there is room again; an app with no live process can be
    # replaced by a new one
    clock.now += 31
    assert (await agg.handle_report(report(app="c", proc="6"), None))[0] == 200


report_steps = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 3), st.integers(0, 5)),  # proc, growth
        st.tuples(st.just("restart"), st.integers(0, 3), st.just(0)),
        st.tuples(st.just("wait"), st.integers(1, 40), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(report_steps)
async def test_aggregate_counters_never_decrease(steps):
    agg, clock = make(stale_after=30)
    counts = {}
    seqs = {}
    generation = {}
    last: dict = {}
    for kind, proc, n in steps:
        if kind == "wait":
            clock.now += proc
        elif kind == "restart":  # the same pid starts over: new start time in its id
            generation[proc] = generation.get(proc, 0) + 1
            counts[proc] = 0
        else:
            counts[proc] = counts.get(proc, 0) + n
            seqs[proc] = seqs.get(proc, 0) + 1
            pid = f"h:{proc}:{generation.get(proc, 0)}"
            status, _ = await agg.handle_report(
                report(proc=pid, seq=seqs[proc], pools=[pool_doc(checkouts=counts[proc])]), None
            )
            assert status == 200
        await agg.sample()
        now = {
            k: v
            for k, v in values(agg).items()
            if k[0].endswith("_total") or k[0].endswith("_seconds")
        }
        for key, value in last.items():
            assert now.get(key, 0) >= value, key
        last = now
