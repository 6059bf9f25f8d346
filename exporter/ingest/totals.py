"""Cumulative totals of one (app, pool), one process's last report of a pool, and how one
process's reports relate in time.

A counter exported from pushed reports must never go backwards, while the processes behind it
restart, pause and come back. These are the arithmetic pieces the aggregator builds that on.

Both are kept as one flat array of doubles in one layout (`Layout`): the counters, the close
reasons, then each histogram's bucket counts and its sum. The aggregator holds one snapshot per
pool of every live and recently departed process (2,000 processes x 20 pools at the default
caps, twice over), so their size is the daemon's memory: a snapshot is under 1 KiB, where the
validated report it comes from is nearly 7 KiB. Counts are exact in a double up to 2**53, the
most a report may carry.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from exporter.ingest.model import PoolReport
from exporter.ingest.wire import CLOSE_REASONS, HISTOGRAMS, NBUCKETS

_HIST0 = 3 + len(CLOSE_REASONS)  # where the first histogram starts
_SUMS = {h: _HIST0 + i * (NBUCKETS + 1) + NBUCKETS for i, h in enumerate(HISTOGRAMS)}


class Layout:
    """Where each number sits in a snapshot's or a total's array."""

    CHECKOUTS = 0
    TIMEOUTS = 1
    OVERSIZED = 2  # statements over RDS Proxy's size limit
    CLOSED = {reason: 3 + i for i, reason in enumerate(CLOSE_REASONS)}
    #: histogram -> index of its first bucket count; its sum follows the last bucket
    COUNTS = {h: i - NBUCKETS for h, i in _SUMS.items()}
    SUMS = _SUMS
    WIDTH = _HIST0 + len(HISTOGRAMS) * (NBUCKETS + 1)
    #: the integer counts: a process that reports fewer of any has started over
    INTEGERS = tuple(sorted(set(range(WIDTH)) - set(_SUMS.values())))


def _zeros() -> array:
    return array("d", bytes(8 * Layout.WIDTH))


@dataclass(slots=True)
class PoolSnapshot:
    """What one process last reported for one pool: its cumulative numbers and its gauges."""

    values: array
    used: int = 0
    idle: int = 0
    pending: int = 0
    size: int | None = None
    max: int | None = None  # None: unbounded

    @classmethod
    def of(cls, p: PoolReport) -> PoolSnapshot:
        values = _zeros()
        values[Layout.CHECKOUTS] = p.checkouts
        values[Layout.TIMEOUTS] = p.timeouts
        values[Layout.OVERSIZED] = p.oversized
        for reason, n in p.closed.items():
            values[Layout.CLOSED[reason]] = n
        for h in HISTOGRAMS:
            hist = p.histogram(h)
            start = Layout.COUNTS[h]
            values[start : start + NBUCKETS] = array("d", hist.counts)
            values[Layout.SUMS[h]] = hist.sum
        return cls(values, p.used, p.idle, p.pending, p.size, p.max)

    def sum(self, h: str) -> float:
        return self.values[Layout.SUMS[h]]


@dataclass
class Totals:
    """Cumulative counters and histogram buckets of one (app, pool)."""

    values: array = field(default_factory=_zeros)

    @property
    def checkouts(self) -> float:
        return self.values[Layout.CHECKOUTS]

    @property
    def timeouts(self) -> float:
        return self.values[Layout.TIMEOUTS]

    @property
    def oversized(self) -> float:
        return self.values[Layout.OVERSIZED]

    def closed(self) -> dict[str, float]:
        return {reason: self.values[i] for reason, i in Layout.CLOSED.items()}

    def counts(self, h: str) -> list[float]:
        start = Layout.COUNTS[h]
        return list(self.values[start : start + NBUCKETS])

    def sum(self, h: str) -> float:
        return self.values[Layout.SUMS[h]]

    def restart_sum(self, h: str, value: float = 0.0) -> None:
        self.values[Layout.SUMS[h]] = value

    def add(self, p: PoolSnapshot) -> None:
        self._add(p, 1.0)

    def subtract(self, p: PoolSnapshot) -> None:
        """Take back what `add(p)` put in (a departed process that reports again)."""
        self._add(p, -1.0)

    def _add(self, p: PoolSnapshot, sign: float) -> None:
        mine, theirs = self.values, p.values
        for i in range(Layout.WIDTH):
            mine[i] += sign * theirs[i]
        # (x + s) - s may differ from x by an ulp: the exported sums have a floor
        # (AppState.sum_floor), so that never shows as a decrease.
        for i in Layout.SUMS.values():
            mine[i] = max(mine[i], 0.0)  # NaN stays NaN: see the aggregator's overflow

    def copy(self) -> Totals:
        return Totals(array("d", self.values))


def went_backwards(old: PoolSnapshot, new: PoolSnapshot) -> bool:
    """Whether the process started over, judged by integer counts only: a float sum built
    from the same observations in another order can come out an ulp smaller."""
    a, b = old.values, new.values
    return any(b[i] < a[i] for i in Layout.INTEGERS)


def keep_sums(old: PoolSnapshot, new: PoolSnapshot) -> PoolSnapshot:
    """`new` with each histogram sum at least the old one (a continuing process)."""
    for i in Layout.SUMS.values():
        if new.values[i] < old.values[i]:
            new.values[i] = old.values[i]
    return new
