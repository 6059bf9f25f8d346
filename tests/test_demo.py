"""`pgpressure demo` as a user runs it: a subprocess with its own database and workload."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from exporter.devtools.daemon_process import free_port


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class Demo:
    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exporter",
                "demo",
                "--web.listen-address",
                f"127.0.0.1:{self.port}",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def workdir(self) -> Path:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            match = re.search(r"temporary data in (\S+)", self.output())
            if match:
                return Path(match.group(1))
            time.sleep(0.1)
        raise AssertionError(f"no temp dir announced:\n{self.output()}")

    def scrape(self) -> dict[tuple[str, tuple], float] | None:
        try:
            response = requests.get(self.url + "/metrics", timeout=3)
        except requests.RequestException:
            return None
        out = {}
        for family in text_string_to_metric_families(response.text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.reader.join(2)


def total(samples: dict, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    )


def test_demo_produces_every_kind_of_pressure_and_cleans_up():
    demo = Demo("--duration", "25")
    workdir = demo.workdir()
    last: dict = {}
    try:
        while demo.process.poll() is None:
            samples = demo.scrape()
            if samples:
                last = samples
            time.sleep(1)
        code = demo.wait(30)
    finally:
        if demo.process.poll() is None:
            demo.process.kill()
    out = demo.output()
    assert code == 0, out
    assert f"{demo.url}/metrics" in out, "the demo prints where to look"
    assert not workdir.exists(), f"{workdir} left behind"
    assert last, out

    load = "pg_active_session_seconds_total"
    assert total(last, load, wait_event_type="CPU", target="demo") > 0, out
    assert total(last, load, wait_event_type="Lock", target="demo") > 0, out
    assert total(last, "pg_temp_bytes_total", datname="shop") > 0, out
    assert total(last, "pg_work_mem_bytes") == 64 * 1024
    if _have("exporter.ingest.aggregator") and _have("pgpressure_sqlalchemy"):
        assert total(last, "sqlalchemy_pool_checkouts_total", app="shop") > 0, out
        assert total(last, "sqlalchemy_pool_wait_seconds_count", app="shop") > 0, out
    else:
        assert "no pool metrics" in out
    if _have("moto"):
        assert total(last, "rds_proxy_pinning_events_total", proxy="demo-proxy") > 0, out
        assert total(last, "rds_proxy_database_connections", proxy="demo-proxy") > 0, out
    else:
        assert "skipping the RDS Proxy part" in out


def test_ctrl_c_stops_the_demo_and_removes_its_data():
    demo = Demo()
    workdir = demo.workdir()
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and demo.process.poll() is None:
        if "demo is running" in demo.output():
            break
        time.sleep(0.2)
    assert workdir.exists()
    demo.process.send_signal(signal.SIGINT)
    code = demo.wait(20)
    assert code == 0, demo.output()
    assert not workdir.exists()
    assert f"removed {workdir}" in demo.output()
