"""One memory budget for ingest, in bytes (`ingest.memory_budget_bytes`).

Ingest is the part of the daemon whose memory the outside world decides: how many processes
push, with how many pools, how often they restart, and how many bodies arrive at once. The
caps on apps, pools and processes bound it only in counts; this bounds it in bytes, the unit
of the container's memory limit. Two things draw on it:

- **state**: the last report of every pool of every live process, and of the processes that
  departed recently (remembered so that one coming back is not counted twice). It may take
  `STATE_SHARE` of the budget. Past that the oldest departed processes are forgotten first,
  then reports that would add processes or pools are refused (429, `over_budget`); reports of
  processes already counted keep flowing.
- **bodies** being received: counted as their bytes arrive (a slow body holds only what it
  has sent), within what the state leaves. Past that a push is refused with 503 and
  Retry-After (`busy`).

State is counted in estimates per process and per pool snapshot, upper bounds of what the
aggregator's structures take (measured with tracemalloc by tests/test_hardening_ingest.py);
transient work (parsing one report) is not counted and is what the rest of the container's
limit leaves room for (the README's sizing).
"""

from __future__ import annotations

from collections.abc import Callable

from exporter import metrics as m
from exporter.ingest.results import Refused
from exporter.metrics import Sample

#: bytes of one pool snapshot held for a process: its array, its object, its dict slot
POOL_BYTES = 1024
#: bytes of one process apart from its pools: its record, key, id and pools dict
PROCESS_BYTES = 1024
#: the part of the budget state may take; bodies in flight get at least the rest
STATE_SHARE = 0.75
RETRY_AFTER = "5"  # seconds, told to a push refused because bodies filled the budget


class MemoryBudget:
    """What ingest holds against `ingest.memory_budget_bytes`, read from the config in use at
    each check (a reload may change it)."""

    def __init__(self, limit: Callable[[], int], state: Callable[[], int]) -> None:
        self.limit = limit  # the budget in bytes
        self.state = state  # bytes of state held now (the aggregator's estimate)
        self.body_bytes = 0

    @staticmethod
    def cost(processes: int, pools: int) -> int:
        return processes * PROCESS_BYTES + pools * POOL_BYTES

    def state_fits(self, more: int) -> bool:
        """Whether state may grow by `more` bytes."""
        return self.state() + more <= STATE_SHARE * self.limit()

    def over_budget(self, what: str) -> Refused:
        return Refused(
            429,
            "over_budget",
            f"{what} would take ingest past ingest.memory_budget_bytes ({self.limit()})",
        )

    def take_body(self, n: int) -> None:
        """Count `n` more bytes of a body being received, or refuse the push (`busy`)."""
        if self.state() + self.body_bytes + n > self.limit():
            raise Refused(
                503,
                "busy",
                "reports being received fill ingest.memory_budget_bytes; retry",
                {"Retry-After": RETRY_AFTER},
            )
        self.body_bytes += n

    def give_body(self, n: int) -> None:
        self.body_bytes -= n

    def samples(self) -> list[Sample]:
        return [
            Sample(m.INGEST_MEMORY_BUDGET, (), float(self.limit())),
            Sample(m.INGEST_MEMORY, ("state",), float(self.state())),
            Sample(m.INGEST_MEMORY, ("bodies",), float(self.body_bytes)),
        ]
