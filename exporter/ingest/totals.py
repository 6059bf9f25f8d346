"""Cumulative totals of one (app, pool), and how one process's reports relate in time.

A counter exported from pushed reports must never go backwards, while the processes behind it
restart, pause and come back. These are the arithmetic pieces the aggregator builds that on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from exporter.ingest.model import PoolReport
from exporter.ingest.wire import CLOSE_REASONS, HISTOGRAMS, NBUCKETS


@dataclass
class Totals:
    """Cumulative counters and histogram buckets of one (app, pool)."""

    checkouts: float = 0.0
    timeouts: float = 0.0
    closed: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CLOSE_REASONS, 0.0))
    counts: dict[str, list[float]] = field(
        default_factory=lambda: {h: [0.0] * NBUCKETS for h in HISTOGRAMS}
    )
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(HISTOGRAMS, 0.0))

    def add(self, p: PoolReport) -> None:
        self._add(p, 1)

    def subtract(self, p: PoolReport) -> None:
        """Take back what `add(p)` put in (a departed process that reports again)."""
        self._add(p, -1)

    def _add(self, p: PoolReport, sign: int) -> None:
        self.checkouts += sign * p.checkouts
        self.timeouts += sign * p.timeouts
        for reason, n in p.closed.items():
            self.closed[reason] += sign * n
        for h in HISTOGRAMS:
            hist = p.histogram(h)
            counts = self.counts[h]
            for i, c in enumerate(hist.counts):
                counts[i] += sign * c
            # (x + s) - s may differ from x by an ulp: the exported sums have a floor
            # (AppState.sum_floor), so that never shows as a decrease.
            self.sums[h] = max(self.sums[h] + sign * hist.sum, 0.0)

    def copy(self) -> Totals:
        return Totals(
            self.checkouts,
            self.timeouts,
            dict(self.closed),
            {h: list(c) for h, c in self.counts.items()},
            dict(self.sums),
        )


def went_backwards(old: PoolReport, new: PoolReport) -> bool:
    """Whether the process started over, judged by integer counts only: a float sum built
    from the same observations in another order can come out an ulp smaller."""
    if new.checkouts < old.checkouts or new.timeouts < old.timeouts:
        return True
    if any(new.closed.get(r, 0) < n for r, n in old.closed.items()):
        return True
    for h in HISTOGRAMS:
        a, b = old.histogram(h), new.histogram(h)
        if any(y < x for x, y in zip(a.counts, b.counts, strict=True)):
            return True
    return False


def keep_sums(old: PoolReport, new: PoolReport) -> PoolReport:
    """`new` with each histogram sum at least the old one (a continuing process)."""
    update = {
        h: new.histogram(h).model_copy(update={"sum": old.histogram(h).sum})
        for h in HISTOGRAMS
        if new.histogram(h).sum < old.histogram(h).sum
    }
    return new.model_copy(update=update) if update else new
