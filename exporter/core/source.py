"""What every source is to the daemon: something it can run on an interval and close.

The daemon owns scheduling, timing, health, backoff and logging of failures (see
`exporter.core.runner`), so a source only has to sample and raise when it cannot.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable

from exporter.metrics import Sample


class Source(abc.ABC):
    #: source label value, e.g. "activity"
    name: str
    #: target label value ("" for daemon-wide sources such as apps)
    target: str = ""
    #: seconds between runs
    interval: float = 1.0
    #: longest pause between retries while failing
    backoff_max: float = 30.0
    #: labels added to every sample of this source
    scope: tuple[tuple[str, str], ...] = ()
    #: keep the last gauges when a run fails (AWS: values are minutes old anyway)
    keep_gauges_on_failure: bool = False

    @abc.abstractmethod
    async def sample(self) -> Iterable[Sample]:
        """Take one sample; raise on failure (the runner counts and logs it)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections; called once at shutdown."""

    def status(self) -> dict[str, object]:
        """Extra facts for the landing page (never secrets)."""
        return {}
