"""Top-K capping for labels whose values come from users.

A label such as application_name or queryid can take unbounded values; exposing all of them
would let one client blow up Prometheus. We export the K keys with the most recent activity
and fold the rest into `other`, while keeping every exported counter monotonic: growth is
assigned to whichever series the key is exported under at the time it happens, and totals
are never moved between series.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

OTHER = "other"


class CappedCounters:
    """Cumulative counters (one or more fields) per key, at most `cap` keys plus `other`.

    Call `add()` for each key's growth in a round, then `commit()`. Ranking uses the field
    at `rank_field`, decayed each round so it follows the current workload. A key that is
    exported keeps its series while it stays active; a key silent for long enough to decay
    away gives its slot back (its series ends; it does not go backwards).
    """

    def __init__(
        self,
        cap: int,
        fields: int = 1,
        rank_field: int = 0,
        decay: float = 0.8,
        other_key: Hashable = OTHER,
    ) -> None:
        if cap < 1:
            raise ValueError("cap must be at least 1")
        self.cap, self.fields, self.rank_field = cap, fields, rank_field
        self.decay, self.other_key = decay, other_key
        self._recent: dict[Hashable, float] = {}
        self._exported: dict[Hashable, list[float]] = {}
        self._other = [0.0] * fields
        self._pending: dict[Hashable, list[float]] = {}

    def add(self, key: Hashable, *deltas: float) -> None:
        if len(deltas) != self.fields:
            raise ValueError(f"expected {self.fields} values")
        if not any(d > 0 for d in deltas):
            return
        acc = self._pending.setdefault(key, [0.0] * self.fields)
        for i, d in enumerate(deltas):
            if d > 0:
                acc[i] += d

    def commit(self) -> None:
        for key in list(self._recent):
            self._recent[key] *= self.decay
            if self._recent[key] < 1e-6 and key not in self._pending:
                del self._recent[key]
                self._exported.pop(key, None)
        for key, deltas in self._pending.items():
            # +1e-9 so that keys with activity in a non-ranked field still rank above none
            self._recent[key] = self._recent.get(key, 0.0) + deltas[self.rank_field] + 1e-9
        ranked = sorted(self._recent, key=self._recent.__getitem__, reverse=True)
        top = set(ranked[: self.cap])
        for key, deltas in self._pending.items():
            target = self._exported.get(key)
            if target is None and key in top and len(self._exported) < self.cap:
                target = self._exported[key] = [0.0] * self.fields
            if target is None:
                target = self._other
            for i, d in enumerate(deltas):
                target[i] += d
        self._pending.clear()

    def items(self) -> list[tuple[Hashable, Sequence[float]]]:
        out: list[tuple[Hashable, Sequence[float]]] = list(self._exported.items())
        if any(self._other):
            out.append((self.other_key, self._other))
        return out


class LabelCap:
    """Admit the first `cap` distinct values of a label, map later ones to `other`.

    Used for datname, whose values are few and stable: admission order keeps every series
    stable, which matters more here than following the busiest database. One cap is shared
    by the sources of a target, so they agree on which databases are `other`.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._admitted: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._admitted:
            return value
        if len(self._admitted) < self.cap:
            self._admitted.add(value)
            return value
        return OTHER

    def seen(self) -> set[str]:
        return set(self._admitted)

    def release_missing(self, present: set[str]) -> set[str]:
        """Free the slots of values that no longer exist (a dropped database), so a cap
        filled by short-lived databases does not push every later one into `other`."""
        gone = self._admitted - present
        self._admitted -= gone
        return gone
