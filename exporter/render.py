"""Store -> Prometheus metric families, in the style of client_python custom collectors.

`collect()` builds fresh families from the snapshots on every call; nothing here is a mutable
global metric. Names come from the catalogue in `exporter.metrics`. The rendered bytes are
cached per store version and format, so back-to-back scrapes cost a dictionary lookup.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client import exposition as text_exposition
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.openmetrics import exposition as openmetrics_exposition

from exporter import __version__
from exporter import metrics as m
from exporter.metrics import HistogramValue, MetricSpec
from exporter.store import Store


def _family(spec: MetricSpec, label_names: list[str]) -> Metric:
    if spec.kind == "counter":
        return CounterMetricFamily(spec.name.removesuffix("_total"), spec.help, labels=label_names)
    if spec.kind == "histogram":
        return HistogramMetricFamily(spec.name, spec.help, labels=label_names)
    return GaugeMetricFamily(spec.name, spec.help, labels=label_names)


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class StoreCollector:
    def __init__(self, store: Store) -> None:
        self.store = store

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: families depend on what the store holds

    def collect(self) -> Iterator[Metric]:
        families: dict[tuple[str, tuple[str, ...]], Metric] = {}

        def add(
            spec: MetricSpec,
            scope_names: tuple[str, ...],
            values: tuple[str, ...],
            value: float | HistogramValue,
        ) -> None:
            names = (*scope_names, *spec.labels)
            fam = families.get((spec.name, names))
            if fam is None:
                fam = families[(spec.name, names)] = _family(spec, list(names))
            if isinstance(value, HistogramValue):
                fam.add_metric(list(values), [(_le(b), c) for b, c in value.buckets], value.sum)
            else:
                fam.add_metric(list(values), value)

        add(m.BUILD_INFO, (), (__version__,), 1.0)
        for (source, target), h in self.store.healths():
            key = (source, target)
            add(m.SOURCE_UP, (), key, 1.0 if h.up else 0.0)
            add(m.SOURCE_DURATION, (), key, h.last_duration)
            add(m.SOURCE_ERRORS, (), key, float(h.errors_total))
            if h.last_success is not None:
                add(m.SOURCE_LAST_SUCCESS, (), key, h.last_success)
        for _, snap in self.store.snapshots():
            scope_names = tuple(n for n, _ in snap.scope)
            scope_values = tuple(v for _, v in snap.scope)
            for s in snap.samples:
                add(s.spec, scope_names, (*scope_values, *s.labels), s.value)
        # Prometheus needs one family per name: merge label sets that differ only in scope
        # (e.g. a daemon-wide counter rendered beside a per-target one) by name.
        merged: dict[str, Metric] = {}
        for (name, _), fam in families.items():
            if name in merged:
                merged[name].samples.extend(fam.samples)
            else:
                merged[name] = fam
        yield from merged.values()


class Renderer:
    """Caches the exposition bytes per (store version, format)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StoreCollector(store))
        self._cache: dict[bool, tuple[int, bytes]] = {}

    def render(self, openmetrics: bool = False) -> bytes:
        version = self.store.version
        cached = self._cache.get(openmetrics)
        if cached and cached[0] == version:
            return cached[1]
        exposition = openmetrics_exposition if openmetrics else text_exposition
        body = exposition.generate_latest(self.registry)
        self._cache[openmetrics] = (version, body)
        return body
