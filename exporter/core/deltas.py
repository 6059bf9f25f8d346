"""Growth of PostgreSQL's cumulative counters between two samples.

pg_stat_database and pg_stat_statements hand out running totals that go back to zero when an
entry is reset, evicted and re-created, or its database is dropped and made again. The
exporter sums growth instead of exporting the totals, so an aggregated or capped series (the
`other` of a label cap, the sum over a statement's roles) stays monotonic when one of its
members disappears: Prometheus would read a drop as a counter reset and count it twice.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable


class CumulativeDeltas:
    """Per key, the growth of a tuple of running totals since the last sample.

    A key whose values went down was reset or evicted and re-created: its current values
    are all new growth. A first-seen key counts from zero, so an exported counter starts at
    the entry's cumulative value like any other PostgreSQL counter; `baseline()` instead
    takes a key's current values as the starting point without counting them.
    """

    def __init__(self) -> None:
        self._last: dict[Hashable, tuple[float, ...]] = {}

    def update(self, key: Hashable, values: tuple[float, ...]) -> tuple[float, ...]:
        prev = self._last.get(key)
        self._last[key] = values
        if prev is None or any(v < p for v, p in zip(values, prev, strict=True)):
            return values
        return tuple(v - p for v, p in zip(values, prev, strict=True))

    def baseline(self, key: Hashable, values: tuple[float, ...]) -> None:
        self._last[key] = values

    def forget_missing(self, seen: Iterable[Hashable]) -> None:
        for key in self._last.keys() - set(seen):
            del self._last[key]

    def clear(self) -> None:
        """Everything counts from zero again (the whole view was reset)."""
        self._last.clear()
