"""pgpressure's sampled load against AWS's own (DBLoad) over the same 15 minutes.

Both are average active sessions: pgpressure counts the sessions it sees in pg_stat_activity
each second, Performance Insights does the same inside the instance. When they disagree by
more than 25% over 15 minutes, pgpressure is missing samples (its connection was slow, or
down) or load comes from backends it does not see (a `pg_monitor` role sees every session;
anything else hides other roles' activity), and its load panels should not be trusted alone.
That is said once in the log when it starts and once when it ends; the landing page shows the
last comparison; the recording rule `job_target:pg_active_sessions_per_aws_db_load:ratio15m`
is the same comparison in Prometheus.

The DBLoad minutes are CloudWatch's, `delay` old, so pgpressure's figure is taken over exactly
those minutes: its cumulative active-session seconds are recorded at every poll and
interpolated at the window's ends. A minute without a DBLoad datapoint counts 0 when AWS
publishes DBLoad for the instance at all (it skips minutes without load).
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from exporter.aws.cloudwatch import PERIOD, Points
from exporter.logs import kv

log = logging.getLogger("pgpressure.rds_instance")

WINDOW = 900.0  # seconds compared
TOLERANCE = 0.25  # relative to DBLoad
FLOOR = 0.1  # average active sessions under which, on both sides, a ratio is noise
KEEP = WINDOW + 900.0  # seconds of history kept: the window plus CloudWatch's delay and more


@dataclass(frozen=True, slots=True)
class Comparison:
    aas: float  # pgpressure's average active sessions over the window
    dbload: float  # mean of AWS's DBLoad minutes over the same window
    end: float  # Unix time the window ends

    @property
    def disagrees(self) -> bool:
        if max(self.aas, self.dbload) < FLOOR:
            return False
        return self.dbload == 0 or abs(self.aas - self.dbload) > TOLERANCE * self.dbload

    def describe(self) -> str:
        when = datetime.fromtimestamp(self.end, UTC).strftime("%H:%M")
        diff = f"{(self.aas / self.dbload - 1):+.0%}" if self.dbload else "n/a"
        return (
            f"pgpressure {self.aas:.2f} vs AWS DBLoad {self.dbload:.2f} over the 15 minutes "
            f"to {when} UTC ({diff}){': disagree' if self.disagrees else ''}"
        )


class LoadCheck:
    def __init__(
        self,
        active_seconds: Callable[[], float],
        clock: Callable[[], float],
        fields: Callable[[], dict[str, object]],
    ) -> None:
        self.active_seconds = active_seconds
        self.clock = clock
        self.fields = fields  # target and instance, for the log line
        self.last: Comparison | None = None
        self._history: deque[tuple[float, float]] = deque()
        self._disagreeing = False

    def record(self) -> None:
        """Note pgpressure's cumulative active-session seconds now (every poll)."""
        now = self.clock()
        self._history.append((now, self.active_seconds()))
        while self._history and self._history[0][0] < now - KEEP:
            self._history.popleft()

    def compare(self, dbload: Points, end: float, zero_fill: bool) -> Comparison | None:
        """Compare over the 15 CloudWatch minutes before `end`; None while either side does
        not cover them. Logs when a disagreement starts or ends."""
        aws = _mean_minutes(dbload, end, zero_fill)
        ours = self._aas(end - WINDOW, end)
        if aws is None or ours is None:
            return None
        self.last = Comparison(ours, aws, end)
        if self.last.disagrees != self._disagreeing:
            self._disagreeing = self.last.disagrees
            self._log(self.last)
        return self.last

    def _log(self, comparison: Comparison) -> None:
        fields = kv(
            **self.fields(), aas=round(comparison.aas, 3), dbload=round(comparison.dbload, 3)
        )
        if comparison.disagrees:
            log.warning(
                "pgpressure's load and AWS's DBLoad disagree by more than 25% over 15 minutes: "
                "activity samples are missed, or load comes from sessions pgpressure does not "
                "see",
                extra=fields,
            )
        else:
            log.info("pgpressure's load and AWS's DBLoad agree again", extra=fields)

    def _aas(self, start: float, end: float) -> float | None:
        first, last = self._counter_at(start), self._counter_at(end)
        if first is None or last is None:
            return None
        return max(0.0, last - first) / (end - start)

    def _counter_at(self, when: float) -> float | None:
        """The cumulative seconds at `when`, interpolated between two records around it."""
        times = [t for t, _ in self._history]
        i = bisect.bisect_left(times, when)
        if i < len(times) and times[i] == when:
            return self._history[i][1]
        if i == 0 or i == len(times):
            return None
        (t0, v0), (t1, v1) = self._history[i - 1], self._history[i]
        return v0 + (v1 - v0) * (when - t0) / (t1 - t0)


def _mean_minutes(points: Points, end: float, zero_fill: bool) -> float | None:
    """DBLoad averaged over the window's minutes; None if a minute is missing and AWS is not
    known to publish DBLoad for the instance (then a missing minute may be no data at all)."""
    values = []
    by_time = {ts.timestamp(): v for ts, v in points.items()}
    for minute in range(int(WINDOW // PERIOD)):
        value = by_time.get(end - WINDOW + minute * PERIOD)
        if value is None and not zero_fill:
            return None
        values.append(value or 0.0)
    return sum(values) / len(values)
