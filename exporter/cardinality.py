"""Top-K capping for labels whose values come from users.

A label such as application_name or queryid can take unbounded values; exposing all of them
would let one misbehaving client blow up Prometheus. We keep the K values with the most
recent activity and fold the rest into `other`, while keeping counters monotonic: a value's
cumulative total stays with the series it was first exported under, so a key that drops out
of the top-K hands its later growth to `other` rather than making any series go backwards.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable

OTHER = "other"


class CappedCounter:
    """Cumulative counters per key with at most `cap` exported keys plus `other`.

    `add(key, delta)` records growth. `decay` weights recent activity so that the ranking
    follows the workload, not history. Exported series never go backwards.
    """

    def __init__(self, cap: int, decay: float = 0.9) -> None:
        if cap < 1:
            raise ValueError("cap must be at least 1")
        self.cap = cap
        self.decay = decay
        self._recent: dict[Hashable, float] = defaultdict(float)
        self._exported: dict[Hashable, float] = {}  # key -> cumulative total, exported
        self._other = 0.0
        self._pending: dict[Hashable, float] = defaultdict(float)

    def add(self, key: Hashable, delta: float) -> None:
        if delta <= 0:
            return
        self._pending[key] += delta

    def commit(self) -> None:
        """Close one round of `add`s: rank keys and assign growth to series."""
        for key in list(self._recent):
            self._recent[key] *= self.decay
            if self._recent[key] < 1e-9 and key not in self._pending:
                del self._recent[key]
        for key, delta in self._pending.items():
            self._recent[key] += delta
        top = set(sorted(self._recent, key=self._recent.__getitem__, reverse=True)[: self.cap])
        for key, delta in self._pending.items():
            if key in self._exported:
                self._exported[key] += delta
            elif key in top and len(self._exported) < self.cap:
                self._exported[key] = delta
            else:
                self._other += delta
        # A key that left the top-K long ago frees its slot only when it had no growth for
        # a full decay horizon; its counter vanishing is a series end, not a reset.
        for key in list(self._exported):
            if key not in self._recent:
                del self._exported[key]
        self._pending.clear()

    def items(self) -> list[tuple[Hashable, float]]:
        out = list(self._exported.items())
        if self._other:
            out.append((OTHER, self._other))
        return out
