"""Fuzzing the ingest endpoint: random and hostile reports never cause a 500 or a crash,
memory stays bounded, and refused reports leave the aggregates exactly as they were.

Most examples go straight to what the ingest handler does with an authorized push's body
(`IngestHandler.receive`) for speed; the HTTP-level cases run against the real daemon.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from exporter import metrics as m
from exporter.config import IngestConfig
from exporter.devtools.daemon_process import run_daemon, slowest_scrape_while
from exporter.ingest import REPORTS_PATH, Ingest
from pgpressure_sqlalchemy.wire import NBUCKETS
from tests.ingest_reports import make_ingest, pool_doc, push, report_doc

OK_STATUSES = {200, 400, 401, 404, 408, 413, 415, 429, 503}
TOKEN = "fuzz-ingest-token-123"


def pool(name: str = "default", n: int = 10) -> dict:
    return pool_doc(name, checkouts=n, used=1, idle=2, bucket=4)


def report(app: str = "orders", proc: str = "h:1:1", seq: int = 1, pools=None) -> dict:
    return report_doc(app, proc, seq, pools if pools is not None else [pool()])


def aggregates(ingest: Ingest) -> list:
    """Everything /metrics would show of ingest except the result counters."""
    return [s for s in ingest.samples() if s.spec is not m.REPORTS]


def seeded() -> Ingest:
    return make_ingest()[0]


# -- strategies ------------------------------------------------------------------------------
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from([10**400, -(10**30), 2**53 + 1, 1e308, -0.0, "\x00", "\udfff", "💥" * 20]),
)
any_json = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=40,
)
hostile_values = st.one_of(
    scalars,
    any_json,
    st.just(-1),
    st.just(float("nan")),
    st.just(float("inf")),
    st.just(10**20),
    st.just([0] * (NBUCKETS + 1)),
    st.just("x" * 10_000),
)
# Paths into a valid report where a hostile value is planted.
PATHS = [
    ("version",),
    ("app",),
    ("seq",),
    ("interval",),
    ("process",),
    ("process", "id"),
    ("process", "pid"),
    ("process", "started"),
    ("pools",),
    ("pools", 0),
    ("pools", 0, "pool"),
    ("pools", 0, "used"),
    ("pools", 0, "max"),
    ("pools", 0, "checkouts"),
    ("pools", 0, "timeouts"),
    ("pools", 0, "closed"),
    ("pools", 0, "closed", "recycle"),
    ("pools", 0, "wait"),
    ("pools", 0, "wait", "sum"),
    ("pools", 0, "wait", "counts"),
    ("pools", 0, "wait", "counts", 3),
    ("pools", 0, "query", "sum"),
]


def _known_overflow(path: tuple, value) -> bool:
    """An integer histogram sum too large for a float: covered by its own test below."""
    return (
        path[-1] == "sum"
        and isinstance(value, int)
        and not isinstance(value, bool)
        and (abs(value) > 1.7e308)
    )


def plant(doc: dict, path: tuple, value) -> dict:
    doc = copy.deepcopy(doc)
    node = doc
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return doc


def dumps(doc) -> bytes:
    # Non-standard JSON on purpose: NaN, Infinity, lone surrogates.
    return json.dumps(doc, allow_nan=True, ensure_ascii=True).encode()


FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# -- properties ------------------------------------------------------------------------------
@FUZZ
@given(doc=any_json)
def test_random_json_is_refused_cleanly(doc) -> None:
    ingest = seeded()
    push(ingest, report(proc="base", seq=1))
    before = aggregates(ingest)
    status, answer = push(ingest, dumps(doc))
    assert (status in OK_STATUSES and status != 200) or answer.get("status") == "accepted"
    assert isinstance(answer, dict)
    json.dumps(answer)  # the answer is serialisable (aiohttp would 500 otherwise)
    if status != 200:
        assert aggregates(ingest) == before


@FUZZ
@given(raw=st.binary(max_size=300))
def test_random_bytes_are_refused_cleanly(raw: bytes) -> None:
    ingest = seeded()
    status, answer = push(ingest, raw)
    assert status in OK_STATUSES - {200} or raw.strip().startswith(b"{")
    json.dumps(answer)


@FUZZ
@given(path=st.sampled_from(PATHS), value=hostile_values, seq=st.integers(2, 5))
def test_hostile_fields_never_change_the_aggregates(path, value, seq) -> None:
    """A valid process reports, then sends one hostile report: if refused, nothing changed;
    if accepted, the counters did not decrease and every value is finite and non-negative."""
    assume(not _known_overflow(path, value))  # covered by its own test below
    ingest = seeded()
    assert (push(ingest, report(proc="p1", seq=1)))[0] == 200
    before = aggregates(ingest)
    status, answer = push(ingest, dumps(plant(report(proc="p1", seq=seq), path, value)))
    assert status in OK_STATUSES, (status, answer)
    json.dumps(answer)
    after = aggregates(ingest)
    if status != 200 or answer.get("status") != "accepted":
        assert after == before, answer
    for s in after:
        v = s.value
        numbers = [v.sum, v.count, *(c for _, c in v.buckets)] if hasattr(v, "buckets") else [v]
        for x in numbers:
            assert x >= 0 and (math.isfinite(x) or s.spec.name == "sqlalchemy_pool_max_connections")
    for s in after:
        for label in s.labels:
            assert isinstance(label, str) and len(label) <= 128


@FUZZ
@given(
    app=st.text(min_size=1, max_size=130),
    pool_name=st.text(min_size=1, max_size=130),
    proc=st.text(min_size=1, max_size=130),
)
def test_unicode_labels_are_accepted_or_refused_never_mangled(app, pool_name, proc) -> None:
    ingest = seeded()
    status, answer = push(ingest, dumps(report(app=app, proc=proc, pools=[pool(pool_name)])))
    assert status in (200, 400), answer
    if status == 200:
        labels = {s.labels[:2] for s in aggregates(ingest) if s.spec is m.POOL_CHECKOUTS}
        assert labels == {(app, pool_name)}
        from exporter.core.render import Renderer
        from exporter.core.store import Store

        store = Store()
        store.publish(("apps", ""), ingest.samples())
        text = Renderer(store).render(openmetrics=False)
        from prometheus_client.parser import text_string_to_metric_families

        names = {
            s.labels.get("app")
            for f in text_string_to_metric_families(
                text.decode() if isinstance(text, bytes) else text
            )
            for s in f.samples
            if s.name == "sqlalchemy_pool_checkouts_total"
        }
        assert names == {app}


# -- deterministic hostile cases -------------------------------------------------------------
HUGE = {
    "bigint beyond 2**53": plant(report(seq=2), ("pools", 0, "checkouts"), 2**64),
    "4301-digit integer": b'{"version": 1, "seq": ' + b"9" * 4301 + b"}",
    "float overflow 1e999": b'{"version": 1, "app": "a", "seq": 1e999}',
    "NaN sum": plant(report(seq=2), ("pools", 0, "wait", "sum"), float("nan")),
    "Infinity sum": plant(report(seq=2), ("pools", 0, "use", "sum"), float("inf")),
    "negative counter": plant(report(seq=2), ("pools", 0, "checkouts"), -5),
    "negative bucket": plant(report(seq=2), ("pools", 0, "wait", "counts", 0), -1),
    "bool as count": plant(report(seq=2), ("pools", 0, "used"), True),
    "string count": plant(report(seq=2), ("pools", 0, "used"), "5"),
    "101 pools": report(seq=2, pools=[pool(f"p{i}") for i in range(101)]),
    "10,000 buckets": plant(report(seq=2), ("pools", 0, "wait", "counts"), [0] * 10_000),
    "duplicate keys": b'{"version": 1, "version": 2}',
    "lone surrogate app": plant(report(seq=2), ("app",), "\udc00"),
    "NUL in app": plant(report(seq=2), ("app",), "a\x00b"),
    "129-char app": plant(report(seq=2), ("app",), "a" * 129),
    "null pools": plant(report(seq=2), ("pools",), None),
    "list at top": b"[" + b"1," * 1000 + b"1]",
    "invalid utf-8": b'{"app": "\xff\xfe"}',
    "empty": b"",
}


@pytest.mark.parametrize("case", sorted(HUGE))
def test_hostile_reports_are_refused_and_leave_the_aggregates(case: str) -> None:
    ingest = seeded()
    assert (push(ingest, report(seq=1)))[0] == 200
    before = aggregates(ingest)
    body = HUGE[case] if isinstance(HUGE[case], bytes) else dumps(HUGE[case])
    status, answer = push(ingest, body)
    assert 400 <= status < 500, (case, status, answer)
    assert answer["status"] == "refused" and answer["reason"]
    assert aggregates(ingest) == before
    assert (push(ingest, report(seq=3)))[0] == 200  # and the process can go on


def test_deep_nesting_is_refused_not_a_crash() -> None:
    ingest = seeded()
    for body in (b"[" * 100_000, b'{"a":' * 50_000, b'{"version": 1, "pools": ' + b"[" * 60_000):
        status, answer = push(ingest, body)
        assert status == 400, answer


def test_integer_sum_too_large_for_a_float_is_refused() -> None:
    ingest = seeded()
    assert (push(ingest, report(seq=1)))[0] == 200
    before = aggregates(ingest)
    body = dumps(plant(report(seq=2), ("pools", 0, "wait", "sum"), 10**400))
    status, _ = push(ingest, body)
    assert status == 400
    assert aggregates(ingest) == before


def _rss_self() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError


def memory_workload() -> dict:
    """30,000 hostile pushes: 10,000 distinct apps, 10,000 distinct processes of one app each
    with max_pools_per_app pools (the worst case for memory), and one process with 10,000
    pool names."""
    config = IngestConfig()  # the defaults users run with
    ingest = Ingest(config)
    push(ingest, report(app="warm-up", proc="w"))
    base = _rss_self()
    statuses: dict[int, int] = {}

    def count(doc: dict) -> None:
        status, _ = push(ingest, doc)
        statuses[status] = statuses.get(status, 0) + 1

    for i in range(10_000):
        count(report(app=f"app-{i}", proc=f"a{i}"))
    for i in range(10_000):
        pools = [pool(f"pool-{j}", n=i) for j in range(config.max_pools_per_app)]
        count(report(app="app-2", proc=f"proc-{i}", pools=pools))
    for i in range(10_000):
        count(report(app="app-1", proc="a1", seq=i + 2, pools=[pool(f"x{i}")]))
    samples = ingest.samples()
    pools_per_app: dict[str, set[str]] = {}
    for x in samples:
        if x.spec is m.POOL_CHECKOUTS:
            pools_per_app.setdefault(x.labels[0], set()).add(x.labels[1])
    return {
        "statuses": statuses,
        **ingest.status(),  # apps and processes aggregated
        "apps_exported": len({x.labels[0] for x in samples if x.spec is m.APP_PROCESSES}),
        "max_pools": max(len(p) for p in pools_per_app.values()),
        "samples": len(samples),
        "rss_growth_mib": (_rss_self() - base) / 2**20,
        "limits": [config.max_apps, config.max_processes, config.max_pools_per_app],
    }


def test_ten_thousand_label_values_stay_capped_and_memory_bounded() -> None:
    """Run in a fresh interpreter, so resident memory growth is ingest's own."""
    code = (
        "import json; from tests.test_fuzz_ingest import memory_workload; "
        "print(json.dumps(memory_workload()))"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n30,000 hostile pushes: {r}")
    max_apps, max_processes, max_pools = r["limits"]
    assert r["apps"] <= max_apps
    assert r["processes"] <= max_processes
    assert r["max_pools"] <= max_pools
    assert "500" not in r["statuses"]
    assert r["statuses"]["429"] > 0
    assert r["apps_exported"] <= max_apps
    # Every series comes from (app, pool): bounded by the caps whatever was pushed.
    per_pool = 2 + 4 + 4 + 5  # counters, closed reasons, histograms, gauges
    assert r["samples"] <= max_apps * (1 + max_pools * per_pool) + 20
    # At the caps the aggregator holds max_processes x max_pools_per_app pool reports.
    assert r["rss_growth_mib"] < 300, r


# -- over HTTP, against the real daemon ------------------------------------------------------
@pytest.fixture(scope="module")
def daemon():
    config = f"""
databases: []
ingest:
  enabled: true
  token: {TOKEN}
  max_concurrent_requests: 4
"""
    with run_daemon(config) as d:
        yield d


def post(d, body: bytes, headers: dict | None = None, timeout: float = 10) -> requests.Response:
    return requests.post(
        d.url + REPORTS_PATH,
        data=body,
        headers={
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": "application/json",
            **(headers or {}),
        },
        timeout=timeout,
    )


def rss_kib(d) -> int:
    for line in Path(f"/proc/{d.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError


def checkouts(d, app: str) -> float | None:
    return d.value("sqlalchemy_pool_checkouts_total", app=app)


def test_http_hostile_bodies_never_500(daemon) -> None:
    assert post(daemon, dumps(report(app="steady", seq=1, pools=[pool(n=10)]))).status_code == 200
    daemon.wait_for(lambda: checkouts(daemon, "steady") == 10)
    before = {
        k: v
        for k, v in daemon.metrics().items()
        if k.startswith("sqlalchemy_") and k != "sqlalchemy_app_processes"
    }
    bodies = {
        **{name: (b if isinstance(b, bytes) else dumps(b)) for name, b in HUGE.items()},
        "over max_body_bytes": b'{"pad": "' + b"x" * 2_000_000 + b'"}',
        "no token": None,
    }
    for name, body in bodies.items():
        if body is None:
            r = requests.post(daemon.url + REPORTS_PATH, data=dumps(report(seq=9)), timeout=10)
            assert r.status_code == 401
            continue
        r = post(daemon, body)
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:200])
    # A gzip bomb (1 MiB on the wire, 1 GiB inflated) is not inflated into memory.
    rss = rss_kib(daemon)
    bomb = gzip.compress(b"0" * (1 << 30), compresslevel=9)
    r = post(daemon, bomb, {"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.status_code
    assert rss_kib(daemon) - rss < 64 * 1024, "the gzip bomb was inflated"
    assert daemon.process.poll() is None
    after = {
        k: v
        for k, v in daemon.metrics().items()
        if k.startswith("sqlalchemy_") and k != "sqlalchemy_app_processes"
    }
    assert after == before
    assert "Traceback" not in daemon.log()


def test_http_large_valid_report_split_across_segments_is_read_whole(daemon) -> None:
    """A legitimate ~600 KB report arrives in many TCP segments: it must be read whole."""
    doc = report(app="big", proc="big-1", seq=1, pools=[pool(f"p{i}", n=i + 1) for i in range(20)])
    doc["padding"] = "x" * 600_000  # unknown keys are ignored by design
    body = dumps(doc)
    with socket.create_connection(("127.0.0.1", int(daemon.url.rsplit(":", 1)[1]))) as s:
        s.sendall(
            f"POST {REPORTS_PATH} HTTP/1.1\r\nHost: x\r\n".encode()
            + b"Content-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        for i in range(0, len(body), 16_384):
            s.sendall(body[i : i + 16_384])
            time.sleep(0.001)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


def test_http_concurrent_and_slow_pushes_do_not_block_scrapes(daemon) -> None:
    """More concurrent pushes than ingest slots, some of them trickling their body: every
    push gets an answer (no 500), and /metrics keeps answering quickly meanwhile."""
    port = int(daemon.url.rsplit(":", 1)[1])
    slow_socks = []
    for _ in range(8):  # twice max_concurrent_requests, sending 1 byte a second
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(
            f"POST {REPORTS_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n".encode()
            + f"Authorization: Bearer {TOKEN}\r\n\r\n{{".encode()
        )
        slow_socks.append(s)
    results: list[int | str] = []

    def pusher(i: int) -> None:
        for j in range(5):
            try:
                r = post(daemon, dumps(report(app="conc", proc=f"c{i}", seq=j + 1)), timeout=30)
                results.append(r.status_code)
            except requests.RequestException as exc:
                results.append(type(exc).__name__)

    threads = [threading.Thread(target=pusher, args=(i,)) for i in range(20)]
    worst = slowest_scrape_while(threads, lambda: daemon.get("/metrics", timeout=5))
    for t in threads:
        t.join()
    for s in slow_socks:
        s.close()
    print(
        f"\nconcurrent pushes: {sorted(set(map(str, results)))}; worst scrape {worst * 1000:.0f} ms"
    )
    assert all(r in OK_STATUSES for r in results), results
    assert results.count(200) > 0
    assert worst < 1.0


def test_http_malformed_requests_cannot_flood_the_log(daemon) -> None:
    """Every malformed request makes aiohttp log an error: at most a handful get through."""
    port = int(daemon.url.rsplit(":", 1)[1])
    before = len(daemon.log().splitlines())
    for i in range(300):
        with socket.create_connection(("127.0.0.1", port)) as s:
            line = b"GET /" + b"a" * 10_000 if i % 2 else b"GARBAGE \x00\x01 nonsense"
            s.sendall(line + b" HTTP/1.1\r\n\r\n")
            s.recv(100)
    assert daemon.get("/metrics").status_code == 200
    added = len(daemon.log().splitlines()) - before
    print(f"\n300 malformed requests added {added} log lines")
    assert added <= 20


def _open_push(port: int, token: str | None = None, sent: int = 1) -> socket.socket:
    """A push that sends its headers and `sent` bytes of a 1 MB body, then nothing more."""
    s = socket.create_connection(("127.0.0.1", port))
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = (
        f"POST {REPORTS_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
        f"Content-Type: application/json\r\n{auth}"
    )
    s.sendall(f"{head}\r\n".encode() + b"{" + b" " * (sent - 1))
    return s


def _status_line(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    try:
        return s.recv(100).split(b"\r\n", 1)[0]
    except TimeoutError:
        return b"(no answer in time)"


@pytest.mark.slow
def test_http_refusals_come_before_slots_and_are_all_counted() -> None:
    """Slow pushes without a token are refused with 401 from their headers alone: they never
    get time to send a body. The route's own refusals, 415, 503 and 408, are counted like
    every other, and every result is exported at 0 before the first push. (503: bodies being
    received fill the memory budget; 1 MiB here.)"""
    config = f"databases: []\ningest:\n  token: {TOKEN}\n  memory_budget_bytes: 1048576\n"
    with run_daemon(config) as d:
        port = int(d.url.rsplit(":", 1)[1])
        d.wait_for(lambda: d.value("pgpressure_reports_total", result="accepted") == 0)
        exported = {ls["result"]: v for ls, v in d.metrics()["pgpressure_reports_total"]}
        assert len(exported) == 15 and set(exported.values()) == {0}, exported
        squatters = [_open_push(port) for _ in range(6)]
        for s in squatters:
            assert _status_line(s, 5) == b"HTTP/1.1 401 Unauthorized"
        t0 = time.monotonic()
        assert post(d, dumps(report(app="through", seq=1))).status_code == 200
        assert time.monotonic() - t0 < 1.5
        r = post(d, dumps(report(app="through", seq=2)), {"Content-Encoding": "gzip"})
        assert (r.status_code, r.json()["reason"]) == (415, "unsupported_encoding")
        holders = [_open_push(port, TOKEN, sent=600_000)]  # over half the budget, then stalls
        time.sleep(1.0)
        big = report(app="through", seq=3)
        big["padding"] = "x" * 600_000  # unknown keys are ignored; its bytes count
        r = post(d, dumps(big))
        assert (r.status_code, r.json()["reason"]) == (503, "busy")
        for s in holders:
            assert _status_line(s, 15) == b"HTTP/1.1 408 Request Timeout"
        for s in squatters + holders:
            s.close()
        want = {"accepted": 1, "unauthorized": 6, "unsupported_encoding": 1, "busy": 1}
        want["timeout"] = 1
        d.wait_for(
            lambda: all(
                d.value("pgpressure_reports_total", result=k) == n for k, n in want.items()
            ),
            timeout=5,
        )


def _keep_alive_get(s: socket.socket, path: str) -> bytes:
    """One GET on an open keep-alive connection; the whole answer (Content-Length framed)."""
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    s.settimeout(10)
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += s.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += s.recv(65536)
    return head.split(b"\r\n", 1)[0] + b"\n" + body


def test_http_connections_past_the_cap_are_closed_and_counted() -> None:
    """Idle connections cannot use up the daemon's file descriptors: past
    --web.max-connections a new connection is closed on accept and counted, while the
    connections already open (a scraper's keep-alive among them) keep working. Each client
    comes from its own loopback address: one address may hold only a quarter of the cap."""
    with run_daemon("databases: []\n", "--web.max-connections", "6") as d:
        port = int(d.url.rsplit(":", 1)[1])

        def connect(i: int) -> socket.socket:
            return socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.0.{i}", 0))

        scraper = connect(2)
        # Each idle client makes one request first, so it is surely registered when the
        # next connection arrives, then keeps its connection open and says nothing more.
        # (The sixth connection is the readiness check's, kept alive by its session.)
        idle = [connect(3 + i) for i in range(4)]
        for s in [scraper, *idle]:
            assert _keep_alive_get(s, "/-/healthy").startswith(b"HTTP/1.1 200")
        for i in range(3):
            with connect(10 + i) as extra:
                extra.settimeout(10)
                try:
                    extra.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
                    answer = extra.recv(100)
                except ConnectionResetError:
                    answer = b""
                assert answer == b"", answer
        page = _keep_alive_get(scraper, "/metrics").decode()
        assert page.startswith("HTTP/1.1 200"), page[:200]
        assert "\npgpressure_http_connections_refused_total 3.0\n" in page
        for s in idle:
            s.close()
        # Room again: a new connection is served.
        d.wait_for(lambda: d.value("pgpressure_http_connections_refused_total") == 3)
        scraper.close()
    assert "refusing connections: too many open" in d.log()
    assert "Traceback" not in d.log()
