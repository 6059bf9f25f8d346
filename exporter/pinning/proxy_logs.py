"""Pinning reasons from RDS Proxy's CloudWatch Logs, read incrementally and bounded.

The proxy writes one line per pin to `/aws/rds/proxy/<proxy>` when enhanced logging is on.
Each poll asks `FilterLogEvents` only for the pinning lines ("was pinned", and the "will be
pinned" warnings) since the previous poll, parses each (`exporter.pinning.logline`) and adds
it up (`exporter.pinning.log_totals`): pins by reason into
`rds_proxy_pinning_events_total{proxy,reason}`, warnings apart, Digests with their driver
fingerprints, and when a proxy that pins has gone quiet (`exporter.pinning.silence`).

- **Incremental and exact**: the cursor moves only after a read succeeded in full, and the
  read starts `OVERLAP_MS` before the cursor (lines can be ingested late) with event IDs
  deduplicated, so a line is counted once even across failures and retries.
- **Bounded**: at most `max_log_events_per_poll` new lines and `MAX_PAGES_PER_POLL` calls
  per poll over all proxies (FilterLogEvents can answer a large log group with many empty
  pages that each carry a next-page token). A scan cut short goes on at the next poll from
  its next-page token with the same request: starting over would meet the same empty pages
  and never get past them. Should the token be refused (they expire after 24 hours), the
  scan starts again from the newest line read. The proxy read first rotates, so one busy
  proxy cannot starve the rest. Every call, the pages of one proxy as well as the first page
  of the next proxy, is `call_spacing` after the previous one, to stay under the 5 requests/s
  FilterLogEvents quota.
- **A proxy that leaves is remembered for a while**: a proxy no longer read (gone from
  discovery, or pushed past `max_proxies`) keeps its cursor, seen event IDs and counts for
  `forget_after` seconds, so one that comes back resumes where it stopped instead of reading
  its last minutes again; after that its state and its counts are dropped.
- **Setup states are not errors**: a missing log group (enhanced logging never turned on) or
  missing permission is logged once per proxy and checked again every `retry_after` seconds.
- **Throttling skips the logs, not the poll**: a throttled FilterLogEvents call ends this
  poll's log reading with a warning; nothing of the interrupted read is counted, the cursors
  stay, and the next poll reads on from them. The CloudWatch metrics of the poll are kept.
  5xx and credential errors raise so the runner backs off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from exporter.aws.clients import THROTTLED, AwsApiError, Clients, TooManyPages
from exporter.logs import kv
from exporter.metrics import Sample
from exporter.pinning import logline
from exporter.pinning.log_totals import LogTotals, Tally

log = logging.getLogger("pgpressure.rds_proxy")

OVERLAP_MS = 120_000
CALL_SPACING = 0.25  # FilterLogEvents: 5 requests/s per account and region
MAX_PAGES_PER_POLL = 100  # FilterLogEvents calls per poll over all proxies: 25 s at the spacing
MAX_SEEN_EVENT_IDS = 50_000
_SETUP_ERRORS = {
    "ResourceNotFoundException": "log group missing",
    "AccessDeniedException": "access denied",
}
# a next-page token that is no longer accepted (they expire after 24 hours)
_SCAN_EXPIRED = {"InvalidParameterException", "ValidationException"}
_HINTS = {
    "log group missing": "turn on enhanced logging for the proxy to see pinning reasons",
    "access denied": "grant logs:FilterLogEvents on the proxy's log group",
}


def log_group(proxy: str) -> str:
    return f"/aws/rds/proxy/{proxy}"


@dataclass
class _Scan:
    """A FilterLogEvents scan cut short by the poll's limits: its request and the token of
    the next page, valid for 24 hours. Starting over would meet the same empty pages again
    (a large log group is searched in order), so the next poll follows the token."""

    request: dict[str, Any]
    next_token: str


@dataclass
class _Batch:
    """What one read found, not committed yet: new events by ID, what their lines said."""

    newest: int
    seen: dict[str, int]
    read: int = 0
    next_token: str | None = None
    tally: Tally = field(default_factory=Tally)

    def add(self, event: dict[str, Any]) -> None:
        event_id = str(event.get("eventId", ""))
        if event_id in self.seen:
            return
        stamp = int(event.get("timestamp", 0))
        self.seen[event_id] = stamp
        self.read += 1
        self.newest = max(self.newest, stamp)
        self.tally.add(str(event.get("message", "")), stamp)


@dataclass
class _State:
    cursor_ms: int
    watched_from_ms: int  # the first read covers lines from here on
    seen: dict[str, int] = field(default_factory=dict)  # eventId -> timestamp
    scan: _Scan | None = None  # a scan to resume before reading on from the cursor
    readable: bool = False  # read successfully at least once
    problem: str = ""  # a setup state from _SETUP_ERRORS
    retry_at: float = 0.0


class PinningLogs:
    """Reads the proxies' pinning lines into `totals`: cumulative per proxy."""

    def __init__(
        self,
        clients: Clients,
        clock: Callable[[], float],
        *,
        first_lookback: float,
        max_events_per_poll: int,
        retry_after: float,
        forget_after: float,
        call_spacing: float = CALL_SPACING,
    ) -> None:
        self.clients = clients
        self.clock = clock
        self.first_lookback = first_lookback
        self.max_events_per_poll = max_events_per_poll
        self.retry_after = retry_after
        self.forget_after = forget_after
        self.call_spacing = call_spacing
        self.max_pages_per_poll = MAX_PAGES_PER_POLL
        self.totals = LogTotals(clock)
        self.throttled = False  # the last read() stopped at a throttled call
        self._states: dict[str, _State] = {}
        self._gone_since: dict[str, float] = {}  # proxies not read now -> since when
        self._rotation = 0
        self._pages_left = 0
        self._last_call: float | None = None  # time.monotonic() of the last FilterLogEvents

    @property
    def counts(self) -> dict[tuple[str, str], float]:
        """Pinning lines per (proxy, reason), every reason from the first read."""
        return self.totals.counts

    def state_of(self, proxy: str) -> str:
        state = self._states.get(proxy)
        if state is None:
            return "not read yet"
        if state.problem:
            return state.problem
        if not state.readable:
            return "not read yet"
        return self.totals.silence.describe(proxy) or "reading"

    def samples(self, cloudwatch: Iterable[Sample]) -> list[Sample]:
        """Would-pin counts and silence, given the poll's CloudWatch samples."""
        return self.totals.samples(cloudwatch)

    def details(self, proxy: str) -> dict[str, object]:
        """What the proxy's pinning lines said, for the landing page."""
        return self.totals.details(proxy)

    def forget_except(self, proxies: set[str]) -> None:
        """`proxies` are the ones read from now on. The others keep their state and counts
        until they have been left out for `forget_after` seconds: a proxy that flaps in and
        out of discovery must not have its last minutes read and counted again."""
        now = self.clock()
        for name in set(self._states) | {proxy for proxy, _ in self.totals.counts}:
            if name in proxies:
                self._gone_since.pop(name, None)
                continue
            if now - self._gone_since.setdefault(name, now) < self.forget_after:
                continue
            del self._gone_since[name]
            self._states.pop(name, None)
            self.totals.forget(name)
            log.info(
                "rds proxy gone for good; its log cursor and pinning counts are dropped",
                extra=kv(proxy=name, gone_for=round(self.forget_after)),
            )

    def read(self, proxies: list[str]) -> None:
        budget = self.max_events_per_poll
        self._pages_left = self.max_pages_per_poll
        self.throttled = False
        if proxies:
            self._rotation = (self._rotation + 1) % len(proxies)
            proxies = proxies[self._rotation :] + proxies[: self._rotation]
        for proxy in proxies:
            if budget <= 0 or self._pages_left <= 0:
                break
            if not self._due(proxy):
                continue
            try:
                budget -= self._read_one(proxy, budget)
            except AwsApiError as exc:
                if exc.code not in THROTTLED:
                    raise  # 5xx, credentials: the runner backs off
                # The quota is per account and region: the other proxies would be throttled
                # too. Nothing of this read was committed, so the next poll reads it again.
                log.warning(
                    "rds proxy pinning logs throttled; log reading skipped until the next poll",
                    extra=kv(proxy=proxy, error=exc.code),
                )
                self.throttled = True
                break

    def _before_call(self) -> None:
        """Before every FilterLogEvents call: `call_spacing` after the previous one; counted
        against this poll's calls."""
        if self.call_spacing and self._last_call is not None:
            wait = self._last_call + self.call_spacing - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        self._last_call = time.monotonic()
        self._pages_left -= 1

    def _due(self, proxy: str) -> bool:
        state = self._states.get(proxy)
        return state is None or not state.problem or self.clock() >= state.retry_at

    def _read_one(self, proxy: str, budget: int) -> int:
        """Read one proxy's new pinning lines (or go on with a scan cut short); the counts
        are committed only when the read succeeded. Returns the events read."""
        state = self._states.get(proxy)
        if state is None:
            start = int(self.clock() * 1000) - int(self.first_lookback * 1000)
            state = self._states[proxy] = _State(cursor_ms=start, watched_from_ms=start)
        if state.scan is not None and state.scan.request["limit"] > budget:
            return 0  # a page could overrun this poll's budget; a later poll starts with it
        request = (
            state.scan.request if state.scan is not None else self._request(state, proxy, budget)
        )
        try:
            batch = self._scan(state, request, budget)
        except AwsApiError as exc:
            self._failed(proxy, state, exc)
            return 0
        if batch.next_token:
            # Cut short: go on from this page next poll. The cursor moves to the newest line
            # read, which only matters should the scan have to start over.
            self._commit(proxy, state, batch, batch.newest)
            state.scan = _Scan(request, batch.next_token)
            log.info(
                "rds proxy pinning log backlog; continuing next poll",
                extra=kv(proxy=proxy, events=batch.read, calls_left=self._pages_left),
            )
        else:
            self._commit(proxy, state, batch, request["endTime"])
            state.scan = None
        return batch.read

    def _request(self, state: _State, proxy: str, budget: int) -> dict[str, Any]:
        """A new scan: from a little before the cursor (late lines) up to now."""
        return {
            "logGroupName": log_group(proxy),
            "startTime": max(0, state.cursor_ms - OVERLAP_MS),
            "endTime": int(self.clock() * 1000),
            "filterPattern": logline.FILTER_PATTERN,
            "interleaved": True,
            "limit": min(10_000, budget),
        }

    def _scan(self, state: _State, request: dict[str, Any], budget: int) -> _Batch:
        """Pages of the scan until it ends, the budget is read or this poll's calls are used
        up; events already counted (by ID) are skipped."""
        batch = _Batch(newest=state.cursor_ms, seen=dict(state.seen))
        first_page = {"nextToken": state.scan.next_token} if state.scan is not None else {}
        pages = self.clients.pages(
            "logs",
            "filter_log_events",
            "events",
            "nextToken",
            "nextToken",
            max_pages=self._pages_left,
            pace=self._before_call,
            **request,
            **first_page,
        )
        try:
            for page in pages:
                batch.next_token = page.get("nextToken")
                for event in page["events"]:
                    batch.add(event)
                if batch.read >= budget and batch.next_token:
                    break
        except TooManyPages:
            pass  # this poll's calls are used up; next_token is where the scan goes on
        return batch

    def _failed(self, proxy: str, state: _State, exc: AwsApiError) -> None:
        """Nothing of the read is committed. An expired scan starts over next poll (the seen
        event IDs keep lines from being counted twice); a setup problem is said once and
        retried later; anything else goes up (throttling to read(), the rest to the runner)."""
        if state.scan is not None and exc.code in _SCAN_EXPIRED:
            log.info(
                "rds proxy pinning log scan could not be resumed; starting it again",
                extra=kv(proxy=proxy, error=exc.code),
            )
            state.scan = None
            return
        problem = _SETUP_ERRORS.get(exc.code)
        if problem is None:
            raise exc
        if problem != state.problem:
            log.warning(
                f"rds proxy pinning logs unavailable: {problem}; {_HINTS[problem]}",
                extra=kv(proxy=proxy, log_group=log_group(proxy)),
            )
        state.problem, state.retry_at = problem, self.clock() + self.retry_after

    def _commit(self, proxy: str, state: _State, batch: _Batch, cursor_ms: int) -> None:
        """Only after the whole read succeeded, so a failure never double counts."""
        if state.problem:
            log.info("rds proxy pinning logs readable", extra=kv(proxy=proxy))
        state.problem, state.readable, state.cursor_ms = "", True, cursor_ms
        self.totals.commit(proxy, batch.tally, state.watched_from_ms / 1000)
        horizon = cursor_ms - OVERLAP_MS
        kept = sorted((v, k) for k, v in batch.seen.items() if v >= horizon)
        state.seen = {k: v for v, k in kept[-MAX_SEEN_EVENT_IDS:]}
