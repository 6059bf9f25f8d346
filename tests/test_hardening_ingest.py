"""Ingest against what an outside probe did to it (issue 16): memory past the container's
limit, a histogram sum stuck at +Inf, slow bodies starving real pushes, and pushes a browser
could send cross-origin.
"""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import requests
import yaml

from exporter.config import IngestConfig
from exporter.devtools.daemon_process import run_daemon
from exporter.ingest import REPORTS_PATH
from tests.ingest_reports import make_ingest, pool_doc, push, report_doc, sums, values

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
TOKEN = "hardening-ingest-token"


# -- 3. one memory budget ----------------------------------------------------------------------
def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def fleet_rounds(rounds: int, processes: int, budget: int | None = None) -> dict:
    """`rounds` times: `processes` new processes, spread over 50 apps, each pushing 20 pools;
    then all of them go stale (and are remembered as departed). Returns the push statuses,
    what ingest says it holds, and resident memory before and at its peak."""
    ingest, clock = make_ingest(**({} if budget is None else {"memory_budget_bytes": budget}))
    pools = [pool_doc(f"pool-{j:02d}", checkouts=1000 + j, bucket=j % 19) for j in range(20)]
    push(ingest, report_doc("app-0", "h-0:0:1", 1, pools))  # warm-up: the first one, early
    base = _vm("VmRSS")
    statuses: dict[int, int] = {}
    for r in range(rounds):
        for i in range(processes):
            status, _ = push(ingest, report_doc(f"app-{i % 50}", f"h-{i}:{r}:1", 1, pools))
            statuses[status] = statuses.get(status, 0) + 1
        clock.now += IngestConfig().stale_after + 1
        ingest.samples()  # the silent processes depart
    v = values(ingest)
    return {
        "statuses": statuses,
        "rss_base": base,
        "rss_peak": _vm("VmHWM"),
        "state": v[("pgpressure_ingest_memory_bytes", ("state",))],
        "over_budget": v[("pgpressure_reports_total", ("over_budget",))],
    }


def test_the_probes_fleet_rounds_stay_within_the_default_budget() -> None:
    """The probe: 2,000 processes x 20 pools, then three more rounds after they went stale,
    took the daemon to ~505 MB with the default limits, twice the 256Mi Kubernetes limit. Run
    in a fresh interpreter, so its resident memory is ingest's own."""
    code = (
        "import json; from tests.test_hardening_ingest import fleet_rounds; "
        "print(json.dumps(fleet_rounds(4, 2000)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    growth = r["rss_peak"] - r["rss_base"]
    print(f"\n4 rounds of 2,000 x 20 pools: peak RSS growth {growth / MIB:.0f} MiB, {r}")
    budget = IngestConfig().memory_budget_bytes
    assert growth < budget
    assert r["state"] <= budget
    assert r["statuses"] == {"200": 8000}  # the default caps' fleet fits the default budget


def test_past_a_small_budget_new_processes_are_refused_counted_and_memory_stays_under() -> None:
    """With a 4 MiB budget the same kind of fleet is refused past it (429 over_budget,
    counted), processes already counted keep reporting, and what ingest allocates stays
    within the budget (tracemalloc: every byte Python allocates)."""
    budget = 4 * MIB
    ingest, _ = make_ingest(memory_budget_bytes=budget)
    pools = [pool_doc(f"pool-{j:02d}", checkouts=10, bucket=j % 19) for j in range(20)]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        answers = [push(ingest, report_doc(f"a{i % 50}", f"p{i}", 1, pools)) for i in range(400)]
        again = push(ingest, report_doc("a0", "p0", 2, pools))  # the first process, again
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    refused = [doc for status, doc in answers if status == 429]
    print(f"\n{len(refused)} of 400 refused; traced peak {(peak - base) / MIB:.2f} MiB")
    assert refused and all(doc["reason"] == "over_budget" for doc in refused)
    assert values(ingest)[("pgpressure_reports_total", ("over_budget",))] == len(refused)
    assert again[0] == 200
    assert peak - base < budget


def test_the_default_budget_agrees_with_the_kubernetes_limit_and_the_readme() -> None:
    """Half the shipped container limit, the rest for the daemon itself (about 60 MiB with a
    target) and transient work; the README documents the key and its default."""
    deployment = yaml.safe_load((ROOT / "deploy/kubernetes/base/deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    limit = container["resources"]["limits"]["memory"]
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", limit).groups()
    limit_bytes = int(number) * (MIB if unit == "Mi" else 1024 * MIB)
    budget = IngestConfig().memory_budget_bytes
    assert budget * 2 <= limit_bytes
    readme = (ROOT / "README.md").read_text()
    assert f"memory_budget_bytes: {budget}" in readme
    assert limit in readme


# -- 6. sums that overflow come back -------------------------------------------------------------
def hist(total: float) -> dict:
    counts = [0] * len(pool_doc()["wait"]["counts"])
    counts[3] = 1
    return {"counts": counts, "sum": total}


def test_a_histogram_sum_that_overflows_resets_and_recovers() -> None:
    """The probe: two processes each pushing a valid wait.sum of 1e308 made the exported sum
    +Inf, and it never decreased, so it never came back. A non-finite sum is now a reset of
    that series (counted), and the sum is finite again once the processes restart."""
    ingest, _ = make_ingest()
    key = ("sqlalchemy_pool_wait_seconds", ("orders", "default"))
    for proc in ("h:1:1", "h:2:1"):
        huge = pool_doc(checkouts=1) | {"wait": hist(1e308)}
        assert push(ingest, report_doc("orders", proc, 1, [huge]))[0] == 200
    assert sums(ingest)[key] == math.inf
    for proc in ("h:1:1", "h:2:1"):  # both restart: fewer observations, small sums
        assert push(ingest, report_doc("orders", proc, 2, [pool_doc(checkouts=0)]))[0] == 200
    recovered = sums(ingest)[key]
    assert math.isfinite(recovered)
    assert values(ingest)[("pgpressure_ingest_sum_resets_total", ())] == 1
    for proc in ("h:1:1", "h:2:1"):
        assert push(ingest, report_doc("orders", proc, 3, [pool_doc(checkouts=5)]))[0] == 200
    assert recovered <= sums(ingest)[key] < math.inf  # and counts up again from there


# -- 7, 8. slow bodies, and the media type -------------------------------------------------------
def post(url: str, body: bytes, content_type: str = "application/json") -> requests.Response:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type}
    return requests.post(url + REPORTS_PATH, data=body, headers=headers, timeout=10)


def trickle(port: int, stop: threading.Event, answers: list) -> None:
    """A push sending its report one byte a second; starts over when answered."""
    body = json.dumps(report_doc("slow", "slow:1:1")).encode()
    while not stop.is_set():
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(
                f"POST {REPORTS_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                f"Content-Type: application/json\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode()
            )
            s.settimeout(1.0)
            for byte in body:
                if stop.is_set():
                    return
                try:
                    answer = s.recv(100)
                except TimeoutError:
                    s.sendall(bytes([byte]))
                    continue
                answers.append(answer.split(b"\r\n", 1)[0])
                break


def test_slow_bodies_do_not_starve_real_pushes() -> None:
    """The probe: 40 connections sending a report at 1 byte/s held all 32 ingest slots and
    real pushes got `503 busy` for 10 s. Nothing is held while a body arrives now: every real
    push is answered 200, and each trickler is cut off with 408 at its deadline."""
    config = f"databases: []\ningest:\n  token: {TOKEN}\n"
    with run_daemon(config) as d:
        port = int(d.url.rsplit(":", 1)[1])
        stop = threading.Event()
        answers: list[bytes] = []
        threads = [threading.Thread(target=trickle, args=(port, stop, answers)) for _ in range(40)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            statuses = []
            for seq in range(1, 21):
                body = json.dumps(report_doc("real", "real:1:1", seq)).encode()
                statuses.append(post(d.url, body).status_code)
                time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        timeouts = d.value("pgpressure_reports_total", result="timeout")
    print(f"\nreal pushes: {statuses}; tricklers answered: {sorted(set(answers))}")
    assert statuses == [200] * 20
    assert answers and set(answers) == {b"HTTP/1.1 408 Request Timeout"}
    assert timeouts >= 40


def test_a_push_that_is_not_json_is_refused_415() -> None:
    """A browser may POST text/plain or a form cross-origin without a preflight; only
    `application/json` is a report (415 otherwise, counted)."""
    config = f"databases: []\ningest:\n  token: {TOKEN}\n"
    body = json.dumps(report_doc("mime", "mime:1:1")).encode()
    with run_daemon(config) as d:
        for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
            r = post(d.url, body, content_type)
            assert (r.status_code, r.json()["reason"]) == (415, "unsupported_media_type")
        assert post(d.url, body, "application/json; charset=utf-8").status_code == 200
        d.wait_for(
            lambda: d.value("pgpressure_reports_total", result="unsupported_media_type") == 3
        )
        assert d.value("pgpressure_reports_total", result="accepted") == 1
