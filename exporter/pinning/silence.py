"""Enhanced logging turns itself off after 24 hours: notice when the pinning reasons stop.

RDS Proxy writes pinning lines only while enhanced logging is on, and AWS turns it off
automatically 24 hours after it was turned on. The log group stays, it just gets no more
pinning lines, so "no pinning lines" reads like "no pins" - while CloudWatch's
`DatabaseConnectionsCurrentlySessionPinned` says connections are pinned. A proxy is *silent*
when it reports pinned connections and its log group, readable, has had no pinning line (pin
or would-pin) for `SILENT_AFTER` seconds. That is said as `rds_proxy_pinning_logs_silent`, in
the proxy's log state on the landing page, and once in the daemon's log.

What "for 24 hours" can mean is limited by what the daemon has read: lines before its first
read of a proxy's log group (a few minutes back) are unknown to it, so after a restart a
proxy is called silent only once the daemon itself has watched it for 24 hours without a line.
The clock is the source's, so tests move time instead of waiting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from exporter.logs import kv

log = logging.getLogger("pgpressure.rds_proxy")

SILENT_AFTER = 24 * 3600.0


@dataclass
class _Watch:
    since: float  # pinning lines before this are unknown to us
    last_line: float | None = None  # timestamp of the newest pinning line read
    pinned: float = 0.0  # the proxy's pinned connections in the last poll
    silent: bool = False


class LogSilence:
    """Per proxy: when it last wrote a pinning line, and whether it pins meanwhile."""

    def __init__(self, clock: Callable[[], float], after: float = SILENT_AFTER) -> None:
        self.clock = clock
        self.after = after
        self._watch: dict[str, _Watch] = {}

    def watching(self, proxy: str, since: float) -> None:
        """The proxy's log group was read, covering lines from `since` on."""
        self._watch.setdefault(proxy, _Watch(since))

    def line_at(self, proxy: str, stamp: float) -> None:
        watch = self._watch.get(proxy)
        if watch is not None and (watch.last_line is None or stamp > watch.last_line):
            watch.last_line = stamp

    def forget(self, proxy: str) -> None:
        self._watch.pop(proxy, None)

    def quiet_for(self, proxy: str) -> float | None:
        """Seconds since the newest pinning line (or since watching began); None if the log
        group has not been read."""
        watch = self._watch.get(proxy)
        if watch is None:
            return None
        newest = watch.since if watch.last_line is None else max(watch.since, watch.last_line)
        return max(0.0, self.clock() - newest)

    def is_silent(self, proxy: str) -> bool:
        watch = self._watch.get(proxy)
        return watch is not None and watch.silent

    def pinned(self, pinned: dict[str, float]) -> None:
        """This poll's pinned connections per proxy (absent: none reported). Says once when
        a proxy turns silent, and once when its lines come back or its pins end."""
        for proxy, watch in self._watch.items():
            watch.pinned = pinned.get(proxy, 0.0)
            quiet = self.quiet_for(proxy) or 0.0
            silent = watch.pinned > 0 and quiet >= self.after
            if silent and not watch.silent:
                log.warning(
                    "rds proxy reports pinned connections but its log group has had no "
                    "pinning lines for 24 hours: enhanced logging is probably off (AWS turns "
                    "it off after 24 hours); turn it on again to see the pinning reasons",
                    extra=kv(proxy=proxy, pinned=watch.pinned, quiet_hours=round(quiet / 3600)),
                )
            elif watch.silent and not silent:
                log.info("rds proxy pinning logs no longer silent", extra=kv(proxy=proxy))
            watch.silent = silent

    def describe(self, proxy: str) -> str:
        """The silence, in words for the landing page; "" when there is nothing to say."""
        watch = self._watch.get(proxy)
        if watch is None or not watch.silent:
            return ""
        hours = (self.quiet_for(proxy) or 0.0) / 3600
        return (
            f"silent: no pinning lines for {hours:.0f} h while {watch.pinned:g} connections "
            "are pinned; enhanced logging turns itself off after 24 hours"
        )
