"""Bounded, fair bcrypt work for basic auth.

bcrypt is slow on purpose (~0.25 s at cost 12), so every guess a client sends costs the daemon
that much CPU. Checked first come, first served, a flood of wrong passwords would queue a
correct first login (Prometheus after a restart, its credentials not cached yet) behind all of
it, past a scrape's timeout. So:

- `FairChecks` runs at most `workers` checks at once, at most half of them for one client
  address, handing free workers out in turn across addresses (round robin): a new client
  finds a worker free, or waits for one check, not for every check a flooding client queued.
  One address may have at most `per_client` checks waiting; past that its request fails.
- `FailureLimit` allows each client address `burst` failed checks, then one more every
  `refill` seconds; a client out of allowance is answered as if it had failed, without a
  check, so guessing from one address is slow and costs the daemon almost nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class FairChecks:
    """Blocking checks in worker threads, at most `workers` at once, fair across clients."""

    def __init__(self, workers: int = 2, per_client: int = 4) -> None:
        self.workers = workers
        self.per_client = per_client
        self.running_per_client = max(1, workers // 2)
        self._running: Counter[str] = Counter()
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    def _may_run(self, client: str) -> bool:
        return (
            self._running.total() < self.workers and self._running[client] < self.running_per_client
        )

    async def run(self, client: str, check: Callable[[], T]) -> T | None:
        """`check()` in a thread once `client`'s turn comes; None (not run) when the client
        already has `per_client` checks waiting."""
        if self._may_run(client) and client not in self._waiting:
            self._running[client] += 1
        elif not await self._turn(client):
            return None
        try:
            return await asyncio.to_thread(check)
        finally:
            self._release(client)

    async def _turn(self, client: str) -> bool:
        """Wait in `client`'s queue until a worker is handed over; False if it is full."""
        queue = self._waiting.setdefault(client, deque())
        if len(queue) >= self.per_client:
            return False
        turn = asyncio.get_running_loop().create_future()
        queue.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release(client)  # handed a worker just as the request went away
            else:
                self._discard(client, turn)
            raise
        return True

    def _discard(self, client: str, turn: asyncio.Future[None]) -> None:
        queue = self._waiting.get(client)
        if queue is not None and turn in queue:
            queue.remove(turn)
            if not queue:
                del self._waiting[client]

    def _release(self, client: str) -> None:
        """`client`'s worker is free: hand workers to the next clients in turn."""
        self._running[client] -= 1
        if self._running[client] <= 0:
            del self._running[client]
        while (nxt := next((c for c in self._waiting if self._may_run(c)), None)) is not None:
            queue = self._waiting[nxt]
            turn = queue.popleft()
            if queue:
                self._waiting.move_to_end(nxt)  # the others go first
            else:
                del self._waiting[nxt]
            if not turn.done():
                self._running[nxt] += 1
                turn.set_result(None)


class FailureLimit:
    """Failed checks per client address: a bucket of `burst`, refilled one per `refill`
    seconds. At most `clients` addresses are remembered (least recently failed forgotten)."""

    def __init__(
        self,
        burst: int = 5,
        refill: float = 2.0,
        clients: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst, self.refill, self.clients, self.clock = burst, refill, clients, clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # (tokens, at)

    def _tokens(self, client: str, now: float) -> float:
        tokens, at = self._buckets.get(client, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) / self.refill)

    def allows(self, client: str) -> bool:
        """Whether `client` may have a password checked now."""
        return self._tokens(client, self.clock()) >= 1.0

    def failed(self, client: str) -> None:
        now = self.clock()
        self._buckets[client] = (max(self._tokens(client, now) - 1.0, 0.0), now)
        self._buckets.move_to_end(client)
        while len(self._buckets) > self.clients:
            self._buckets.popitem(last=False)
