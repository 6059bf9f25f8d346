"""What an app's processes said about one pool that RDS Proxy would object to, kept per
(app, pool) for the pinning report: statements over the proxy's 16,384-byte limit (the head of
each template and the largest size seen, never a value) and the settings in the libpq
`options` its connections are opened with, which the proxy refuses.

Bounded as the reports are (`wire.MAX_STATEMENT_EXAMPLES`, `wire.MAX_CONNECT_OPTIONS`): the
first examples seen are kept, the largest size of each, so a busy app cannot grow them.
Examples stand for the counter since the daemon started; a setting is shown while a process
still reports it (within `SETTINGS_SHOWN_FOR`), so a fixed and redeployed app stops showing it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from exporter.ingest.model import PoolReport
from exporter.ingest.wire import MAX_CONNECT_OPTIONS, MAX_STATEMENT_EXAMPLES

SETTINGS_SHOWN_FOR = 3600.0  # seconds after the last report that named it


@dataclass(slots=True)
class ProxyWarnings:
    examples: dict[str, int] = field(default_factory=dict)  # template head -> largest bytes
    settings: dict[str, float] = field(default_factory=dict)  # setting -> last reported (wall)

    def add(self, report: PoolReport) -> None:
        for example in report.oversized_examples:
            head = example.head
            if head in self.examples or len(self.examples) < MAX_STATEMENT_EXAMPLES:
                self.examples[head] = max(example.bytes, self.examples.get(head, 0))
        now = time.time()
        for name in report.connect_options:
            if name in self.settings or len(self.settings) < MAX_CONNECT_OPTIONS:
                self.settings[name] = now

    def as_json(self) -> dict[str, object]:
        shown_since = time.time() - SETTINGS_SHOWN_FOR
        for name in [n for n, at in self.settings.items() if at < shown_since]:
            del self.settings[name]
        return {
            "oversized_examples": [
                {"head": head, "bytes": n}
                for head, n in sorted(self.examples.items(), key=lambda e: -e[1])
            ],
            "connect_options": sorted(self.settings),
        }
