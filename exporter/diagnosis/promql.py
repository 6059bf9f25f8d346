"""The post-mortem window: the same questions answered by Prometheus's HTTP API.

Each `WindowReader` question is one PromQL instant query at `time=at` (`/api/v1/query`),
or a range query for a trend (`/api/v1/query_range`), over the window ending at `at`. So a
3 a.m. incident can be explained the next morning from what Prometheus scraped, with the
rules the daemon ran live. `selector` (e.g. `job="pgpressure"`) is added to every series
selector when one Prometheus scrapes several exporters.

Shares are subqueries at `step` (the scrape interval is a good value), e.g. the share of the
window a pool was at its maximum:
`avg_over_time((sum by (app, pool) (used) >= bool sum by (app, pool) (max))[15m:15s])`.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from exporter.diagnosis.window import Key, Where


class PrometheusError(Exception):
    """Prometheus could not be asked, or refused the query: the doctor cannot tell."""


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class Prometheus:
    def __init__(
        self,
        url: str,
        at: float,
        window: float,
        *,
        step: float = 15.0,
        selector: str = "",
        timeout: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.at = at
        self.window = window
        self.step = step
        self.selector = selector.strip().strip("{}").strip()
        self.timeout = timeout
        self.queries = 0

    # -- HTTP --------------------------------------------------------------------------------
    def _get(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        self.queries += 1
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                doc = json.load(response)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise PrometheusError(f"{params.get('query')}: HTTP {exc.code} {detail}") from None
        except (OSError, ValueError) as exc:
            raise PrometheusError(f"cannot query {self.url}: {exc}") from None
        if doc.get("status") != "success":
            raise PrometheusError(f"{params.get('query')}: {doc.get('error', doc)}")
        return doc["data"]["result"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self._get("/api/v1/query", {"query": expr, "time": f"{self.at:.3f}"})

    def _instant(self, expr: str, by: Key) -> dict[Key, float]:
        out: dict[Key, float] = {}
        for row in self.query(expr):
            value = float(row["value"][1])
            if not math.isnan(value):
                out[tuple(row["metric"].get(label, "") for label in by)] = value
        return out

    # -- PromQL ------------------------------------------------------------------------------
    def _sel(self, metric: str, where: Where = ()) -> str:
        matchers = [f"{k}={_quote(v)}" for k, v in where]
        if self.selector:
            matchers.append(self.selector)
        return f"{metric}{{{', '.join(matchers)}}}" if matchers else metric

    @property
    def _range(self) -> str:
        return f"[{self.window:.0f}s]"

    def rate(self, metric: str, by: Key, where: Where = ()) -> dict[Key, float]:
        expr = f"sum by ({', '.join(by)}) (rate({self._sel(metric, where)}{self._range}))"
        return self._instant(expr, by)

    def avg(self, metric: str, by: Key, where: Where = ()) -> dict[Key, float]:
        expr = f"sum by ({', '.join(by)}) (avg_over_time({self._sel(metric, where)}{self._range}))"
        return self._instant(expr, by)

    def max(self, metric: str, by: Key, where: Where = ()) -> dict[Key, float]:
        expr = f"max by ({', '.join(by)}) (max_over_time({self._sel(metric, where)}{self._range}))"
        return self._instant(expr, by)

    def quantile(self, q: float, metric: str, by: Key, where: Where = ()) -> dict[Key, float]:
        buckets = self._sel(f"{metric}_bucket", where)
        expr = (
            f"histogram_quantile({q}, sum by ({', '.join((*by, 'le'))}) "
            f"(rate({buckets}{self._range})))"
        )
        return self._instant(expr, by)

    def _subquery(self, condition: str) -> str:
        return f"avg_over_time(({condition})[{self.window:.0f}s:{self.step:g}s])"

    def share_at_least(
        self, a: tuple[str, Where], b: tuple[str, Where], by: Key
    ) -> dict[Key, float]:
        group = ", ".join(by)
        condition = f"sum by ({group}) ({self._sel(*a)}) >= bool sum by ({group}) ({self._sel(*b)})"
        return self._instant(self._subquery(condition), by)

    def share_positive(self, metric: str, by: Key, where: Where = ()) -> dict[Key, float]:
        condition = f"sum by ({', '.join(by)}) ({self._sel(metric, where)}) > bool 0"
        return self._instant(self._subquery(condition), by)

    def trend(
        self, metric: str, by: Key, where: Where = (), *, counter: bool = False, points: int = 30
    ) -> dict[Key, tuple[float, ...]]:
        step = max(self.window / points, 1.0)
        selector = self._sel(metric, where)
        if counter:
            selector = f"rate({selector}[{max(2 * step, 4 * self.step):.0f}s])"
        start = self.at - self.window + step
        params = {
            "query": f"sum by ({', '.join(by)}) ({selector})",
            "start": f"{start:.3f}",
            "end": f"{self.at:.3f}",
            "step": f"{step:.3f}",
        }
        out: dict[Key, tuple[float, ...]] = {}
        for row in self._get("/api/v1/query_range", params):
            values = [math.nan] * points
            for t, v in row["values"]:
                i = round((float(t) - start) / step)
                if 0 <= i < points:
                    values[i] = float(v)
            out[tuple(row["metric"].get(label, "") for label in by)] = tuple(values)
        return out
