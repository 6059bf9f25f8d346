"""Ingest, driven in-process: validation, auth, caps, and monotonic aggregation, judged by
what a pushing app is answered and what /metrics would show."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.ingest import REPORTS_PATH, Ingest, reports_handler
from tests.ingest_reports import make_ingest, pool_doc, push, report_doc, sums, values

RESULTS = {
    "accepted", "too_large", "unauthorized", "malformed", "invalid", "unsupported_version",
    "app_limit", "process_limit", "pool_limit", "out_of_order", "unsupported_encoding", "busy",
    "timeout", "unsupported_media_type", "over_budget",
}  # fmt: skip


def report(**fields) -> bytes:
    """A report (tests.ingest_reports.report_doc) as pushed: JSON bytes."""
    return json.dumps(report_doc(**fields)).encode()


def make(**config) -> tuple[Ingest, object]:
    return make_ingest(**config)


async def test_accepts_and_aggregates_gauges_and_counters():
    ingest, _ = make()
    for i, proc in enumerate(["a:1:1", "a:2:1", "b:1:1"]):
        status, doc = push(
            ingest,
            report(proc=proc, pools=[pool_doc(checkouts=10 * (i + 1), used=i, idle=1, pending=i)]),
        )
        assert (status, doc["status"]) == (200, "accepted")
    v = values(ingest)
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
    assert ingest.status() == {"processes": 3, "apps": 1}  # on the landing page
    assert values(ingest)[("sqlalchemy_app_processes", ("orders",))] == 3


async def test_histogram_buckets_are_cumulative_and_end_in_inf():
    ingest, _ = make()
    push(ingest, report(pools=[pool_doc(checkouts=4)]))
    wait = next(s.value for s in ingest.samples() if s.spec.name == "sqlalchemy_pool_wait_seconds")
    bounds = [b for b, _ in wait.buckets]
    counts = [c for _, c in wait.buckets]
    assert math.isinf(bounds[-1]) and bounds == sorted(bounds)
    assert counts == sorted(counts) and counts[-1] == wait.count == 4
    assert wait.sum == 0.004


async def test_unbounded_pool_makes_max_infinite():
    ingest, _ = make()
    push(ingest, report(proc="p1", pools=[pool_doc(maximum=None, size=0)]))
    push(ingest, report(proc="p2", pools=[pool_doc()]))
    assert math.isinf(values(ingest)[("sqlalchemy_pool_max_connections", ("orders", "default"))])


async def test_departed_process_is_folded_in_and_leaves_the_gauges():
    ingest, clock = make(stale_after=30)
    push(ingest, report(proc="p1", pools=[pool_doc(checkouts=100, used=4)]))
    push(ingest, report(proc="p2", pools=[pool_doc(checkouts=50, used=1)]))
    clock.now += 20
    push(ingest, report(proc="p2", seq=2, pools=[pool_doc(checkouts=70, used=2)]))
    clock.now += 15  # p1 silent for 35 s: gone
    v = values(ingest)
    key = ("orders", "default")
    assert v[("sqlalchemy_pool_checkouts_total", key)] == 170
    assert v[("sqlalchemy_pool_connections", (*key, "used"))] == 2
    assert v[("sqlalchemy_app_processes", ("orders",))] == 1
    clock.now += 60  # everyone gone: counters stay, gauges leave
    v = values(ingest)
    assert v[("sqlalchemy_pool_checkouts_total", key)] == 170
    assert ("sqlalchemy_pool_connections", (*key, "used")) not in v
    assert v[("sqlalchemy_app_processes", ("orders",))] == 0


async def test_a_leaving_process_is_folded_at_once_and_its_gauges_leave():
    """gunicorn --max-requests recycles workers: each says it is leaving, so idle and max
    track the live workers instead of climbing until stale_after (5 processes grew to 33)."""
    ingest, clock = make(stale_after=30)
    for proc in ("w1", "w2"):
        push(ingest, report(proc=proc, pools=[pool_doc(checkouts=10, used=1, idle=2)]))
    status, _ = push(
        ingest, report(proc="w1", seq=2, leaving=True, pools=[pool_doc(checkouts=15, idle=3)])
    )
    assert status == 200
    v = values(ingest)
    key = ("orders", "default")
    assert v[("sqlalchemy_app_processes", ("orders",))] == 1
    assert v[("sqlalchemy_pool_connections", (*key, "idle"))] == 2  # w2's only
    assert v[("sqlalchemy_pool_max_connections", key)] == 15
    assert v[("sqlalchemy_pool_checkouts_total", key)] == 25  # w1's last counts kept
    # a late duplicate of the leaver's earlier report does not bring it back
    push(ingest, report(proc="w1", seq=1, pools=[pool_doc(checkouts=10, used=1, idle=2)]))
    assert values(ingest)[("sqlalchemy_app_processes", ("orders",))] == 1
    clock.now += 5
    assert values(ingest)[("sqlalchemy_pool_checkouts_total", key)] == 25


async def test_one_exhausted_process_among_idle_ones_is_visible():
    """uvicorn --workers 2, pool 3 + 2 each: one worker has 5 of 5 in use and 35 callers
    waiting, the other is idle; the sum says 5 of 10."""
    ingest, _ = make()
    busy = pool_doc(used=5, idle=0, pending=35, size=3, maximum=5)
    idle = pool_doc(used=0, idle=1, pending=0, size=3, maximum=5)
    push(ingest, report(proc="u1", pools=[busy]))
    push(ingest, report(proc="u2", pools=[idle]))
    v = values(ingest)
    key = ("orders", "default")
    assert v[("sqlalchemy_pool_connections", (*key, "used"))] == 5
    assert v[("sqlalchemy_pool_max_connections", key)] == 10
    assert v[("sqlalchemy_pool_exhausted_processes", key)] == 1
    assert v[("sqlalchemy_pool_busiest_process_utilisation", key)] == 1.0
    # all in use but nobody waiting is not exhausted; an unbounded pool never is
    push(ingest, report(proc="u1", seq=2, pools=[pool_doc(used=5, pending=0, maximum=5)]))
    push(ingest, report(proc="u2", seq=2, pools=[pool_doc(used=9, pending=3, maximum=None)]))
    v = values(ingest)
    assert v[("sqlalchemy_pool_exhausted_processes", key)] == 0
    assert v[("sqlalchemy_pool_busiest_process_utilisation", key)] == 1.0


async def test_process_starting_over_does_not_decrease_counters():
    ingest, _ = make()
    push(ingest, report(seq=1, pools=[pool_doc(checkouts=100)]))
    push(ingest, report(seq=2, pools=[pool_doc(checkouts=3)]))  # reset
    assert values(ingest)[("sqlalchemy_pool_checkouts_total", ("orders", "default"))] == 103


async def test_late_duplicate_is_ignored_and_counted():
    ingest, _ = make()
    push(ingest, report(seq=5, pools=[pool_doc(checkouts=100)]))
    status, doc = push(ingest, report(seq=4, pools=[pool_doc(checkouts=90)]))
    assert status == 200 and doc["reason"] == "out_of_order"
    v = values(ingest)
    assert v[("sqlalchemy_pool_checkouts_total", ("orders", "default"))] == 100
    assert v[("pgpressure_reports_total", ("out_of_order",))] == 1


async def test_bad_reports_get_4xx_with_a_reason_and_are_counted():
    ingest, _ = make(max_body_bytes=2048)
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
        got, doc = push(ingest, body)
        assert (got, doc["reason"]) == (status, reason), body[:80]
        assert doc["error"]
    v = values(ingest)
    assert v[("pgpressure_reports_total", ("invalid",))] == 6
    assert v[("pgpressure_reports_total", ("malformed",))] == 2
    assert v[("pgpressure_reports_total", ("too_large",))] == 1
    assert v[("pgpressure_reports_total", ("accepted",))] == 0
    assert (push(ingest, good))[0] == 200  # and it still works


@contextlib.asynccontextmanager
async def serving(ingest: Ingest | None) -> AsyncIterator[TestClient]:
    """The ingest route as the daemon registers it, on a real aiohttp server on loopback."""
    app = web.Application(handler_args={"auto_decompress": False})
    app.router.add_post(REPORTS_PATH, reports_handler(ingest))
    async with TestClient(TestServer(app)) as client:
        yield client


async def post(client: TestClient, body: bytes, auth: str | None = None, **headers: str):
    """(status, JSON answer, headers) of one push, sent as `application/json` unless
    `headers` say otherwise."""
    headers.setdefault("Content-Type", "application/json")
    if auth is not None:
        headers["Authorization"] = auth
    async with client.post(REPORTS_PATH, data=body, headers=headers) as r:
        return r.status, await r.json(), r.headers


async def test_a_push_needs_the_bearer_token():
    ingest, _ = make(token="s3cret-token")
    async with serving(ingest) as client:
        for auth in (None, "Bearer wrong", "Basic s3cret-token", "s3cret-token", "Bearer"):
            status, doc, _ = await post(client, report(), auth)
            assert (status, doc["reason"]) == (401, "unauthorized")
            assert "s3cret" not in json.dumps(doc)
        assert (await post(client, report(), "Bearer s3cret-token"))[0] == 200
    v = values(ingest)
    assert v[("pgpressure_reports_total", ("unauthorized",))] == 5  # each push counted once
    assert v[("pgpressure_reports_total", ("accepted",))] == 1


async def test_a_token_file_is_re_read_and_never_opens_the_endpoint(tmp_path):
    """Rotating the secret in the file needs no restart; a file emptied later keeps the last
    token, and one empty from the start keeps ingest closed."""
    path = tmp_path / "token"
    path.write_text("first-token\n")
    ingest, clock = make(token_file=path)
    async with serving(ingest) as client:
        assert (await post(client, report(seq=1), "Bearer first-token"))[0] == 200
        path.write_text("second-token\n")
        clock.now += 10
        assert (await post(client, report(seq=2), "Bearer first-token"))[0] == 401
        assert (await post(client, report(seq=3), "bearer second-token"))[0] == 200
        path.write_text("")
        clock.now += 10
        assert (await post(client, report(seq=4), "Bearer second-token"))[0] == 200
        assert (await post(client, report(seq=5)))[0] == 401
    ingest, _ = make(token_file=path)
    async with serving(ingest) as client:
        status, doc, _ = await post(client, report())
        assert (status, doc["reason"]) == (401, "unauthorized")
        assert "not available" in doc["error"]


async def test_a_token_that_is_not_utf8_is_refused_not_a_crash():
    ingest, _ = make(token="s3cret-token")
    async with serving(ingest) as client:
        reader, writer = await asyncio.open_connection(client.host, client.port)
        body = report()
        writer.write(
            f"POST {REPORTS_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n".encode()
            + b"Authorization: Bearer s3cret-\xff\xfe\r\nConnection: close\r\n\r\n"
            + body
        )
        await writer.drain()
        answer = await reader.read()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert values(ingest)[("pgpressure_reports_total", ("unauthorized",))] == 1


async def test_compressed_pushes_are_refused_and_counted():
    """A gzip body is refused from its headers: the daemon never inflates a push."""
    ingest, _ = make()
    async with serving(ingest) as client:
        for encoding in ("gzip", "deflate", " GZIP "):
            status, doc, _ = await post(client, report(), **{"Content-Encoding": encoding})
            assert (status, doc["reason"]) == (415, "unsupported_encoding")
        assert (await post(client, report(), **{"Content-Encoding": "identity"}))[0] == 200
    assert values(ingest)[("pgpressure_reports_total", ("unsupported_encoding",))] == 3


async def test_a_push_is_not_held_up_by_one_trickling_its_body():
    """A push still sending its body holds no slot: the next push is answered at once, and
    the trickler gets 408 when its deadline (2 s plus 1 s per 64 KiB) passes."""
    ingest, _ = make()
    async with serving(ingest) as client:
        reader, holder = await asyncio.open_connection(client.host, client.port)
        holder.write(
            f"POST {REPORTS_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n".encode()
            + b"Content-Type: application/json\r\n\r\n{"
        )
        await holder.drain()
        await asyncio.sleep(0.2)
        assert (await post(client, report()))[0] == 200
        answer = await asyncio.wait_for(reader.read(100), 10)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        holder.close()
    v = values(ingest)
    assert v[("pgpressure_reports_total", ("timeout",))] == 1
    assert v[("pgpressure_reports_total", ("accepted",))] == 1


async def test_ingest_disabled_answers_404():
    async with serving(None) as client:
        status, doc, _ = await post(client, report())
    assert (status, doc) == (404, {"error": "ingest is disabled"})


async def test_every_result_is_exported_from_the_start_at_zero():
    """A first refusal of a kind is then an increase that rate() sees, not a new series."""
    ingest, _ = make()
    v = values(ingest)
    exported = {
        labels[0]: n for (name, labels), n in v.items() if name == "pgpressure_reports_total"
    }
    assert exported == dict.fromkeys(RESULTS, 0)


async def test_caps_on_apps_pools_and_processes():
    ingest, clock = make(max_apps=2, max_pools_per_app=2, max_processes=3, stale_after=30)
    assert (push(ingest, report(app="a", proc="1")))[0] == 200
    assert (push(ingest, report(app="b", proc="2")))[0] == 200
    status, doc = push(ingest, report(app="c", proc="3"))
    assert (status, doc["reason"]) == (429, "app_limit")
    pools = [pool_doc("p1"), pool_doc("p2"), pool_doc("p3")]
    status, doc = push(ingest, report(app="a", proc="1", seq=2, pools=pools))
    assert status == 200 and doc["refused_pools"] == ["p2", "p3"]  # "default" was the 1st
    assert (push(ingest, report(app="a", proc="4")))[0] == 200
    status, doc = push(ingest, report(app="a", proc="5"))
    assert (status, doc["reason"]) == (429, "process_limit")
    v = values(ingest)
    for result in ("app_limit", "pool_limit", "process_limit"):
        assert v[("pgpressure_reports_total", (result,))] == 1
    assert ("sqlalchemy_pool_checkouts_total", ("a", "p3")) not in v
    # once stale processes leave, there is room again; an app with no live process can be
    # replaced by a new one
    clock.now += 31
    assert (push(ingest, report(app="c", proc="6")))[0] == 200


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
    ingest, clock = make(stale_after=30)
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
            status, _ = push(
                ingest, report(proc=pid, seq=seqs[proc], pools=[pool_doc(checkouts=counts[proc])])
            )
            assert status == 200
        now = {
            k: v
            for k, v in values(ingest).items()
            if k[0].endswith("_total") or k[0].endswith("_seconds")
        }
        for key, value in last.items():
            assert now.get(key, 0) >= value, key
        last = now


async def test_process_back_after_a_silence_is_not_counted_twice():
    """A paused pod or a network partition: the process departs (its totals folded in),
    then reports again under the same id. Its totals must not be added a second time."""
    ingest, clock = make(stale_after=30)
    key = ("orders", "default")
    checkouts = ("sqlalchemy_pool_checkouts_total", key)
    push(ingest, report(proc="p1", pools=[pool_doc(checkouts=100, used=3)]))
    push(ingest, report(proc="p2", pools=[pool_doc(checkouts=50)]))
    clock.now += 20
    push(ingest, report(proc="p2", seq=2, pools=[pool_doc(checkouts=60)]))
    clock.now += 15  # p1 silent for 35 s: departed, its 100 folded in
    v = values(ingest)
    assert (v[checkouts], v[("sqlalchemy_app_processes", ("orders",))]) == (160, 1)
    assert v[("sqlalchemy_pool_connections", (*key, "used"))] == 0
    # p1 is back with 10 more checkouts
    status, doc = push(ingest, report(proc="p1", seq=2, pools=[pool_doc(checkouts=110, used=2)]))
    assert (status, doc["status"]) == (200, "accepted")
    v = values(ingest)
    assert v[checkouts] == 170
    assert v[("sqlalchemy_pool_wait_seconds", key)] == 170  # the histogram count too
    assert v[("sqlalchemy_pool_connections", (*key, "used"))] == 2
    assert v[("sqlalchemy_app_processes", ("orders",))] == 2
    assert sums(ingest)[("sqlalchemy_pool_wait_seconds", key)] == pytest.approx(0.170)
    # a retry older than what was folded in is ignored, also while p1 is away again
    clock.now += 40
    push(ingest, report(proc="p2", seq=3, pools=[pool_doc(checkouts=60)]))
    status, doc = push(ingest, report(proc="p1", seq=2, pools=[]))
    assert doc["reason"] == "out_of_order"
    assert values(ingest)[checkouts] == 170
    # back again, and then it starts over (counts went backwards): its 110 are kept
    push(ingest, report(proc="p1", seq=3, pools=[pool_doc(checkouts=110)]))
    assert values(ingest)[checkouts] == 170
    push(ingest, report(proc="p1", seq=4, pools=[pool_doc(checkouts=5)]))
    assert values(ingest)[checkouts] == 175


async def test_departed_processes_are_remembered_for_a_bounded_time_and_number():
    """A departed process that comes back is not counted twice while it is remembered: the
    newest max_processes of them, for ten times stale_after. One forgotten counts as a new
    process when it returns (the price of bounded memory)."""
    ingest, clock = make(stale_after=30, max_processes=3)
    checkouts = ("sqlalchemy_pool_checkouts_total", ("orders", "default"))
    for batch in (range(3), range(3, 5)):  # p0-p2 depart, then p3 and p4
        for i in batch:
            push(ingest, report(proc=f"p{i}", pools=[pool_doc(checkouts=10)]))
        clock.now += 31
        assert values(ingest)[("sqlalchemy_app_processes", ("orders",))] == 0
    assert values(ingest)[checkouts] == 50
    departed = clock.now
    push(ingest, report(proc="p2", seq=2, pools=[pool_doc(checkouts=10)]))  # remembered
    assert values(ingest)[checkouts] == 50
    push(ingest, report(proc="p0", seq=2, pools=[pool_doc(checkouts=10)]))  # one of 5 > 3
    assert values(ingest)[checkouts] == 60
    clock.now = departed + 10 * 30 - 1
    push(ingest, report(proc="p4", seq=2, pools=[pool_doc(checkouts=10)]))  # still remembered
    assert values(ingest)[checkouts] == 60
    clock.now = departed + 10 * 30 + 1
    values(ingest)  # the daemon samples every second: that is when memories end
    push(ingest, report(proc="p3", seq=2, pools=[pool_doc(checkouts=10)]))  # forgotten
    assert values(ingest)[checkouts] == 70


async def test_a_process_is_stale_after_three_of_its_push_intervals_if_longer():
    ingest, clock = make(stale_after=30)
    apps = ("sqlalchemy_app_processes", ("orders",))
    push(ingest, report(proc="slow", interval=20.0))
    push(ingest, report(proc="fast", interval=5.0))
    clock.now += 50  # beyond stale_after, within 3 x 20 s
    assert values(ingest)[apps] == 1
    clock.now += 15
    assert values(ingest)[apps] == 0
    # a claimed interval is capped at the instrumentation's longest (an hour)
    push(ingest, report(proc="odd", interval=1e12))
    clock.now += 3 * 3600 + 1
    assert values(ingest)[apps] == 0


async def test_a_sum_an_ulp_smaller_is_not_a_restart():
    """The app adds the float sums of several engines; regrouped, the same observations can
    add up to an ulp less. Only integer counts going backwards mean a process started over."""
    ingest, _ = make()
    key = ("orders", "default")
    first = pool_doc(checkouts=3)
    total = first["wait"]["sum"]
    wobble = {**first, "wait": {**first["wait"], "sum": math.nextafter(total, 0)}}
    push(ingest, report(seq=1, pools=[first]))
    push(ingest, report(seq=2, pools=[wobble]))
    assert values(ingest)[("sqlalchemy_pool_checkouts_total", key)] == 3
    assert sums(ingest)[("sqlalchemy_pool_wait_seconds", key)] == total


async def test_exported_sums_never_decrease_when_processes_depart():
    """Departing regroups the float additions: ((a + b) + c) + d against ((c + a) + b) + d.
    With these sums that comes out an ulp lower; the exported sum must not."""
    ingest, clock = make(stale_after=30)
    key = ("sqlalchemy_pool_wait_seconds", ("orders", "default"))
    for i, total in enumerate([0.217, 0.422, 0.029, 0.222]):
        doc = pool_doc(checkouts=1)
        doc["wait"]["sum"] = total
        push(ingest, report(proc=f"p{i}", pools=[doc]))
        if i == 2:
            clock.now += 20  # p2 reported first; it is the one to depart
    before = sums(ingest)[key]
    for i in (0, 1, 3):
        doc = pool_doc(checkouts=1)
        doc["wait"]["sum"] = [0.217, 0.422, 0.029, 0.222][i]
        push(ingest, report(proc=f"p{i}", seq=2, pools=[doc]))
    clock.now += 15
    assert values(ingest)[("sqlalchemy_app_processes", ("orders",))] == 3
    assert sums(ingest)[key] >= before


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
    ingest, clock = make(stale_after=30)
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
            status, _ = push(
                ingest, report(proc=f"h:{life[0]}:{life[1]}", seq=seqs[proc], pools=[doc])
            )
            assert status == 200
        if not last:
            continue
        v = values(ingest)
        assert v[("sqlalchemy_pool_checkouts_total", key)] == sum(c for c, _ in last.values())
        exported = sums(ingest)[("sqlalchemy_pool_wait_seconds", key)]
        assert exported >= previous_sum
        assert exported == pytest.approx(math.fsum(s for _, s in last.values()), abs=1e-9)
        previous_sum = exported
