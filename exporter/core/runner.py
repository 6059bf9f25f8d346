"""Runs one source: timing, health, backoff and failure logging in one place.

A failing source must never take the daemon down, flood the log, or hammer a database that
is already in trouble. So failures are caught here, counted, logged when they start, change
or end, and retried with exponential backoff capped by the source's `backoff_max`.

A run that outlasts its interval (a connect timeout, a slow catalog) makes the following
ticks return at once instead of queueing behind it. The runner tracks this itself rather
than leaving it to APScheduler's `max_instances`, which logs a warning on every skipped tick
for as long as the slowness lasts.
"""

from __future__ import annotations

import asyncio
import logging
import time

from exporter.core.source import Source
from exporter.core.store import Store
from exporter.logs import kv
from exporter.redaction import redact

log = logging.getLogger("pgpressure.runner")


class SourceRunner:
    def __init__(self, source: Source, store: Store) -> None:
        self.source = source
        self.store = store
        self.key = (source.name, source.target)
        self.attempts = 0
        self.overruns = 0
        self._in_flight: asyncio.Task | None = None
        self._stopping = False
        store.health(self.key)  # visible (up=0) before the first run

    def _backoff(self, failures: int) -> float:
        interval = self.source.interval
        cap = max(interval, self.source.backoff_max)
        # The exponent is bounded: 2 ** 1024 no longer fits a float after days of failures.
        return min(interval * 2.0 ** min(failures - 1, 32), cap)

    async def run_once(self) -> None:
        if self._stopping:
            return
        if self._in_flight is not None:
            self.overruns += 1
            log.debug(
                "source still running; tick skipped",
                extra=kv(source=self.key[0], target=self.key[1], overruns=self.overruns),
            )
            return
        self._in_flight = asyncio.current_task()
        try:
            await self._attempt()
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        finally:
            self._in_flight = None

    async def stop(self) -> None:
        """Cancel a run in flight and wait for it, so nothing reconnects after shutdown."""
        self._stopping = True
        task = self._in_flight
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _attempt(self) -> None:
        health = self.store.health(self.key)
        now = time.monotonic()
        if now < health.next_attempt:
            return
        self.attempts += 1
        started = time.perf_counter()
        try:
            samples = await self.source.sample()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a source failure, whatever it is, is data, not a crash
            message = redact(str(exc)) or type(exc).__name__
            health.up = False
            health.errors_total += 1
            health.consecutive_failures += 1
            # Half an interval of slack so the next scheduled tick is not skipped by jitter.
            delay = self._backoff(health.consecutive_failures)
            health.next_attempt = now + delay - self.source.interval / 2
            fields = kv(
                source=self.key[0],
                target=self.key[1],
                err=message,
                failures=health.consecutive_failures,
                retry_in=f"{delay:g}s",
            )
            if health.consecutive_failures == 1 or message != health.last_error:
                log.warning("source failed", extra=fields)
            else:
                log.debug("source still failing", extra=fields)
            health.last_error = message
            if not self.source.keep_gauges_on_failure:
                self.store.keep_counters_only(self.key)
        else:
            self.store.publish(self.key, samples, self.source.scope)
            if health.consecutive_failures:
                log.info(
                    "source recovered",
                    extra=kv(
                        source=self.key[0],
                        target=self.key[1],
                        after_failures=health.consecutive_failures,
                    ),
                )
            health.up = True
            health.last_success = time.time()
            health.consecutive_failures = 0
            health.last_error = ""
            health.next_attempt = 0.0
        finally:
            health.last_duration = time.perf_counter() - started
            self.store.touch()
