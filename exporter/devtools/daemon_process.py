"""Running the real daemon as a subprocess, the way users run it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import requests
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class DaemonProcess:
    url: str
    process: subprocess.Popen
    log_path: Path
    config_path: Path
    session: requests.Session = field(default_factory=requests.Session)

    def get(self, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 5)
        return self.session.get(self.url + path, **kwargs)

    def metrics_text(self) -> str:
        response = self.get("/metrics")
        response.raise_for_status()
        return response.text

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """Sample name -> [(labels, value)], over every family."""
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                out.setdefault(s.name, []).append((s.labels, s.value))
        return out

    def value(self, name: str, **labels: str) -> float | None:
        """The sum of the samples of `name` whose labels include `labels`; None if absent."""
        matches = [
            v
            for ls, v in self.metrics().get(name, [])
            if all(ls.get(k) == want for k, want in labels.items())
        ]
        return sum(matches) if matches else None

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, predicate, timeout: float = 15.0, interval: float = 0.2):
        """Poll until predicate() is truthy; returns its value or raises with the log tail."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                last = predicate()
                if last:
                    return last
            time.sleep(interval)
        raise AssertionError(
            f"condition not met in {timeout}s (last={last!r}); log tail:\n{self.log()[-3000:]}"
        )


@contextlib.contextmanager
def logged_process(
    cmd: list[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    stop_timeout: float = 5,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen]:
    """Run `cmd` with stdout and stderr to `log_path` and `env` added to the environment, in
    a session of its own; afterwards SIGTERM to that whole session (a shell's children too),
    and SIGKILL if it has not exited within `stop_timeout` seconds."""
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        _signal_session(process, signal.SIGTERM)
        try:
            process.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            _signal_session(process, signal.SIGKILL)
            process.wait()


def _signal_session(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def one_target_config(dsn: str, *, statements: str | None = None, extra: str = "") -> str:
    """A daemon config with one database target, `main` (2 vCPUs, activity sampled every
    second), and ingest off. `statements` is the flow mapping of its statements source
    (its defaults if None); `extra` is added to the target (lines indented by 4 spaces)."""
    statements_line = f"\n    statements: {statements}" if statements is not None else ""
    return f"""
databases:
  - name: main
    dsn: {dsn}
    vcpus: 2
    activity: {{interval: 1s}}{statements_line}
{extra}
ingest: {{enabled: false}}
"""


def slowest_scrape_while(
    threads: list[threading.Thread], scrape: Callable[[], requests.Response]
) -> float:
    """Start `threads`; until all have finished, `scrape()` every 50 ms, each answer a 200.
    Returns the slowest scrape, in seconds."""
    for t in threads:
        t.start()
    worst = 0.0
    while any(t.is_alive() for t in threads):
        t0 = time.perf_counter()
        assert scrape().status_code == 200
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(0.05)
    return worst


Daemon = TypeVar("Daemon", bound=DaemonProcess)


@contextlib.contextmanager
def run_daemon(
    config_yaml: str,
    *extra_args: str,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    port: int | None = None,
    program: tuple[str, ...] = ("-m", "exporter"),
    daemon_class: type[Daemon] = DaemonProcess,
) -> Iterator[Daemon]:
    """Start `python -m exporter` with this config on a free port; stop it afterwards.
    `program` replaces `-m exporter` (a launcher script that runs exporter.cli.main), and
    `daemon_class` (a DaemonProcess subclass) is what is yielded."""
    tmp = Path(tempfile.mkdtemp(prefix="pgpressure-daemon-"))
    config_path = tmp / "config.yaml"
    config_path.write_text(config_yaml)
    log_path = tmp / "daemon.log"
    port = port or free_port()
    cmd = [
        sys.executable,
        *program,
        "--config.file",
        str(config_path),
        "--web.listen-address",
        f"127.0.0.1:{port}",
        "--log.level",
        "debug",
        *extra_args,
    ]
    with logged_process(cmd, log_path, env) as process:
        daemon = daemon_class(f"http://127.0.0.1:{port}", process, log_path, config_path)
        if wait_ready:
            daemon.wait_for(lambda: daemon.get("/-/ready").status_code == 200, timeout=20)
        yield daemon
