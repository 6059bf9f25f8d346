"""SourceRunner: backoff after very long outages, overrunning runs, cancellation at stop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from exporter import metrics as m
from exporter.core.runner import SourceRunner
from exporter.core.source import Source
from exporter.core.store import Store
from exporter.metrics import Sample


class Scripted(Source):
    """A source whose runs fail, hang or succeed as the test says."""

    name = "scripted"
    interval = 1.0
    backoff_max = 30.0

    def __init__(self) -> None:
        self.fail = False
        self.release = asyncio.Event()
        self.release.set()
        self.started = 0

    async def sample(self) -> Iterable[Sample]:
        self.started += 1
        await self.release.wait()
        if self.fail:
            raise RuntimeError("database unreachable")
        return [Sample(m.MAX_CONNECTIONS, (), 100.0)]


async def test_retries_back_off_doubling_and_stay_capped_after_days_of_failures() -> None:
    """The wait before each retry, read from the source's health as the landing page does:
    interval 1 s doubling to the source's cap of 30 s, and still 30 s after 5,000 failures
    (2 ** 1024 does not fit a float: an uncapped exponent raised OverflowError there)."""
    source, store = Scripted(), Store()
    source.fail = True
    runner = SourceRunner(source, store)
    health = store.health(runner.key)
    waits = []
    for _ in range(5_000):
        health.next_attempt = 0.0  # retry at once, keep the failure count
        before = time.monotonic()
        await runner.run_once()
        # next_attempt leaves half an interval of slack for the scheduler's tick
        waits.append(round(health.next_attempt - before + source.interval / 2))
    assert waits[:6] == [1, 2, 4, 8, 16, 30]
    assert set(waits[5:]) == {30}


async def test_a_source_failing_for_thousands_of_runs_keeps_being_counted() -> None:
    source, store = Scripted(), Store()
    source.fail = True
    runner = SourceRunner(source, store)
    health = store.health(runner.key)
    for _ in range(1_100):
        health.next_attempt = 0.0  # skip the wait, keep the count
        await runner.run_once()
    assert health.errors_total == 1_100
    assert health.consecutive_failures == 1_100
    assert not health.up


async def start_a_hanging_run() -> tuple[Scripted, Store, SourceRunner, asyncio.Task]:
    """A runner whose first run is in flight, held until `source.release` is set."""
    source, store = Scripted(), Store()
    source.release.clear()
    runner = SourceRunner(source, store)
    task = asyncio.create_task(runner.run_once())
    await asyncio.sleep(0)
    return source, store, runner, task


async def test_ticks_during_an_overrunning_run_return_at_once() -> None:
    source, store, runner, slow = await start_a_hanging_run()
    for _ in range(3):
        await asyncio.wait_for(runner.run_once(), 1)  # does not queue behind the slow run
    assert (source.started, runner.overruns) == (1, 3)
    source.release.set()
    await slow
    assert store.health(runner.key).up
    await runner.run_once()
    assert source.started == 2


async def test_stop_cancels_the_run_in_flight_and_later_ticks_do_nothing() -> None:
    source, _, runner, hung = await start_a_hanging_run()
    await asyncio.wait_for(runner.stop(), 1)
    assert hung.done() and not hung.cancelled()  # returned quietly: no error for APScheduler
    assert hung.exception() is None
    await runner.run_once()
    assert source.started == 1
