"""The background thread that pushes cumulative snapshots to the daemon.

Requests never wait on it: the request path only touches in-memory numbers. A push has a
short timeout, a failed push is dropped (the next snapshot carries the same cumulative
totals), and nothing queues up while the daemon is away, so memory stays flat. After a fork
(gunicorn --preload) the child zeroes its numbers, takes a new process id and starts its own
thread; the parent keeps reporting its own totals under its own id.

A push that fails is logged at warning level when pushing to that endpoint starts failing or
fails for another reason than before, and at info level when it works again: never once per
interval while the daemon is away.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from http.client import HTTPConnection, HTTPSConnection
from typing import Any
from urllib.parse import urlsplit

from pgpressure_sqlalchemy.stats import PoolStats, merge_snapshots
from pgpressure_sqlalchemy.wire import MAX_POOLS_PER_REPORT, REPORTS_PATH, SCHEMA_VERSION

log = logging.getLogger("pgpressure.instrument")

PUSH_TIMEOUT = 2.0
EXIT_TIMEOUT = 1.0


@dataclass
class Registration:
    engine_ref: weakref.ref[Any]
    stats: PoolStats
    app: str
    pool: str
    endpoint: str
    token: str | None
    interval: float

    @property
    def key(self) -> tuple[str, str | None, str, str]:
        return (self.endpoint, self.token, self.app, self.pool)


@dataclass
class Identity:
    host: str
    pid: int
    started: float
    id: str = field(init=False)

    def __post_init__(self) -> None:
        self.id = f"{self.host}:{self.pid}:{int(self.started * 1000)}"

    @classmethod
    def current(cls) -> Identity:
        return cls(socket.gethostname(), os.getpid(), time.time())


class Reporter:
    def __init__(self) -> None:
        self._init_state()
        self.identity = Identity.current()

    def _init_state(self) -> None:
        self._lock = threading.Lock()  # guards the registration lists
        self._push_lock = threading.Lock()  # one push at a time (thread, flush, atexit)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._regs: list[Registration] = []
        self._retired: dict[tuple[str, str | None, str, str], PoolStats] = {}
        self._failing: dict[str, str] = {}  # endpoint -> why its last push failed
        self._round_failed = False
        self._left = False
        self._seq = 0

    # -- registrations ----------------------------------------------------------------------
    def add(self, reg: Registration) -> None:
        with self._lock:
            self._regs.append(reg)
        self.watch_sigterm()
        self._ensure_thread()
        self._wake.set()  # a shorter interval takes effect now, not after the current wait

    def interval(self) -> float:
        with self._lock:
            return min((r.interval for r in self._regs), default=5.0)

    def _collect(self) -> dict[tuple[str, str | None, str], list[dict[str, Any]]]:
        """Pool snapshots grouped per (endpoint, token, app); dead engines retire here."""
        with self._lock:
            alive = []
            for reg in self._regs:
                if reg.engine_ref() is None:
                    retired = self._retired.setdefault(reg.key, PoolStats())
                    with reg.stats.lock:
                        retired.add_counters(reg.stats)
                else:
                    alive.append(reg)
            self._regs = alive
            parts = [(r.key, r.stats) for r in alive] + list(self._retired.items())
        by_pool: dict[tuple[str, str | None, str, str], list[dict[str, Any]]] = {}
        for key, stats in parts:
            snapshot = stats.raw_snapshot(key[3])
            if not _in_use(snapshot):
                continue  # e.g. gunicorn's --preload master: it made the engine, never used it
            by_pool.setdefault(key, []).append(snapshot)
        groups: dict[tuple[str, str | None, str], list[dict[str, Any]]] = {}
        for (endpoint, token, app, _), docs in by_pool.items():
            groups.setdefault((endpoint, token, app), []).append(merge_snapshots(docs))
        return groups

    # -- pushing ----------------------------------------------------------------------------
    def push_all(
        self, timeout: float = PUSH_TIMEOUT, quiet: bool = False, leaving: bool = False
    ) -> dict[str, int | None]:
        """Push one snapshot per (endpoint, app); returns endpoint -> HTTP status (None: down).
        `leaving` marks this process's last report, so the daemon folds its counters and drops
        its gauges at once instead of counting it until it goes stale."""
        results: dict[str, int | None] = {}
        if not self._push_lock.acquire(timeout=timeout * 2):
            return results
        try:
            for (endpoint, token, app), pools in self._collect().items():
                self._seq += 1
                doc = {
                    "version": SCHEMA_VERSION,
                    "app": app,
                    "process": {
                        "id": self.identity.id,
                        "host": self.identity.host,
                        "pid": self.identity.pid,
                        "started": self.identity.started,
                    },
                    "seq": self._seq,
                    "interval": self.interval(),
                    "sent_at": time.time(),
                    "pools": pools[:MAX_POOLS_PER_REPORT],
                }
                if leaving:
                    doc["leaving"] = True
                status, why = self._post(endpoint, token, json.dumps(doc).encode(), timeout)
                results[endpoint] = status
                self._note(endpoint, status, why, quiet)
        finally:
            self._push_lock.release()
        return results

    @staticmethod
    def _post(
        endpoint: str, token: str | None, body: bytes, timeout: float
    ) -> tuple[int | None, str]:
        """(HTTP status, "") or (None, why the push did not get an answer). Never raises."""
        conn = None
        try:
            parts = urlsplit(endpoint)
            cls = HTTPSConnection if parts.scheme == "https" else HTTPConnection
            headers = {"Content-Type": "application/json", "User-Agent": "pgpressure-instrument"}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            conn = cls(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
            conn.request("POST", parts.path.rstrip("/") + REPORTS_PATH, body, headers)
            response = conn.getresponse()
            response.read(65536)
            return response.status, ""
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()

    def _note(self, endpoint: str, status: int | None, why: str = "", quiet: bool = False) -> None:
        """Log when pushing starts failing, fails differently, or works again; not every
        interval while the daemon is away."""
        if quiet:
            return
        if status is not None and status < 300:
            if self._failing.pop(endpoint, None) is not None:
                log.info("pgpressure: pushing to %s again", endpoint)
            return
        reason = f"HTTP {status}" if status is not None else (why or "unreachable")
        if self._failing.get(endpoint) != reason:
            self._failing[endpoint] = reason
            log.warning(
                "pgpressure: cannot push pool stats to %s (%s); will keep trying",
                endpoint,
                reason,
            )

    # -- the thread -------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(
                target=self._run, name="pgpressure-reporter", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self._wake.wait(self.interval())
                self._wake.clear()
                self.push_all()
                self._round_failed = False
            except Exception:  # never let the thread die; the next round tries again
                first = not self._round_failed
                self._round_failed = True
                log.log(
                    logging.WARNING if first else logging.DEBUG,
                    "pgpressure: a push round failed; will keep trying",
                    exc_info=True,
                )
                time.sleep(1.0)  # whatever failed, not in a tight loop

    # -- process lifecycle ------------------------------------------------------------------
    def after_fork_in_child(self) -> None:
        """The child starts from zero under its own identity; the parent's totals, its
        retired engines' included, stay the parent's to report."""
        regs = self._regs
        self._init_state()
        self.identity = Identity.current()
        for reg in regs:
            reg.stats.reset()
        self._regs = regs
        if self._regs:
            with contextlib.suppress(Exception):
                self._ensure_thread()

    def at_exit(self) -> None:
        """The last push, marked as leaving: a worker's final counts reach the daemon, which
        folds them at once (a recycled gunicorn worker is not counted for `stale_after`)."""
        if self._regs and not self._left:
            self._left = True
            with contextlib.suppress(Exception):
                self.push_all(timeout=EXIT_TIMEOUT, quiet=True, leaving=True)

    def watch_sigterm(self) -> None:
        """SIGTERM's default action ends the process without running atexit, so a process
        that leaves SIGTERM at its default gets a handler that says goodbye first and then
        dies of SIGTERM as before. Servers that handle SIGTERM themselves (gunicorn, uvicorn)
        exit normally and leave through atexit."""
        if threading.current_thread() is not threading.main_thread():
            return
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.at_exit()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _in_use(snapshot: dict[str, Any]) -> bool:
    """A pool this process has checked a connection out of, or holds one in."""
    return bool(snapshot["checkouts"] or snapshot["used"] or snapshot["idle"])


REPORTER = Reporter()
os.register_at_fork(after_in_child=REPORTER.after_fork_in_child)
atexit.register(REPORTER.at_exit)
