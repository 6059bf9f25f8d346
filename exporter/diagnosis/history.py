"""The live window: a bounded in-memory history of the series the rules need.

Every evaluation (15 s) the engine records the store's current samples of the metrics in
`METRICS` as one tick. Each series keeps a ring of `points = window / step + 1` floats (a
histogram: its sum and count, and its buckets only where a quantile is asked of it), all
rings aligned on one shared tick timeline, so a value costs 8 bytes and the history's size is
bounded by `max_series x points`. A series with no point left in the window is dropped; one
arriving past `max_series` is not kept (and counted in `dropped`).

It answers the `WindowReader` questions the way PromQL would over the same samples (see
`window`), so live findings and `pgpressure doctor --prometheus` findings agree.
"""

from __future__ import annotations

import math
from array import array
from collections import defaultdict
from collections.abc import Iterator

from exporter import metrics as m
from exporter.core.store import Store
from exporter.diagnosis.window import Key, Where, histogram_quantile
from exporter.metrics import HistogramValue

NAN = math.nan
Labels = tuple[tuple[str, str], ...]

#: The series the rules read; only these are recorded.
METRICS = frozenset(
    spec.name
    for spec in (
        m.POOL_CONNECTIONS,
        m.POOL_MAX_CONNECTIONS,
        m.POOL_PENDING_REQUESTS,
        m.POOL_WAIT_SECONDS,
        m.POOL_USE_SECONDS,
        m.POOL_CREATE_SECONDS,
        m.QUERY_DURATION_SECONDS,
        m.POOL_CHECKOUTS,
        m.POOL_TIMEOUTS,
        m.POOL_CONNECTIONS_CLOSED,
        m.APP_PROCESSES,
        m.ACTIVE_SESSION_SECONDS,
        m.APPLICATION_ACTIVE_SESSION_SECONDS,
        m.APPLICATION_SESSIONS,
        m.APPLICATION_IDLE_IN_TRANSACTION_SECONDS,
        m.LOCK_BLOCKER_SECONDS,
        m.SESSIONS,
        m.BLOCKED_SESSIONS,
        m.MAX_CONNECTIONS,
        m.RESERVED_CONNECTIONS,
        m.VCPUS,
        m.TEMP_BYTES,
        m.WORK_MEM_BYTES,
        m.STATEMENT_TEMP_BYTES,
        m.STATEMENT_CALLS,
        m.STATEMENT_EXEC_SECONDS,
        m.PINNING_RISK_CALLS,
        m.RDS_PROXY_PINNED,
        m.RDS_PROXY_DATABASE_CONNECTIONS,
        m.RDS_PROXY_MAX_ALLOWED,
        m.RDS_PROXY_PINNING_EVENTS,
    )
)
#: Histograms whose buckets are kept, for quantiles; the others keep sum and count only.
QUANTILES = frozenset({m.POOL_WAIT_SECONDS.name, m.QUERY_DURATION_SECONDS.name})


class _Series:
    """One series' ring over the shared ticks (NaN where it had no sample).

    A counter's ring holds its running total with resets already folded in (a value below the
    previous one adds itself, as PromQL's increase() does), so its growth over any stretch of
    the window is the last value minus the first. A histogram keeps that for its sum and count
    (`values`, `counts`) and, if asked for quantiles, for every bucket (`buckets`, one row of
    `len(bounds)` per tick); a count that went down resets all of them.
    """

    __slots__ = (
        "bounds",
        "buckets",
        "counter",
        "counts",
        "labels",
        "last",
        "prev",
        "total",
        "values",
    )

    def __init__(
        self, labels: Labels, points: int, kind: str, value: float | HistogramValue
    ) -> None:
        self.labels = dict(labels)
        self.last = -1  # the tick last written
        self.counter = kind != "gauge"
        self.values = array("d", [NAN]) * points  # a histogram: its sums
        self.counts: array | None = None
        self.buckets: array | None = None
        self.bounds: tuple[float, ...] = ()
        self.prev: list[float] = []  # the raw values last seen: [value] or [sum, count, *buckets]
        self.total: list[float] = []  # their running totals, resets folded in
        if isinstance(value, HistogramValue):
            self.counts = array("d", [NAN]) * points
            self.bounds = tuple(b for b, _ in value.buckets)

    def keep_buckets(self, points: int) -> None:
        self.buckets = array("d", [NAN]) * (points * len(self.bounds))

    def _raw(self, value: float | HistogramValue) -> list[float]:
        if not isinstance(value, HistogramValue):
            return [value]
        raw = [value.sum, value.count]
        if self.buckets is not None and len(value.buckets) == len(self.bounds):
            raw += [c for _, c in value.buckets]
        return raw

    def put(self, tick: int, points: int, value: float | HistogramValue) -> None:
        for gap in range(max(self.last + 1, tick - points + 1), tick):  # ticks it missed
            self._clear(gap % points)
        raw = self._raw(value)
        if not self.counter:
            self.total = raw
        elif len(self.prev) != len(raw):
            self.total = list(raw)
        else:
            reset = raw[1] < self.prev[1] if len(raw) > 1 else raw[0] < self.prev[0]
            self.total = [
                t + (r if reset else r - p)
                for t, r, p in zip(self.total, raw, self.prev, strict=True)
            ]
        self.prev = raw
        slot = tick % points
        self.values[slot] = self.total[0]
        if self.counts is not None:
            self.counts[slot] = self.total[1]
        if self.buckets is not None and len(self.total) > 2:
            n = len(self.bounds)
            self.buckets[slot * n : slot * n + n] = array("d", self.total[2:])
        self.last = tick

    def _clear(self, slot: int) -> None:
        self.values[slot] = NAN
        if self.counts is not None:
            self.counts[slot] = NAN
        if self.buckets is not None:
            n = len(self.bounds)
            self.buckets[slot * n : slot * n + n] = array("d", [NAN]) * n

    def nbytes(self) -> int:
        arrays = (self.values, self.counts, self.buckets)
        return sum(a.itemsize * len(a) for a in arrays if a is not None)


class History:
    """The last `window` seconds of METRICS, one point per `record()`."""

    def __init__(self, window: float = 900.0, step: float = 15.0, max_series: int = 50_000) -> None:
        self.window = window
        self.points = math.ceil(window / step) + 1
        self.max_series = max_series
        self.at = 0.0
        self.dropped = 0
        self._tick = -1
        self._times = array("d", [NAN]) * self.points
        self._series: dict[str, dict[Labels, _Series]] = defaultdict(dict)
        self._count = 0
        self._cached: tuple[int, tuple[int, int, list[float]]] = (-2, (0, 0, []))

    # -- writing -----------------------------------------------------------------------------
    def record(self, now: float, store: Store) -> None:
        """One tick: the store's current samples of the METRICS."""
        self._tick += 1
        self.at = now
        self._times[self._tick % self.points] = now
        for _, snapshot in store.snapshots():
            scope = snapshot.scope
            for sample in snapshot.samples:
                name = sample.spec.name
                if name in METRICS:
                    labels = scope + tuple(zip(sample.spec.labels, sample.labels, strict=True))
                    self._put(name, sample.spec.kind, labels, sample.value)
        self._expire()

    def _put(self, name: str, kind: str, labels: Labels, value: float | HistogramValue) -> None:
        series = self._series[name].get(labels)
        if series is None:
            if self._count >= self.max_series:
                self.dropped += 1
                return
            series = self._series[name][labels] = _Series(labels, self.points, kind, value)
            if name in QUANTILES and series.counts is not None:
                series.keep_buckets(self.points)
            self._count += 1
        series.put(self._tick, self.points, value)

    def _expire(self) -> None:
        oldest = self._tick - self.points + 1
        for by_labels in self._series.values():
            for labels in [k for k, s in by_labels.items() if s.last < oldest]:
                del by_labels[labels]
                self._count -= 1
        for name in [n for n, by_labels in self._series.items() if not by_labels]:
            del self._series[name]

    # -- what it holds -----------------------------------------------------------------------
    @property
    def series(self) -> int:
        return self._count

    def nbytes(self) -> int:
        """Bytes of point storage (the rings); bounded by max_series x points x the widest."""
        return sum(s.nbytes() for by in self._series.values() for s in by.values())

    # -- reading: the WindowReader questions ---------------------------------------------------
    def _window(self) -> tuple[int, int, list[float]]:
        """The ticks inside the window, oldest first: their first ring slot, how many, and
        their times. Consecutive ticks, so their slots are contiguous around the ring."""
        if self._cached[0] != self._tick:
            first = max(0, self._tick - self.points + 1)
            start = self.at - self.window - 1e-9
            ticks = [
                t for t in range(first, self._tick + 1) if self._times[t % self.points] >= start
            ]
            times = [self._times[t % self.points] for t in ticks]
            self._cached = (self._tick, (ticks[0] % self.points if ticks else 0, len(ticks), times))
        return self._cached[1]

    def _ordered(self, ring: array) -> list[float]:
        """A ring's values over the window, oldest first (NaN where the series had none)."""
        first, n, _ = self._window()
        end = first + n
        if end <= self.points:
            return ring[first:end].tolist()
        return (ring[first:] + ring[: end - self.points]).tolist()

    def _select(self, metric: str, where: Where) -> Iterator[tuple[_Series, array]]:
        """The series of `metric` matching `where`, with the ring to read (`_sum` and
        `_count` of a histogram's name are its rings)."""
        part, base = "values", metric
        if metric not in self._series:
            for suffix, ring in (("_sum", "values"), ("_count", "counts")):
                if metric.endswith(suffix) and metric.removesuffix(suffix) in self._series:
                    base, part = metric.removesuffix(suffix), ring
        for series in self._series.get(base, {}).values():
            if all(series.labels.get(k, "") == v for k, v in where):
                ring = getattr(series, part)
                if ring is not None:
                    yield series, ring

    @staticmethod
    def _group(series: _Series, by: Key) -> Key:
        labels = series.labels
        return tuple([labels.get(label, "") for label in by])

    def rate(self, metric: str, by: Key, where: Where = ()) -> dict[Key, float]:
        """PromQL's rate() over the window: each series' growth from its first to its last
        point in the window, extrapolated to the window's edges as Prometheus does (toward
        zero for a counter that starts inside it, by no more than it grew), over the window."""
        times = self._window()[2]
        out: dict[Key, float] = {}
        for series, ring in self._select(metric, where):
            values = self._ordered(ring)
            ends = _ends(values)
            if ends is None or ends[0] == ends[1]:
                continue
            i, j = ends  # a counter's ring holds reset-adjusted totals: growth is j - i
            rate = extrapolated_rate(
                (times[i], values[i]),
                (times[j], values[j]),
                j - i + 1,
                self.at - self.window,
                self.at,
            )
            key = self._group(series, by)
            out[key] = out.get(key, 0.0) + rate
        return out

    def _gauge(self, metric: str, by: Key, where: Where) -> Iterator[tuple[Key, list[float]]]:
        for series, ring in self._select(metric, where):
            values = [v for v in self._ordered(ring) if v == v]  # NaN != NaN
            if values:
                yield self._group(series, by), values

    def avg(self, metric: str, by: Key, where: Where = ()) -> dict[Key, float]:
        out: dict[Key, float] = {}
        for key, values in self._gauge(metric, by, where):
            out[key] = out.get(key, 0.0) + sum(values) / len(values)
        return out

    def max(self, metric: str, by: Key, where: Where = ()) -> dict[Key, float]:
        out: dict[Key, float] = {}
        for key, values in self._gauge(metric, by, where):
            out[key] = max(out.get(key, -math.inf), max(values))
        return out

    def quantile(self, q: float, metric: str, by: Key, where: Where = ()) -> dict[Key, float]:
        first = self._window()[0]
        grouped: dict[Key, dict[float, float]] = defaultdict(lambda: defaultdict(float))
        for series, counts in self._select(f"{metric}_count", where):
            ends = _ends(self._ordered(counts))
            if series.buckets is None or ends is None or ends[0] == ends[1]:
                continue
            n = len(series.bounds)
            rows = [((first + i) % self.points) * n for i in ends]
            start = series.buckets[rows[0] : rows[0] + n]
            last = series.buckets[rows[1] : rows[1] + n]
            acc = grouped[self._group(series, by)]
            for bound, a, b in zip(series.bounds, start, last, strict=True):
                acc[bound] += b - a
        out: dict[Key, float] = {}
        for key, acc in grouped.items():
            value = histogram_quantile(q, sorted(acc.items()))
            if value is not None:
                out[key] = value
        return out

    def _per_tick(self, metric: str, by: Key, where: Where, *, counter: bool) -> dict[Key, list]:
        """Group sums at each tick of the window (NaN where no series of the group had a
        point); a counter's as its per-second growth since the tick before."""
        times = self._window()[2]
        out: dict[Key, list[float]] = {}
        for series, ring in self._select(metric, where):
            values = self._ordered(ring)
            if counter:
                values = [NAN] + [
                    (b - a) / (tb - ta)
                    for a, b, ta, tb in zip(values, values[1:], times, times[1:], strict=False)
                ]
            key = self._group(series, by)
            acc = out.get(key)
            if acc is not None:
                values = [_add(x, y) for x, y in zip(acc, values, strict=True)]
            out[key] = values
        return out

    def share_at_least(
        self, a: tuple[str, Where], b: tuple[str, Where], by: Key
    ) -> dict[Key, float]:
        lhs = self._per_tick(a[0], by, a[1], counter=False)
        rhs = self._per_tick(b[0], by, b[1], counter=False)
        out: dict[Key, float] = {}
        for key in lhs.keys() & rhs.keys():
            both = [(x, y) for x, y in zip(lhs[key], rhs[key], strict=True) if x == x and y == y]
            if both:
                out[key] = sum(1 for x, y in both if x >= y) / len(both)
        return out

    def share_positive(self, metric: str, by: Key, where: Where = ()) -> dict[Key, float]:
        out: dict[Key, float] = {}
        for key, sums in self._per_tick(metric, by, where, counter=False).items():
            seen = [v for v in sums if v == v]
            if seen:
                out[key] = sum(1 for v in seen if v > 0) / len(seen)
        return out

    def trend(
        self, metric: str, by: Key, where: Where = (), *, counter: bool = False, points: int = 30
    ) -> dict[Key, tuple[float, ...]]:
        values = self._per_tick(metric, by, where, counter=counter)
        return {key: _downsample(v, points) for key, v in values.items()}


def extrapolated_rate(
    first: tuple[float, float], last: tuple[float, float], samples: int, start: float, end: float
) -> float:
    """Prometheus's extrapolatedRate for a counter over [start, end], from its first and last
    (time, value) in the range: the growth, extended to each edge when the series reaches
    within 1.1 sample intervals of it (else by half an interval), and toward the start no
    further than where the counter would have been zero."""
    (t0, v0), (t1, v1) = first, last
    growth, sampled = v1 - v0, t1 - t0
    average = sampled / (samples - 1)
    to_start, to_end = t0 - start, end - t1
    if growth > 0 and v0 >= 0:
        to_start = min(to_start, sampled * (v0 / growth))
    threshold = average * 1.1
    interval = sampled
    interval += to_start if to_start < threshold else average / 2
    interval += to_end if to_end < threshold else average / 2
    return growth * (interval / sampled) / (end - start)


def _ends(values: list[float]) -> tuple[int, int] | None:
    """The first and last index holding a value (not NaN), or None."""
    first = next((i for i, v in enumerate(values) if v == v), None)
    if first is None:
        return None
    last = len(values) - 1
    while values[last] != values[last]:
        last -= 1
    return first, last


def _add(x: float, y: float) -> float:
    """Sum that treats NaN as "no point" rather than poisoning the total."""
    if x != x:
        return y
    return x if y != y else x + y


def _downsample(values: list[float], points: int) -> tuple[float, ...]:
    """About `points` values, each the mean of its share of the ticks (NaN if none); the
    ticks as they are when there are fewer than twice as many."""
    size = len(values) // points
    if size <= 1:
        return tuple(values)
    out = []
    for i in range(0, len(values), size):
        chunk = [v for v in values[i : i + size] if v == v]
        out.append(sum(chunk) / len(chunk) if chunk else NAN)
    return tuple(out)
