"""What the proxies' pinning lines said, added up: pins and would-pins by reason, the pinning
statements (Digests) with their fingerprints, unknown reasons, and silence.

`exporter.pinning.proxy_logs` reads the lines; each read fills a `Tally`, which is added to the
`LogTotals` only when the read succeeded in full, so a line is never counted twice.

- **Pins** go to `rds_proxy_pinning_events_total{proxy,reason}` (built by the rds_proxy source
  from `counts`), every reason from the first read so `rate()` works from the first pin.
- **Would-pins** ("If this prepared statement runs, the client session will be pinned") go to
  `rds_proxy_pinning_would_pin_events_total{proxy,reason}`: a warning, never a pin.
- **Digests** are the statements behind "SQL changed session settings" pins, counted per proxy
  (at most `MAX_DIGESTS` each; later new ones are counted as dropped) and matched against the
  driver fingerprints, so a log-side pin names its statement, its origin and its fix
  (`statements()`; `exporter.pinning.report` also finds its pinning-risk rows).
- **Unknown reasons** count under `reason="unknown"`; the first example of each new wording is
  logged (at most `MAX_UNKNOWN_LOGGED` wordings), so it can be added to the classifier.
- **Silence**: `rds_proxy_pinning_logs_silent{proxy}` (`exporter.pinning.silence`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from exporter import metrics as m
from exporter.logs import kv
from exporter.metrics import Sample
from exporter.pinning import fingerprints, logline, shapes, statements
from exporter.pinning.silence import LogSilence
from exporter.redaction import redact

log = logging.getLogger("pgpressure.rds_proxy")

MAX_DIGESTS = 50  # distinct pinning statements remembered per proxy
MAX_UNKNOWN_LOGGED = 20  # distinct unknown reason wordings logged per process
MAX_SHOWN = 300  # characters of an unknown reason or a digest shown


@dataclass
class Tally:
    """The pinning lines of one read, not committed yet."""

    pins: Counter[str] = field(default_factory=Counter)
    would_pin: Counter[str] = field(default_factory=Counter)
    digests: Counter[str] = field(default_factory=Counter)
    fingerprints: Counter[str] = field(default_factory=Counter)  # pins per fingerprint id
    unknown: set[str] = field(default_factory=set)  # reason wordings nothing recognised
    newest_ms: int | None = None  # the newest pin or would-pin line

    def add(self, message: str, stamp_ms: int) -> None:
        line = logline.parse(message)
        if line is None:
            return
        self.newest_ms = stamp_ms if self.newest_ms is None else max(self.newest_ms, stamp_ms)
        if line.kind == logline.WOULD_PIN:
            self.would_pin[line.reason] += 1
            return
        self.pins[line.reason] += 1
        named = fingerprints.for_log_reason(line.reason_text)
        if line.digest:
            self.digests[line.digest] += 1
            named += fingerprints.match(line.digest)
        self.fingerprints.update({fp.id for fp in named})  # once per line
        if line.reason == statements.UNKNOWN:
            self.unknown.add(line.reason_text)


class LogTotals:
    """Cumulative, per proxy, since the daemon started reading its log group."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.counts: dict[tuple[str, str], float] = {}  # (proxy, reason) -> pins
        self.would_pin: dict[tuple[str, str], float] = {}
        self.silence = LogSilence(clock)
        self._digests: dict[str, Counter[str]] = {}
        self._digests_dropped: dict[str, int] = {}
        self._fingerprints: dict[str, Counter[str]] = {}
        self._unknown_logged: set[str] = set()

    def commit(self, proxy: str, tally: Tally, watched_from: float) -> None:
        for reason in statements.REASONS:  # every reason exported, 0 until seen
            key = (proxy, reason)
            self.counts[key] = self.counts.get(key, 0.0) + tally.pins[reason]
            self.would_pin[key] = self.would_pin.get(key, 0.0) + tally.would_pin[reason]
        self._add_digests(proxy, tally.digests)
        self._fingerprints.setdefault(proxy, Counter()).update(tally.fingerprints)
        self.silence.watching(proxy, watched_from)
        if tally.newest_ms is not None:
            self.silence.line_at(proxy, tally.newest_ms / 1000)
        for wording in sorted(tally.unknown):
            self._log_unknown(proxy, wording)

    def _add_digests(self, proxy: str, digests: Counter[str]) -> None:
        known = self._digests.setdefault(proxy, Counter())
        for digest, pins in digests.items():
            if digest in known or len(known) < MAX_DIGESTS:
                known[digest] += pins
            else:
                self._digests_dropped[proxy] = self._digests_dropped.get(proxy, 0) + pins

    def _log_unknown(self, proxy: str, wording: str) -> None:
        if wording in self._unknown_logged or len(self._unknown_logged) >= MAX_UNKNOWN_LOGGED:
            return
        self._unknown_logged.add(wording)
        log.warning(
            "rds proxy pinning line with a reason pgpressure does not know; counted as "
            'reason="unknown"',
            extra=kv(proxy=proxy, reason=redact(wording)[:MAX_SHOWN] or "(none)"),
        )

    def forget(self, proxy: str) -> None:
        for totals in (self.counts, self.would_pin):
            for key in [key for key in totals if key[0] == proxy]:
                del totals[key]
        self._digests.pop(proxy, None)
        self._digests_dropped.pop(proxy, None)
        self._fingerprints.pop(proxy, None)
        self.silence.forget(proxy)

    def samples(self, cloudwatch: Iterable[Sample]) -> list[Sample]:
        """The would-pin counts and the silence of every proxy read, given this poll's
        CloudWatch samples (for the proxies' pinned connections)."""
        pinned = {
            s.labels[0]: s.value
            for s in cloudwatch
            if s.spec is m.RDS_PROXY_PINNED and s.labels[1:] == ("", "")
        }
        self.silence.pinned(pinned)
        out = [
            Sample(m.RDS_PROXY_WOULD_PIN_EVENTS, key, value)
            for key, value in sorted(self.would_pin.items())
        ]
        # for the proxies this poll has both: a log group read and a pinned count
        watched = {proxy for proxy, _ in self.counts}
        out += [
            Sample(m.RDS_PROXY_PINNING_LOGS_SILENT, (p,), float(self.silence.is_silent(p)))
            for p in sorted(watched & pinned.keys())
        ]
        return out

    def statements(self, proxy: str, limit: int = 10) -> list[dict[str, object]]:
        """The statements the proxy's pins named (Digests), most pins first, each with the
        fingerprints it matches: which driver sends it and the documented fix."""
        out = []
        for digest, pins in self._digests.get(proxy, Counter()).most_common(limit):
            out.append(
                {
                    "digest": redact(digest)[:MAX_SHOWN],
                    "pins": float(pins),
                    "reason": logline.digest_reason(digest),
                    "fingerprints": [fp.id for fp in fingerprints.match(digest)],
                    "statement_keys": list(shapes.statement_keys(digest)),
                }
            )
        return out

    def pins_by_fingerprint(self, proxy: str) -> dict[str, float]:
        """Pins whose reason or Digest names a known fingerprint, by fingerprint id."""
        return {k: float(v) for k, v in self._fingerprints.get(proxy, Counter()).items()}

    def details(self, proxy: str) -> dict[str, object]:
        """For the landing page: what the proxy's pinning lines said."""
        return {
            "pins_by_fingerprint": self.pins_by_fingerprint(proxy),
            "pins_by_statement": self.statements(proxy),
            "statements_not_kept": self._digests_dropped.get(proxy, 0),
            "quiet_for_seconds": self.silence.quiet_for(proxy),
        }
