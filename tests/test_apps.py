"""The apps aggregator, driven directly: validation, auth, caps, and monotonic aggregation."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.config import IngestConfig
from exporter.ingest.aggregator import AppsAggregator
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


def sums(agg: AppsAggregator) -> dict[tuple, float]:
    """(metric name, labels) -> the sum of each histogram."""
    return {(s.spec.name, s.labels): s.value.sum for s in agg.samples() if hasattr(s.value, "sum")}


async def test_process_back_after_a_silence_is_not_counted_twice():
    """A paused pod or a network partition: the process departs (its totals folded in),
    then reports again under the same id. Its totals must not be added a second time."""
    agg, clock = make(stale_after=30)
    key = ("orders", "default")
    checkouts = ("sqlalchemy_pool_checkouts_total", key)
    await agg.handle_report(report(proc="p1", pools=[pool_doc(checkouts=100, used=3)]), None)
    await agg.handle_report(report(proc="p2", pools=[pool_doc(checkouts=50)]), None)
    clock.now += 20
    await agg.handle_report(report(proc="p2", seq=2, pools=[pool_doc(checkouts=60)]), None)
    clock.now += 15  # p1 silent for 35 s: departed, its 100 folded in
    await agg.sample()
    v = values(agg)
    assert (v[checkouts], v[("sqlalchemy_app_processes", ("orders",))]) == (160, 1)
    assert v[("sqlalchemy_pool_connections", (*key, "used"))] == 0
    # p1 is back with 10 more checkouts
    status, doc = await agg.handle_report(
        report(proc="p1", seq=2, pools=[pool_doc(checkouts=110, used=2)]), None
    )
    assert (status, doc["status"]) == (200, "accepted")
    await agg.sample()
    v = values(agg)
    assert v[checkouts] == 170
    assert v[("sqlalchemy_pool_wait_seconds", key)] == 170  # the histogram count too
    assert v[("sqlalchemy_pool_connections", (*key, "used"))] == 2
    assert v[("sqlalchemy_app_processes", ("orders",))] == 2
    assert sums(agg)[("sqlalchemy_pool_wait_seconds", key)] == pytest.approx(0.170)
    # a retry older than what was folded in is ignored, also while p1 is away again
    clock.now += 40
    await agg.handle_report(report(proc="p2", seq=3, pools=[pool_doc(checkouts=60)]), None)
    await agg.sample()
    status, doc = await agg.handle_report(report(proc="p1", seq=2, pools=[]), None)
    assert doc["reason"] == "out_of_order"
    assert values(agg)[checkouts] == 170
    # back again, and then it starts over (counts went backwards): its 110 are kept
    await agg.handle_report(report(proc="p1", seq=3, pools=[pool_doc(checkouts=110)]), None)
    assert values(agg)[checkouts] == 170
    await agg.handle_report(report(proc="p1", seq=4, pools=[pool_doc(checkouts=5)]), None)
    assert values(agg)[checkouts] == 175


async def test_departed_processes_are_remembered_for_a_bounded_time_and_number():
    agg, clock = make(stale_after=30, max_processes=3)
    for batch in (range(3), range(3, 5)):
        for i in batch:
            await agg.handle_report(report(proc=f"p{i}", pools=[pool_doc(checkouts=10)]), None)
        clock.now += 31
        await agg.sample()
    assert len(agg.processes) == 0
    assert sorted(agg.gone) == [("orders", p) for p in ("p2", "p3", "p4")]  # the newest
    clock.now += 10 * 30 + 1  # ten times stale_after
    await agg.sample()
    assert len(agg.gone) == 0
    assert values(agg)[("sqlalchemy_pool_checkouts_total", ("orders", "default"))] == 50


async def test_a_process_is_stale_after_three_of_its_push_intervals_if_longer():
    agg, clock = make(stale_after=30)
    apps = ("sqlalchemy_app_processes", ("orders",))
    await agg.handle_report(report(proc="slow", interval=20.0), None)
    await agg.handle_report(report(proc="fast", interval=5.0), None)
    clock.now += 50  # beyond stale_after, within 3 x 20 s
    await agg.sample()
    assert values(agg)[apps] == 1 and list(agg.processes) == [("orders", "slow")]
    clock.now += 15
    await agg.sample()
    assert values(agg)[apps] == 0
    # a claimed interval is capped at the instrumentation's longest (an hour)
    await agg.handle_report(report(proc="odd", interval=1e12), None)
    clock.now += 3 * 3600 + 1
    await agg.sample()
    assert values(agg)[apps] == 0


async def test_a_sum_an_ulp_smaller_is_not_a_restart():
    """The app adds the float sums of several engines; regrouped, the same observations can
    add up to an ulp less. Only integer counts going backwards mean a process started over."""
    agg, _ = make()
    key = ("orders", "default")
    first = pool_doc(checkouts=3)
    total = first["wait"]["sum"]
    wobble = {**first, "wait": {**first["wait"], "sum": math.nextafter(total, 0)}}
    await agg.handle_report(report(seq=1, pools=[first]), None)
    await agg.handle_report(report(seq=2, pools=[wobble]), None)
    assert values(agg)[("sqlalchemy_pool_checkouts_total", key)] == 3
    assert sums(agg)[("sqlalchemy_pool_wait_seconds", key)] == total


async def test_exported_sums_never_decrease_when_processes_depart():
    """Departing regroups the float additions: ((a + b) + c) + d against ((c + a) + b) + d.
    With these sums that comes out an ulp lower; the exported sum must not."""
    agg, clock = make(stale_after=30)
    key = ("sqlalchemy_pool_wait_seconds", ("orders", "default"))
    for i, total in enumerate([0.217, 0.422, 0.029, 0.222]):
        doc = pool_doc(checkouts=1)
        doc["wait"]["sum"] = total
        await agg.handle_report(report(proc=f"p{i}", pools=[doc]), None)
        if i == 2:
            clock.now += 20  # p2 reported first; it is the one to depart
    before = sums(agg)[key]
    for i in (0, 1, 3):
        doc = pool_doc(checkouts=1)
        doc["wait"]["sum"] = [0.217, 0.422, 0.029, 0.222][i]
        await agg.handle_report(report(proc=f"p{i}", seq=2, pools=[doc]), None)
    clock.now += 15
    await agg.sample()
    assert len(agg.processes) == 3
    assert sums(agg)[key] >= before


async def test_route_refusals_are_counted_through_the_aggregator():
    agg, _ = make(token="s3cret-token")
    assert agg.authorize("Bearer s3cret-token") is None
    status, doc = agg.authorize("Bearer nope")
    assert (status, doc["reason"]) == (401, "unauthorized")
    for status, result in ((415, "unsupported_encoding"), (503, "busy"), (408, "timeout")):
        got, doc = agg.refuse(status, result, "why")
        assert (got, doc) == (status, {"status": "refused", "reason": result, "error": "why"})
    v = values(agg)
    for result in ("unauthorized", "unsupported_encoding", "busy", "timeout"):
        assert v[("pgpressure_reports_total", (result,))] == 1


exact_steps = st.lists(
    st.one_of(
        # proc, growth (0 with wobble: the same counts, the float sum an ulp lower)
        st.tuples(st.just("push"), st.integers(0, 3), st.integers(0, 5), st.booleans()),
        st.tuples(st.just("restart"), st.integers(0, 3), st.just(0), st.just(False)),
        st.tuples(st.just("wait"), st.integers(1, 40), st.just(0), st.just(False)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(exact_steps)
async def test_aggregate_is_exactly_the_sum_of_last_reports(steps):
    """Processes come, pause past stale_after, come back, restart and wobble: the aggregate
    counters are exactly the sum of each process lifetime's last report (none lost, none
    twice), and the exported sums never decrease."""
    agg, clock = make(stale_after=30)
    start = clock.now
    last: dict[tuple[int, int], tuple[int, float]] = {}  # (proc, generation) -> count, sum
    generation: dict[int, int] = {}
    seqs: dict[int, int] = {}
    key = ("orders", "default")
    previous_sum = 0.0
    for kind, proc, n, wobble in steps:
        if kind == "wait":
            if clock.now + proc - start < 10 * 30:  # departed processes are remembered
                clock.now += proc
        elif kind == "restart":
            generation[proc] = generation.get(proc, 0) + 1
        else:
            life = (proc, generation.get(proc, 0))
            count, total = last.get(life, (0, 0.0))
            if n:
                count, total = count + n, total + n * 0.0013
            elif wobble and total:
                total = math.nextafter(total, 0)
            last[life] = (count, total)
            seqs[proc] = seqs.get(proc, 0) + 1
            doc = pool_doc(checkouts=count)
            doc["wait"]["sum"] = total
            status, _ = await agg.handle_report(
                report(proc=f"h:{life[0]}:{life[1]}", seq=seqs[proc], pools=[doc]), None
            )
            assert status == 200
        await agg.sample()
        if not last:
            continue
        v = values(agg)
        assert v[("sqlalchemy_pool_checkouts_total", key)] == sum(c for c, _ in last.values())
        exported = sums(agg)[("sqlalchemy_pool_wait_seconds", key)]
        assert exported >= previous_sum
        assert exported == pytest.approx(math.fsum(s for _, s in last.values()), abs=1e-9)
        previous_sum = exported
