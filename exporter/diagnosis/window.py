"""What evidence is computed from: a few PromQL-shaped questions over one window.

Two readers answer them - the daemon's in-memory history (`history.History`) and Prometheus
(`promql.Prometheus`) - and `collect` asks only these questions, so live and post-mortem
findings come from the same arithmetic. Every answer is grouped by the `by` labels and keyed
by their values in that order; a series that does not exist is simply absent.

Semantics, as PromQL over the window W ending at the reader's time:

- `rate`: `sum by (by) (rate(metric{where}[W]))` - per second; counters and histogram
  `_sum`/`_count`;
- `avg`, `max`: `sum by (by) (avg_over_time(...))`, `max by (by) (max_over_time(...))`;
- `quantile`: `histogram_quantile(q, sum by (by, le) (rate(metric_bucket[W])))`;
- `share_at_least`: share of the window's steps where `sum by (by) (a) >= sum by (by) (b)`;
- `share_positive`: share of the steps where `sum by (by) (metric) > 0`;
- `trend`: the value at `points` even steps over the window (a counter as its rate).
"""

from __future__ import annotations

from typing import Protocol

Key = tuple[str, ...]
Where = tuple[tuple[str, str], ...]  # label equality matchers


class WindowReader(Protocol):
    window: float  # seconds
    at: float  # unix time the window ends

    def rate(self, metric: str, by: Key, where: Where = ()) -> dict[Key, float]: ...

    def avg(self, metric: str, by: Key, where: Where = ()) -> dict[Key, float]: ...

    def max(self, metric: str, by: Key, where: Where = ()) -> dict[Key, float]: ...

    def quantile(self, q: float, metric: str, by: Key, where: Where = ()) -> dict[Key, float]: ...

    def share_at_least(
        self, a: tuple[str, Where], b: tuple[str, Where], by: Key
    ) -> dict[Key, float]: ...

    def share_positive(self, metric: str, by: Key, where: Where = ()) -> dict[Key, float]: ...

    def trend(
        self, metric: str, by: Key, where: Where = (), *, counter: bool = False, points: int = 30
    ) -> dict[Key, tuple[float, ...]]: ...


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile on cumulative (upper bound, count) pairs sorted by
    bound, the last +Inf: linear inside the bucket, the lowest bucket starting at 0, and a
    quantile in the +Inf bucket reported as the highest finite bound. None without data."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound
